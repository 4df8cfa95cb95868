//! Resident memory of one image per TiB of disk, and whether writes go on while a
//! checkpoint runs. Prints figures, asserts nothing.
//!
//! `cargo run -p convoy-store --example mem_per_tib [-- <GiB> [<dir>]]` (default 1024 GiB
//! in the temp dir). Steps: create (untouched), write 1 GiB scattered (16,384 64-KiB writes
//! at random chunks), hash what was written, checkpoint while a writer keeps writing (its
//! longest write is printed, and the same without a checkpoint), close, reopen, then
//! reopen once more without the activity log (everything distrusted) and rehash. Memory is the process's VmRSS (what the
//! image really holds resident), measured after each step, minus the figure before create.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use convoy_store::DiskImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// (VmRSS, VmHWM) of this process in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let base = std::env::args()
        .nth(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let size = gib * GIB;
    let tib = size as f64 / (1u64 << 40) as f64;
    let dir = tempfile::tempdir_in(&base)?;
    let (before, _) = rss();
    let report = |step: &str| {
        let (now, peak) = rss();
        let used = now.saturating_sub(before) as f64 / MIB as f64;
        println!(
            "  {step:<40} {used:9.1} MiB resident ({:8.1} MiB per TiB), process peak {:.0} MiB",
            used / tib,
            peak as f64 / MIB as f64
        );
    };
    println!(
        "one image of {gib} GiB in {} (64 KiB chunks):",
        dir.path().display()
    );

    let t = Instant::now();
    let img = Arc::new(DiskImage::create(dir.path(), "m", size)?);
    println!("  create took {:?}", t.elapsed());
    report("untouched, after create");
    img.start_tracking("replica")?;
    report("untouched, one tracker");

    let mut rng = StdRng::seed_from_u64(7);
    let block: Vec<u8> = (0..65536).map(|_| rng.r#gen::<u8>() | 1).collect();
    let chunks = img.chunk_count();
    let t = Instant::now();
    for _ in 0..(GIB / 65536) {
        let c = rng.gen_range(0..chunks);
        img.write_at(&block, c * 65536)?;
    }
    img.flush()?;
    println!("  1 GiB scattered took {:?}", t.elapsed());
    report("after 1 GiB scattered (16,384 chunks)");
    let t = Instant::now();
    let pass = img.hash_all()?;
    println!(
        "  hash_all took {:?} ({} read, {} holes)",
        t.elapsed(),
        pass.read,
        pass.holes
    );
    report("after hashing them");

    // A checkpoint while a writer keeps writing 4 KiB into already-active extents, then
    // the same writer for as long without a checkpoint (what the disk alone costs it).
    let writer_during = |work: &dyn Fn() -> Result<Duration, convoy_store::StoreError>| {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (img, stop) = (Arc::clone(&img), Arc::clone(&stop));
            std::thread::spawn(move || -> (Duration, u64) {
                let mut rng = StdRng::seed_from_u64(8);
                let (mut worst, mut n) = (Duration::ZERO, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.gen_range(0..64u64) * 4096;
                    let t = Instant::now();
                    if img.write_at(&[9u8; 4096], off).is_err() {
                        break;
                    }
                    worst = worst.max(t.elapsed());
                    n += 1;
                }
                (worst, n)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let took = work();
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let (worst, n) = writer.join().unwrap_or_default();
        (took, worst, n)
    };
    let (took, worst, n) = writer_during(&|| {
        let t = Instant::now();
        img.checkpoint()?;
        Ok(t.elapsed())
    });
    let took = took?;
    println!(
        "  checkpoint took {took:?}; a concurrent writer did {n} 4 KiB writes, longest {worst:?}"
    );
    let (_, worst, n) = writer_during(&|| {
        std::thread::sleep(took);
        Ok(took)
    });
    println!("  the same writer without a checkpoint: {n} writes, longest {worst:?}");
    report("after checkpoint");

    let t = Instant::now();
    img.close()?;
    println!("  close took {:?}", t.elapsed());
    drop(img);
    let meta = std::fs::metadata(dir.path().join("disk-m.meta"))?.len();
    println!("  metadata record: {:.1} MiB", meta as f64 / MIB as f64);
    let t = Instant::now();
    match DiskImage::open(dir.path(), "m") {
        Ok(img) => {
            println!("  reopen took {:?}", t.elapsed());
            report("after reopen (clean)");
            let d = img.dirty_chunks("replica")?;
            println!("  tracker holds {} chunks", d.chunks.len());
            let t = Instant::now();
            let root = img.root()?;
            println!(
                "  root after reopen (tree rebuilt from the hash file) took {:?}",
                t.elapsed()
            );
            drop(img);
            // The worst recovery: the activity log is lost, so nothing is trusted.
            std::fs::remove_file(dir.path().join("disk-m.al"))?;
            let t = Instant::now();
            let img = DiskImage::open(dir.path(), "m")?;
            println!(
                "  reopen without an activity log took {:?} ({} chunks distrusted)",
                t.elapsed(),
                img.recovery().untrusted_chunks
            );
            report("after it");
            let t = Instant::now();
            let pass = img.hash_all()?;
            println!(
                "  rehashing everything took {:?} ({} read, {} holes)",
                t.elapsed(),
                pass.read,
                pass.holes
            );
            report("after rehashing everything");
            println!("  root unchanged: {}", img.root()? == root);
        }
        Err(e) => println!("  REOPEN FAILED: {e}"),
    }
    Ok(())
}

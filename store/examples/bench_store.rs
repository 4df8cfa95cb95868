//! Micro-benchmark of the block store. Prints figures, asserts nothing.
//!
//! `cargo run -p convoy-store --example bench_store [-- <MiB>]` (default 512 MiB of
//! sequential data). Runs in the temp dir; compare figures only within one run.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use convoy_store::{DiskImage, hash_chunk};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    let size = mib * MIB;
    let dir = tempfile::tempdir()?;
    let mut rng = StdRng::seed_from_u64(1);
    let block: Vec<u8> = (0..MIB).map(|_| rng.r#gen::<u8>() | 1).collect();
    println!(
        "convoy-store bench: {mib} MiB sequential, dir {}",
        dir.path().display()
    );

    // Sequential 1 MiB writes + one fdatasync, raw file vs DiskImage. Pass 1 writes a fresh
    // sparse file (allocation; DiskImage also appends every extent to its log), pass 2
    // overwrites it (allocated blocks; log warm).
    let raw_path = dir.path().join("raw.img");
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&raw_path)?;
    raw.set_len(size)?;
    let img = DiskImage::create(dir.path(), "seq", size)?;
    img.set_activity_limit(u64::MAX);
    println!("sequential write (1 MiB writes, then fdatasync):");
    for pass in ["fresh file, cold log", "overwrite, warm log"] {
        let t = Instant::now();
        for off in (0..size).step_by(MIB as usize) {
            raw.write_all_at(&block, off)?;
        }
        raw.sync_data()?;
        let r = t.elapsed();
        let t = Instant::now();
        for off in (0..size).step_by(MIB as usize) {
            img.write_at(&block, off)?;
        }
        img.flush()?;
        let d = t.elapsed();
        println!(
            "  {pass:<22} raw {:6.0} MB/s  DiskImage {:6.0} MB/s  ratio {:.2}",
            mbps(size, r),
            mbps(size, d),
            r.as_secs_f64() / d.as_secs_f64()
        );
    }
    drop(img);
    drop(raw);
    let _ = std::fs::remove_file(&raw_path);
    DiskImage::destroy(dir.path(), "seq")?;

    // 4 KiB random writes, log warm (every extent already active), page-cache latency.
    let rsize = 1024 * MIB;
    let img = DiskImage::create(dir.path(), "rand", rsize)?;
    img.set_activity_limit(u64::MAX);
    img.start_tracking("replica")?;
    let page = &block[..4096];
    let mut cold = Vec::new();
    for e in 0..u64::from(img.geometry().extent_count()) {
        let t = Instant::now();
        img.write_at(page, e * 4 * MIB)?;
        cold.push(t.elapsed());
    }
    let raw_path = dir.path().join("raw4k.img");
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&raw_path)?;
    raw.set_len(rsize)?;
    let n = 20_000;
    let offsets: Vec<u64> = (0..n)
        .map(|_| rng.gen_range(0..rsize / 4096) * 4096)
        .collect();
    let mut lat_img = Vec::with_capacity(n);
    let mut lat_raw = Vec::with_capacity(n);
    for &off in &offsets {
        let t = Instant::now();
        raw.write_all_at(page, off)?;
        lat_raw.push(t.elapsed());
        let t = Instant::now();
        img.write_at(page, off)?;
        lat_img.push(t.elapsed());
    }
    for v in [&mut cold, &mut lat_img, &mut lat_raw] {
        v.sort();
    }
    println!("4 KiB random writes ({n}, no flush, 1 GiB image, 1 tracker):");
    println!(
        "  DiskImage, log warm       p50 {:>9.1?}  p99 {:>9.1?}",
        percentile(&lat_img, 0.5),
        percentile(&lat_img, 0.99)
    );
    println!(
        "  raw File::write_at        p50 {:>9.1?}  p99 {:>9.1?}",
        percentile(&lat_raw, 0.5),
        percentile(&lat_raw, 0.99)
    );
    println!(
        "  first write to an extent  p50 {:>9.1?}  p99 {:>9.1?}   (activity-log append + fdatasync)",
        percentile(&cold, 0.5),
        percentile(&cold, 0.99)
    );
    let t = Instant::now();
    img.checkpoint()?;
    println!(
        "  checkpoint after them     {:>9.1?}   (fdatasync of the dirty pages + 512 KiB metadata rewrite)",
        t.elapsed()
    );
    drop(img);
    drop(raw);
    let _ = std::fs::remove_file(&raw_path);
    DiskImage::destroy(dir.path(), "rand")?;

    // Full-image hashing of non-zero data: through the store, and in memory per algorithm.
    let hsize = 256 * MIB;
    let img = DiskImage::create(dir.path(), "hash", hsize)?;
    for off in (0..hsize).step_by(MIB as usize) {
        img.write_at(&block, off)?;
    }
    img.flush()?;
    let t = Instant::now();
    let pass = img.hash_all()?;
    let store_hash = t.elapsed();
    let data = std::fs::read(img.path())?;
    let cs = img.geometry().chunk_size() as usize;
    let t = Instant::now();
    let mut sink = 0u8;
    for c in data.chunks(cs) {
        sink ^= hash_chunk(c)[0];
    }
    let b3 = t.elapsed();
    let t = Instant::now();
    for c in data.chunks(cs) {
        sink ^= xxhash_rust::xxh3::xxh3_128(c) as u8;
    }
    let xx = t.elapsed();
    println!(
        "full-image hash, {} MiB of non-zero data, 64 KiB chunks:",
        hsize / MIB
    );
    println!(
        "  DiskImage::hash_all (blake3, {} chunks read) {:8.0} MB/s",
        pass.read,
        mbps(hsize, store_hash)
    );
    println!(
        "  blake3 in memory                          {:8.0} MB/s",
        mbps(hsize, b3)
    );
    println!(
        "  xxh3-128 in memory                        {:8.0} MB/s",
        mbps(hsize, xx)
    );
    println!("(checksum {sink})");
    Ok(())
}

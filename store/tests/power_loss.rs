//! Power loss (the page cache is lost, unlike SIGKILL), on the simulated disk, at the
//! points where the store's crash safety is decided: each step of a checkpoint, the last
//! activity-log append, a tracker clear, and chunk-hash pages written back between
//! checkpoints. After each: what a flush acknowledged is there, every cached hash
//! describes the content, and every tracker holds every chunk that changed.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::BTreeSet;

use convoy_store::sim::SimBackend;
use convoy_store::{DiskImage, Geometry, HashTree, hash_chunk};

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 1024;

/// 1024 chunks of 4 KiB (8 chunk-hash pages), 4 chunks per extent, fan-out 4.
fn geometry() -> Geometry {
    Geometry::with_params(CHUNKS * CHUNK, CHUNK as u32, 4, 4).unwrap()
}

fn chunk(content: &[u8], c: u64) -> &[u8] {
    &content[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize]
}

/// The invariants after any crash: cached hashes honest, the tree right, and tracker `r`
/// (started on an all-zero image, never cleared) holding every non-zero chunk.
fn check(img: &DiskImage<SimBackend>, sim: &SimBackend, what: &str) {
    let content = sim.image();
    for c in 0..CHUNKS {
        if let Some(h) = img.cached_hash(c) {
            assert_eq!(
                h,
                hash_chunk(chunk(&content, c)),
                "{what}: stale hash of chunk {c}"
            );
        }
    }
    if img.trackers().contains(&"r".to_string()) {
        let dirty: BTreeSet<u64> = img.dirty_chunks("r").unwrap().chunks.into_iter().collect();
        for c in 0..CHUNKS {
            if chunk(&content, c).iter().any(|&b| b != 0) {
                assert!(dirty.contains(&c), "{what}: changed chunk {c} not dirty");
            }
        }
    }
    let fresh: Vec<_> = (0..CHUNKS)
        .map(|c| hash_chunk(chunk(&content, c)))
        .collect();
    assert_eq!(
        img.root().unwrap(),
        HashTree::from_leaves(fresh, 4).root(),
        "{what}: root"
    );
}

/// Writes `byte` into chunks `cs` (whole chunks).
fn write(img: &DiskImage<SimBackend>, cs: impl IntoIterator<Item = u64>, byte: u8) {
    for c in cs {
        img.write_at(&[byte; CHUNK as usize], c * CHUNK).unwrap();
    }
}

#[test]
fn power_loss_at_every_step_of_a_checkpoint_keeps_metadata_honest() {
    let mut step = 0;
    loop {
        let sim = SimBackend::new(CHUNKS * CHUNK, 100 + step);
        // The default cache: every changed hash page is written by the checkpoint itself.
        let img = DiskImage::create_on(sim.clone(), geometry()).unwrap();
        img.start_tracking("r").unwrap();
        write(&img, (0..CHUNKS).step_by(3), 1);
        img.flush().unwrap();
        img.hash_all().unwrap();
        write(&img, (0..CHUNKS).step_by(5), 2); // acknowledged below
        img.flush().unwrap();
        let acked = sim.image();
        img.hash_all().unwrap();
        write(&img, (1..CHUNKS).step_by(7), 3); // not flushed: may be lost
        let before = sim.mutations();
        sim.fail_after(step);
        let finished = img.checkpoint().is_ok() && !sim.is_dead();
        drop(img);
        sim.crash(true);
        let img = DiskImage::open_on(sim.clone()).unwrap();
        let what = format!("power loss at checkpoint step {step}");
        check(&img, &sim, &what);
        let content = sim.image();
        for c in (0..CHUNKS).filter(|c| c % 7 != 1) {
            assert_eq!(
                chunk(&content, c),
                chunk(&acked, c),
                "{what}: acknowledged chunk {c}"
            );
        }
        if finished {
            // The checkpoint completed before its step `step`: every step was covered.
            assert!(sim.mutations() > before);
            break;
        }
        step += 1;
        assert!(step < 10_000, "the checkpoint never completed");
    }
    eprintln!("power loss tried at each of the checkpoint's {step} I/O steps");
    assert!(step >= 5, "a checkpoint has more steps than {step}");
}

#[test]
fn torn_last_append_at_power_loss_is_ignored_and_earlier_extents_distrusted() {
    for seed in 0..32 {
        let sim = SimBackend::new(CHUNKS * CHUNK, seed);
        let img = DiskImage::create_on(sim.clone(), geometry()).unwrap();
        img.start_tracking("r").unwrap();
        write(&img, [0, 9], 1); // extents 0 and 2 appended
        // Die during the next append (a prefix of the frame lands), which is the one
        // that would admit the write to extent 100.
        sim.fail_after(0);
        assert!(img.write_at(&[2; 10], 400 * CHUNK).is_err());
        assert!(sim.is_dead());
        drop(img);
        sim.crash(true);
        let img = DiskImage::open_on(sim.clone()).unwrap();
        // The earlier frames' extents are distrusted; the torn frame's extent too when
        // its bytes happened to land whole (more work, never a missed write).
        let dirty = img.dirty_chunks("r").unwrap().chunks;
        let earlier = vec![0, 1, 2, 3, 8, 9, 10, 11];
        let with_torn = vec![0, 1, 2, 3, 8, 9, 10, 11, 400, 401, 402, 403];
        assert!(
            dirty == earlier || dirty == with_torn,
            "seed {seed}: {dirty:?}"
        );
        check(&img, &sim, &format!("seed {seed}"));
    }
}

#[test]
fn tracker_clears_lost_at_power_loss_come_back_and_checkpointed_ones_stay() {
    let sim = SimBackend::new(CHUNKS * CHUNK, 7);
    let img = DiskImage::create_on(sim.clone(), geometry()).unwrap();
    img.start_tracking("r").unwrap();
    write(&img, [0, 100, 200], 1);
    img.flush().unwrap();
    let d = img.dirty_chunks("r").unwrap();
    img.clear("r", &[0, 100], d.as_of).unwrap();
    img.checkpoint().unwrap(); // these clears are durable
    let d = img.dirty_chunks("r").unwrap();
    assert_eq!(d.chunks, vec![200]);
    img.clear("r", &[200], d.as_of).unwrap(); // this one is not, yet
    drop(img);
    sim.crash(true);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    let dirty = img.dirty_chunks("r").unwrap().chunks;
    assert!(
        dirty.contains(&200),
        "a clear lost at power loss must come back"
    );
    assert!(
        !dirty.contains(&0) && !dirty.contains(&100),
        "checkpointed clears stay"
    );
}

/// Chunk-hash pages reach the file between checkpoints whenever a small cache fills with
/// changed pages; the durable metadata may then be older than the file's pages.
#[test]
fn hash_pages_written_back_before_a_checkpoint_are_not_trusted_after_power_loss() {
    for seed in 0..16 {
        let sim = SimBackend::new(CHUNKS * CHUNK, 200 + seed);
        let img = DiskImage::create_on(sim.clone(), geometry()).unwrap();
        img.set_hash_cache_pages(4);
        img.start_tracking("r").unwrap();
        write(&img, 0..CHUNKS, 1);
        img.hash_all().unwrap();
        img.checkpoint().unwrap(); // every hash recorded
        // Rewrite and rehash: the new hashes' pages are written back (the cache holds
        // 4 of 8 pages) before any checkpoint; no flush, so the data may be lost.
        write(&img, (0..CHUNKS).step_by(2), 2);
        img.hash_all().unwrap();
        drop(img);
        sim.crash(true);
        let img = DiskImage::open_on(sim.clone()).unwrap();
        check(&img, &sim, &format!("seed {seed}"));
    }
}

/// Before fail-stop, the append handle outlived a torn append, so later frames landed
/// behind the torn one, and recovery, stopping at the first bad frame, never saw the
/// extents they named: their writes kept the hashes and clean tracker bits of the last
/// checkpoint. Such a log now makes recovery distrust the whole image.
#[test]
fn regression_valid_frames_behind_a_torn_one_make_recovery_distrust_the_whole_image() {
    let sim = SimBackend::new(CHUNKS * CHUNK, 9);
    let img = DiskImage::create_on(sim.clone(), geometry()).unwrap();
    img.start_tracking("r").unwrap(); // checkpoints: the log is a header only
    img.hash_all().unwrap();
    let header = sim.log_bytes().unwrap();
    write(&img, [28], 1); // extent 7
    let with7 = sim.log_bytes().unwrap();
    write(&img, [200], 2); // extent 50
    let with50 = sim.log_bytes().unwrap();
    img.flush().unwrap();
    drop(img);
    // The log as the old code could leave it: the frame for extent 7 torn, the frame for
    // extent 50 appended behind it.
    let frame7 = &with7[header.len()..];
    let frame50 = &with50[with7.len()..];
    let mut log = header.clone();
    log.extend_from_slice(&frame7[..frame7.len() / 2]);
    log.extend_from_slice(frame50);
    sim.set_log_bytes(Some(log));
    sim.crash(false);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    assert_eq!(img.recovery().untrusted_chunks, CHUNKS);
    let dirty = img.dirty_chunks("r").unwrap().chunks;
    assert!(
        dirty.contains(&200),
        "the write behind the torn frame must be dirty"
    );
    assert_eq!(img.cached_hash(200), None);
    check(&img, &sim, "valid frames behind a torn one");
}

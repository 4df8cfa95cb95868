//! Fail-stop on I/O errors, on the simulated disk: a failed fsync, metadata write or
//! activity-log append fails the image for good; a full file system fails only the calls
//! that need space, and the image serves again once space is freed.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use convoy_store::sim::{Fault, SimBackend};
use convoy_store::{DiskImage, Geometry, StoreError, hash_chunk};

const CHUNK: u64 = 4096;

/// 64 chunks of 4 KiB, 4 chunks per extent.
fn image(seed: u64) -> (SimBackend, DiskImage<SimBackend>) {
    let g = Geometry::with_params(64 * CHUNK, CHUNK as u32, 4, 4).unwrap();
    let sim = SimBackend::new(g.size(), seed);
    let img = DiskImage::create_on(sim.clone(), g).unwrap();
    img.start_tracking("r").unwrap();
    (sim, img)
}

fn is_failed<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Failed { .. }))
}

/// Every hash the image claims describes the content.
fn assert_hashes_honest(img: &DiskImage<SimBackend>, sim: &SimBackend) {
    let content = sim.image();
    for c in 0..img.chunk_count() {
        if let Some(h) = img.cached_hash(c) {
            let s = (c * CHUNK) as usize;
            assert_eq!(
                h,
                hash_chunk(&content[s..s + CHUNK as usize]),
                "stale hash of chunk {c}"
            );
        }
    }
}

#[test]
fn failed_fdatasync_fails_the_image_and_refuses_writes_flushes_and_checkpoints() {
    let (sim, img) = image(1);
    img.write_at(&[1; 100], 0).unwrap();
    sim.inject(Fault::DataSyncFails);
    let e = img.flush().unwrap_err();
    assert!(matches!(e, StoreError::Failed { .. }), "{e}");
    let why = img.failure().expect("the image is failed");
    assert!(why.contains("fdatasync"), "{why}");
    // Sticky: the disk would now report success, but the lost pages are gone.
    assert!(is_failed(img.write_at(&[2; 100], 0)));
    assert!(is_failed(img.write_zeroes(0, 10)));
    assert!(is_failed(img.flush()));
    assert!(is_failed(img.checkpoint()));
    assert!(is_failed(img.start_tracking("s")));
    assert!(is_failed(img.close()));
    // The first error is kept.
    assert_eq!(img.failure().unwrap(), why);
    // Reads still work.
    let mut b = [0u8; 100];
    img.read_at(&mut b, 0).unwrap();
    drop(img);

    // Reopening recovers as after a crash: the lost write's chunk is dirty, its hash
    // unknown, and the image usable again.
    sim.crash(true);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    assert!(!img.recovery().clean);
    assert!(img.failure().is_none());
    assert!(img.dirty_chunks("r").unwrap().chunks.contains(&0));
    assert_hashes_honest(&img, &sim);
    img.write_at(&[3; 10], 0).unwrap();
    img.flush().unwrap();
}

/// Without fail-stop, a checkpoint after a failed fdatasync would succeed (the disk syncs
/// fine the second time, but the pages of the failed write-back are never written) and
/// record the hash of data that a power loss then takes away.
#[test]
fn regression_checkpoint_after_failed_fdatasync_never_records_hashes_of_lost_data() {
    let (sim, img) = image(2);
    img.checkpoint().unwrap();
    img.write_at(&[7; CHUNK as usize], 5 * CHUNK).unwrap();
    let h = img.chunk_hash(5).unwrap();
    assert_eq!(h, hash_chunk(&[7; CHUNK as usize]));
    sim.inject(Fault::DataSyncFails);
    assert!(is_failed(img.checkpoint()));
    assert!(is_failed(img.checkpoint()), "a retry must not succeed");
    drop(img);
    sim.crash(true);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    let mut b = vec![0u8; CHUNK as usize];
    img.read_at(&mut b, 5 * CHUNK).unwrap();
    assert_eq!(
        b,
        vec![0; CHUNK as usize],
        "the write was lost with its pages"
    );
    assert_hashes_honest(&img, &sim);
    assert!(img.dirty_chunks("r").unwrap().chunks.contains(&5));
}

#[test]
fn failed_sync_of_the_chunk_hashes_fails_the_image() {
    let (sim, img) = image(3);
    img.write_at(&[9; 10], 0).unwrap();
    img.chunk_hash(0).unwrap();
    sim.inject(Fault::HashSyncFails);
    let e = img.checkpoint().unwrap_err();
    assert!(matches!(e, StoreError::Failed { .. }), "{e}");
    assert!(img.failure().unwrap().contains("chunk hashes"));
    assert!(is_failed(img.write_at(&[1], 0)));
    drop(img);
    sim.crash(true);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    assert_hashes_honest(&img, &sim);
}

#[test]
fn failed_metadata_write_fails_the_image_but_a_full_file_system_does_not() {
    let (sim, img) = image(4);
    img.write_at(&[1; 10], 0).unwrap();
    // ENOSPC: the old record stays, the checkpoint fails, the image does not.
    sim.set_full(true);
    let e = img.checkpoint().unwrap_err();
    assert!(e.is_no_space(), "{e}");
    assert!(img.failure().is_none());
    sim.set_full(false);
    img.checkpoint().unwrap();
    // EIO: the record may be half written; the image fails.
    img.write_at(&[2; 10], 0).unwrap();
    sim.inject(Fault::MetaFails);
    assert!(is_failed(img.checkpoint()));
    assert!(img.failure().unwrap().contains("metadata"));
    drop(img);
    sim.crash(false);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    assert_hashes_honest(&img, &sim);
    assert!(img.dirty_chunks("r").unwrap().chunks.contains(&0));
}

#[test]
fn torn_activity_log_append_fails_the_image_and_nothing_is_appended_behind_it() {
    let (sim, img) = image(5);
    img.write_at(&[1; 10], 0).unwrap(); // extent 0 active
    sim.inject(Fault::TornAppend);
    // A write to a fresh extent needs an append: it tears, the write is refused before its
    // data is issued.
    assert!(is_failed(img.write_at(&[2; 10], 8 * CHUNK)));
    assert!(img.failure().unwrap().contains("activity log"));
    let log = sim.log_bytes();
    // Nothing more reaches the log: a later frame would sit behind the torn one.
    assert!(is_failed(img.write_at(&[3; 10], 16 * CHUNK)));
    assert!(is_failed(img.write_at(&[3; 10], 0)));
    assert_eq!(sim.log_bytes(), log);
    let mut b = [0u8; 10];
    img.read_at(&mut b, 8 * CHUNK).unwrap();
    assert_eq!(b, [0; 10], "the refused write was not issued");
    drop(img);
    // Power loss: the torn frame is the tail, ignored; the extent named before it is
    // distrusted; the refused writes were never issued, so nothing is missed.
    sim.crash(true);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    assert!(!img.recovery().clean);
    let dirty = img.dirty_chunks("r").unwrap().chunks;
    assert_eq!(dirty, vec![0, 1, 2, 3]);
    assert_hashes_honest(&img, &sim);
}

#[test]
fn enospc_on_a_data_write_is_not_sticky_and_its_chunks_stay_dirty() {
    let (sim, img) = image(6);
    img.write_at(&[1; 10], 0).unwrap();
    img.flush().unwrap();
    let d = img.dirty_chunks("r").unwrap();
    img.clear("r", &d.chunks, d.as_of).unwrap();
    img.hash_all().unwrap();
    sim.set_full(true);
    let e = img.write_at(&[2; 3 * CHUNK as usize], 100).unwrap_err();
    assert!(e.is_no_space(), "{e}");
    assert!(img.failure().is_none(), "ENOSPC must not fail the image");
    // The chunks it touched (it may have landed in part): dirty, hashes unknown.
    assert_eq!(img.dirty_chunks("r").unwrap().chunks, vec![0, 1, 2, 3]);
    for c in 0..4 {
        assert_eq!(img.cached_hash(c), None);
    }
    // Flushing what was written works while full.
    img.flush().unwrap();
    sim.set_full(false);
    img.write_at(&[3; 3 * CHUNK as usize], 100).unwrap();
    img.flush().unwrap();
    drop(img);
    sim.crash(true);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    let mut b = vec![0u8; 3 * CHUNK as usize];
    img.read_at(&mut b, 100).unwrap();
    assert_eq!(b, vec![3; 3 * CHUNK as usize]);
    assert_hashes_honest(&img, &sim);
}

#[test]
fn activity_log_appends_use_reserved_space_when_the_file_system_is_full() {
    // 1024 extents of one chunk: enough fresh extents to use up the log's reserve.
    let g = Geometry::with_params(1024 * CHUNK, CHUNK as u32, 1, 4).unwrap();
    let sim = SimBackend::new(g.size(), 7);
    let img = DiskImage::create_on(sim.clone(), g).unwrap();
    img.start_tracking("r").unwrap(); // checkpoints: the new log has space reserved
    sim.set_full(true);
    let mut appended = 0;
    let mut refused_cleanly = false;
    for c in 0..1024u64 {
        let log = sim.log_bytes();
        let active = img.active_extents();
        let e = img.write_at(&[1; 10], c * CHUNK).unwrap_err();
        assert!(e.is_no_space(), "{e}");
        assert!(
            img.failure().is_none(),
            "a full file system must not fail the image"
        );
        if img.active_extents() > active {
            // The append fit in the reserve; the data write then failed, cleanly.
            appended += 1;
        } else {
            // Past the reserve: refused before anything reached the log.
            assert_eq!(sim.log_bytes(), log, "a refused append left bytes behind");
            refused_cleanly = true;
            break;
        }
    }
    assert!(appended > 0, "appends did not use the reserved space");
    assert!(refused_cleanly, "the reserve never ran out");
    sim.set_full(false);
    img.write_at(&[5; 10], 1000 * CHUNK).unwrap();
    img.flush().unwrap();
    drop(img);
    sim.crash(true);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    let dirty = img.dirty_chunks("r").unwrap().chunks;
    assert!(dirty.contains(&0) && dirty.contains(&1000), "{dirty:?}");
    assert_hashes_honest(&img, &sim);
}

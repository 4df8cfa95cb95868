//! Disks of real size: a 16 TiB image (the model's largest) creates, writes, closes,
//! reopens and recovers from power loss; a checkpoint of it never holds writes back while
//! it does its I/O; and walking its data skips the holes.
//!
//! A 16 TiB file needs a file system that holds one: ext4 with 4 KiB blocks stops 4 KiB
//! short, so the real-file test runs on a tmpfs (sparse files cost it nothing).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use convoy_store::sim::{Gate, SimBackend};
use convoy_store::{DiskImage, Geometry};

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;
const SIZE: u64 = 16 * TIB;

fn pattern(n: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ n | 1).collect()
}

#[test]
fn a_16_tib_disk_creates_writes_closes_and_reopens() {
    let fs = support::Tmpfs::mount("64m");
    let started = Instant::now();
    let img = DiskImage::create(fs.path(), "big", SIZE).unwrap();
    img.start_tracking("r").unwrap();
    let spots = [0, 8 * TIB + 12_345, SIZE - MIB];
    for (i, &at) in spots.iter().enumerate() {
        img.write_at(&pattern(i as u8, MIB as usize), at).unwrap();
    }
    img.flush().unwrap();
    let root = img.root().unwrap();
    img.close().unwrap();
    drop(img);

    let img = DiskImage::open(fs.path(), "big").unwrap();
    assert!(img.recovery().clean);
    assert_eq!(img.size(), SIZE);
    let mut b = vec![0u8; MIB as usize];
    for (i, &at) in spots.iter().enumerate() {
        img.read_at(&mut b, at).unwrap();
        assert!(b == pattern(i as u8, MIB as usize), "spot {i}");
    }
    let dirty = img.dirty_chunks("r").unwrap().chunks;
    assert_eq!(dirty.len(), 16 + 17 + 16, "{dirty:?}");
    // The tree is rebuilt from the chunk-hash file, skipping its holes.
    assert_eq!(img.root().unwrap(), root);
    // The data walk lists the three written regions, not 268 million chunks.
    let ranges: Vec<_> = img.data_chunks(0).map(Result::unwrap).collect();
    let listed: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    assert!(listed <= 16 + 17 + 16 + 6, "{ranges:?}");
    for c in &dirty {
        assert!(ranges.iter().any(|r| r.contains(c)), "chunk {c} not listed");
    }
    // Metadata stays small.
    let meta = std::fs::metadata(fs.path().join("disk-big.meta"))
        .unwrap()
        .len();
    assert!(meta < 64 << 10, "metadata of {meta} bytes");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_16_tib_image_recovers_from_power_loss() {
    let g = Geometry::new(SIZE).unwrap();
    let sim = SimBackend::new(SIZE, 11);
    let img = DiskImage::create_on(sim.clone(), g).unwrap();
    img.start_tracking("r").unwrap();
    img.write_at(&pattern(1, 70_000), 3 * TIB).unwrap();
    img.flush().unwrap();
    let root = img.root().unwrap();
    img.checkpoint().unwrap();
    // Written after the checkpoint, not flushed: may or may not survive.
    img.write_at(&pattern(2, 4096), 15 * TIB).unwrap();
    img.write_zeroes(3 * TIB, 4096).unwrap();
    drop(img);
    sim.crash(true);
    let img = DiskImage::open_on(sim.clone()).unwrap();
    assert!(!img.recovery().clean);
    // Exactly the two active extents (64 chunks each) are distrusted.
    assert_eq!(img.recovery().untrusted_chunks, 128);
    let dirty = img.dirty_chunks("r").unwrap().chunks;
    let c = |off: u64| off / 65536;
    assert!(dirty.contains(&c(3 * TIB)) && dirty.contains(&c(15 * TIB)));
    // Put the content back as it was at `root`: the same root, whatever survived.
    img.write_zeroes(15 * TIB, 4096).unwrap();
    img.write_at(&pattern(1, 4096), 3 * TIB).unwrap();
    assert_eq!(img.root().unwrap(), root);
    // The simulated disk holds only what was written.
    assert!(
        sim.stored_bytes() < 16 * MIB,
        "{} bytes",
        sim.stored_bytes()
    );
}

/// A checkpoint holds writers back only while it copies pointers to the bitmaps; its
/// write-back, syncs and metadata write happen while writes go on.
#[test]
fn writes_proceed_while_a_checkpoint_of_a_16_tib_image_does_its_io() {
    let g = Geometry::new(SIZE).unwrap();
    let sim = SimBackend::new(SIZE, 12);
    let img = Arc::new(DiskImage::create_on(sim.clone(), g).unwrap());
    img.set_activity_limit(u64::MAX);
    img.start_tracking("a").unwrap();
    img.start_tracking("b").unwrap();
    // Dirty bits and unknown hashes scattered over the whole disk (one every 2 GiB).
    for i in 0..8192u64 {
        img.write_at(&[1; 512], i * (2 << 30) + (i % 7) * 65536)
            .unwrap();
    }
    for gate in [Gate::Syncs, Gate::Meta] {
        sim.pause(gate);
        let ck = {
            let img = Arc::clone(&img);
            thread::spawn(move || img.checkpoint())
        };
        assert!(
            sim.wait_held(1, Duration::from_secs(30)),
            "checkpoint never reached {gate:?}"
        );
        // The checkpoint is held in its I/O: writers (to active and to fresh extents)
        // and readers go on.
        let (tx, rx) = mpsc::channel();
        let writer = {
            let img = Arc::clone(&img);
            thread::spawn(move || {
                for i in 0..200u64 {
                    img.write_at(&[2; 4096], i * 37 * (1 << 30)).unwrap();
                    let mut b = [0u8; 16];
                    img.read_at(&mut b, i * 4096).unwrap();
                }
                tx.send(()).unwrap();
            })
        };
        let done = rx.recv_timeout(Duration::from_secs(30));
        assert!(!ck.is_finished(), "the checkpoint was not held at {gate:?}");
        sim.resume();
        assert!(
            done.is_ok(),
            "writes waited for the checkpoint's I/O at {gate:?}"
        );
        writer.join().unwrap();
        ck.join().unwrap().unwrap();
    }
    let dirty = img.dirty_chunks("a").unwrap();
    assert!(dirty.chunks.len() >= 8192);
}

#[test]
fn data_chunks_skip_holes_of_a_sparse_image() {
    let g = Geometry::new(SIZE).unwrap();
    let sim = SimBackend::new(SIZE, 13);
    let img = DiskImage::create_on(sim.clone(), g).unwrap();
    assert_eq!(img.data_chunks(0).count(), 0, "a fresh image has no data");
    img.write_at(&[1; 100], 65536 + 10).unwrap(); // chunk 1
    img.write_at(&[1; 200_000], 5 * TIB).unwrap(); // chunks 5 TiB / 64 KiB + 0..=3
    img.write_at(&[1; 10], SIZE - 10).unwrap(); // the last chunk
    let ranges: Vec<_> = img.data_chunks(0).map(Result::unwrap).collect();
    let c5 = 5 * TIB / 65536;
    let last = img.chunk_count() - 1;
    let listed: Vec<u64> = ranges.iter().flat_map(|r| r.clone()).collect();
    assert_eq!(listed, vec![1, c5, c5 + 1, c5 + 2, c5 + 3, last]);
    // What a first sync sends: those six whole chunks.
    assert_eq!(img.data_bytes().unwrap(), 6 * 65536);
    // From the middle on.
    let from: Vec<_> = img.data_chunks(c5 + 2).map(Result::unwrap).collect();
    let listed: Vec<u64> = from.iter().flat_map(|r| r.clone()).collect();
    assert_eq!(listed, vec![c5 + 2, c5 + 3, last]);
}

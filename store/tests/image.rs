//! DiskImage on real files: sparseness, hash trees between copies, concurrency, snapshots,
//! clean close and reopen.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::thread;

use convoy_store::{
    ChunkHash, DiskImage, Geometry, HashTree, StoreError, ZERO_CHUNK_HASH, diff_leaves, hash_chunk,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn disk_blocks_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Hashes every chunk straight from the file, bypassing the store.
fn fresh_hashes(img: &DiskImage) -> Vec<ChunkHash> {
    let data = std::fs::read(img.path()).unwrap();
    let cs = img.geometry().chunk_size() as usize;
    data.chunks(cs).map(hash_chunk).collect()
}

fn assert_cached_hashes_match_content(img: &DiskImage) {
    let fresh = fresh_hashes(img);
    for (c, h) in fresh.iter().enumerate() {
        if let Some(cached) = img.cached_hash(c as u64) {
            assert_eq!(&cached, h, "stale cached hash for chunk {c}");
        }
    }
}

fn random_chunk(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.r#gen::<u8>() | 1).collect()
}

#[test]
fn one_gib_image_is_sparse_after_create() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "big", 1 << 30).unwrap();
    let used = disk_blocks_bytes(img.path());
    assert!(used <= 64 * 1024, "fresh 1 GiB image uses {used} bytes");
    assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 1 << 30);
    // A fresh image hashes without reading: every chunk is known zero.
    assert_eq!(img.hash_all().unwrap().read, 0);
    img.write_at(&[7; 4096], 512 * MIB).unwrap();
    img.flush().unwrap();
    assert!(disk_blocks_bytes(img.path()) <= 128 * 1024);
    // Zeroing punches the hole again.
    img.write_zeroes(512 * MIB, 4096).unwrap();
    img.flush().unwrap();
    assert!(disk_blocks_bytes(img.path()) <= 64 * 1024);
    let pass = img.hash_all().unwrap();
    assert_eq!(pass.read, 0, "holes are hashed without reading: {pass:?}");
    assert_eq!(img.chunk_hash(512 * MIB / 65536).unwrap(), ZERO_CHUNK_HASH);
}

#[test]
fn unaligned_writes_round_trip_and_invalidate_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "u", 3 * MIB + 1000).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let mut model = vec![0u8; img.size() as usize];
    for _ in 0..200 {
        let len = rng.gen_range(1..70_000usize);
        let off = rng.gen_range(0..img.size() - len as u64);
        let data = random_chunk(&mut rng, len);
        img.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if rng.gen_bool(0.3) {
            let c = rng.gen_range(0..img.chunk_count());
            img.chunk_hash(c).unwrap();
        }
    }
    let mut back = vec![0u8; model.len()];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == model);
    assert_cached_hashes_match_content(&img);
    assert!(matches!(
        img.write_at(&[1], img.size()),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.chunk_hash(img.chunk_count()),
        Err(StoreError::OutOfRange { .. })
    ));
}

#[test]
fn images_differing_in_k_chunks_diff_to_exactly_those() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let a = DiskImage::create(dir.path(), "a", 64 * MIB).unwrap();
    let n = a.chunk_count();
    // Common content in some chunks, so equal regions are not just holes.
    for _ in 0..100 {
        let c = rng.gen_range(0..n);
        a.write_at(&random_chunk(&mut rng, 65536), c * 65536)
            .unwrap();
    }
    let b = a.snapshot_to(dir.path(), "b").unwrap();
    assert_eq!(
        a.root().unwrap(),
        b.root().unwrap(),
        "equal images, equal roots"
    );
    assert!(diff_leaves(&a.tree().unwrap(), &b.tree().unwrap()).is_empty());

    for k in [1usize, 7, 40] {
        let c2 = b.snapshot_to(dir.path(), &format!("c{k}")).unwrap();
        let mut changed = BTreeSet::new();
        while changed.len() < k {
            changed.insert(rng.gen_range(0..n));
        }
        for &c in &changed {
            // Unaligned, partial-chunk change: still one differing chunk.
            c2.write_at(&random_chunk(&mut rng, 700), c * 65536 + 513)
                .unwrap();
        }
        let (ta, tc) = (a.tree().unwrap(), c2.tree().unwrap());
        assert_ne!(ta.root(), tc.root());
        assert_eq!(
            diff_leaves(&ta, &tc),
            changed.iter().copied().collect::<Vec<_>>()
        );
        // The same walk through the wire-facing API: remote levels fetched by range.
        assert_eq!(
            walk_via_tree_level(&ta, &c2),
            changed.iter().copied().collect::<Vec<_>>()
        );
    }
}

/// Compare-delta as the exchange would run it: `remote` answers `tree_level` requests.
fn walk_via_tree_level(local: &HashTree, remote: &DiskImage) -> Vec<u64> {
    let top = remote.tree_height() - 1;
    assert_eq!(local.height(), remote.tree_height());
    let mut frontier = local.differing_nodes(top, 0, &remote.tree_level(top, 0..1).unwrap());
    for level in (0..top).rev() {
        let mut next = Vec::new();
        for p in frontier {
            let kids = local.children(level + 1, p);
            let theirs = remote.tree_level(level, kids.clone()).unwrap();
            next.extend(local.differing_nodes(level, kids.start, &theirs));
        }
        frontier = next;
    }
    frontier.into_iter().map(|i| i as u64).collect()
}

#[test]
fn concurrent_writers_hashers_and_checkpoints_never_leave_a_stale_hash() {
    let dir = tempfile::tempdir().unwrap();
    let geo = Geometry::with_params(8 * MIB, 16 * 1024, 8, 16).unwrap();
    let img = Arc::new(DiskImage::create_with_geometry(dir.path(), "c", geo).unwrap());
    img.start_tracking("replica").unwrap();
    img.set_activity_limit(3);
    let mut handles = Vec::new();
    for t in 0..2u64 {
        let img = img.clone();
        handles.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(10 + t);
            for i in 0..400 {
                let len = rng.gen_range(1..40_000usize);
                let off = rng.gen_range(0..img.size() - len as u64);
                img.write_at(&random_chunk(&mut rng, len), off).unwrap();
                if i % 25 == 0 {
                    img.flush().unwrap();
                }
            }
        }));
    }
    {
        let img = img.clone();
        handles.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(20);
            for i in 0..600 {
                img.chunk_hash(rng.gen_range(0..img.chunk_count())).unwrap();
                if i % 100 == 0 {
                    img.hash_all().unwrap();
                    img.checkpoint().unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_cached_hashes_match_content(&img);
    // Everything non-zero was written after the tracker started.
    let dirty: BTreeSet<u64> = img
        .dirty_chunks("replica")
        .unwrap()
        .chunks
        .into_iter()
        .collect();
    for (c, h) in fresh_hashes(&img).iter().enumerate() {
        if *h != ZERO_CHUNK_HASH {
            assert!(
                dirty.contains(&(c as u64)),
                "chunk {c} written but not dirty"
            );
        }
    }
    let fresh = HashTree::from_leaves(fresh_hashes(&img), geo.fanout());
    assert_eq!(img.root().unwrap(), fresh.root());
}

#[test]
fn clean_close_reopens_trusted_with_trackers_and_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "x", 16 * MIB).unwrap();
    img.start_tracking("r1").unwrap();
    img.write_at(&[3; 100_000], 5 * MIB + 17).unwrap();
    let d = img.dirty_chunks("r1").unwrap();
    assert_eq!(d.chunks, vec![80, 81]);
    img.start_tracking("r2").unwrap();
    img.write_at(&[4; 10], 0).unwrap();
    img.clear("r1", &[80], d.as_of).unwrap();
    let root = img.root().unwrap();
    img.close().unwrap();
    assert!(matches!(img.write_at(&[1], 0), Err(StoreError::Closed)));
    drop(img);

    let img = DiskImage::open(dir.path(), "x").unwrap();
    assert!(img.recovery().clean);
    assert_eq!(img.dirty_chunks("r1").unwrap().chunks, vec![0, 81]);
    assert_eq!(img.dirty_chunks("r2").unwrap().chunks, vec![0]);
    assert_eq!(
        img.hash_all().unwrap().read,
        0,
        "hashes survived the clean close"
    );
    assert_eq!(img.root().unwrap(), root);
    img.drop_tracking("r2").unwrap();
    drop(img); // not closed: the next open recovers (nothing was written, so nothing to distrust)

    let img = DiskImage::open(dir.path(), "x").unwrap();
    assert!(!img.recovery().clean);
    assert_eq!(img.recovery().untrusted_chunks, 0);
    assert_eq!(img.trackers(), vec!["r1".to_string()]);
    assert!(matches!(
        DiskImage::create(dir.path(), "x", MIB),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        DiskImage::open(dir.path(), "nope"),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn missing_or_garbled_metadata_is_refused_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "m", MIB).unwrap();
    img.close().unwrap();
    drop(img);
    let meta = dir.path().join("disk-m.meta");
    std::fs::write(&meta, b"\x01garbage").unwrap();
    assert!(matches!(
        DiskImage::open(dir.path(), "m"),
        Err(StoreError::Corrupt { .. })
    ));
    std::fs::remove_file(&meta).unwrap();
    assert!(matches!(
        DiskImage::open(dir.path(), "m"),
        Err(StoreError::Corrupt { .. })
    ));
    DiskImage::destroy(dir.path(), "m").unwrap();
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn lost_activity_log_distrusts_everything() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "l", 4 * MIB).unwrap();
    img.start_tracking("r").unwrap();
    img.close().unwrap();
    drop(img);
    std::fs::remove_file(dir.path().join("disk-l.al")).unwrap();
    let img = DiskImage::open(dir.path(), "l").unwrap();
    assert_eq!(img.recovery().untrusted_chunks, img.chunk_count());
    assert_eq!(
        img.dirty_chunks("r").unwrap().chunks.len() as u64,
        img.chunk_count()
    );
}

#[test]
fn snapshot_copy_is_sparse_and_identical() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "s", 256 * MIB).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    for i in 0..8 {
        img.write_at(&random_chunk(&mut rng, 65536), i * 32 * MIB)
            .unwrap();
    }
    // A written-but-zero chunk must not allocate in the copy either.
    img.write_at(&[0; 65536], 100 * MIB).unwrap();
    let snap = img.snapshot_to(dir.path(), "s-snap").unwrap();
    assert!(disk_blocks_bytes(snap.path()) <= 8 * 65536 + 64 * 1024);
    assert_eq!(
        snap.hash_all().unwrap().read,
        0,
        "snapshot records its hashes"
    );
    assert_eq!(snap.root().unwrap(), img.root().unwrap());
    assert_eq!(
        std::fs::read(snap.path()).unwrap(),
        std::fs::read(img.path()).unwrap()
    );
    assert!(matches!(
        img.snapshot_to(dir.path(), "s-snap"),
        Err(StoreError::AlreadyExists { .. })
    ));
}

/// A live snapshot holds the image as it was when it began, although writes went on
/// (before and after the copier reached their chunks, into holes, and zeroing).
#[test]
fn live_snapshot_is_the_image_at_its_start_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "l", 8 * MIB).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    // Chunks 0..64 hold data, 64..128 are holes.
    for c in 0..64u64 {
        img.write_at(&random_chunk(&mut rng, 65536), c * 65536)
            .unwrap();
    }
    let before = std::fs::read(img.path()).unwrap();
    img.live_snapshot_begin(dir.path(), "l-snap").unwrap();
    assert!(
        img.live_snapshot_begin(dir.path(), "l-other").is_err(),
        "one live snapshot at a time"
    );
    assert!(!img.live_snapshot_step(10).unwrap());
    assert!(img.live_snapshot_finish().is_err(), "not complete yet");
    img.write_at(&[1; 4096], 3 * 65536 + 4096).unwrap(); // already copied
    img.write_at(&[2; 8192], 50 * 65536 - 4096).unwrap(); // spans chunks 49 and 50
    img.write_at(&[3; 4096], 100 * 65536).unwrap(); // into a hole
    img.write_zeroes(20 * 65536, 65536).unwrap();
    while !img.live_snapshot_step(7).unwrap() {}
    img.write_at(&[4; 4096], 60 * 65536).unwrap(); // after the copy, before finish
    let snap = img.live_snapshot_finish().unwrap();
    assert!(
        std::fs::read(snap.path()).unwrap() == before,
        "the snapshot must be the image as it was when it began"
    );
    assert_eq!(
        snap.hash_all().unwrap().read,
        0,
        "snapshot records its hashes"
    );
    assert_eq!(
        fresh_hashes(&snap),
        (0..128)
            .map(|c| snap.chunk_hash(c).unwrap())
            .collect::<Vec<_>>()
    );
    // The live image has every write.
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 100 * 65536).unwrap();
    assert_eq!(b, [3; 4096]);
    assert!(
        img.live_snapshot_step(1).is_err(),
        "nothing running any more"
    );

    // Aborting removes the copy's files.
    img.live_snapshot_begin(dir.path(), "l-gone").unwrap();
    assert!(dir.path().join("disk-l-gone.img").exists());
    img.live_snapshot_abort();
    assert!(!dir.path().join("disk-l-gone.img").exists());
}

/// Same with a writer thread hammering the image while the copier runs.
#[test]
fn live_snapshot_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = Arc::new(DiskImage::create(dir.path(), "c", 16 * MIB).unwrap());
    let mut rng = StdRng::seed_from_u64(12);
    for c in 0..200u64 {
        img.write_at(&random_chunk(&mut rng, 65536), c * 65536)
            .unwrap();
    }
    let before = std::fs::read(img.path()).unwrap();
    img.live_snapshot_begin(dir.path(), "c-snap").unwrap();
    let writer = {
        let img = Arc::clone(&img);
        thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(13);
            for k in 0..3000u64 {
                let block = rng.gen_range(0..(16 * MIB / 4096));
                img.write_at(&[(k % 250) as u8 + 1; 4096], block * 4096)
                    .unwrap();
            }
        })
    };
    while !img.live_snapshot_step(3).unwrap() {}
    writer.join().unwrap();
    let snap = img.live_snapshot_finish().unwrap();
    assert!(std::fs::read(snap.path()).unwrap() == before);
}

#[test]
fn async_wrappers_run_on_the_blocking_pool() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = Arc::new(DiskImage::create(dir.path(), "a", MIB).unwrap());
    rt.block_on(async {
        img.clone()
            .write_async(1000, bytes::Bytes::from_static(b"hello"))
            .await
            .unwrap();
        img.clone().flush_async().await.unwrap();
        let got = img.clone().read_async(1000, 5).await.unwrap();
        assert_eq!(&got[..], b"hello");
        let h = img.clone().chunk_hash_async(0).await.unwrap();
        assert_ne!(h, ZERO_CHUNK_HASH);
    });
}

/// A resync's second pass sends only what became dirty while the first pass ran.
#[test]
fn dirty_since_lists_only_chunks_written_during_the_first_pass() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "d", 16 * MIB).unwrap();
    img.start_tracking("r").unwrap();
    img.write_at(&[1; 10 * 65536], 0).unwrap();
    let pass1 = img.dirty_chunks("r").unwrap();
    assert_eq!(pass1.chunks, (0..10).collect::<Vec<_>>());
    // While pass 1 reads and sends those, the guest writes on.
    img.write_at(&[2; 100], 3 * 65536 + 7).unwrap();
    img.write_at(&[3; 100], 40 * 65536).unwrap();
    img.write_zeroes(50 * 65536, 65536).unwrap();
    assert_eq!(img.dirty_since("r", pass1.as_of).unwrap(), vec![3, 40, 50]);
    // Pass 1 acknowledged: clearing it leaves exactly pass 2's chunks.
    assert_eq!(img.clear("r", &pass1.chunks, pass1.as_of).unwrap(), 9);
    assert_eq!(img.dirty_chunks("r").unwrap().chunks, vec![3, 40, 50]);
    assert_eq!(img.dirty_count("r").unwrap(), 3);
    let pass2 = img.dirty_chunks("r").unwrap();
    assert!(img.dirty_since("r", pass2.as_of).unwrap().is_empty());
    // In pieces, for sets too large to list at once.
    let piece = img.dirty_chunks_from("r", 4, 1).unwrap();
    assert_eq!(piece.chunks, vec![40]);
    assert!(matches!(
        img.dirty_since("nope", pass1.as_of),
        Err(StoreError::UnknownTracker(_))
    ));
}

/// The chunk-hash cache under real concurrency: with 4 cached pages of 32, pages are
/// evicted, re-read, written back and used to build the tree while writers change them.
#[test]
fn concurrent_writes_hashes_trees_and_checkpoints_with_a_tiny_hash_cache_stay_honest() {
    let dir = tempfile::tempdir().unwrap();
    let geo = Geometry::with_params(64 * MIB, 16 * 1024, 8, 16).unwrap();
    let img = Arc::new(DiskImage::create_with_geometry(dir.path(), "t", geo).unwrap());
    img.set_hash_cache_pages(4);
    img.start_tracking("replica").unwrap();
    img.set_activity_limit(3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut handles = Vec::new();
    for t in 0..2u64 {
        let img = img.clone();
        handles.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(30 + t);
            for i in 0..600 {
                let len = rng.gen_range(1..40_000usize);
                let off = rng.gen_range(0..img.size() - len as u64);
                img.write_at(&random_chunk(&mut rng, len), off).unwrap();
                if i % 50 == 0 {
                    img.flush().unwrap();
                }
            }
        }));
    }
    {
        let img = img.clone();
        handles.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(40);
            while std::time::Instant::now() < deadline {
                for _ in 0..200 {
                    img.chunk_hash(rng.gen_range(0..img.chunk_count())).unwrap();
                }
                img.hash_all().unwrap();
                match img.root() {
                    Ok(_) | Err(StoreError::Busy) => {}
                    Err(e) => panic!("root: {e}"),
                }
                img.checkpoint().unwrap();
                if Arc::strong_count(&img) == 2 {
                    break; // the writers are done
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_cached_hashes_match_content(&img);
    let fresh = HashTree::from_leaves(fresh_hashes(&img), geo.fanout());
    assert_eq!(img.root().unwrap(), fresh.root());
    // And after a crash (SIGKILL: the files stay), the reopened image agrees.
    let img = Arc::try_unwrap(img).ok().unwrap();
    drop(img);
    let img = DiskImage::open(dir.path(), "t").unwrap();
    img.set_hash_cache_pages(4);
    assert_cached_hashes_match_content(&img);
    assert_eq!(img.root().unwrap(), fresh.root());
    let dirty: BTreeSet<u64> = img
        .dirty_chunks("replica")
        .unwrap()
        .chunks
        .into_iter()
        .collect();
    for (c, h) in fresh_hashes(&img).iter().enumerate() {
        if *h != ZERO_CHUNK_HASH {
            assert!(
                dirty.contains(&(c as u64)),
                "chunk {c} written but not dirty"
            );
        }
    }
}

#[test]
fn lost_chunk_hash_file_forgets_every_hash_but_keeps_the_trackers() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), "h", 4 * MIB).unwrap();
    img.start_tracking("r").unwrap();
    img.write_at(&[5; 70_000], MIB).unwrap();
    let root = img.root().unwrap();
    let d = img.dirty_chunks("r").unwrap();
    img.clear("r", &d.chunks[..1], d.as_of).unwrap();
    img.close().unwrap();
    drop(img);
    std::fs::remove_file(dir.path().join("disk-h.hashes")).unwrap();
    let img = DiskImage::open(dir.path(), "h").unwrap();
    assert!((0..img.chunk_count()).all(|c| img.cached_hash(c).is_none()));
    assert_eq!(
        img.dirty_chunks("r").unwrap().chunks,
        d.chunks[1..].to_vec()
    );
    assert_eq!(img.root().unwrap(), root);
    assert_cached_hashes_match_content(&img);
}

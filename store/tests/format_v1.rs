//! Images written in the store's format 1 (before the metadata record had its own version
//! marker) still open, with everything they recorded, and are upgraded on open. The
//! fixtures in `tests/fixtures/v1/` were written by that code; see their README.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::Path;

use convoy_store::{DiskImage, HashTree, hash_chunk};

/// Copies fixture image `id` into a fresh directory (opening an image rewrites its files).
fn copy_fixture(id: &str) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    let dir = tempfile::tempdir().unwrap();
    for ext in ["img", "meta", "al"] {
        let name = format!("disk-{id}.{ext}");
        std::fs::copy(src.join(&name), dir.path().join(&name)).unwrap();
    }
    dir
}

fn fresh_leaves(img: &DiskImage) -> Vec<[u8; 32]> {
    let data = std::fs::read(img.path()).unwrap();
    data.chunks(img.geometry().chunk_size() as usize)
        .map(hash_chunk)
        .collect()
}

/// Every hash the image claims describes the content, and the tree over it is right.
fn assert_hashes_honest(img: &DiskImage) {
    let fresh = fresh_leaves(img);
    for (c, h) in fresh.iter().enumerate() {
        if let Some(cached) = img.cached_hash(c as u64) {
            assert_eq!(&cached, h, "stale hash of chunk {c}");
        }
    }
    let tree = HashTree::from_leaves(fresh, img.geometry().fanout());
    assert_eq!(img.root().unwrap(), tree.root());
}

fn dirty(img: &DiskImage, t: &str) -> Vec<u64> {
    img.dirty_chunks(t).unwrap().chunks
}

#[test]
fn format_1_image_closed_cleanly_opens_trusted_with_its_trackers_and_hashes() {
    let dir = copy_fixture("clean");
    let img = DiskImage::open(dir.path(), "clean").unwrap();
    assert!(img.recovery().clean, "{:?}", img.recovery());
    assert_eq!(img.recovery().untrusted_chunks, 0);
    assert_eq!(img.chunk_count(), 257);
    assert_eq!(img.trackers(), vec!["replica-2", "replica-3"]);
    assert_eq!(dirty(&img, "replica-2"), vec![2, 3, 100, 200, 201, 256]);
    assert_eq!(dirty(&img, "replica-3"), vec![200, 201]);
    // Every hash but those of the two chunks written after hashing was recorded.
    let unknown: Vec<u64> = (0..img.chunk_count())
        .filter(|&c| img.cached_hash(c).is_none())
        .collect();
    assert_eq!(unknown, vec![200, 201]);
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 100 * 4096).unwrap();
    assert_eq!(b, [0x22; 4096]);
    assert_hashes_honest(&img);

    // Upgraded on open: the metadata is in the current format, the hashes in their file.
    let meta = std::fs::read(dir.path().join("disk-clean.meta")).unwrap();
    assert!(meta.starts_with(b"CVYSMETA"), "metadata not upgraded");
    assert!(dir.path().join("disk-clean.hashes").exists());
    // Reopening (cleanly and after a crash) keeps it all.
    img.close().unwrap();
    drop(img);
    let img = DiskImage::open(dir.path(), "clean").unwrap();
    assert!(img.recovery().clean);
    assert_eq!(dirty(&img, "replica-2"), vec![2, 3, 100, 200, 201, 256]);
    assert_eq!(
        img.hash_all().unwrap().read,
        0,
        "hashes survived the upgrade"
    );
    assert_hashes_honest(&img);
}

#[test]
fn format_1_image_that_crashed_distrusts_its_active_extents() {
    let dir = copy_fixture("crashed");
    let img = DiskImage::open(dir.path(), "crashed").unwrap();
    assert!(!img.recovery().clean);
    // Extents 10 and 50 (4 chunks each) were in the activity log.
    assert_eq!(img.recovery().untrusted_chunks, 8);
    let extents: Vec<u64> = (40..44).chain(200..204).collect();
    for c in &extents {
        assert_eq!(img.cached_hash(*c), None, "chunk {c} must be distrusted");
    }
    let mut r2: Vec<u64> = vec![1, 2, 3, 100, 256];
    r2.extend(&extents);
    r2.sort();
    assert_eq!(dirty(&img, "replica-2"), r2);
    assert_eq!(dirty(&img, "replica-3"), extents);
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 40 * 4096).unwrap();
    assert_eq!(b, [0x55; 4096], "the flushed write is there");
    assert_hashes_honest(&img);
    drop(img);
    // Recovered and upgraded durably: a second open after another crash finds nothing new.
    let img = DiskImage::open(dir.path(), "crashed").unwrap();
    assert_eq!(img.recovery().untrusted_chunks, 0);
    assert_eq!(dirty(&img, "replica-3"), extents);
    assert_hashes_honest(&img);
}

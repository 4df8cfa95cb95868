//! A real full file system (a size-limited tmpfs): a write that needs space fails with
//! ENOSPC, the image stays usable, and once space is freed it serves again with
//! everything it acknowledged.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use convoy_store::{DiskImage, HashTree, hash_chunk};

const MIB: u64 = 1 << 20;

fn block(n: u64) -> Vec<u8> {
    (0..MIB)
        .map(|i| ((i * 7 + n * 131) % 251) as u8 + 1)
        .collect()
}

#[test]
fn full_file_system_fails_writes_with_enospc_until_space_is_freed_and_loses_nothing_acknowledged() {
    let fs = support::Tmpfs::mount("8m");
    let img = DiskImage::create(fs.path(), "d", 64 * MIB).unwrap();
    img.start_tracking("r").unwrap();

    // Fill the file system with the image's own data, 1 MiB at a time, each flushed
    // (acknowledged), until a write fails.
    let mut acked: Vec<u64> = Vec::new();
    let mut full_at = None;
    for n in 0..64 {
        match img.write_at(&block(n), n * MIB) {
            Ok(()) => {
                img.flush().unwrap();
                acked.push(n);
            }
            Err(e) => {
                assert!(e.is_no_space(), "block {n}: expected ENOSPC, got {e}");
                full_at = Some(n);
                break;
            }
        }
    }
    let full_at = full_at.expect("an 8 MiB tmpfs never filled up");
    assert!(acked.len() >= 4, "only {} MiB fit", acked.len());
    assert!(img.failure().is_none(), "ENOSPC must not fail the image");
    // The failed write's chunks are dirty (it may have landed in part).
    let c0 = full_at * MIB / 65536;
    let dirty = img.dirty_chunks("r").unwrap().chunks;
    assert!(
        (c0..c0 + 16).all(|c| dirty.contains(&c)),
        "failed write not dirty"
    );
    // What was acknowledged can still be flushed, and the image keeps failing cleanly.
    img.flush().unwrap();
    assert!(
        img.write_at(&block(full_at), full_at * MIB)
            .unwrap_err()
            .is_no_space()
    );

    // The guest discards its first block: space comes back, the write goes through.
    img.write_zeroes(0, MIB).unwrap();
    img.write_at(&block(full_at), full_at * MIB).unwrap();
    img.flush().unwrap();
    img.close().unwrap();
    drop(img);

    let img = DiskImage::open(fs.path(), "d").unwrap();
    assert!(img.recovery().clean);
    let mut b = vec![0u8; MIB as usize];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0), "the discarded block");
    for &n in acked.iter().skip(1).chain([&full_at]) {
        img.read_at(&mut b, n * MIB).unwrap();
        assert!(b == block(n), "block {n} acknowledged but not read back");
    }
    // And the metadata is honest about it.
    let data = std::fs::read(img.path()).unwrap();
    let fresh: Vec<_> = data.chunks(65536).map(hash_chunk).collect();
    assert_eq!(img.root().unwrap(), HashTree::from_leaves(fresh, 64).root());
    let dirty = img.dirty_chunks("r").unwrap().chunks;
    assert!((c0..c0 + 16).all(|c| dirty.contains(&c)));
}

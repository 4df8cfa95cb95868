//! Writes the store's format-1 fixtures (`store/tests/fixtures/v1/`) with the code of the
//! commit that added them: images whose metadata record and activity log are in the
//! format every image had before the metadata got its own version marker. Kept for the
//! record of how they were made; never run it with newer code (it would write the newer
//! format).
//!
//! `cargo run -p convoy-store --example write_fixture_v1 -- <dir>`

use std::path::Path;

use convoy_store::{DiskImage, Geometry};

/// 257 chunks of 4 KiB (the last one 1000 bytes), 4 chunks per extent, fan-out 4.
const SIZE: u64 = (1 << 20) + 1000;

fn build(dir: &Path, id: &str) -> Result<DiskImage, Box<dyn std::error::Error>> {
    let g = Geometry::with_params(SIZE, 4096, 4, 4)?;
    let img = DiskImage::create_with_geometry(dir, id, g)?;
    img.start_tracking("replica-2")?;
    img.write_at(&[0x11; 10_000], 5000)?; // chunks 1..=3
    img.write_at(&[0x22; 4096], 100 * 4096)?; // chunk 100
    img.write_at(&[0x33; 500], SIZE - 600)?; // chunk 256, the short last one
    img.hash_all()?;
    img.start_tracking("replica-3")?; // checkpoints: hashes and trackers recorded
    img.write_at(&[0x44; 4096], 200 * 4096 + 7)?; // chunks 200 and 201
    let d = img.dirty_chunks("replica-2")?;
    img.clear("replica-2", &[1], d.as_of)?;
    img.chunk_hash(100)?;
    Ok(img)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: write_fixture_v1 <dir>")?;
    let dir = Path::new(&dir);

    // Closed cleanly: the next open trusts everything it recorded.
    let img = build(dir, "clean")?;
    img.close()?;
    for t in img.trackers() {
        println!("clean {t}: {:?}", img.dirty_chunks(&t)?.chunks);
    }
    drop(img);

    // Not closed: one more write in a fresh extent after the last checkpoint, flushed,
    // then the process "dies" (dropped without close).
    let img = build(dir, "crashed")?;
    img.write_at(&[0x55; 4096], 40 * 4096)?; // chunk 40, extent 10
    img.flush()?;
    for t in img.trackers() {
        println!("crashed {t}: {:?}", img.dirty_chunks(&t)?.chunks);
    }
    println!(
        "crashed generation {}, active extents {}",
        img.generation(),
        img.active_extents()
    );
    drop(img);
    Ok(())
}

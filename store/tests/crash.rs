//! A real crash: a child process writes, hashes, flushes and checkpoints from several
//! threads; the parent SIGKILLs it at a random moment, reopens the image and checks that
//! recovery kept the metadata honest. Repeated, so recovery also follows recovery.
//!
//! This models SIGKILL, which keeps the page cache: everything the child wrote survives.
//! Power loss, which does not, is tested on the simulated disk (`power_loss.rs`, `faults.rs`
//! and the model tests in `src/model_tests.rs`), which drops unsynced writes at a crash.
//!
//! The child is this test binary re-executed with `CRASH_CHILD_ENV` set, running
//! `crash_child_entry` (a no-op in a normal test run).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use convoy_store::{DiskImage, HashTree, ZERO_CHUNK_HASH, hash_chunk};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CRASH_CHILD_ENV: &str = "CONVOY_STORE_CRASH_CHILD";
const ID: &str = "crash";
const SIZE: u64 = 128 << 20;
const TRACKER: &str = "replica";

#[test]
fn crash_child_entry() {
    let Ok(spec) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let (dir, seed) = spec.split_once('|').expect("dir|seed");
    child(Path::new(dir), seed.parse().expect("seed"));
}

/// Writes forever (until killed), printing `ACK` after every flush that returned.
fn child(dir: &Path, seed: u64) {
    let img = Arc::new(DiskImage::open(dir, ID).expect("child open"));
    img.set_activity_limit(3); // frequent checkpoints from flush
    println!("READY");
    let mut threads = Vec::new();
    for t in 0..2u64 {
        let img = img.clone();
        threads.push(thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed * 10 + t);
            loop {
                for _ in 0..rng.gen_range(1..8) {
                    let len = rng.gen_range(1..300_000usize);
                    let off = rng.gen_range(0..SIZE - len as u64);
                    let data: Vec<u8> = (0..len).map(|_| rng.r#gen::<u8>() | 1).collect();
                    img.write_at(&data, off).expect("child write");
                }
                img.flush().expect("child flush");
                println!("ACK");
            }
        }));
    }
    let mut rng = StdRng::seed_from_u64(seed * 10 + 9);
    loop {
        for _ in 0..50 {
            img.chunk_hash(rng.gen_range(0..img.chunk_count()))
                .expect("child hash");
        }
        if rng.gen_bool(0.2) {
            img.hash_all().expect("child hash_all");
        }
        img.checkpoint().expect("child checkpoint");
    }
}

fn run_child_and_kill(dir: &Path, seed: u64, acks_before_kill: usize) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, format!("{}|{seed}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acks = 0;
    let mut ready = false;
    while acks < acks_before_kill {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l == "READY" => ready = true,
            Ok(l) if l == "ACK" => acks += 1,
            Ok(_) => {}
            Err(e) => {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                panic!("child stalled (ready={ready}, acks={acks}): {e}");
            }
        }
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "child was killed, not finished");
    drop(rx);
    reader.join().unwrap();
}

fn check_after_crash(dir: &Path, round: usize) {
    let img = DiskImage::open(dir, ID).unwrap();
    assert!(
        !img.recovery().clean,
        "round {round}: a killed child cannot close cleanly"
    );
    let data = std::fs::read(img.path()).unwrap();
    let cs = img.geometry().chunk_size() as usize;
    let fresh: Vec<_> = data.chunks(cs).map(hash_chunk).collect();
    // Every hash the metadata still claims must describe the image as it is.
    let mut trusted = 0;
    for (c, h) in fresh.iter().enumerate() {
        if let Some(cached) = img.cached_hash(c as u64) {
            assert_eq!(
                &cached, h,
                "round {round}: stale hash for chunk {c} after crash"
            );
            trusted += 1;
        }
    }
    // The image started all-zero and the tracker started before any write, so every
    // non-zero chunk was written by the child and must be dirty.
    let dirty: BTreeSet<u64> = img
        .dirty_chunks(TRACKER)
        .unwrap()
        .chunks
        .into_iter()
        .collect();
    let mut written = 0;
    for (c, h) in fresh.iter().enumerate() {
        if *h != ZERO_CHUNK_HASH {
            written += 1;
            assert!(
                dirty.contains(&(c as u64)),
                "round {round}: written chunk {c} not dirty"
            );
        }
    }
    assert!(written > 0, "round {round}: the child wrote nothing");
    let tree = HashTree::from_leaves(fresh, img.geometry().fanout());
    assert_eq!(img.root().unwrap(), tree.root());
    eprintln!(
        "round {round}: {written} chunks written, {} dirty, {trusted} hashes trusted, {} distrusted on recovery",
        dirty.len(),
        img.recovery().untrusted_chunks
    );
    // Alternate how this incarnation ends, so the next child opens both kinds.
    if round % 2 == 0 {
        img.close().unwrap();
    }
}

#[test]
fn sigkill_at_random_moments_never_leaves_stale_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::create(dir.path(), ID, SIZE).unwrap();
    img.start_tracking(TRACKER).unwrap();
    img.close().unwrap();
    drop(img);
    let mut rng = StdRng::seed_from_u64(0xc0ffee);
    for round in 0..6 {
        run_child_and_kill(dir.path(), round as u64 + 1, rng.gen_range(1..25));
        check_after_crash(dir.path(), round);
    }
}

//! Power loss, not SIGKILL (issue 9 item 4). SIGKILL keeps the page cache, so it cannot
//! tell code that fsyncs from code that forgot to. Here every agent's data directory lives
//! on a crash file system (`convoy-crashfs`, FUSE) that, when the power is cut, rolls every
//! file back to what was last fsynced; the agents are SIGKILLed first, all at once, as a
//! whole-rack power failure would stop them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use convoy_crashfs::CrashFs;

/// The crash file system and its directories; declared before the cluster, so it is
/// dropped (unmounted) after the agents are gone.
struct CrashDisk {
    fs: CrashFs,
    _mount: tempfile::TempDir,
    _backing: tempfile::TempDir,
}

fn crash_disk() -> CrashDisk {
    let backing = tempfile::tempdir().unwrap();
    let mount = tempfile::tempdir().unwrap();
    let fs = CrashFs::mount(backing.path(), mount.path()).unwrap_or_else(|e| {
        panic!("power-loss tests need FUSE as root (scripts/setup loads the module): {e}")
    });
    CrashDisk {
        fs,
        _mount: mount,
        _backing: backing,
    }
}

/// A `convoy dev` cluster of `nodes` whose data directories are on `disk`.
fn cluster_on(disk: &CrashDisk, nodes: u64) -> Dev {
    let on_disk = disk.fs.path().to_path_buf();
    Dev::start_prepared(nodes, &[], |dir| {
        for n in 1..=nodes {
            let data = on_disk.join(format!("node-{n}"));
            std::fs::create_dir_all(&data).unwrap();
            let node_dir = dir.join(format!("node-{n}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            std::os::unix::fs::symlink(&data, node_dir.join("data")).unwrap();
        }
    })
}

/// Every node SIGKILLed (as fast as signals go), then the disk loses what was not synced.
fn power_cut(dev: &Dev, disk: &mut CrashDisk, nodes: u64) -> convoy_crashfs::PowerCut {
    for n in 1..=nodes {
        dev.kill(n);
    }
    disk.fs.power_cut().expect("power cut")
}

/// Raft acknowledges a command only once a majority holds it durably: every VM whose
/// `vm create` answered before the whole cluster lost power is there after it, while the
/// power cut did take away data the agents had not synced (so the test can fail).
#[test]
fn metadata_acknowledged_before_a_power_cut_survives_it() {
    let mut disk = crash_disk();
    let dev = cluster_on(&disk, 3);
    wait_for("a leader", Duration::from_secs(20), || dev.leader());

    // Creates VMs one after another until the power goes; the names answered are the
    // acknowledged writes.
    let stop = Arc::new(AtomicBool::new(false));
    let env = dev.env();
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("v{i}");
                let r = run_convoy(
                    &["vm", "create", &name, "--host", "1", "--disk", "1MiB"],
                    &env,
                );
                if r.ok {
                    acked.push(name);
                }
                i += 1;
            }
            acked
        })
    };
    let started = Instant::now();
    wait_for("40 VMs created", Duration::from_secs(120), || {
        let r = dev.cli(&["vm", "list", "-o", "json"]);
        (r.ok && r.json().as_array().is_some_and(|l| l.len() >= 40)).then_some(())
    });
    // The power goes while creates are in flight.
    let cut = power_cut(&dev, &mut disk, 3);
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    eprintln!(
        "{} creates acknowledged in {:.1} s; the power cut rolled back {} files ({} bytes dropped, {} restored)",
        acked.len(),
        started.elapsed().as_secs_f64(),
        cut.files,
        cut.bytes_dropped,
        cut.bytes_restored
    );
    assert!(acked.len() >= 30, "{acked:?}");
    assert!(
        cut.files > 0,
        "the power cut dropped nothing: the test would not tell a missing fsync"
    );

    for n in 1..=3 {
        dev.restart(n);
    }
    wait_for(
        "a leader after the power cut",
        Duration::from_secs(60),
        || dev.leader(),
    );
    let listed = wait_for(
        "vm list after the power cut",
        Duration::from_secs(30),
        || {
            let r = dev.cli(&["vm", "list", "-o", "json"]);
            r.ok.then(|| r.json())
        },
    );
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|a| !names.contains(&a.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged creates lost with the power: {lost:?}",
        lost.len(),
        acked.len()
    );
    // And the cluster goes on taking writes.
    let r = dev.cli(&["vm", "create", "after", "--host", "2", "--disk", "1MiB"]);
    assert!(r.ok, "{r:?}");
    dev.assert_no_panics();
}

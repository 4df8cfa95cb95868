//! The guest runner against in-memory disks with latency and failure injection.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_guest::sim::{Faults, SimCg, SimDisk};
use convoy_guest::{
    Guest, GuestDisk, GuestError, GuestHandle, GuestStats, LogRecord, VerifyOptions, WriteLog,
    verify_latest, verify_prefix,
};

const VM: u64 = 9;

fn two_disks(faults: Faults) -> (SimCg, Vec<Arc<SimDisk>>) {
    let cg = SimCg::new();
    let disks = vec![
        cg.add_disk(4 << 20, faults.clone()),
        cg.add_disk(2 << 20, faults),
    ];
    (cg, disks)
}

fn as_guest_disks(disks: &[Arc<SimDisk>]) -> Vec<Arc<dyn GuestDisk>> {
    disks
        .iter()
        .map(|d| Arc::clone(d) as Arc<dyn GuestDisk>)
        .collect()
}

/// Polls the guest's counters until `cond` holds; panics after `deadline`.
async fn wait_for(
    guest: &GuestHandle,
    deadline: Duration,
    what: &str,
    cond: impl Fn(&GuestStats) -> bool,
) {
    let until = Instant::now() + deadline;
    loop {
        let s = guest.stats();
        if cond(&s) {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn logged(path: &Path) -> Vec<LogRecord> {
    WriteLog::read_all(path).unwrap().records
}

/// Checks the log against what the disks saw: exactly the acknowledged writes, with the
/// sequence numbers they got.
fn assert_log_matches_disks(records: &[LogRecord], disks: &[Arc<SimDisk>]) {
    let mut acked = BTreeSet::new();
    let mut failed = BTreeSet::new();
    for (i, d) in disks.iter().enumerate() {
        for o in d.outcomes() {
            let tag = o.tag.unwrap();
            assert_eq!(tag.disk_index as usize, i);
            if o.acked {
                acked.insert((tag.write_id, o.seq.unwrap()));
            } else {
                failed.insert(tag.write_id);
            }
        }
    }
    let in_log: BTreeSet<(u64, u64)> = records.iter().map(|r| (r.write_id, r.cg_seq)).collect();
    assert_eq!(in_log.len(), records.len(), "duplicate records");
    assert_eq!(in_log, acked, "log differs from acknowledged writes");
    assert!(
        records.iter().all(|r| !failed.contains(&r.write_id)),
        "a failed write was logged"
    );
}

async fn run_at_500_iops(land: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.log");
    let (cg, disks) = two_disks(Faults {
        latency: Duration::from_millis(1),
        fail_every: 7,
        failed_writes_land: land,
    });
    let workload = "iops=500,size=4k,pattern=random,depth=4,flush_every=50,seed=1"
        .parse()
        .unwrap();
    let log = WriteLog::open(&path, VM).unwrap();
    let guest = Guest::start(VM, as_guest_disks(&disks), workload, log).unwrap();
    wait_for(&guest, Duration::from_secs(20), "500 acked writes", |s| {
        s.writes_acked >= 500
    })
    .await;
    let stats = guest.stop().await;
    eprintln!("land={land}: {stats:?}");
    assert!(!stats.running);
    assert!(stats.halted.is_none(), "{stats:?}");
    assert_eq!(stats.in_flight, 0);
    // Loose bounds: the machine may be busy, but the bucket must pace and not starve.
    assert!(stats.achieved_iops >= 250.0, "{stats:?}");
    assert!(stats.achieved_iops <= 750.0, "{stats:?}");
    assert!(stats.writes_failed > 0 && stats.last_error.is_some());
    assert!(stats.flushes > 0);
    assert!(stats.latency_p50_us >= 900, "{stats:?}");
    assert!(stats.latency_p99_us >= stats.latency_p50_us);
    assert_eq!(stats.bytes_acked, stats.writes_acked * 4096);

    let records = logged(&path);
    assert_eq!(records.len() as u64, stats.writes_acked);
    assert_log_matches_disks(&records, &disks);

    let opts = VerifyOptions::default();
    let latest = verify_latest(VM, &records, &cg.copy(&[0, 1]), &opts).unwrap();
    assert!(latest.ok(), "{latest}");
    assert_eq!(latest.writes_logged, stats.writes_acked);
    if land {
        // Failed writes that reached the disk show as newer, unacknowledged data.
        assert!(latest.unacknowledged_sectors > 0, "{latest}");
    } else {
        assert_eq!(latest.unacknowledged_sectors, 0, "{latest}");
    }

    // An in-order replica cut anywhere is a prefix ending at the last logged write
    // at or before the cut.
    let last = cg.last_seq();
    for cut in [0, 1, last / 3, last / 2, last - 1, last] {
        let copy = cg.copy_at(&[0, 1], cut);
        let report = verify_prefix(VM, &records, &copy, &opts).unwrap();
        assert!(report.ok(), "cut {cut}: {report}");
        let expect = records.iter().map(|r| r.cg_seq).filter(|&s| s <= cut).max();
        assert_eq!(report.prefix_upto, expect, "cut {cut}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_at_500_iops_logs_exactly_the_acked_writes() {
    run_at_500_iops(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_that_landed_are_tolerated_as_unacknowledged() {
    run_at_500_iops(true).await;
}

#[tokio::test]
async fn fenced_writes_are_counted_and_the_guest_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.log");
    let (cg, disks) = two_disks(Faults::default());
    let workload = "iops=2000,size=8k,depth=2,seed=3".parse().unwrap();
    let guest = Guest::start(
        VM,
        as_guest_disks(&disks),
        workload,
        WriteLog::open(&path, VM).unwrap(),
    )
    .unwrap();
    wait_for(&guest, Duration::from_secs(10), "first acks", |s| {
        s.writes_acked >= 20
    })
    .await;
    for d in &disks {
        d.set_fenced(true);
    }
    wait_for(&guest, Duration::from_secs(10), "refused writes", |s| {
        s.writes_failed >= 20
    })
    .await;
    let acked_while_fenced = guest.stats().writes_acked;
    for d in &disks {
        d.set_fenced(false);
    }
    wait_for(
        &guest,
        Duration::from_secs(10),
        "acks after unfencing",
        |s| s.writes_acked >= acked_while_fenced + 20,
    )
    .await;
    let stats = guest.stop().await;
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("stale epoch"))
    );
    let records = logged(&path);
    assert_log_matches_disks(&records, &disks);
    let report = verify_latest(VM, &records, &cg.copy(&[0, 1]), &VerifyOptions::default()).unwrap();
    assert!(report.ok(), "{report}");
}

#[tokio::test]
async fn restarted_guest_never_reuses_write_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.log");
    let (cg, disks) = two_disks(Faults {
        fail_every: 5,
        failed_writes_land: true,
        ..Faults::default()
    });
    for run in 0..3u64 {
        let workload = format!("iops=max,size=4k,pattern=hot,depth=8,span=256k,seed={run}")
            .parse()
            .unwrap();
        let guest = Guest::start(
            VM,
            as_guest_disks(&disks),
            workload,
            WriteLog::open(&path, VM).unwrap(),
        )
        .unwrap();
        wait_for(&guest, Duration::from_secs(10), "acks", |s| {
            s.writes_acked >= 300
        })
        .await;
        guest.stop().await;
    }
    let records = logged(&path);
    assert_log_matches_disks(&records, &disks);
    // Ids of all writes ever issued, acked or not, are unique.
    let all: Vec<u64> = disks
        .iter()
        .flat_map(|d| d.outcomes())
        .map(|o| o.tag.unwrap().write_id)
        .collect();
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len());
    let report = verify_latest(VM, &records, &cg.copy(&[0, 1]), &VerifyOptions::default()).unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.anomaly_count, 0);
}

#[tokio::test]
async fn sequential_writes_never_overlap_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.log");
    let (cg, disks) = two_disks(Faults {
        latency: Duration::from_micros(200),
        ..Faults::default()
    });
    // 4 blocks per disk and 8 in flight: the planner must wait rather than overlap.
    let workload = "iops=max,size=4k,pattern=sequential,depth=8,span=16k"
        .parse()
        .unwrap();
    let guest = Guest::start(
        VM,
        as_guest_disks(&disks),
        workload,
        WriteLog::open(&path, VM).unwrap(),
    )
    .unwrap();
    wait_for(&guest, Duration::from_secs(10), "acks", |s| {
        s.writes_acked >= 1000
    })
    .await;
    guest.stop().await;
    let records = logged(&path);
    // Sequence order equals issue order on every block (the checker flags otherwise).
    let report = verify_latest(VM, &records, &cg.copy(&[0, 1]), &VerifyOptions::default()).unwrap();
    assert!(report.ok(), "{report}");
    assert!(records.iter().all(|r| r.offset < 16 << 10));
}

#[tokio::test]
async fn dropping_the_handle_stops_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.log");
    let (_cg, disks) = two_disks(Faults::default());
    let guest = Guest::start(
        VM,
        as_guest_disks(&disks),
        "iops=max".parse().unwrap(),
        WriteLog::open(&path, VM).unwrap(),
    )
    .unwrap();
    wait_for(&guest, Duration::from_secs(10), "acks", |s| {
        s.writes_acked >= 10
    })
    .await;
    drop(guest);
    // Once stopped, the disks see no more writes.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let before = disks[0].outcomes().len() + disks[1].outcomes().len();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let after = disks[0].outcomes().len() + disks[1].outcomes().len();
        if before == after {
            break;
        }
        assert!(Instant::now() < until, "guest kept writing after drop");
    }
}

#[tokio::test]
async fn start_refuses_bad_setups() {
    let dir = tempfile::tempdir().unwrap();
    let (_cg, disks) = two_disks(Faults::default());
    let err = Guest::start(
        VM,
        as_guest_disks(&disks),
        "size=4MiB".parse().unwrap(),
        WriteLog::open(dir.path().join("a.log"), VM).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, GuestError::Config(_)), "{err}");
    let err = Guest::start(
        VM,
        Vec::new(),
        "".parse().unwrap(),
        WriteLog::open(dir.path().join("b.log"), VM).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, GuestError::Config(_)), "{err}");
    let err = Guest::start(
        VM + 1,
        as_guest_disks(&disks),
        "".parse().unwrap(),
        WriteLog::open(dir.path().join("c.log"), VM).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, GuestError::LogVmMismatch { .. }), "{err}");
}

/// `fill=` writes every byte of each disk once before the steady workload, and only in a
/// fresh log: a guest restarted on the same log goes straight to its steady writes.
#[tokio::test]
async fn fill_pass_writes_every_disk_once_then_the_steady_workload_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.log");
    let (cg, disks) = two_disks(Faults::default());
    let spec = "iops=max,size=4k,pattern=random,depth=4,fill=1m,seed=3";
    let guest = Guest::start(
        VM,
        as_guest_disks(&disks),
        spec.parse().unwrap(),
        WriteLog::open(&path, VM).unwrap(),
    )
    .unwrap();
    // 4 MiB + 2 MiB of 1 MiB fill writes, then 4 KiB ones.
    wait_for(&guest, Duration::from_secs(10), "fill and steady", |s| {
        s.writes_acked >= 6 + 200
    })
    .await;
    guest.stop().await;
    let records = logged(&path);
    let fills: Vec<(u32, u64)> = records
        .iter()
        .filter(|r| r.len == 1 << 20)
        .map(|r| (r.disk_index, r.offset))
        .collect();
    let mut expect: Vec<(u32, u64)> = (0..4).map(|i| (0, i << 20)).collect();
    expect.extend((0..2).map(|i| (1, i << 20)));
    assert_eq!(fills, expect, "each MiB of both disks once, in order");
    // Every fill write was acknowledged before the first steady write was issued.
    let last_fill = records.iter().position(|r| r.len == 1 << 20).unwrap() + 5;
    assert!(records[..=last_fill].iter().all(|r| r.len == 1 << 20));
    assert!(records[last_fill + 1..].iter().all(|r| r.len == 4096));
    let report = verify_latest(VM, &records, &cg.copy(&[0, 1]), &VerifyOptions::default()).unwrap();
    assert!(report.ok(), "{report}");

    // Same log again: no second fill.
    let guest = Guest::start(
        VM,
        as_guest_disks(&disks),
        spec.parse().unwrap(),
        WriteLog::open(&path, VM).unwrap(),
    )
    .unwrap();
    wait_for(&guest, Duration::from_secs(10), "steady writes", |s| {
        s.writes_acked >= 100
    })
    .await;
    guest.stop().await;
    let again = logged(&path);
    assert_eq!(
        again.iter().filter(|r| r.len == 1 << 20).count(),
        6,
        "a restarted guest does not fill again"
    );
}

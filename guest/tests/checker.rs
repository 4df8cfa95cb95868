//! The checker against in-memory copies built from known write sequences.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};

use convoy_guest::content::make_block;
use convoy_guest::sim::SimCopy;
use convoy_guest::{
    BlockTag, Found, LogRecord, SECTOR_SIZE, VerifyMode, VerifyOptions, VmCopy, verify,
    verify_latest, verify_prefix,
};
use proptest::prelude::*;

const VM: u64 = 42;
const DISK_SECTORS: u64 = 64;
const DISK_SIZE: u64 = DISK_SECTORS * SECTOR_SIZE as u64;

/// A write sequence in cg_seq order, with its data.
struct History {
    records: Vec<LogRecord>,
    data: Vec<Vec<u8>>,
    disks: usize,
}

impl History {
    fn new(vm_id: u64, disks: usize, writes: &[(u32, u64, u64, u64)]) -> History {
        let mut seq = 100;
        let mut records = Vec::new();
        let mut data = Vec::new();
        for (i, &(disk, start, sectors, gap)) in writes.iter().enumerate() {
            seq += gap;
            let sectors = sectors.min(DISK_SECTORS - start);
            let rec = LogRecord {
                write_id: i as u64 + 1,
                cg_seq: seq,
                disk_index: disk,
                offset: start * SECTOR_SIZE as u64,
                len: (sectors * SECTOR_SIZE as u64) as u32,
            };
            let tag = BlockTag {
                vm_id,
                disk_index: disk,
                offset: rec.offset,
                write_id: rec.write_id,
            };
            data.push(make_block(tag, rec.len as usize).unwrap().to_vec());
            records.push(rec);
        }
        History {
            records,
            data,
            disks,
        }
    }

    /// A copy with the writes whose index satisfies `keep` applied in order.
    fn apply(&self, keep: impl Fn(usize) -> bool) -> SimCopy {
        let mut copy = SimCopy::blank(&vec![DISK_SIZE; self.disks]);
        for (i, r) in self.records.iter().enumerate() {
            if keep(i) {
                copy.write(r.disk_index, r.offset, &self.data[i]).unwrap();
            }
        }
        copy
    }

    /// For each write, how many of its sectors survive in the full final state.
    fn surviving(&self) -> Vec<u64> {
        let mut last: BTreeMap<(u32, u64), usize> = BTreeMap::new();
        for (i, r) in self.records.iter().enumerate() {
            for s in r.offset / 512..(r.offset + u64::from(r.len)) / 512 {
                last.insert((r.disk_index, s), i);
            }
        }
        let mut n = vec![0; self.records.len()];
        for i in last.values() {
            n[*i] += 1;
        }
        n
    }
}

fn opts() -> VerifyOptions {
    VerifyOptions {
        chunk_bytes: 4096, // several chunks per disk, to exercise chunk edges
        max_listed: 1000,
        ..VerifyOptions::default()
    }
}

fn writes_strategy() -> impl Strategy<Value = (usize, Vec<(u32, u64, u64, u64)>)> {
    (1usize..=2).prop_flat_map(|disks| {
        (
            Just(disks),
            prop::collection::vec(
                (0..disks as u32, 0..DISK_SECTORS, 1u64..=12, 1u64..=3),
                1..40,
            ),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prefix_finds_exactly_the_cut((disks, writes) in writes_strategy(), cut in any::<prop::sample::Index>()) {
        let h = History::new(VM, disks, &writes);
        let n = h.records.len();
        let c = cut.index(n + 1);
        let copy = h.apply(|i| i < c);
        let report = verify_prefix(VM, &h.records, &copy, &opts()).unwrap();
        prop_assert!(report.ok(), "{report}");
        prop_assert_eq!(report.prefix_upto, c.checked_sub(1).map(|i| h.records[i].cg_seq));
        prop_assert_eq!(report.writes_expected, c as u64);
        prop_assert_eq!(report.unacknowledged_sectors, 0);

        // The same copy checked for "latest" misses exactly the later writes that survive.
        let surviving = h.surviving();
        let expect: BTreeSet<u64> = (c..n).filter(|&i| surviving[i] > 0).map(|i| h.records[i].write_id).collect();
        let latest = verify_latest(VM, &h.records, &copy, &opts()).unwrap();
        let got: BTreeSet<u64> = latest.missing.iter().map(|p| p.write_id).collect();
        prop_assert_eq!(latest.missing_write_count, expect.len() as u64);
        prop_assert_eq!(got, expect);
        prop_assert_eq!(latest.ok(), c == n || (c..n).all(|i| surviving[i] == 0));
    }

    #[test]
    fn skipped_write_breaks_the_prefix_and_is_reported_missing((disks, writes) in writes_strategy(), pick in any::<prop::sample::Index>()) {
        let h = History::new(VM, disks, &writes);
        let n = h.records.len();
        let surviving = h.surviving();
        // Skipping a write that is fully overwritten later leaves no trace, and skipping
        // the last write leaves a valid prefix: pick one that must be detected.
        let candidates: Vec<usize> = (0..n.saturating_sub(1)).filter(|&i| surviving[i] > 0).collect();
        prop_assume!(!candidates.is_empty());
        let j = candidates[pick.index(candidates.len())];
        let copy = h.apply(|i| i != j);

        let prefix = verify_prefix(VM, &h.records, &copy, &opts()).unwrap();
        prop_assert!(!prefix.ok(), "{prefix}");
        prop_assert!(prefix.missing_sectors + prefix.ahead_sectors > 0);
        prop_assert_eq!(prefix.wrong_sectors, 0);

        let latest = verify_latest(VM, &h.records, &copy, &opts()).unwrap();
        prop_assert!(!latest.ok());
        prop_assert_eq!(latest.missing_write_count, 1);
        prop_assert_eq!(latest.missing[0].write_id, h.records[j].write_id);
        prop_assert_eq!(latest.missing_sectors, surviving[j]);
        prop_assert_eq!(latest.wrong_sectors, 0);
        prop_assert_eq!(latest.ahead_sectors, 0);
    }

    #[test]
    fn full_state_passes_both_checks((disks, writes) in writes_strategy()) {
        let h = History::new(VM, disks, &writes);
        let copy = h.apply(|_| true);
        let latest = verify_latest(VM, &h.records, &copy, &opts()).unwrap();
        prop_assert!(latest.ok(), "{latest}");
        let total: u64 = h.surviving().iter().sum();
        prop_assert_eq!(latest.sectors_checked, total);
        let prefix = verify_prefix(VM, &h.records, &copy, &opts()).unwrap();
        prop_assert!(prefix.ok());
        prop_assert_eq!(prefix.prefix_upto, h.records.last().map(|r| r.cg_seq));
    }

    #[test]
    fn unlogged_write_in_the_crash_window_is_tolerated((disks, writes) in writes_strategy(), pick in any::<prop::sample::Index>()) {
        let h = History::new(VM, disks, &writes);
        let n = h.records.len();
        let j = pick.index(n);
        // The data of write j is on the copy, but its record never reached the log.
        let copy = h.apply(|_| true);
        let logged: Vec<LogRecord> = h.records.iter().enumerate().filter(|&(i, _)| i != j).map(|(_, r)| *r).collect();
        let latest = verify_latest(VM, &logged, &copy, &opts()).unwrap();
        prop_assert!(latest.ok(), "{latest}");
        prop_assert_eq!(latest.unacknowledged_sectors, h.surviving()[j]);
        let prefix = verify_prefix(VM, &logged, &copy, &opts()).unwrap();
        prop_assert!(prefix.ok(), "{prefix}");
        prop_assert_eq!(prefix.prefix_upto, logged.iter().map(|r| r.cg_seq).max());
    }

    #[test]
    fn group_prefix_is_one_cut_across_vms(writes in prop::collection::vec((0u32..2, 0..DISK_SECTORS, 1u64..=8, 1u64..=2), 2..40), cut in any::<prop::sample::Index>()) {
        // Two VMs with one disk each share one sequence: element 0 picks the VM.
        let h = History::new(0, 1, &writes.iter().map(|&(_, s, l, g)| (0, s, l, g)).collect::<Vec<_>>());
        let mut per_vm: [Vec<LogRecord>; 2] = [Vec::new(), Vec::new()];
        let mut copies = [SimCopy::blank(&[DISK_SIZE]), SimCopy::blank(&[DISK_SIZE])];
        let n = h.records.len();
        let c = cut.index(n + 1);
        for (i, r) in h.records.iter().enumerate() {
            let vm = writes[i].0 as usize;
            let tag = BlockTag { vm_id: 10 + vm as u64, disk_index: 0, offset: r.offset, write_id: r.write_id };
            per_vm[vm].push(*r);
            if i < c {
                copies[vm].write(0, r.offset, &make_block(tag, r.len as usize).unwrap()).unwrap();
            }
        }
        let vms = [
            VmCopy { vm_id: 10, records: &per_vm[0], reader: &copies[0] },
            VmCopy { vm_id: 11, records: &per_vm[1], reader: &copies[1] },
        ];
        let report = verify(VerifyMode::Prefix, &vms, &opts()).unwrap();
        prop_assert!(report.ok(), "{report}");
        prop_assert_eq!(report.prefix_upto, c.checked_sub(1).map(|i| h.records[i].cg_seq));
    }
}

fn simple() -> History {
    History::new(
        VM,
        1,
        &[(0, 0, 8, 1), (0, 4, 8, 1), (0, 20, 4, 1), (0, 40, 8, 1)],
    )
}

#[test]
fn torn_and_foreign_sectors_are_wrong() {
    let h = simple();
    let mut copy = h.apply(|_| true);
    // Tear sector 21 inside: new head, zero tail.
    let mut torn = copy.images[0].read(21 * 512, 512).unwrap();
    torn[256..].fill(0);
    copy.write(0, 21 * 512, &torn).unwrap();
    // Put a valid sector of write 4 at the wrong place (a misdirected write).
    let misplaced = copy.images[0].read(40 * 512, 512).unwrap();
    copy.write(0, 44 * 512, &misplaced).unwrap();
    // Another VM's data.
    let foreign = make_block(
        BlockTag {
            vm_id: 7,
            disk_index: 0,
            offset: 2 * 512,
            write_id: 1,
        },
        512,
    )
    .unwrap();
    copy.write(0, 2 * 512, &foreign).unwrap();

    let report = verify_latest(VM, &h.records, &copy, &opts()).unwrap();
    assert!(!report.ok());
    assert_eq!(report.wrong_sectors, 3, "{report}");
    assert_eq!(report.missing_sectors, 0);
    let by_offset: BTreeMap<u64, &Found> =
        report.wrong.iter().map(|w| (w.offset, &w.found)).collect();
    assert!(matches!(
        by_offset[&(2 * 512)],
        Found::Foreign { vm_id: 7, .. }
    ));
    assert!(matches!(by_offset[&(21 * 512)], Found::Corrupt { .. }));
    assert!(matches!(
        by_offset[&(44 * 512)],
        Found::Foreign { write_id: 4, .. }
    ));
    let w21 = report.wrong.iter().find(|w| w.offset == 21 * 512).unwrap();
    assert_eq!(w21.expected_write_id, Some(3));
}

#[test]
fn never_written_sectors_are_sampled() {
    let h = simple();
    let mut copy = h.apply(|_| true);
    // Garbage in a region no logged write touches.
    copy.write(0, 60 * 512, &[0xAB; 512]).unwrap();
    let report = verify_latest(
        VM,
        &h.records,
        &copy,
        &VerifyOptions {
            chunk_bytes: 2048,
            sample_chunks: 100,
            ..VerifyOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.wrong_sectors, 1, "{report}");
    assert!(report.sectors_sampled > 0);
    // With sampling off, the untouched chunk is not read.
    let report = verify_latest(
        VM,
        &h.records,
        &copy,
        &VerifyOptions {
            chunk_bytes: 2048,
            sample_chunks: 0,
            ..VerifyOptions::default()
        },
    )
    .unwrap();
    assert!(report.ok());
}

#[test]
fn truncated_copy_reports_sectors_beyond_the_end() {
    let h = simple();
    let full = h.apply(|_| true);
    let mut short = SimCopy::blank(&[32 * 512]);
    short
        .write(0, 0, &full.images[0].read(0, 32 * 512).unwrap())
        .unwrap();
    let report = verify_latest(VM, &h.records, &short, &opts()).unwrap();
    assert_eq!(report.wrong_sectors, 8);
    assert!(
        report
            .wrong
            .iter()
            .all(|w| w.found == Found::BeyondEnd && w.expected_write_id == Some(4))
    );
}

#[test]
fn sequencing_against_issue_order_is_an_anomaly() {
    let mut h = simple();
    // Write 2 overlaps write 1 but got the earlier sequence number.
    h.records[1].cg_seq = h.records[0].cg_seq - 1;
    let copy = h.apply(|_| true);
    let report = verify_latest(VM, &h.records, &copy, &opts()).unwrap();
    assert!(!report.ok());
    assert_eq!(report.anomaly_count, 1, "{report}");
    assert!(report.anomalies[0].contains("issued"), "{report}");
}

#[test]
fn duplicate_sequence_numbers_are_an_anomaly() {
    let mut h = simple();
    h.records[3].cg_seq = h.records[2].cg_seq;
    let copy = h.apply(|_| true);
    let report = verify_latest(VM, &h.records, &copy, &opts()).unwrap();
    assert_eq!(report.anomaly_count, 1, "{report}");
}

#[test]
fn the_same_vm_twice_is_refused() {
    let h = simple();
    let copy = h.apply(|_| true);
    let vm = VmCopy {
        vm_id: VM,
        records: &h.records,
        reader: &copy,
    };
    assert!(verify(VerifyMode::Latest, &[vm, vm], &opts()).is_err());
}

#[test]
fn report_serialises_with_counts_and_lists() {
    let h = simple();
    let copy = h.apply(|i| i != 2);
    let report = verify_latest(VM, &h.records, &copy, &opts()).unwrap();
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["mode"], "latest");
    assert_eq!(json["missing_sectors"], 4);
    assert_eq!(json["missing"][0]["write_id"], 3);
    assert_eq!(json["missing"][0]["found"]["kind"], "zero");
    let back: convoy_guest::VerifyReport = serde_json::from_value(json).unwrap();
    assert_eq!(back, report);
    let text = report.to_string();
    assert!(
        text.contains("FAILED") && text.contains("write 3"),
        "{text}"
    );
}

#[test]
fn empty_log_and_blank_copy_pass() {
    let copy = SimCopy::blank(&[DISK_SIZE]);
    let report = verify_prefix(VM, &[], &copy, &opts()).unwrap();
    assert!(report.ok());
    assert_eq!(report.prefix_upto, None);
    assert!(report.sectors_sampled > 0);
}

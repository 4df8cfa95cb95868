//! Unit and property tests of the model's commands and of `host_plan`.

use super::Strategy;
use super::*;
use proptest::prelude::{Strategy as _, *};

const MIB: u64 = 1 << 20;

fn ok(m: &mut ClusterModel, cmd: Command) -> Outcome {
    match m.apply(0, &cmd) {
        Ok(o) => o,
        Err(e) => panic!("{} refused: {e}", cmd.kind()),
    }
}

fn with_hosts(ids: &[NodeId]) -> ClusterModel {
    let mut m = ClusterModel::default();
    for &id in ids {
        ok(
            &mut m,
            Command::RegisterHost {
                id,
                raft_addr: format!("r{id}"),
                admin_addr: format!("a{id}"),
            },
        );
    }
    m
}

fn create_vm(name: &str, host: NodeId) -> Command {
    Command::CreateVm {
        name: name.into(),
        host,
        disk_sizes: vec![64 * MIB],
        workload: None,
        created_at_ms: 0,
    }
}

fn cg(name: &str, vms: &[&str]) -> Command {
    Command::CreateCg {
        name: name.into(),
        vms: vms.iter().map(|s| s.to_string()).collect(),
    }
}

fn add(cg: &str, to: NodeId, mode: ReplicationMode) -> Command {
    Command::AddReplica {
        cg: cg.into(),
        to,
        mode,
    }
}

fn link_state(cg: &str, to: NodeId, state: LinkState) -> Command {
    Command::SetLinkState {
        cg: cg.into(),
        to,
        state,
        expect: None,
    }
}

/// Hosts 1-3; VMs a, b on host 1 in group g, replicated to host 2 (consistent, given mode).
fn replicated(mode: ReplicationMode) -> ClusterModel {
    let mut m = with_hosts(&[1, 2, 3]);
    ok(&mut m, create_vm("a", 1));
    ok(&mut m, create_vm("b", 1));
    ok(&mut m, cg("g", &["a", "b"]));
    ok(&mut m, add("g", 2, mode));
    ok(&mut m, link_state("g", 2, LinkState::Consistent));
    m
}

#[test]
fn vm_lifecycle() {
    let mut m = with_hosts(&[1, 2]);
    let Outcome::Vm(vm, disks) = ok(&mut m, create_vm("web", 1)) else {
        panic!()
    };
    assert_eq!((vm.host, vm.stays.clone()), (1, vec![1]));
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].epoch, 1);
    assert!(matches!(
        m.apply(0, &create_vm("web", 2)),
        Err(ModelError::Exists { .. })
    ));
    ok(&mut m, Command::DeleteVm { name: "web".into() });
    assert!(m.vms.is_empty() && m.disks.is_empty());
    assert!(matches!(
        m.apply(0, &Command::DeleteVm { name: "web".into() }),
        Err(ModelError::NotFound { .. })
    ));
}

#[test]
fn issued_ids_tell_deleted_from_not_yet_seen() {
    let mut m = with_hosts(&[1]);
    assert!(!m.disk_id_issued(1), "nothing issued yet");
    let Outcome::Vm(_, disks) = ok(&mut m, create_vm("a", 1)) else {
        panic!()
    };
    let id = disks[0].id;
    let lagging = m.clone();
    ok(&mut m, Command::DeleteVm { name: "a".into() });
    ok(&mut m, create_vm("b", 1));
    assert!(m.disk_id_issued(id) && !m.disks.contains_key(&id));
    assert!(m.disk_id_issued(id + 1) && !lagging.disk_id_issued(id + 1));
    assert!(!m.disk_id_issued(0) && !m.disk_id_issued(id + 2));
    assert!(!m.cg_id_issued(1));
    ok(&mut m, cg("g", &["b"]));
    assert!(m.cg_id_issued(1) && !m.cg_id_issued(2));
    assert!(m.vm_id_issued(2) && !m.vm_id_issued(3));
}

#[test]
fn vm_needs_live_host_and_sane_disks() {
    let mut m = with_hosts(&[1]);
    assert!(matches!(
        m.apply(0, &create_vm("a", 9)),
        Err(ModelError::NotFound { .. })
    ));
    for sizes in [
        vec![1000],
        vec![],
        vec![MIB; MAX_DISKS_PER_VM + 1],
        vec![MAX_DISK_SIZE + 4096],
    ] {
        let bad = Command::CreateVm {
            name: "a".into(),
            host: 1,
            disk_sizes: sizes,
            workload: None,
            created_at_ms: 0,
        };
        assert!(matches!(m.apply(0, &bad), Err(ModelError::Invalid { .. })));
    }
    for name in ["bad name", "-x", ""] {
        assert!(matches!(
            m.apply(0, &create_vm(name, 1)),
            Err(ModelError::Invalid { .. })
        ));
    }
}

#[test]
fn host_ids_are_never_reused() {
    let mut m = with_hosts(&[1, 2]);
    ok(&mut m, Command::RetireHost { id: 2 });
    let again = Command::RegisterHost {
        id: 2,
        raft_addr: "r2".into(),
        admin_addr: "a2".into(),
    };
    assert_eq!(m.apply(0, &again), Err(ModelError::HostRetired(2)));
    let conflict = Command::RegisterHost {
        id: 1,
        raft_addr: "other".into(),
        admin_addr: "a1".into(),
    };
    assert_eq!(m.apply(0, &conflict), Err(ModelError::HostConflict(1)));
    let same = Command::RegisterHost {
        id: 1,
        raft_addr: "r1".into(),
        admin_addr: "a1".into(),
    };
    assert!(m.apply(0, &same).is_ok(), "re-registering is idempotent");
}

#[test]
fn hosts_in_use_cannot_retire() {
    let mut m = replicated(ReplicationMode::Async);
    for host in [1, 2] {
        assert!(matches!(
            m.apply(0, &Command::RetireHost { id: host }),
            Err(ModelError::InUse(_))
        ));
    }
    ok(&mut m, Command::RetireHost { id: 3 });
}

#[test]
fn cg_membership_rules() {
    let mut m = with_hosts(&[1, 2]);
    ok(&mut m, create_vm("a", 1));
    ok(&mut m, create_vm("b", 1));
    ok(&mut m, create_vm("c", 2));
    for bad in [cg("g", &["a", "c"]), cg("g", &["a", "a"]), cg("g", &[])] {
        assert!(matches!(m.apply(0, &bad), Err(ModelError::Invalid { .. })));
    }
    assert!(matches!(
        m.apply(0, &cg("g", &["zz"])),
        Err(ModelError::NotFound { .. })
    ));
    let Outcome::Cg(g) = ok(&mut m, cg("g", &["a", "b"])) else {
        panic!()
    };
    assert_eq!((g.sequencer, g.sequencer_epoch, g.seq_start), (1, 1, 0));
    assert!(matches!(
        m.apply(0, &cg("h", &["a"])),
        Err(ModelError::InUse(_))
    ));
    assert!(matches!(
        m.apply(0, &Command::DeleteVm { name: "a".into() }),
        Err(ModelError::InUse(_))
    ));
    ok(&mut m, Command::DeleteCg { name: "g".into() });
    assert_eq!(m.vms["a"].cg, None);
    ok(&mut m, Command::DeleteVm { name: "a".into() });
}

#[test]
fn replica_links_and_modes() {
    let mut m = with_hosts(&[1, 2, 3]);
    ok(&mut m, create_vm("a", 1));
    ok(&mut m, cg("g", &["a"]));
    assert!(matches!(
        m.apply(0, &add("g", 1, ReplicationMode::Async)),
        Err(ModelError::Invalid { .. })
    ));
    assert!(matches!(
        m.apply(0, &add("g", 9, ReplicationMode::Async)),
        Err(ModelError::NotFound { .. })
    ));
    ok(&mut m, add("g", 2, ReplicationMode::Async));
    assert_eq!(m.cgs["g"].replicas[0].state, LinkState::Syncing);
    assert!(matches!(
        m.apply(0, &add("g", 2, ReplicationMode::Sync)),
        Err(ModelError::Exists { .. })
    ));
    // A second copy must share the group's mode.
    assert!(matches!(
        m.apply(0, &add("g", 3, ReplicationMode::Sync)),
        Err(ModelError::Invalid { .. })
    ));
    ok(&mut m, add("g", 3, ReplicationMode::Async));
    ok(
        &mut m,
        Command::SetMode {
            cg: "g".into(),
            mode: ReplicationMode::Sync,
        },
    );
    assert!(
        m.cgs["g"]
            .replicas
            .iter()
            .all(|l| l.mode == ReplicationMode::Sync)
    );
    ok(&mut m, link_state("g", 2, LinkState::Consistent));
    ok(
        &mut m,
        Command::RemoveReplica {
            cg: "g".into(),
            to: 3,
        },
    );
    ok(
        &mut m,
        Command::RemoveReplica {
            cg: "g".into(),
            to: 2,
        },
    );
    assert!(m.cgs["g"].replicas.is_empty());
    assert!(matches!(
        m.apply(
            0,
            &Command::SetMode {
                cg: "g".into(),
                mode: ReplicationMode::Async
            }
        ),
        Err(ModelError::Invalid { .. })
    ));
    for text in ["async", "sync", "active-active-sync", "active-active-async"] {
        assert_eq!(ReplicationMode::parse(text).unwrap().as_str(), text);
    }
    assert!(ReplicationMode::parse("fast").is_err());
}

#[test]
fn link_state_compare_and_set_refuses_a_stale_view() {
    let mut m = replicated(ReplicationMode::Sync);
    let outdate = Command::SetLinkState {
        cg: "g".into(),
        to: 2,
        state: LinkState::Outdated,
        expect: Some(LinkState::Consistent),
    };
    ok(&mut m, outdate.clone());
    assert!(matches!(m.apply(0, &outdate), Err(ModelError::Stale(_))));
    assert_eq!(m.cgs["g"].replicas[0].state, LinkState::Outdated);
}

#[test]
fn a_link_report_for_a_deleted_group_is_refused_by_the_group_that_took_its_name() {
    let mut m = replicated(ReplicationMode::Sync);
    let old = m.cgs["g"].clone();
    ok(&mut m, Command::DeleteCg { name: "g".into() });
    ok(&mut m, cg("g", &["a", "b"]));
    ok(&mut m, add("g", 2, ReplicationMode::Sync));
    let new = m.cgs["g"].clone();
    assert_ne!(new.id, old.id);
    // Same name, host and sequencer epoch: only the id tells the groups apart.
    assert_eq!(
        (new.sequencer, new.sequencer_epoch),
        (old.sequencer, old.sequencer_epoch)
    );
    assert_eq!(new.replicas[0].state, LinkState::Syncing);
    let report = |cg_id| Command::ReportGroupLinkState {
        cg: "g".into(),
        cg_id,
        from: old.sequencer,
        sequencer_epoch: old.sequencer_epoch,
        to: 2,
        state: LinkState::Consistent,
        expect: Some(LinkState::Syncing),
    };
    // The old group's sender, a moment late, would promote the new group's copy that
    // holds nothing yet.
    assert!(matches!(
        m.apply(0, &report(old.id)),
        Err(ModelError::Stale(_))
    ));
    assert_eq!(m.cgs["g"].replicas[0].state, LinkState::Syncing);
    // The new group's own report applies.
    ok(&mut m, report(new.id));
    assert_eq!(m.cgs["g"].replicas[0].state, LinkState::Consistent);
}

#[test]
fn a_link_report_from_a_sequencer_that_lost_the_order_is_refused() {
    let mut m = replicated(ReplicationMode::Sync);
    ok(&mut m, add("g", 3, ReplicationMode::Sync));
    ok(&mut m, link_state("g", 3, LinkState::Consistent));
    let report = |from, epoch, to| Command::ReportLinkState {
        cg: "g".into(),
        from,
        sequencer_epoch: epoch,
        to,
        state: LinkState::Outdated,
        expect: None,
    };
    let epoch = m.cgs["g"].sequencer_epoch;
    // The order moves to host 2 (a hand-over host 1 missed, frozen).
    ok(
        &mut m,
        Command::SetSequencer {
            cg: "g".into(),
            to: 2,
            continue_at: 10,
            expect_sequencer: 1,
            old_link_mode: Some(ReplicationMode::Sync),
        },
    );
    // Host 1 wakes and tries to outdate host 3's copy to acknowledge a write without it.
    assert!(matches!(
        m.apply(0, &report(1, epoch, 3)),
        Err(ModelError::Stale(_))
    ));
    // The order comes back to host 1: its old tenure still may not speak.
    ok(
        &mut m,
        Command::SetSequencer {
            cg: "g".into(),
            to: 1,
            continue_at: 20,
            expect_sequencer: 2,
            old_link_mode: Some(ReplicationMode::Sync),
        },
    );
    assert!(matches!(
        m.apply(0, &report(1, epoch, 3)),
        Err(ModelError::Stale(_))
    ));
    assert_eq!(
        m.cgs["g"].link(3).map(|l| l.state),
        Some(LinkState::Consistent)
    );
    // The current tenure may.
    let now = m.cgs["g"].sequencer_epoch;
    ok(&mut m, report(1, now, 3));
    assert_eq!(
        m.cgs["g"].link(3).map(|l| l.state),
        Some(LinkState::Outdated)
    );
}

#[test]
fn snapshots_running_flag_and_group_fence() {
    let mut m = with_hosts(&[1]);
    ok(&mut m, create_vm("a", 1));
    assert!(matches!(
        m.apply(
            0,
            &Command::SetVmRunning {
                name: "a".into(),
                running: true
            }
        ),
        Err(ModelError::Invalid { .. })
    ));
    ok(&mut m, cg("g", &["a"]));
    let snap = |name: &str| Command::CreateSnapshot {
        cg: "g".into(),
        name: name.into(),
        created_at_ms: 5,
    };
    ok(&mut m, snap("s1"));
    assert!(matches!(
        m.apply(0, &snap("s1")),
        Err(ModelError::Exists { .. })
    ));
    assert_eq!(m.cgs["g"].snapshots[0].host, 1);
    ok(
        &mut m,
        Command::DeleteSnapshot {
            cg: "g".into(),
            name: "s1".into(),
        },
    );
    assert!(m.cgs["g"].snapshots.is_empty());
    ok(&mut m, Command::BumpEpoch { cg: "g".into() });
    let g = m.cgs["g"].clone();
    assert_eq!(g.sequencer_epoch, 2);
    assert!(m.cg_disks(&g).iter().all(|d| d.epoch == 2));
}

#[test]
fn fencing_one_vm_moves_only_its_disks_epochs() {
    let mut m = replicated(ReplicationMode::Async);
    ok(&mut m, Command::FenceVm { name: "a".into() });
    let g = m.cgs["g"].clone();
    let epochs: Vec<(String, u64)> = m
        .cg_disks(&g)
        .iter()
        .map(|d| (d.vm.clone(), d.epoch))
        .collect();
    assert_eq!(epochs, vec![("a".into(), 2), ("b".into(), 1)]);
    assert_eq!(g.sequencer_epoch, 1, "the group's order is not fenced");
}

#[test]
fn a_vm_moves_only_to_a_consistent_copy_and_fences_its_disks() {
    let mut m = replicated(ReplicationMode::Sync);
    let mv = |to, expect| Command::MoveVm {
        name: "a".into(),
        to,
        expect_host: expect,
    };
    // Host 3 holds no copy; host 1 is where it runs.
    assert!(matches!(
        m.apply(0, &mv(3, None)),
        Err(ModelError::Invalid { .. })
    ));
    assert!(matches!(
        m.apply(0, &mv(1, None)),
        Err(ModelError::Invalid { .. })
    ));
    assert!(matches!(
        m.apply(0, &mv(2, Some(3))),
        Err(ModelError::Stale(_))
    ));
    let Outcome::Vm(vm, disks) = ok(&mut m, mv(2, Some(1))) else {
        panic!()
    };
    assert_eq!((vm.host, vm.stays.clone(), vm.stay()), (2, vec![1, 2], 1));
    assert_eq!(disks[0].epoch, 2);
    assert_eq!(m.disks[&m.vms["b"].disks[0]].epoch, 1, "b is untouched");
    // Back to the sequencer: always allowed.
    ok(&mut m, mv(1, Some(2)));
    assert_eq!(m.vms["a"].stays, vec![1, 2, 1]);
    // Not to a copy that is not a consistent prefix.
    ok(&mut m, link_state("g", 2, LinkState::Outdated));
    assert!(matches!(
        m.apply(0, &mv(2, None)),
        Err(ModelError::Invalid { .. })
    ));
    // A VM in no group has no copy anywhere else.
    ok(&mut m, create_vm("lone", 1));
    assert!(matches!(
        m.apply(
            0,
            &Command::MoveVm {
                name: "lone".into(),
                to: 2,
                expect_host: None
            }
        ),
        Err(ModelError::Invalid { .. })
    ));
}

#[test]
fn a_copy_that_a_vm_writes_through_cannot_be_removed_nor_its_group_deleted() {
    let mut m = replicated(ReplicationMode::Async);
    ok(
        &mut m,
        Command::MoveVm {
            name: "a".into(),
            to: 2,
            expect_host: None,
        },
    );
    assert!(matches!(
        m.apply(
            0,
            &Command::RemoveReplica {
                cg: "g".into(),
                to: 2
            }
        ),
        Err(ModelError::InUse(_))
    ));
    assert!(matches!(
        m.apply(0, &Command::DeleteCg { name: "g".into() }),
        Err(ModelError::InUse(_))
    ));
}

#[test]
fn sequencer_hand_over_swaps_roles_and_continues_the_sequence() {
    let mut m = replicated(ReplicationMode::Sync);
    let hand = |to, expect, at| Command::SetSequencer {
        cg: "g".into(),
        to,
        continue_at: at,
        expect_sequencer: expect,
        old_link_mode: Some(ReplicationMode::Sync),
    };
    assert!(matches!(
        m.apply(0, &hand(2, 2, 10)),
        Err(ModelError::Stale(_))
    ));
    assert!(matches!(
        m.apply(0, &hand(3, 1, 10)),
        Err(ModelError::Invalid { .. })
    ));
    assert!(matches!(
        m.apply(0, &hand(2, 1, 0)),
        Err(ModelError::Invalid { .. })
    ));
    let Outcome::Cg(g) = ok(&mut m, hand(2, 1, 10)) else {
        panic!()
    };
    assert_eq!((g.sequencer, g.sequencer_epoch, g.seq_start), (2, 2, 10));
    assert_eq!(
        g.replicas,
        vec![ReplicationLink {
            to: 1,
            mode: ReplicationMode::Sync,
            state: LinkState::Consistent
        }]
    );
    // VMs stay where they run; their writes now go to the new sequencer.
    assert!(m.vms.values().all(|v| v.host == 1));
    let Outcome::Cg(g) = ok(&mut m, hand(1, 2, 99)) else {
        panic!()
    };
    assert_eq!((g.sequencer, g.sequencer_epoch, g.seq_start), (1, 3, 99));
    assert_eq!(g.replicas[0].to, 2);
    // Without a mode the old sequencer's copy is dropped.
    let Outcome::Cg(g) = ok(
        &mut m,
        Command::SetSequencer {
            cg: "g".into(),
            to: 2,
            continue_at: 200,
            expect_sequencer: 1,
            old_link_mode: None,
        },
    ) else {
        panic!()
    };
    assert!(g.replicas.is_empty());
}

// ---- migrations ----

/// Group g (VMs a, b on host 1) with an async copy on host 2 and migration 1 of it to
/// host 2, coordinated by host 3 under claim 1.
fn migrating(strategy: Strategy) -> ClusterModel {
    let mut m = replicated(ReplicationMode::Async);
    ok(
        &mut m,
        Command::StartMigration {
            cg: "g".into(),
            to: 2,
            strategy,
            coordinator: 3,
            started_at_ms: 100,
            deadline_ms: 10_000,
        },
    );
    m
}

#[test]
fn a_migration_keeps_its_qemu_settings_and_each_guests_live_move_once() {
    let mut m = replicated(ReplicationMode::Async);
    let start = |live| Command::StartMigrationWithSettings {
        cg: "g".into(),
        to: 2,
        strategy: Strategy::ReverseReplication,
        coordinator: 3,
        started_at_ms: 100,
        deadline_ms: 10_000,
        live,
    };
    let zero = LiveSettings {
        downtime_limit_ms: Some(0),
        ..LiveSettings::default()
    };
    assert!(matches!(
        m.apply(0, &start(zero)),
        Err(ModelError::Invalid { .. })
    ));
    assert!(m.migrations.is_empty());
    let live = LiveSettings {
        downtime_limit_ms: Some(50),
        max_bandwidth_mib: Some(100),
        auto_converge: Some(false),
    };
    ok(&mut m, start(live));
    assert_eq!(m.migrations[&1].live, live);
    let moved = |ms| Command::RecordLiveMove {
        id: 1,
        live: LiveMove {
            vm: "a".into(),
            downtime_ms: ms,
            total_ms: 700,
            ram_bytes: 1 << 20,
        },
        node: 2,
        at_ms: 200,
    };
    ok(&mut m, moved(27));
    // A report sent again (a retried request) does not count the move twice.
    ok(&mut m, moved(28));
    let mig = &m.migrations[&1];
    assert_eq!(mig.stats.live_moves.len(), 1);
    assert_eq!(mig.stats.live_moves[0].downtime_ms, 27);
    let noted: Vec<&str> = mig
        .timeline
        .iter()
        .filter(|t| t.note.contains("live migration"))
        .map(|t| t.note.as_str())
        .collect();
    assert_eq!(
        noted,
        [
            "a arrived on node 2 by QEMU live migration: downtime 27 ms, total 700 ms, 1048576 bytes of memory sent"
        ]
    );
    assert!(matches!(
        m.apply(
            0,
            &Command::RecordLiveMove {
                id: 9,
                live: LiveMove {
                    vm: "a".into(),
                    downtime_ms: 1,
                    total_ms: 1,
                    ram_bytes: 1,
                },
                node: 2,
                at_ms: 200,
            }
        ),
        Err(ModelError::NotFound { .. })
    ));
}

fn advance(claim: u64, from: Phase, to: Phase) -> Command {
    Command::AdvanceMigration {
        id: 1,
        claim,
        from,
        to,
        at_ms: 200,
        note: "x".into(),
        progress: Progress::default(),
    }
}

fn step(claim: u64, phase: Phase, command: Command) -> Command {
    Command::MigrationStep {
        id: 1,
        claim,
        phase,
        at_ms: 300,
        command: Box::new(command),
    }
}

fn move_to(vm: &str, to: NodeId) -> Command {
    Command::MoveVm {
        name: vm.into(),
        to,
        expect_host: None,
    }
}

/// Equal (or, with `differ`, unequal) roots for every disk of g.
fn roots(m: &ClusterModel, differ: bool) -> Vec<DiskRoots> {
    m.cg_disks(&m.cgs["g"])
        .iter()
        .map(|d| DiskRoots {
            disk: d.id,
            source: Some([d.id as u8; 32]),
            destination: [if differ { 99 } else { d.id as u8 }; 32],
        })
        .collect()
}

fn sequencer(claim: u64, phase: Phase, to: NodeId, basis: SequencerBasis) -> Command {
    Command::MigrationSequencer {
        id: 1,
        claim,
        phase,
        to,
        continue_at: 50,
        basis,
        at_ms: 400,
    }
}

fn decide(claim: u64, decision: Decision, roots: Vec<DiskRoots>) -> Command {
    Command::DecideMigration {
        id: 1,
        claim,
        record: DecisionRecord {
            decision,
            at_ms: 500,
            reason: "r".into(),
            roots,
        },
    }
}

fn refused(m: &mut ClusterModel, cmd: Command) -> ModelError {
    let before = m.topology();
    match m.apply(0, &cmd) {
        Ok(_) => panic!("{} was applied", cmd.kind()),
        Err(e) => {
            assert_eq!(
                m.topology(),
                before,
                "a refused {} changed the model",
                cmd.kind()
            );
            e
        }
    }
}

#[test]
fn a_reverse_replication_migration_is_claimed_advanced_cut_over_and_decided_once() {
    let mut m = migrating(Strategy::ReverseReplication);
    let mig = &m.migrations[&1];
    assert_eq!(
        (
            mig.from,
            mig.phase,
            mig.claim.number,
            mig.destination_had_copy
        ),
        (1, Phase::Planned, 1, true)
    );
    assert_eq!(mig.prior_mode, Some(ReplicationMode::Async));
    ok(
        &mut m,
        Command::ClaimMigration {
            id: 1,
            node: 2,
            expect_claim: 1,
            at_ms: 150,
        },
    );
    ok(&mut m, advance(2, Phase::Planned, Phase::Preparing));
    ok(
        &mut m,
        step(
            2,
            Phase::Preparing,
            Command::SetMode {
                cg: "g".into(),
                mode: ReplicationMode::Sync,
            },
        ),
    );
    ok(&mut m, advance(2, Phase::Preparing, Phase::Moving));
    ok(&mut m, step(2, Phase::Moving, move_to("a", 2)));
    ok(&mut m, step(2, Phase::Moving, move_to("b", 2)));
    ok(&mut m, advance(2, Phase::Moving, Phase::CuttingOver));
    let r = roots(&m, false);
    ok(
        &mut m,
        sequencer(
            2,
            Phase::CuttingOver,
            2,
            SequencerBasis::HandOver {
                roots: r.clone(),
                old_link_mode: Some(ReplicationMode::Sync),
            },
        ),
    );
    let mig = &m.migrations[&1];
    assert_eq!(
        mig.phase,
        Phase::Verifying,
        "the cut-over entry moves the phase"
    );
    assert_eq!(mig.stats.cutover_roots, r);
    assert_eq!((m.cgs["g"].sequencer, m.cgs["g"].seq_start), (2, 50));
    ok(&mut m, decide(2, Decision::Committed, r.clone()));
    assert!(matches!(
        refused(&mut m, decide(2, Decision::FailedBack, vec![])),
        ModelError::Stale(_)
    ));
    let mig = &m.migrations[&1];
    assert_eq!(mig.phase, Phase::Done);
    assert_eq!(
        mig.decision.as_ref().map(|d| d.decision),
        Some(Decision::Committed)
    );
    // The decision restored the previous mode with the roles swapped.
    let g = &m.cgs["g"];
    assert_eq!(
        g.replicas,
        vec![ReplicationLink {
            to: 1,
            mode: ReplicationMode::Async,
            state: LinkState::Consistent
        }]
    );
    // A decided migration no longer blocks a new one, nor takes steps.
    assert!(matches!(
        refused(&mut m, step(2, Phase::Done, move_to("a", 1))),
        ModelError::Stale(_)
    ));
    ok(
        &mut m,
        Command::StartMigration {
            cg: "g".into(),
            to: 1,
            strategy: Strategy::CompareDelta,
            coordinator: 1,
            started_at_ms: 500,
            deadline_ms: 900,
        },
    );
}

#[test]
fn a_stale_claim_or_phase_or_a_foreign_target_changes_nothing() {
    let mut m = migrating(Strategy::ReverseReplication);
    ok(&mut m, advance(1, Phase::Planned, Phase::Preparing));
    ok(&mut m, advance(1, Phase::Preparing, Phase::Moving));
    ok(
        &mut m,
        Command::ClaimMigration {
            id: 1,
            node: 1,
            expect_claim: 1,
            at_ms: 150,
        },
    );
    // The old coordinator (claim 1) is refused, for steps and phase changes alike.
    for cmd in [
        step(1, Phase::Moving, move_to("a", 2)),
        advance(1, Phase::Moving, Phase::CuttingOver),
        decide(1, Decision::FailedBack, vec![]),
    ] {
        assert!(matches!(refused(&mut m, cmd), ModelError::Stale(_)));
    }
    // A step for a phase the migration is not in is refused.
    assert!(matches!(
        refused(&mut m, step(2, Phase::Preparing, move_to("a", 2))),
        ModelError::Stale(_)
    ));
    // Only the migration's group, hosts and kinds of change.
    ok(&mut m, create_vm("x", 3));
    for cmd in [
        move_to("a", 3),
        move_to("x", 1),
        Command::AddReplica {
            cg: "g".into(),
            to: 3,
            mode: ReplicationMode::Async,
        },
        Command::BumpEpoch { cg: "g".into() },
        Command::CreateSnapshot {
            cg: "g".into(),
            name: "mine".into(),
            created_at_ms: 0,
        },
    ] {
        assert!(matches!(
            refused(&mut m, step(2, Phase::Moving, cmd)),
            ModelError::Invalid { .. }
        ));
    }
    ok(&mut m, step(2, Phase::Moving, move_to("a", 2)));
    assert_eq!(m.vms["a"].host, 2);
}

#[test]
fn phases_follow_the_strategy_path_and_turn_back_only_before_the_decision() {
    let mut m = migrating(Strategy::ReverseReplication);
    // Forward, skipping allowed; never backwards.
    assert!(matches!(
        refused(&mut m, advance(1, Phase::Planned, Phase::Done)),
        ModelError::Invalid { .. }
    ));
    ok(&mut m, advance(1, Phase::Planned, Phase::Moving));
    assert!(matches!(
        refused(&mut m, advance(1, Phase::Moving, Phase::Preparing)),
        ModelError::Invalid { .. }
    ));
    let back = Phase::FailingBack(FailBackCause::Deadline);
    ok(&mut m, advance(1, Phase::Moving, back));
    // Failing back never turns forward again, but may roll forward.
    assert!(matches!(
        refused(&mut m, advance(1, back, Phase::CuttingOver)),
        ModelError::Invalid { .. }
    ));
    assert!(matches!(
        refused(
            &mut m,
            advance(1, back, Phase::FailingBack(FailBackCause::Abort))
        ),
        ModelError::Invalid { .. }
    ));
    ok(&mut m, advance(1, back, Phase::RollingForward));
    assert!(matches!(
        refused(&mut m, advance(1, Phase::RollingForward, back)),
        ModelError::Invalid { .. }
    ));
    // break-consistency cuts over before it moves.
    let mut bc = migrating(Strategy::BreakConsistency);
    ok(&mut bc, advance(1, Phase::Planned, Phase::Preparing));
    ok(&mut bc, advance(1, Phase::Preparing, Phase::CuttingOver));
    assert!(matches!(
        refused(&mut bc, advance(1, Phase::CuttingOver, Phase::Preparing)),
        ModelError::Invalid { .. }
    ));
    ok(&mut bc, advance(1, Phase::CuttingOver, Phase::Moving));
}

#[test]
fn abort_turns_an_undecided_migration_to_failing_back_whoever_coordinates_it() {
    let mut m = migrating(Strategy::ReverseReplication);
    ok(&mut m, advance(1, Phase::Planned, Phase::Moving));
    let abort = Command::AbortMigration {
        id: 1,
        at_ms: 250,
        reason: "operator".into(),
    };
    ok(&mut m, abort.clone());
    assert_eq!(
        m.migrations[&1].phase,
        Phase::FailingBack(FailBackCause::Abort)
    );
    // The coordinator's next step, made for the phase it saw, is refused.
    assert!(matches!(
        refused(&mut m, step(1, Phase::Moving, move_to("a", 2))),
        ModelError::Stale(_)
    ));
    // Asking again is harmless.
    ok(&mut m, abort.clone());
    ok(&mut m, decide(1, Decision::FailedBack, vec![]));
    assert!(matches!(refused(&mut m, abort), ModelError::Stale(_)));

    let mut m = migrating(Strategy::ReverseReplication);
    ok(&mut m, advance(1, Phase::Planned, Phase::RollingForward));
    assert!(matches!(
        refused(
            &mut m,
            Command::AbortMigration {
                id: 1,
                at_ms: 1,
                reason: "late".into()
            }
        ),
        ModelError::InUse(_)
    ));
}

#[test]
fn committed_needs_the_cutover_roots_the_order_and_every_vm_at_the_destination() {
    let mut m = migrating(Strategy::ReverseReplication);
    ok(&mut m, advance(1, Phase::Planned, Phase::Moving));
    let r = roots(&m, false);
    // Not from moving, however good the roots.
    assert!(matches!(
        refused(&mut m, decide(1, Decision::Committed, r.clone())),
        ModelError::Stale(_)
    ));
    ok(&mut m, step(1, Phase::Moving, move_to("a", 2)));
    ok(&mut m, advance(1, Phase::Moving, Phase::CuttingOver));
    // Unequal roots: the hand-over must not happen.
    let bad = roots(&m, true);
    assert!(matches!(
        refused(
            &mut m,
            sequencer(
                1,
                Phase::CuttingOver,
                2,
                SequencerBasis::HandOver {
                    roots: bad,
                    old_link_mode: Some(ReplicationMode::Sync)
                }
            )
        ),
        ModelError::Invalid { .. }
    ));
    // Roots for only some disks are not a proof either.
    assert!(matches!(
        refused(
            &mut m,
            sequencer(
                1,
                Phase::CuttingOver,
                2,
                SequencerBasis::HandOver {
                    roots: r[..1].to_vec(),
                    old_link_mode: Some(ReplicationMode::Sync)
                }
            )
        ),
        ModelError::Invalid { .. }
    ));
    ok(
        &mut m,
        sequencer(
            1,
            Phase::CuttingOver,
            2,
            SequencerBasis::HandOver {
                roots: r.clone(),
                old_link_mode: Some(ReplicationMode::Sync),
            },
        ),
    );
    // VM b still runs on the source.
    assert!(matches!(
        refused(&mut m, decide(1, Decision::Committed, r.clone())),
        ModelError::Invalid { .. }
    ));
    ok(&mut m, step(1, Phase::Verifying, move_to("b", 2)));
    // Roots other than the recorded ones.
    let mut other = r.clone();
    other[0].source = Some([7; 32]);
    other[0].destination = [7; 32];
    assert!(matches!(
        refused(&mut m, decide(1, Decision::Committed, other)),
        ModelError::Invalid { .. }
    ));
    ok(&mut m, decide(1, Decision::Committed, r));
}

#[test]
fn failed_back_drops_a_copy_the_migration_created_and_restores_the_mode() {
    let mut m = with_hosts(&[1, 2, 3]);
    ok(&mut m, create_vm("a", 1));
    ok(&mut m, cg("g", &["a"]));
    ok(
        &mut m,
        Command::StartMigration {
            cg: "g".into(),
            to: 2,
            strategy: Strategy::SyncSwitch {
                active_active: true,
            },
            coordinator: 1,
            started_at_ms: 0,
            deadline_ms: 10,
        },
    );
    assert!(!m.migrations[&1].destination_had_copy);
    ok(&mut m, advance(1, Phase::Planned, Phase::Preparing));
    ok(
        &mut m,
        step(
            1,
            Phase::Preparing,
            add("g", 2, ReplicationMode::ActiveActiveSync),
        ),
    );
    ok(&mut m, link_state("g", 2, LinkState::Consistent));
    ok(&mut m, advance(1, Phase::Preparing, Phase::Moving));
    ok(&mut m, step(1, Phase::Moving, move_to("a", 2)));
    let back = Phase::FailingBack(FailBackCause::DestinationLost);
    ok(&mut m, advance(1, Phase::Moving, back));
    // Not while a VM still runs on the destination.
    assert!(matches!(
        refused(&mut m, decide(1, Decision::FailedBack, vec![])),
        ModelError::Invalid { .. }
    ));
    ok(&mut m, step(1, back, move_to("a", 1)));
    ok(&mut m, decide(1, Decision::FailedBack, vec![]));
    assert!(
        m.cgs["g"].replicas.is_empty(),
        "the copy it created is dropped"
    );

    // A destination that had a copy keeps it, in the previous mode.
    let mut m = migrating(Strategy::SyncSwitch {
        active_active: false,
    });
    ok(&mut m, advance(1, Phase::Planned, Phase::Preparing));
    ok(
        &mut m,
        step(
            1,
            Phase::Preparing,
            Command::SetMode {
                cg: "g".into(),
                mode: ReplicationMode::Sync,
            },
        ),
    );
    ok(
        &mut m,
        advance(
            1,
            Phase::Preparing,
            Phase::FailingBack(FailBackCause::Abort),
        ),
    );
    ok(&mut m, decide(1, Decision::FailedBack, vec![]));
    assert_eq!(m.cgs["g"].replicas[0].mode, ReplicationMode::Async);
    assert_eq!(m.cgs["g"].replicas[0].to, 2);
}

#[test]
fn take_over_needs_a_synchronous_destination_the_migration_saw_complete() {
    let mut m = migrating(Strategy::ReverseReplication);
    ok(&mut m, advance(1, Phase::Planned, Phase::Preparing));
    ok(
        &mut m,
        step(
            1,
            Phase::Preparing,
            Command::SetMode {
                cg: "g".into(),
                mode: ReplicationMode::Sync,
            },
        ),
    );
    ok(&mut m, advance(1, Phase::Preparing, Phase::RollingForward));
    // Synchronous and consistent, but never seen caught up: it may lack writes
    // acknowledged while the link was still asynchronous.
    assert!(matches!(
        refused(
            &mut m,
            sequencer(1, Phase::RollingForward, 2, SequencerBasis::TakeOver)
        ),
        ModelError::Invalid { .. }
    ));
    let mut m = migrating(Strategy::ReverseReplication);
    ok(&mut m, advance(1, Phase::Planned, Phase::Preparing));
    ok(
        &mut m,
        step(
            1,
            Phase::Preparing,
            Command::SetMode {
                cg: "g".into(),
                mode: ReplicationMode::Sync,
            },
        ),
    );
    ok(
        &mut m,
        Command::AdvanceMigration {
            id: 1,
            claim: 1,
            from: Phase::Preparing,
            to: Phase::Moving,
            at_ms: 220,
            note: "caught up".into(),
            progress: Progress {
                destination_complete: true,
                ..Progress::default()
            },
        },
    );
    assert_eq!(m.migrations[&1].stats.destination_complete_at_ms, Some(220));
    ok(&mut m, step(1, Phase::Moving, move_to("a", 2)));
    ok(&mut m, step(1, Phase::Moving, move_to("b", 2)));
    ok(&mut m, advance(1, Phase::Moving, Phase::RollingForward));
    ok(
        &mut m,
        sequencer(1, Phase::RollingForward, 2, SequencerBasis::TakeOver),
    );
    let g = &m.cgs["g"];
    assert_eq!((g.sequencer, g.seq_start), (2, 50));
    assert_eq!(g.link(1).map(|l| l.state), Some(LinkState::Outdated));
    // No cut-over happened: committed on the destination's roots alone.
    let mut alone = roots(&m, false);
    assert!(matches!(
        refused(&mut m, decide(1, Decision::Committed, alone.clone())),
        ModelError::Invalid { .. }
    ));
    for r in &mut alone {
        r.source = None;
    }
    ok(&mut m, decide(1, Decision::Committed, alone));
}

#[test]
fn handing_the_order_back_over_a_synchronous_link_records_the_destination_complete() {
    let mut m = migrating(Strategy::ReverseReplication);
    ok(&mut m, advance(1, Phase::Planned, Phase::CuttingOver));
    let r = roots(&m, false);
    let hand = |phase, to, mode| {
        sequencer(
            1,
            phase,
            to,
            SequencerBasis::HandOver {
                roots: r.clone(),
                old_link_mode: Some(mode),
            },
        )
    };
    ok(&mut m, hand(Phase::CuttingOver, 2, ReplicationMode::Sync));
    assert_eq!(m.migrations[&1].stats.destination_complete_at_ms, None);
    let back = Phase::FailingBack(FailBackCause::Abort);
    ok(&mut m, advance(1, Phase::Verifying, back));
    ok(&mut m, hand(back, 1, ReplicationMode::Sync));
    assert_eq!(m.migrations[&1].stats.destination_complete_at_ms, Some(400));
    // So the destination may take the order if the source is lost now.
    ok(&mut m, advance(1, back, Phase::RollingForward));
    ok(
        &mut m,
        sequencer(1, Phase::RollingForward, 2, SequencerBasis::TakeOver),
    );
    assert_eq!(m.cgs["g"].sequencer, 2);
}

#[test]
fn break_consistency_returns_the_order_to_its_snapshot_only_when_failing_back() {
    let mut m = migrating(Strategy::BreakConsistency);
    ok(&mut m, advance(1, Phase::Planned, Phase::Preparing));
    ok(
        &mut m,
        step(
            1,
            Phase::Preparing,
            Command::CreateSnapshot {
                cg: "g".into(),
                name: "migration-1".into(),
                created_at_ms: 210,
            },
        ),
    );
    ok(&mut m, advance(1, Phase::Preparing, Phase::CuttingOver));
    let r = roots(&m, false);
    ok(
        &mut m,
        sequencer(
            1,
            Phase::CuttingOver,
            2,
            SequencerBasis::HandOver {
                roots: r,
                old_link_mode: None,
            },
        ),
    );
    assert_eq!(m.migrations[&1].phase, Phase::Moving);
    assert!(
        m.cgs["g"].replicas.is_empty(),
        "nothing flows back to the source"
    );
    let snap = || SequencerBasis::Snapshot {
        name: "migration-1".into(),
    };
    assert!(matches!(
        refused(&mut m, sequencer(1, Phase::Moving, 1, snap())),
        ModelError::Invalid { .. }
    ));
    let back = Phase::FailingBack(FailBackCause::DestinationLost);
    ok(&mut m, advance(1, Phase::Moving, back));
    assert!(matches!(
        refused(
            &mut m,
            sequencer(
                1,
                back,
                1,
                SequencerBasis::Snapshot {
                    name: "other".into()
                }
            )
        ),
        ModelError::Invalid { .. }
    ));
    ok(&mut m, sequencer(1, back, 1, snap()));
    let g = &m.cgs["g"];
    assert_eq!((g.sequencer, g.seq_start), (1, 50));
    assert_eq!(g.link(2).map(|l| l.state), Some(LinkState::Outdated));
    ok(&mut m, decide(1, Decision::FailedBack, vec![]));
    assert!(
        m.cgs["g"].snapshots.is_empty(),
        "the fail-back snapshot is forgotten"
    );
}

#[test]
fn retried_request_returns_first_answer() {
    let mut m = with_hosts(&[1]);
    let first = m.apply(42, &create_vm("a", 1)).unwrap();
    assert_eq!(m.apply(42, &create_vm("a", 1)).unwrap(), first);
    assert_eq!(m.vms.len(), 1);
    assert!(matches!(
        m.apply(43, &create_vm("a", 1)),
        Err(ModelError::Exists { .. })
    ));
}

#[test]
fn dedup_window_is_bounded() {
    let mut m = with_hosts(&[1]);
    for i in 1..=(DEDUP_WINDOW as u128 + 10) {
        let _ = m.apply(
            i,
            &Command::DeleteVm {
                name: "none".into(),
            },
        );
    }
    assert_eq!(m.dedup.order.len(), DEDUP_WINDOW);
    assert_eq!(m.dedup.answers.len(), DEDUP_WINDOW);
}

// ---- host_plan ----

/// Sequenced domains, replicated groups, exports (disk, local?) and guests of a plan.
type PlanSummary = (Vec<DomainId>, Vec<u64>, Vec<(DiskId, bool)>, Vec<String>);

fn plan_summary(m: &ClusterModel, host: NodeId) -> PlanSummary {
    let p = host_plan(m, host);
    (
        p.sequencers.keys().copied().collect(),
        p.replicas.keys().copied().collect(),
        p.exports
            .iter()
            .map(|(d, e)| (*d, matches!(e.kind, ExportKind::Local { .. })))
            .collect(),
        p.guests.keys().cloned().collect(),
    )
}

#[test]
fn plan_of_a_lone_vm_host_sequences_and_exports_it_locally() {
    let mut m = with_hosts(&[1, 2]);
    ok(
        &mut m,
        Command::CreateVm {
            name: "sim".into(),
            host: 1,
            disk_sizes: vec![MIB, 2 * MIB],
            workload: Some("iops=10".into()),
            created_at_ms: 0,
        },
    );
    ok(
        &mut m,
        Command::SetVmRunning {
            name: "sim".into(),
            running: true,
        },
    );
    let p = host_plan(&m, 1);
    assert_eq!(
        p.sequencers.keys().copied().collect::<Vec<_>>(),
        vec![DomainId::Vm(1)]
    );
    assert_eq!(p.sequencers[&DomainId::Vm(1)].name, "vm:sim");
    assert_eq!(p.exports.len(), 2);
    assert!(p.exports.values().all(|e| e.kind
        == ExportKind::Local {
            domain: DomainId::Vm(1)
        }));
    assert_eq!(p.guests["sim"].disks.len(), 2);
    assert_eq!(p.images(), [(1, MIB), (2, 2 * MIB)].into());
    assert_eq!(
        host_plan(&m, 2),
        HostPlan {
            host: 2,
            ..HostPlan::default()
        }
    );
}

#[test]
fn plan_of_sequencer_replica_and_bystander_in_each_mode() {
    for mode in [
        ReplicationMode::Async,
        ReplicationMode::Sync,
        ReplicationMode::ActiveActiveSync,
        ReplicationMode::ActiveActiveAsync,
    ] {
        let m = replicated(mode);
        let (seq, rep, exp, _) = plan_summary(&m, 1);
        assert_eq!((seq, rep), (vec![DomainId::Cg(1)], vec![]), "{mode:?}");
        assert_eq!(exp, vec![(1, true), (2, true)], "{mode:?}");
        let p2 = host_plan(&m, 2);
        assert!(p2.sequencers.is_empty());
        assert_eq!(p2.replicas[&1].sequencer, 1);
        assert_eq!(p2.replicas[&1].mode, mode);
        // Only an active-active copy is writable where no VM of the group runs.
        if mode.is_active_active() {
            assert!(
                p2.exports
                    .values()
                    .all(|e| matches!(e.kind, ExportKind::Mirrored { sequencer: 1, .. }))
            );
            assert_eq!(p2.exports.len(), 2);
        } else {
            assert!(p2.exports.is_empty(), "{mode:?}");
        }
        assert_eq!(
            host_plan(&m, 3),
            HostPlan {
                host: 3,
                ..HostPlan::default()
            }
        );
    }
}

#[test]
fn plan_after_a_move_mirrors_the_moved_vm_and_stops_exporting_it_at_the_source() {
    let mut m = replicated(ReplicationMode::Sync);
    ok(
        &mut m,
        Command::SetVmRunning {
            name: "a".into(),
            running: false,
        },
    );
    if let Some(vm) = m.vms.get_mut("a") {
        vm.workload = Some("iops=1".into());
    }
    ok(
        &mut m,
        Command::SetVmRunning {
            name: "a".into(),
            running: true,
        },
    );
    ok(
        &mut m,
        Command::MoveVm {
            name: "a".into(),
            to: 2,
            expect_host: None,
        },
    );
    let (seq1, _, exp1, guests1) = plan_summary(&m, 1);
    assert_eq!(
        seq1,
        vec![DomainId::Cg(1)],
        "the source keeps ordering the group"
    );
    assert_eq!(exp1, vec![(2, true)], "only b is exported at the source");
    assert!(guests1.is_empty());
    let p2 = host_plan(&m, 2);
    assert!(p2.sequencers.is_empty());
    assert_eq!(p2.replicas.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(
        p2.exports[&1].kind,
        ExportKind::Mirrored {
            cg_id: 1,
            sequencer: 1,
            sequencer_epoch: 1
        }
    );
    assert_eq!(p2.exports[&1].disk.epoch, 2);
    assert_eq!(p2.guests["a"].stay, 1);
}

#[test]
fn plan_after_a_hand_over_swaps_sequencer_and_replica() {
    let mut m = replicated(ReplicationMode::Sync);
    ok(
        &mut m,
        Command::SetSequencer {
            cg: "g".into(),
            to: 2,
            continue_at: 77,
            expect_sequencer: 1,
            old_link_mode: Some(ReplicationMode::Sync),
        },
    );
    let p1 = host_plan(&m, 1);
    assert!(p1.sequencers.is_empty());
    assert_eq!(p1.replicas[&1].sequencer, 2);
    assert_eq!(p1.replicas[&1].sequencer_epoch, 2);
    assert_eq!(p1.replicas[&1].state, LinkState::Consistent);
    // The VMs still run on host 1: their exports now mirror to host 2.
    assert!(p1.exports.values().all(|e| matches!(
        e.kind,
        ExportKind::Mirrored {
            sequencer: 2,
            sequencer_epoch: 2,
            ..
        }
    )));
    let p2 = host_plan(&m, 2);
    let s = &p2.sequencers[&DomainId::Cg(1)];
    assert_eq!((s.seq_start, s.sequencer_epoch, s.links.len()), (77, 2, 1));
    assert!(p2.replicas.is_empty() && p2.exports.is_empty());
}

fn arb_command() -> impl proptest::strategy::Strategy<Value = Command> {
    let name = prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(String::from);
    let host = 0u64..4;
    let mode = prop::sample::select(vec![
        ReplicationMode::Async,
        ReplicationMode::Sync,
        ReplicationMode::ActiveActiveSync,
    ]);
    let state = prop::sample::select(vec![
        LinkState::Syncing,
        LinkState::Consistent,
        LinkState::Outdated,
    ]);
    prop_oneof![
        host.clone().prop_map(|id| Command::RegisterHost {
            id,
            raft_addr: format!("r{id}"),
            admin_addr: "x".into()
        }),
        host.clone().prop_map(|id| Command::RetireHost { id }),
        (name.clone(), host.clone()).prop_map(|(n, h)| create_vm(&n, h)),
        name.clone().prop_map(|name| Command::DeleteVm { name }),
        (name.clone(), prop::collection::vec(name.clone(), 0..3))
            .prop_map(|(name, vms)| Command::CreateCg { name, vms }),
        name.clone().prop_map(|name| Command::DeleteCg { name }),
        (name.clone(), host.clone(), mode).prop_map(|(cg, to, mode)| Command::AddReplica {
            cg,
            to,
            mode
        }),
        (name.clone(), host.clone(), state).prop_map(|(cg, to, state)| Command::SetLinkState {
            cg,
            to,
            state,
            expect: None
        }),
        (name.clone(), host.clone()).prop_map(|(name, to)| Command::MoveVm {
            name,
            to,
            expect_host: None
        }),
        (name.clone(), host.clone(), 1u64..100).prop_map(|(cg, to, at)| {
            // expect_sequencer is filled in by the test from the model.
            Command::SetSequencer {
                cg,
                to,
                continue_at: at,
                expect_sequencer: 0,
                old_link_mode: Some(ReplicationMode::Async),
            }
        }),
        name.prop_map(|name| Command::FenceVm { name }),
    ]
}

proptest! {
    /// Replaying the same log gives the same model; references stay consistent; every VM
    /// runs where its group has a copy; plans export each running VM's disks where it runs.
    #[test]
    fn apply_is_deterministic_and_consistent(cmds in prop::collection::vec(arb_command(), 0..80)) {
        let mut a = ClusterModel::default();
        let mut b = ClusterModel::default();
        for (i, c) in cmds.iter().enumerate() {
            let mut c = c.clone();
            if let Command::SetSequencer { cg, expect_sequencer, .. } = &mut c {
                *expect_sequencer = a.cgs.get(cg).map_or(0, |g| g.sequencer);
            }
            prop_assert_eq!(a.apply(i as u128 + 1, &c), b.apply(i as u128 + 1, &c));
        }
        prop_assert_eq!(&a, &b);
        for vm in a.vms.values() {
            prop_assert!(a.hosts.contains_key(&vm.host));
            prop_assert_eq!(vm.stays.last().copied(), Some(vm.host));
            for d in &vm.disks { prop_assert_eq!(&a.disks[d].vm, &vm.name); }
            if let Some(cg) = &vm.cg {
                let g = &a.cgs[cg];
                prop_assert!(g.vms.contains(&vm.name));
                prop_assert!(g.holds_copy(vm.host), "VM {} runs on {} without a copy", vm.name, vm.host);
                let plan = host_plan(&a, vm.host);
                for d in &vm.disks { prop_assert!(plan.exports.contains_key(d)); }
            }
        }
        for cg in a.cgs.values() {
            for vm in &cg.vms { prop_assert_eq!(a.vms[vm].cg.as_deref(), Some(cg.name.as_str())); }
            prop_assert!(!cg.replicas.iter().any(|l| l.to == cg.sequencer));
            let seq_plans = a.hosts.keys().filter(|h| host_plan(&a, **h).sequencers.contains_key(&DomainId::Cg(cg.id))).count();
            prop_assert_eq!(seq_plans, 1, "exactly one host sequences {}", cg.name);
        }
        let disk_count: usize = a.vms.values().map(|v| v.disks.len()).sum();
        prop_assert_eq!(disk_count, a.disks.len());
    }
}

fn qemu_spec() -> QemuSpec {
    QemuSpec {
        memory_mib: 256,
        cpus: 1,
        kernel: Some("/boot/vmlinuz".into()),
        initrd: Some("/boot/initrd.gz".into()),
        append: Some("console=ttyS0".into()),
        accel: Accel::Tcg,
    }
}

fn create_qemu_vm(name: &str, host: NodeId, qemu: QemuSpec) -> Command {
    Command::CreateQemuVm {
        name: name.into(),
        host,
        disk_sizes: vec![64 * MIB],
        qemu,
        created_at_ms: 0,
    }
}

#[test]
fn a_qemu_vm_keeps_its_config_starts_and_is_planned_on_its_host_only() {
    let mut m = with_hosts(&[1, 2]);
    ok(&mut m, create_qemu_vm("q", 1, qemu_spec()));
    assert_eq!(m.vms["q"].qemu, Some(Box::new(qemu_spec())));
    assert!(host_plan(&m, 1).qemu.is_empty(), "not running yet");
    ok(
        &mut m,
        Command::SetVmRunning {
            name: "q".into(),
            running: true,
        },
    );
    let plan = host_plan(&m, 1);
    let q = &plan.qemu["q"];
    assert_eq!(q.spec, qemu_spec());
    assert_eq!(q.disks.len(), 1);
    assert!(plan.exports.contains_key(&q.disks[0].id));
    assert!(plan.guests.is_empty(), "a QEMU VM has no simulated guest");
    assert!(host_plan(&m, 2).qemu.is_empty());
    ok(
        &mut m,
        Command::SetVmRunning {
            name: "q".into(),
            running: false,
        },
    );
    assert!(host_plan(&m, 1).qemu.is_empty());
}

#[test]
fn a_qemu_vm_with_no_memory_no_cpus_or_an_initrd_without_kernel_is_refused() {
    let mut m = with_hosts(&[1]);
    let cases = [
        (
            QemuSpec {
                memory_mib: 0,
                ..qemu_spec()
            },
            "memory",
        ),
        (
            QemuSpec {
                cpus: 0,
                ..qemu_spec()
            },
            "cpus",
        ),
        (
            QemuSpec {
                kernel: None,
                ..qemu_spec()
            },
            "kernel",
        ),
        (
            QemuSpec {
                kernel: Some("relative/vmlinuz".into()),
                ..qemu_spec()
            },
            "kernel",
        ),
    ];
    for (spec, what) in cases {
        match m.apply(0, &create_qemu_vm("q", 1, spec.clone())) {
            Err(ModelError::Invalid { what: w, .. }) => assert_eq!(w, what, "{spec:?}"),
            other => panic!("{spec:?} gave {other:?}"),
        }
    }
    assert!(m.vms.is_empty());
}

#[test]
fn a_vm_with_neither_workload_nor_qemu_still_cannot_start() {
    let mut m = with_hosts(&[1]);
    ok(&mut m, create_vm("bare", 1));
    let r = m.apply(
        0,
        &Command::SetVmRunning {
            name: "bare".into(),
            running: true,
        },
    );
    assert!(matches!(r, Err(ModelError::Invalid { .. })), "{r:?}");
}

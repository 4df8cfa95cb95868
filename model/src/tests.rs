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

#[test]
fn a_migration_is_claimed_advanced_and_decided_once() {
    let mut m = replicated(ReplicationMode::Async);
    let start = Command::StartMigration {
        cg: "g".into(),
        to: 2,
        strategy: Strategy::ReverseReplication,
        coordinator: 3,
        started_at_ms: 100,
        deadline_ms: 1000,
    };
    let Outcome::Migration(mig) = ok(&mut m, start.clone()) else {
        panic!()
    };
    assert_eq!(
        (mig.id, mig.from, mig.phase, mig.claim.number),
        (1, 1, Phase::Planned, 1)
    );
    assert!(mig.destination_had_copy);
    assert!(matches!(m.apply(0, &start), Err(ModelError::InUse(_))));
    let advance = |claim, from, to| Command::AdvanceMigration {
        id: 1,
        claim,
        from,
        to,
        at_ms: 200,
        note: "x".into(),
        progress: Progress {
            moved: vec!["a".into()],
            ..Progress::default()
        },
    };
    ok(&mut m, advance(1, Phase::Planned, Phase::Preparing));
    // Wrong phase or claim: refused.
    assert!(matches!(
        m.apply(0, &advance(1, Phase::Planned, Phase::Moving)),
        Err(ModelError::Stale(_))
    ));
    // Another coordinator takes over; the old one is refused from then on.
    ok(
        &mut m,
        Command::ClaimMigration {
            id: 1,
            node: 2,
            expect_claim: 1,
            at_ms: 300,
        },
    );
    assert!(matches!(
        m.apply(0, &advance(1, Phase::Preparing, Phase::Moving)),
        Err(ModelError::Stale(_))
    ));
    ok(&mut m, advance(2, Phase::Preparing, Phase::Moving));
    // Phases never go backwards, except into fail-back.
    assert!(matches!(
        m.apply(0, &advance(2, Phase::Moving, Phase::Preparing)),
        Err(ModelError::Invalid { .. })
    ));
    let roots = |equal: bool| {
        vec![DiskRoots {
            disk: 1,
            source: [1; 32],
            destination: if equal { [1; 32] } else { [2; 32] },
        }]
    };
    let decide = |decision, roots| Command::DecideMigration {
        id: 1,
        claim: 2,
        record: DecisionRecord {
            decision,
            at_ms: 400,
            reason: "r".into(),
            roots,
        },
    };
    assert!(matches!(
        m.apply(0, &decide(Decision::Committed, roots(false))),
        Err(ModelError::Invalid { .. })
    ));
    ok(&mut m, decide(Decision::Committed, roots(true)));
    assert!(matches!(
        m.apply(0, &decide(Decision::FailedBack, vec![])),
        Err(ModelError::Stale(_))
    ));
    let mig = &m.migrations[&1];
    assert_eq!(mig.phase, Phase::Done);
    assert_eq!(mig.moved, vec!["a".to_string()]);
    assert_eq!(
        mig.decision.as_ref().map(|d| d.decision),
        Some(Decision::Committed)
    );
    assert!(mig.timeline.len() >= 4);
    // A decided migration no longer blocks a new one.
    assert!(
        m.apply(
            0,
            &Command::StartMigration {
                cg: "g".into(),
                to: 2,
                strategy: Strategy::CompareDelta,
                coordinator: 1,
                started_at_ms: 500,
                deadline_ms: 900,
            }
        )
        .is_ok()
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

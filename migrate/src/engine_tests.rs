//! Unit tests of the coordinator, one situation each: a model built by commands, the
//! observations set by hand, the actions checked. The regressions found by simulation
//! seeds are pinned here too, so they hold whatever the simulator's random stream does.

use convoy_model::{
    ClusterModel, Command, Decision, FailBackCause, LinkState, ModelError, NodeId, Outcome, Phase,
    Progress, ReplicationMode, Strategy,
};

use crate::{
    Action, ActionKind, ActionResult, Completion, Config, Coordinator, HostHealth, HypervisorOp,
    HypervisorReply, LinkStatus, Observations, ProposalResult, StorageOp, VmState,
};

const ME: NodeId = 3;

fn ok(m: &mut ClusterModel, cmd: Command) -> Outcome {
    match m.apply(0, &cmd) {
        Ok(o) => o,
        Err(e) => panic!("{} refused: {e}", cmd.kind()),
    }
}

/// Hosts 1-4; VM a (one disk) on host 1 in group g; group copy on host 2 (`mode`,
/// consistent) unless `mode` is None; migration 1 of g to host 2 started by host 1.
fn model(strategy: Strategy, mode: Option<ReplicationMode>) -> ClusterModel {
    model_with(strategy, mode, &["a"])
}

fn model_with(strategy: Strategy, mode: Option<ReplicationMode>, vms: &[&str]) -> ClusterModel {
    let mut m = ClusterModel::default();
    for id in 1..=4 {
        ok(
            &mut m,
            Command::RegisterHost {
                id,
                raft_addr: format!("r{id}"),
                admin_addr: format!("a{id}"),
            },
        );
    }
    for vm in vms {
        ok(
            &mut m,
            Command::CreateVm {
                name: vm.to_string(),
                host: 1,
                disk_sizes: vec![1 << 20],
                workload: None,
                created_at_ms: 0,
            },
        );
    }
    ok(
        &mut m,
        Command::CreateCg {
            name: "g".into(),
            vms: vms.iter().map(|v| v.to_string()).collect(),
        },
    );
    if let Some(mode) = mode {
        ok(
            &mut m,
            Command::AddReplica {
                cg: "g".into(),
                to: 2,
                mode,
            },
        );
        ok(
            &mut m,
            Command::SetLinkState {
                cg: "g".into(),
                to: 2,
                state: LinkState::Consistent,
                expect: None,
            },
        );
    }
    ok(
        &mut m,
        Command::StartMigration {
            cg: "g".into(),
            to: 2,
            strategy,
            coordinator: 1,
            started_at_ms: 0,
            deadline_ms: 100_000,
        },
    );
    m
}

/// A coordinator on host 3 with the claim, over `model`.
struct H {
    model: ClusterModel,
    c: Coordinator,
    obs: Observations,
    now: u64,
}

impl H {
    fn new(model: ClusterModel) -> H {
        let mut h = H {
            model,
            c: Coordinator::new(ME, 1, 1, Config::default()),
            obs: Observations::default(),
            now: 1_000,
        };
        // The holder (host 1) is lost, so host 3 claims.
        h.obs.hosts.insert(1, HostHealth::Lost);
        let actions = h.step();
        h.apply_all(&actions);
        h.step();
        h.obs.hosts.clear();
        assert_eq!(h.c.claim(), Some(2), "host 3 holds the claim");
        h
    }

    fn step(&mut self) -> Vec<Action> {
        self.now += 10;
        let out = self.c.step(&self.model, &self.obs, self.now);
        self.obs.completions.clear();
        out
    }

    /// Applies every proposal in `actions` to the model and queues its answer.
    fn apply_all(&mut self, actions: &[Action]) {
        for a in actions {
            if let ActionKind::Propose {
                request_id,
                command,
            } = &a.kind
            {
                let answer = self.model.apply(*request_id, command);
                self.complete(
                    a.id,
                    ActionResult::Proposal(ProposalResult::Applied(answer)),
                );
            }
        }
    }

    fn complete(&mut self, action: u64, result: ActionResult) {
        self.obs.completions.push(Completion { action, result });
    }

    /// Sets the phase through the record's own rules.
    fn advance(&mut self, to: Phase, progress: Progress) {
        let from = self.model.migrations[&1].phase;
        let claim = self.model.migrations[&1].claim.number;
        ok(
            &mut self.model,
            Command::AdvanceMigration {
                id: 1,
                claim,
                from,
                to,
                at_ms: self.now,
                note: "test".into(),
                progress,
            },
        );
    }

    fn step_cmd(&mut self, command: Command) {
        let m = &self.model.migrations[&1];
        let cmd = Command::MigrationStep {
            id: 1,
            claim: m.claim.number,
            phase: m.phase,
            at_ms: self.now,
            command: Box::new(command),
        };
        ok(&mut self.model, cmd);
    }
}

fn proposals(actions: &[Action]) -> Vec<&Command> {
    actions
        .iter()
        .filter_map(|a| match &a.kind {
            ActionKind::Propose { command, .. } => Some(command),
            _ => None,
        })
        .collect()
}

fn inner(cmd: &Command) -> Option<&Command> {
    match cmd {
        Command::MigrationStep { command, .. } => Some(command),
        _ => None,
    }
}

fn decides(actions: &[Action]) -> bool {
    proposals(actions)
        .iter()
        .any(|c| matches!(c, Command::DecideMigration { .. }))
}

fn hypervisor(actions: &[Action]) -> Vec<&HypervisorOp> {
    actions
        .iter()
        .filter_map(|a| match &a.kind {
            ActionKind::Hypervisor(op) => Some(op),
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_coordinator_on_the_holders_node_claims_anew_before_acting() {
    let m = model(Strategy::ReverseReplication, Some(ReplicationMode::Async));
    let mut c = Coordinator::new(1, 1, 7, Config::default());
    let out = c.step(&m, &Observations::default(), 10);
    assert_eq!(
        proposals(&out),
        vec![&Command::ClaimMigration {
            id: 1,
            node: 1,
            expect_claim: 1,
            at_ms: 10
        }]
    );
}

#[test]
fn a_standby_claims_only_when_the_holders_host_is_lost() {
    let m = model(Strategy::ReverseReplication, Some(ReplicationMode::Async));
    let mut c = Coordinator::new(ME, 1, 1, Config::default());
    assert!(c.step(&m, &Observations::default(), 10).is_empty());
    let mut obs = Observations::default();
    obs.hosts.insert(1, HostHealth::Lost);
    let out = c.step(&m, &obs, 20);
    assert!(matches!(
        proposals(&out)[..],
        [Command::ClaimMigration {
            node: ME,
            expect_claim: 1,
            ..
        }]
    ));
}

#[test]
fn a_coordinator_that_lost_its_claim_stops_acting() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Async),
    ));
    ok(
        &mut h.model,
        Command::ClaimMigration {
            id: 1,
            node: 4,
            expect_claim: 2,
            at_ms: 0,
        },
    );
    assert!(h.step().is_empty());
    assert_eq!(h.c.claim(), None);
}

#[test]
fn every_change_to_the_group_carries_the_claim_and_the_phase() {
    let mut h = H::new(model(Strategy::ReverseReplication, None));
    h.advance(Phase::Preparing, Progress::default());
    let out = h.step();
    let cmds = proposals(&out);
    assert!(
        matches!(
            cmds[..],
            [Command::MigrationStep {
                claim: 2,
                phase: Phase::Preparing,
                ..
            }]
        ),
        "{cmds:?}"
    );
    assert_eq!(
        inner(cmds[0]),
        Some(&Command::AddReplica {
            cg: "g".into(),
            to: 2,
            mode: ReplicationMode::Async
        })
    );
}

#[test]
fn reverse_replication_switches_a_caught_up_copy_to_sync_and_moves_only_once_it_holds_every_ack() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Async),
    ));
    h.advance(Phase::Preparing, Progress::default());
    let status = |lag: u64, up_to_date: bool| LinkStatus {
        acked_seq: 100 - lag,
        last_seq: 100,
        up_to_date,
        ..LinkStatus::default()
    };
    h.obs.links.insert(2, status(3, false));
    let out = h.step();
    assert_eq!(
        proposals(&out)
            .iter()
            .filter_map(|c| inner(c))
            .collect::<Vec<_>>(),
        vec![&Command::SetMode {
            cg: "g".into(),
            mode: ReplicationMode::Sync
        }]
    );
    h.apply_all(&out);
    // Synchronous now, but the asynchronous backlog is not drained: not yet.
    let out = h.step();
    assert!(proposals(&out).is_empty(), "{out:?}");
    h.obs.links.insert(2, status(0, true));
    let out = h.step();
    assert!(
        matches!(
            proposals(&out)[..],
            [Command::AdvanceMigration {
                to: Phase::Moving,
                progress: Progress {
                    destination_complete: true,
                    ..
                },
                ..
            }]
        ),
        "{out:?}"
    );
}

/// The migration benchmark's sync-switch failed back: its destination had just restarted
/// thousands of writes behind, the group went sync at once, guests' writes waited for the
/// backlog and the link was outdated. A copy far behind catches up asynchronously first.
#[test]
fn sync_switch_lets_a_copy_far_behind_catch_up_before_the_group_goes_sync() {
    let mut h = H::new(model(
        Strategy::SyncSwitch {
            active_active: true,
        },
        Some(ReplicationMode::Async),
    ));
    h.advance(Phase::Preparing, Progress::default());
    let status = |lag: u64| LinkStatus {
        acked_seq: 10_000 - lag,
        last_seq: 10_000,
        ..LinkStatus::default()
    };
    h.obs.links.insert(2, status(8_000));
    let out = h.step();
    assert!(proposals(&out).is_empty(), "{out:?}");
    h.obs.links.insert(2, status(2_000));
    let out = h.step();
    assert!(proposals(&out).is_empty(), "{out:?}");
    // Caught up: now the group goes active-active-sync.
    h.obs.links.insert(2, status(3));
    let out = h.step();
    assert_eq!(
        proposals(&out)
            .iter()
            .filter_map(|c| inner(c))
            .collect::<Vec<_>>(),
        vec![&Command::SetMode {
            cg: "g".into(),
            mode: ReplicationMode::ActiveActiveSync
        }]
    );
}

#[test]
fn a_copy_whose_lag_does_not_shrink_escalates_to_synchronous_mirroring() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Async),
    ));
    h.advance(Phase::Preparing, Progress::default());
    h.obs.links.insert(
        2,
        LinkStatus {
            acked_seq: 0,
            last_seq: 500,
            ..LinkStatus::default()
        },
    );
    let mut escalated = None;
    for _ in 0..400 {
        let out = h.step();
        if let Some(Command::AdvanceMigration { note, progress, .. }) = proposals(&out).first() {
            escalated = Some((note.clone(), progress.escalated));
            h.apply_all(&out);
            break;
        }
    }
    let (note, flag) = escalated.expect("no escalation within 4 s of a stuck lag");
    assert!(
        flag && note.contains("escalating to synchronous mirroring"),
        "{note}"
    );
    let out = h.step();
    assert_eq!(
        proposals(&out)
            .iter()
            .filter_map(|c| inner(c))
            .collect::<Vec<_>>(),
        vec![&Command::SetMode {
            cg: "g".into(),
            mode: ReplicationMode::Sync
        }]
    );
}

/// Seed 2774: a seeding that guests outpace was waited on for ever.
#[test]
fn regression_seed_2774_a_seeding_outpaced_by_guests_escalates_instead_of_waiting() {
    let mut h = H::new(model(Strategy::BreakConsistency, None));
    h.advance(Phase::Preparing, Progress::default());
    h.step_cmd(Command::CreateSnapshot {
        cg: "g".into(),
        name: "migration-1".into(),
        created_at_ms: 0,
    });
    h.step_cmd(Command::AddReplica {
        cg: "g".into(),
        to: 2,
        mode: ReplicationMode::Async,
    });
    h.obs.links.insert(
        2,
        LinkStatus {
            acked_seq: 10,
            last_seq: 90,
            ..LinkStatus::default()
        },
    );
    let escalates = (0..400).any(|_| {
        let out = h.step();
        proposals(&out).iter().any(|c| {
            matches!(
                c,
                Command::AdvanceMigration {
                    progress: Progress {
                        escalated: true,
                        ..
                    },
                    ..
                }
            )
        })
    });
    assert!(escalates);
}

#[test]
fn a_lost_destination_before_the_decision_fails_back() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Sync),
    ));
    h.advance(Phase::Moving, Progress::default());
    h.obs.hosts.insert(2, HostHealth::Lost);
    let out = h.step();
    assert!(matches!(
        proposals(&out)[..],
        [Command::AdvanceMigration {
            to: Phase::FailingBack(FailBackCause::DestinationLost),
            ..
        }]
    ));
}

#[test]
fn the_deadline_fails_back() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Async),
    ));
    h.advance(Phase::Preparing, Progress::default());
    h.now = 100_000;
    let out = h.step();
    assert!(matches!(
        proposals(&out)[..],
        [Command::AdvanceMigration {
            to: Phase::FailingBack(FailBackCause::Deadline),
            ..
        }]
    ));
}

#[test]
fn a_lost_source_rolls_forward_only_onto_a_destination_seen_complete() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Sync),
    ));
    h.advance(Phase::Moving, Progress::default());
    h.obs.hosts.insert(1, HostHealth::Lost);
    let out = h.step();
    assert!(
        proposals(&out).is_empty(),
        "sync and consistent, but never seen caught up: it may lack writes acknowledged while asynchronous"
    );
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Sync),
    ));
    h.advance(
        Phase::Moving,
        Progress {
            destination_complete: true,
            ..Progress::default()
        },
    );
    h.obs.hosts.insert(1, HostHealth::Lost);
    let out = h.step();
    assert!(matches!(
        proposals(&out)[..],
        [Command::AdvanceMigration {
            to: Phase::RollingForward,
            ..
        }]
    ));
    h.apply_all(&out);
    let out = h.step();
    assert!(
        out.iter().any(|a| matches!(
            &a.kind,
            ActionKind::Storage(StorageOp::TakeOver(r)) if r.to == 2 && r.lost == 1
        )),
        "{out:?}"
    );
}

/// Seed 2591: the order was handed back to the source, then the source died; the
/// destination (its synchronous copy since the hand-back) was complete, but nothing
/// recorded it, and the migration waited for ever.
#[test]
fn regression_seed_2591_source_lost_after_a_hand_back_rolls_forward() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Sync),
    ));
    h.advance(Phase::CuttingOver, Progress::default());
    let roots = |m: &ClusterModel| {
        m.cg_disks(&m.cgs["g"])
            .iter()
            .map(|d| convoy_model::DiskRoots {
                disk: d.id,
                source: Some([1; 32]),
                destination: [1; 32],
            })
            .collect::<Vec<_>>()
    };
    let r = roots(&h.model);
    let sequencer = |phase, to, r| Command::MigrationSequencer {
        id: 1,
        claim: 2,
        phase,
        to,
        continue_at: 10,
        basis: convoy_model::SequencerBasis::HandOver {
            roots: r,
            old_link_mode: Some(ReplicationMode::Sync),
        },
        at_ms: 0,
    };
    ok(&mut h.model, sequencer(Phase::CuttingOver, 2, r.clone()));
    h.advance(
        Phase::FailingBack(FailBackCause::Abort),
        Progress::default(),
    );
    ok(
        &mut h.model,
        sequencer(Phase::FailingBack(FailBackCause::Abort), 1, r),
    );
    h.obs.hosts.insert(1, HostHealth::Lost);
    let out = h.step();
    assert!(
        matches!(
            proposals(&out)[..],
            [Command::AdvanceMigration {
                to: Phase::RollingForward,
                ..
            }]
        ),
        "{out:?}"
    );
}

/// Seeds 965 and 1402: the fail-back decided while the coordinator's own pause of a VM
/// was still in flight; the pause landed after the decision and the VM stayed paused.
#[test]
fn regression_seed_965_no_decision_while_a_pause_of_ours_may_still_land() {
    let mut h = H::new(model(
        Strategy::SyncSwitch {
            active_active: false,
        },
        Some(ReplicationMode::Sync),
    ));
    h.advance(Phase::Moving, Progress::default());
    h.obs.vms.insert("a".into(), VmState::Running(1));
    let out = h.step();
    let pause = out
        .iter()
        .find(|a| {
            matches!(
                a.kind,
                ActionKind::Hypervisor(HypervisorOp::PauseAndDrain { .. })
            )
        })
        .expect("the move starts with a pause")
        .id;
    h.advance(
        Phase::FailingBack(FailBackCause::Abort),
        Progress::default(),
    );
    let out = h.step();
    assert!(!decides(&out), "decided with the pause in flight: {out:?}");
    // The pause lands: the VM is paused on the source; resume, then decide.
    h.complete(
        pause,
        ActionResult::Hypervisor(Ok(HypervisorReply::Drained)),
    );
    h.obs.vms.insert("a".into(), VmState::Paused(1));
    let out = h.step();
    assert!(!decides(&out));
    assert!(matches!(
        hypervisor(&out)[..],
        [HypervisorOp::Resume { host: 1, .. }]
    ));
    let resume = out
        .iter()
        .find(|a| matches!(a.kind, ActionKind::Hypervisor(HypervisorOp::Resume { .. })))
        .expect("a resume")
        .id;
    h.obs.vms.insert("a".into(), VmState::Running(1));
    // Running, but our resume has not answered: its stun would be lost if we moved on.
    assert!(!decides(&h.step()));
    h.complete(
        resume,
        ActionResult::Hypervisor(Ok(HypervisorReply::Resumed { stun_ms: Some(5) })),
    );
    assert!(decides(&h.step()));
}

/// Seed 132: aborted after the move committed but before the resume; the paused instance
/// was on the host the VM had left, and the engine kept pausing it where the model said
/// it ran.
#[test]
fn regression_seed_132_an_interrupted_move_goes_back_from_wherever_the_paused_instance_is() {
    let mut h = H::new(model(
        Strategy::SyncSwitch {
            active_active: true,
        },
        Some(ReplicationMode::ActiveActiveSync),
    ));
    h.advance(Phase::Moving, Progress::default());
    h.step_cmd(Command::MoveVm {
        name: "a".into(),
        to: 2,
        expect_host: Some(1),
    });
    h.advance(
        Phase::FailingBack(FailBackCause::Abort),
        Progress::default(),
    );
    h.obs.vms.insert("a".into(), VmState::Paused(1));
    let out = h.step();
    assert!(hypervisor(&out).is_empty(), "{out:?}");
    assert_eq!(
        proposals(&out)
            .iter()
            .filter_map(|c| inner(c))
            .collect::<Vec<_>>(),
        vec![&Command::MoveVm {
            name: "a".into(),
            to: 1,
            expect_host: Some(2)
        }]
    );
}

/// Seed 98: the answer to a pause was lost; the move committed (the VM was seen paused),
/// and the engine then waited for that answer until the deadline before resuming.
#[test]
fn regression_seed_98_a_lost_pause_answer_does_not_hold_the_resume() {
    let mut h = H::new(model(
        Strategy::SyncSwitch {
            active_active: false,
        },
        Some(ReplicationMode::Sync),
    ));
    h.advance(Phase::Moving, Progress::default());
    h.obs.vms.insert("a".into(), VmState::Running(1));
    let out = h.step();
    assert!(matches!(
        hypervisor(&out)[..],
        [HypervisorOp::PauseAndDrain { host: 1, .. }]
    ));
    // Paused (its answer never comes), moved.
    h.obs.vms.insert("a".into(), VmState::Paused(1));
    let out = h.step();
    h.apply_all(&out);
    assert_eq!(h.model.vms["a"].host, 2);
    let out = h.step();
    assert!(
        matches!(hypervisor(&out)[..], [HypervisorOp::Resume { host: 2, .. }]),
        "{out:?}"
    );
}

#[test]
fn an_unknown_proposal_outcome_is_retried_with_the_same_request_id() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Async),
    ));
    let out = h.step();
    let (id, rid) = match &out[..] {
        [
            Action {
                id,
                kind: ActionKind::Propose { request_id, .. },
            },
        ] => (*id, *request_id),
        other => panic!("{other:?}"),
    };
    h.complete(id, ActionResult::Proposal(ProposalResult::Unknown));
    let again = h.step();
    assert!(
        matches!(&again[..], [Action { id: i, kind: ActionKind::Propose { request_id, .. } }] if *i == id && *request_id == rid),
        "{again:?}"
    );
}

#[test]
fn a_refused_hand_over_with_differing_roots_fails_back() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Sync),
    ));
    h.advance(Phase::Moving, Progress::default());
    h.step_cmd(Command::MoveVm {
        name: "a".into(),
        to: 2,
        expect_host: None,
    });
    h.advance(Phase::CuttingOver, Progress::default());
    h.obs.vms.insert("a".into(), VmState::Running(2));
    let out = h.step();
    let hand = out
        .iter()
        .find(|a| matches!(a.kind, ActionKind::Storage(StorageOp::HandOver(_))))
        .expect("the cut-over hands the order over")
        .id;
    h.complete(
        hand,
        ActionResult::Storage(Err(crate::StorageError::CopiesDiffer { disk: 1 })),
    );
    let out = h.step();
    assert!(matches!(
        proposals(&out)[..],
        [Command::AdvanceMigration {
            to: Phase::FailingBack(FailBackCause::CopiesDiffer),
            ..
        }]
    ));
}

#[test]
fn the_decision_is_proposed_once_the_order_and_every_vm_are_on_the_deciding_side() {
    let mut h = H::new(model(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Sync),
    ));
    h.advance(
        Phase::FailingBack(FailBackCause::Abort),
        Progress::default(),
    );
    h.obs.vms.insert("a".into(), VmState::Running(1));
    let out = h.step();
    let cmds = proposals(&out);
    assert!(
        matches!(
            cmds[..],
            [Command::DecideMigration { record, .. }] if record.decision == Decision::FailedBack
        ),
        "{cmds:?}"
    );
    h.apply_all(&out);
    assert!(h.c.finished(&h.model));
    assert!(h.step().is_empty());
    assert!(matches!(
        h.model.apply(
            0,
            &Command::AbortMigration {
                id: 1,
                at_ms: 0,
                reason: "late".into()
            }
        ),
        Err(ModelError::Stale(_))
    ));
}

/// Seed 19903 (long run): with VM a moved and not yet running on the destination, the
/// engine "healed" VM b, paused on the source with its move already proposed; the move
/// then committed under a running guest (its in-flight writes refused by the new epochs).
#[test]
fn regression_seed_19903_a_vm_whose_move_is_proposed_is_not_resumed_where_it_was() {
    let mut h = H::new(model_with(
        Strategy::ReverseReplication,
        Some(ReplicationMode::Sync),
        &["a", "b"],
    ));
    h.advance(
        Phase::Moving,
        Progress {
            destination_complete: true,
            ..Progress::default()
        },
    );
    h.step_cmd(Command::MoveVm {
        name: "a".into(),
        to: 2,
        expect_host: Some(1),
    });
    h.obs.vms.insert("a".into(), VmState::Running(2));
    h.obs.vms.insert("b".into(), VmState::Paused(1));
    let out = h.step();
    assert_eq!(
        proposals(&out)
            .iter()
            .filter_map(|c| inner(c))
            .collect::<Vec<_>>(),
        vec![&Command::MoveVm {
            name: "b".into(),
            to: 2,
            expect_host: Some(1)
        }]
    );
    // Before the move commits, VM a stops being seen running (its host hiccups).
    h.obs.vms.insert("a".into(), VmState::Unknown);
    for _ in 0..5 {
        let out = h.step();
        assert!(
            !hypervisor(&out)
                .iter()
                .any(|op| matches!(op, HypervisorOp::Resume { vm, host: 1, .. } if vm == "b")),
            "resumed b on the source with its move in flight: {out:?}"
        );
    }
}

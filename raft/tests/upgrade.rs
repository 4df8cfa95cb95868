//! Old stored formats still decode and upgrade: the Raft log entries and the state-machine
//! snapshot written by schema version 1 (fixtures in tests/fixtures/v1, written by that
//! version's code) read back as current commands and models; so do schema 2's, 3's and
//! 4's (tests/fixtures/v2, v3, v4).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use convoy_raft::model::{Command, LinkState, ReplicationMode};
use convoy_raft::upgrade::{decode_entry, decode_state, encode_entry, encode_state};
use convoy_raft::{StateMachineStore, TypeConfig};
use openraft::EntryPayload;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

fn fixture(name: &str) -> Vec<u8> {
    fixture_of(1, name)
}

fn fixture_of(version: u8, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/v{version}"))
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The log entries of schema `version`'s fixture, each checked to carry that version.
fn entries_of(version: u8) -> Vec<openraft::Entry<TypeConfig>> {
    let bytes = fixture_of(version, "log-entries.bin");
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let (entry, tail) = rest[4..].split_at(len);
        assert_eq!(entry[0], version, "fixture entries carry version {version}");
        out.push(decode_entry(entry).unwrap_or_else(|e| panic!("a v{version} entry decodes: {e}")));
        rest = tail;
    }
    out
}

fn v1_entries() -> Vec<openraft::Entry<TypeConfig>> {
    entries_of(1)
}

#[test]
fn schema_1_log_entries_decode_as_current_commands() {
    let entries = v1_entries();
    assert_eq!(entries.len(), 20);
    assert!(matches!(entries[0].payload, EntryPayload::Blank));
    assert!(matches!(entries[1].payload, EntryPayload::Membership(_)));
    let commands: Vec<Command> = entries
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::Normal(p) => Some(p.requests.iter().map(|r| r.command.clone())),
            _ => None,
        })
        .flatten()
        .collect();
    // Every v1 command kind is there, and the changed one got its new field.
    let kinds: std::collections::BTreeSet<&str> = commands.iter().map(|c| c.kind()).collect();
    assert_eq!(kinds.len(), 14, "{kinds:?}");
    assert!(commands.contains(&Command::SetLinkState {
        cg: "shop".into(),
        to: 2,
        state: LinkState::Consistent,
        expect: None,
    }));
    // Re-encoded at the current version, they read back unchanged.
    for e in &entries {
        let again = decode_entry(&encode_entry(e).unwrap()).unwrap();
        assert_eq!(format!("{again:?}"), format!("{e:?}"));
    }
}

#[tokio::test]
async fn schema_1_snapshot_upgrades_to_the_model_its_log_gives() {
    // The snapshot file written by v1 code...
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("current.snap"), fixture("current.snap")).unwrap();
    let from_snapshot = StateMachineStore::open(dir.path()).expect("a v1 snapshot opens");
    let snap_model = from_snapshot.reader().read(|m| m.clone());
    // ...equals replaying the (upgraded) v1 log with today's model.
    let replay_dir = tempfile::tempdir().unwrap();
    let mut replay = StateMachineStore::open(replay_dir.path()).unwrap();
    replay.apply(v1_entries()).await.unwrap();
    let replayed = replay.reader().read(|m| m.clone());
    assert_eq!(snap_model.topology(), replayed.topology());

    let shop = &snap_model.cgs["shop"];
    assert_eq!(shop.sequencer, 1);
    // v1 replicas recorded the group's highest disk epoch; the sequencer epoch carries on.
    assert_eq!(shop.sequencer_epoch, 2);
    assert_eq!(shop.replicas[0].mode, ReplicationMode::ActiveActiveSync);
    assert_eq!(shop.replicas[0].state, LinkState::Outdated);
    assert_eq!(shop.snapshots.len(), 1);
    assert_eq!(snap_model.vms["web"].stays, vec![1]);
    assert!(snap_model.hosts[&4].retired);
    assert!(!snap_model.vms.contains_key("gone"));
    assert!(!snap_model.cgs.contains_key("tmpcg"));
    // Ids continue after the upgrade: the next VM gets the next id.
    let mut m = snap_model.clone();
    let created = m.apply(
        0,
        &Command::CreateVm {
            name: "new".into(),
            host: 2,
            disk_sizes: vec![1 << 20],
            workload: None,
            created_at_ms: 0,
        },
    );
    let Ok(convoy_raft::Outcome::Vm(vm, disks)) = created else {
        panic!("{created:?}")
    };
    assert_eq!((vm.id, disks[0].id), (5, 6));
    // A retried v1 request still gets its remembered (upgraded) answer.
    let again = m.apply(
        1004,
        &Command::CreateVm {
            name: "web".into(),
            host: 1,
            disk_sizes: vec![64 << 20, 4 << 30],
            workload: None,
            created_at_ms: 1_764_000_000_000,
        },
    );
    assert!(matches!(again, Ok(convoy_raft::Outcome::Vm(v, _)) if v.id == 1));
    // The upgraded state is written back at the current version and reads back equal.
    let mut builder = from_snapshot_builder(dir.path()).await;
    let snapshot = builder.build_snapshot().await.unwrap();
    let data = snapshot.snapshot.into_inner();
    assert_eq!(data[0], convoy_raft::model::SCHEMA_VERSION);
    let state = decode_state(&data).unwrap();
    let again = decode_state(&encode_state(&state).unwrap()).unwrap();
    assert_eq!(again.model, state.model);
    assert_eq!(state.model, snap_model);
    let reopened = StateMachineStore::open(dir.path()).unwrap();
    assert_eq!(
        reopened.reader().read(|m| m.topology()),
        snap_model.topology()
    );
}

async fn from_snapshot_builder(dir: &Path) -> convoy_raft::state_machine::SnapshotBuilder {
    let mut sm = StateMachineStore::open(dir).unwrap();
    sm.get_snapshot_builder().await
}

#[tokio::test]
async fn an_older_snapshot_never_replaces_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let entries = v1_entries();
    sm.apply(entries[..10].to_vec()).await.unwrap();
    // openraft builds in its own task: a builder taken at index 10...
    let mut old = sm.get_snapshot_builder().await;
    sm.apply(entries[10..].to_vec()).await.unwrap();
    // ...may finish after one taken later.
    let mut new = sm.get_snapshot_builder().await;
    new.build_snapshot().await.unwrap();
    old.build_snapshot().await.unwrap();
    let reopened = StateMachineStore::open(dir.path()).unwrap();
    let applied = reopened.reader().applied_index();
    assert_eq!(applied, entries.last().unwrap().log_id.index);
}

/// The install side of the same race: a snapshot installed from the leader (openraft
/// installs in its own task) that is older than the one built meanwhile leaves the newer
/// file in place.
#[tokio::test]
async fn an_older_installed_snapshot_never_replaces_a_newer_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let entries = v1_entries();
    sm.apply(entries[..10].to_vec()).await.unwrap();
    let old = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    sm.apply(entries[10..].to_vec()).await.unwrap();
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    sm.install_snapshot(&old.meta, old.snapshot).await.unwrap();
    let reopened = StateMachineStore::open(dir.path()).unwrap();
    assert_eq!(
        reopened.reader().applied_index(),
        entries.last().unwrap().log_id.index
    );
}

/// Schema 3 only appended a command: schema 2's log entries and snapshot file (written by
/// schema 2 code) read back as they were, and re-encode at version 3.
#[tokio::test]
async fn schema_2_log_and_snapshot_read_back_unchanged() {
    let entries = entries_of(2);
    // The same commands as the v1 fixture gives (the v2 file was made from it).
    let v1 = v1_entries();
    assert_eq!(format!("{entries:?}"), format!("{v1:?}"));
    for e in &entries {
        let encoded = encode_entry(e).unwrap();
        assert_eq!(encoded[0], convoy_raft::model::SCHEMA_VERSION);
        assert_eq!(
            format!("{:?}", decode_entry(&encoded).unwrap()),
            format!("{e:?}")
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("current.snap"),
        fixture_of(2, "current.snap"),
    )
    .unwrap();
    let from_snapshot = StateMachineStore::open(dir.path()).expect("a v2 snapshot opens");
    let replay_dir = tempfile::tempdir().unwrap();
    let mut replay = StateMachineStore::open(replay_dir.path()).unwrap();
    replay.apply(entries).await.unwrap();
    assert_eq!(
        from_snapshot.reader().read(|m| m.clone()),
        replay.reader().read(|m| m.clone())
    );
}

/// Schema 4 gave VMs their QEMU configuration: schema 3's log entries (written by schema 3
/// code) decode unchanged, and its snapshot file, whose VMs and remembered answers lack the
/// field, upgrades to the model its log gives, with no VM a QEMU guest.
#[tokio::test]
async fn schema_3_snapshot_upgrades_and_its_log_decodes_unchanged() {
    let entries = entries_of(3);
    assert_eq!(format!("{entries:?}"), format!("{:?}", v1_entries()));
    for e in &entries {
        let encoded = encode_entry(e).unwrap();
        assert_eq!(encoded[0], convoy_raft::model::SCHEMA_VERSION);
        assert_eq!(
            format!("{:?}", decode_entry(&encoded).unwrap()),
            format!("{e:?}")
        );
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("current.snap"),
        fixture_of(3, "current.snap"),
    )
    .unwrap();
    let from_snapshot = StateMachineStore::open(dir.path()).expect("a v3 snapshot opens");
    let snap_model = from_snapshot.reader().read(|m| m.clone());
    let replay_dir = tempfile::tempdir().unwrap();
    let mut replay = StateMachineStore::open(replay_dir.path()).unwrap();
    replay.apply(entries).await.unwrap();
    assert_eq!(snap_model, replay.reader().read(|m| m.clone()));
    assert!(!snap_model.vms.is_empty());
    assert!(snap_model.vms.values().all(|v| v.qemu.is_none()));
    assert_eq!(snap_model.vms["web"].stays, vec![1]);

    // A retried schema-3 request gets its remembered answer, upgraded.
    let mut m = snap_model.clone();
    let again = m.apply(
        1004,
        &Command::CreateVm {
            name: "web".into(),
            host: 1,
            disk_sizes: vec![64 << 20, 4 << 30],
            workload: None,
            created_at_ms: 1_764_000_000_000,
        },
    );
    assert!(
        matches!(&again, Ok(convoy_raft::Outcome::Vm(v, _)) if v.id == 1 && v.qemu.is_none()),
        "{again:?}"
    );

    // Written back at the current version, it reads back equal.
    let mut builder = from_snapshot_builder(dir.path()).await;
    let snapshot = builder.build_snapshot().await.unwrap();
    let data = snapshot.snapshot.into_inner();
    assert_eq!(data[0], convoy_raft::model::SCHEMA_VERSION);
    let state = decode_state(&data).unwrap();
    assert_eq!(state.model, snap_model);
}

/// Schema 5 appended commands (link reports bound to the group's id, migrations with QEMU
/// settings, QEMU's measurements) and gave migrations fields: schema 4's log entries
/// (written by schema 4 code: a QEMU VM, a tenure-bound link report, a migration started
/// and advanced) decode unchanged and re-encode at version 5, and its snapshot file, whose
/// migration lacks the fields, upgrades to the model its log gives.
#[tokio::test]
async fn schema_4_log_and_snapshot_read_back_unchanged() {
    let entries = entries_of(4);
    let v1 = v1_entries();
    assert_eq!(entries.len(), v1.len() + 4);
    assert_eq!(format!("{:?}", &entries[..v1.len()]), format!("{v1:?}"));
    let commands: Vec<&Command> = entries[v1.len()..]
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::Normal(p) => p.requests.first().map(|r| &r.command),
            _ => None,
        })
        .collect();
    assert!(
        matches!(commands[0], Command::CreateQemuVm { name, .. } if name == "guest"),
        "{commands:?}"
    );
    assert_eq!(
        commands[1],
        &Command::ReportLinkState {
            cg: "shop".into(),
            from: 1,
            sequencer_epoch: 2,
            to: 2,
            state: LinkState::Consistent,
            expect: Some(LinkState::Outdated),
        }
    );
    for e in &entries {
        let encoded = encode_entry(e).unwrap();
        assert_eq!(encoded[0], convoy_raft::model::SCHEMA_VERSION);
        assert_eq!(
            format!("{:?}", decode_entry(&encoded).unwrap()),
            format!("{e:?}")
        );
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("current.snap"),
        fixture_of(4, "current.snap"),
    )
    .unwrap();
    let from_snapshot = StateMachineStore::open(dir.path()).expect("a v4 snapshot opens");
    let snap_model = from_snapshot.reader().read(|m| m.clone());
    let replay_dir = tempfile::tempdir().unwrap();
    let mut replay = StateMachineStore::open(replay_dir.path()).unwrap();
    replay.apply(entries).await.unwrap();
    assert_eq!(snap_model, replay.reader().read(|m| m.clone()));
    assert!(snap_model.vms["guest"].qemu.is_some());
    assert_eq!(
        snap_model.cgs["shop"].replicas[0].state,
        LinkState::Consistent
    );
    let migration = &snap_model.migrations[&1];
    assert_eq!(migration.stats.stun_ms, vec![("web".to_string(), 42)]);
    assert_eq!(migration.stats.bytes_needed, 4096);
    assert_eq!(migration.live, convoy_raft::model::LiveSettings::default());
    assert!(migration.stats.live_moves.is_empty());

    // A retried schema-4 request gets its remembered answer, upgraded.
    let mut m = snap_model.clone();
    let again = m.apply(
        2003,
        &Command::StartMigration {
            cg: "shop".into(),
            to: 2,
            strategy: convoy_raft::model::Strategy::SyncSwitch {
                active_active: false,
            },
            coordinator: 1,
            started_at_ms: 1_765_000_100_000,
            deadline_ms: 1_765_000_700_000,
        },
    );
    assert!(
        matches!(&again, Ok(convoy_raft::Outcome::Migration(m)) if m.id == 1 && m.timeline.len() == 1),
        "{again:?}"
    );

    let mut builder = from_snapshot_builder(dir.path()).await;
    let snapshot = builder.build_snapshot().await.unwrap();
    let data = snapshot.snapshot.into_inner();
    assert_eq!(data[0], convoy_raft::model::SCHEMA_VERSION);
    assert_eq!(decode_state(&data).unwrap().model, snap_model);
}

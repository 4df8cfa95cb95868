//! Prometheus metrics: one recorder per agent process, rendered at `/metrics`.
//!
//! Names (all prefixed `convoy_`, each with a `# HELP` line; every histogram has buckets):
//! Raft state gauges sampled every second, RPC counters and latency histograms from the
//! Raft network, write latencies on the leader, peers the transport refused
//! (`convoy_refused_peer_total{reason="retired"|"not_a_node"}`), when this agent's
//! certificate expires (`convoy_tls_cert_not_after_seconds`, Unix time), and FLUSHes of
//! VMs running on other hosts that this host's sequencers made durable on every promised
//! copy (`convoy_mirror_flushes_total`).
//!
//! The data plane: per NBD export, requests, latency histograms, errors and bytes (cached
//! handles, [`ExportMetrics`]); refusals of stale epochs and of replica streams, present
//! at zero from the start; and, computed when `/metrics` is scraped from what `cg show`
//! reads (so no write pays for them and a deleted group leaves no stale series), per
//! group and link the replication lag in writes and seconds, the link's committed state
//! and sender phase, resyncs, bytes sent, the journal's bytes, and the disks whose image
//! cannot be opened ([`render_data_plane`]).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use convoy_raft::model::LinkState;

use crate::data::{DataPlaneMetrics, LINK_PHASES};
use crate::node::service::Cluster;

/// Buckets of every latency histogram (seconds).
const SECONDS_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// Buckets of `convoy_raft_batch_requests` (requests per Raft entry).
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Where a stale epoch can be refused (`convoy_stale_epoch_refused_total{where}`).
pub const STALE_EPOCH_WHERE: [&str; 3] = ["sequencer", "export", "replica"];

/// Why a replica refuses a stream (`convoy_replica_refused_total{reason}`).
pub const REPLICA_REFUSAL_REASONS: [&str; 8] = [
    "stale_epoch",
    "out_of_order",
    "storage",
    "other",
    "not_a_replica",
    "not_the_sequencer",
    "disk_mismatch",
    "busy",
];

/// Metrics the recorder renders, with their help text.
const COUNTERS: &[(&str, &str)] = &[
    ("convoy_raft_rpc_total", "Raft RPCs sent, by kind."),
    (
        "convoy_raft_rpc_errors_total",
        "Raft RPCs that failed, by kind and error class.",
    ),
    (
        "convoy_raft_log_entries_total",
        "Raft log entries appended on this node.",
    ),
    (
        "convoy_raft_log_fsyncs_total",
        "Raft log WAL fsyncs on this node.",
    ),
    (
        "convoy_refused_peer_total",
        "Connections, streams and dials the transport refused, by reason (retired, not_a_node).",
    ),
    (
        "convoy_stale_epoch_refused_total",
        "Writes and streams refused for carrying a stale epoch, by where (sequencer, export, replica).",
    ),
    (
        "convoy_replica_refused_total",
        "Replication streams this host refused as a replica, by reason.",
    ),
    (
        "convoy_journal_overflows_total",
        "Times a group's journal limit dropped a replica into a dirty-chunk resync.",
    ),
    (
        "convoy_mirror_refused_total",
        "Mirrored writes this host's sequencers refused.",
    ),
    (
        "convoy_crash_pulls_total",
        "Groups this host settled after an unclean stop before sequencing them, by outcome (pulled from a synchronous replica, nothing to pull, gave_up waiting for one).",
    ),
    (
        "convoy_mirror_flushes_total",
        "FLUSHes of VMs running on other hosts made durable on every promised copy here.",
    ),
    (
        "convoy_migrations_decided_total",
        "Migrations this agent saw decided, by decision.",
    ),
    (
        "convoy_nbd_requests_total",
        "NBD requests served, by export and operation.",
    ),
    (
        "convoy_nbd_request_errors_total",
        "NBD requests answered with an error, by export and operation.",
    ),
    (
        "convoy_nbd_bytes_total",
        "Payload bytes NBD clients read and wrote, by export and direction.",
    ),
];
const GAUGES: &[(&str, &str)] = &[
    ("convoy_raft_term", "Current Raft term."),
    (
        "convoy_raft_leader_id",
        "Node id of the leader this node knows (0: none).",
    ),
    (
        "convoy_raft_is_leader",
        "1 if this node is the Raft leader.",
    ),
    (
        "convoy_raft_last_log_index",
        "Index of the last Raft log entry.",
    ),
    (
        "convoy_raft_commit_index",
        "Highest committed Raft log index this node knows.",
    ),
    (
        "convoy_raft_applied_index",
        "Highest Raft log index applied to the state machine.",
    ),
    (
        "convoy_raft_snapshot_index",
        "Raft log index of the last snapshot (0: none).",
    ),
    (
        "convoy_tls_cert_not_after_seconds",
        "When this agent's certificate expires (Unix time).",
    ),
    (
        "convoy_migration_phase",
        "Phase number of each migration in progress.",
    ),
    (
        "convoy_migration_bytes_moved",
        "Bytes a migration moved so far.",
    ),
    (
        "convoy_migration_bytes_needed",
        "Bytes a migration's destination needed.",
    ),
];
const HISTOGRAMS: &[(&str, &str)] = &[
    ("convoy_raft_rpc_seconds", "Latency of Raft RPCs, by kind."),
    (
        "convoy_raft_write_seconds",
        "Time from proposal to apply of commands proposed on this node as leader.",
    ),
    (
        "convoy_raft_batch_requests",
        "Requests packed into one Raft entry.",
    ),
    (
        "convoy_migration_stun_seconds",
        "How long each VM was paused by a migration.",
    ),
    (
        "convoy_nbd_request_seconds",
        "Latency of NBD requests from the device's view, by export and operation.",
    ),
];

/// Installs the process-wide recorder and returns the handle `/metrics` renders. Every
/// histogram has buckets (none renders as a summary); the refusal counters exist at zero.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = builder()?.install_recorder()?;
    describe_and_register();
    Ok(handle)
}

/// The exporter's settings: buckets for every histogram.
fn builder() -> anyhow::Result<PrometheusBuilder> {
    Ok(PrometheusBuilder::new()
        .set_buckets(&SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("convoy_raft_batch_requests".into()),
            &BATCH_BUCKETS,
        )?)
}

/// Help lines for every metric, and the series that must exist at zero from the start.
fn describe_and_register() {
    for (name, help) in COUNTERS {
        metrics::describe_counter!(*name, *help);
    }
    for (name, help) in GAUGES {
        metrics::describe_gauge!(*name, *help);
    }
    for (name, help) in HISTOGRAMS {
        metrics::describe_histogram!(*name, *help);
    }
    // Present at zero from the start: an alert on `increase()` needs a first sample.
    for place in STALE_EPOCH_WHERE {
        metrics::counter!("convoy_stale_epoch_refused_total", "where" => place).increment(0);
    }
    for reason in REPLICA_REFUSAL_REASONS {
        metrics::counter!("convoy_replica_refused_total", "reason" => reason).increment(0);
    }
    for reason in ["retired", "not_a_node"] {
        metrics::counter!("convoy_refused_peer_total", "reason" => reason).increment(0);
    }
    for outcome in ["pulled", "nothing", "gave_up"] {
        metrics::counter!("convoy_crash_pulls_total", "outcome" => outcome).increment(0);
    }
    for name in [
        "convoy_journal_overflows_total",
        "convoy_mirror_refused_total",
        "convoy_mirror_flushes_total",
    ] {
        metrics::counter!(name).increment(0);
    }
}

/// Counts one stream this host refused as a replica (`reason` from
/// [`REPLICA_REFUSAL_REASONS`]).
pub fn replica_refused(reason: &'static str) {
    metrics::counter!("convoy_replica_refused_total", "reason" => reason).increment(1);
    if reason == "stale_epoch" {
        metrics::counter!("convoy_stale_epoch_refused_total", "where" => "replica").increment(1);
    }
}

/// One NBD operation's handles.
struct OpMetrics {
    requests: Counter,
    errors: Counter,
    seconds: Histogram,
}

impl OpMetrics {
    fn new(export: &str, op: &'static str) -> Self {
        let labels = [("export", export.to_string()), ("op", op.to_string())];
        Self {
            requests: metrics::counter!("convoy_nbd_requests_total", &labels),
            errors: metrics::counter!("convoy_nbd_request_errors_total", &labels),
            seconds: metrics::histogram!("convoy_nbd_request_seconds", &labels),
        }
    }
}

/// An NBD operation, for [`ExportMetrics::record`].
#[derive(Clone, Copy, Debug)]
pub enum NbdOp {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
}

/// The handles of one export, made once when the export is created (at zero, so the
/// series exist before the first request) and shared by every device it serves: a
/// request costs two clock reads and a few atomic adds, no lookup and no formatting.
pub struct ExportMetrics {
    ops: [OpMetrics; 5],
    read_bytes: Counter,
    written_bytes: Counter,
}

impl ExportMetrics {
    /// Registers the series of export `export`.
    pub fn new(export: &str) -> Self {
        let ops = [
            OpMetrics::new(export, "read"),
            OpMetrics::new(export, "write"),
            OpMetrics::new(export, "flush"),
            OpMetrics::new(export, "trim"),
            OpMetrics::new(export, "write_zeroes"),
        ];
        for op in &ops {
            op.requests.increment(0);
            op.errors.increment(0);
        }
        let bytes = |direction: &'static str| {
            let c = metrics::counter!(
                "convoy_nbd_bytes_total",
                "export" => export.to_string(),
                "direction" => direction
            );
            c.increment(0);
            c
        };
        Self {
            ops,
            read_bytes: bytes("read"),
            written_bytes: bytes("write"),
        }
    }

    /// Records one request of `op` moving `bytes` that took `elapsed`.
    pub fn record(&self, op: NbdOp, bytes: u64, elapsed: Duration, ok: bool) {
        let m = &self.ops[op as usize];
        m.requests.increment(1);
        m.seconds.record(elapsed.as_secs_f64());
        if !ok {
            m.errors.increment(1);
            return;
        }
        match op {
            NbdOp::Read => self.read_bytes.increment(bytes),
            NbdOp::Write => self.written_bytes.increment(bytes),
            NbdOp::Flush | NbdOp::Trim | NbdOp::WriteZeroes => {}
        }
    }
}

/// Records one Raft RPC: latency, and the error class when it failed.
pub fn record_rpc(kind: &'static str, elapsed: Duration, error: Option<&'static str>) {
    metrics::histogram!("convoy_raft_rpc_seconds", "rpc" => kind).record(elapsed.as_secs_f64());
    metrics::counter!("convoy_raft_rpc_total", "rpc" => kind).increment(1);
    if let Some(class) = error {
        metrics::counter!("convoy_raft_rpc_errors_total", "rpc" => kind, "error" => class)
            .increment(1);
    }
}

/// Records one command committed and applied through this node as leader.
pub fn record_write(kind: &'static str, elapsed: Duration) {
    metrics::histogram!("convoy_raft_write_seconds", "command" => kind)
        .record(elapsed.as_secs_f64());
}

/// Samples Raft state into gauges once a second, and keeps histograms trimmed.
pub fn spawn_sampler(cluster: Arc<Cluster>, handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let s = cluster.node_status().await;
            metrics::gauge!("convoy_raft_term").set(s.term as f64);
            metrics::gauge!("convoy_raft_leader_id").set(s.leader.unwrap_or(0) as f64);
            metrics::gauge!("convoy_raft_is_leader").set(if s.leader == Some(s.id) {
                1.0
            } else {
                0.0
            });
            metrics::gauge!("convoy_raft_last_log_index").set(s.last_log_index as f64);
            metrics::gauge!("convoy_raft_commit_index").set(s.commit_index as f64);
            metrics::gauge!("convoy_raft_applied_index").set(s.applied_index as f64);
            metrics::gauge!("convoy_raft_snapshot_index").set(s.snapshot_index.unwrap_or(0) as f64);
            metrics::counter!("convoy_raft_log_entries_total").absolute(s.log_entries);
            metrics::counter!("convoy_raft_log_fsyncs_total").absolute(s.log_fsyncs);
            let refused = cluster.endpoint.refusals();
            metrics::counter!("convoy_refused_peer_total", "reason" => "retired")
                .absolute(refused.retired);
            metrics::counter!("convoy_refused_peer_total", "reason" => "not_a_node")
                .absolute(refused.not_a_node);
            handle.run_upkeep();
        }
    });
}

/// Link states, in the order `convoy_replication_link_state` lists them.
const LINK_STATES: [LinkState; 4] = [
    LinkState::Syncing,
    LinkState::Consistent,
    LinkState::Inconsistent,
    LinkState::Outdated,
];

/// Families rendered from the data plane at scrape time: name, type, help.
const DATA_PLANE_FAMILIES: &[(&str, &str, &str)] = &[
    (
        "convoy_group_last_seq",
        "gauge",
        "Last sequence number the group's sequencer on this host assigned.",
    ),
    (
        "convoy_group_writes_total",
        "counter",
        "Writes the group's sequencer on this host acknowledged since it started.",
    ),
    (
        "convoy_group_written_bytes_total",
        "counter",
        "Bytes those writes changed.",
    ),
    (
        "convoy_group_throttled_total",
        "counter",
        "Times writers waited for a lagging replica (backpressure).",
    ),
    (
        "convoy_journal_bytes",
        "gauge",
        "Payload bytes the group's journal holds for its replicas.",
    ),
    (
        "convoy_replication_acked_seq",
        "gauge",
        "Highest sequence number the replica holds durably.",
    ),
    (
        "convoy_replication_lag_writes",
        "gauge",
        "Writes the replica lacks (last_seq - acked_seq), in every state: the RPO in writes.",
    ),
    (
        "convoy_replication_lag_seconds",
        "gauge",
        "Seconds since the replica last held every write (0 while it does): the RPO in time.",
    ),
    (
        "convoy_replication_link_state",
        "gauge",
        "1 for the link's committed state (syncing, consistent, inconsistent, outdated), 0 for the others.",
    ),
    (
        "convoy_replication_link_phase",
        "gauge",
        "1 for what the link's sender does now (connecting, initial-sync, seeding, resync, streaming, stopped), 0 for the others.",
    ),
    (
        "convoy_replication_resyncs_total",
        "counter",
        "Resyncs from chunks since the sequencer started (the first sync included).",
    ),
    (
        "convoy_replication_sent_bytes_total",
        "counter",
        "Bytes sent to the replica since the sequencer started.",
    ),
    (
        "convoy_replication_resync_sent_bytes_total",
        "counter",
        "Bytes of chunk data sent to the replica by resyncs and seeding.",
    ),
    (
        "convoy_disk_open_failures",
        "gauge",
        "Disks this host should hold whose image cannot be opened or has failed (a failed fsync fences it until a restart).",
    ),
    (
        "convoy_disk_open_failed",
        "gauge",
        "1 for each disk whose image cannot be opened here or has failed (see `convoy vm show`).",
    ),
];

/// Appends the data plane's per-group, per-link and per-disk families to a rendering.
/// Every family has its `# HELP` and `# TYPE` lines even without series.
pub fn render_data_plane(m: &DataPlaneMetrics, out: &mut String) {
    for (name, kind, help) in DATA_PLANE_FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        render_family(m, name, out);
        out.push('\n');
    }
}

fn render_family(m: &DataPlaneMetrics, name: &str, out: &mut String) {
    if name == "convoy_disk_open_failures" {
        sample(out, name, &[], m.disk_open_failures.len() as f64);
        return;
    }
    if name == "convoy_disk_open_failed" {
        for disk in &m.disk_open_failures {
            sample(out, name, &[("disk", &disk.to_string())], 1.0);
        }
        return;
    }
    for g in &m.groups {
        let cg = [("cg", g.cg.as_str())];
        let group_value = match name {
            "convoy_group_last_seq" => Some(g.last_seq as f64),
            "convoy_group_writes_total" => Some(g.writes as f64),
            "convoy_group_written_bytes_total" => Some(g.bytes_written as f64),
            "convoy_group_throttled_total" => Some(g.throttled as f64),
            "convoy_journal_bytes" => Some(g.journal_bytes as f64),
            _ => None,
        };
        if let Some(v) = group_value {
            sample(out, name, &cg, v);
            continue;
        }
        for l in &g.links {
            let replica = l.replica.to_string();
            let labels = [("cg", g.cg.as_str()), ("replica", replica.as_str())];
            let value = match name {
                "convoy_replication_acked_seq" => l.acked_seq as f64,
                "convoy_replication_lag_writes" => l.lag_writes as f64,
                "convoy_replication_lag_seconds" => l.lag_seconds,
                "convoy_replication_resyncs_total" => l.resyncs as f64,
                "convoy_replication_sent_bytes_total" => l.bytes_sent as f64,
                "convoy_replication_resync_sent_bytes_total" => l.resync_bytes_sent as f64,
                "convoy_replication_link_state" => {
                    for s in LINK_STATES {
                        let on = l.state == Some(s);
                        sample(
                            out,
                            name,
                            &[labels[0], labels[1], ("state", s.as_str())],
                            f64::from(u8::from(on)),
                        );
                    }
                    continue;
                }
                "convoy_replication_link_phase" => {
                    for p in LINK_PHASES {
                        let on = l.phase == p;
                        sample(
                            out,
                            name,
                            &[labels[0], labels[1], ("phase", p)],
                            f64::from(u8::from(on)),
                        );
                    }
                    continue;
                }
                _ => continue,
            };
            sample(out, name, &labels, value);
        }
    }
}

/// One sample line, label values escaped as the text format asks.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{GroupMetrics, LinkMetrics};

    /// Every metric name this agent exports (families; histograms without suffixes).
    fn exported() -> Vec<&'static str> {
        COUNTERS
            .iter()
            .chain(GAUGES)
            .chain(HISTOGRAMS)
            .map(|(n, _)| *n)
            .chain(DATA_PLANE_FAMILIES.iter().map(|(n, _, _)| *n))
            .collect()
    }

    #[test]
    fn grafana_dashboard_uses_only_metrics_the_agent_exports() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana-dashboard.json"
        );
        let text = std::fs::read_to_string(path).expect("deploy/grafana-dashboard.json");
        let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let mut exprs = Vec::new();
        for panel in dash["panels"].as_array().expect("panels") {
            for t in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(t["expr"].as_str().expect("expr").to_string());
            }
        }
        assert!(exprs.len() >= 10, "the dashboard has too few queries");
        let known = exported();
        let histograms: Vec<&str> = HISTOGRAMS.iter().map(|(n, _)| *n).collect();
        let mut used = std::collections::BTreeSet::new();
        for e in &exprs {
            for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("convoy_") {
                    continue;
                }
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s).filter(|f| histograms.contains(f)))
                    .unwrap_or(word);
                assert!(
                    known.contains(&family),
                    "dashboard query `{e}` uses `{word}`, which the agent does not export"
                );
                used.insert(family);
            }
        }
        for needed in [
            "convoy_replication_lag_writes",
            "convoy_replication_lag_seconds",
            "convoy_replication_link_state",
            "convoy_replication_resyncs_total",
            "convoy_replication_sent_bytes_total",
            "convoy_journal_bytes",
            "convoy_nbd_requests_total",
            "convoy_nbd_request_seconds",
            "convoy_nbd_bytes_total",
            "convoy_stale_epoch_refused_total",
            "convoy_replica_refused_total",
            "convoy_disk_open_failures",
        ] {
            assert!(used.contains(needed), "the dashboard shows no `{needed}`");
        }
    }

    #[test]
    fn every_histogram_renders_with_buckets_and_every_metric_has_help() {
        let recorder = builder().expect("builder").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_and_register();
            let m = ExportMetrics::new("disk-1");
            m.record(NbdOp::Write, 4096, Duration::from_micros(300), true);
            m.record(NbdOp::Read, 512, Duration::from_micros(80), false);
            for (name, _) in HISTOGRAMS {
                metrics::histogram!(*name).record(0.002);
            }
        });
        let text = handle.render();
        assert!(!text.contains("summary"), "{text}");
        for (name, _) in HISTOGRAMS {
            assert!(
                text.contains(&format!("# TYPE {name} histogram")),
                "{name} is not a histogram:\n{text}"
            );
            assert!(text.contains(&format!("{name}_bucket")), "{text}");
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no # HELP line"
            );
        }
        for place in STALE_EPOCH_WHERE {
            assert!(text.contains(&format!(
                "convoy_stale_epoch_refused_total{{where=\"{place}\"}} 0"
            )));
        }
        assert!(
            text.contains("convoy_nbd_bytes_total{export=\"disk-1\",direction=\"write\"} 4096"),
            "{text}"
        );
        assert!(
            text.contains("convoy_nbd_request_errors_total{export=\"disk-1\",op=\"read\"} 1"),
            "{text}"
        );
        // A failed read moved no bytes.
        assert!(
            text.contains("convoy_nbd_bytes_total{export=\"disk-1\",direction=\"read\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn data_plane_families_render_each_link_with_escaped_labels() {
        let m = DataPlaneMetrics {
            groups: vec![GroupMetrics {
                cg: "sh\"op".into(),
                last_seq: 11,
                journal_bytes: 4096,
                links: vec![LinkMetrics {
                    replica: 2,
                    state: Some(LinkState::Outdated),
                    phase: "connecting".into(),
                    acked_seq: 3,
                    lag_writes: 8,
                    lag_seconds: 2.5,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            disk_open_failures: vec![7],
        };
        let mut text = String::new();
        render_data_plane(&m, &mut text);
        for line in [
            "convoy_replication_lag_writes{cg=\"sh\\\"op\",replica=\"2\"} 8",
            "convoy_replication_lag_seconds{cg=\"sh\\\"op\",replica=\"2\"} 2.5",
            "convoy_replication_link_state{cg=\"sh\\\"op\",replica=\"2\",state=\"outdated\"} 1",
            "convoy_replication_link_state{cg=\"sh\\\"op\",replica=\"2\",state=\"consistent\"} 0",
            "convoy_replication_link_phase{cg=\"sh\\\"op\",replica=\"2\",phase=\"connecting\"} 1",
            "convoy_journal_bytes{cg=\"sh\\\"op\"} 4096",
            "convoy_disk_open_failures 1",
            "convoy_disk_open_failed{disk=\"7\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        // Without groups every family still has its help and type.
        let mut empty = String::new();
        render_data_plane(&DataPlaneMetrics::default(), &mut empty);
        for (name, kind, _) in DATA_PLANE_FAMILIES {
            assert!(empty.contains(&format!("# HELP {name} ")));
            assert!(empty.contains(&format!("# TYPE {name} {kind}")));
        }
    }
}

//! Prometheus metrics: one recorder per agent process, rendered at `/metrics`.
//!
//! Names (all prefixed `convoy_`): Raft state gauges sampled every second, RPC counters and
//! latency histograms from the Raft network, write latencies on the leader, peers the
//! transport refused (`convoy_refused_peer_total{reason="retired"|"not_a_node"}`), when
//! this agent's certificate expires (`convoy_tls_cert_not_after_seconds`, Unix time), and
//! FLUSHes of VMs running on other hosts that this host's sequencers made durable on
//! every promised copy (`convoy_mirror_flushes_total`).

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::node::service::Cluster;

/// Installs the process-wide recorder and returns the handle `/metrics` renders.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)?
        .install_recorder()?;
    Ok(handle)
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

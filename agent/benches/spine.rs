//! Cluster spine benchmark: leader failover time and metadata write throughput (`vm stop`, a
//! pure metadata command; VM creation with disk provisioning reported apart) on a real
//! 3-agent `convoy dev` cluster (fsync on). Prints figures; asserts nothing about speed.
//!
//! Run: `cargo bench -p convoy-agent --bench spine --profile dev`
//!
//! Baseline measured in the same run: the disk's fsync latency, which is what one write per
//! fsync would cost; the throughput rows report their gain over that ceiling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Dev, rt, wait_for};
use convoy_agent::api::types::{CreateVmRequest, NodeStatus, VmView};
use convoy_agent::client::AdminClient;

const KILLS: usize = 12;
const RUN_FOR: Duration = Duration::from_secs(5);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Average latency of write+fsync of 4 KiB on the disk holding `dir`.
fn fsync_latency(dir: &std::path::Path) -> Duration {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = [7u8; 4096];
    let n = 200;
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
    }
    let _ = std::fs::remove_file(&path);
    start.elapsed() / n
}

fn create(name: String, host: u64) -> CreateVmRequest {
    CreateVmRequest {
        name,
        host,
        disks: vec![1 << 20],
        workload: None,
        qemu: None,
        request_id: Some(format!("{:032x}", rand::random::<u128>())),
    }
}

/// What each benchmark write is.
#[derive(Clone, Copy)]
enum Op {
    /// `POST /v1/vms/{vm}/stop` on the client's own VM: a pure metadata command through the
    /// whole path (API, forwarding, Raft, state machine) with no side effect on any host.
    Stop,
    /// `POST /v1/vms`: also provisions the VM's disk image on its host.
    Create,
}

/// Runs `clients` concurrent writers against `addrs` for RUN_FOR; returns (writes, writes/s).
async fn throughput(
    dev: &Dev,
    addrs: Vec<std::net::SocketAddr>,
    clients: usize,
    tag: &str,
    op: Op,
) -> (u64, f64) {
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + RUN_FOR;
    let e = &dev.file.env;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = AdminClient::from_files(
            addrs.clone(),
            std::path::Path::new(&e["CONVOY_CA"]),
            std::path::Path::new(&e["CONVOY_CERT"]),
            std::path::Path::new(&e["CONVOY_KEY"]),
        )
        .unwrap();
        let counter = Arc::clone(&counter);
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let _: VmView = match op {
                    Op::Stop => client
                        .post(&format!("/v1/vms/bench-{c}/stop"), &serde_json::json!({}))
                        .await
                        .unwrap(),
                    Op::Create => client
                        .post("/v1/vms", &create(format!("{tag}-{c}-{i}"), 1))
                        .await
                        .unwrap(),
                };
                counter.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let n = counter.load(Ordering::Relaxed);
    (n, n as f64 / start.elapsed().as_secs_f64())
}

fn main() {
    let dev = Dev::start(3, &[]);
    let rt = rt();
    let fsync = fsync_latency(dev.dir.path());
    let leader = wait_for("a leader", Duration::from_secs(15), || dev.leader());
    let leader_addr: std::net::SocketAddr = dev.node(leader).admin_addr.parse().unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let follower_addr: std::net::SocketAddr = dev.node(follower).admin_addr.parse().unwrap();

    // Throughput.
    // One VM per client, created up front.
    rt.block_on(async {
        let client = dev.client();
        for c in 0..32 {
            let _: VmView = client
                .post("/v1/vms", &create(format!("bench-{c}"), 1))
                .await
                .unwrap();
        }
    });
    let before: NodeStatus = rt.block_on(dev.client_at(leader).get("/v1/node")).unwrap();
    let one = rt.block_on(throughput(&dev, vec![leader_addr], 1, "one", Op::Stop));
    let mid: NodeStatus = rt.block_on(dev.client_at(leader).get("/v1/node")).unwrap();
    let many = rt.block_on(throughput(&dev, vec![leader_addr], 32, "many", Op::Stop));
    let after: NodeStatus = rt.block_on(dev.client_at(leader).get("/v1/node")).unwrap();
    let via_follower = rt.block_on(throughput(&dev, vec![follower_addr], 32, "fwd", Op::Stop));
    let (_, creates) = rt.block_on(throughput(
        &dev,
        vec![leader_addr],
        32,
        "create",
        Op::Create,
    ));
    // Writes per WAL fsync on the leader: the group-commit factor.
    let batch = |writes: u64, a: &NodeStatus, b: &NodeStatus| {
        writes as f64 / ((b.log_fsyncs - a.log_fsyncs).max(1)) as f64
    };
    let ((n_one, one), (n_many, many), (_, via_follower)) = (one, many, via_follower);

    // Failover: SIGKILL the leader, then time until a write sent to a survivor commits.
    let mut times = Vec::new();
    for k in 0..KILLS {
        let leader = wait_for("a leader", Duration::from_secs(15), || dev.leader());
        let survivors: Vec<std::net::SocketAddr> = dev
            .file
            .nodes
            .iter()
            .filter(|n| n.id != leader)
            .map(|n| n.admin_addr.parse().unwrap())
            .collect();
        let client = AdminClient::from_files(
            survivors,
            std::path::Path::new(&dev.file.env["CONVOY_CA"]),
            std::path::Path::new(&dev.file.env["CONVOY_CERT"]),
            std::path::Path::new(&dev.file.env["CONVOY_KEY"]),
        )
        .unwrap();
        // Warm the client's connection so the measurement excludes the TLS handshake.
        let _: Vec<VmView> = rt.block_on(client.get("/v1/vms?local=true")).unwrap();
        dev.kill(leader);
        let killed = Instant::now();
        let _: VmView = rt
            .block_on(client.post("/v1/vms", &create(format!("failover-{k}"), 2)))
            .unwrap();
        let took = killed.elapsed();
        eprintln!(
            "kill {k}: leader {leader}, next committed write after {:.0} ms",
            ms(took)
        );
        times.push(took);
        dev.restart(leader);
        dev.wait_caught_up(leader, Duration::from_secs(30));
    }
    times.sort();

    let ceiling = 1.0 / fsync.as_secs_f64();
    println!();
    println!(
        "Convoy spine benchmark: 3 agents on {}, fsync on, 2-core machine",
        dev.ip
    );
    println!(
        "baseline: 4 KiB write+fsync on this disk {:.3} ms -> one write per fsync caps at {:.0} writes/s",
        ms(fsync),
        ceiling
    );
    println!(
        "{:<46} {:>10} {:>14} {:>10}",
        "measure", "value", "vs baseline", "target"
    );
    println!(
        "{:<46} {:>7.0} ms {:>14} {:>10}",
        format!("failover p50 ({KILLS} SIGKILLs of the leader)"),
        ms(percentile(&times, 50.0)),
        "",
        ""
    );
    println!(
        "{:<46} {:>7.0} ms {:>14} {:>10}",
        "failover p99",
        ms(percentile(&times, 99.0)),
        "",
        "< 1000 ms"
    );
    println!(
        "{:<46} {:>10.0} {:>13.2}x {:>10}",
        format!(
            "writes/s, 1 client ({:.1} writes/fsync)",
            batch(n_one, &before, &mid)
        ),
        one,
        one / ceiling,
        ""
    );
    println!(
        "{:<46} {:>10.0} {:>13.2}x {:>10}",
        format!(
            "writes/s, 32 clients ({:.1} writes/fsync)",
            batch(n_many, &mid, &after)
        ),
        many,
        many / ceiling,
        ">= 2000"
    );
    println!(
        "{:<46} {:>10.0} {:>13.2}x {:>10}",
        "writes/s, 32 clients via a follower",
        via_follower,
        via_follower / ceiling,
        ""
    );
    println!(
        "{:<46} {:>10.0} {:>13.2}x {:>10}",
        "vm creates/s with disk provisioning, 32 cl.",
        creates,
        creates / ceiling,
        ""
    );
    dev.assert_no_panics();
}

//! `convoy dev`: a local cluster of real agent processes on a loopback address.
//!
//! It creates a CA and certificates, writes one agent config per node, starts each agent as
//! its own OS process, forms the cluster through the admin API exactly as an operator
//! would (`init`, then `add-node` for each other node), writes `DIR/cluster.json`, and
//! stays in the foreground until SIGINT/SIGTERM, when it stops its agents.
//!
//! Running it again on the same directory restarts the same cluster with its data.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::api::types::{AddNodeRequest, ClusterStatus, NodeStatus};
use crate::client::AdminClient;
use crate::config::{AdvertiseConfig, AgentConfig, ListenConfig, RaftConfig, TlsConfig};
use convoy_transport::pki;

/// Environment variable that makes an agent exit when its parent (`convoy dev`) dies.
pub const PARENT_PID_ENV: &str = "CONVOY_DEV_PARENT_PID";

#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Number of agents (1 to 9).
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Directory for certificates, configs, data, logs and cluster.json.
    #[arg(long, default_value = "convoy-dev")]
    pub data_dir: PathBuf,
    /// Loopback address the agents listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub ip: IpAddr,
    /// Build a Raft snapshot after this many log entries (small values exercise compaction).
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Replication journal limit per group in MiB (small values exercise dirty-chunk resync).
    #[arg(long)]
    pub journal_limit_mib: Option<u64>,
    /// Milliseconds a write waits for a synchronous replica before the link is marked
    /// outdated (small values make a slow replica's consequences quick to see).
    #[arg(long)]
    pub sync_timeout_ms: Option<u64>,
    /// Seconds a former replica's copy is kept after its link was removed (0: collect it
    /// at once).
    #[arg(long)]
    pub keep_former_copies_secs: Option<u64>,
    /// Seconds a sequencer back from a crash waits for its synchronous replica's data
    /// before going on with its own copy.
    #[arg(long)]
    pub crash_pull_wait_secs: Option<u64>,
    /// Milliseconds a QEMU guest gets to power off after an ACPI power-down before QEMU
    /// is made to quit (`vm stop`).
    #[arg(long)]
    pub qemu_powerdown_timeout_ms: Option<u64>,
    /// MiB/s a QEMU guest's live migration may use (0: QEMU's default).
    #[arg(long)]
    pub qemu_migrate_bandwidth_mib: Option<u64>,
}

/// One agent in `cluster.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevNode {
    /// Node id.
    pub id: u64,
    /// OS process id of its agent.
    pub pid: u32,
    /// Admin API address.
    pub admin_addr: String,
    /// QUIC address.
    pub raft_addr: String,
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// Its config file (restart it with `convoy agent --config FILE`).
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

/// `DIR/cluster.json`: what a user or test needs to drive the dev cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    /// Pid of `convoy dev` itself.
    pub dev_pid: u32,
    /// The agents.
    pub nodes: Vec<DevNode>,
    /// Environment for the CLI (`CONVOY_ADDR`, `CONVOY_CA`, `CONVOY_CERT`, `CONVOY_KEY`).
    pub env: BTreeMap<String, String>,
}

/// Picks `n` distinct free ports (UDP or TCP) on `ip`. The probe sockets stay open until
/// all are picked, so the same port is never handed out twice in one call; another process
/// can still take one before the agent binds it, which `start_and_form` handles by retrying.
fn free_ports(ip: IpAddr, udp: bool, n: usize) -> Result<Vec<u16>> {
    let addr = SocketAddr::new(ip, 0);
    let mut udp_socks = Vec::new();
    let mut tcp_socks = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..n {
        let port = if udp {
            let s = std::net::UdpSocket::bind(addr)?;
            let p = s.local_addr()?.port();
            udp_socks.push(s);
            p
        } else {
            let s = std::net::TcpListener::bind(addr)?;
            let p = s.local_addr()?.port();
            tcp_socks.push(s);
            p
        };
        ports.push(port);
    }
    Ok(ports)
}

/// Writes (or reuses) the config of node `id`; returns its path.
fn node_config(dir: &Path, pki: &Path, id: u64, args: &DevArgs) -> Result<(PathBuf, AgentConfig)> {
    let node_dir = dir.join(format!("node-{id}"));
    let path = node_dir.join("agent.toml");
    if path.exists() {
        let cfg = AgentConfig::load(&path)?;
        return Ok((path, cfg));
    }
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("cannot create {}", node_dir.display()))?;
    let raft_port = free_ports(args.ip, true, 1)?[0];
    let tcp_ports = free_ports(args.ip, false, 2)?;
    let mut raft = RaftConfig::default();
    if let Some(n) = args.snapshot_every {
        raft.snapshot_every = n;
        raft.keep_after_snapshot = (n / 2).max(1);
    }
    let cfg = AgentConfig {
        node_id: id,
        data_dir: node_dir.join("data"),
        listen: ListenConfig {
            raft: SocketAddr::new(args.ip, raft_port),
            admin: SocketAddr::new(args.ip, tcp_ports[0]),
            metrics: None,
        },
        advertise: AdvertiseConfig::default(),
        tls: TlsConfig {
            ca: pki.join("ca.crt"),
            cert: pki.join(format!("node-{id}.crt")),
            key: pki.join(format!("node-{id}.key")),
        },
        raft,
        peers: Vec::new(),
        nbd: crate::config::NbdConfig {
            socket_dir: node_dir.join("run"),
            tcp: Some(SocketAddr::new(args.ip, tcp_ports[1])),
            ..Default::default()
        },
        replication: crate::config::ReplicationConfig {
            journal_limit_mib: args
                .journal_limit_mib
                .unwrap_or(crate::config::ReplicationConfig::default().journal_limit_mib),
            keep_former_copies_secs: args
                .keep_former_copies_secs
                .unwrap_or(crate::config::ReplicationConfig::default().keep_former_copies_secs),
            sync_timeout_ms: args
                .sync_timeout_ms
                .unwrap_or(crate::config::ReplicationConfig::default().sync_timeout_ms),
            crash_pull_wait_secs: args
                .crash_pull_wait_secs
                .unwrap_or(crate::config::ReplicationConfig::default().crash_pull_wait_secs),
        },
        qemu: crate::config::QemuConfig {
            powerdown_timeout_ms: args
                .qemu_powerdown_timeout_ms
                .unwrap_or(crate::config::QemuConfig::default().powerdown_timeout_ms),
            migrate_max_bandwidth_mib: args.qemu_migrate_bandwidth_mib.unwrap_or(0),
            ..Default::default()
        },
    };
    convoy_codec::file::durable_write(&path, cfg.to_toml()?.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((path, cfg))
}

fn pid_alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

fn spawn_agent(config: &Path, log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("cannot find the convoy binary")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(exe)
        .arg("agent")
        .arg("--config")
        .arg(config)
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("cannot start an agent process")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn wait_healthy(
    client: &AdminClient,
    child: &mut Child,
    log: &Path,
    deadline: Instant,
) -> Result<()> {
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "agent exited during start ({status}); last lines of {}:\n{}",
                log.display(),
                tail(log, 20)
            );
        }
        if client.get::<NodeStatus>("/v1/node").await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "agent did not answer within 30s; last lines of {}:\n{}",
                log.display(),
                tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `convoy dev` until SIGINT/SIGTERM.
pub async fn run(args: DevArgs) -> Result<()> {
    if !(1..=9).contains(&args.nodes) {
        bail!("--nodes must be 1 to 9 (got {})", args.nodes);
    }
    if !args.ip.is_loopback() {
        bail!(
            "--ip must be a loopback address (127.x.y.z or ::1): dev clusters never listen on the network"
        );
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let dir = std::fs::canonicalize(&args.data_dir)?;
    let cluster_json = dir.join("cluster.json");
    if let Ok(text) = std::fs::read_to_string(&cluster_json) {
        if let Ok(old) = serde_json::from_str::<ClusterFile>(&text) {
            if old.dev_pid != std::process::id() && pid_alive(old.dev_pid) {
                bail!(
                    "convoy dev is already running on {} (pid {}); stop it first",
                    dir.display(),
                    old.dev_pid
                );
            }
            for n in &old.nodes {
                if pid_alive(n.pid)
                    && std::fs::read_to_string(format!("/proc/{}/cmdline", n.pid))
                        .is_ok_and(|c| c.contains("agent"))
                {
                    bail!(
                        "agent of node {} from a previous run is still running (pid {}); stop it first",
                        n.id,
                        n.pid
                    );
                }
            }
        }
    }

    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(100));

    spinner.set_message("certificates");
    let pki_dir = dir.join("pki");
    if !pki_dir.join("ca.crt").exists() {
        crate::certs::init_ca(&pki_dir, "convoy dev CA", false, pki::DEFAULT_CA_LIFETIME)?;
    }
    for id in 1..=args.nodes {
        if !pki_dir.join(format!("node-{id}.crt")).exists() {
            crate::certs::issue_node(
                &pki_dir,
                id,
                &[args.ip.to_string()],
                &pki_dir,
                pki::DEFAULT_CERT_LIFETIME,
            )?;
        }
    }
    if !pki_dir.join("client-admin.crt").exists() {
        crate::certs::issue_client(&pki_dir, "admin", &pki_dir, pki::DEFAULT_CERT_LIFETIME)?;
    }
    // The agents' NBD TCP listeners take TLS only: credentials for QEMU and libnbd.
    let nbd_client = pki_dir.join("nbd-client");
    if !nbd_client.join("client-cert.pem").exists() {
        crate::certs::issue_nbd_client(&pki_dir, "dev", &nbd_client, pki::DEFAULT_CERT_LIFETIME)?;
    }
    let (ca, cert, key) = (
        pki_dir.join("ca.crt"),
        pki_dir.join("client-admin.crt"),
        pki_dir.join("client-admin.key"),
    );

    let mut children: Vec<(u64, Child, DevNode)> = Vec::new();
    let result = start_and_form(
        &args,
        &dir,
        &pki_dir,
        (&ca, &cert, &key),
        &spinner,
        &mut children,
    )
    .await;
    spinner.finish_and_clear();
    if let Err(e) = result {
        stop_all(&mut children);
        return Err(e);
    }

    let addrs: Vec<String> = children
        .iter()
        .map(|(_, _, n)| n.admin_addr.clone())
        .collect();
    let env = BTreeMap::from([
        ("CONVOY_ADDR".to_string(), addrs.join(",")),
        ("CONVOY_CA".to_string(), ca.display().to_string()),
        ("CONVOY_CERT".to_string(), cert.display().to_string()),
        ("CONVOY_KEY".to_string(), key.display().to_string()),
    ]);
    let file = ClusterFile {
        dev_pid: std::process::id(),
        nodes: children.iter().map(|(_, _, n)| n.clone()).collect(),
        env,
    };
    convoy_codec::file::durable_write(
        &cluster_json,
        serde_json::to_string_pretty(&file)?.as_bytes(),
    )
    .with_context(|| format!("cannot write {}", cluster_json.display()))?;

    println!(
        "Convoy dev cluster: {} node(s), data in {}",
        args.nodes,
        dir.display()
    );
    for n in &file.nodes {
        println!(
            "  node {}  pid {:>7}  admin {}  raft {}  log {}",
            n.id,
            n.pid,
            n.admin_addr,
            n.raft_addr,
            n.log.display()
        );
    }
    println!();
    println!("Paste into another shell to use the CLI:");
    for (k, v) in &file.env {
        println!("export {k}={v}");
    }
    println!();
    println!(
        "Then try:  convoy cluster status   convoy vm create web --host 1 --disk 64MiB   convoy vm list"
    );
    println!(
        "NBD over TCP takes TLS only; client credentials: {} (nbdinfo 'nbds://IP:PORT/disk-1?tls-certificates={}')",
        nbd_client.display(),
        nbd_client.display()
    );
    println!(
        "Cluster file: {}. Press Ctrl-C to stop the agents.",
        cluster_json.display()
    );

    let outcome = supervise(&mut children).await;
    stop_all(&mut children);
    let _ = std::fs::remove_file(&cluster_json);
    println!("stopped");
    outcome
}

async fn start_and_form(
    args: &DevArgs,
    dir: &Path,
    pki_dir: &Path,
    (ca, cert, key): (&Path, &Path, &Path),
    spinner: &ProgressBar,
    children: &mut Vec<(u64, Child, DevNode)>,
) -> Result<()> {
    let mut clients = Vec::new();
    for id in 1..=args.nodes {
        // A port picked for a fresh node can be taken by another process before the
        // agent binds it: then start the node again on new ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            spinner.set_message(format!("starting agent {id}"));
            let fresh = !dir.join(format!("node-{id}")).join("agent.toml").exists();
            let (config_path, cfg) = node_config(dir, pki_dir, id, args)?;
            let log = dir.join(format!("node-{id}")).join("agent.log");
            let mut child = spawn_agent(&config_path, &log)?;
            let client = AdminClient::from_files(vec![cfg.advertised_admin()], ca, cert, key)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            match wait_healthy(&client, &mut child, &log, deadline).await {
                Ok(()) => {
                    let node = DevNode {
                        id,
                        pid: child.id(),
                        admin_addr: cfg.advertised_admin().to_string(),
                        raft_addr: cfg.advertised_raft().to_string(),
                        data_dir: cfg.data_dir.clone(),
                        config: config_path,
                        log,
                    };
                    clients.push(client);
                    children.push((id, child, node));
                    break;
                }
                Err(e) if fresh && attempt < 3 && tail(&log, 20).contains("cannot") => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tracing::warn!(node = id, error = %e, "agent did not start; retrying on other ports");
                    let _ = std::fs::remove_file(&config_path);
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        }
    }
    let first = &clients[0];
    let status: ClusterStatus = first.get("/v1/cluster").await?;
    if !status.initialized {
        spinner.set_message("initializing the cluster on node 1");
        let _: ClusterStatus = first
            .post("/v1/cluster/init", &serde_json::json!({}))
            .await?;
    }
    let status: ClusterStatus = first.get("/v1/cluster").await?;
    for (_, _, node) in children.iter().skip(1) {
        if status.voters.contains(&node.id) {
            continue;
        }
        spinner.set_message(format!("adding node {} (learner, then voter)", node.id));
        let req = AddNodeRequest {
            id: node.id,
            raft_addr: node.raft_addr.clone(),
            admin_addr: node.admin_addr.clone(),
            timeout_secs: None,
        };
        let _: ClusterStatus = first
            .post("/v1/cluster/nodes", &req)
            .await
            .with_context(|| format!("cannot add node {}", node.id))?;
    }
    Ok(())
}

/// Waits for SIGINT/SIGTERM; reports agents that exit meanwhile (they are not restarted:
/// killing one is how you try a failover).
async fn supervise(children: &mut [(u64, Child, DevNode)]) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut reported = vec![false; children.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            r = tokio::signal::ctrl_c() => return r.context("cannot wait for Ctrl-C"),
            _ = tick.tick() => {
                for (i, (id, child, node)) in children.iter_mut().enumerate() {
                    if !reported[i] {
                        if let Ok(Some(status)) = child.try_wait() {
                            eprintln!("node {id} (pid {}) exited: {status}; log: {}", node.pid, node.log.display());
                            reported[i] = true;
                        }
                    }
                }
            }
        }
    }
}

/// SIGTERM every agent, then SIGKILL what is left after 10 s.
fn stop_all(children: &mut [(u64, Child, DevNode)]) {
    for (_, child, _) in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (_, child, _) in children.iter_mut() {
        while let Ok(None) = child.try_wait() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// In an agent started by `convoy dev`: exit when `convoy dev` dies, so a killed dev
/// session leaves no orphans.
pub fn die_with_dev_parent() {
    let Ok(parent) = std::env::var(PARENT_PID_ENV) else {
        return;
    };
    let Ok(parent) = parent.parse::<i32>() else {
        return;
    };
    if nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).is_err() {
        return;
    }
    // The parent may have died before prctl took effect.
    if nix::unistd::getppid() != Pid::from_raw(parent) {
        std::process::exit(1);
    }
}

//! Test harness: real `convoy` processes on a loopback address of their own.
//!
//! Each [`Dev`] runs `convoy dev` (which starts one agent process per node) on a unique
//! 127.x.y.z address, so tests never collide on ports and traffic stays on loopback. Tests
//! drive the cluster through the CLI (the contract operators use) or the admin client, and
//! wait on observable state with deadlines, never bare sleeps. Dropping a `Dev` stops every
//! process it started.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod data;
pub mod qemu_guest;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use convoy_agent::client::AdminClient;
use convoy_agent::dev::ClusterFile;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Path of the `convoy` binary under test.
pub fn convoy_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_convoy"))
}

/// A loopback address no other test in this run uses.
pub fn unique_ip() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(
        127,
        (pid >> 8) as u8 | 1,
        pid as u8,
        (n % 250 + 2) as u8,
    ))
}

/// Polls `f` until it returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Result of one CLI run.
#[derive(Debug)]
pub struct CliRun {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    fn from(out: Output) -> Self {
        CliRun {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Parses stdout as JSON, panicking with the output on failure.
    pub fn json(&self) -> Value {
        assert!(self.ok, "command failed: {}\n{}", self.stderr, self.stdout);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `convoy ARGS` with `env`, killed after 90 s.
pub fn run_convoy(args: &[&str], env: &[(String, String)]) -> CliRun {
    let mut cmd = Command::new("timeout");
    cmd.arg("-s")
        .arg("KILL")
        .arg("90")
        .arg(convoy_bin())
        .args(args);
    for k in [
        "CONVOY_ADDR",
        "CONVOY_CA",
        "CONVOY_CERT",
        "CONVOY_KEY",
        "CONVOY_LOG",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    CliRun::from(cmd.stdin(Stdio::null()).output().expect("run convoy"))
}

/// Cluster tests in one test binary run one at a time: several 3-agent clusters on a
/// 2-core machine would starve each other's heartbeats and make timings meaningless.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A dev cluster started by `convoy dev`.
pub struct Dev {
    _turn: std::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    pub ip: IpAddr,
    dev: Mutex<Option<Child>>,
    pub file: ClusterFile,
    /// Agents this test restarted itself (not children of `convoy dev`), by node id.
    restarted: Mutex<HashMap<u64, Child>>,
}

impl Dev {
    /// Starts `convoy dev --nodes N` plus `extra` flags and waits for `cluster.json`.
    pub fn start(nodes: u64, extra: &[&str]) -> Dev {
        Dev::start_prepared(nodes, extra, |_| {})
    }

    /// Like [`Dev::start`], with `prepare` run on the cluster directory first (to place a
    /// node's data elsewhere, say, before `convoy dev` creates it).
    #[allow(dead_code)]
    pub fn start_prepared(nodes: u64, extra: &[&str], prepare: impl FnOnce(&Path)) -> Dev {
        Dev::start_with(nodes, extra, prepare, &[])
    }

    /// Like [`Dev::start`], with `env` set for `convoy dev` and the agents it starts.
    #[allow(dead_code)]
    pub fn start_with_env(nodes: u64, extra: &[&str], env: &[(&str, &str)]) -> Dev {
        Dev::start_with(nodes, extra, |_| {}, env)
    }

    fn start_with(
        nodes: u64,
        extra: &[&str],
        prepare: impl FnOnce(&Path),
        env: &[(&str, &str)],
    ) -> Dev {
        let turn = ONE_CLUSTER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        prepare(dir.path());
        let ip = unique_ip();
        let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
        let mut child = Command::new(convoy_bin())
            .arg("dev")
            .arg("--nodes")
            .arg(nodes.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--ip")
            .arg(ip.to_string())
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start convoy dev");
        let json = dir.path().join("cluster.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        let file: ClusterFile = loop {
            if let Ok(text) = std::fs::read_to_string(&json) {
                if let Ok(f) = serde_json::from_str(&text) {
                    break f;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
                panic!("convoy dev exited ({status}) before the cluster formed:\n{log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
                panic!("convoy dev did not form the cluster within 60s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Dev {
            _turn: turn,
            dir,
            ip,
            dev: Mutex::new(Some(child)),
            file,
            restarted: Mutex::new(HashMap::new()),
        }
    }

    /// The CLI environment `convoy dev` exported.
    pub fn env(&self) -> Vec<(String, String)> {
        self.file
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The CLI environment pointed at one node only.
    pub fn env_for(&self, id: u64) -> Vec<(String, String)> {
        let mut env = self.env();
        for (k, v) in env.iter_mut() {
            if k == "CONVOY_ADDR" {
                *v = self.node(id).admin_addr.clone();
            }
        }
        env
    }

    pub fn node(&self, id: u64) -> &convoy_agent::dev::DevNode {
        self.file
            .nodes
            .iter()
            .find(|n| n.id == id)
            .expect("node id")
    }

    /// Creates VM `vm` on node 1 with one disk of `disk` and a simulated guest running
    /// `workload` (not started).
    pub fn create_writing_vm(&self, vm: &str, disk: &str, workload: &str) {
        let r = self.cli(&[
            "vm",
            "create",
            vm,
            "--host",
            "1",
            "--disk",
            disk,
            "--workload",
            workload,
        ]);
        assert!(r.ok, "vm create {vm}: {r:?}");
    }

    /// Runs the CLI against the whole cluster.
    pub fn cli(&self, args: &[&str]) -> CliRun {
        run_convoy(args, &self.env())
    }

    /// Runs the CLI against one node.
    pub fn cli_at(&self, id: u64, args: &[&str]) -> CliRun {
        run_convoy(args, &self.env_for(id))
    }

    /// An in-process admin client over all nodes (faster than the CLI for bulk work).
    pub fn client(&self) -> AdminClient {
        let addrs: Vec<SocketAddr> = self
            .file
            .nodes
            .iter()
            .map(|n| n.admin_addr.parse().unwrap())
            .collect();
        self.client_over(addrs)
    }

    /// An in-process admin client for one node.
    pub fn client_at(&self, id: u64) -> AdminClient {
        self.client_over(vec![self.node(id).admin_addr.parse().unwrap()])
    }

    /// `/metrics` of node `id`, through its admin API; `None` if it does not answer.
    pub fn metrics(&self, id: u64) -> Option<String> {
        let body = rt()
            .block_on(
                self.client_at(id)
                    .send(hyper::Method::GET, "/metrics", None),
            )
            .ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    }

    /// Writes `vm`'s simulated guest has acknowledged; 0 while the cluster cannot answer
    /// (an election, say).
    pub fn writes_acked(&self, vm: &str) -> u64 {
        let r = self.cli(&["vm", "show", vm, "-o", "json"]);
        if !r.ok {
            return 0;
        }
        r.json()["guest_stats"]["writes_acked"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits up to `within` until `vm`'s guest acknowledged `more` writes beyond now.
    pub fn wait_more_writes(&self, vm: &str, more: u64, within: Duration) {
        let start = self.writes_acked(vm);
        wait_for(&format!("{more} more writes of {vm}"), within, || {
            (self.writes_acked(vm) >= start + more).then_some(())
        });
    }

    /// Refusals of stale writers counted by node `id` (stale epochs at the export,
    /// sequencer or replica; replica streams and mirrored writes from a host that no
    /// longer may send); 0 if it does not answer.
    pub fn stale_writes_refused(&self, id: u64) -> u64 {
        self.metrics(id)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.starts_with("convoy_stale_epoch_refused_total")
                    || l.starts_with("convoy_replica_refused_total")
                    || l.starts_with("convoy_mirror_refused_total")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn client_over(&self, addrs: Vec<SocketAddr>) -> AdminClient {
        let e = &self.file.env;
        AdminClient::from_files(
            addrs,
            Path::new(&e["CONVOY_CA"]),
            Path::new(&e["CONVOY_CERT"]),
            Path::new(&e["CONVOY_KEY"]),
        )
        .expect("admin client")
    }

    /// `cluster status -o json`, or None if it failed.
    pub fn status(&self) -> Option<Value> {
        let r = self.cli(&["cluster", "status", "-o", "json"]);
        r.ok.then(|| r.json())
    }

    /// The current leader according to `cluster status`.
    pub fn leader(&self) -> Option<u64> {
        self.status().and_then(|s| s["leader"].as_u64())
    }

    /// `cluster node -o json` of one node.
    pub fn node_status(&self, id: u64) -> Option<Value> {
        let r = self.cli_at(id, &["cluster", "node", "-o", "json"]);
        r.ok.then(|| r.json())
    }

    /// The pid currently running node `id`.
    pub fn pid(&self, id: u64) -> u32 {
        match self.restarted.lock().unwrap().get(&id) {
            Some(c) => c.id(),
            None => self.node(id).pid,
        }
    }

    /// SIGKILLs node `id`'s agent and waits until the process is gone.
    pub fn kill(&self, id: u64) {
        let pid = self.pid(id);
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        if let Some(mut c) = self.restarted.lock().unwrap().remove(&id) {
            let _ = c.wait();
        }
        wait_for(
            &format!("pid {pid} to exit"),
            Duration::from_secs(10),
            || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // Gone, or a zombie waiting for `convoy dev` to reap it.
                (stat.is_empty() || stat.contains(") Z")).then_some(())
            },
        );
    }

    /// Restarts node `id` on its data dir with its config (as an operator would).
    pub fn restart(&self, id: u64) {
        self.restart_with_env(id, &[]);
    }

    /// [`Dev::restart`] with `env` set for the agent (fault injection, say).
    pub fn restart_with_env(&self, id: u64, env: &[(&str, &str)]) {
        let node = self.node(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let child = Command::new(convoy_bin())
            .arg("agent")
            .arg("--config")
            .arg(&node.config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("restart agent");
        self.restarted.lock().unwrap().insert(id, child);
        wait_for(
            &format!("node {id} to answer after restart"),
            Duration::from_secs(30),
            || self.node_status(id).map(|_| ()),
        );
    }

    /// Waits until node `id` has applied everything the leader had committed when called.
    pub fn wait_caught_up(&self, id: u64, timeout: Duration) {
        let target = wait_for("a leader's commit index", timeout, || {
            let leader = self.leader()?;
            self.node_status(leader)?["commit_index"].as_u64()
        });
        wait_for(
            &format!("node {id} to apply index {target}"),
            timeout,
            || {
                let applied = self.node_status(id)?["applied_index"].as_u64()?;
                (applied >= target).then_some(())
            },
        );
    }

    /// Panics if any agent log shows a panic.
    pub fn assert_no_panics(&self) {
        for n in &self.file.nodes {
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            assert!(!log.contains("panicked"), "node {} panicked:\n{log}", n.id);
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // CONVOY_KEEP_TEST_DIRS=1 keeps configs, data and agent logs for a post-mortem.
        if std::env::var_os("CONVOY_KEEP_TEST_DIRS").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept test directory {}", self.dir.path().display());
        }
        for (_, mut c) in self
            .restarted
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut dev) = self.dev.lock().ok().and_then(|mut d| d.take()) {
            let _ = kill(Pid::from_raw(dev.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while let Ok(None) = dev.try_wait() {
                if Instant::now() > deadline {
                    let _ = dev.kill();
                    let _ = dev.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Belt and braces: no agent of this test may outlive it.
        for n in &self.file.nodes {
            let cmdline =
                std::fs::read_to_string(format!("/proc/{}/cmdline", n.pid)).unwrap_or_default();
            if cmdline.contains(&n.config.display().to_string()) {
                let _ = kill(Pid::from_raw(n.pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// A tokio runtime for tests that use the in-process client.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

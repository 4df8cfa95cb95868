//! Data-plane benchmark: Convoy next to its peers, on this machine, in one run.
//!
//! 1. Delta sync of a 1 GiB disk whose destination differs in 5% of its 64 KiB chunks:
//!    `convoy cg sync --compare` vs `rsync --inplace --no-whole-file -B 65536` to a
//!    loopback rsync daemon (same source content, same differing chunks).
//! 2. Full copy of a 1 GiB disk of random data: `convoy cg sync` (QUIC + TLS) vs `nbdcopy`
//!    and `qemu-img convert -n` into an `nbdkit file` export over TCP; `iperf3` single
//!    stream TCP as the ceiling. CPU time of each process during the copy is reported.
//! 3. 4 KiB random writes with fio's `nbd` engine at queue depth 1 and 32: Convoy's export
//!    with no replica, an async and a sync replica, next to `nbdkit file` (Unix sockets on
//!    both sides).
//!
//! 4. Bulk writes (issue 9): 1 GiB in 4 MiB requests by nbdcopy into the export with no
//!    replica, an async and a sync replica: throughput, and resyncs of the link (must be 0).
//! 5. Mirrored writes and hand-over (issue 10): fio 4 KiB random writes through the export
//!    of a VM moved off its sequencer (`vm move`), QD1 and QD32, next to `sync` and no
//!    replica; `cg switch-primary` 20 times under a timed QD1 writer: the pause the command
//!    reports and the longest write the writer saw during each swap.
//!
//! Prints one table and writes it as JSON to `<target dir>/bench-data_plane.json`.
//!
//! Run: `cargo bench -p convoy-agent --bench data_plane --profile dev`
//! Needs the peers: `CONVOY_SETUP_BENCH=1 scripts/setup-debian` (nbdkit, fio, rsync,
//! iperf3, plus nbdcopy and qemu-img from the base set). Everything listens on the
//! cluster's own 127.x.y.z loopback address. Everything started is stopped on every path
//! (normal end, panic, SIGINT/SIGTERM/SIGHUP).
//!
//! Page cache: on this VM newly allocated page-cache pages are expensive (free-page
//! reporting), so before every timed copy/sync the benchmark flushes dirty data and then
//! writes and deletes a 1.5 GiB scratch file, for Convoy and the peers alike.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Dev, wait_for};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const DISK: u64 = 1024 * MIB;
const CHUNK: u64 = 64 * 1024;
const MB: f64 = 1e6;
/// Kernel clock ticks of /proc/*/stat (USER_HZ, fixed at 100 on Linux x86).
const HZ: f64 = 100.0;
const FIO_RUNTIME: u32 = 10;
const FIO_RAMP: u32 = 2;

// ---------------------------------------------------------------------------------------
// Cleanup on every path: helpers are killed on drop; a signal thread kills everything
// registered here (helpers, `convoy dev` and its agents) and removes the temp dir.

#[derive(Default)]
struct Live {
    helpers: Vec<u32>,
    dev_pid: Option<u32>,
    agents: Vec<u32>,
    dirs: Vec<PathBuf>,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    helpers: Vec::new(),
    dev_pid: None,
    agents: Vec::new(),
    dirs: Vec::new(),
});

fn live() -> std::sync::MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z"))
        .unwrap_or(false)
}

/// Blocks the termination signals in this thread (and so in every thread started later)
/// and handles them on a thread of their own. Children get a clean mask from std.
fn install_signal_cleanup() {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().unwrap();
    std::thread::spawn(move || {
        let sig = set.wait().unwrap();
        eprintln!("data_plane: {sig:?}, stopping everything this benchmark started");
        let l = std::mem::take(&mut *live());
        for pid in &l.helpers {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        if let Some(pid) = l.dev_pid {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for pid in l.agents.iter().chain(l.dev_pid.iter()) {
            if alive(*pid) {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
        for d in &l.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        std::process::exit(128 + sig as i32);
    });
}

/// A helper daemon (nbdkit, rsync, iperf3) killed when dropped.
struct Daemon {
    child: Child,
    what: &'static str,
}

impl Daemon {
    fn spawn(what: &'static str, cmd: &mut Command) -> Daemon {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        live().helpers.push(child.id());
        Daemon { child, what }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited early: {st}", self.what);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        live().helpers.retain(|p| *p != pid);
    }
}

// ---------------------------------------------------------------------------------------
// Measuring.

/// (user+system CPU seconds of the process, of its waited-for children).
fn cpu_of(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return (0.0, 0.0);
    };
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 15 {
        return (0.0, 0.0);
    }
    ((f[11] + f[12]) / HZ, (f[13] + f[14]) / HZ)
}

fn own_children_cpu() -> f64 {
    cpu_of(std::process::id()).1
}

/// Whole-machine CPU counters: (busy ticks, all ticks).
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let all: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (all - idle, all)
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// CPU use of some processes over one measured interval.
struct CpuWatch {
    pids: Vec<(String, u32)>,
    start: Vec<f64>,
    children: f64,
    machine: (f64, f64),
    t: Instant,
}

struct CpuUse {
    secs: f64,
    /// (name, CPU seconds, share of one core).
    procs: Vec<(String, f64, f64)>,
    /// CPU seconds of the benchmark's waited-for children (the client tools).
    children: f64,
    /// Busy cores of the whole machine, averaged.
    machine_busy_cores: f64,
}

impl CpuWatch {
    fn start(pids: &[(&str, u32)]) -> CpuWatch {
        CpuWatch {
            pids: pids.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
            start: pids.iter().map(|(_, p)| cpu_of(*p).0).collect(),
            children: own_children_cpu(),
            machine: machine_ticks(),
            t: Instant::now(),
        }
    }

    fn stop(self) -> CpuUse {
        let secs = self.t.elapsed().as_secs_f64();
        let procs = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|((n, p), s)| {
                let used = cpu_of(*p).0 - s;
                (n.clone(), used, used / secs)
            })
            .collect();
        let m = machine_ticks();
        CpuUse {
            secs,
            procs,
            children: own_children_cpu() - self.children,
            machine_busy_cores: (m.0 - self.machine.0) / (m.1 - self.machine.1).max(1.0) * cores(),
        }
    }
}

impl CpuUse {
    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .procs
            .iter()
            .map(|(n, s, share)| format!("{n} {s:.2} s CPU ({:.0}% of a core)", share * 100.0))
            .collect();
        if self.children > 0.005 {
            parts.push(format!(
                "client tool {:.2} s CPU ({:.0}%)",
                self.children,
                self.children / self.secs * 100.0
            ));
        }
        parts.push(format!(
            "machine busy {:.2} of {:.0} cores",
            self.machine_busy_cores,
            cores()
        ));
        parts.join("; ")
    }

    fn json(&self) -> Value {
        json!({
            "seconds": self.secs,
            "processes": self.procs.iter().map(|(n, s, share)| json!({"name": n, "cpu_seconds": s, "core_share": share})).collect::<Vec<_>>(),
            "client_tool_cpu_seconds": self.children,
            "machine_busy_cores": self.machine_busy_cores,
        })
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------
// Running tools.

fn require_tools() {
    let missing: Vec<&str> = [
        "nbdkit", "nbdcopy", "qemu-img", "fio", "rsync", "iperf3", "timeout",
    ]
    .into_iter()
    .filter(|t| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .collect();
    assert!(
        missing.is_empty(),
        "missing peers {missing:?}: run `CONVOY_SETUP_BENCH=1 scripts/setup-debian`"
    );
}

/// Runs a tool (killed after `limit_s`), returns (stdout, wall seconds); panics on failure.
fn run(limit_s: u32, program: &str, args: &[&str]) -> (String, f64) {
    let start = Instant::now();
    let out = Command::new("timeout")
        .args(["-s", "KILL", &limit_s.to_string(), program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let secs = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, secs)
}

fn wait_port(ip: &str, port: u16) {
    wait_for(
        &format!("{ip}:{port} to accept"),
        Duration::from_secs(20),
        || std::net::TcpStream::connect((ip, port)).ok().map(|_| ()),
    );
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Flushes dirty data, then writes and deletes a 1.5 GiB scratch file so the next timed
/// run finds recycled page-cache pages (fresh ones cost ~4 s/GiB on this VM).
fn prime(dir: &Path) {
    let _ = Command::new("sync").status();
    let path = dir.join("prime.tmp");
    let mut f = std::fs::File::create(&path).unwrap();
    let buf = vec![0x11u8; 4 << 20];
    for _ in 0..384 {
        f.write_all(&buf).unwrap();
    }
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

fn cp(from: &Path, to: &Path) {
    run(120, "cp", &[from.to_str().unwrap(), to.to_str().unwrap()]);
}

fn nbdkit_file(file: &Path, listen: &[&str]) -> Daemon {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent"])
        .args(listen)
        .arg("file")
        .arg(format!("file={}", file.display()));
    Daemon::spawn("nbdkit", &mut cmd)
}

// ---------------------------------------------------------------------------------------
// A minimal NBD client (fixed newstyle, OPT_GO, simple replies) to change chosen chunks of
// a Convoy export with exact content.

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

struct NbdClient(std::os::unix::net::UnixStream);

impl NbdClient {
    /// Connects to `nbd+unix:///NAME?socket=PATH`.
    fn connect(uri: &str) -> NbdClient {
        let rest = uri.strip_prefix("nbd+unix:///").expect("a nbd+unix URI");
        let (name, query) = rest.split_once('?').unwrap();
        let socket = query.strip_prefix("socket=").unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
        let client_flags: u32 = 1 | (u32::from(server_flags) & 2);
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            assert_eq!(
                u64::from_be_bytes(h[..8].try_into().unwrap()),
                OPT_REPLY_MAGIC
            );
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).unwrap();
            assert!(kind & 0x8000_0000 == 0, "NBD_OPT_GO refused: {kind:#x}");
            if kind == 1 {
                break; // NBD_REP_ACK
            }
        }
        NbdClient(s)
    }

    fn request(&mut self, cmd: u16, offset: u64, data: &[u8], len: u32) {
        let err = self.try_request(cmd, offset, data, len);
        assert_eq!(err, 0, "NBD command {cmd} at {offset} failed: {err}");
    }

    /// Sends one request and returns the reply's error code (0 = done).
    fn try_request(&mut self, cmd: u16, offset: u64, data: &[u8], len: u32) -> u32 {
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes()); // handle
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&h).unwrap();
        self.0.write_all(data).unwrap();
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), REPLY_MAGIC);
        u32::from_be_bytes(r[4..8].try_into().unwrap())
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(1, offset, data, data.len() as u32);
    }

    fn flush_and_close(mut self) {
        self.request(3, 0, &[], 0);
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&2u16.to_be_bytes()); // NBD_CMD_DISC
        h.extend_from_slice(&[0u8; 20]);
        let _ = self.0.write_all(&h);
    }
}

// ---------------------------------------------------------------------------------------
// Convoy helpers.

fn vm_uris(dev: &Dev, vm: &str) -> (String, String) {
    wait_for("the disk's NBD export", Duration::from_secs(30), || {
        let v = dev.cli(&["vm", "show", vm, "-o", "json"]).json();
        let u = &v["disks"][0]["uris"];
        Some((u[0].as_str()?.to_string(), u[1].as_str()?.to_string()))
    })
}

/// The first (Unix socket) URI of `vm`'s disk once `vm show` says it runs on `host`.
fn vm_uri_on(dev: &Dev, vm: &str, host: u64) -> String {
    wait_for(
        &format!("{vm}'s export on node {host}"),
        Duration::from_secs(30),
        || {
            let v = dev.cli(&["vm", "show", vm, "-o", "json"]).json();
            if v["host"] != host {
                return None;
            }
            v["disks"][0]["uris"][0].as_str().map(String::from)
        },
    )
}

/// The group's first link as `cg show` reports it.
fn first_link(dev: &Dev, cg: &str) -> Value {
    dev.cli(&["cg", "show", cg, "-o", "json"]).json()["replicas"][0].clone()
}

/// One bulk write: 1 GiB from `src` into `uri` by nbdcopy in 4 MiB requests, flushed at
/// the end (the page cache primed first, as for every timed copy). Returns wall seconds.
fn bulk_write(work: &Path, src: &str, uri: &str) -> f64 {
    prime(work);
    run(
        300,
        "nbdcopy",
        &["--request-size=4194304", "--flush", src, uri],
    )
    .1
}

/// Nearest-rank percentile `p` (0..=100) of `v` (not empty).
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// A guest stand-in for the switch-primary rows: 4 KiB writes at queue depth 1 to random
/// offsets through an export, each timed, until told to stop.
struct TimedWrites {
    /// (start, latency) of every write, from the writer's start.
    writes: Vec<(Duration, Duration)>,
    /// Writes the export answered with an error.
    failed: u64,
}

fn timed_writer(uri: &str, stop: &std::sync::atomic::AtomicBool, t0: Instant) -> TimedWrites {
    let mut nbd = NbdClient::connect(uri);
    let mut rng = StdRng::seed_from_u64(9);
    let mut buf = vec![0u8; 4096];
    let mut out = TimedWrites {
        writes: Vec::new(),
        failed: 0,
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        rng.fill_bytes(&mut buf);
        let offset = rng.gen_range(0..DISK / 4096) * 4096;
        let start = Instant::now();
        let err = nbd.try_request(1, offset, &buf, 4096);
        out.writes.push((start - t0, start.elapsed()));
        if err != 0 {
            out.failed += 1;
        }
    }
    nbd.flush_and_close();
    out
}

fn wait_caught_up(dev: &Dev, cg: &str, timeout: Duration) -> f64 {
    let start = Instant::now();
    wait_for("the replica to catch up", timeout, || {
        let v = dev.cli(&["cg", "show", cg, "-o", "json"]).json();
        let r = &v["replicas"][0];
        (r["state"] == "consistent" && r["lag_writes"] == 0 && r["phase"] == "streaming")
            .then_some(())
    });
    start.elapsed().as_secs_f64()
}

/// `convoy cg sync` timed with the agents' CPU; returns (the disk's report, wall s, CPU).
fn convoy_sync(dev: &Dev, cg: &str, compare: bool) -> (Value, f64, CpuUse) {
    let mut args = vec!["cg", "sync", cg, "--to", "3", "-o", "json"];
    if compare {
        args.push("--compare");
    }
    let watch = CpuWatch::start(&[
        ("agent 1 (source)", dev.pid(1)),
        ("agent 3 (destination)", dev.pid(3)),
    ]);
    let start = Instant::now();
    let r = dev.cli(&args);
    let wall = start.elapsed().as_secs_f64();
    let cpu = watch.stop();
    let v = r.json();
    (v["disks"][0].clone(), wall, cpu)
}

// ---------------------------------------------------------------------------------------
// Convoy's transport alone: one QUIC stream (mutual TLS) between two endpoints in this
// process, 2 MiB frames, no disk, no protocol. The ceiling of any copy over it.

fn raw_quic_mb_per_s(ip: std::net::IpAddr, total: u64) -> f64 {
    use convoy_transport::pki::{self, TlsIdentity};
    use convoy_transport::{Endpoint, StreamKind, TransportConfig};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ca = pki::generate_ca("data-plane-bench").unwrap();
        let bind = |id: u64| {
            let c = pki::issue_node_cert(&ca, id, &[]).unwrap();
            let tls = TlsIdentity::from_pem(&ca.cert_pem, &c.cert_pem, &c.key_pem).unwrap();
            Endpoint::bind((ip, 0).into(), id, &tls, TransportConfig::default()).unwrap()
        };
        let (a, _a_in) = bind(11);
        let (b, mut b_in) = bind(12);
        tokio::spawn(async move {
            while let Some(mut s) = b_in.next().await {
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while let Ok(Some(f)) = s.recv.recv_frame().await {
                        n += f.len() as u64;
                    }
                    let _ = s.send.send_frame(&n.to_be_bytes()).await;
                    let _ = s.send.finish();
                });
            }
        });
        let frame = bytes::Bytes::from(vec![0x5au8; 2 << 20]);
        let (mut send, mut recv) = a
            .open_stream(12, b.local_addr(), StreamKind::Data)
            .await
            .unwrap();
        // Warm the connection (handshake, congestion window) before timing.
        send.send_frame_bytes(frame.clone()).await.unwrap();
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            send.send_frame_bytes(frame.clone()).await.unwrap();
            sent += frame.len() as u64;
        }
        send.finish().unwrap();
        let _ = recv.recv_frame().await.unwrap();
        sent as f64 / start.elapsed().as_secs_f64() / MB
    })
}

// ---------------------------------------------------------------------------------------
// fio.

struct Fio {
    iops: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu: f64,
}

fn fio(uri: &str, qd: u32) -> Fio {
    fio_with(&[
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--iodepth={qd}"),
    ])
}

/// The disk's own speed for durable 4 KiB random writes: `qd` threads each writing with
/// O_DSYNC to a file next to the images (same file system, no network, no Convoy), for
/// reference next to the synchronous replica, which waits for its disk on every write.
/// A directory on tmpfs (`/dev/shm`), or `None` where there is none.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let shm = mounts.lines().any(|l| {
        let mut f = l.split_whitespace().skip(1);
        f.next() == Some("/dev/shm") && f.next() == Some("tmpfs")
    });
    if !shm {
        eprintln!("data_plane: no tmpfs at /dev/shm; skipping the sync-on-tmpfs rows");
        return None;
    }
    tempfile::Builder::new()
        .prefix("convoy-bench-")
        .tempdir_in("/dev/shm")
        .ok()
}

fn fio_durable_floor(dir: &Path, qd: u32) -> Fio {
    let file = dir.join("durable-floor.img");
    let r = fio_with(&[
        "--ioengine=psync",
        "--sync=dsync",
        &format!("--filename={}", file.display()),
        &format!("--numjobs={qd}"),
        "--group_reporting",
    ]);
    let _ = std::fs::remove_file(&file);
    r
}

fn fio_with(engine_args: &[&str]) -> Fio {
    let _ = Command::new("sync").status();
    let mut args = vec![
        "--name=randwrite".to_string(),
        "--rw=randwrite".to_string(),
        "--bs=4k".to_string(),
        format!("--size={DISK}"),
        "--time_based".to_string(),
        format!("--runtime={FIO_RUNTIME}"),
        format!("--ramp_time={FIO_RAMP}"),
        "--lat_percentiles=1".to_string(),
        "--output-format=json".to_string(),
    ];
    args.extend(engine_args.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, _) = run(FIO_RUNTIME + FIO_RAMP + 120, "fio", &args);
    // fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    let v: Value = serde_json::from_str(&out[out.find('{').expect("fio JSON")..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio failed: {job}");
    let w = &job["write"];
    let pct = |k: &str| w["lat_ns"]["percentile"][k].as_f64().unwrap() / 1e6;
    Fio {
        iops: w["iops"].as_f64().unwrap(),
        p50_ms: pct("50.000000"),
        p99_ms: pct("99.000000"),
        cpu: (job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0))
            / 100.0,
    }
}

// ---------------------------------------------------------------------------------------
// The table.

#[derive(Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
}

struct Row {
    /// The brief's row group: 1 delta sync, 2 full copy, 3 NBD export I/O.
    section: u8,
    what: String,
    convoy: String,
    peer: String,
    ratio: String,
    target: String,
    met: Option<bool>,
    json: Value,
}

#[derive(Default)]
struct Table {
    /// Section of the rows added next.
    section: u8,
    rows: Vec<Row>,
    notes: Vec<(u8, String)>,
}

impl Table {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        what: &str,
        convoy: (f64, &str),
        peer_name: &str,
        peer: (f64, &str),
        ratio: f64,
        ratio_text: String,
        target: &str,
        met: Option<bool>,
    ) {
        let fmt = |(v, unit): (f64, &str)| {
            if (v.fract() == 0.0 && unit == "resyncs") || v.abs() >= 100.0 {
                format!("{v:.0} {unit}")
            } else if v.abs() >= 1.0 {
                format!("{v:.2} {unit}")
            } else {
                format!("{v:.3} {unit}")
            }
        };
        self.rows.push(Row {
            section: self.section,
            what: what.to_string(),
            convoy: fmt(convoy),
            peer: format!("{} ({peer_name})", fmt(peer)),
            ratio: ratio_text,
            target: target.to_string(),
            met,
            json: json!({
                "row": what,
                "convoy": convoy.0,
                "peer": peer.0,
                "peer_name": peer_name,
                "unit": convoy.1,
                "ratio": ratio,
                "target": target,
                "met": met,
            }),
        });
    }

    fn ratio(
        &mut self,
        what: &str,
        convoy: (f64, &str),
        peer_name: &str,
        peer: f64,
        target: Option<Target>,
    ) {
        let r = convoy.0 / peer;
        let (t, met) = match target {
            None => ("-".to_string(), None),
            Some(Target::AtMost(x)) => (format!("<= {x:.2}x"), Some(r <= x)),
            Some(Target::AtLeast(x)) => (format!(">= {x:.2}x"), Some(r >= x)),
        };
        self.add(
            what,
            convoy,
            peer_name,
            (peer, convoy.1),
            r,
            format!("{r:.3}x"),
            &t,
            met,
        );
    }

    /// Rows in the brief's order (measured in another: the full copy seeds the delta).
    fn sorted(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| r.section);
        rows
    }

    fn note(&mut self, text: String) {
        self.notes.push((self.section, text));
    }

    fn sorted_notes(&self) -> Vec<&(u8, String)> {
        let mut notes: Vec<&(u8, String)> = self.notes.iter().collect();
        notes.sort_by_key(|n| n.0);
        notes
    }

    fn print(&self) {
        let w0 = self.rows.iter().map(|r| r.what.len()).max().unwrap_or(10);
        let w2 = self.rows.iter().map(|r| r.peer.len()).max().unwrap_or(10);
        println!(
            "{:<w0$}  {:>14}  {:<w2$}  {:>9}  {:<10}  met?",
            "row", "Convoy", "peer", "ratio", "target"
        );
        for r in self.sorted() {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            println!(
                "{:<w0$}  {:>14}  {:<w2$}  {:>9}  {:<10}  {met}",
                r.what, r.convoy, r.peer, r.ratio, r.target
            );
        }
        for (_, n) in self.sorted_notes() {
            println!("  - {n}");
        }
    }
}

fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/convoy
    Path::new(env!("CARGO_BIN_EXE_convoy"))
        .parent()
        .and_then(Path::parent)
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
}

// ---------------------------------------------------------------------------------------
// Bulk writes and switch-primary swaps.

/// One bulk write with a replica.
struct Bulk {
    /// Wall seconds of the write (nbdcopy, flushed).
    secs: f64,
    /// Seconds from its end until the replica held every write.
    catch_up: f64,
    /// Resyncs of the link during the write and the catch-up.
    resyncs: u64,
}

/// One swap of the group's order.
struct Swap {
    to: u64,
    /// What `cg switch-primary` reported.
    paused_ms: f64,
    /// The longest write of the timed writer that overlapped the command.
    longest_write_ms: f64,
    /// Per run (the same in every swap): the writer's p99 outside the swaps, its failed
    /// writes, and swap attempts refused (not caught up) and retried.
    steady_p99_ms: f64,
    failed_writes: u64,
    refused_attempts: u64,
}

/// Sets its flag when dropped, so a helper thread stops even if the bench panics.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Swaps `cg`'s order between nodes 1 and 2 `n` times (starting on node 1, ending there
/// for even `n`) while a timed QD1 writer writes through `uri`.
fn switch_primary_swaps(dev: &Dev, cg: &str, uri: &str, n: usize) -> Vec<Swap> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let t0 = Instant::now();
    let mut refused = 0u64;
    let (writes, mut swaps) = std::thread::scope(|s| {
        let writer = s.spawn(|| timed_writer(uri, &stop, t0));
        let guard = StopOnDrop(&stop);
        // Steady writes before the first swap.
        std::thread::sleep(Duration::from_secs(1));
        let mut swaps = Vec::new();
        for i in 0..n {
            let to: u64 = if i % 2 == 0 { 2 } else { 1 };
            let mut tries = 0;
            loop {
                wait_caught_up(dev, cg, Duration::from_secs(120));
                let start = t0.elapsed();
                let r = dev.cli(&[
                    "cg",
                    "switch-primary",
                    cg,
                    "--to",
                    &to.to_string(),
                    "-o",
                    "json",
                ]);
                let end = t0.elapsed();
                if r.ok {
                    let v = r.json();
                    swaps.push((to, v["paused_ms"].as_f64().unwrap(), start, end));
                    break;
                }
                tries += 1;
                refused += 1;
                eprintln!("  switch-primary to {to} refused: {}", r.stderr.trim());
                assert!(tries < 3, "switch-primary to {to} failed 3 times: {r:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        drop(guard);
        (writer.join().unwrap(), swaps)
    });
    let overlapping = |(start, end): (Duration, Duration)| {
        writes
            .writes
            .iter()
            .filter(|(s, lat)| *s < end && *s + *lat > start)
            .map(|(_, lat)| lat.as_secs_f64() * 1e3)
            .fold(0.0, f64::max)
    };
    let outside: Vec<f64> = writes
        .writes
        .iter()
        .filter(|(s, lat)| !swaps.iter().any(|(_, _, a, b)| *s < *b && *s + *lat > *a))
        .map(|(_, lat)| lat.as_secs_f64() * 1e3)
        .collect();
    let steady = if outside.is_empty() {
        0.0
    } else {
        percentile(&outside, 99.0)
    };
    eprintln!(
        "  {} timed writes, {} failed, p99 outside swaps {steady:.3} ms",
        writes.writes.len(),
        writes.failed
    );
    swaps
        .drain(..)
        .map(|(to, paused_ms, start, end)| {
            let longest = overlapping((start, end));
            eprintln!("  switch to node {to}: paused_ms {paused_ms:.1}, longest guest write {longest:.1} ms");
            Swap {
                to,
                paused_ms,
                longest_write_ms: longest,
                steady_p99_ms: steady,
                failed_writes: writes.failed,
                refused_attempts: refused,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------

fn main() {
    install_signal_cleanup();
    require_tools();
    let load_start = loadavg();
    let started = Instant::now();
    // Node 4 keeps its data on tmpfs, where a flush costs nothing: a sync replica there,
    // next to the same replica on disk, shows how much of sync's latency is the disk's.
    let tmpfs = tmpfs_dir();
    let dev = Dev::start_prepared(4, &[], |dir| {
        if let Some(t) = &tmpfs {
            let node = dir.join("node-4");
            std::fs::create_dir_all(&node).unwrap();
            std::os::unix::fs::symlink(t.path(), node.join("data")).unwrap();
        }
    });
    {
        let mut l = live();
        l.dev_pid = Some(dev.file.dev_pid);
        l.agents = dev.file.nodes.iter().map(|n| n.pid).collect();
        l.dirs.push(dev.dir.path().to_path_buf());
        l.dirs
            .extend(tmpfs.as_ref().map(|t| t.path().to_path_buf()));
    }
    wait_for("a leader", Duration::from_secs(20), || dev.leader());
    let ip = dev.ip.to_string();
    let work = dev.dir.path().join("bench");
    std::fs::create_dir_all(&work).unwrap();
    let mut t = Table::default();
    let mut extra = serde_json::Map::new();
    eprintln!("data_plane: cluster on {ip}, work dir {}", work.display());

    // The source content: 1 GiB of random data.
    let src = work.join("src.img");
    {
        let mut rng = StdRng::seed_from_u64(42);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut buf = vec![0u8; 4 << 20];
        for _ in 0..DISK / buf.len() as u64 {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.into_inner().unwrap().sync_all().unwrap();
    }
    let src_s = src.to_str().unwrap().to_string();

    // Fill the Convoy disk, and the nbdkit peer file (used by fio later), with nbdcopy
    // over Unix sockets: the NBD write path in bulk.
    assert!(
        dev.cli(&["vm", "create", "dp", "--host", "1", "--disk", "1GiB"])
            .ok
    );
    assert!(dev.cli(&["cg", "create", "dpg", "--vm", "dp"]).ok);
    let (convoy_uri, convoy_tcp_uri) = vm_uris(&dev, "dp");
    let peer_file = work.join("peer.img");
    std::fs::File::create(&peer_file)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let peer_sock = work.join("nbdkit.sock");
    let peer_uri = format!("nbd+unix:///?socket={}", peer_sock.display());
    let mut peer = nbdkit_file(&peer_file, &["-U", peer_sock.to_str().unwrap()]);
    wait_for("nbdkit's socket", Duration::from_secs(20), || {
        peer.check_running();
        peer_sock.exists().then_some(())
    });
    prime(&work);
    let (_, fill_peer) = run(300, "nbdcopy", &["--flush", &src_s, &peer_uri]);
    prime(&work);
    let (_, fill_convoy) = run(300, "nbdcopy", &["--flush", &src_s, &convoy_uri]);
    eprintln!("  fill: nbdcopy into convoy {fill_convoy:.2} s, into nbdkit {fill_peer:.2} s");
    t.section = 3;
    t.ratio(
        "bulk NBD write: nbdcopy 1 GiB in (unix), MB/s",
        (DISK as f64 / fill_convoy / MB, "MB/s"),
        "nbdkit file",
        DISK as f64 / fill_peer / MB,
        None,
    );

    // ---- 2. Full copy ----------------------------------------------------------------
    eprintln!("data_plane: full copy");
    prime(&work);
    let (full, full_wall, full_cpu) = convoy_sync(&dev, "dpg", false);
    assert_eq!(full["data_bytes_sent"], DISK, "full copy: {full}");
    let convoy_full = DISK as f64 / full_wall / MB;
    let peer_copy = |tool: &str| -> (f64, CpuUse) {
        let target = work.join("nbd-target.img");
        std::fs::File::create(&target)
            .unwrap()
            .set_len(DISK)
            .unwrap();
        let port = free_port(&ip);
        let mut d = nbdkit_file(&target, &["-i", &ip, "-p", &port.to_string()]);
        wait_port(&ip, port);
        d.check_running();
        let uri = format!("nbd://{ip}:{port}");
        prime(&work);
        let watch = CpuWatch::start(&[("nbdkit", d.pid())]);
        let secs = if tool == "nbdcopy" {
            run(300, "nbdcopy", &["--flush", &src_s, &uri]).1
        } else {
            run(
                300,
                "qemu-img",
                &["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &uri],
            )
            .1
        };
        let cpu = watch.stop();
        drop(d);
        std::fs::remove_file(&target).unwrap();
        (DISK as f64 / secs / MB, cpu)
    };
    eprintln!(
        "  convoy full copy: {convoy_full:.0} MB/s ({full_wall:.2} s); {}",
        full_cpu.describe()
    );
    let (nbdcopy_rate, nbdcopy_cpu) = peer_copy("nbdcopy");
    eprintln!(
        "  nbdcopy: {nbdcopy_rate:.0} MB/s; {}",
        nbdcopy_cpu.describe()
    );
    let (qemu_rate, qemu_cpu) = peer_copy("qemu-img");
    eprintln!("  qemu-img: {qemu_rate:.0} MB/s; {}", qemu_cpu.describe());
    let iperf = {
        let port = free_port(&ip);
        let mut d = {
            let mut c = Command::new("iperf3");
            // Not `-1`: the readiness probe would be its one client.
            c.args(["-s", "-B", &ip, "-p", &port.to_string()]);
            Daemon::spawn("iperf3 -s", &mut c)
        };
        wait_port(&ip, port);
        d.check_running();
        let (out, _) = run(
            60,
            "iperf3",
            &["-c", &ip, "-p", &port.to_string(), "-t", "5", "-J"],
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["error"].is_null(), "iperf3: {}", v["error"]);
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap()
            / 8.0
            / MB
    };
    eprintln!("  iperf3: {iperf:.0} MB/s");
    let quic = raw_quic_mb_per_s(dev.ip, DISK);
    eprintln!("  raw QUIC (Convoy transport, in-process): {quic:.0} MB/s");
    t.section = 2;
    t.ratio(
        "full copy 1 GiB random, MB/s (vs nbdcopy)",
        (convoy_full, "MB/s"),
        "nbdcopy -> nbdkit, TCP",
        nbdcopy_rate,
        Some(Target::AtLeast(0.5)),
    );
    t.ratio(
        "full copy 1 GiB random, MB/s (vs qemu-img)",
        (convoy_full, "MB/s"),
        "qemu-img convert -n -> nbdkit",
        qemu_rate,
        None,
    );
    t.ratio(
        "full copy vs raw TCP ceiling, MB/s",
        (convoy_full, "MB/s"),
        "iperf3 1 stream",
        iperf,
        None,
    );
    t.ratio(
        "full copy vs Convoy's transport alone, MB/s",
        (convoy_full, "MB/s"),
        "raw QUIC 1 stream, no disk",
        quic,
        None,
    );
    let per_gb =
        |c: &CpuUse| (c.procs.iter().map(|p| p.1).sum::<f64>() + c.children) / (DISK as f64 / 1e9);
    t.note(format!(
        "full copy CPU per GB moved: Convoy {:.2} CPU-s (both agents + CLI), nbdcopy+nbdkit {:.2}, qemu-img+nbdkit {:.2}; raw QUIC alone {quic:.0} MB/s vs raw TCP {iperf:.0} MB/s",
        per_gb(&full_cpu),
        per_gb(&nbdcopy_cpu),
        per_gb(&qemu_cpu)
    ));
    t.note(format!(
        "full copy: Convoy {full_wall:.2} s wall (CLI), session {:.2} s, {} wire bytes; {}",
        full["seconds"].as_f64().unwrap_or(0.0),
        full["wire_bytes"],
        full_cpu.describe()
    ));
    t.note(format!(
        "full copy: nbdcopy: {}; qemu-img: {}",
        nbdcopy_cpu.describe(),
        qemu_cpu.describe()
    ));
    extra.insert(
        "full_copy".into(),
        json!({
            "convoy": {"wall_seconds": full_wall, "report": full, "cpu": full_cpu.json()},
            "nbdcopy": {"mb_per_s": nbdcopy_rate, "cpu": nbdcopy_cpu.json()},
            "qemu_img": {"mb_per_s": qemu_rate, "cpu": qemu_cpu.json()},
            "iperf3_mb_per_s": iperf,
            "raw_quic_mb_per_s": quic,
        }),
    );

    // ---- 1. Delta sync -----------------------------------------------------------------
    eprintln!("data_plane: delta sync");
    // rsync's destination: the content node 3 now holds (the source before the changes).
    let rs_dir = work.join("rsync-dst");
    std::fs::create_dir_all(&rs_dir).unwrap();
    let rs_dst = rs_dir.join("disk.img");
    cp(&src, &rs_dst);
    // Change 5% of the chunks, the same ones with the same content, on Convoy's source
    // disk (through NBD) and in rsync's source file.
    let chunks = DISK / CHUNK;
    let k = chunks * 5 / 100;
    let mut rng = StdRng::seed_from_u64(7);
    let mut chosen = BTreeSet::new();
    while (chosen.len() as u64) < k {
        chosen.insert(rng.gen_range(0..chunks));
    }
    {
        let file = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        let mut nbd = NbdClient::connect(&convoy_uri);
        let mut buf = vec![0u8; CHUNK as usize];
        for c in &chosen {
            rng.fill_bytes(&mut buf);
            nbd.write(c * CHUNK, &buf);
            file.write_at(&buf, c * CHUNK).unwrap();
        }
        nbd.flush_and_close();
        file.sync_all().unwrap();
    }
    prime(&work);
    let (delta, delta_wall, delta_cpu) = convoy_sync(&dev, "dpg", true);
    assert_eq!(delta["chunks_sent"], k, "compare-delta: {delta}");
    let delta_bytes = delta["wire_bytes"].as_f64().unwrap();
    eprintln!(
        "  convoy compare-delta: {delta_wall:.2} s, {delta_bytes} wire bytes; {}",
        delta_cpu.describe()
    );
    let (rsync_secs, rsync_bytes, rsync_cpu) = {
        let port = free_port(&ip);
        let conf = work.join("rsyncd.conf");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let id = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .unwrap()
                .to_string()
        };
        std::fs::write(
            &conf,
            format!(
                "use chroot = false\nuid = {}\ngid = {}\npid file = {}\n[m]\n  path = {}\n  read only = false\n",
                id("Uid:"),
                id("Gid:"),
                work.join("rsyncd.pid").display(),
                rs_dir.display()
            ),
        )
        .unwrap();
        let mut d = {
            let mut c = Command::new("rsync");
            c.args(["--daemon", "--no-detach", &format!("--address={ip}")])
                .arg(format!("--port={port}"))
                .arg(format!("--config={}", conf.display()));
            Daemon::spawn("rsync --daemon", &mut c)
        };
        wait_port(&ip, port);
        d.check_running();
        // rsync's quick check (size + mtime) must see a difference, as in real use.
        run(10, "touch", &["-d", "2000-01-01", rs_dst.to_str().unwrap()]);
        prime(&work);
        let watch = CpuWatch::start(&[("rsync daemon (incl. its finished children)", d.pid())]);
        let (out, secs) = run(
            300,
            "rsync",
            &[
                "--inplace",
                "--no-whole-file",
                "-B",
                "65536",
                "--stats",
                &src_s,
                &format!("rsync://{ip}:{port}/m/disk.img"),
            ],
        );
        // Let the daemon reap its connection child so its CPU time is counted.
        std::thread::sleep(Duration::from_millis(300));
        let mut cpu = watch.stop();
        // The daemon's children show up in its cutime once reaped.
        let (_, daemon_children) = cpu_of(d.pid());
        cpu.procs[0].1 += daemon_children;
        cpu.procs[0].2 = cpu.procs[0].1 / secs;
        let field = |key: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .map_or(0.0, |v| v.replace(',', "").parse().unwrap_or(0.0))
        };
        let bytes = field("Total bytes sent:") + field("Total bytes received:");
        assert!(bytes > 0.0, "no --stats in rsync output: {out}");
        (secs, bytes, cpu)
    };
    eprintln!(
        "  rsync: {rsync_secs:.2} s, {rsync_bytes} bytes; {}",
        rsync_cpu.describe()
    );
    // Both destinations now equal their sources.
    run(120, "cmp", &[&src_s, rs_dst.to_str().unwrap()]);
    let copy = dev
        .cli(&["disk", "expose", "dp:0", "--on", "3", "-o", "json"])
        .json()["uris"][0]
        .as_str()
        .unwrap()
        .to_string();
    run(
        300,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &convoy_uri, &copy],
    );
    t.section = 1;
    t.ratio(
        "delta sync 1 GiB, 5% chunks differ: wall s",
        (delta_wall, "s"),
        "rsync daemon",
        rsync_secs,
        Some(Target::AtMost(0.5)),
    );
    t.ratio(
        "delta sync: bytes on the wire",
        (delta_bytes, "B"),
        "rsync --stats",
        rsync_bytes,
        Some(Target::AtMost(1.01)),
    );
    // A second round: another 5% of chunks change; now both sides' chunk hashes are known
    // from the first compare (the steady state of a group synced repeatedly).
    let warm = {
        let mut rng = StdRng::seed_from_u64(8);
        let mut again = BTreeSet::new();
        while (again.len() as u64) < k {
            again.insert(rng.gen_range(0..chunks));
        }
        let mut nbd = NbdClient::connect(&convoy_uri);
        let mut buf = vec![0u8; CHUNK as usize];
        for c in &again {
            rng.fill_bytes(&mut buf);
            nbd.write(c * CHUNK, &buf);
        }
        nbd.flush_and_close();
        prime(&work);
        let (w, wall, cpu) = convoy_sync(&dev, "dpg", true);
        assert_eq!(w["chunks_sent"], k, "compare-delta: {w}");
        eprintln!(
            "  convoy compare-delta, hashes cached: {wall:.2} s; {}",
            cpu.describe()
        );
        (w, wall, cpu)
    };
    t.ratio(
        "delta sync, 2nd round (hashes cached): wall s",
        (warm.1, "s"),
        "rsync daemon, 1st round",
        rsync_secs,
        None,
    );
    t.note(format!(
        "delta 2nd round: Convoy {:.2} s wall, session {:.2} s, {} wire bytes; {}",
        warm.1,
        warm.0["seconds"].as_f64().unwrap_or(0.0),
        warm.0["wire_bytes"],
        warm.2.describe()
    ));
    t.note(format!(
        "delta: Convoy {delta_wall:.2} s wall (CLI), session {:.2} s, {} of {} chunks sent, {} hash bytes; {}",
        delta["seconds"].as_f64().unwrap_or(0.0),
        delta["chunks_sent"],
        delta["chunks_total"],
        delta["hash_bytes"],
        delta_cpu.describe()
    ));
    t.note(format!("delta: rsync: {}", rsync_cpu.describe()));
    extra.insert(
        "delta_sync".into(),
        json!({
            "chunks_changed": k,
            "convoy": {"wall_seconds": delta_wall, "report": delta, "cpu": delta_cpu.json()},
            "rsync": {"wall_seconds": rsync_secs, "bytes": rsync_bytes, "cpu": rsync_cpu.json()},
            "convoy_second_round": {"wall_seconds": warm.1, "report": warm.0, "cpu": warm.2.json()},
        }),
    );

    // ---- 3. fio 4 KiB random writes ------------------------------------------------------
    eprintln!("data_plane: fio");
    let mut fio_json = serde_json::Map::new();
    let mut fio_notes: Vec<String> = Vec::new();
    let mut fio_run = |label: &str, uri: &str, qd: u32, pids: &[(&str, u32)]| -> Fio {
        let watch = CpuWatch::start(pids);
        let r = fio(uri, qd);
        let cpu = watch.stop();
        // Server CPU per write (the window includes the warm-up; writes estimated at the
        // measured rate over it).
        let writes = r.iops * f64::from(FIO_RUNTIME + FIO_RAMP);
        let us_per_write: Vec<String> = cpu
            .procs
            .iter()
            .map(|(n, s, _)| format!("{n} {:.0} us", s / writes * 1e6))
            .collect();
        eprintln!(
            "  {label} QD{qd}: {:.0} IOPS, p50 {:.3} ms, p99 {:.3} ms; server CPU per write: {}; {}",
            r.iops,
            r.p50_ms,
            r.p99_ms,
            us_per_write.join(", "),
            cpu.describe()
        );
        fio_notes.push(format!(
            "{label} QD{qd}: CPU per write {}",
            us_per_write.join(", ")
        ));
        fio_json.insert(
            format!("{label} qd{qd}"),
            json!({"iops": r.iops, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "fio_core_share": r.cpu, "cpu": cpu.json()}),
        );
        r
    };
    t.section = 3;
    let qds = [1u32, 32];
    let nbdkit_pid = peer.pid();
    let base: Vec<Fio> = qds
        .iter()
        .map(|qd| fio_run("nbdkit", &peer_uri, *qd, &[("nbdkit", nbdkit_pid)]))
        .collect();
    let a1 = [("agent 1", dev.pid(1))];
    let none: Vec<Fio> = qds
        .iter()
        .map(|qd| fio_run("convoy none", &convoy_uri, *qd, &a1))
        .collect();
    // Bulk writes (issue 9): 1 GiB in 4 MiB requests, nbdkit and no replica first.
    eprintln!("data_plane: bulk writes");
    let bulk_peer = bulk_write(&work, &src_s, &peer_uri);
    let bulk_none = bulk_write(&work, &src_s, &convoy_uri);
    eprintln!(
        "  bulk 1 GiB, 4 MiB requests: nbdkit {bulk_peer:.2} s, Convoy no replica {bulk_none:.2} s"
    );
    // With a replica: the write, then until the replica holds it; a resync (journal
    // overflow) during either would show in the link's count.
    let bulk_replicated = |mode: &str| -> Bulk {
        let before = first_link(&dev, "dpg")["resyncs"].as_u64().unwrap();
        let secs = bulk_write(&work, &src_s, &convoy_uri);
        let catch_up = wait_caught_up(&dev, "dpg", Duration::from_secs(600));
        let link = first_link(&dev, "dpg");
        let resyncs = link["resyncs"].as_u64().unwrap() - before;
        eprintln!(
            "  bulk 1 GiB, {mode} replica: {secs:.2} s, then {catch_up:.2} s until the replica held it; {resyncs} resyncs"
        );
        Bulk {
            secs,
            catch_up,
            resyncs,
        }
    };
    let r = dev.cli(&["cg", "replicate", "dpg", "--to", "2", "--mode", "async"]);
    assert!(r.ok, "{r:?}");
    let initial = wait_caught_up(&dev, "dpg", Duration::from_secs(600));
    let a12 = [("agent 1", dev.pid(1)), ("agent 2", dev.pid(2))];
    let mut catch_up = Vec::new();
    let asy: Vec<Fio> = qds
        .iter()
        .map(|qd| {
            let r = fio_run("convoy async", &convoy_uri, *qd, &a12);
            catch_up.push(wait_caught_up(&dev, "dpg", Duration::from_secs(600)));
            r
        })
        .collect();
    let bulk_async = bulk_replicated("async");
    let r = dev.cli(&["cg", "set-mode", "dpg", "sync", "-o", "json"]);
    assert!(r.ok, "{r:?}");
    wait_caught_up(&dev, "dpg", Duration::from_secs(600));
    let syn: Vec<Fio> = qds
        .iter()
        .map(|qd| fio_run("convoy sync", &convoy_uri, *qd, &a12))
        .collect();
    let bulk_sync = bulk_replicated("sync");

    // switch-primary under load (issue 10): a QD1 4 KiB writer on node 1's export times
    // every write while the group's order swaps between nodes 1 and 2, 20 times.
    eprintln!("data_plane: switch-primary under load");
    let swaps = switch_primary_swaps(&dev, "dpg", &convoy_uri, 20);

    // Mirrored writes (issue 10): the VM moves to node 2 (its sync replica's host) and
    // writes through node 2's export; node 1 still orders them and replicates to node 2.
    eprintln!("data_plane: mirrored writes");
    let r = dev.cli(&["vm", "move", "dp", "--to", "2", "-o", "json"]);
    assert!(r.ok, "{r:?}");
    assert_eq!(r.json()["vm"]["sequencer"], 1, "{}", r.stdout);
    let mirrored_uri = vm_uri_on(&dev, "dp", 2);
    wait_caught_up(&dev, "dpg", Duration::from_secs(600));
    let mir: Vec<Fio> = qds
        .iter()
        .map(|qd| fio_run("convoy mirrored", &mirrored_uri, *qd, &a12))
        .collect();
    let r = dev.cli(&["vm", "move", "dp", "--to", "1", "-o", "json"]);
    assert!(r.ok, "{r:?}");
    vm_uri_on(&dev, "dp", 1);
    wait_caught_up(&dev, "dpg", Duration::from_secs(600));
    let syn_tmpfs: Option<Vec<Fio>> = tmpfs.as_ref().map(|_| {
        let r = dev.cli(&["cg", "unreplicate", "dpg", "--from", "2"]);
        assert!(r.ok, "{r:?}");
        let r = dev.cli(&["cg", "replicate", "dpg", "--to", "4", "--mode", "sync"]);
        assert!(r.ok, "{r:?}");
        wait_caught_up(&dev, "dpg", Duration::from_secs(600));
        let a14 = [("agent 1", dev.pid(1)), ("agent 4", dev.pid(4))];
        qds.iter()
            .map(|qd| fio_run("convoy sync, replica on tmpfs", &convoy_uri, *qd, &a14))
            .collect()
    });
    drop(peer);
    let floors: Vec<Fio> = qds
        .iter()
        .map(|qd| {
            let r = fio_durable_floor(dev.dir.path(), *qd);
            eprintln!(
                "  disk floor QD{qd} (fio psync O_DSYNC, {qd} jobs): {:.0} IOPS, p50 {:.3} ms, p99 {:.3} ms",
                r.iops, r.p50_ms, r.p99_ms
            );
            fio_json.insert(
                format!("durable floor qd{qd}"),
                json!({"iops": r.iops, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms}),
            );
            r
        })
        .collect();
    for (i, qd) in qds.iter().enumerate() {
        let (b, n, a, s) = (&base[i], &none[i], &asy[i], &syn[i]);
        for (label, cv, pv) in [("p50", n.p50_ms, b.p50_ms), ("p99", n.p99_ms, b.p99_ms)] {
            t.ratio(
                &format!("4k randwrite QD{qd} {label}, no replica"),
                (cv, "ms"),
                "nbdkit file",
                pv,
                Some(Target::AtMost(1.5)),
            );
        }
        t.ratio(
            &format!("4k randwrite QD{qd} IOPS, no replica"),
            (n.iops, "IOPS"),
            "nbdkit file",
            b.iops,
            None,
        );
        for (mode, f) in [("async", a), ("sync", s)] {
            t.ratio(
                &format!("4k randwrite QD{qd} p99, {mode} replica"),
                (f.p99_ms, "ms"),
                "nbdkit file",
                b.p99_ms,
                None,
            );
            t.ratio(
                &format!("4k randwrite QD{qd} IOPS, {mode} replica"),
                (f.iops, "IOPS"),
                "nbdkit file",
                b.iops,
                None,
            );
        }
        let floor = &floors[i];
        t.ratio(
            &format!("4k randwrite QD{qd} p99, sync replica vs the disk's durable writes"),
            (s.p99_ms, "ms"),
            &format!("fio O_DSYNC, {qd} thread(s), same fs"),
            floor.p99_ms,
            None,
        );
        if let Some(st) = syn_tmpfs.as_ref().map(|v| &v[i]) {
            let d = st.p99_ms - n.p99_ms;
            t.add(
                &format!("4k randwrite QD{qd} p99, sync replica on tmpfs vs no replica"),
                (st.p99_ms, "ms"),
                "Convoy, no replica",
                (n.p99_ms, "ms"),
                d,
                format!("{d:+.2} ms"),
                "reference",
                None,
            );
        }
        let d = s.p99_ms - n.p99_ms;
        t.add(
            &format!("4k randwrite QD{qd} p99, sync vs no replica"),
            (s.p99_ms, "ms"),
            "Convoy, no replica",
            (n.p99_ms, "ms"),
            d,
            format!("{d:+.2} ms"),
            "<= +1 ms",
            Some(d <= 1.0),
        );
    }
    // ---- 4. Bulk writes with replicas (issue 9) ----------------------------------------
    t.section = 4;
    let mbps = |secs: f64| DISK as f64 / secs / MB;
    t.ratio(
        "bulk write 1 GiB, 4 MiB requests (nbdcopy), no replica, MB/s",
        (mbps(bulk_none), "MB/s"),
        "nbdkit file",
        mbps(bulk_peer),
        None,
    );
    for (mode, b) in [("async", &bulk_async), ("sync", &bulk_sync)] {
        t.ratio(
            &format!("bulk write 1 GiB, 4 MiB requests, {mode} replica, MB/s"),
            (mbps(b.secs), "MB/s"),
            "Convoy, no replica",
            mbps(bulk_none),
            None,
        );
        t.add(
            &format!("bulk write 1 GiB, {mode} replica: resyncs during write + catch-up"),
            (b.resyncs as f64, "resyncs"),
            "must be",
            (0.0, "resyncs"),
            b.resyncs as f64,
            format!("{}", b.resyncs),
            "= 0",
            Some(b.resyncs == 0),
        );
    }
    t.note(format!(
        "bulk: nbdcopy --request-size=4194304 --flush of the 1 GiB random source over the Unix socket; until the replica held it (write + catch-up): async {:.2} + {:.2} s ({:.0} MB/s), sync {:.2} + {:.2} s",
        bulk_async.secs,
        bulk_async.catch_up,
        mbps(bulk_async.secs + bulk_async.catch_up),
        bulk_sync.secs,
        bulk_sync.catch_up
    ));

    // ---- 5. Mirrored writes and switch-primary (issue 10) ---------------------------------
    t.section = 5;
    for (i, qd) in qds.iter().enumerate() {
        let (n, s, m) = (&none[i], &syn[i], &mir[i]);
        for (label, mv, sv) in [("p50", m.p50_ms, s.p50_ms), ("p99", m.p99_ms, s.p99_ms)] {
            t.ratio(
                &format!("4k randwrite QD{qd} {label}, mirrored (VM off its sequencer)"),
                (mv, "ms"),
                "Convoy sync",
                sv,
                None,
            );
        }
        if *qd == 1 {
            let d = m.p99_ms - s.p99_ms;
            t.add(
                "4k randwrite QD1 p99, mirrored minus sync",
                (m.p99_ms, "ms"),
                "Convoy sync",
                (s.p99_ms, "ms"),
                d,
                format!("{d:+.3} ms"),
                "<= +0.3 ms",
                Some(d <= 0.3),
            );
        }
        t.ratio(
            &format!("4k randwrite QD{qd} IOPS, mirrored vs sync"),
            (m.iops, "IOPS"),
            "Convoy sync",
            s.iops,
            (*qd == 32).then_some(Target::AtLeast(0.8)),
        );
        let d = m.p99_ms - n.p99_ms;
        t.add(
            &format!("4k randwrite QD{qd} p99, mirrored vs no replica (local)"),
            (m.p99_ms, "ms"),
            "Convoy, no replica",
            (n.p99_ms, "ms"),
            d,
            format!("{d:+.2} ms"),
            "-",
            None,
        );
    }
    let paused: Vec<f64> = swaps.iter().map(|w| w.paused_ms).collect();
    let stalls: Vec<f64> = swaps.iter().map(|w| w.longest_write_ms).collect();
    for (what, v) in [
        (
            "switch-primary write pause p99, 20 swaps under load (paused_ms)",
            &paused,
        ),
        (
            "switch-primary: guest's longest write during a swap, p99 of 20",
            &stalls,
        ),
    ] {
        let p99 = percentile(v, 99.0);
        t.add(
            what,
            (p99, "ms"),
            "target",
            (50.0, "ms"),
            p99 / 50.0,
            format!("{:.3}x", p99 / 50.0),
            "< 50 ms",
            Some(p99 < 50.0),
        );
    }
    let steady = swaps.first().map_or(0.0, |w| w.steady_p99_ms);
    t.note(format!(
        "switch-primary: 20 swaps between nodes 1 and 2 (sync) while a QD1 4 KiB writer (this process's NBD client on node 1's export) ran; paused_ms p50 {:.1} / p99 {:.1} / max {:.1} ms; guest's longest write during a swap p50 {:.1} / p99 {:.1} / max {:.1} ms; writer p99 outside swaps {steady:.3} ms; {} writes failed; {} swap attempts refused and retried",
        percentile(&paused, 50.0),
        percentile(&paused, 99.0),
        percentile(&paused, 100.0),
        percentile(&stalls, 50.0),
        percentile(&stalls, 99.0),
        percentile(&stalls, 100.0),
        swaps.first().map_or(0, |w| w.failed_writes),
        swaps.first().map_or(0, |w| w.refused_attempts),
    ));
    t.note(format!(
        "mirrored: VM dp moved to node 2 (vm move), fio on node 2's export {mirrored_uri}; writes go to node 1 (sequencer) over the mirror stream, node 1 replicates them sync to node 2 before answering"
    ));
    extra.insert(
        "switch_primary".into(),
        json!(swaps.iter().map(|w| json!({"paused_ms": w.paused_ms, "longest_write_ms": w.longest_write_ms, "to": w.to})).collect::<Vec<_>>()),
    );
    extra.insert(
        "bulk".into(),
        json!({
            "nbdkit_seconds": bulk_peer,
            "none_seconds": bulk_none,
            "async": {"seconds": bulk_async.secs, "catch_up_seconds": bulk_async.catch_up, "resyncs": bulk_async.resyncs},
            "sync": {"seconds": bulk_sync.secs, "catch_up_seconds": bulk_sync.catch_up, "resyncs": bulk_sync.resyncs},
        }),
    );
    t.section = 3;
    t.note(format!(
        "fio: --ioengine=nbd, 4 KiB randwrite over the whole 1 GiB (both fully written first), {FIO_RAMP} s warm-up + {FIO_RUNTIME} s, 1 job, no flushes; Unix-socket URIs on both sides (Convoy {convoy_uri}; TCP {convoy_tcp_uri} not used)"
    ));
    t.note(format!(
        "async replica: initial resync of the 1 GiB disk took {initial:.1} s; catch-up after the QD1/QD32 runs {:.1} s / {:.1} s",
        catch_up.first().copied().unwrap_or(0.0),
        catch_up.get(1).copied().unwrap_or(0.0)
    ));
    t.note(format!("fio server CPU: {}", fio_notes.join("; ")));
    t.note(format!(
        "durable floor: the same 4 KiB random writes made durable by the disk alone (fio psync --sync=dsync, 1 or 32 threads, a 1 GiB file next to the images): QD1 {:.0} IOPS p99 {:.3} ms, QD32 {:.0} IOPS p99 {:.3} ms. A sync replica acknowledges only once its disk holds the write: this is what the disk gives writers that each wait for durability (the replica does better by flushing batches)",
        floors[0].iops, floors[0].p99_ms, floors[1].iops, floors[1].p99_ms
    ));
    dev.assert_no_panics();

    let load_end = loadavg();
    t.section = 0;
    t.note(format!(
        "machine: {} cores; load average (1/5/15 min) {load_start} at start, {load_end} at end; run took {:.0} s",
        cores(),
        started.elapsed().as_secs_f64()
    ));
    t.note(
        "page cache: dirty data flushed and a 1.5 GiB scratch file written+deleted before every timed copy/sync (Convoy and peers alike)".into(),
    );
    println!();
    println!("Convoy data-plane benchmark vs peers (cluster on {ip}, build profile: dev)");
    t.print();
    let out = json!({
        "benchmark": "data_plane",
        "when_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "cores": cores(),
        "load_start": load_start,
        "load_end": load_end,
        "rows": t.sorted().iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
        "notes": t.sorted_notes().iter().map(|n| n.1.clone()).collect::<Vec<_>>(),
        "details": Value::Object(extra),
        "fio": Value::Object(fio_json),
    });
    let path = target_dir().join("bench-data_plane.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("JSON: {}", path.display());
    live().dirs.clear();
}

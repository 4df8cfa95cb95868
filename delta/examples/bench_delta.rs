//! Compare-delta and full-copy throughput against the transport's raw throughput and the
//! usual peers (rsync, nbdcopy, qemu-img), all on this machine in one run. Prints figures;
//! asserts nothing.
//!
//! Run: `cargo run -p convoy-delta --example bench_delta` (size: `DELTA_BENCH_MIB`,
//! default 1024). Peers that are not installed are skipped. Everything listens on
//! 127.0.0.1 only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_delta::{
    Binding, DeltaConfig, DeltaServer, DeltaStats, Expect, Mode, Offer, Role, Served, Session, push,
};
use convoy_store::DiskImage;
use convoy_transport::pki::{self, TlsIdentity};
use convoy_transport::{Endpoint, StreamKind, TransportConfig};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const CHUNK: u64 = 64 * 1024;
const MB: f64 = 1e6;

fn identity(ca: &pki::CertAndKeyPem, id: u64) -> TlsIdentity {
    let c = pki::issue_node_cert(ca, id, &[]).unwrap();
    TlsIdentity::from_pem(&ca.cert_pem, &c.cert_pem, &c.key_pem).unwrap()
}

fn bind(ca: &pki::CertAndKeyPem, id: u64) -> (Endpoint, convoy_transport::Inbound) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Endpoint::bind(any, id, &identity(ca, id), TransportConfig::default()).unwrap()
}

fn fill_random(img: &DiskImage, rng: &mut StdRng) {
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < img.size() {
        let n = (img.size() - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        img.write_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
}

fn copy_image(src: &DiskImage, dst: &DiskImage) {
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < src.size() {
        let n = (src.size() - off).min(buf.len() as u64) as usize;
        src.read_at(&mut buf[..n], off).unwrap();
        dst.write_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
}

fn scribble(img: &DiskImage, k: u64, rng: &mut StdRng) {
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < k {
        chosen.insert(rng.gen_range(0..img.chunk_count()));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    for c in chosen {
        rng.fill_bytes(&mut buf);
        img.write_at(&buf, c * CHUNK).unwrap();
    }
}

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            println!("port {port} never opened; skipping that peer");
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Kills a helper daemon when the benchmark is done with it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cp_sparse(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp {} failed", from.display());
}

fn drop_file_cache_note() -> &'static str {
    "files stay in the page cache; before each timed full copy a 1.5 GiB scratch file is written and deleted, because on this VM freshly allocated page-cache pages cost ~4 s/GiB (free-page reporting) while recycled ones do not"
}

/// Writes and deletes a scratch file so the next run finds recycled page-cache pages.
fn prime(dir: &Path) {
    use std::io::Write;
    let path = dir.join("prime.tmp");
    let mut f = std::fs::File::create(&path).unwrap();
    let buf = vec![0x11u8; 4 << 20];
    for _ in 0..384 {
        f.write_all(&buf).unwrap();
    }
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

struct Row {
    what: String,
    secs: f64,
    bytes: Option<u64>,
    note: String,
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<58} {:>9} {:>14} {:>10}  note",
        "run", "wall s", "wire bytes", "MB/s"
    );
    for r in rows {
        let bytes = r.bytes.map_or("-".to_string(), |b| b.to_string());
        let rate = r.bytes.map_or("-".to_string(), |b| {
            format!("{:.0}", b as f64 / r.secs / MB)
        });
        println!(
            "{:<58} {:>9.3} {:>14} {:>10}  {}",
            r.what, r.secs, bytes, rate, r.note
        );
    }
}

fn describe(s: &DeltaStats) -> String {
    format!(
        "sent {} chunks ({} zero), {} data B, {} hashes in {} B",
        s.chunks_sent, s.zero_chunks_sent, s.data_bytes_sent, s.chunks_compared, s.hash_bytes
    )
}

/// Raw transport: one stream, 2 MiB frames, no disk.
async fn raw_throughput(ca: &pki::CertAndKeyPem, total: u64) -> f64 {
    let (a, _a_in) = bind(ca, 11);
    let (b, mut b_in) = bind(ca, 12);
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
    let frame = Bytes::from(vec![0x5au8; 2 << 20]);
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
    let secs = start.elapsed().as_secs_f64();
    sent as f64 / secs
}

struct Responder {
    _server: DeltaServer,
    results: tokio::sync::mpsc::UnboundedReceiver<Served>,
}

type Target = Arc<std::sync::Mutex<Arc<DiskImage>>>;

fn spawn_responder(mut inbound: convoy_transport::Inbound, target: Target) -> Responder {
    let expect = Expect {
        cg: 1,
        disk: 1,
        min_epoch: 1,
    };
    let resolver = move |_peer: u64, _b: &Binding, _role: Role| {
        Some(Offer {
            expect,
            role: Role::Destination,
            image: target.lock().unwrap().clone(),
        })
    };
    let server = DeltaServer::new(DeltaConfig::default(), resolver).unwrap();
    let (tx, results) = tokio::sync::mpsc::unbounded_channel();
    let srv = server.clone();
    tokio::spawn(async move {
        while let Some(stream) = inbound.next().await {
            let srv = srv.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match srv.serve(stream).await {
                    Ok(Served::Attached) => {}
                    Ok(other) => {
                        let _ = tx.send(other);
                    }
                    Err(e) => eprintln!("responder: {e}"),
                }
            });
        }
    });
    Responder {
        _server: server,
        results,
    }
}

fn rsync_run(dir: &Path, src: &Path, dst: &Path) -> Option<(f64, u64)> {
    let port = free_port();
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = false\nuid = root\ngid = root\npid file = {}\n[m]\n  path = {}\n  read only = false\n",
            dir.join("rsyncd.pid").display(),
            dst.parent().unwrap().display()
        ),
    )
    .unwrap();
    let daemon = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let _daemon = Daemon(daemon);
    if !wait_for_port(port) {
        return None;
    }
    // Make rsync's quick check (size + mtime) see a difference, as in real use.
    let _ = Command::new("touch")
        .args(["-d", "2000-01-01"])
        .arg(dst)
        .status();
    let name = dst.file_name().unwrap().to_string_lossy().to_string();
    prime(dir);
    let start = Instant::now();
    let out = Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "-B", "65536", "--stats"])
        .arg(src)
        .arg(format!("rsync://127.0.0.1:{port}/m/{name}"))
        .output()
        .ok()?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        eprintln!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| {
                v.split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .replace(',', "")
                    .parse()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let bytes = field("Total bytes sent:") + field("Total bytes received:");
    Some((secs, bytes))
}

fn nbd_runs(dir: &Path, src: &Path, size: u64, rows: &mut Vec<Row>) {
    if !installed("nbdkit") {
        println!("nbdkit not installed: skipping nbdcopy / qemu-img peers");
        return;
    }
    for tool in ["nbdcopy", "qemu-img"] {
        if !installed(tool) {
            continue;
        }
        let target = dir.join(format!("nbd-{tool}.img"));
        let f = std::fs::File::create(&target).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let port = free_port();
        let daemon = Command::new("nbdkit")
            .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
            .arg(format!("file={}", target.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(daemon) = daemon else { continue };
        let _daemon = Daemon(daemon);
        if !wait_for_port(port) {
            continue;
        }
        let uri = format!("nbd://127.0.0.1:{port}");
        let mut cmd = Command::new(tool);
        if tool == "nbdcopy" {
            cmd.arg(src).arg(&uri);
        } else {
            cmd.args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(src)
                .arg(&uri);
        }
        prime(dir);
        let start = Instant::now();
        let ok = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let secs = start.elapsed().as_secs_f64();
        if ok {
            rows.push(Row {
                what: format!("full copy: {tool} -> nbdkit file (TCP 127.0.0.1)"),
                secs,
                bytes: Some(size),
                note: "peer; plain TCP, no TLS".into(),
            });
        } else {
            println!("{tool} failed; skipped");
        }
        let _ = std::fs::remove_file(&target);
    }
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::var("DELTA_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let ca = pki::generate_ca("bench-delta").unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let mut rows = Vec::new();
    println!(
        "bench_delta: {mib} MiB disks, 64 KiB chunks; {}",
        drop_file_cache_note()
    );

    // 1. The wire: raw single-stream transport throughput.
    let raw = raw_throughput(&ca, size).await;
    rows.push(Row {
        what: "transport: raw frames, 1 QUIC stream, 2 MiB frames".into(),
        secs: size as f64 / raw,
        bytes: Some(size),
        note: "baseline (no disk, no protocol)".into(),
    });

    // 2. Compare-delta: destination differs in 5% of its chunks.
    let (a, _a_in) = bind(&ca, 1);
    let (_b, b_in) = bind(&ca, 2);
    let b_addr = _b.local_addr();
    let src = Arc::new(DiskImage::create(dir, "src", size).unwrap());
    let dst = Arc::new(DiskImage::create(dir, "dst", size).unwrap());
    fill_random(&src, &mut rng);
    copy_image(&src, &dst);
    let k = src.chunk_count() * 5 / 100;
    scribble(&dst, k, &mut rng);
    // Same starting point for rsync.
    let rs_dir = dir.join("rsync");
    std::fs::create_dir_all(rs_dir.join("dst")).unwrap();
    let rs_src = rs_dir.join("src.img");
    let rs_dst = rs_dir.join("dst").join("disk.img");
    let have_rsync = installed("rsync");
    if have_rsync {
        cp_sparse(dst.path(), &rs_dst);
    }
    let mut responder = spawn_responder(b_in, Arc::new(std::sync::Mutex::new(dst.clone())));
    let session = Session {
        cg: 1,
        disk: 1,
        epoch: 1,
    };
    let cfg = DeltaConfig::default();
    prime(dir);
    let cold = push(
        &a,
        2,
        b_addr,
        session,
        Mode::CompareDelta,
        src.clone(),
        &cfg,
    )
    .await
    .unwrap();
    let served = responder.results.recv().await;
    rows.push(Row {
        what: format!(
            "compare-delta, {k} of {} chunks differ, cold hashes",
            src.chunk_count()
        ),
        secs: cold.elapsed.as_secs_f64(),
        bytes: Some(cold.wire_bytes),
        note: format!("{}; both sides hash 1x disk", describe(&cold)),
    });
    if let Some(Served::Completed(r)) = served {
        println!(
            "destination side: {} in {:.3} s",
            describe(&r.stats),
            r.stats.elapsed.as_secs_f64()
        );
    }
    // Warm: the store keeps hashes current, so a later session only rehashes what changed.
    scribble(&dst, k, &mut rng);
    let warm = push(
        &a,
        2,
        b_addr,
        session,
        Mode::CompareDelta,
        src.clone(),
        &cfg,
    )
    .await
    .unwrap();
    let _ = responder.results.recv().await;
    rows.push(Row {
        what: format!("compare-delta, {k} chunks differ, hashes cached"),
        secs: warm.elapsed.as_secs_f64(),
        bytes: Some(warm.wire_bytes),
        note: describe(&warm),
    });
    for streams in [1u16, 8] {
        scribble(&dst, k, &mut rng);
        let mut c = DeltaConfig::default();
        c.data_streams = streams;
        let s = push(&a, 2, b_addr, session, Mode::CompareDelta, src.clone(), &c)
            .await
            .unwrap();
        let _ = responder.results.recv().await;
        rows.push(Row {
            what: format!("compare-delta, hashes cached, {streams} data stream(s)"),
            secs: s.elapsed.as_secs_f64(),
            bytes: Some(s.wire_bytes),
            note: describe(&s),
        });
    }
    let equal = push(
        &a,
        2,
        b_addr,
        session,
        Mode::CompareDelta,
        src.clone(),
        &cfg,
    )
    .await
    .unwrap();
    let _ = responder.results.recv().await;
    rows.push(Row {
        what: "compare-delta, images equal".into(),
        secs: equal.elapsed.as_secs_f64(),
        bytes: Some(equal.wire_bytes),
        note: describe(&equal),
    });

    if have_rsync {
        cp_sparse(src.path(), &rs_src);
        match rsync_run(&rs_dir, &rs_src, &rs_dst) {
            Some((secs, bytes)) => rows.push(Row {
                what: "rsync --inplace --no-whole-file -B 65536 (daemon)".into(),
                secs,
                bytes: Some(bytes),
                note: "peer; same 5% difference; bytes from --stats".into(),
            }),
            None => println!("rsync run failed; skipped"),
        }
        let _ = std::fs::remove_file(&rs_dst);
    } else {
        println!("rsync not installed: skipping (apt-get install -y rsync)");
    }
    drop(responder);

    // 3. Full copy of random data into a new, empty disk.
    let (c_ep, _c_in) = bind(&ca, 3);
    let (d_ep, d_in) = bind(&ca, 4);
    let first = Arc::new(DiskImage::create(dir, "full0", size).unwrap());
    let target: Target = Arc::new(std::sync::Mutex::new(first));
    let mut full_resp = spawn_responder(d_in, target.clone());
    let mut full4 = None;
    for (i, streams) in [4u16, 1].into_iter().enumerate() {
        if i > 0 {
            let fresh = DiskImage::create(dir, &format!("full{i}"), size).unwrap();
            let old = std::mem::replace(&mut *target.lock().unwrap(), Arc::new(fresh));
            drop(old);
            DiskImage::destroy(dir, &format!("full{}", i - 1)).unwrap();
        }
        let mut c = DeltaConfig::default();
        c.data_streams = streams;
        prime(dir);
        let full = push(
            &c_ep,
            4,
            d_ep.local_addr(),
            session,
            Mode::FullCopy,
            src.clone(),
            &c,
        )
        .await
        .unwrap();
        let _ = full_resp.results.recv().await;
        rows.push(Row {
            what: format!("full copy, random data, {streams} data stream(s)"),
            secs: full.elapsed.as_secs_f64(),
            bytes: Some(full.wire_bytes),
            note: format!("{}; fdatasync included", describe(&full)),
        });
        full4.get_or_insert(full);
    }
    let full = full4.unwrap();
    if rs_src.exists() {
        nbd_runs(dir, &rs_src, size, &mut rows);
    } else {
        cp_sparse(src.path(), &rs_src);
        nbd_runs(dir, &rs_src, size, &mut rows);
    }

    print_table(&rows);
    let pct = |s: &DeltaStats| s.data_bytes_sent as f64 / s.elapsed.as_secs_f64() / raw * 100.0;
    println!();
    println!(
        "protocol efficiency: full copy moves chunk data at {:.0}% of the raw single-stream wire rate; cached compare-delta at {:.0}%",
        pct(&full),
        pct(&warm)
    );
    drop((a, c_ep, d_ep));
}

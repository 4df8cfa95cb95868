//! The server against independent NBD clients: libnbd's `nbdinfo` and `nbdcopy`, QEMU's
//! `qemu-io` and `qemu-img`. A test whose client is missing fails and says how to install
//! it (`apt-get install libnbd-bin qemu-utils`, or `scripts/setup-debian`): a skipped
//! test would pass without checking anything.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use convoy_nbd::{BlockDevice, DeviceFuture, ExportRegistry, FileDevice};
use tokio::process::Command;

/// Finds `name` on PATH, or fails the test saying how to install it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed; this test needs it: apt-get install libnbd-bin qemu-utils (or run scripts/setup-debian)"
            )
        })
}

/// Runs a client with a deadline and returns its output; panics with its stderr if it failed.
async fn run(program: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} timed out", program.display()))
        .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), with a zero run in the middle so sparse
/// handling is exercised too.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    v.resize(len, 0);
    let (a, b) = (len / 3, len / 3 + len / 8);
    v[a..b].fill(0);
    v
}

/// A server exporting a new sparse file of `size` bytes as `disk`; the file lives in
/// the server's temporary directory.
fn file_server(size: u64) -> (TestServer, PathBuf) {
    let server = TestServer::start(ExportRegistry::new());
    let image = server.dir.path().join("export.img");
    let device = FileDevice::create(&image, size).unwrap();
    server
        .exports
        .add("disk", Arc::new(device), "file export")
        .unwrap();
    (server, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_and_lists_exports() {
    let nbdinfo = tool("nbdinfo");
    let exports = ExportRegistry::new();
    exports
        .add("disk", MemDevice::new(3 << 20), "the first disk")
        .unwrap();
    exports
        .add(
            "ro",
            MemDevice::read_only(1 << 20) as Arc<dyn BlockDevice>,
            "a read-only disk",
        )
        .unwrap();
    let server = TestServer::start(exports.clone());

    let out = run(&nbdinfo, &["--size", &server.uri("disk")]).await;
    assert_eq!(stdout(&out).trim(), (3u64 << 20).to_string());

    let json = stdout(&run(&nbdinfo, &["--json", &server.uri("disk")]).await);
    for expected in [
        "\"export-size\": 3145728",
        "\"is_read_only\": false",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_multi_conn\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"block_size_maximum\": 33554432",
        "\"description\": \"the first disk\"",
    ] {
        assert!(
            json.contains(expected),
            "nbdinfo --json lacks {expected}:\n{json}"
        );
    }
    let json = stdout(&run(&nbdinfo, &["--json", &server.uri("ro")]).await);
    assert!(json.contains("\"is_read_only\": true"), "{json}");

    let list_uri = format!("nbd+unix://?socket={}", server.socket.display());
    let listed = stdout(&run(&nbdinfo, &["--list", &list_uri]).await);
    for expected in [
        "export=\"disk\"",
        "export=\"ro\"",
        "the first disk",
        "a read-only disk",
    ] {
        assert!(
            listed.contains(expected),
            "nbdinfo --list lacks {expected}:\n{listed}"
        );
    }

    // Same over TCP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tcp = tokio::spawn(convoy_nbd::serve_tcp(listener, exports, async {
        let _ = rx.await;
    }));
    let out = run(&nbdinfo, &["--size", &format!("nbd://{addr}/disk")]).await;
    assert_eq!(stdout(&out).trim(), (3u64 << 20).to_string());
    tx.send(()).unwrap();
    tcp.await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_reads_zeroes_discards_and_keeps_many_writes_in_flight() {
    let qemu_io = tool("qemu-io");
    let (server, image) = file_server(8 << 20);
    let uri = server.uri("disk");

    let mut args: Vec<String> = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -z 16k 16k",
        "read -P 0 16k 16k",
        "write -P 0x11 1000 3", // unaligned
        "read -P 0x11 1000 3",
        "write -f -P 0x5a 1M 4k", // FUA
        "discard 2M 64k",
        "flush",
    ]
    .iter()
    .flat_map(|c| ["-c".to_string(), c.to_string()])
    .collect();
    // 64 asynchronous writes in flight at once, then a flush and a check of all of them.
    for i in 0..64u64 {
        args.push("-c".into());
        args.push(format!(
            "aio_write -P 0x{:02x} {} 16k",
            i + 1,
            (4 << 20) + i * (16 << 10)
        ));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    for i in 0..64u64 {
        args.push("-c".into());
        args.push(format!(
            "read -P 0x{:02x} {} 16k",
            i + 1,
            (4 << 20) + i * (16 << 10)
        ));
    }
    let mut full = vec!["-f".to_string(), "raw".to_string(), uri.clone()];
    full.extend(args);
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    // qemu-io exits non-zero if a pattern check fails.
    let out = run(&qemu_io, &full).await;
    assert!(!stdout(&out).contains("failed"), "{}", stdout(&out));

    // The file behind the export has the data.
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[..1000].iter().all(|&b| b == 0xab));
    assert_eq!(&bytes[1000..1003], &[0x11; 3]);
    assert!(bytes[16 << 10..32 << 10].iter().all(|&b| b == 0));
    assert!(bytes[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x5a));
    for i in 0..64usize {
        let at = (4 << 20) + i * (16 << 10);
        assert!(
            bytes[at..at + (16 << 10)].iter().all(|&b| b == i as u8 + 1),
            "aio write {i}"
        );
    }

    // A failing pattern check is seen as a failure (the harness would catch a lie).
    let status = Command::new(&qemu_io)
        .args(["-f", "raw", &uri, "-c", "read -P 0x77 0 4k"])
        .output()
        .await
        .unwrap()
        .status;
    assert!(!status.success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_converts_into_and_out_of_the_export_and_compares_equal() {
    let qemu_img = tool("qemu-img");
    let size = 16usize << 20;
    let (server, image) = file_server(size as u64);
    let uri = server.uri("disk");
    let src = server.dir.path().join("src.img");
    std::fs::write(&src, pattern(size, 42)).unwrap();
    let src = src.to_str().unwrap();

    // -n: the target exists (it is the export); qemu-img writes, zeroes and flushes.
    run(
        &qemu_img,
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    )
    .await;
    run(&qemu_img, &["compare", "-f", "raw", "-F", "raw", src, &uri]).await;
    assert!(std::fs::read(&image).unwrap() == std::fs::read(src).unwrap());

    let out = server.dir.path().join("out.img");
    let out = out.to_str().unwrap();
    run(&qemu_img, &["convert", "-f", "raw", "-O", "raw", &uri, out]).await;
    assert!(std::fs::read(out).unwrap() == std::fs::read(src).unwrap());

    // A difference is detected (compare exits 1), so the equal result above means something.
    std::fs::write(out, pattern(size, 7)).unwrap();
    let status = Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw", out, &uri])
        .output()
        .await
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(1));
    server.stop().await;
}

/// A [`FileDevice`] that notes how many connections and writes were active at once.
struct Probe {
    inner: FileDevice,
    exports: ExportRegistry,
    writes: AtomicUsize,
    max_writes: AtomicUsize,
    max_connections: AtomicUsize,
}

impl BlockDevice for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> DeviceFuture<'_, Bytes> {
        self.inner.read(offset, len)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            let now = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_writes.fetch_max(now, Ordering::SeqCst);
            let conns = self.exports.connection_count("disk").unwrap_or(0);
            self.max_connections.fetch_max(conns, Ordering::SeqCst);
            let r = self.inner.write(offset, data, fua).await;
            self.writes.fetch_sub(1, Ordering::SeqCst);
            r
        })
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        self.inner.flush()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_copies_64_mib_in_and_out_over_several_connections() {
    let nbdcopy = tool("nbdcopy");
    let size = 64usize << 20;
    let server = TestServer::start(ExportRegistry::new());
    let image = server.dir.path().join("export.img");
    let probe = Arc::new(Probe {
        inner: FileDevice::create(&image, size as u64).unwrap(),
        exports: server.exports.clone(),
        writes: AtomicUsize::new(0),
        max_writes: AtomicUsize::new(0),
        max_connections: AtomicUsize::new(0),
    });
    server.exports.add("disk", probe.clone(), "").unwrap();
    let uri = server.uri("disk");
    let src = server.dir.path().join("src.img");
    let data = pattern(size, 1234);
    std::fs::write(&src, &data).unwrap();
    let src = src.to_str().unwrap();
    // nbdcopy uses at most one connection per thread.
    let many = [
        "--threads=4",
        "--connections=4",
        "--requests=32",
        "--request-size=1048576",
    ];

    let mut args = many.to_vec();
    args.extend(["--flush", src, &uri]);
    run(&nbdcopy, &args).await;
    assert!(
        std::fs::read(&image).unwrap() == data,
        "export differs after nbdcopy in"
    );
    let conns = probe.max_connections.load(Ordering::SeqCst);
    let writes = probe.max_writes.load(Ordering::SeqCst);
    eprintln!("nbdcopy in: up to {conns} connections, {writes} writes in flight");
    assert!(conns > 1, "nbdcopy did not use multi-conn");
    assert!(writes > 1, "no concurrent writes");

    let out = server.dir.path().join("out.img");
    let out = out.to_str().unwrap();
    let mut args = many.to_vec();
    args.extend([uri.as_str(), out]);
    run(&nbdcopy, &args).await;
    assert!(
        std::fs::read(out).unwrap() == data,
        "copy differs after nbdcopy out"
    );
    // The probe holds the registry: break the cycle.
    server.exports.remove("disk");
    server.stop().await;
}

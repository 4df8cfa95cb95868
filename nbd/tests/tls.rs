//! NBD over TCP with TLS ('FORCEDTLS'): only clients presenting an NBD client certificate
//! from the cluster CA get in, checked with real clients (QEMU's `tls-creds-x509`, libnbd's
//! `nbds://` URIs) and a raw protocol client. The tools come from the Debian packages
//! qemu-utils and libnbd-bin (`scripts/setup-debian`); a missing tool fails the test.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use convoy_nbd::{ExportRegistry, FileDevice, Server, ServerConfig};
use convoy_transport::pki::{self, CertAndKeyPem, TlsIdentity};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const DAY: Duration = Duration::from_secs(24 * 3600);

/// The path of `name`, or a failed test saying how to install it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed; this test needs it: apt-get install qemu-utils libnbd-bin (or run scripts/setup-debian)"
            )
        })
}

/// Runs a client with a deadline; returns its output whatever its exit status.
async fn output(program: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} timed out", program.display()))
        .unwrap()
}

/// Runs a client that must succeed.
async fn run(program: &Path, args: &[&str]) -> Output {
    let out = output(program, args).await;
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

/// Runs a client that must fail; returns its stderr.
async fn refused(program: &Path, args: &[&str]) -> String {
    let out = output(program, args).await;
    assert!(
        !out.status.success(),
        "{} {args:?} succeeded but must be refused:\nstdout: {}",
        program.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A cluster CA, the server's (node) identity, and client credential directories laid
/// out as QEMU's `tls-creds-x509` and libnbd's `tls-certificates` read them.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertAndKeyPem,
    server: TlsIdentity,
}

impl Pki {
    fn new() -> Self {
        let ca = pki::generate_ca("nbd test cluster").unwrap();
        let node = pki::issue_node_cert(&ca, 1, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let server = TlsIdentity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        Self {
            dir: tempfile::tempdir().unwrap(),
            ca,
            server,
        }
    }

    /// `ca-cert.pem` (the cluster CA, so the client trusts the server) and, if given, a
    /// client certificate and key.
    fn client_dir(&self, name: &str, client: Option<&CertAndKeyPem>) -> String {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), &self.ca.cert_pem).unwrap();
        if let Some(c) = client {
            std::fs::write(dir.join("client-cert.pem"), &c.cert_pem).unwrap();
            std::fs::write(dir.join("client-key.pem"), &c.key_pem).unwrap();
        }
        dir.to_str().unwrap().to_owned()
    }

    /// A directory with a good NBD client certificate from the cluster CA.
    fn good_dir(&self) -> String {
        let client = pki::issue_nbd_client_cert(&self.ca, "hypervisor-1", DAY).unwrap();
        self.client_dir("good", Some(&client))
    }
}

/// A TLS-only server on 127.0.0.1 for `exports`.
struct TlsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    async fn start(exports: ExportRegistry, identity: &TlsIdentity) -> Self {
        let config = ServerConfig {
            tls: Some(Arc::new(pki::nbd_server_config(identity).unwrap())),
            ..ServerConfig::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = Server::with_config(exports, config);
        let task = tokio::spawn(async move {
            server
                .serve_tcp(listener, async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            addr,
            stop: Some(tx),
            task,
        }
    }

    /// QEMU `--image-opts` for `export` over TLS with credentials `tls0`.
    fn qemu_opts(&self, export: &str) -> String {
        format!(
            "driver=nbd,server.type=inet,server.host={},server.port={},export={export},tls-creds=tls0",
            self.addr.ip(),
            self.addr.port()
        )
    }

    /// libnbd URI for `export` over TLS with the credentials in `dir`.
    fn nbds_uri(&self, export: &str, dir: &str) -> String {
        format!("nbds://{}/{export}?tls-certificates={dir}", self.addr)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap();
    }
}

fn qemu_creds(dir: &str) -> String {
    format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client")
}

/// A file-backed export `disk` of `size` bytes; returns the registry and the file.
fn file_export(dir: &Path, size: u64) -> (ExportRegistry, PathBuf) {
    let image = dir.join("export.img");
    let exports = ExportRegistry::new();
    exports
        .add(
            "disk",
            Arc::new(FileDevice::create(&image, size).unwrap()),
            "tls disk",
        )
        .unwrap();
    (exports, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_and_qemu_io_work_over_tls_with_an_nbd_client_certificate() {
    let (qemu_img, qemu_io) = (tool("qemu-img"), tool("qemu-io"));
    let pki = Pki::new();
    let (exports, image) = file_export(pki.dir.path(), 8 << 20);
    let server = TlsServer::start(exports, &pki.server).await;
    let creds = qemu_creds(&pki.good_dir());
    let opts = server.qemu_opts("disk");

    let info = run(
        &qemu_img,
        &[
            "info",
            "--output=json",
            "--object",
            &creds,
            "--image-opts",
            &opts,
        ],
    )
    .await;
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("\"virtual-size\": 8388608"), "{info}");

    let out = run(
        &qemu_io,
        &[
            "--object",
            &creds,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0x5a 1M 4k",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0x5a 1M 4k",
        ],
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[..64 << 10].iter().all(|&b| b == 0xab));
    assert!(bytes[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x5a));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_and_nbdcopy_work_over_tls_with_tls_certificates() {
    let (nbdinfo, nbdcopy) = (tool("nbdinfo"), tool("nbdcopy"));
    let pki = Pki::new();
    let size = 16usize << 20;
    let (exports, image) = file_export(pki.dir.path(), size as u64);
    let server = TlsServer::start(exports, &pki.server).await;
    let uri = server.nbds_uri("disk", &pki.good_dir());

    let out = run(&nbdinfo, &["--size", &uri]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        size.to_string()
    );
    let json = run(&nbdinfo, &["--json", &uri]).await;
    let json = String::from_utf8_lossy(&json.stdout);
    assert!(json.contains("\"description\": \"tls disk\""), "{json}");

    let src = pki.dir.path().join("src.img");
    let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    run(&nbdcopy, &["--flush", src.to_str().unwrap(), &uri]).await;
    assert!(
        std::fs::read(&image).unwrap() == data,
        "export differs after nbdcopy"
    );
    let out = pki.dir.path().join("out.img");
    run(&nbdcopy, &[&uri, out.to_str().unwrap()]).await;
    assert!(
        std::fs::read(&out).unwrap() == data,
        "copy differs after nbdcopy"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_an_nbd_certificate_from_the_cluster_ca_are_refused() {
    let (nbdinfo, qemu_img) = (tool("nbdinfo"), tool("qemu-img"));
    let pki = Pki::new();
    let device = MemDevice::new(1 << 20);
    let server = TlsServer::start(registry("disk", device.clone()), &pki.server).await;

    let other_ca = pki::generate_ca("another cluster").unwrap();
    let foreign = pki::issue_nbd_client_cert(&other_ca, "hypervisor-1", DAY).unwrap();
    let admin = pki::issue_client_cert(&pki.ca, "admin").unwrap();
    let node = pki::issue_node_cert(&pki.ca, 2, &[]).unwrap();
    let foreign_dir = pki.client_dir("foreign", Some(&foreign));
    // The client trusts both CAs, so QEMU's own check of its certificate passes and the
    // only reason left to fail is the server refusing it.
    let bundle = format!("{}{}", pki.ca.cert_pem, other_ca.cert_pem);
    std::fs::write(Path::new(&foreign_dir).join("ca-cert.pem"), bundle).unwrap();
    let bad = [
        ("no client certificate", pki.client_dir("none", None)),
        ("a certificate from another CA", foreign_dir),
        (
            "an admin certificate",
            pki.client_dir("admin", Some(&admin)),
        ),
        ("a node certificate", pki.client_dir("node", Some(&node))),
    ];
    for (what, dir) in &bad {
        let err = refused(&nbdinfo, &["--size", &server.nbds_uri("disk", dir)]).await;
        eprintln!("nbdinfo with {what}: {}", err.trim());
        let opts = server.qemu_opts("disk");
        let err = refused(
            &qemu_img,
            &["info", "--object", &qemu_creds(dir), "--image-opts", &opts],
        )
        .await;
        eprintln!("qemu-img with {what}: {}", err.trim());
    }
    // Without TLS at all: refused too.
    let err = refused(
        &nbdinfo,
        &["--size", &format!("nbd://{}/disk", server.addr)],
    )
    .await;
    eprintln!("nbdinfo without TLS: {}", err.trim());
    assert!(err.contains("TLS"), "{err}");
    let plain = format!("nbd://{}/disk", server.addr);
    refused(&qemu_img, &["info", &plain]).await;
    assert!(
        device.ops().is_empty(),
        "a refused client reached the device"
    );

    // The server is unharmed: a good client still gets in.
    let out = run(
        &nbdinfo,
        &["--size", &server.nbds_uri("disk", &pki.good_dir())],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (1u64 << 20).to_string()
    );
    server.stop().await;
}

/// The FORCEDTLS rules of the spec, on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_tls_only_starttls_and_abort_are_honoured_then_everything_works_inside_tls() {
    bounded(30, async {
        let pki = Pki::new();
        let device = MemDevice::new(1 << 20);
        let server = TlsServer::start(registry("disk", device.clone()), &pki.server).await;
        let connect = || async {
            RawClient::handshake(TcpStream::connect(server.addr).await.unwrap(), true).await
        };

        let mut c = connect().await;
        let go = RawClient::<TcpStream>::info_data("disk", &[]);
        for (option, data) in [
            (OPT_LIST, Vec::new()),
            (OPT_INFO, go.clone()),
            (OPT_GO, go.clone()),
            (OPT_STRUCTURED_REPLY, Vec::new()),
            (0xdead, vec![1; 100]),
        ] {
            let replies = c.option(option, &data).await;
            assert_eq!(replies.len(), 1, "option {option}");
            assert_eq!(replies[0].kind, REP_ERR_TLS_REQD, "option {option}");
        }
        assert_eq!(c.option(OPT_STARTTLS, b"x").await[0].kind, REP_ERR_INVALID);
        // EXPORT_NAME before TLS: the session ends, nothing is sent.
        c.send_option(OPT_EXPORT_NAME, b"disk").await;
        assert!(c.is_closed().await);

        // ABORT before TLS is honoured.
        let mut c = connect().await;
        assert_eq!(c.option(OPT_ABORT, &[]).await[0].kind, REP_ACK);
        assert!(c.is_closed().await);

        // A client without fixed newstyle cannot negotiate TLS: closed.
        let mut c =
            RawClient::handshake_with_flags(TcpStream::connect(server.addr).await.unwrap(), 0)
                .await;
        c.send_option(OPT_GO, &go).await;
        assert!(c.is_closed().await);

        // STARTTLS, then the TLS handshake with an NBD client certificate, then GO.
        let mut c = connect().await;
        assert_eq!(c.option(OPT_STARTTLS, &[]).await[0].kind, REP_ACK);
        let client = pki::issue_nbd_client_cert(&pki.ca, "raw", DAY).unwrap();
        let id =
            TlsIdentity::from_pem(&pki.ca.cert_pem, &client.cert_pem, &client.key_pem).unwrap();
        let config = pki::client_config(&id, &[]).unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), c.stream)
            .await
            .unwrap();
        let mut c = RawClient { stream: tls };
        // Inside TLS: no TLS_REQD, a second STARTTLS is invalid, the rest works.
        assert_eq!(c.option(OPT_STARTTLS, &[]).await[0].kind, REP_ERR_INVALID);
        assert_eq!(c.option(OPT_LIST, &[]).await.last().unwrap().kind, REP_ACK);
        c.go("disk").await;
        assert_eq!(c.call(CMD_WRITE, 0, 0, 4, b"tls!").await, 0);
        assert_eq!(c.read(0, 4).await, Ok(b"tls!".to_vec()));
        c.request(CMD_DISC, 0, 1, 0, 0, &[]).await;
        assert!(c.is_closed().await);
        assert_eq!(&device.data.lock().unwrap()[..4], b"tls!");
        server.stop().await;
    })
    .await;
}

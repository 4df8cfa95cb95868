//! Shared scaffolding: two real transport endpoints with a test CA, disk images in temp
//! dirs, and a responder whose serve results the test can inspect.
// A failed setup step should fail the test, like unwrap inside a #[test].
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use convoy_delta::{
    Binding, DeltaConfig, DeltaError, DeltaServer, Expect, Offer, Role, Served, Session,
};
use convoy_store::DiskImage;
use convoy_transport::pki::{self, TlsIdentity};
use convoy_transport::{Endpoint, Inbound, TransportConfig};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tempfile::TempDir;
use tokio::sync::mpsc;

pub const CHUNK: usize = 64 * 1024;
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

pub const SESSION: Session = Session {
    cg: 7,
    disk: 42,
    epoch: 3,
};

pub const EXPECT: Expect = Expect {
    cg: 7,
    disk: 42,
    min_epoch: 3,
};

fn identity(ca: &pki::CertAndKeyPem, id: u64) -> TlsIdentity {
    let c = pki::issue_node_cert(ca, id, &[]).unwrap();
    TlsIdentity::from_pem(&ca.cert_pem, &c.cert_pem, &c.key_pem).unwrap()
}

/// Node 1 (initiator) and node 2 (responder) on 127.0.0.1.
pub struct Pair {
    pub a: Endpoint,
    pub b: Endpoint,
    pub b_in: Option<Inbound>,
    _a_in: Inbound,
}

impl Pair {
    pub fn new() -> Self {
        let ca = pki::generate_ca("delta-test").unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (a, a_in) =
            Endpoint::bind(any, 1, &identity(&ca, 1), TransportConfig::default()).unwrap();
        let (b, b_in) =
            Endpoint::bind(any, 2, &identity(&ca, 2), TransportConfig::default()).unwrap();
        Self {
            a,
            b,
            b_in: Some(b_in),
            _a_in: a_in,
        }
    }

    pub fn b_addr(&self) -> SocketAddr {
        self.b.local_addr()
    }

    /// Starts node 2's responder offering `image` in `role` under `expect`; returns the
    /// server and the results of its session (control-stream) serve calls.
    pub fn serve(
        &mut self,
        expect: Expect,
        role: Role,
        image: Arc<DiskImage>,
    ) -> (
        DeltaServer,
        mpsc::UnboundedReceiver<Result<Served, DeltaError>>,
    ) {
        let resolver = move |_peer: u64, _b: &Binding, _role: Role| {
            Some(Offer {
                expect,
                role,
                image: image.clone(),
            })
        };
        let server = DeltaServer::new(DeltaConfig::default(), resolver).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inbound = self.b_in.take().expect("serve called twice");
        let srv = server.clone();
        tokio::spawn(async move {
            while let Some(stream) = inbound.next().await {
                let srv = srv.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let r = srv.serve(stream).await;
                    if !matches!(r, Ok(Served::Attached)) {
                        let _ = tx.send(r);
                    }
                });
            }
        });
        (server, rx)
    }
}

pub fn create(dir: &Path, id: &str, size: u64) -> Arc<DiskImage> {
    Arc::new(DiskImage::create(dir, id, size).unwrap())
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Fills every chunk of `img` with random data.
pub fn fill_random(img: &DiskImage, rng: &mut StdRng) {
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < img.size() {
        let n = (img.size() - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        img.write_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
}

/// Copies `src` into `dst` (same size) chunk by chunk.
pub fn copy(src: &DiskImage, dst: &DiskImage) {
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < src.size() {
        let n = (src.size() - off).min(buf.len() as u64) as usize;
        src.read_at(&mut buf[..n], off).unwrap();
        dst.write_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
}

/// Overwrites `k` distinct random chunks of `img` with random data; returns them sorted.
pub fn scribble(img: &DiskImage, k: usize, rng: &mut StdRng) -> Vec<u64> {
    let n = img.chunk_count();
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < k {
        chosen.insert(rng.gen_range(0..n));
    }
    let mut buf = vec![0u8; CHUNK];
    for &c in &chosen {
        rng.fill_bytes(&mut buf);
        img.write_at(&buf, c * CHUNK as u64).unwrap();
    }
    chosen.into_iter().collect()
}

pub fn contents(img: &DiskImage) -> Vec<u8> {
    std::fs::read(img.path()).unwrap()
}

pub fn assert_equal(a: &DiskImage, b: &DiskImage) {
    let (x, y) = (contents(a), contents(b));
    assert_eq!(x.len(), y.len());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("images differ at byte {i} (chunk {})", i / CHUNK);
    }
}

pub fn tmp() -> TempDir {
    tempfile::tempdir().unwrap()
}

/// The next result of a session on the responder.
pub async fn next_session(
    rx: &mut mpsc::UnboundedReceiver<Result<Served, DeltaError>>,
) -> Result<Served, DeltaError> {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("no session result within 30 s")
        .expect("responder loop ended")
}

/// Waits for the responder to report a refused session, skipping what its data streams
/// report meanwhile (they race with the control stream's refusal).
pub async fn next_refusal(rx: &mut mpsc::UnboundedReceiver<Result<Served, DeltaError>>) -> Served {
    loop {
        match next_session(rx).await {
            Ok(refused @ Served::Refused { .. }) => return refused,
            Ok(Served::Attached) | Err(_) => continue,
            Ok(other) => panic!("expected a refusal, got {other:?}"),
        }
    }
}

//! Small-RPC latency and rate between two endpoints in one process (informational).
//! Run: `cargo run -p convoy-transport --example rpc_latency`
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use convoy_transport::pki::{self, TlsIdentity};
use convoy_transport::{Endpoint, StreamKind, TransportConfig};

fn identity(ca: &pki::CertAndKeyPem, id: u64) -> TlsIdentity {
    let c = pki::issue_node_cert(ca, id, &[]).unwrap();
    TlsIdentity::from_pem(&ca.cert_pem, &c.cert_pem, &c.key_pem).unwrap()
}

#[tokio::main]
async fn main() {
    let ca = pki::generate_ca("bench").unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let (a, _a_in) = Endpoint::bind(any, 1, &identity(&ca, 1), TransportConfig::default()).unwrap();
    let (b, mut b_in) =
        Endpoint::bind(any, 2, &identity(&ca, 2), TransportConfig::default()).unwrap();
    tokio::spawn(async move {
        while let Some(mut s) = b_in.next().await {
            tokio::spawn(async move {
                let req = s.read_request().await.unwrap();
                s.respond(&req).await.unwrap();
            });
        }
    });
    let addr = b.local_addr();
    let t = Duration::from_secs(5);
    a.request(2, addr, StreamKind::Forward, b"warm", t)
        .await
        .unwrap();
    let n = 2000;
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let s = Instant::now();
        a.request(2, addr, StreamKind::Forward, &[0u8; 200], t)
            .await
            .unwrap();
        lat.push(s.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    println!(
        "sequential 200-byte RPCs: p50 {:?} p99 {:?} -> {:.0}/s",
        lat[n / 2],
        lat[n * 99 / 100],
        n as f64 / total.as_secs_f64()
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..200 {
                a.request(2, addr, StreamKind::Forward, &[0u8; 200], t)
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "32 concurrent callers: {:.0} RPCs/s",
        6400.0 / start.elapsed().as_secs_f64()
    );
}

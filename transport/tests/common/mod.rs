//! Helpers shared by the integration tests: certificates, endpoints on 127.0.0.1, an echo
//! server, and raw quinn clients for misbehaving peers.
// Test scaffolding: a failed setup step should panic the test, like unwrap in a #[test].
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use convoy_transport::pki::{self, CertAndKeyPem, TlsIdentity};
use convoy_transport::{ALPN, Endpoint, Inbound, InboundStream, TransportConfig};
use quinn::crypto::rustls::QuicClientConfig;

/// Bound on one whole test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of one request in tests that expect success.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn node_identity(ca: &CertAndKeyPem, id: u64) -> TlsIdentity {
    node_identity_with_sans(ca, id, &[])
}

pub fn node_identity_with_sans(ca: &CertAndKeyPem, id: u64, sans: &[String]) -> TlsIdentity {
    let cert = pki::issue_node_cert(ca, id, sans).unwrap();
    TlsIdentity::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap()
}

pub fn bind(ca: &CertAndKeyPem, id: u64) -> (Endpoint, Inbound) {
    Endpoint::bind(
        any_port(),
        id,
        &node_identity(ca, id),
        TransportConfig::default(),
    )
    .unwrap()
}

/// Echo response: the stream kind byte, the caller's proven node id, then the request.
pub fn echo_response(stream: &InboundStream, request: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(9 + request.len());
    out.push(stream.kind.as_u8());
    out.extend_from_slice(&stream.peer.to_be_bytes());
    out.extend_from_slice(request);
    Bytes::from(out)
}

/// Answers every request with [`echo_response`].
pub fn spawn_echo(mut inbound: Inbound) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(mut stream) = inbound.next().await {
            tokio::spawn(async move {
                if let Ok(request) = stream.read_request().await {
                    let response = echo_response(&stream, &request);
                    let _ = stream.respond_bytes(response).await;
                }
            });
        }
    })
}

/// A plain quinn client endpoint presenting `identity`, for peers that break the rules.
pub fn raw_client(identity: &TlsIdentity) -> (quinn::Endpoint, quinn::ClientConfig) {
    let tls = pki::client_config(identity, &[ALPN]).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let endpoint = quinn::Endpoint::client(any_port()).unwrap();
    (endpoint, config)
}

/// Connects a raw client to node `node` at `addr`.
pub async fn raw_connect(
    identity: &TlsIdentity,
    node: u64,
    addr: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection) {
    let (endpoint, config) = raw_client(identity);
    let conn = endpoint
        .connect_with(config, addr, &pki::node_server_name(node))
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

/// Asserts that nothing arrives on `inbound` for a short while.
pub async fn assert_no_stream(inbound: &mut Inbound) {
    if let Ok(Some(stream)) = tokio::time::timeout(Duration::from_millis(300), inbound.next()).await
    {
        panic!(
            "unexpected stream from node {} of kind {}",
            stream.peer, stream.kind
        );
    }
}

/// Binds node `id` at `addr`, retrying while a just-closed endpoint still holds the port
/// (its background tasks release it asynchronously, like a process that is exiting).
pub async fn rebind(ca: &CertAndKeyPem, id: u64, addr: SocketAddr) -> (Endpoint, Inbound) {
    let identity = node_identity(ca, id);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match Endpoint::bind(addr, id, &identity, TransportConfig::default()) {
            Ok(bound) => return bound,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("rebinding {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

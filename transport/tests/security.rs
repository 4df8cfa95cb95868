//! Authentication and protocol-abuse checks: only nodes of this cluster, proven by their
//! certificates, get streams delivered; malformed streams are refused without harm.
// Test helpers panic on failed setup, like unwrap inside a #[test].
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use convoy_transport::pki::{self, PeerIdentity, TlsIdentity};
use convoy_transport::{Endpoint, StreamKind, TransportConfig, TransportError, codes};
use quinn::{ConnectionError, ReadError, VarInt};

const SHORT: Duration = Duration::from_secs(3);

fn assert_refused(err: &TransportError) {
    assert!(
        matches!(
            err,
            TransportError::Tls { .. } | TransportError::Unreachable { .. }
        ),
        "expected a TLS refusal, got {err:?}"
    );
}

/// Node 2 "mallory" has a certificate from another CA. It trusts both CAs (so the only
/// reason to fail is the other side refusing it), yet node 1 refuses it as a client and
/// as a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_cert_from_another_ca_is_refused_as_client_and_server() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("cluster").unwrap();
        let rogue_ca = pki::generate_ca("rogue").unwrap();
        let rogue_cert = pki::issue_node_cert(&rogue_ca, 2, &[]).unwrap();
        let both_cas = format!("{}{}", ca.cert_pem, rogue_ca.cert_pem);
        let mallory_id =
            TlsIdentity::from_pem(&both_cas, &rogue_cert.cert_pem, &rogue_cert.key_pem).unwrap();

        let (a, mut a_in) = bind(&ca, 1);
        let (mallory, mut m_in) =
            Endpoint::bind(any_port(), 2, &mallory_id, TransportConfig::default()).unwrap();

        // Mallory as client: node 1's server refuses her certificate.
        let err = mallory
            .request(
                1,
                a.local_addr(),
                StreamKind::RaftVote,
                b"vote for me",
                SHORT,
            )
            .await
            .unwrap_err();
        eprintln!("mallory as client: {err}");
        assert_refused(&err);
        assert_no_stream(&mut a_in).await;

        // Mallory as server: node 1 refuses her certificate when dialing node 2.
        let err = a
            .request(
                2,
                mallory.local_addr(),
                StreamKind::RaftAppend,
                b"entries",
                SHORT,
            )
            .await
            .unwrap_err();
        eprintln!("mallory as server: {err}");
        assert!(matches!(err, TransportError::Tls { .. }), "{err:?}");
        assert!(err.to_string().contains("node 2"), "{err}");
        assert_no_stream(&mut m_in).await;

        let state = &a.peer_states()[0];
        assert!(!state.connected);
        assert!(state.last_error.is_some());
    })
    .await
    .unwrap();
}

/// A server presenting node 3's certificate while dialed as node 2 is refused: by TLS
/// name verification, or — if its certificate also names `node-2` — by the identity check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_another_nodes_cert_is_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("cluster").unwrap();
        let (a, _a_in) = bind(&ca, 1);

        let (impostor, mut i_in) = bind(&ca, 3);
        let err = a
            .request(2, impostor.local_addr(), StreamKind::RaftVote, b"x", SHORT)
            .await
            .unwrap_err();
        eprintln!("impostor: {err}");
        assert!(matches!(err, TransportError::Tls { .. }), "{err:?}");
        assert_no_stream(&mut i_in).await;

        let sneaky = node_identity_with_sans(&ca, 3, &["node-2".to_string()]);
        let (impostor, mut i_in) =
            Endpoint::bind(any_port(), 3, &sneaky, TransportConfig::default()).unwrap();
        let err = a
            .request(2, impostor.local_addr(), StreamKind::RaftVote, b"x", SHORT)
            .await
            .unwrap_err();
        eprintln!("sneaky impostor: {err}");
        match &err {
            TransportError::WrongPeer {
                expected, found, ..
            } => {
                assert_eq!(*expected, 2);
                assert_eq!(*found, PeerIdentity::Node(3));
            }
            other => panic!("expected WrongPeer, got {other:?}"),
        }
        assert_no_stream(&mut i_in).await;
    })
    .await
    .unwrap();
}

/// An admin client certificate completes TLS (it is from the cluster CA) but the node
/// transport closes the connection with NOT_A_NODE and delivers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_cannot_open_streams() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("cluster").unwrap();
        let (b, mut b_in) = bind(&ca, 2);
        let admin = pki::issue_client_cert(&ca, "admin").unwrap();
        let admin = TlsIdentity::from_pem(&ca.cert_pem, &admin.cert_pem, &admin.key_pem).unwrap();
        assert_eq!(admin.identity(), &PeerIdentity::Client("admin".into()));

        let (_client, conn) = raw_connect(&admin, 2, b.local_addr()).await;
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&[StreamKind::Forward.as_u8(), 0, 0, 0, 1, b'x'])
                .await?;
            send.finish()?;
            recv.read_to_end(1024).await?;
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        assert!(attempt.await.is_err());
        match conn.closed().await {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, VarInt::from_u32(codes::NOT_A_NODE));
            }
            other => panic!("expected an application close, got {other:?}"),
        }
        assert_no_stream(&mut b_in).await;
    })
    .await
    .unwrap();
}

/// A header announcing a 4 GiB frame is refused at once, without waiting for (or
/// allocating) the body, and the sender is told FRAME_TOO_LARGE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_header_is_rejected_without_allocating() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("cluster").unwrap();
        let (b, mut b_in) = bind(&ca, 2);
        let node1 = node_identity(&ca, 1);
        let (_client, conn) = raw_connect(&node1, 2, b.local_addr()).await;

        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&[StreamKind::Data.as_u8(), 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();

        let mut stream = b_in.next().await.unwrap();
        assert_eq!(stream.peer, 1);
        let started = Instant::now();
        let err = stream.recv.recv_frame().await.unwrap_err();
        match err {
            TransportError::FrameTooLarge { len, max, peer } => {
                assert_eq!(len, u64::from(u32::MAX));
                assert_eq!(max, convoy_transport::DEFAULT_MAX_FRAME_SIZE);
                assert_eq!(peer, 1);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        // Refused from the header alone: no body was awaited.
        assert!(started.elapsed() < Duration::from_secs(1));
        // Further reads keep failing instead of parsing body bytes as headers.
        assert!(stream.recv.recv_frame().await.is_err());

        let stopped = send.stopped().await.unwrap();
        assert_eq!(stopped, Some(VarInt::from_u32(codes::FRAME_TOO_LARGE)));
    })
    .await
    .unwrap();
}

/// Frames above the limit are refused by the sender before sending, and by a receiver
/// with a smaller limit than the sender's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_limit_applies_to_sender_and_receiver() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("cluster").unwrap();
        let mut small = TransportConfig::default();
        small.max_frame_size = 1024 * 1024;
        let (a, _a_in) =
            Endpoint::bind(any_port(), 1, &node_identity(&ca, 1), small.clone()).unwrap();
        let (b, b_in) = Endpoint::bind(any_port(), 2, &node_identity(&ca, 2), small).unwrap();
        let (c, _c_in) = bind(&ca, 3);
        spawn_echo(b_in);

        let big = vec![7u8; 1024 * 1024 + 1];
        let (mut send, _recv) = a
            .open_stream(2, b.local_addr(), StreamKind::Data)
            .await
            .unwrap();
        let err = send.send_frame(&big).await.unwrap_err();
        assert!(
            matches!(err, TransportError::FrameTooLarge { .. }),
            "{err:?}"
        );

        let err = c
            .request(2, b.local_addr(), StreamKind::Data, &big, SHORT)
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::StreamReset { .. }), "{err:?}");
        // The connection survives a refused stream.
        c.request(2, b.local_addr(), StreamKind::Data, b"small", SHORT)
            .await
            .unwrap();
    })
    .await
    .unwrap();
}

/// A stream whose first byte is not a known kind is reset with UNKNOWN_STREAM_KIND and
/// never delivered; other streams on the same connection keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stream_kind_is_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("cluster").unwrap();
        let (b, mut b_in) = bind(&ca, 2);
        let node1 = node_identity(&ca, 1);
        let (_client, conn) = raw_connect(&node1, 2, b.local_addr()).await;

        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[99, 0, 0, 0, 1, b'x']).await.unwrap();
        send.finish().unwrap();
        let err = recv.read_to_end(1024).await.unwrap_err();
        match err {
            quinn::ReadToEndError::Read(ReadError::Reset(code)) => {
                assert_eq!(code, VarInt::from_u32(codes::UNKNOWN_STREAM_KIND));
            }
            other => panic!("expected a reset, got {other:?}"),
        }
        assert_no_stream(&mut b_in).await;

        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[StreamKind::Forward.as_u8(), 0, 0, 0, 2, b'o', b'k'])
            .await
            .unwrap();
        send.finish().unwrap();
        let mut stream = b_in.next().await.unwrap();
        assert_eq!(stream.kind, StreamKind::Forward);
        assert_eq!(&stream.read_request().await.unwrap()[..], b"ok");
        stream.respond(b"yes").await.unwrap();
        let response = recv.read_to_end(1024).await.unwrap();
        assert_eq!(response, [0, 0, 0, 3, b'y', b'e', b's']);
    })
    .await
    .unwrap();
}

/// An agent cannot bind its endpoint with another node's certificate.
#[tokio::test]
async fn bind_refuses_a_certificate_of_another_node() {
    let ca = pki::generate_ca("cluster").unwrap();
    let err = Endpoint::bind(
        any_port(),
        5,
        &node_identity(&ca, 1),
        TransportConfig::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, TransportError::IdentityMismatch { local_node: 5, .. }),
        "{err:?}"
    );
}

//! A retired node's certificate opens nothing: `Endpoint::set_retired_peers` refuses its
//! TLS handshakes, closes its open connections, resets its streams, and stops us from
//! dialing it, for every stream kind; taking it off the list lets it in again.
// Test helpers panic on failed setup, like unwrap inside a #[test].
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use convoy_transport::{Inbound, StreamKind, TransportError, codes, pki};
use quinn::{ConnectionError, VarInt};

const SHORT: Duration = Duration::from_secs(3);

/// Echoes every request and counts the streams delivered (that is, not refused).
fn spawn_counting_echo(mut inbound: Inbound) -> Arc<AtomicU64> {
    let delivered = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&delivered);
    tokio::spawn(async move {
        while let Some(mut stream) = inbound.next().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(request) = stream.read_request().await {
                    let response = echo_response(&stream, &request);
                    let _ = stream.respond_bytes(response).await;
                }
            });
        }
    });
    delivered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_node_is_refused_on_every_stream_kind_both_accepting_and_dialing() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("cluster").unwrap();
        let (a, a_in) = bind(&ca, 1);
        let (b, b_in) = bind(&ca, 3);
        let to_a = spawn_counting_echo(a_in);
        let to_b = spawn_counting_echo(b_in);

        // Before retirement every kind works both ways.
        for kind in StreamKind::ALL {
            b.request(1, a.local_addr(), kind, b"hi", SHORT)
                .await
                .unwrap();
            a.request(3, b.local_addr(), kind, b"hi", SHORT)
                .await
                .unwrap();
        }
        // A long-lived stream from node 3, open when it is retired.
        let (mut open_send, _open_recv) = b
            .open_stream(1, a.local_addr(), StreamKind::Data)
            .await
            .unwrap();
        open_send.send_frame(b"first").await.unwrap();
        let delivered_a = wait_count(&to_a, StreamKind::ALL.len() as u64 + 1).await;
        let delivered_b = to_b.load(Ordering::SeqCst);
        assert_eq!(a.refusals().retired, 0);

        a.set_retired_peers([3]);
        // Idempotent: setting the same set again changes nothing.
        a.set_retired_peers([3]);

        // Its open connection is closed: the long-lived stream breaks.
        let deadline = Instant::now() + SHORT;
        loop {
            if open_send.send_frame(b"more").await.is_err() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the retired node's stream still works"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Accepting: every kind from node 3 fails, nothing is delivered. A fresh endpoint
        // per kind, so each attempt reaches node 1 instead of failing in local backoff.
        for kind in StreamKind::ALL {
            let before = a.refusals().retired;
            let (fresh, _fresh_in) = bind(&ca, 3);
            let err = fresh
                .request(1, a.local_addr(), kind, b"let me in", SHORT)
                .await
                .unwrap_err();
            eprintln!("{kind} from the retired node: {err}");
            assert!(err.to_string().contains("access denied"), "{err}");
            assert!(
                a.refusals().retired > before,
                "{kind}: node 1 counted no refusal"
            );
        }
        assert_eq!(
            to_a.load(Ordering::SeqCst),
            delivered_a,
            "a stream got through"
        );

        // A raw client with node 3's certificate fails the TLS handshake itself.
        let node3 = node_identity(&ca, 3);
        let (client, config) = raw_client(&node3);
        let outcome = client
            .connect_with(config, a.local_addr(), &pki::node_server_name(1))
            .unwrap()
            .await;
        match outcome {
            Err(ConnectionError::TransportError(e)) => {
                eprintln!("raw handshake as node 3: {e}");
            }
            Err(ConnectionError::ConnectionClosed(c)) => eprintln!("raw handshake as node 3: {c}"),
            Ok(conn) => {
                // TLS 1.3 finishes on the client first; the refusal then closes it.
                match conn.closed().await {
                    ConnectionError::ApplicationClosed(close) => {
                        assert_eq!(close.error_code, VarInt::from_u32(codes::RETIRED));
                    }
                    other => eprintln!("raw connection as node 3 closed: {other}"),
                }
            }
            Err(other) => panic!("unexpected: {other:?}"),
        }

        // Dialing: node 1 sends nothing to node 3, for any kind.
        for kind in StreamKind::ALL {
            let err = a
                .request(3, b.local_addr(), kind, b"hello", SHORT)
                .await
                .unwrap_err();
            assert!(
                matches!(err, TransportError::Refused { peer: 3, .. }),
                "{err:?}"
            );
            assert!(a.open_stream(3, b.local_addr(), kind).await.is_err());
        }
        assert_eq!(
            to_b.load(Ordering::SeqCst),
            delivered_b,
            "node 1 reached node 3"
        );
        let refused = a.refusals().retired;
        assert!(
            refused >= 2 * StreamKind::ALL.len() as u64,
            "only {refused} refusals counted"
        );

        // Taking node 3 off the list lets it in again (after its redial backoff).
        a.set_retired_peers([]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while b
            .request(1, a.local_addr(), StreamKind::Forward, b"back", SHORT)
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "node 3 was not let back in");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        a.request(3, b.local_addr(), StreamKind::Forward, b"back", SHORT)
            .await
            .unwrap();
    })
    .await
    .unwrap();
}

/// Waits until `count` reaches at least `n`; returns its value.
async fn wait_count(count: &AtomicU64, n: u64) -> u64 {
    let deadline = Instant::now() + SHORT;
    loop {
        let now = count.load(Ordering::SeqCst);
        if now >= n {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "only {now} of {n} streams delivered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

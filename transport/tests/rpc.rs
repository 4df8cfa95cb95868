//! Request/response between two real endpoints on loopback.
// Test helpers panic on failed setup, like unwrap inside a #[test].
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::*;
use convoy_transport::{StreamKind, pki};
use tokio::task::JoinSet;

/// 200 concurrent requests in each direction, spread over every stream kind, multiplexed
/// on one connection per direction; each response proves the kind and caller id arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_every_kind_concurrently() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("rpc").unwrap();
        let (a, a_in) = bind(&ca, 1);
        let (b, b_in) = bind(&ca, 2);
        spawn_echo(a_in);
        spawn_echo(b_in);

        let mut tasks = JoinSet::new();
        for i in 0..400u32 {
            let (from, to_id, to_addr, from_id) = if i % 2 == 0 {
                (a.clone(), 2, b.local_addr(), 1u64)
            } else {
                (b.clone(), 1, a.local_addr(), 2u64)
            };
            tasks.spawn(async move {
                let kind = StreamKind::ALL[i as usize % StreamKind::ALL.len()];
                let payload = format!("request {i}").into_bytes();
                let response = from
                    .request(to_id, to_addr, kind, &payload, REQUEST_TIMEOUT)
                    .await
                    .unwrap();
                assert_eq!(response[0], kind.as_u8());
                assert_eq!(
                    u64::from_be_bytes(response[1..9].try_into().unwrap()),
                    from_id
                );
                assert_eq!(&response[9..], &payload[..]);
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }

        let states = a.peer_states();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].node, 2);
        assert!(states[0].connected);
        assert!(states[0].last_ok.is_some());
        assert_eq!(states[0].dial_failures, 0);
    })
    .await
    .unwrap();
}

/// A 20 MiB request and its 20 MiB echo each travel as a single frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mib_frame_round_trips() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("rpc").unwrap();
        let (a, _a_in) = bind(&ca, 1);
        let (b, b_in) = bind(&ca, 2);
        spawn_echo(b_in);

        let payload: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let started = Instant::now();
        let response = a
            .request(
                2,
                b.local_addr(),
                StreamKind::Data,
                &payload,
                REQUEST_TIMEOUT,
            )
            .await
            .unwrap();
        eprintln!("20 MiB round trip took {:?}", started.elapsed());
        assert_eq!(response.len(), payload.len() + 9);
        assert!(response[9..] == payload[..]);
    })
    .await
    .unwrap();
}

/// A closed endpoint refuses further calls and its Inbound ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_endpoint_refuses_calls_and_ends_inbound() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("rpc").unwrap();
        let (a, mut a_in) = bind(&ca, 1);
        let (b, b_in) = bind(&ca, 2);
        spawn_echo(b_in);
        a.request(
            2,
            b.local_addr(),
            StreamKind::RaftVote,
            b"x",
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
        a.close().await;
        let err = a
            .request(
                2,
                b.local_addr(),
                StreamKind::RaftVote,
                b"x",
                REQUEST_TIMEOUT,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, convoy_transport::TransportError::Closed),
            "{err}"
        );
        assert!(a_in.next().await.is_none());
    })
    .await
    .unwrap();
}

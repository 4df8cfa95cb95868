//! Per-export bounds: connections beyond the cap are refused during the handshake, and
//! payload bytes in memory are bounded over all connections of an export.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use convoy_nbd::{ExportLimits, ExportRegistry, MAX_PAYLOAD};
use tokio::net::UnixStream;

const REP_ERR_POLICY: u32 = 0x8000_0002;

fn limited(max_connections: usize, max_in_flight_bytes: u32) -> ExportRegistry {
    ExportRegistry::with_limits(ExportLimits {
        max_connections,
        max_in_flight_bytes,
    })
}

/// `NBD_OPT_GO` without panicking on refusal: the final reply's kind and data.
async fn try_go(c: &mut RawClient<UnixStream>, name: &str) -> (u32, String) {
    let replies = c
        .option(OPT_GO, &RawClient::<UnixStream>::info_data(name, &[]))
        .await;
    let last = replies.last().unwrap();
    (last.kind, String::from_utf8_lossy(&last.data).into_owned())
}

#[tokio::test]
async fn connections_beyond_the_export_limit_are_refused_during_the_handshake() {
    bounded(20, async {
        let exports = limited(2, 0);
        exports.add("disk", MemDevice::new(1 << 20), "").unwrap();
        exports.add("other", MemDevice::new(1 << 20), "").unwrap();
        let server = TestServer::start(exports.clone());
        let mut c1 = server.connect().await;
        let mut c2 = server.connect().await;
        c1.go("disk").await;
        c2.go("disk").await;
        assert_eq!(exports.connection_count("disk"), Some(2));

        // A third GO gets an error reply naming the limit; negotiation goes on.
        let mut c3 = server.connect().await;
        let (kind, message) = try_go(&mut c3, "disk").await;
        assert_eq!(kind, REP_ERR_POLICY, "{message}");
        assert!(message.contains("2 connections"), "{message}");
        assert_eq!(c3.option(OPT_LIST, &[]).await.last().unwrap().kind, REP_ACK);
        // Asking about the export (INFO) does not take a connection slot.
        let info = RawClient::<UnixStream>::info_data("disk", &[]);
        assert_eq!(
            c3.option(OPT_INFO, &info).await.last().unwrap().kind,
            REP_ACK
        );
        // The limit is per export.
        c3.go("other").await;

        // EXPORT_NAME cannot be refused with a reply: the connection is closed.
        let mut c4 = server.connect().await;
        c4.send_option(OPT_EXPORT_NAME, b"disk").await;
        assert!(c4.is_closed().await);

        // Once a connection ends, its slot is free again.
        c1.request(CMD_DISC, 0, 1, 0, 0, &[]).await;
        assert!(c1.is_closed().await);
        let mut c5 = server.connect().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (kind, message) = try_go(&mut c5, "disk").await;
            if kind == REP_ACK {
                break;
            }
            assert_eq!(kind, REP_ERR_POLICY, "{message}");
            assert!(
                Instant::now() < deadline,
                "the closed connection's slot was not freed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(c5.read(0, 8).await, Ok(vec![0; 8]));
        assert_eq!(c2.read(0, 8).await, Ok(vec![0; 8]));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn in_flight_bytes_are_bounded_per_export_across_connections() {
    bounded(30, async {
        const WRITE: u32 = 4 << 20;
        const PER_CONNECTION: u64 = 6;
        let gate = Arc::new(Gate::default());
        let dev = MemDevice::gated(WRITE as usize, gate.clone());
        // The export may hold one maximal payload's worth (32 MiB): 8 of these writes,
        // while each connection alone would take all 6 of its own.
        let exports = limited(16, MAX_PAYLOAD);
        exports.add("disk", dev.clone(), "").unwrap();
        let server = TestServer::start(exports);
        let mut clients = Vec::new();
        for _ in 0..2 {
            let mut c = server.connect().await;
            c.go("disk").await;
            clients.push(tokio::spawn(async move {
                let payload = vec![7u8; WRITE as usize];
                for i in 0..PER_CONNECTION {
                    c.request(CMD_WRITE, 0, i, 0, WRITE, &payload).await;
                }
                for _ in 0..PER_CONNECTION {
                    assert_eq!(c.reply().await.0, 0);
                }
            }));
        }
        let fit = (MAX_PAYLOAD / WRITE) as usize;
        gate.wait_for_waiting(fit).await;
        // Give the readers every chance to overrun the budget before checking it.
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            dev.ops().len(),
            fit,
            "only the export's byte budget may be taken in"
        );
        gate.release();
        for c in clients {
            c.await.unwrap();
        }
        assert_eq!(dev.ops().len(), 2 * PER_CONNECTION as usize);
        assert_eq!(*gate.max_waiting.lock().unwrap(), fit);
        server.stop().await;
    })
    .await;
}

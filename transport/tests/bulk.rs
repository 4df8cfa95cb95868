//! Bulk transfer: many frames on one stream, in order, with flow control.
// Test helpers panic on failed setup, like unwrap inside a #[test].
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use convoy_transport::{StreamKind, pki};
use xxhash_rust::xxh3::Xxh3;

const FRAME: usize = 1024 * 1024;
const FRAMES: u64 = 256;

/// Deterministic, incompressible-looking frame body; frame `i` carries `i` in its first
/// eight bytes so reordering or loss is detected per frame, not just by the checksum.
fn base_frame() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(FRAME);
    while out.len() < FRAME {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_stream_of_256_mib_arrives_intact_and_in_order() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let ca = pki::generate_ca("bulk").unwrap();
        let (a, _a_in) = bind(&ca, 1);
        let (b, mut b_in) = bind(&ca, 2);

        let receiver = tokio::spawn(async move {
            let mut stream = b_in.next().await.unwrap();
            assert_eq!(stream.kind, StreamKind::Data);
            assert_eq!(stream.peer, 1);
            let mut hasher = Xxh3::new();
            let mut count = 0u64;
            while let Some(frame) = stream.recv.recv_frame().await.unwrap() {
                assert_eq!(frame.len(), FRAME);
                let index = u64::from_be_bytes(frame[..8].try_into().unwrap());
                assert_eq!(index, count, "frame out of order");
                hasher.update(&frame);
                count += 1;
            }
            let mut summary = count.to_be_bytes().to_vec();
            summary.extend_from_slice(&hasher.digest().to_be_bytes());
            stream.respond(&summary).await.unwrap();
        });

        let base = base_frame();
        let mut hasher = Xxh3::new();
        let started = Instant::now();
        let (mut send, mut recv) = a
            .open_stream(2, b.local_addr(), StreamKind::Data)
            .await
            .unwrap();
        for i in 0..FRAMES {
            let mut frame = base.clone();
            frame[..8].copy_from_slice(&i.to_be_bytes());
            hasher.update(&frame);
            send.send_frame_bytes(Bytes::from(frame)).await.unwrap();
        }
        send.finish().unwrap();
        let summary = recv.recv_frame().await.unwrap().unwrap();
        let elapsed = started.elapsed();
        receiver.await.unwrap();

        assert_eq!(u64::from_be_bytes(summary[..8].try_into().unwrap()), FRAMES);
        assert_eq!(
            u64::from_be_bytes(summary[8..16].try_into().unwrap()),
            hasher.digest(),
            "checksum mismatch"
        );
        let mib = (FRAMES as usize * FRAME) as f64 / (1024.0 * 1024.0);
        eprintln!(
            "bulk: {mib:.0} MiB in {elapsed:.2?} = {:.0} MB/s",
            (FRAMES as usize * FRAME) as f64 / elapsed.as_secs_f64() / 1e6
        );
    })
    .await
    .unwrap();
}

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

/// `recv_frame` may be dropped at any await (in a `select!`, or polled once with
/// `now_or_never`) without losing or corrupting data: frames of many sizes, some spanning
/// many QUIC chunks, arrive intact and in order while nearly every call is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_frame_survives_cancellation() {
    use futures::FutureExt;
    tokio::time::timeout(Duration::from_secs(120), async {
        let ca = pki::generate_ca("cancel").unwrap();
        let (a, _a_in) = bind(&ca, 1);
        let (b, mut b_in) = bind(&ca, 2);
        let sizes: Vec<usize> = (0..600usize)
            .map(|i| match i % 6 {
                0 => 0,
                1 => 1,
                2 => 3,
                3 => 1000 + i,
                4 => 70_000 + 13 * i,
                _ => (1 << 20) + i,
            })
            .collect();
        let frame_of = |i: usize, len: usize| -> Vec<u8> {
            (0..len).map(|k| (k.wrapping_mul(31) ^ i) as u8).collect()
        };

        let expect = sizes.clone();
        let receiver = tokio::spawn(async move {
            let mut stream = b_in.next().await.unwrap();
            let mut got = 0usize;
            let mut cancelled = 0u64;
            loop {
                // Alternate between a poll that gives up at once and a race against a
                // very short timer: both drop `recv_frame` mid-frame again and again.
                let next = if got % 2 == 0 {
                    match stream.recv.recv_frame().now_or_never() {
                        Some(r) => r,
                        None => {
                            cancelled += 1;
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                } else {
                    // Half of these take the frame as pieces, which must join to the same.
                    tokio::select! {
                        r = stream.recv.recv_frame_parts() => r.map(|parts| parts.map(|p| {
                            Bytes::from(p.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>())
                        })),
                        () = tokio::time::sleep(Duration::from_micros(20)) => {
                            cancelled += 1;
                            continue;
                        }
                    }
                };
                let Some(frame) = next.unwrap() else { break };
                assert_eq!(frame.len(), expect[got], "frame {got} has the wrong length");
                assert!(
                    frame[..] == frame_of(got, expect[got])[..],
                    "frame {got} corrupted"
                );
                got += 1;
            }
            (got, cancelled)
        });

        let (mut send, _recv) = a
            .open_stream(2, b.local_addr(), StreamKind::Data)
            .await
            .unwrap();
        for (i, len) in sizes.iter().enumerate() {
            send.send_frame(&frame_of(i, *len)).await.unwrap();
        }
        send.finish().unwrap();
        let (got, cancelled) = receiver.await.unwrap();
        assert_eq!(got, sizes.len());
        assert!(
            cancelled > 0,
            "no call was cancelled: the test proved nothing"
        );
    })
    .await
    .unwrap();
}

//! End-to-end sessions between two real transport endpoints and two real disk images.
// Tests panic on failed setup, like unwrap inside a #[test].
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use convoy_delta::{
    DeltaConfig, DeltaError, DeltaStats, Mode, RefusalCode, Role, Served, Session, pull, push,
};
use rand::{Rng, RngCore};

const MIB: u64 = 1024 * 1024;

fn without_elapsed(s: DeltaStats) -> DeltaStats {
    DeltaStats {
        elapsed: Duration::ZERO,
        ..s
    }
}

async fn push_to(
    pair: &Pair,
    session: Session,
    mode: Mode,
    src: &Arc<convoy_store::DiskImage>,
    config: &DeltaConfig,
) -> Result<DeltaStats, DeltaError> {
    push(
        &pair.a,
        2,
        pair.b_addr(),
        session,
        mode,
        src.clone(),
        config,
    )
    .await
}

fn completed(r: Result<Served, DeltaError>) -> convoy_delta::SessionReport {
    match r {
        Ok(Served::Completed(report)) => report,
        other => panic!("expected a completed session, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_images_exchange_only_the_root() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (d1, d2) = (tmp(), tmp());
        let src = create(d1.path(), "src", 64 * MIB);
        let dst = create(d2.path(), "dst", 64 * MIB);
        fill_random(&src, &mut rng(1));
        copy(&src, &dst);
        let mut pair = Pair::new();
        let (_server, mut results) = pair.serve(EXPECT, Role::Destination, dst.clone());
        let cfg = DeltaConfig::default();
        let stats = push_to(&pair, SESSION, Mode::CompareDelta, &src, &cfg)
            .await
            .unwrap();
        assert_eq!(stats.chunks_total, 1024);
        assert_eq!(stats.chunks_compared, 1, "only the root: {stats:?}");
        assert_eq!(stats.chunks_sent, 0);
        assert_eq!(stats.data_bytes_sent, 0);
        let report = completed(next_session(&mut results).await);
        assert_eq!(report.role, Role::Destination);
        assert_eq!(without_elapsed(report.stats), without_elapsed(stats));
        assert_equal(&src, &dst);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_differing_chunks_are_sent() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (d1, d2) = (tmp(), tmp());
        let src = create(d1.path(), "src", 64 * MIB);
        let dst = create(d2.path(), "dst", 64 * MIB);
        let mut r = rng(2);
        fill_random(&src, &mut r);
        copy(&src, &dst);
        let mut pair = Pair::new();
        let (_server, mut results) = pair.serve(EXPECT, Role::Destination, dst.clone());
        let cfg = DeltaConfig::default();
        // 5% of 1024 chunks is 51; alternate which side was changed.
        for (round, k) in [0usize, 1, 50, 51].into_iter().enumerate() {
            let changed = if round % 2 == 0 { &src } else { &dst };
            scribble(changed, k, &mut r);
            let stats = push_to(&pair, SESSION, Mode::CompareDelta, &src, &cfg)
                .await
                .unwrap();
            assert_eq!(stats.chunks_sent, k as u64, "k={k}: {stats:?}");
            assert_eq!(stats.zero_chunks_sent, 0);
            assert_eq!(stats.data_bytes_sent, (k * CHUNK) as u64);
            assert!(
                stats.wire_bytes < stats.data_bytes_sent + stats.hash_bytes + 64 * 1024,
                "overhead too high: {stats:?}"
            );
            let report = completed(next_session(&mut results).await);
            assert_eq!(without_elapsed(report.stats), without_elapsed(stats));
            assert_equal(&src, &dst);
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_brings_the_initiator_up_to_date_and_zero_chunks_travel_as_markers() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (d1, d2) = (tmp(), tmp());
        // Node 2 holds the source; node 1 pulls into its own image.
        let src = create(d1.path(), "src", 16 * MIB + 1000);
        let dst = create(d2.path(), "dst", 16 * MIB + 1000);
        let mut r = rng(3);
        fill_random(&src, &mut r);
        copy(&src, &dst);
        scribble(&dst, 20, &mut r);
        // Zeroed on the source, data on the destination: sent as zero markers.
        for c in [3u64, 4, 100] {
            src.write_zeroes(c * CHUNK as u64, CHUNK as u64).unwrap();
        }
        let mut pair = Pair::new();
        let (_server, mut results) = pair.serve(EXPECT, Role::Source, src.clone());
        let mut cfg = DeltaConfig::default();
        cfg.data_streams = 2;
        cfg.frame_bytes = 256 * 1024;
        let stats = pull(
            &pair.a,
            2,
            pair.b_addr(),
            SESSION,
            Mode::CompareDelta,
            dst.clone(),
            &cfg,
        )
        .await
        .unwrap();
        assert!(
            stats.chunks_sent >= 20 && stats.chunks_sent <= 23,
            "{stats:?}"
        );
        assert_eq!(stats.zero_chunks_sent, 3);
        let report = completed(next_session(&mut results).await);
        assert_eq!(report.role, Role::Source);
        assert_eq!(without_elapsed(report.stats), without_elapsed(stats));
        assert_equal(&src, &dst);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_of_another_size_is_refused_with_a_clear_message() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        for dst_size in [32 * MIB, 128 * MIB] {
            let (d1, d2) = (tmp(), tmp());
            let src = create(d1.path(), "src", 64 * MIB);
            let dst = create(d2.path(), "dst", dst_size);
            let mut pair = Pair::new();
            let (_server, mut results) = pair.serve(EXPECT, Role::Destination, dst.clone());
            let err = push_to(
                &pair,
                SESSION,
                Mode::CompareDelta,
                &src,
                &DeltaConfig::default(),
            )
            .await
            .unwrap_err();
            let DeltaError::Refused { peer: 2, refusal } = &err else {
                panic!("expected a refusal, got {err:?}");
            };
            assert_eq!(refusal.code, RefusalCode::ShapeMismatch);
            let text = err.to_string();
            assert!(
                text.contains(&(64 * MIB).to_string()) && text.contains(&dst_size.to_string()),
                "{text}"
            );
            assert!(matches!(
                next_refusal(&mut results).await,
                Served::Refused { .. }
            ));
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_and_wrong_disk_are_refused_and_nothing_is_written() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (d1, d2) = (tmp(), tmp());
        let src = create(d1.path(), "src", 16 * MIB);
        let dst = create(d2.path(), "dst", 16 * MIB);
        fill_random(&src, &mut rng(4));
        let before = contents(&dst);
        let mut pair = Pair::new();
        let (server, mut results) = pair.serve(EXPECT, Role::Destination, dst.clone());
        let cases = [
            (Session { epoch: 2, ..SESSION }, RefusalCode::StaleEpoch),
            (Session { disk: 43, ..SESSION }, RefusalCode::WrongDisk),
            (Session { cg: 8, ..SESSION }, RefusalCode::WrongCg),
        ];
        for (session, code) in cases {
            for mode in [Mode::CompareDelta, Mode::FullCopy] {
                let err = push_to(&pair, session, mode, &src, &DeltaConfig::default())
                    .await
                    .unwrap_err();
                match &err {
                    DeltaError::Refused { refusal, .. } => assert_eq!(refusal.code, code),
                    other => panic!("expected {code:?}, got {other:?}"),
                }
                assert!(matches!(next_refusal(&mut results).await, Served::Refused { .. }));
            }
        }
        // A pull is refused too: the disk is offered only as a destination.
        let err = pull(
            &pair.a,
            2,
            pair.b_addr(),
            SESSION,
            Mode::CompareDelta,
            src.clone(),
            &DeltaConfig::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, DeltaError::Refused { refusal, .. } if refusal.code == RefusalCode::WrongRole),
            "{err:?}"
        );
        let stats = server.stats();
        assert_eq!(stats.chunks_written, 0);
        assert_eq!(stats.sessions_refused, 7);
        assert_eq!(contents(&dst), before);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_copy_of_a_sparse_image_keeps_holes() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (d1, d2) = (tmp(), tmp());
        let size = 256 * MIB;
        let src = create(d1.path(), "src", size);
        let dst = create(d2.path(), "dst", size);
        let mut r = rng(5);
        let written = scribble(&src, 40, &mut r);
        // Allocated but zero: must not be sent either.
        src.write_at(&vec![0u8; CHUNK], 9 * CHUNK as u64).unwrap();
        let mut pair = Pair::new();
        let (server, mut results) = pair.serve(EXPECT, Role::Destination, dst.clone());
        let stats = push_to(&pair, SESSION, Mode::FullCopy, &src, &DeltaConfig::default())
            .await
            .unwrap();
        let expected: BTreeSet<u64> = written.iter().copied().filter(|&c| c != 9).collect();
        assert_eq!(stats.chunks_sent, expected.len() as u64, "{stats:?}");
        assert_eq!(stats.chunks_compared, 0);
        assert_eq!(stats.hash_bytes, 0);
        completed(next_session(&mut results).await);
        assert_equal(&src, &dst);
        let blocks = std::fs::metadata(dst.path()).unwrap().blocks() * 512;
        assert!(
            blocks <= 2 * 40 * CHUNK as u64,
            "destination allocated {blocks} bytes for 40 chunks of data"
        );

        // A second full copy finds the destination no longer empty.
        let err = push_to(&pair, SESSION, Mode::FullCopy, &src, &DeltaConfig::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DeltaError::Refused { refusal, .. } if refusal.code == RefusalCode::NotEmpty),
            "{err:?}"
        );
        assert_eq!(server.stats().sessions_refused, 1);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sender_fails_the_destination_and_the_next_session_completes() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (d1, d2) = (tmp(), tmp());
        let src = create(d1.path(), "src", 256 * MIB);
        let dst = create(d2.path(), "dst", 256 * MIB);
        fill_random(&src, &mut rng(6));
        let mut pair = Pair::new();
        let (server, mut results) = pair.serve(EXPECT, Role::Destination, dst.clone());
        // Small frames on one stream: the transfer takes long enough to be cut.
        let mut slow = DeltaConfig::default();
        slow.data_streams = 1;
        slow.frame_bytes = CHUNK;
        let a = pair.a.clone();
        let addr = pair.b_addr();
        let s = src.clone();
        let task =
            tokio::spawn(
                async move { push(&a, 2, addr, SESSION, Mode::CompareDelta, s, &slow).await },
            );
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.stats().chunks_written < 8 {
            assert!(Instant::now() < deadline, "no chunk written within 30 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        task.abort();
        let err = next_session(&mut results).await.unwrap_err();
        assert!(
            matches!(err, DeltaError::Transport(_) | DeltaError::Remote { .. }),
            "{err:?}"
        );
        let written = server.stats().chunks_written;
        assert!(written < 4096, "the first session was not cut: {written}");
        assert_eq!(server.stats().sessions_failed, 1);

        let stats = push_to(
            &pair,
            SESSION,
            Mode::CompareDelta,
            &src,
            &DeltaConfig::default(),
        )
        .await
        .unwrap();
        assert!(stats.chunks_sent <= 4096 - 8, "{stats:?}");
        completed(next_session(&mut results).await);
        assert_equal(&src, &dst);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_written_during_a_push_are_in_the_tracker_and_the_rest_is_equal() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (d1, d2) = (tmp(), tmp());
        let src = create(d1.path(), "src", 64 * MIB);
        let dst = create(d2.path(), "dst", 64 * MIB);
        fill_random(&src, &mut rng(7));
        src.start_tracking("resync").unwrap();
        let mut pair = Pair::new();
        let (_server, mut results) = pair.serve(EXPECT, Role::Destination, dst.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (src, stop) = (src.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut r = rng(8);
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let c = r.gen_range(0..src.chunk_count());
                    r.fill_bytes(&mut buf);
                    src.write_at(&buf, c * CHUNK as u64).unwrap();
                    n += 1;
                }
                n
            })
        };
        let result = push_to(
            &pair,
            SESSION,
            Mode::CompareDelta,
            &src,
            &DeltaConfig::default(),
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().unwrap();
        result.unwrap();
        completed(next_session(&mut results).await);
        assert!(writes > 0);
        let dirty: BTreeSet<u64> = src
            .dirty_chunks("resync")
            .unwrap()
            .chunks
            .into_iter()
            .collect();
        let (a, b) = (contents(&src), contents(&dst));
        for c in 0..src.chunk_count() {
            if dirty.contains(&c) {
                continue;
            }
            let r = c as usize * CHUNK..(c as usize + 1) * CHUNK;
            assert!(a[r.clone()] == b[r], "chunk {c} differs but is not dirty");
        }
        // Resending the dirty chunks converges.
        let stats = push_to(
            &pair,
            SESSION,
            Mode::CompareDelta,
            &src,
            &DeltaConfig::default(),
        )
        .await
        .unwrap();
        assert!(stats.chunks_sent <= dirty.len() as u64);
        completed(next_session(&mut results).await);
        assert_equal(&src, &dst);
    })
    .await
    .unwrap();
}

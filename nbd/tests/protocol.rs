//! The server against a raw wire-format client: handshake, request checks, durability
//! calls, concurrency, and teardown.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use convoy_nbd::{ExportRegistry, MAX_PAYLOAD, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SIZE: usize = 1 << 20;

#[tokio::test]
async fn unknown_client_flags_close_the_connection() {
    bounded(10, async {
        let server = TestServer::start(registry("disk", MemDevice::new(SIZE)));
        let mut s = UnixStream::connect(&server.socket).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_u32(1 << 7).await.unwrap();
        let mut client = RawClient { stream: s };
        assert!(client.is_closed().await);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_options_are_refused_with_err_unsup_and_negotiation_continues() {
    bounded(10, async {
        let server = TestServer::start(registry("disk", MemDevice::new(SIZE)));
        let mut c = server.connect().await;
        for (option, data) in [
            (OPT_STRUCTURED_REPLY, Vec::new()),
            (OPT_STARTTLS, Vec::new()),
            (
                OPT_SET_META_CONTEXT,
                b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x0fbase:allocation".to_vec(),
            ),
            (4, Vec::new()),
            (0xdead_beef, vec![7; 1000]),
        ] {
            let replies = c.option(option, &data).await;
            assert_eq!(replies.len(), 1);
            assert_eq!(replies[0].kind, REP_ERR_UNSUP, "option {option}");
        }
        // An option too long to hold is skipped and refused, and negotiation goes on.
        let replies = c.option(0x1234, &vec![0; 200 << 10]).await;
        assert_eq!(replies[0].kind, REP_ERR_TOO_BIG);
        let (size, _) = c.go("disk").await;
        assert_eq!(size, SIZE as u64);
        assert_eq!(c.read(0, 8).await, Ok(vec![0; 8]));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn list_shows_every_export_with_its_description() {
    bounded(10, async {
        let exports = ExportRegistry::new();
        exports
            .add("b-disk", MemDevice::new(SIZE), "second")
            .unwrap();
        exports
            .add("a-disk", MemDevice::new(SIZE), "first")
            .unwrap();
        let server = TestServer::start(exports);
        let mut c = server.connect().await;
        let replies = c.option(OPT_LIST, &[]).await;
        let listed: Vec<(String, String)> = replies
            .iter()
            .filter(|r| r.kind == REP_SERVER)
            .map(|r| {
                let n = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
                (
                    String::from_utf8(r.data[4..4 + n].to_vec()).unwrap(),
                    String::from_utf8(r.data[4 + n..].to_vec()).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            vec![
                ("a-disk".into(), "first".into()),
                ("b-disk".into(), "second".into())
            ]
        );
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
        // LIST takes no data.
        assert_eq!(c.option(OPT_LIST, b"x").await[0].kind, REP_ERR_INVALID);
        // Still negotiating.
        c.go("a-disk").await;
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn info_reports_export_name_description_and_block_size() {
    bounded(10, async {
        let server = TestServer::start(registry("disk", MemDevice::new(SIZE)));
        let mut c = server.connect().await;
        let data = RawClient::<UnixStream>::info_data(
            "disk",
            &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999],
        );
        let replies = c.option(OPT_INFO, &data).await;
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
        let (size, flags) = export_info(&replies).unwrap();
        assert_eq!(size, SIZE as u64);
        let want = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN;
        assert_eq!(flags, want);
        let info = |t: u16| {
            replies
                .iter()
                .find(|r| r.kind == REP_INFO && r.data[..2] == t.to_be_bytes())
                .map(|r| r.data[2..].to_vec())
        };
        assert_eq!(info(INFO_NAME).unwrap(), b"disk");
        assert_eq!(info(INFO_DESCRIPTION).unwrap(), b"test disk disk");
        let bs = info(INFO_BLOCK_SIZE).unwrap();
        let word = |i: usize| u32::from_be_bytes(bs[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!((word(0), word(1), word(2)), (1, 4096, MAX_PAYLOAD));

        // Unknown export: ERR_UNKNOWN with no INFO, and negotiation continues.
        let replies = c
            .option(OPT_INFO, &RawClient::<UnixStream>::info_data("nope", &[]))
            .await;
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].kind, REP_ERR_UNKNOWN);
        let replies = c
            .option(OPT_GO, &RawClient::<UnixStream>::info_data("nope", &[]))
            .await;
        assert_eq!(replies[0].kind, REP_ERR_UNKNOWN);
        // Malformed INFO data.
        assert_eq!(
            c.option(OPT_INFO, &[0, 0, 0, 9, b'x']).await[0].kind,
            REP_ERR_INVALID
        );
        // INFO does not enter transmission; GO does.
        c.go("disk").await;
        assert_eq!(c.read(0, 1).await, Ok(vec![0]));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn export_name_sends_124_zeroes_unless_no_zeroes_was_negotiated() {
    bounded(10, async {
        let dev = MemDevice::new(SIZE);
        dev.data.lock().unwrap()[0] = 0xab;
        let server = TestServer::start(registry("disk", dev));
        for no_zeroes in [true, false] {
            let s = UnixStream::connect(&server.socket).await.unwrap();
            let mut c = RawClient::handshake(s, no_zeroes).await;
            c.send_option(OPT_EXPORT_NAME, b"disk").await;
            assert_eq!(c.stream.read_u64().await.unwrap(), SIZE as u64);
            let flags = c.stream.read_u16().await.unwrap();
            assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
            if !no_zeroes {
                assert_eq!(c.read_bytes(124).await, vec![0; 124]);
            }
            // The next bytes are the reply to a read: the stream is in step.
            assert_eq!(c.read(0, 2).await, Ok(vec![0xab, 0]));
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn export_name_for_an_unknown_export_closes_the_connection() {
    bounded(10, async {
        let server = TestServer::start(registry("disk", MemDevice::new(SIZE)));
        let mut c = server.connect().await;
        c.send_option(OPT_EXPORT_NAME, b"nope").await;
        assert!(c.is_closed().await);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn abort_is_acknowledged_then_the_connection_closes() {
    bounded(10, async {
        let server = TestServer::start(registry("disk", MemDevice::new(SIZE)));
        let mut c = server.connect().await;
        let replies = c.option(OPT_ABORT, &[]).await;
        assert_eq!(replies[0].kind, REP_ACK);
        assert!(c.is_closed().await);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bad_option_magic_closes_the_connection() {
    bounded(10, async {
        let server = TestServer::start(registry("disk", MemDevice::new(SIZE)));
        let mut c = server.connect().await;
        c.stream.write_all(&[0x55; 16]).await.unwrap();
        assert!(c.is_closed().await);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bad_request_magic_closes_the_connection_without_touching_the_device() {
    bounded(10, async {
        let dev = MemDevice::new(SIZE);
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut c = server.connect().await;
        c.go("disk").await;
        let mut bogus = vec![0u8; 28];
        bogus[7] = 1; // would be a WRITE, but the magic is zero
        c.stream.write_all(&bogus).await.unwrap();
        c.stream.write_all(&[1u8; 64]).await.unwrap();
        assert!(c.is_closed().await);
        assert!(dev.ops().is_empty());
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn out_of_range_requests_get_errors_and_never_write() {
    bounded(10, async {
        let dev = MemDevice::new(SIZE);
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut c = server.connect().await;
        c.go("disk").await;
        let end = SIZE as u64;
        assert_eq!(c.call(CMD_WRITE, 0, end, 4, &[1; 4]).await, ENOSPC);
        assert_eq!(c.call(CMD_WRITE, 0, end - 2, 4, &[1; 4]).await, ENOSPC);
        assert_eq!(
            c.call(CMD_WRITE, FLAG_FUA, u64::MAX - 1, 4, &[1; 4]).await,
            ENOSPC
        );
        assert_eq!(c.call(CMD_WRITE_ZEROES, 0, end, 1, &[]).await, ENOSPC);
        assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, u32::MAX, &[]).await, ENOSPC);
        assert_eq!(c.call(CMD_TRIM, 0, end - 1, 2, &[]).await, EINVAL);
        assert_eq!(c.read(end, 1).await, Err(EINVAL));
        assert_eq!(c.read(u64::MAX, 2).await, Err(EINVAL));
        // A READ over the maximum payload is refused without sending data.
        assert_eq!(c.read(0, MAX_PAYLOAD + 1).await, Err(EINVAL));
        // Unknown command, unknown flag, flag on the wrong command, flush with a range.
        assert_eq!(c.call(5, 0, 0, 512, &[]).await, EINVAL);
        assert_eq!(c.call(77, 0, 0, 0, &[]).await, EINVAL);
        assert_eq!(c.call(CMD_WRITE, 1 << 9, 0, 4, &[1; 4]).await, EINVAL);
        assert_eq!(c.call(CMD_WRITE, FLAG_NO_HOLE, 0, 4, &[1; 4]).await, EINVAL);
        assert_eq!(c.call(CMD_FLUSH, 0, 4096, 0, &[]).await, EINVAL);
        assert!(
            dev.ops().is_empty(),
            "refused requests reached the device: {:?}",
            dev.ops()
        );
        assert!(dev.data.lock().unwrap().iter().all(|&b| b == 0));
        // The connection is still in step: a valid write and read work.
        assert_eq!(c.call(CMD_WRITE, 0, end - 4, 4, &[9; 4]).await, 0);
        assert_eq!(c.read(end - 4, 4).await, Ok(vec![9; 4]));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_oversized_write_closes_the_connection_without_writing() {
    bounded(10, async {
        let dev = MemDevice::new(SIZE);
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut c = server.connect().await;
        c.go("disk").await;
        c.request(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 1, &[1; 4096])
            .await;
        assert!(c.is_closed().await);
        assert!(dev.ops().is_empty());
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    bounded(10, async {
        let dev = MemDevice::read_only(SIZE);
        let server = TestServer::start(registry("ro", dev.clone()));
        let mut c = server.connect().await;
        let (_, flags) = c.go("ro").await;
        assert_ne!(flags & TFLAG_READ_ONLY, 0);
        assert_eq!(
            flags & (TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES),
            0
        );
        assert_eq!(c.call(CMD_WRITE, 0, 0, 4, &[1; 4]).await, EPERM);
        assert_eq!(c.call(CMD_WRITE, FLAG_FUA, 0, 4, &[1; 4]).await, EPERM);
        assert_eq!(c.call(CMD_TRIM, 0, 0, 4096, &[]).await, EPERM);
        assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).await, EPERM);
        assert_eq!(c.read(0, 4).await, Ok(vec![0; 4]));
        assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await, 0);
        assert!(!dev.ops().iter().any(Op::changes_data));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn fua_and_flush_reach_the_backend() {
    bounded(10, async {
        let dev = MemDevice::new(SIZE);
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut c = server.connect().await;
        c.go("disk").await;

        assert_eq!(c.call(CMD_WRITE, 0, 0, 4, &[1; 4]).await, 0);
        assert_eq!(
            dev.durable.lock().unwrap()[..4],
            [0; 4],
            "not durable before flush"
        );
        assert_eq!(c.call(CMD_WRITE, FLAG_FUA, 8, 4, &[2; 4]).await, 0);
        assert_eq!(
            dev.durable.lock().unwrap()[8..12],
            [2; 4],
            "FUA write durable at reply"
        );
        assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await, 0);
        assert_eq!(
            dev.durable.lock().unwrap()[..4],
            [1; 4],
            "flush covers the earlier write"
        );
        assert_eq!(c.call(CMD_TRIM, FLAG_FUA, 4096, 4096, &[]).await, 0);
        assert_eq!(
            c.call(CMD_WRITE_ZEROES, FLAG_FUA | FLAG_NO_HOLE, 0, 4, &[])
                .await,
            0
        );
        assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 8, 4, &[]).await, 0);
        assert_eq!(dev.durable.lock().unwrap()[..4], [0; 4]);
        assert_eq!(
            dev.ops(),
            vec![
                Op::Write {
                    offset: 0,
                    len: 4,
                    fua: false
                },
                Op::Write {
                    offset: 8,
                    len: 4,
                    fua: true
                },
                Op::Flush,
                Op::Trim {
                    offset: 4096,
                    len: 4096
                },
                Op::Flush, // FUA on TRIM becomes trim + flush
                Op::WriteZeroes {
                    offset: 0,
                    len: 4,
                    fua: true,
                    may_trim: false
                },
                Op::WriteZeroes {
                    offset: 8,
                    len: 4,
                    fua: false,
                    may_trim: true
                },
            ]
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn flush_on_one_connection_covers_writes_acknowledged_on_another() {
    bounded(10, async {
        let dev = MemDevice::new(SIZE);
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut a = server.connect().await;
        let mut b = server.connect().await;
        let (_, flags) = a.go("disk").await;
        assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
        b.go("disk").await;
        assert_eq!(a.call(CMD_WRITE, 0, 100, 3, b"abc").await, 0);
        assert_eq!(b.call(CMD_FLUSH, 0, 0, 0, &[]).await, 0);
        assert_eq!(&dev.durable.lock().unwrap()[100..103], b"abc");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn device_errors_become_errno_replies_and_the_connection_stays_usable() {
    bounded(10, async {
        let dev = MemDevice::new(SIZE);
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut c = server.connect().await;
        c.go("disk").await;
        for (fault, errno) in [
            (Fault::NoSpace, ENOSPC),
            (Fault::Denied, EPERM),
            (Fault::Io, EIO),
            (Fault::Panic, EIO),
        ] {
            *dev.fault.lock().unwrap() = fault;
            assert_eq!(
                c.call(CMD_WRITE, 0, 0, 4, &[1; 4]).await,
                errno,
                "{fault:?}"
            );
        }
        *dev.fault.lock().unwrap() = Fault::ShortRead;
        assert_eq!(
            c.read(0, 16).await,
            Err(EIO),
            "a short read must not send a short payload"
        );
        *dev.fault.lock().unwrap() = Fault::None;
        assert_eq!(c.read(0, 4).await, Ok(vec![0; 4]));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn many_requests_run_concurrently_and_replies_match_cookies() {
    bounded(20, async {
        let gate = Arc::new(Gate::default());
        let dev = MemDevice::gated(SIZE, gate.clone());
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut c = server.connect().await;
        c.go("disk").await;
        for i in 0..32u64 {
            c.request(CMD_WRITE, 0, 1000 + i, i * 4096, 4096, &[i as u8; 4096])
                .await;
        }
        // All 32 writes are inside the device at once: they run concurrently.
        gate.wait_for_waiting(32).await;
        // Reads are not gated and overtake the stuck writes.
        assert_eq!(c.read(SIZE as u64 - 1, 1).await, Ok(vec![0]));
        gate.release();
        let mut cookies: Vec<u64> = Vec::new();
        for _ in 0..32 {
            let (error, cookie) = c.reply().await;
            assert_eq!(error, 0);
            cookies.push(cookie);
        }
        cookies.sort();
        assert_eq!(cookies, (1000..1032).collect::<Vec<_>>());
        for i in 0..32u64 {
            assert_eq!(c.read(i * 4096, 4096).await, Ok(vec![i as u8; 4096]));
        }
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_full_connection_stops_reading_requests_until_replies_go_out() {
    bounded(20, async {
        let gate = Arc::new(Gate::default());
        let dev = MemDevice::gated(SIZE, gate.clone());
        let config = ServerConfig {
            max_in_flight: 4,
            ..ServerConfig::default()
        };
        let server = TestServer::start_with(registry("disk", dev.clone()), config);
        let mut c = server.connect().await;
        c.go("disk").await;
        for i in 0..20u64 {
            c.request(CMD_WRITE, 0, i, i * 512, 512, &[1; 512]).await;
        }
        gate.wait_for_waiting(4).await;
        // Give the reader every chance to overrun the limit before checking it.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            dev.ops().len(),
            4,
            "only max_in_flight requests may be taken in"
        );
        gate.release();
        for _ in 0..20 {
            assert_eq!(c.reply().await.0, 0);
        }
        assert_eq!(*gate.max_waiting.lock().unwrap(), 4);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn disc_answers_requests_in_flight_before_closing() {
    bounded(20, async {
        let gate = Arc::new(Gate::default());
        let dev = MemDevice::gated(SIZE, gate.clone());
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut c = server.connect().await;
        c.go("disk").await;
        for i in 0..8u64 {
            c.request(CMD_WRITE, 0, i, i * 512, 512, &[3; 512]).await;
        }
        c.request(CMD_DISC, 0, 100, 0, 0, &[]).await;
        gate.wait_for_waiting(8).await;
        gate.release();
        for _ in 0..8 {
            assert_eq!(c.reply().await.0, 0);
        }
        assert!(c.is_closed().await);
        assert!(dev.data.lock().unwrap()[..8 * 512].iter().all(|&b| b == 3));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn removing_an_export_closes_its_connections_after_in_flight_requests() {
    bounded(20, async {
        let gate = Arc::new(Gate::default());
        let exports = ExportRegistry::new();
        exports
            .add("moving", MemDevice::gated(SIZE, gate.clone()), "")
            .unwrap();
        exports.add("staying", MemDevice::new(SIZE), "").unwrap();
        let server = TestServer::start(exports.clone());
        let mut moving = server.connect().await;
        moving.go("moving").await;
        let mut staying = server.connect().await;
        staying.go("staying").await;

        assert_eq!(exports.connection_count("moving"), Some(1));
        assert_eq!(exports.connection_count("nope"), None);
        moving.request(CMD_WRITE, 0, 5, 0, 512, &[1; 512]).await;
        gate.wait_for_waiting(1).await;
        assert!(exports.remove("moving"));
        assert!(!exports.remove("moving"));
        assert_eq!(exports.names(), vec!["staying".to_string()]);
        gate.release();
        // The write that was in flight is still answered, then the server closes.
        assert_eq!(moving.reply().await, (0, 5));
        assert!(moving.is_closed().await);
        // New clients no longer see it; the other export is untouched.
        let mut late = server.connect().await;
        let replies = late
            .option(OPT_GO, &RawClient::<UnixStream>::info_data("moving", &[]))
            .await;
        assert_eq!(replies[0].kind, REP_ERR_UNKNOWN);
        assert_eq!(staying.read(0, 1).await, Ok(vec![0]));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_idle_and_negotiating_connections_and_returns() {
    bounded(20, async {
        let server = TestServer::start(registry("disk", MemDevice::new(SIZE)));
        let mut idle = server.connect().await;
        idle.go("disk").await;
        let mut negotiating = server.connect().await;
        server.stop().await;
        assert!(idle.is_closed().await);
        assert!(negotiating.is_closed().await);
    })
    .await;
}

#[tokio::test]
async fn a_stalled_handshake_times_out() {
    bounded(20, async {
        let config = ServerConfig {
            handshake_timeout: std::time::Duration::from_millis(200),
            ..ServerConfig::default()
        };
        let server = TestServer::start_with(registry("disk", MemDevice::new(SIZE)), config);
        let mut c = server.connect().await;
        assert!(c.is_closed().await);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn registry_refuses_duplicate_and_invalid_exports() {
    let exports = ExportRegistry::new();
    exports.add("a", MemDevice::new(16), "").unwrap();
    assert!(matches!(
        exports.add("a", MemDevice::new(16), ""),
        Err(convoy_nbd::Error::ExportExists(_))
    ));
    assert!(matches!(
        exports.add("x".repeat(5000), MemDevice::new(16), ""),
        Err(convoy_nbd::Error::InvalidExport { .. })
    ));
    let mut odd = MemDevice::build(16, false, None);
    odd.min_block = 3;
    assert!(matches!(
        exports.add("odd", Arc::new(odd), ""),
        Err(convoy_nbd::Error::InvalidExport { .. })
    ));
    assert!(exports.contains("a"));
}

#[tokio::test]
async fn misaligned_requests_are_refused_when_the_device_has_a_block_size() {
    bounded(10, async {
        let mut dev = MemDevice::build(SIZE, false, None);
        dev.min_block = 512;
        let dev = Arc::new(dev);
        let server = TestServer::start(registry("disk", dev.clone()));
        let mut c = server.connect().await;
        c.go("disk").await;
        assert_eq!(c.call(CMD_WRITE, 0, 1, 512, &[1; 512]).await, EINVAL);
        assert_eq!(c.read(0, 100).await, Err(EINVAL));
        assert_eq!(c.call(CMD_WRITE, 0, 512, 512, &[1; 512]).await, 0);
        assert_eq!(dev.ops().len(), 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn serve_tcp_accepts_clients_on_loopback() {
    bounded(10, async {
        let exports = registry("disk", MemDevice::new(SIZE));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(convoy_nbd::serve_tcp(listener, exports, async {
            let _ = rx.await;
        }));
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = RawClient::handshake(s, true).await;
        c.go("disk").await;
        assert_eq!(c.call(CMD_WRITE, 0, 0, 2, b"hi").await, 0);
        assert_eq!(c.read(0, 2).await, Ok(b"hi".to_vec()));
        tx.send(()).unwrap();
        task.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn serve_connection_runs_over_any_byte_stream() {
    bounded(10, async {
        let server = Server::new(registry("disk", MemDevice::new(SIZE)));
        let (client, server_end) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { server.serve_connection(server_end).await });
        let mut c = RawClient::handshake(client, false).await;
        c.go("disk").await;
        assert_eq!(c.read(0, 3).await, Ok(vec![0; 3]));
        c.request(CMD_DISC, 0, 0, 0, 0, &[]).await;
        task.await.unwrap().unwrap();
    })
    .await;
}

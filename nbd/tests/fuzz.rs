//! Property tests: whatever a client sends, the server does not panic, does not hang,
//! and never lets a request outside the rules reach the device.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use convoy_nbd::{BlockDevice, Server};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: usize = 64 << 10;

/// Feeds `input` to a fresh connection, reads everything the server sends, and returns
/// once the server has closed. Panics if the server task panicked or hung.
fn run_session(device: Arc<MemDevice>, input: Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let server = Server::new(registry("disk", device as Arc<dyn BlockDevice>));
        let (client, server_end) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { server.serve_connection(server_end).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        // The server may close early (bad magic, DISC); later writes then fail, which is fine.
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
        let outcome = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server hung on this input");
        assert!(outcome.is_ok(), "server task panicked: {outcome:?}");
        drop(wr);
        let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
    });
}

fn handshake_prefix(options: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut v = 0b11u32.to_be_bytes().to_vec();
    for (option, data) in options {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    }
    v
}

fn go_disk() -> (u32, Vec<u8>) {
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"disk");
    d.extend_from_slice(&0u16.to_be_bytes());
    (OPT_GO, d)
}

prop_compose! {
    /// A well-framed request with arbitrary fields; WRITE carries its payload when the
    /// length is small (a large one leaves the server waiting for bytes that never come).
    fn request()(
        kind in prop_oneof![
            8 => proptest::sample::select(vec![CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES]),
            1 => 0u16..8,
            1 => any::<u16>(),
        ],
        flags in prop_oneof![6 => 0u16..2, 2 => 0u16..4, 1 => any::<u16>()],
        cookie in any::<u64>(),
        offset in prop_oneof![4 => 0u64..(SIZE as u64 + 8192), 1 => any::<u64>()],
        len in prop_oneof![4 => 0u32..8192, 1 => any::<u32>()],
    ) -> Vec<u8> {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        if kind == CMD_WRITE && len <= 8192 {
            m.extend(std::iter::repeat_n(0x5a, len as usize));
        }
        m
    }
}

fn assert_ops_in_bounds(device: &MemDevice) {
    for op in device.ops() {
        let (offset, len) = match op {
            Op::Read { offset, len }
            | Op::Write { offset, len, .. }
            | Op::Trim { offset, len }
            | Op::WriteZeroes { offset, len, .. } => (offset, len),
            Op::Flush => continue,
        };
        assert!(len > 0, "empty range reached the device: {op:?}");
        assert!(
            offset + u64::from(len) <= SIZE as u64,
            "out-of-range op reached the device: {op:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_or_write(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let device = MemDevice::new(SIZE);
        run_session(device.clone(), input);
        prop_assert!(device.ops().iter().all(|op| !op.changes_data()));
    }

    #[test]
    fn arbitrary_option_sequences_never_panic_or_write(
        options in proptest::collection::vec(
            (prop_oneof![0u32..13, any::<u32>()], proptest::collection::vec(any::<u8>(), 0..64)),
            0..8,
        ),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let device = MemDevice::new(SIZE);
        let mut input = handshake_prefix(&options);
        input.extend_from_slice(&tail);
        run_session(device.clone(), input);
        prop_assert!(device.ops().iter().all(|op| !op.changes_data()));
    }

    #[test]
    fn arbitrary_requests_on_a_read_only_export_never_write(
        requests in proptest::collection::vec(request(), 0..24),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let device = MemDevice::read_only(SIZE);
        let mut input = handshake_prefix(&[go_disk()]);
        input.extend(requests.concat());
        input.extend_from_slice(&tail);
        run_session(device.clone(), input);
        prop_assert!(device.ops().iter().all(|op| !op.changes_data()));
        assert_ops_in_bounds(&device);
    }

    #[test]
    fn arbitrary_requests_only_reach_the_device_in_bounds(
        requests in proptest::collection::vec(request(), 0..24),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let device = MemDevice::new(SIZE);
        let mut input = handshake_prefix(&[go_disk()]);
        input.extend(requests.concat());
        input.extend_from_slice(&tail);
        run_session(device.clone(), input);
        assert_ops_in_bounds(&device);
    }
}

//! Failure handling: unreachable peers, backoff, killed and restarted peers.
// Test helpers panic on failed setup, like unwrap inside a #[test].
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use convoy_transport::pki::{self, TlsIdentity};
use convoy_transport::{Endpoint, StreamKind, TransportConfig, TransportError};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// An address where nothing listens (bound once to get a free port, then released).
fn dead_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// Sends requests until one succeeds; returns how long that took.
async fn until_reachable(
    from: &Endpoint,
    peer: u64,
    addr: SocketAddr,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        match from
            .request(
                peer,
                addr,
                StreamKind::RaftAppend,
                b"heartbeat",
                Duration::from_secs(1),
            )
            .await
        {
            Ok(_) => return started.elapsed(),
            Err(e) => {
                assert!(
                    started.elapsed() < limit,
                    "still failing after {limit:?}: {e}"
                );
                // Like a Raft heartbeat loop: retry soon.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Dialing a port where nothing listens fails with Unreachable within the connect
/// timeout; later calls fail fast during backoff; once a peer binds that address, it is
/// reached within about a second and a half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peer_fails_fast_then_is_reached_once_it_listens() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("failure").unwrap();
        let (a, _a_in) = bind(&ca, 1);
        let addr = dead_addr();
        let connect_timeout = TransportConfig::default().connect_timeout;

        let started = Instant::now();
        let err = a
            .request(2, addr, StreamKind::RaftVote, b"x", Duration::from_secs(10))
            .await
            .unwrap_err();
        let took = started.elapsed();
        eprintln!("first dial failed after {took:?}: {err}");
        assert!(
            matches!(err, TransportError::Unreachable { peer: 2, .. }),
            "{err:?}"
        );
        assert!(
            took < connect_timeout + Duration::from_millis(500),
            "{took:?}"
        );

        // Keep calling for a while, as Raft would: most calls fail fast in backoff.
        let mut fast = 0;
        let mut calls = 0;
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            let started = Instant::now();
            let err = a
                .request(2, addr, StreamKind::RaftVote, b"x", Duration::from_secs(10))
                .await
                .unwrap_err();
            assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
            calls += 1;
            if started.elapsed() < Duration::from_millis(20) {
                assert!(err.to_string().contains("not redialing"), "{err}");
                fast += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("{fast} of {calls} calls failed fast during backoff");
        assert!(fast > 0);
        let state = &a.peer_states()[0];
        assert!(!state.connected);
        assert!(state.dial_failures >= 2);
        assert!(state.last_error.is_some());

        let (_b, b_in) =
            Endpoint::bind(addr, 2, &node_identity(&ca, 2), TransportConfig::default()).unwrap();
        spawn_echo(b_in);
        let took = until_reachable(&a, 2, addr, Duration::from_secs(5)).await;
        eprintln!("peer reached {took:?} after it started listening");
        assert!(took < Duration::from_millis(1800), "{took:?}");
        assert!(a.peer_states()[0].connected);
    })
    .await
    .unwrap();
}

/// A peer that shuts down gracefully and is replaced at the same address is reached again
/// at once: the close is seen and the next call redials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gracefully_restarted_peer_is_reached_again() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("failure").unwrap();
        let (a, _a_in) = bind(&ca, 1);
        let (b, b_in) = bind(&ca, 2);
        let addr = b.local_addr();
        spawn_echo(b_in);
        until_reachable(&a, 2, addr, Duration::from_secs(5)).await;

        // Keep a clone alive, as an agent's Raft network would: close alone must free the port.
        let _b_clone = b.clone();
        b.close().await;
        let (_b2, b2_in) = rebind(&ca, 2, addr).await;
        spawn_echo(b2_in);
        let took = until_reachable(&a, 2, addr, Duration::from_secs(5)).await;
        eprintln!("restarted peer reached after {took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    })
    .await
    .unwrap();
}

const CHILD_DIR: &str = "CONVOY_TRANSPORT_TEST_CHILD_DIR";

async fn next_line_with(lines: &mut Lines<BufReader<ChildStdout>>, prefix: &str) -> String {
    while let Some(line) = lines.next_line().await.unwrap() {
        // The test harness prints "test child_peer_process ... " without a newline, so
        // the marker may sit in the middle of a line.
        if let Some(at) = line.find(prefix) {
            return line[at + prefix.len()..].trim().to_string();
        }
    }
    panic!("child exited before printing {prefix:?}");
}

fn spawn_child_peer(dir: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_peer_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Node 2 runs in a child process and is SIGKILLed (no QUIC close is sent) while a
/// request to it is in flight: the request fails within its timeout, and a new node 2
/// bound at the same address is reached afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_fails_inflight_request_and_its_replacement_is_reached() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::generate_ca("failure").unwrap();
        pki::write_pem_files(dir.path(), "ca", &ca).unwrap();
        pki::write_pem_files(
            dir.path(),
            "node-2",
            &pki::issue_node_cert(&ca, 2, &[]).unwrap(),
        )
        .unwrap();

        let mut child = spawn_child_peer(dir.path());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr: SocketAddr = next_line_with(&mut lines, "LISTENING")
            .await
            .parse()
            .unwrap();

        let (a, _a_in) = bind(&ca, 1);
        let response = a
            .request(2, addr, StreamKind::Forward, b"ping", REQUEST_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(&response[9..], b"ping");

        let request_timeout = Duration::from_millis(1500);
        let in_flight = {
            let a = a.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = a
                    .request(2, addr, StreamKind::Forward, b"hang", request_timeout)
                    .await;
                (result, started.elapsed())
            })
        };
        next_line_with(&mut lines, "GOT hang").await;
        child.kill().await.unwrap();

        let (result, took) = in_flight.await.unwrap();
        let err = result.unwrap_err();
        eprintln!("in-flight request to the killed peer failed after {took:?}: {err}");
        assert!(
            matches!(
                err,
                TransportError::Timeout { .. } | TransportError::ConnectionLost { .. }
            ),
            "{err:?}"
        );
        assert!(
            took < request_timeout + Duration::from_millis(500),
            "{took:?}"
        );

        // The replacement is the same node restarted: same key, so its stateless reset
        // tells `a` at once that the old connection is gone.
        let same_node = TlsIdentity::load(
            &dir.path().join("ca.crt"),
            &dir.path().join("node-2.crt"),
            &dir.path().join("node-2.key"),
        )
        .unwrap();
        let (_b, b_in) = Endpoint::bind(addr, 2, &same_node, TransportConfig::default()).unwrap();
        spawn_echo(b_in);
        let took = until_reachable(&a, 2, addr, Duration::from_secs(5)).await;
        eprintln!("replacement peer reached after {took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    })
    .await
    .unwrap();
}

/// Not a test on its own: the body of the child process spawned by
/// `killed_peer_fails_inflight_request_and_its_replacement_is_reached`. Without the
/// environment variable it returns at once.
#[test]
fn child_peer_process() {
    let Some(dir) = std::env::var_os(CHILD_DIR).map(PathBuf::from) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let identity = TlsIdentity::load(
            &dir.join("ca.crt"),
            &dir.join("node-2.crt"),
            &dir.join("node-2.key"),
        )
        .unwrap();
        let (endpoint, mut inbound) =
            Endpoint::bind(any_port(), 2, &identity, TransportConfig::default()).unwrap();
        println!("LISTENING {}", endpoint.local_addr());
        let mut held = Vec::new();
        while let Some(mut stream) = inbound.next().await {
            let request = stream.read_request().await.unwrap();
            if &request[..] == b"hang" {
                println!("GOT hang");
                // Never answer; keep the stream open until the process is killed.
                held.push(stream);
            } else {
                let response = echo_response(&stream, &request);
                stream.respond_bytes(response).await.unwrap();
            }
        }
    });
}

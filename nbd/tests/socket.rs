//! Unix sockets from `bind_unix` carry their mode and group from their first instant,
//! so only the hypervisor's group can open them.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use convoy_nbd::{Error, Server, bind_unix, resolve_group};

/// A group other than ours that we may hand a socket to: as root any group (nogroup's),
/// otherwise one of our supplementary groups, if we have one.
fn another_group() -> Option<u32> {
    let ours = nix::unistd::getegid().as_raw();
    if nix::unistd::geteuid().is_root() {
        return Some(resolve_group("nogroup").unwrap_or(65534)).filter(|&g| g != ours);
    }
    nix::unistd::getgroups()
        .ok()?
        .into_iter()
        .map(|g| g.as_raw())
        .find(|&g| g != ours)
}

#[tokio::test]
async fn unix_socket_gets_mode_0660_and_the_chosen_group_and_replaces_a_stale_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk-1.sock");
    // A stale socket file from a previous run.
    std::fs::write(&path, b"stale").unwrap();

    let listener = bind_unix(&path, 0o660, None).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(
        meta.gid(),
        nix::unistd::getegid().as_raw(),
        "default: our group"
    );
    // Nothing is left under the temporary name.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    drop(listener);

    let group = another_group().expect(
        "this test needs a second group to hand the socket to: run as root or as a member of a supplementary group",
    );
    let path = dir.path().join("disk-2.sock");
    let listener = bind_unix(&path, 0o660, Some(group)).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), group);

    // And it serves.
    let exports = registry("disk", MemDevice::new(1 << 20));
    let server = Server::new(exports);
    let task = tokio::spawn(async move {
        server
            .serve_unix(listener, tokio::time::sleep(Duration::from_secs(30)))
            .await;
    });
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut c = RawClient::handshake(stream, true).await;
    c.go("disk").await;
    task.abort();
}

/// As root, a process outside the socket's group is refused and one inside gets in
/// (`nbdinfo` as the client, run as an unprivileged user).
#[tokio::test]
async fn only_the_sockets_group_can_open_it() {
    if !nix::unistd::geteuid().is_root() {
        // Switching users needs root; the mode and group are checked by the test above.
        eprintln!(
            "not root: cannot run a client as another user; mode and group are checked elsewhere"
        );
        return;
    }
    let nbdinfo = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nbdinfo"))
                .find(|p| p.is_file())
        })
        .expect("`nbdinfo` is not installed: apt-get install libnbd-bin (scripts/setup-debian)");
    let dir = tempfile::tempdir().unwrap();
    // The directory must be searchable by the client.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let path = dir.path().join("disk.sock");
    let group = 4242;
    let listener = bind_unix(&path, 0o660, Some(group)).unwrap();
    let server = Server::new(registry("disk", MemDevice::new(1 << 20)));
    let task = tokio::spawn(async move {
        server
            .serve_unix(listener, tokio::time::sleep(Duration::from_secs(60)))
            .await;
    });
    let uri = format!("nbd+unix:///disk?socket={}", path.display());
    let run_as = |gid: u32| {
        let mut cmd = std::process::Command::new(&nbdinfo);
        cmd.args(["--size", &uri]).uid(65534).gid(gid);
        cmd
    };
    let outsider = tokio::task::spawn_blocking({
        let mut cmd = run_as(65534);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        !outsider.status.success(),
        "a process outside the group opened the socket"
    );
    let stderr = String::from_utf8_lossy(&outsider.stderr);
    assert!(stderr.contains("ermission denied"), "{stderr}");
    let member = tokio::task::spawn_blocking({
        let mut cmd = run_as(group);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        member.status.success(),
        "a process in the group was refused: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&member.stdout).trim(),
        (1u64 << 20).to_string()
    );
    task.abort();
}

#[test]
fn groups_resolve_by_name_or_number_and_unknown_ones_are_refused() {
    assert_eq!(resolve_group("root").unwrap(), 0);
    assert_eq!(resolve_group("0").unwrap(), 0);
    assert_eq!(resolve_group("4242").unwrap(), 4242);
    let err = resolve_group("no-such-group-convoy").unwrap_err();
    assert!(matches!(err, Error::UnknownGroup(_)), "{err}");
    assert!(err.to_string().contains("no-such-group-convoy"));
}

#[tokio::test]
async fn a_socket_in_a_missing_directory_is_a_clear_error() {
    let err = bind_unix(Path::new("/nonexistent-convoy-dir/disk.sock"), 0o660, None).unwrap_err();
    assert!(matches!(err, Error::Socket { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("/nonexistent-convoy-dir/disk.sock"),
        "{err}"
    );
}

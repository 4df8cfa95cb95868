//! Helpers for data-plane tests: external NBD tools and the CLI views of groups and disks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{Dev, wait_for};

/// Runs an external tool with a time limit; panics with its output if it cannot start.
pub fn tool(program: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .arg("-s")
        .arg("KILL")
        .arg("120")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); install it with scripts/setup-debian")
        })
}

pub fn ok(out: &std::process::Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed: {text}");
    text
}

/// `qemu-io -f raw -c CMD ... URI`.
pub fn qemu_io(uri: &str, cmds: &[String]) -> String {
    qemu_io_with(uri, cmds, false)
}

/// `qemu-io` on a read-only export.
pub fn qemu_io_ro(uri: &str, cmds: &[String]) -> String {
    qemu_io_with(uri, cmds, true)
}

pub fn qemu_io_with(uri: &str, cmds: &[String], read_only: bool) -> String {
    let mut args = vec!["-f".to_string(), "raw".into()];
    if read_only {
        args.push("-r".into());
    }
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(&tool("qemu-io", &refs), "qemu-io");
    assert!(!out.contains("failed"), "qemu-io reported a failure: {out}");
    out
}

pub fn images_identical(a: &str, b: &str) -> bool {
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b])
        .status
        .success()
}

/// The first (Unix socket) NBD URI of `vm`'s disk `index`.
pub fn vm_uri(dev: &Dev, vm: &str, index: usize) -> String {
    wait_for("the disk's NBD export", Duration::from_secs(20), || {
        let v = dev.cli(&["vm", "show", vm, "-o", "json"]).json();
        v["disks"][index]["uris"][0].as_str().map(String::from)
    })
}

pub fn expose(dev: &Dev, disk: &str, on: u64) -> String {
    let r = dev
        .cli(&[
            "disk",
            "expose",
            disk,
            "--on",
            &on.to_string(),
            "-o",
            "json",
        ])
        .json();
    r["uris"][0].as_str().unwrap().to_string()
}

pub fn cg_show(dev: &Dev, cg: &str) -> Value {
    dev.cli(&["cg", "show", cg, "-o", "json"]).json()
}

/// Waits until the group's replica is consistent and holds every write.
pub fn wait_caught_up(dev: &Dev, cg: &str) -> Value {
    wait_for("the replica to catch up", Duration::from_secs(60), || {
        let v = cg_show(dev, cg);
        let r = &v["replicas"][0];
        let done = r["state"] == "consistent" && r["lag_writes"] == 0 && r["phase"] == "streaming";
        done.then_some(v)
    })
}

pub fn setup_group(dev: &Dev, vm: &str, cg: &str, size: &str, mode: &str) {
    assert!(
        dev.cli(&["vm", "create", vm, "--host", "1", "--disk", size])
            .ok
    );
    assert!(dev.cli(&["cg", "create", cg, "--vm", vm]).ok);
    let r = dev.cli(&["cg", "replicate", cg, "--to", "2", "--mode", mode]);
    assert!(r.ok, "{r:?}");
}

/// How many 4 KiB blocks differ between two copies of a disk read whole.
#[allow(dead_code)]
pub fn blocks_differ(one: &[u8], two: &[u8]) -> usize {
    one.chunks(4096)
        .zip(two.chunks(4096))
        .filter(|(a, b)| a != b)
        .count()
}

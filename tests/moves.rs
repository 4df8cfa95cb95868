//! Where a VM runs and who orders its group's writes, with real agents and simulated
//! guests writing throughout: per-disk fencing, VM moves (mirrored writes), the
//! sequencer dying while mirrored writes flow, primary hand-over under load, and seeding a
//! re-added replica with only what it lacks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::data::*;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn vm_show(dev: &Dev, vm: &str) -> Value {
    dev.cli(&["vm", "show", vm, "-o", "json"]).json()
}

fn failed(dev: &Dev, vm: &str) -> u64 {
    vm_show(dev, vm)["guest_stats"]["writes_failed"]
        .as_u64()
        .unwrap_or(0)
}

fn wait_writes(dev: &Dev, vm: &str, more: u64) {
    dev.wait_more_writes(vm, more, Duration::from_secs(30));
}

fn create_sim(dev: &Dev, vm: &str, host: u64, size: &str, iops: u32) {
    let workload = format!("iops={iops},size=4k,pattern=random,depth=2");
    let r = dev.cli(&[
        "vm",
        "create",
        vm,
        "--host",
        &host.to_string(),
        "--disk",
        size,
        "--workload",
        &workload,
    ]);
    assert!(r.ok, "{r:?}");
}

fn verify(dev: &Dev, vm: &str, on: u64) -> Value {
    let r = dev.cli(&["vm", "verify", vm, "--on", &on.to_string(), "-o", "json"]);
    let v = r.json();
    assert_eq!(
        v["ok"], true,
        "verify {vm} on node {on}: {}{}",
        r.stdout, r.stderr
    );
    v
}

/// A qemu-io that keeps one NBD connection open and takes commands on stdin.
struct HeldClient(Child);

impl HeldClient {
    fn open(uri: &str) -> Self {
        let child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io (install it with scripts/setup-debian)");
        HeldClient(child)
    }

    fn send(&mut self, cmd: &str) {
        let stdin = self.0.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").expect("write to qemu-io");
        stdin.flush().expect("flush");
    }

    /// Ends the client and returns everything it printed.
    fn finish(mut self) -> String {
        self.send("quit");
        drop(self.0.stdin.take());
        let out = self.0.wait_with_output().expect("qemu-io output");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// Fencing one VM of a group moves only its disks' epochs: the other VM's guest keeps
/// writing without a single failed write, and both logs verify.
#[test]
fn fencing_one_vm_leaves_the_other_guests_of_its_group_writing() {
    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    create_sim(&dev, "fa", 1, "16MiB", 300);
    create_sim(&dev, "fb", 1, "16MiB", 300);
    assert!(
        dev.cli(&["cg", "create", "fg", "--vm", "fa", "--vm", "fb"])
            .ok
    );
    assert!(
        dev.cli(&["cg", "replicate", "fg", "--to", "2", "--mode", "sync"])
            .ok
    );
    wait_caught_up(&dev, "fg");
    assert!(dev.cli(&["vm", "start", "fa"]).ok);
    assert!(dev.cli(&["vm", "start", "fb"]).ok);
    wait_writes(&dev, "fb", 100);
    let before = vm_show(&dev, "fa")["disks"][0]["epoch"].as_u64().unwrap();
    let fenced = dev.cli(&["vm", "fence", "fa", "-o", "json"]);
    assert!(fenced.ok, "{fenced:?}");
    assert_eq!(
        fenced.json()["disks"][0]["epoch"].as_u64(),
        Some(before + 1)
    );
    let g = dev.cli(&["cg", "show", "fg", "-o", "json"]).json();
    let epochs: Vec<(String, u64)> = g["disk_epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[1].as_str().unwrap().to_string(), e[2].as_u64().unwrap()))
        .collect();
    assert_eq!(
        epochs,
        vec![("fa".to_string(), before + 1), ("fb".to_string(), before)]
    );
    // The fenced VM's guest restarts at the new epoch; the other never noticed.
    wait_writes(&dev, "fa", 100);
    wait_writes(&dev, "fb", 200);
    assert_eq!(failed(&dev, "fb"), 0, "{}", vm_show(&dev, "fb"));
    assert!(dev.cli(&["vm", "stop", "fa"]).ok);
    assert!(dev.cli(&["vm", "stop", "fb"]).ok);
    wait_caught_up(&dev, "fg");
    for vm in ["fa", "fb"] {
        verify(&dev, vm, 1);
        verify(&dev, vm, 2);
    }
    dev.assert_no_panics();
}

/// In every mode, a VM moves to its replica's host and back while its guest writes: its
/// writes go to the sequencer from the replica's host (mirrored), its log continues
/// across hosts, every acknowledged write is on both copies, and a client that held the
/// old export open is refused with the old epoch (and counted).
#[test]
fn a_vm_moves_to_the_replica_and_back_in_every_mode_and_loses_no_write() {
    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    for (i, mode) in ["async", "sync", "active-active-sync", "active-active-async"]
        .iter()
        .enumerate()
    {
        let (vm, cg) = (format!("mv{i}"), format!("mg{i}"));
        create_sim(&dev, &vm, 1, "16MiB", 200);
        assert!(dev.cli(&["cg", "create", &cg, "--vm", &vm]).ok);
        let r = dev.cli(&["cg", "replicate", &cg, "--to", "2", "--mode", mode]);
        assert!(r.ok, "{r:?}");
        wait_caught_up(&dev, &cg);
        let old_export = vm_uri(&dev, &vm, 0);
        let mut held = HeldClient::open(&old_export);
        assert!(dev.cli(&["vm", "start", &vm]).ok);
        wait_writes(&dev, &vm, 50);

        let moved = dev.cli(&["vm", "move", &vm, "--to", "2", "-o", "json"]);
        assert!(moved.ok, "{mode}: {moved:?}");
        let m = moved.json();
        assert_eq!(m["vm"]["host"], 2, "{mode}: {m}");
        assert_eq!(
            m["vm"]["sequencer"], 1,
            "{mode}: writes are mirrored to node 1"
        );
        assert_eq!(m["guest_moved"], true, "{mode}: {m}");
        assert_eq!(m["fenced"], true, "{mode}: {m}");
        eprintln!("{mode}: moved to node 2, stun {} ms", m["stun_ms"]);
        // The client that opened the old export before the move is refused.
        held.send("write -P 9 0 4k");
        let out = held.finish();
        assert!(
            out.contains("Operation not permitted"),
            "{mode}: the old writer was not refused for its epoch: {out}"
        );
        wait_writes(&dev, &vm, 100);
        let g = dev.cli(&["cg", "show", &cg, "-o", "json"]).json();
        assert!(
            g["stale_epoch_refused"].as_u64().unwrap_or(0) >= 1,
            "{mode}: refusal not counted: {g}"
        );

        let back = dev.cli(&["vm", "move", &vm, "--to", "1", "-o", "json"]);
        assert!(back.ok, "{mode}: {back:?}");
        assert_eq!(back.json()["vm"]["stays"], serde_json::json!([1, 2, 1]));
        wait_writes(&dev, &vm, 50);
        assert!(dev.cli(&["vm", "stop", &vm]).ok);
        wait_caught_up(&dev, &cg);
        let on1 = verify(&dev, &vm, 1);
        verify(&dev, &vm, 2);
        let logged = on1["report"]["writes_logged"].as_u64().unwrap_or(0);
        assert!(logged >= 200, "{mode}: too few writes: {on1}");
        assert_eq!(failed(&dev, &vm), 0, "{mode}: a guest write failed");
    }
    dev.assert_no_panics();
}

/// The sequencer is SIGKILLed while a VM on another host writes through it (mirrored,
/// sync replica on the VM's host): writes fail while it is down, none that was
/// acknowledged is lost, and the guest carries on once it is back.
#[test]
fn sigkill_of_the_sequencer_while_mirrored_writes_flow_loses_no_acknowledged_write() {
    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    create_sim(&dev, "mk", 1, "16MiB", 300);
    assert!(dev.cli(&["cg", "create", "mkg", "--vm", "mk"]).ok);
    assert!(
        dev.cli(&["cg", "replicate", "mkg", "--to", "2", "--mode", "sync"])
            .ok
    );
    wait_caught_up(&dev, "mkg");
    assert!(dev.cli(&["vm", "start", "mk"]).ok);
    assert!(dev.cli(&["vm", "move", "mk", "--to", "2"]).ok);
    wait_writes(&dev, "mk", 200);
    dev.kill(1);
    std::thread::sleep(Duration::from_millis(700));
    dev.restart(1);
    // The guest on node 2 resumes through the restarted sequencer.
    wait_writes(&dev, "mk", 200);
    assert!(dev.cli(&["vm", "stop", "mk"]).ok);
    wait_caught_up(&dev, "mkg");
    let on1 = verify(&dev, "mk", 1);
    verify(&dev, "mk", 2);
    assert!(on1["report"]["writes_logged"].as_u64().unwrap_or(0) >= 400);
    dev.assert_no_panics();
}

/// `cg switch-primary` under load to a caught-up sync copy and back: roles swap, writes
/// pause briefly and go on, the old primary resumes as a replica from the journal (no
/// resync, no chunk sent) of a 1 GiB group, and every acknowledged write is on both.
#[test]
fn switch_primary_under_load_and_back_resends_no_chunk() {
    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    create_sim(&dev, "sp", 1, "1GiB", 300);
    assert!(dev.cli(&["cg", "create", "spg", "--vm", "sp"]).ok);
    assert!(
        dev.cli(&["cg", "replicate", "spg", "--to", "2", "--mode", "sync"])
            .ok
    );
    wait_caught_up(&dev, "spg");
    assert!(dev.cli(&["vm", "start", "sp"]).ok);
    wait_writes(&dev, "sp", 100);
    for (to, from) in [(2u64, 1u64), (1, 2)] {
        let r = dev.cli(&[
            "cg",
            "switch-primary",
            "spg",
            "--to",
            &to.to_string(),
            "-o",
            "json",
        ]);
        assert!(r.ok, "{r:?}");
        let s = r.json();
        assert_eq!(s["cg"]["sequencer"], to);
        assert_eq!(s["from"], from);
        eprintln!("switch to node {to}: writes paused {} ms", s["paused_ms"]);
        wait_writes(&dev, "sp", 100);
        let g = wait_caught_up(&dev, "spg");
        let link = &g["replicas"][0];
        assert_eq!(link["host"], from, "{g}");
        assert_eq!(link["mode"], "sync", "{g}");
        assert_eq!(link["resyncs"], 0, "the old primary was resynced: {g}");
        assert_eq!(link["resync_bytes_sent"], 0, "chunks were re-sent: {g}");
        let sent = link["bytes_sent"].as_u64().unwrap();
        eprintln!("switch to node {to}: {sent} bytes sent to the old primary since");
    }
    assert!(dev.cli(&["vm", "stop", "sp"]).ok);
    wait_caught_up(&dev, "spg");
    verify(&dev, "sp", 1);
    verify(&dev, "sp", 2);
    assert_eq!(
        failed(&dev, "sp"),
        0,
        "a guest write failed during the swaps"
    );
    dev.assert_no_panics();
}

/// A replica removed and re-added is compared by hashes and sent only what changed
/// meanwhile, not the whole disk.
#[test]
fn a_removed_and_re_added_replica_is_sent_only_what_it_lacks() {
    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    assert!(
        dev.cli(&["vm", "create", "ra", "--host", "1", "--disk", "256MiB"])
            .ok
    );
    assert!(dev.cli(&["cg", "create", "rag", "--vm", "ra"]).ok);
    let uri = vm_uri(&dev, "ra", 0);
    // Data written before the replica exists: its first sync copies it (as chunks).
    qemu_io(&uri, &["write -P 1 0 64M".to_string()]);
    assert!(
        dev.cli(&["cg", "replicate", "rag", "--to", "2", "--mode", "async"])
            .ok
    );
    let first = wait_caught_up(&dev, "rag");
    let full = first["replicas"][0]["resync_bytes_sent"].as_u64().unwrap();
    assert!(full >= 64 * MIB, "first sync sent {full} bytes");
    assert!(dev.cli(&["cg", "unreplicate", "rag", "--from", "2"]).ok);
    qemu_io(&uri, &["write -P 2 8M 1M".to_string()]);
    assert!(
        dev.cli(&["cg", "replicate", "rag", "--to", "2", "--mode", "async"])
            .ok
    );
    let again = wait_caught_up(&dev, "rag");
    let sent = again["replicas"][0]["resync_bytes_sent"].as_u64().unwrap();
    eprintln!("re-added replica: {sent} bytes of chunks (first sync: {full})");
    assert!(sent <= 4 * MIB, "re-added replica got {sent} bytes");
    let disk = vm_show(&dev, "ra")["disks"][0]["id"].as_u64().unwrap();
    let copy = expose(&dev, &disk.to_string(), 2);
    assert!(
        images_identical(&uri, &copy),
        "copies differ after the re-add"
    );
    dev.assert_no_panics();
}

/// `convoy_mirror_flushes_total` on node `id`, read from its `/metrics` (0 before the
/// first mirrored flush: the counter appears then).
fn mirror_flushes(dev: &Dev, id: u64) -> u64 {
    let client = dev.client_at(id);
    let text = rt()
        .block_on(client.send(hyper::Method::GET, "/metrics", None))
        .expect("metrics");
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("convoy_mirror_flushes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// An NBD FLUSH on the export of a VM moved off its group's sequencer returns only once
/// the sequencer has made every write acknowledged before it durable on every copy the
/// mode promises (its own included): with the sequencer frozen (SIGSTOP) the flush does
/// not return, however long; once it thaws the flush succeeds and the sequencer counts
/// one mirrored flush served. A flush that synced only the local copy would return at
/// once.
#[test]
fn a_flush_on_a_mirrored_export_returns_only_after_the_sequencer_flushed() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    assert!(
        dev.cli(&["vm", "create", "fl", "--host", "1", "--disk", "16MiB"])
            .ok
    );
    assert!(dev.cli(&["cg", "create", "flg", "--vm", "fl"]).ok);
    assert!(
        dev.cli(&["cg", "replicate", "flg", "--to", "2", "--mode", "sync"])
            .ok
    );
    wait_caught_up(&dev, "flg");
    let moved = dev.cli(&["vm", "move", "fl", "--to", "2", "-o", "json"]);
    assert!(moved.ok, "{moved:?}");
    assert_eq!(moved.json()["vm"]["sequencer"], 1);
    let uri = wait_for("the export on node 2", Duration::from_secs(20), || {
        let v = vm_show(&dev, "fl");
        (v["host"] == 2)
            .then(|| v["disks"][0]["uris"][0].as_str().map(String::from))
            .flatten()
    });
    // The write goes to the sequencer over the mirror stream; its stream stays open.
    qemu_io(&uri, &["write -P 7 0 64k".to_string()]);
    let before = mirror_flushes(&dev, 1);

    let sequencer = Pid::from_raw(dev.pid(1) as i32);
    kill(sequencer, Signal::SIGSTOP).unwrap();
    let flush = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "flush", &uri])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut flush = match flush {
        Ok(c) => c,
        Err(e) => {
            let _ = kill(sequencer, Signal::SIGCONT);
            panic!("cannot run qemu-io ({e}); install it with scripts/setup-debian");
        }
    };
    std::thread::sleep(Duration::from_millis(1500));
    let early = flush.try_wait().unwrap();
    kill(sequencer, Signal::SIGCONT).unwrap();
    assert!(
        early.is_none(),
        "the flush returned ({early:?}) while the sequencer was frozen"
    );
    let status = wait_for("the flush to return", Duration::from_secs(30), || {
        flush.try_wait().unwrap()
    });
    let out = flush.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        status.success() && !text.contains("failed"),
        "the flush failed after the sequencer thawed: {text}"
    );
    let after = mirror_flushes(&dev, 1);
    assert!(
        after > before,
        "the sequencer served no mirrored flush ({before} -> {after})"
    );
    // Both copies hold the write.
    qemu_io_ro(&expose(&dev, "fl:0", 1), &["read -P 7 0 64k".to_string()]);
    qemu_io_ro(&expose(&dev, "fl:0", 2), &["read -P 7 0 64k".to_string()]);
    dev.assert_no_panics();
}

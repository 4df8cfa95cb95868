//! A real QEMU guest on a Convoy NBD export: the guest boots (TCG) with its only disk on the
//! primary's Unix-socket export and writes numbered 4 KiB blocks, each followed by an fsync;
//! with the group in `sync` mode, every write the guest saw acknowledged is on the replica.
//!
//! The guest is Debian's cloud kernel (fetched with `apt-get download`) and a busybox
//! initramfs built here, once per machine, into `$HOME/.cache/convoy-qemu-guest/`. It needs
//! what `scripts/setup-debian` installs (qemu-system-x86, qemu-utils, busybox-static, cpio,
//! libnbd-bin) and Debian's package lists for the kernel. Where these cannot be had, the
//! test fails saying what is missing; `CONVOY_SKIP_QEMU=1` skips it instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::data::*;
use common::qemu_guest::{self as guest, highest_reported, missing_writes};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Writes to see acknowledged before the guest is killed.
const MIN_WRITES: u64 = 200;
/// Bound on booting the guest and reaching `MIN_WRITES`.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A running QEMU, SIGKILLed (with the `timeout` wrapper that bounds it) when dropped.
struct Qemu {
    wrapper: Child,
    pidfile: PathBuf,
}

impl Qemu {
    fn boot(guest: &guest::Guest, uri: &str, dir: &Path) -> Qemu {
        let serial = dir.join("guest.log");
        let pidfile = dir.join("qemu.pid");
        let stderr = std::fs::File::create(dir.join("qemu.log")).unwrap();
        // QEMU's option parser treats a comma as a separator; a literal one is doubled.
        let drive = format!(
            "file={},format=raw,if=virtio,cache=none",
            uri.replace(',', ",,")
        );
        let wrapper = Command::new("timeout")
            .args(["-s", "KILL", "300", "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-cpu", "max", "-m", "256"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initrd)
            .args(["-append", "console=ttyS0 panic=-1"])
            .args(["-drive", &drive])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr)
            .spawn()
            .expect("start qemu-system-x86_64 under timeout");
        Qemu { wrapper, pidfile }
    }

    /// Whether QEMU has exited.
    fn exited(&mut self) -> bool {
        !matches!(self.wrapper.try_wait(), Ok(None))
    }

    /// SIGKILLs QEMU (a crash, as far as the guest is concerned) and reaps the wrapper.
    fn kill(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours =
                String::from_utf8_lossy(&cmdline).contains(&self.pidfile.display().to_string());
            if ours {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies an NBD export into a local file with `program` and returns its bytes.
fn read_export(program: &str, uri: &str, file: &Path) -> Vec<u8> {
    let path = file.to_str().unwrap();
    let out = match program {
        "nbdcopy" => tool("nbdcopy", &[uri, path]),
        _ => tool(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", uri, path],
        ),
    };
    ok(&out, program);
    std::fs::read(file).unwrap()
}

#[test]
fn qemu_guest_writes_are_all_on_the_sync_replica() {
    if guest::skip() {
        eprintln!("SKIPPED: CONVOY_SKIP_QEMU=1");
        return;
    }
    let started = Instant::now();
    let guest = guest::require();
    eprintln!(
        "guest ready after {:?}: {}",
        started.elapsed(),
        guest.kernel.display()
    );

    let dev = Dev::start(3, &[]);
    wait_for("a leader", Duration::from_secs(10), || dev.leader());
    setup_group(&dev, "tiny", "real", "64MiB", "sync");
    wait_caught_up(&dev, "real");
    let uri = vm_uri(&dev, "tiny", 0);
    eprintln!(
        "cluster up, group in sync mode after {:?}; booting the guest on {uri}",
        started.elapsed()
    );

    let serial = dev.dir.path().join("guest.log");
    let qemu_log = dev.dir.path().join("qemu.log");
    let booted = Instant::now();
    let mut qemu = Qemu::boot(&guest, &uri, dev.dir.path());
    let logs = || {
        format!(
            "--- serial ---\n{}\n--- qemu ---\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default(),
            std::fs::read_to_string(&qemu_log).unwrap_or_default()
        )
    };
    let mut first_write = None;
    loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        let failure = log
            .lines()
            .find(|l| l.contains("GUEST:") && (l.contains("failed") || l.contains("no /dev/vda")));
        assert!(
            failure.is_none(),
            "the guest reported a failure ({failure:?}):\n{}",
            logs()
        );
        let reached = highest_reported(&log);
        if first_write.is_none() && reached.is_some() {
            first_write = Some(booted.elapsed());
        }
        if reached.is_some_and(|n| n >= MIN_WRITES) {
            break;
        }
        assert!(
            !qemu.exited(),
            "QEMU exited before the guest wrote {MIN_WRITES} blocks:\n{}",
            logs()
        );
        assert!(
            booted.elapsed() < GUEST_TIMEOUT,
            "the guest did not report {MIN_WRITES} writes within {GUEST_TIMEOUT:?} \
             (reached {reached:?}); group: {}\n{}",
            cg_show(&dev, "real"),
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    qemu.kill();
    let ran = booted.elapsed();
    // Every report printed before the kill is an acknowledged write, read or not yet read.
    let log = std::fs::read_to_string(&serial).unwrap();
    let acked = highest_reported(&log).unwrap();
    eprintln!(
        "guest killed after {ran:?} (first report after {first_write:?}): {acked} writes \
         acknowledged ({:.1} writes/s)",
        acked as f64 / ran.as_secs_f64()
    );

    // Straight away, without waiting for any catch-up: sync mode promised these.
    let replica = expose(&dev, "tiny:0", 2);
    let image = read_export("nbdcopy", &replica, &dev.dir.path().join("replica.img"));
    let lost = missing_writes(&image, acked);
    assert!(
        lost.is_empty(),
        "{} of {acked} acknowledged writes are not on the sync replica (group: {}): {:?}",
        lost.len(),
        cg_show(&dev, "real"),
        &lost[..lost.len().min(10)]
    );
    let image = read_export("qemu-img", &uri, &dev.dir.path().join("primary.img"));
    let lost = missing_writes(&image, acked);
    assert!(
        lost.is_empty(),
        "{} of {acked} acknowledged writes are not on the primary: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let group = cg_show(&dev, "real");
    eprintln!(
        "replica on host {} after the guest: mode {}, state {}, acked_seq {}, lag_writes {}; \
         whole test {:?}",
        group["replicas"][0]["host"],
        group["replicas"][0]["mode"],
        group["replicas"][0]["state"],
        group["replicas"][0]["acked_seq"],
        group["replicas"][0]["lag_writes"],
        started.elapsed()
    );
    dev.assert_no_panics();
}

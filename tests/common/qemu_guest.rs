//! Building the tiny real test guest: Debian's cloud kernel and a busybox initramfs whose
//! `/init` loads the virtio block driver and writes numbered blocks to `/dev/vda`, each
//! followed by an fsync, reporting progress on its serial console. Cached per machine in
//! `$HOME/.cache/convoy-qemu-guest/`; shared by the QEMU tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The guest writes `seq%08d` at the start of block `i % BLOCKS` for write `i = 1, 2, ...`.
pub const BLOCKS: u64 = 16_000;
/// Size of one block the guest writes to.
pub const BLOCK: u64 = 4096;
/// The guest prints `GUEST: wrote N` after every `REPORT_EVERY`-th acknowledged write.
pub const REPORT_EVERY: u64 = 50;
/// Bumped whenever what is built changes, so a stale cache is not reused.
const FORMAT: &str = "v1";
/// Kernel modules the guest needs (with their dependencies) for `/dev/vda`.
const MODULES: [&str; 2] = ["virtio_pci", "virtio_blk"];
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// A kernel and initramfs ready to boot.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Where the guest is cached on this machine (outside the repository).
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache"))
        .unwrap_or_else(std::env::temp_dir);
    base.join("convoy-qemu-guest").join(FORMAT)
}

/// Returns the cached guest, building it first if the cache lacks it.
pub fn ensure() -> Result<Guest, String> {
    let dir = cache_dir();
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.gz"),
    };
    if guest.kernel.is_file() && guest.initrd.is_file() {
        return Ok(guest);
    }
    let parent = dir.parent().expect("cache dir has a parent");
    std::fs::create_dir_all(parent).map_err(|e| format!("create {parent:?}: {e}"))?;
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(parent)
        .map_err(|e| format!("temporary build dir in {parent:?}: {e}"))?;
    let out = work.path().join("out");
    std::fs::create_dir(&out).map_err(|e| e.to_string())?;
    build(work.path(), &out)?;
    // Publish atomically: a concurrent or interrupted build never leaves half a guest.
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::rename(&out, &dir) {
        if !(guest.kernel.is_file() && guest.initrd.is_file()) {
            return Err(format!("publish the guest to {dir:?}: {e}"));
        }
    }
    Ok(guest)
}

/// Runs a command (killed after `secs`), returning its stdout or an error naming it.
fn run(cwd: &Path, secs: u32, program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .arg("-s")
        .arg("KILL")
        .arg(secs.to_string())
        .arg(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn build(work: &Path, out: &Path) -> Result<(), String> {
    let busybox = which("busybox").ok_or("no busybox on PATH (Debian: busybox-static)")?;
    let bb = std::fs::read(&busybox).map_err(|e| format!("read {busybox:?}: {e}"))?;
    if has_interpreter(&bb) {
        return Err(format!(
            "{busybox:?} is dynamically linked; the initramfs needs busybox-static"
        ));
    }

    // The kernel: the package the cloud meta-package points at, unpacked, not installed.
    // _apt must be able to write the download directory or apt warns.
    let _ = std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o755));
    let deps = run(work, 60, "apt-cache", &["depends", KERNEL_META_PACKAGE])?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| format!("apt knows no {KERNEL_META_PACKAGE} (run apt-get update): {deps}"))?
        .to_string();
    run(work, 600, "apt-get", &["download", "-q", &package])?;
    let deb = std::fs::read_dir(work)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {package} left no .deb"))?;
    let tree = work.join("kernel");
    run(
        work,
        120,
        "dpkg",
        &["-x", deb.to_str().unwrap(), tree.to_str().unwrap()],
    )?;
    let vmlinuz = std::fs::read_dir(tree.join("boot"))
        .map_err(|e| format!("{package} has no /boot: {e}"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("{package} has no /boot/vmlinuz-*"))?;
    std::fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(|e| e.to_string())?;

    // The modules for /dev/vda, in an order where each follows its dependencies.
    let mut files = Vec::new();
    walk(&tree.join("lib/modules"), &mut files);
    let by_name: HashMap<String, PathBuf> = files
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            let stem = name.split(".ko").next()?.to_string();
            name.contains(".ko").then(|| (stem.replace('-', "_"), p))
        })
        .collect();
    let builtin = files_named(&tree.join("lib/modules"), "modules.builtin");
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for m in MODULES {
        load_order(m, &by_name, &builtin, &mut seen, &mut order)?;
    }

    // The initramfs: busybox, the modules, and /init.
    let root = work.join("root");
    for d in ["bin", "dev", "proc", "sys", "modules"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(&busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    for m in &order {
        let src = &by_name[m];
        let bytes = module_bytes(src)?;
        std::fs::write(root.join("modules").join(format!("{m}.ko")), bytes)
            .map_err(|e| e.to_string())?;
    }
    let init = root.join("init");
    std::fs::write(&init, init_script(&order)).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    walk_all(&root, &root, &mut entries);
    let cpio_out = std::fs::File::create(work.join("initrd")).map_err(|e| e.to_string())?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(cpio_out)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cpio ({e}); Debian: cpio"))?;
    cpio.stdin
        .take()
        .expect("cpio stdin")
        .write_all(entries.join("\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let status = cpio.wait_with_output().map_err(|e| e.to_string())?;
    if !status.status.success() {
        return Err(format!(
            "cpio failed: {}",
            String::from_utf8_lossy(&status.stderr)
        ));
    }
    run(work, 60, "gzip", &["-1", "-n", "initrd"])?;
    std::fs::rename(work.join("initrd.gz"), out.join("initrd.gz")).map_err(|e| e.to_string())
}

/// The guest's `/init`. Write `i` goes to block `i % BLOCKS`; `GUEST: wrote N` is printed
/// only after write N's fsync returned, so every write up to N was acknowledged. A failed
/// write is reported and powers the guest off rather than being counted.
fn init_script(modules: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
  insmod /modules/$m.ko || echo "GUEST: insmod $m failed"
done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -b /dev/vda ]; then echo "GUEST: no /dev/vda"; poweroff -f; fi
echo "GUEST: disk $(cat /sys/block/vda/size) sectors"
i=0
while true; do
  i=$((i + 1))
  if ! printf 'seq%08d' $i | dd of=/dev/vda bs=4096 seek=$((i % {BLOCKS})) conv=notrunc,fsync 2>/dev/null; then
echo "GUEST: write $i failed"
poweroff -f
  fi
  if [ $((i % {REPORT_EVERY})) -eq 0 ]; then echo "GUEST: wrote $i"; fi
  sleep 0.02
done
"#,
        modules = modules.join(" ")
    )
}

/// Appends `name` after its dependencies (read from the module's `.modinfo`).
fn load_order(
    name: &str,
    by_name: &HashMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) -> Result<(), String> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    let Some(path) = by_name.get(name) else {
        return if builtin.contains(name) {
            Ok(())
        } else {
            Err(format!("the kernel has no module {name}"))
        };
    };
    let bytes = module_bytes(path)?;
    for dep in depends(&bytes) {
        load_order(&dep, by_name, builtin, seen, order)?;
    }
    order.push(name.to_string());
    Ok(())
}

/// The `depends=` list of a module's `.modinfo` section.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = find(ko, key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// A module's ELF bytes (Debian ships plain `.ko`; `.ko.xz` is unpacked with xz).
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    if name.ends_with(".ko") {
        return std::fs::read(path).map_err(|e| format!("read {path:?}: {e}"));
    }
    if name.ends_with(".ko.xz") {
        let out = Command::new("xz")
            .args(["-dc", &name])
            .output()
            .map_err(|e| format!("cannot run xz: {e}"))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
    }
    Err(format!("cannot unpack module {path:?}"))
}

/// Module names listed in the first file called `file` under `dir`.
fn files_named(dir: &Path, file: &str) -> HashSet<String> {
    let mut all = Vec::new();
    walk(dir, &mut all);
    all.iter()
        .filter(|p| p.file_name().is_some_and(|n| n == file))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.rsplit('/').next())
                .map(|n| n.split(".ko").next().unwrap_or(n).replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every regular file under `dir`.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&p, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

/// Every entry under `dir` (directories before their contents), relative to `root`.
fn walk_all(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk_all(root, &p, out);
        }
    }
}

/// Whether an ELF64 executable names a dynamic loader (has a `PT_INTERP` header).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    const PT_INTERP: u32 = 3;
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..count as usize).any(|k| {
        let at = phoff as usize + k * size as usize;
        elf.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes(b.try_into().unwrap()) == PT_INTERP)
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether the QEMU tests are to be skipped (`CONVOY_SKIP_QEMU=1`).
pub fn skip() -> bool {
    std::env::var("CONVOY_SKIP_QEMU").is_ok_and(|v| v == "1")
}

/// The cached guest, after checking QEMU is installed; panics saying what is missing.
pub fn require() -> Guest {
    assert!(
        which("qemu-system-x86_64").is_some(),
        "qemu-system-x86_64 is not installed: run scripts/setup-debian \
         (or set CONVOY_SKIP_QEMU=1 to skip this test)"
    );
    ensure().unwrap_or_else(|e| {
        panic!(
            "cannot build the QEMU test guest: {e}\nIt needs scripts/setup-debian's packages \
             and Debian's package registry (set CONVOY_SKIP_QEMU=1 to skip this test)"
        )
    })
}

/// The highest `GUEST: wrote N` in a serial log.
pub fn highest_reported(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("GUEST: wrote "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

/// A line where the guest reported a failure, if any.
pub fn reported_failure(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("GUEST:") && (l.contains("failed") || l.contains("no /dev/vda")))
        .map(str::to_string)
}

/// Checks that every write `1..=acked` is in `image`: block `i % BLOCKS` starts with
/// `seq{k:08}` for some `k >= i` with `k ≡ i (mod BLOCKS)` (the block's last write; while
/// `acked < BLOCKS`, writes after `acked` land on other blocks, so `k == i`). Returns the
/// failures.
pub fn missing_writes(image: &[u8], acked: u64) -> Vec<String> {
    let mut bad = Vec::new();
    for i in 1..=acked {
        let block = i % BLOCKS;
        let at = (block * BLOCK) as usize;
        let head = image.get(at..at + 11).unwrap_or(&[]);
        let held = std::str::from_utf8(head)
            .ok()
            .and_then(|s| s.strip_prefix("seq"))
            .and_then(|n| n.parse::<u64>().ok());
        let fine =
            held.is_some_and(|k| k >= i && k % BLOCKS == block && (acked >= BLOCKS || k == i));
        if !fine {
            bad.push(format!(
                "write {i}: block {block} holds {:?}",
                String::from_utf8_lossy(head)
            ));
        }
    }
    bad
}

//! Helpers shared by the tests that need a real file system of their own.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses part of it

use std::path::Path;
use std::process::Command;

/// A tmpfs of a given size mounted on a fresh temporary directory, unmounted (and the
/// directory removed) when dropped. Needs root and mount(8); a test that cannot mount
/// fails with a message saying so, never passes silently.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount(8) syntax: `8m`, `1g`).
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Self { dir },
            Ok(o) => panic!(
                "cannot mount a {size} tmpfs on {}: {}; this test needs root (mount -t tmpfs)",
                dir.path().display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("cannot run mount(8): {e}; this test needs root and util-linux"),
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file open: detach it so the directory can go.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

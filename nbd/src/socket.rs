//! Unix sockets that only the hypervisor's group can open.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group};
use tokio::net::UnixListener;

use crate::error::Error;

/// Creates a listening Unix socket at `path` with permission bits `mode` (e.g. `0o660`)
/// and group `group` (a gid; `None` = this process's effective group).
///
/// The socket is bound under a temporary name in the same directory, given its mode and
/// group there, and only then renamed to `path` (replacing a stale socket or file), so no
/// client ever sees it with looser permissions, not even for an instant. Only the
/// permission bits of `mode` (`0o777`) are used. Connecting needs write permission on the
/// socket and search permission on every directory above it, so the directory must be
/// reachable by the group too.
///
/// Must be called inside a tokio runtime (the listener registers with its reactor). Fails
/// with [`Error::Socket`] naming the step: binding (directory missing or not writable,
/// path too long), setting the mode, handing the socket to `group` (an unprivileged process
/// can only choose a group it is a member of), or the rename.
pub fn bind_unix(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, Error> {
    let fail = |step: &str, source: std::io::Error| Error::Socket {
        path: path.to_path_buf(),
        step: step.to_owned(),
        source,
    };
    let tmp = temporary_name(path).ok_or_else(|| {
        fail(
            "bind",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
        )
    })?;
    // A leftover from a crash between bind and rename; it was never published.
    let _ = fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| fail("bind", e))?;
    let restrict = || -> Result<(), Error> {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| fail("set its mode", e))?;
        let gid = group.map_or_else(nix::unistd::getegid, Gid::from_raw);
        nix::unistd::chown(&tmp, None, Some(gid))
            .map_err(|e| fail(&format!("give it to group {gid}"), e.into()))?;
        fs::rename(&tmp, path).map_err(|e| fail("rename it into place", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail("make it non-blocking", e))
    };
    if let Err(e) = restrict() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    UnixListener::from_std(listener).map_err(|e| fail("register it with the runtime", e))
}

/// `.<name>.tmp` next to `path`: the same directory, so the rename is atomic, and a name
/// only a few bytes longer, so it fits the 108-byte socket path limit wherever `path` does.
fn temporary_name(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    Some(path.with_file_name(format!(".{name}.tmp")))
}

/// Resolves a group given by name (`"kvm"`) or by number (`"107"`) to its gid.
///
/// Names are looked up through the system's group database (NSS), so LDAP or systemd
/// groups work too. A number is taken as a gid as-is, whether or not a group has it. Fails
/// with [`Error::UnknownGroup`] for an unknown name or a lookup failure.
pub fn resolve_group(spec: &str) -> Result<u32, Error> {
    let spec = spec.trim();
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        return spec
            .parse()
            .map_err(|_| Error::UnknownGroup(spec.to_owned()));
    }
    match Group::from_name(spec) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(Error::UnknownGroup(spec.to_owned())),
    }
}

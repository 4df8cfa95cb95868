//! The set of exports a server offers, changeable while it runs.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use crate::device::BlockDevice;
use crate::error::Error;
use crate::proto::Limits;

/// Longest export name or description the protocol allows (bytes).
const MAX_STRING: usize = 4096;
/// Largest minimum block size the protocol allows.
const MAX_MIN_BLOCK: u32 = 1 << 16;

/// Named exports, shared by a server and whoever manages disks.
///
/// Cloning is cheap and every clone sees the same set. Exports can be added and removed
/// at any time: a client's handshake sees the set as it is when the client asks, and
/// [`remove`](Self::remove) closes every connection that opened the removed export (see
/// there). Names are looked up exactly; the empty name is the protocol's "default
/// export" and is served only if an export was added under the empty name.
#[derive(Clone, Default)]
pub struct ExportRegistry {
    inner: Arc<RwLock<BTreeMap<String, Entry>>>,
}

struct Entry {
    device: Arc<dyn BlockDevice>,
    description: String,
    /// Dropped when the export is removed; connections wait for that.
    removed: watch::Sender<()>,
}

/// What a connection holds of an export once it picked it.
#[derive(Clone)]
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) device: Arc<dyn BlockDevice>,
    /// Size and flags read from the device once, so the handshake and the request checks
    /// agree for the life of the connection.
    pub(crate) limits: Limits,
    /// Resolves (with an error) once the export is removed from the registry.
    pub(crate) removed: watch::Receiver<()>,
}

impl ExportRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers `device` under `name`, with a human-readable `description` (shown by
    /// `nbdinfo --list`; may be empty).
    ///
    /// Fails with [`Error::ExportExists`] if the name is taken, and with
    /// [`Error::InvalidExport`] if the name or description is over 4,096 bytes or contains
    /// NUL, or the device's `min_block_size` is not a power of two up to 65,536.
    pub fn add(
        &self,
        name: impl Into<String>,
        device: Arc<dyn BlockDevice>,
        description: impl Into<String>,
    ) -> Result<(), Error> {
        let name = name.into();
        let description = description.into();
        let invalid = |reason: &str| Error::InvalidExport {
            name: name.clone(),
            reason: reason.to_owned(),
        };
        if name.len() > MAX_STRING || name.contains('\0') {
            return Err(invalid("the name must be at most 4096 bytes without NUL"));
        }
        if description.len() > MAX_STRING || description.contains('\0') {
            return Err(invalid(
                "the description must be at most 4096 bytes without NUL",
            ));
        }
        let min_block = device.min_block_size();
        if !min_block.is_power_of_two() || min_block > MAX_MIN_BLOCK {
            return Err(invalid("min_block_size must be a power of two up to 65536"));
        }
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(&name) {
            return Err(Error::ExportExists(name));
        }
        let (removed, _) = watch::channel(());
        map.insert(
            name,
            Entry {
                device,
                description,
                removed,
            },
        );
        Ok(())
    }

    /// Serves `device` under `name` to clients that open it from now on, while clients
    /// that opened it before keep the device they have. Returns whether `name` existed
    /// (if not, nothing changes). Convoy uses this for fencing: connections opened before
    /// an epoch bump keep a volume whose writes are refused, instead of being cut.
    pub fn replace(&self, name: &str, device: Arc<dyn BlockDevice>) -> bool {
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(name) {
            Some(entry) => {
                entry.device = device;
                true
            }
            None => false,
        }
    }

    /// Withdraws the export `name`; returns whether it existed.
    ///
    /// New clients no longer see it. Every connection that opened it stops reading
    /// requests, lets the requests already read finish and sends their replies, then
    /// closes. So once all those connections are gone (the caller can wait for the
    /// device's last `Arc` to drop), no request will reach the device any more.
    pub fn remove(&self, name: &str) -> bool {
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        // Dropping the entry drops its watch sender, which wakes the connections.
        map.remove(name).is_some()
    }

    /// The names currently exported, in sorted order.
    pub fn names(&self) -> Vec<String> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        map.keys().cloned().collect()
    }

    /// Whether `name` is currently exported.
    pub fn contains(&self, name: &str) -> bool {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        map.contains_key(name)
    }

    /// How many client connections currently have `name` open (`None` if it is not
    /// exported). A client that is only asking about the export (`NBD_OPT_INFO`) may be
    /// counted for the instant of its question.
    pub fn connection_count(&self, name: &str) -> Option<usize> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        map.get(name).map(|e| e.removed.receiver_count())
    }

    /// `(name, description)` of every export, sorted by name.
    pub(crate) fn list(&self) -> Vec<(String, String)> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .map(|(n, e)| (n.clone(), e.description.clone()))
            .collect()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Export> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        map.get(name).map(|e| Export {
            name: name.to_owned(),
            description: e.description.clone(),
            device: Arc::clone(&e.device),
            limits: Limits {
                size: e.device.size(),
                read_only: e.device.read_only(),
                min_block: e.device.min_block_size(),
            },
            removed: e.removed.subscribe(),
        })
    }
}

impl std::fmt::Debug for ExportRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportRegistry")
            .field("names", &self.names())
            .finish()
    }
}

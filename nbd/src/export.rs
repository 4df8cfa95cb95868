//! The set of exports a server offers, changeable while it runs.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::device::BlockDevice;
use crate::error::Error;
use crate::proto::{Limits, MAX_PAYLOAD};

/// Longest export name or description the protocol allows (bytes).
const MAX_STRING: usize = 4096;
/// Largest minimum block size the protocol allows.
const MAX_MIN_BLOCK: u32 = 1 << 16;

/// Bounds every export of an [`ExportRegistry`] keeps, whichever listeners its clients
/// come through. `Default` gives the values documented on each field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportLimits {
    /// Client connections one export may have open at once (default 16). One more is
    /// refused during the handshake: `NBD_OPT_GO` gets `NBD_REP_ERR_POLICY` (negotiation
    /// goes on, so the client can give up cleanly), `NBD_OPT_EXPORT_NAME`, which has no
    /// error reply, closes the connection. Values below 1 count as 1.
    pub max_connections: usize,
    /// READ and WRITE payload bytes all connections of one export may hold in memory at
    /// once (default 256 MiB). A request that does not fit waits, unread, until earlier
    /// replies have been sent; nothing is allocated for it meanwhile. Values below
    /// [`MAX_PAYLOAD`] count as `MAX_PAYLOAD`, so every valid request fits.
    pub max_in_flight_bytes: u32,
}

impl Default for ExportLimits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            max_in_flight_bytes: 256 << 20,
        }
    }
}

/// Named exports, shared by a server and whoever manages disks.
///
/// Cloning is cheap and every clone sees the same set. Exports can be added and removed
/// at any time: a client's handshake sees the set as it is when the client asks, and
/// [`remove`](Self::remove) closes every connection that opened the removed export (see
/// there). Names are looked up exactly; the empty name is the protocol's "default
/// export" and is served only if an export was added under the empty name.
///
/// Every export gets the registry's [`ExportLimits`], counted over all servers and
/// listeners that serve this registry.
#[derive(Clone, Default)]
pub struct ExportRegistry {
    inner: Arc<RwLock<BTreeMap<String, Entry>>>,
    limits: ExportLimits,
}

struct Entry {
    device: Arc<dyn BlockDevice>,
    description: String,
    /// Dropped when the export is removed; connections wait for that.
    removed: watch::Sender<()>,
    /// One permit per connection that may open the export.
    connections: Arc<Semaphore>,
    /// Payload bytes the export's connections may hold at once.
    budget: Arc<Semaphore>,
}

/// What a connection holds of an export once it picked it.
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) device: Arc<dyn BlockDevice>,
    /// Size and flags read from the device once, so the handshake and the request checks
    /// agree for the life of the connection.
    pub(crate) limits: Limits,
    /// Resolves (with an error) once the export is removed from the registry.
    pub(crate) removed: watch::Receiver<()>,
    /// Payload bytes shared by every connection of the export.
    pub(crate) budget: Arc<Semaphore>,
    /// The connection's place under [`ExportLimits::max_connections`]; `None` for a
    /// client that only asked about the export (`NBD_OPT_INFO`).
    pub(crate) slot: Option<OwnedSemaphorePermit>,
}

/// Why [`ExportRegistry::open`] refused.
pub(crate) enum OpenError {
    /// No export of that name.
    Unknown,
    /// The export has [`ExportLimits::max_connections`] connections already.
    Busy(usize),
}

impl ExportRegistry {
    /// An empty registry with the default [`ExportLimits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry whose exports keep `limits`.
    pub fn with_limits(limits: ExportLimits) -> Self {
        Self {
            inner: Arc::default(),
            limits,
        }
    }

    /// The limits every export of this registry keeps.
    pub fn limits(&self) -> ExportLimits {
        self.limits
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
        let budget = self.limits.max_in_flight_bytes.max(MAX_PAYLOAD) as usize;
        map.insert(
            name,
            Entry {
                device,
                description,
                removed,
                connections: Arc::new(Semaphore::new(self.limits.max_connections.max(1))),
                budget: Arc::new(Semaphore::new(budget)),
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

    /// The export `name`, for a client that only asks about it.
    pub(crate) fn get(&self, name: &str) -> Option<Export> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        map.get(name).map(|e| export(name, e, None))
    }

    /// The export `name` for a client entering transmission: takes one of its connection
    /// slots, held until the returned `Export` is dropped.
    pub(crate) fn open(&self, name: &str) -> Result<Export, OpenError> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let e = map.get(name).ok_or(OpenError::Unknown)?;
        let slot = Arc::clone(&e.connections)
            .try_acquire_owned()
            .map_err(|_| OpenError::Busy(self.limits.max_connections.max(1)))?;
        Ok(export(name, e, Some(slot)))
    }
}

fn export(name: &str, e: &Entry, slot: Option<OwnedSemaphorePermit>) -> Export {
    Export {
        name: name.to_owned(),
        description: e.description.clone(),
        device: Arc::clone(&e.device),
        limits: Limits {
            size: e.device.size(),
            read_only: e.device.read_only(),
            min_block: e.device.min_block_size(),
        },
        removed: e.removed.subscribe(),
        budget: Arc::clone(&e.budget),
        slot,
    }
}

impl std::fmt::Debug for ExportRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportRegistry")
            .field("names", &self.names())
            .finish()
    }
}

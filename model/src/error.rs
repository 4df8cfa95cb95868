//! Why the model refused a command.

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// Why the model refused a command. Messages name the thing and the next step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ModelError {
    /// A name or value is malformed.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// Which input.
        what: String,
        /// What is wrong and what is allowed.
        why: String,
    },
    /// The named object already exists.
    #[error("{kind} '{name}' already exists: pick another name or delete it first")]
    Exists {
        /// Object kind.
        kind: String,
        /// Its name.
        name: String,
    },
    /// The named object does not exist.
    #[error("{kind} '{name}' not found: {}", list_hint(kind))]
    NotFound {
        /// Object kind (`vm`, `cg`, `host`, `replica`, `snapshot`, `migration`, `disk`).
        kind: String,
        /// Its name or id.
        name: String,
    },
    /// A host id was used before and retired.
    #[error("node id {0} was used by a removed node; ids are never reused: choose a new id")]
    HostRetired(NodeId),
    /// A host id is registered with different addresses.
    #[error(
        "node id {0} is already registered with other addresses; remove it first or choose a new id"
    )]
    HostConflict(NodeId),
    /// The object is still in use.
    #[error("{0}")]
    InUse(String),
    /// A compare-and-set found the object in another state than the proposer expected
    /// (another agent acted first, or the proposer's view was stale). Nothing changed.
    #[error("{0}")]
    Stale(String),
}

/// Where an operator lists objects of `kind` (every hint names a command that exists).
fn list_hint(kind: &str) -> String {
    match kind {
        "vm" => "list them with `convoy vm list`".into(),
        "cg" => "list them with `convoy cg list`".into(),
        "host" => "list them with `convoy cluster status`".into(),
        "replica" => "see the group's copies with `convoy cg show GROUP`".into(),
        "snapshot" => "list them with `convoy cg snapshot list GROUP`".into(),
        "migration" => "list them with `convoy migrate list`".into(),
        "disk" => "list them with `convoy disk list`".into(),
        other => format!("check the {other} name"),
    }
}

pub(crate) fn invalid(what: &str, why: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        what: what.into(),
        why: why.into(),
    }
}

pub(crate) fn not_found(kind: &str, name: impl ToString) -> ModelError {
    ModelError::NotFound {
        kind: kind.into(),
        name: name.to_string(),
    }
}

pub(crate) fn stale(why: impl Into<String>) -> ModelError {
    ModelError::Stale(why.into())
}

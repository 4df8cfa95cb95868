//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Unknown keys are refused (a typo must not silently fall back to a default), and every
//! error names the key and says what is expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// `convoy agent --config FILE`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's node id; must match the id in its certificate. Never reuse an id.
    pub node_id: u64,
    /// Where the Raft log, snapshots and disk images live.
    pub data_dir: PathBuf,
    /// Addresses this agent listens on.
    pub listen: ListenConfig,
    /// Addresses other agents and the CLI use to reach this one (default: the listen ones).
    #[serde(default)]
    pub advertise: AdvertiseConfig,
    /// Certificate files.
    pub tls: TlsConfig,
    /// Raft timing and log compaction.
    #[serde(default)]
    pub raft: RaftConfig,
    /// Peers this agent knows at first start (informational for `cluster init --all`).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// NBD exports of this host's disks.
    #[serde(default)]
    pub nbd: NbdConfig,
    /// Replication tuning.
    #[serde(default)]
    pub replication: ReplicationConfig,
}

/// Where disks are exported over NBD.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Directory for one Unix socket per disk (`<dir>/disk-<id>.sock`).
    pub socket_dir: PathBuf,
    /// Optional TCP address serving every export (keep it on loopback unless the
    /// hypervisor is remote: NBD has no authentication).
    pub tcp: Option<SocketAddr>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            socket_dir: PathBuf::from("/run/convoy"),
            tcp: None,
        }
    }
}

/// Replication tuning.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// In-memory journal per group, MiB; a replica further behind resyncs from dirty chunks.
    pub journal_limit_mib: u64,
    /// How long a synchronous write waits for its replica before marking it outdated.
    pub sync_timeout_ms: u64,
    /// How long a host keeps its copy of a group after its replica link was removed, so
    /// re-adding the replica sends only what it lacks (0: delete at the next collection).
    pub keep_former_copies_secs: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            journal_limit_mib: 256,
            sync_timeout_ms: 2_000,
            keep_former_copies_secs: 600,
        }
    }
}

/// Listen addresses.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// UDP address of the QUIC endpoint (Raft, forwarding, data).
    pub raft: SocketAddr,
    /// TCP address of the admin HTTPS API.
    pub admin: SocketAddr,
    /// Optional plain-HTTP address serving only `/metrics` and `/healthz` for Prometheus.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// Advertised addresses.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvertiseConfig {
    /// QUIC address others dial.
    #[serde(default)]
    pub raft: Option<SocketAddr>,
    /// Admin address others (and forwarded CLI calls) use.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
}

/// TLS files (PEM).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate (its URI SAN carries the node id).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Raft tuning. Defaults suit a LAN: a dead leader is replaced in well under a second.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomised election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomised election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, so slow followers catch up from the log.
    pub keep_after_snapshot: u64,
    /// Timeout of one Raft RPC.
    pub rpc_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 50,
            // openraft waits out a leader lease (= the max) before this randomised timeout,
            // so a dead leader is replaced after 300 + 150..300 ms.
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            rpc_timeout_ms: 1_000,
        }
    }
}

/// A peer known at first start.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id.
    pub id: u64,
    /// Its QUIC address.
    pub raft_addr: SocketAddr,
    /// Its admin address.
    pub admin_addr: SocketAddr,
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self> {
        // toml's messages name the key and line ("missing field `node_id`", "unknown field").
        let cfg: AgentConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.node_id == 0 {
            bail!("key `node_id`: must be 1 or more (0 is reserved)");
        }
        if self.data_dir.as_os_str().is_empty() {
            bail!("key `data_dir`: must not be empty");
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            bail!("key `raft.heartbeat_ms`: must be more than 0");
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms {
            bail!(
                "key `raft.election_timeout_min_ms`: must exceed raft.heartbeat_ms ({} <= {})",
                r.election_timeout_min_ms,
                r.heartbeat_ms
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            bail!(
                "key `raft.election_timeout_max_ms`: must exceed raft.election_timeout_min_ms ({} <= {})",
                r.election_timeout_max_ms,
                r.election_timeout_min_ms
            );
        }
        if r.snapshot_every == 0 {
            bail!("key `raft.snapshot_every`: must be more than 0");
        }
        if r.rpc_timeout_ms == 0 {
            bail!("key `raft.rpc_timeout_ms`: must be more than 0");
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.id == 0 {
                bail!("key `peers[{i}].id`: must be 1 or more");
            }
        }
        Ok(())
    }

    /// The QUIC address other agents should dial.
    pub fn advertised_raft(&self) -> SocketAddr {
        self.advertise.raft.unwrap_or(self.listen.raft)
    }

    /// The admin address others should use.
    pub fn advertised_admin(&self) -> SocketAddr {
        self.advertise.admin.unwrap_or(self.listen.admin)
    }

    /// Renders the config as TOML (used by `convoy dev` to write agent configs).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).context("cannot render the agent config as TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_id = 1
data_dir = "/tmp/x"
[listen]
raft = "127.0.0.1:7000"
admin = "127.0.0.1:7001"
[tls]
ca = "ca.crt"
cert = "n.crt"
key = "n.key"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.raft.heartbeat_ms, 50);
        assert_eq!(c.advertised_raft(), "127.0.0.1:7000".parse().unwrap());
        let again = AgentConfig::parse(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again.node_id, 1);
    }

    #[test]
    fn errors_name_the_key() {
        let missing = GOOD.replace("node_id = 1\n", "");
        assert!(format!("{:#}", AgentConfig::parse(&missing).unwrap_err()).contains("node_id"));
        let unknown = GOOD.replace("node_id = 1", "node_id = 1\nnodeid = 2");
        assert!(format!("{:#}", AgentConfig::parse(&unknown).unwrap_err()).contains("nodeid"));
        let bad_addr = GOOD.replace("127.0.0.1:7000", "nonsense");
        assert!(format!("{:#}", AgentConfig::parse(&bad_addr).unwrap_err()).contains("raft"));
        let zero = GOOD.replace("node_id = 1", "node_id = 0");
        assert!(format!("{:#}", AgentConfig::parse(&zero).unwrap_err()).contains("node_id"));
        let timing = format!("{GOOD}\n[raft]\nheartbeat_ms = 500\n");
        assert!(
            format!("{:#}", AgentConfig::parse(&timing).unwrap_err())
                .contains("election_timeout_min_ms")
        );
    }
}

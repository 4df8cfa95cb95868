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
    /// How QEMU guests are run on this host.
    #[serde(default)]
    pub qemu: QemuConfig,
}

/// How this host runs QEMU guests (their files live in `<data_dir>/qemu/`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The QEMU system emulator to run.
    pub binary: String,
    /// How long `vm stop` waits for the guest to power off after an ACPI power-down
    /// before it makes QEMU quit.
    pub powerdown_timeout_ms: u64,
    /// Live migrations of guests leaving this host: the most QEMU's `downtime-limit` (ms)
    /// is raised to, the pause it aims for when it decides the memory has converged.
    pub migrate_downtime_limit_ms: u64,
    /// Live migrations of guests leaving this host: the `downtime-limit` (ms) QEMU starts
    /// with, doubled after each pass over the memory that did not converge, up to
    /// `migrate_downtime_limit_ms`. Starting low leaves little memory for the pause, which
    /// also holds Convoy's storage step (the test guest sent 1.4-7.6 MB while paused at
    /// 300 ms, 2.3 MB at 30 ms); raising it keeps a guest that cannot get there (a busy
    /// one, a capped bandwidth) from never converging.
    pub migrate_downtime_start_ms: u64,
    /// Live migrations of guests leaving this host: QEMU's `max-bandwidth` in MiB/s (0:
    /// QEMU's default).
    pub migrate_max_bandwidth_mib: u64,
    /// Live migrations of guests leaving this host: QEMU's `auto-converge` (throttle a
    /// guest that dirties memory faster than it can be sent).
    pub migrate_auto_converge: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            powerdown_timeout_ms: 30_000,
            migrate_downtime_limit_ms: 300,
            migrate_downtime_start_ms: 30,
            migrate_max_bandwidth_mib: 0,
            migrate_auto_converge: true,
        }
    }
}

impl QemuConfig {
    /// QEMU's parameters for a migration leaving this host.
    pub fn migration_params(&self) -> crate::qemu::migrate::MigrationParams {
        crate::qemu::migrate::MigrationParams {
            downtime_limit_ms: self.migrate_downtime_limit_ms,
            downtime_start_ms: self.migrate_downtime_start_ms,
            max_bandwidth: self.migrate_max_bandwidth_mib << 20,
            auto_converge: self.migrate_auto_converge,
        }
    }
}

/// Where disks are exported over NBD, and who may open them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Directory for one Unix socket per disk (`<dir>/disk-<id>.sock`). Sockets get mode
    /// 0660 and group `socket_group`; the directory must be searchable by that group.
    pub socket_dir: PathBuf,
    /// Group of the Unix sockets: a name (`"kvm"`) or a numeric gid (`"107"`), usually the
    /// hypervisor's. Default: the agent's own group.
    pub socket_group: Option<String>,
    /// Optional TCP address serving every export. Clients must use TLS (NBD STARTTLS) with
    /// an NBD client certificate from the cluster CA (`convoy cert issue-nbd-client`); the
    /// agent presents its node certificate, so clients must reach it by a name or address
    /// that certificate carries (`--san` at issue).
    pub tcp: Option<SocketAddr>,
    /// Serve `tcp` in plaintext, without TLS or any authentication: anyone who can reach
    /// the port can read and write every disk. Only for a loopback address on a host whose
    /// users are all trusted. Default false.
    pub tcp_insecure: bool,
    /// Client connections one export may have open at once, over all sockets (1..=1024;
    /// default 16). One more is refused during the NBD handshake.
    pub max_connections_per_export: usize,
    /// MiB of request payload one export's connections may hold in memory at once
    /// (32..=2048; default 256). Requests beyond it wait, unread.
    pub max_in_flight_mib_per_export: u32,
}

impl Default for NbdConfig {
    fn default() -> Self {
        let limits = convoy_nbd::ExportLimits::default();
        Self {
            socket_dir: PathBuf::from("/run/convoy"),
            socket_group: None,
            tcp: None,
            tcp_insecure: false,
            max_connections_per_export: limits.max_connections,
            max_in_flight_mib_per_export: limits.max_in_flight_bytes >> 20,
        }
    }
}

impl NbdConfig {
    /// The per-export caps, as the NBD server takes them.
    pub fn export_limits(&self) -> convoy_nbd::ExportLimits {
        convoy_nbd::ExportLimits {
            max_connections: self.max_connections_per_export,
            max_in_flight_bytes: self.max_in_flight_mib_per_export.saturating_mul(1 << 20),
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
    /// How long a sequencer back from an unclean stop (a crash, a power cut) waits for a
    /// consistent synchronous replica to send what it holds before going on with its own
    /// copy, which may lack acknowledged writes no FLUSH covered.
    pub crash_pull_wait_secs: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            journal_limit_mib: 256,
            sync_timeout_ms: 2_000,
            keep_former_copies_secs: 600,
            crash_pull_wait_secs: 120,
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
        let n = &self.nbd;
        if !(1..=1024).contains(&n.max_connections_per_export) {
            bail!(
                "key `nbd.max_connections_per_export`: must be 1 to 1024 (got {})",
                n.max_connections_per_export
            );
        }
        if !(32..=2048).contains(&n.max_in_flight_mib_per_export) {
            bail!(
                "key `nbd.max_in_flight_mib_per_export`: must be 32 to 2048 (got {}); 32 MiB is one maximal NBD request",
                n.max_in_flight_mib_per_export
            );
        }
        if matches!(&n.socket_group, Some(g) if g.trim().is_empty()) {
            bail!("key `nbd.socket_group`: must be a group name or gid, or left out");
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
    fn nbd_defaults_to_tls_and_bounded_exports() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert!(!c.nbd.tcp_insecure, "plaintext TCP must be asked for");
        assert_eq!(c.nbd.socket_group, None);
        let limits = c.nbd.export_limits();
        assert_eq!(limits.max_connections, 16);
        assert_eq!(limits.max_in_flight_bytes, 256 << 20);
        let set = format!(
            "{GOOD}\n[nbd]\ntcp = \"127.0.0.1:10809\"\ntcp_insecure = true\nsocket_group = \"kvm\"\nmax_connections_per_export = 4\nmax_in_flight_mib_per_export = 64\n"
        );
        let c = AgentConfig::parse(&set).unwrap();
        assert!(c.nbd.tcp_insecure);
        assert_eq!(c.nbd.socket_group.as_deref(), Some("kvm"));
        assert_eq!(c.nbd.export_limits().max_connections, 4);
        assert_eq!(c.nbd.export_limits().max_in_flight_bytes, 64 << 20);
        for (key, value) in [
            ("max_connections_per_export", "0"),
            ("max_connections_per_export", "100000"),
            ("max_in_flight_mib_per_export", "1"),
            ("max_in_flight_mib_per_export", "1000000"),
            ("socket_group", "\" \""),
        ] {
            let bad = format!("{GOOD}\n[nbd]\n{key} = {value}\n");
            let err = format!("{:#}", AgentConfig::parse(&bad).unwrap_err());
            assert!(err.contains(key), "{key} = {value}: {err}");
        }
    }

    #[test]
    fn the_example_config_parses_with_its_optional_nbd_keys() {
        let example = include_str!("../../deploy/agent.example.toml");
        let c = AgentConfig::parse(example).unwrap();
        assert!(!c.nbd.tcp_insecure);
        let mut all = example.to_string();
        for key in [
            "socket_group",
            "tcp =",
            "tcp_insecure",
            "max_connections_per_export",
            "max_in_flight_mib_per_export",
        ] {
            all = all.replace(&format!("# {key}"), key);
        }
        let c = AgentConfig::parse(&all).unwrap();
        assert_eq!(c.nbd.socket_group.as_deref(), Some("kvm"));
        assert!(c.nbd.tcp.is_some() && !c.nbd.tcp_insecure);
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

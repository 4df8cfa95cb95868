//! Command-line interface: argument definitions and the remote (admin API) commands.
//!
//! Local commands (`agent`, `dev`, `cert`) work on this machine; remote commands talk to
//! any agent through the admin API.

pub mod follow;
pub mod migrate;
pub mod output;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api::types::*;
use crate::client::{AdminClient, parse_addrs};
use output::Output;

/// Convoy: live migration of consistency groups of VMs with an always-safe fail-back copy.
#[derive(Parser, Debug)]
#[command(name = "convoy", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Cmd,
}

/// The commands that run on this machine without the admin API: the admin client's
/// global options do not apply to them, so their help does not list them.
pub const LOCAL_COMMANDS: [&str; 4] = ["agent", "dev", "cert", "completions"];

/// The command tree: [`Cli`]'s, with the global options hidden on [`LOCAL_COMMANDS`] and
/// everything under them. Hidden, not removed: `--addr X` before or after `agent` parsed
/// before and still does (the flags are a contract); it is only not advertised where it
/// does nothing.
pub fn command() -> clap::Command {
    let root = <Cli as clap::CommandFactory>::command();
    // A subcommand that has an argument of a global's id keeps it (clap propagates a global
    // only where its id is missing), and passes its hidden copy on to its own subcommands.
    let hidden: Vec<clap::Arg> = root
        .get_arguments()
        .filter(|a| a.is_global_set())
        .map(|a| a.clone().hide(true))
        .collect();
    LOCAL_COMMANDS.iter().fold(root, |root, name| {
        root.mut_subcommand(*name, |sub| {
            hidden.iter().cloned().fold(sub, |sub, a| sub.arg(a))
        })
    })
}

/// Parses the process's arguments with [`command`] (exits with clap's message and code on
/// bad input or `--help`).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let mut matches = command().get_matches();
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut command()).exit())
}

/// Flags every remote command understands, listed under their own heading in help.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Agent admin address(es), comma-separated IP:PORT or NAME:PORT; the CLI tries them
    /// in order.
    #[arg(
        long,
        env = "CONVOY_ADDR",
        global = true,
        value_name = "HOST:PORT[,HOST:PORT...]"
    )]
    pub addr: Option<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "CONVOY_CA", global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) issued by the cluster CA.
    #[arg(long, env = "CONVOY_CERT", global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "CONVOY_KEY", global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Output format: tables for people, JSON for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
}

/// Output format.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// JSON, stable field names.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the agent daemon (one per host; usually started by systemd).
    Agent {
        /// Path of the agent's TOML config.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a local cluster of agents on 127.0.0.1 for trying Convoy out.
    Dev(crate::dev::DevArgs),
    /// Cluster membership and health.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Consistency groups.
    #[command(subcommand)]
    Cg(CgCmd),
    /// Disks and their copies.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Live migration of a consistency group to another host, with fail-back.
    #[command(subcommand)]
    Migrate(migrate::MigrateCmd),
    /// Certificates: cluster CA, node, admin client and NBD client certificates.
    #[command(subcommand)]
    Cert(crate::certs::CertCmd),
    /// Print a shell completion script, e.g. `convoy completions bash >
    /// /etc/bash_completion.d/convoy`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Initialize a new cluster with the addressed agent as its first voter.
    Init,
    /// Add a node (its agent must be running): it joins as a learner, then becomes a voter.
    AddNode {
        /// The new node's id, as in its certificate; ids of removed nodes cannot be reused.
        #[arg(long)]
        id: u64,
        /// Its QUIC address (IP:PORT).
        #[arg(long, value_name = "IP:PORT")]
        raft_addr: SocketAddr,
        /// Its admin API address (IP:PORT).
        #[arg(long, value_name = "IP:PORT")]
        admin_addr: SocketAddr,
        /// Seconds the new node may take to catch up before the command gives up (1 to 3600).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=crate::api::MAX_CATCH_UP_SECS))]
        timeout: u64,
    },
    /// Remove a node from the cluster; its id is retired for good. Removing a node that
    /// was already removed is an error that says so (exit 1, as `etcdctl member remove`).
    RemoveNode {
        /// The node id.
        id: u64,
    },
    /// Show members, roles, leader and replication progress.
    Status {
        #[command(flatten)]
        watch: follow::WatchArgs,
    },
    /// Show the addressed agent's own Raft state.
    Node,
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create a VM with its disks on a host.
    Create {
        /// VM name (letters, digits, '.', '_', '-').
        name: String,
        /// Node id of the host it runs on.
        #[arg(long)]
        host: u64,
        /// Disk size: a number with an optional unit K, M, G or T, binary as in qemu-img
        /// (1K = 1024; KiB, MiB, GiB, TiB too; no unit: bytes), e.g. 64M or 4GiB; repeat for
        /// more disks. The sizes understood are printed back.
        #[arg(long = "disk", required = true, value_parser = parse_size_arg, value_name = "SIZE")]
        disks: Vec<u64>,
        /// Simulated guest workload: comma-separated KEY=VALUE, e.g.
        /// 'iops=200,size=4k,pattern=random'. Keys (default): iops=N|max writes per second
        /// (100); size=SIZE per write, a multiple of 512 up to 32M (4k);
        /// pattern=random|sequential|hot (random); depth=N writes in flight (1);
        /// span=SIZE written at the start of each disk (whole disk); flush_every=N
        /// flush after N writes, 0 = never (0); seed=N placement seed (random);
        /// fill=SIZE first write every disk once in SIZE requests, as an install would
        /// (no fill). Sizes take K, M, G, T (binary: 1k = 1024).
        #[arg(long, verbatim_doc_comment)]
        workload: Option<String>,
        /// What runs the guest: `qemu` (a real QEMU guest on the disks' exports) or `sim`
        /// (a simulated guest; needs --workload). Default: sim with --workload, else none.
        #[arg(long, value_enum)]
        driver: Option<Driver>,
        #[command(flatten)]
        qemu: QemuArgs,
    },
    /// List VMs.
    List(ReadArgs),
    /// Show one VM and its disks.
    Show {
        /// VM name.
        name: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Delete a VM (it must not be in a consistency group).
    Delete {
        /// VM name.
        name: String,
    },
    /// Start the VM's guest: its simulated guest (--workload) or its QEMU (--driver qemu).
    Start {
        /// VM name.
        name: String,
    },
    /// Stop the VM's guest (QEMU: ACPI power-down, then quit after the host's
    /// `qemu.powerdown_timeout_ms`).
    Stop {
        /// VM name.
        name: String,
    },
    /// Check a copy of the VM's disks against its guest's log of acknowledged writes
    /// (exit 0 only when no acknowledged write is missing or wrong).
    Verify {
        /// VM name.
        name: String,
        #[command(flatten)]
        verify: VerifyArgs,
    },
    /// Move the VM to another host: its guest pauses and drains, its disks' epochs move
    /// (the old host's writers are refused), and it resumes on the destination, whose copy
    /// of the group must be consistent. Its writes then go to the group's primary.
    Move {
        /// VM name.
        name: String,
        /// Destination host: the group's primary or a host with a consistent copy.
        #[arg(long)]
        to: u64,
    },
    /// Bump the epochs of this VM's disks only: writers that opened them before are
    /// refused; other VMs of its group keep writing.
    Fence {
        /// VM name.
        name: String,
    },
}

/// Options of `verify`.
#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Host whose copy to check (default: where the VM runs / the group's primary).
    #[arg(long)]
    pub on: Option<u64>,
    /// Check that the copy is a crash-consistent prefix of the write order (async
    /// replicas) instead of holding every acknowledged write.
    #[arg(long)]
    pub prefix: bool,
}

/// What runs a VM's guest.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// A real QEMU guest.
    Qemu,
    /// A simulated guest (--workload).
    Sim,
}

/// QEMU's accelerator.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelArg {
    /// KVM where it works on the VM's host, TCG otherwise.
    Auto,
    /// KVM only.
    Kvm,
    /// TCG (emulation) only.
    Tcg,
}

/// `vm create` options of a QEMU VM (`--driver qemu`).
#[derive(Args, Debug, Default)]
pub struct QemuArgs {
    /// Guest memory, a whole number of MiB: e.g. 256M or 2GiB (units as for --disk; QEMU
    /// VMs; default 256MiB).
    #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// Virtual CPUs (QEMU VMs; default 1).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Kernel to boot directly (a file on the VM's host; relative paths are made absolute
    /// here).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, value_name = "CMDLINE")]
    pub append: Option<String>,
    /// Accelerator.
    #[arg(long, value_enum)]
    pub accel: Option<AccelArg>,
    /// Raw or qcow2 image to copy into the first disk (through its NBD export, with
    /// `qemu-img convert`; run this on the VM's host).
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
}

impl QemuArgs {
    fn any(&self) -> bool {
        self.memory.is_some()
            || self.cpus.is_some()
            || self.kernel.is_some()
            || self.initrd.is_some()
            || self.append.is_some()
            || self.accel.is_some()
            || self.image.is_some()
    }

    /// The API's QEMU configuration, with paths made absolute and checked here.
    fn spec(&self) -> Result<QemuSpecView> {
        let memory = self.memory.unwrap_or(256 << 20);
        if memory == 0 || memory % (1 << 20) != 0 {
            bail!(
                "--memory {}: give a whole number of MiB, at least 1MiB (e.g. 256MiB)",
                crate::units::format_size(memory)
            );
        }
        let cpus = self.cpus.unwrap_or(1);
        if cpus == 0 {
            bail!("--cpus 0: a VM needs at least one CPU");
        }
        let absolute = |what: &str, p: &Option<PathBuf>| -> Result<Option<String>> {
            let Some(p) = p else { return Ok(None) };
            let abs = if p.is_absolute() {
                p.clone()
            } else {
                std::env::current_dir()
                    .context("cannot read the current directory")?
                    .join(p)
            };
            Ok(Some(
                abs.to_str()
                    .with_context(|| format!("--{what} {}: not UTF-8", p.display()))?
                    .to_string(),
            ))
        };
        Ok(QemuSpecView {
            memory_mib: memory >> 20,
            cpus,
            kernel: absolute("kernel", &self.kernel)?,
            initrd: absolute("initrd", &self.initrd)?,
            append: self.append.clone(),
            accel: match self.accel.unwrap_or(AccelArg::Auto) {
                AccelArg::Auto => "auto",
                AccelArg::Kvm => "kvm",
                AccelArg::Tcg => "tcg",
            }
            .to_string(),
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum CgCmd {
    /// Create a consistency group of VMs running on one host.
    Create {
        /// Group name.
        name: String,
        /// Member VM; repeat for more.
        #[arg(long = "vm", required = true, value_name = "VM")]
        vms: Vec<String>,
    },
    /// List consistency groups.
    List(ReadArgs),
    /// Show one consistency group.
    Show {
        /// Group name.
        name: String,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        watch: follow::WatchArgs,
    },
    /// Delete a consistency group (its VMs stay).
    Delete {
        /// Group name.
        name: String,
    },
    /// Keep a copy of the group on another host, replicated in MODE.
    Replicate {
        /// Group name.
        name: String,
        /// Host for the copy.
        #[arg(long)]
        to: u64,
        /// async, sync, active-active-sync or active-active-async.
        #[arg(long)]
        mode: String,
        /// Wait until the copy is consistent (its first sync done), with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds (replication goes on); no limit if unset.
        #[arg(long, value_name = "SECS", requires = "wait", value_parser = clap::value_parser!(u64).range(1..))]
        timeout: Option<u64>,
    },
    /// Drop the group's copy on a host.
    Unreplicate {
        /// Group name.
        name: String,
        /// Host of the copy.
        #[arg(long)]
        from: u64,
    },
    /// Change the replication mode of the group's copies while guests keep writing.
    SetMode {
        /// Group name.
        name: String,
        /// async, sync, active-active-sync or active-active-async.
        mode: String,
    },
    /// Bump the group's fencing epoch: writers that opened its disks before are refused.
    Fence {
        /// Group name.
        name: String,
    },
    /// Make another host the group's primary: it must hold a consistent copy. Writes pause
    /// briefly, the host takes over ordering them, and the old primary becomes its replica
    /// in the same mode; no data is copied. VMs keep running where they run.
    SwitchPrimary {
        /// Group name.
        name: String,
        /// The new primary.
        #[arg(long)]
        to: u64,
    },
    /// Bring another host's copy of the group up to date: a full copy to an empty copy, or
    /// with --compare only the chunks whose hashes differ. Reports bytes compared vs sent.
    Sync {
        /// Group name.
        name: String,
        /// Destination host.
        #[arg(long)]
        to: u64,
        /// Compare hash trees and send only differing chunks.
        #[arg(long)]
        compare: bool,
    },
    /// Crash-consistent snapshots of the group (taken on its primary).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Check a copy of the whole group against its guests' logs, for one common cut.
    Verify {
        /// Group name.
        name: String,
        #[command(flatten)]
        verify: VerifyArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot: writes pause while the group's disks are copied.
    Create {
        /// Group name.
        cg: String,
        /// Snapshot name.
        name: String,
    },
    /// List the group's snapshots.
    List {
        /// Group name.
        cg: String,
    },
    /// Delete a snapshot.
    Delete {
        /// Group name.
        cg: String,
        /// Snapshot name.
        name: String,
    },
    /// Rewrite the group's disks with a snapshot (guests must be stopped); replicas follow.
    Restore {
        /// Group name.
        cg: String,
        /// Snapshot name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// List disks with the hosts holding their copies.
    List(ReadArgs),
    /// Expose a host's copy of a disk read-only over NBD and print its URI.
    Expose {
        /// Disk id, or VM:INDEX (e.g. web:0).
        disk: String,
        /// Host whose copy to expose.
        #[arg(long)]
        on: u64,
    },
}

/// Read options.
#[derive(Args, Debug, Clone, Default)]
pub struct ReadArgs {
    /// Answer from the addressed node's local state (may be stale; works without a leader).
    #[arg(long)]
    pub local: bool,
}

/// Copies a raw or qcow2 image into a VM's first disk through its export's Unix socket.
async fn import_image(image: &std::path::Path, vm: &VmView) -> Result<()> {
    let disk = vm.disks.first().context("the VM has no disk")?;
    let uri = disk
        .uris
        .iter()
        .find(|u| u.starts_with("nbd+unix://"))
        .with_context(|| {
            format!(
                "node {} did not report disk {}'s NBD socket",
                vm.host, disk.id
            )
        })?;
    let info = tokio::process::Command::new("qemu-img")
        .args(["info", "--output", "json"])
        .arg(image)
        .output()
        .await
        .context("cannot run qemu-img (Debian: qemu-utils)")?;
    if !info.status.success() {
        bail!(
            "qemu-img info {}: {}",
            image.display(),
            String::from_utf8_lossy(&info.stderr).trim()
        );
    }
    let info: serde_json::Value =
        serde_json::from_slice(&info.stdout).context("qemu-img info gave no JSON")?;
    let format = info["format"].as_str().unwrap_or("raw").to_string();
    if !matches!(format.as_str(), "raw" | "qcow2") {
        bail!(
            "{} is a {format} image: --image takes raw or qcow2",
            image.display()
        );
    }
    let size = info["virtual-size"].as_u64().unwrap_or(0);
    if size > disk.size {
        bail!(
            "{} holds {} but the first disk is {}: create the VM with a larger first --disk",
            image.display(),
            crate::units::format_size(size),
            crate::units::format_size(disk.size)
        );
    }
    let out = tokio::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", &format, "-O", "raw"])
        .arg(image)
        .arg(uri)
        .output()
        .await
        .context("cannot run qemu-img (Debian: qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "qemu-img convert into {uri}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s)
}

impl GlobalArgs {
    /// Builds the admin client from the global flags, with messages naming the missing flag.
    pub fn client(&self) -> Result<AdminClient> {
        let addr = self.addr.as_deref().context(
            "no agent address: pass --addr IP:PORT or set CONVOY_ADDR (`convoy dev` prints the export lines)",
        )?;
        let addrs = parse_addrs(addr)?;
        let need = |v: &Option<PathBuf>, flag: &str, env: &str| {
            v.clone()
                .with_context(|| format!("no {flag} given: pass --{flag} FILE or set {env}"))
        };
        AdminClient::from_files(
            addrs,
            &need(&self.ca, "ca", "CONVOY_CA")?,
            &need(&self.cert, "cert", "CONVOY_CERT")?,
            &need(&self.key, "key", "CONVOY_KEY")?,
        )
    }
}

pub(crate) fn read_query(r: &ReadArgs) -> &'static str {
    if r.local { "?local=true" } else { "" }
}

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Runs a cluster command.
pub async fn cluster(global: &GlobalArgs, cmd: ClusterCmd) -> Result<()> {
    let client = global.client()?;
    let out = Output::new(global.output);
    match cmd {
        ClusterCmd::Init => {
            let status: ClusterStatus = client
                .post("/v1/cluster/init", &serde_json::json!({}))
                .await?;
            out.cluster_status(&status)
        }
        ClusterCmd::AddNode {
            id,
            raft_addr,
            admin_addr,
            timeout,
        } => {
            let req = AddNodeRequest {
                id,
                raft_addr: raft_addr.to_string(),
                admin_addr: admin_addr.to_string(),
                timeout_secs: Some(timeout),
            };
            let status: ClusterStatus = client.post("/v1/cluster/nodes", &req).await?;
            out.cluster_status(&status)
        }
        ClusterCmd::RemoveNode { id } => {
            client.delete(&format!("/v1/cluster/nodes/{id}")).await?;
            let message = format!("node {id} removed; its id is retired");
            // The membership it left (a node that just removed itself may not answer).
            match client.get::<ClusterStatus>("/v1/cluster").await {
                Ok(status) => out.done_with(&message, "cluster", &status, Output::cluster_status),
                Err(_) => out.done(&message),
            }
        }
        ClusterCmd::Status { watch } if watch.watch => {
            follow::watch(
                &watch,
                &out,
                "convoy cluster status",
                || client.get::<ClusterStatus>("/v1/cluster"),
                |out, s| out.cluster_status(s),
            )
            .await
        }
        ClusterCmd::Status { .. } => {
            let status: ClusterStatus = client.get("/v1/cluster").await?;
            out.cluster_status(&status)
        }
        ClusterCmd::Node => {
            let status: NodeStatus = client.get("/v1/node").await?;
            out.node_status(&status)
        }
    }
}

/// Runs a VM command.
pub async fn vm(global: &GlobalArgs, cmd: VmCmd) -> Result<()> {
    let client = global.client()?;
    let out = Output::new(global.output);
    match cmd {
        VmCmd::Create {
            name,
            host,
            disks,
            workload,
            driver,
            qemu,
        } => {
            let qemu_spec = match driver {
                Some(Driver::Qemu) => {
                    if workload.is_some() {
                        bail!(
                            "--workload is for simulated guests; a --driver qemu VM runs a real guest"
                        );
                    }
                    if let Some(image) = &qemu.image {
                        std::fs::metadata(image)
                            .with_context(|| format!("--image {}", image.display()))?;
                    }
                    Some(qemu.spec()?)
                }
                Some(Driver::Sim) if workload.is_none() => {
                    bail!("--driver sim needs --workload (what the simulated guest writes)")
                }
                _ if qemu.any() => {
                    bail!(
                        "--memory, --cpus, --kernel, --initrd, --append, --accel and --image need --driver qemu"
                    )
                }
                _ => None,
            };
            let image = qemu.image.clone();
            let req = CreateVmRequest {
                name: name.clone(),
                host,
                disks,
                workload,
                qemu: qemu_spec,
                request_id: Some(new_request_id()),
            };
            let mut vm: VmView = client.post("/v1/vms", &req).await?;
            if vm.state.as_deref() == Some("failed") {
                out.vm(&vm)?;
                let why: Vec<String> = vm
                    .disk_errors
                    .iter()
                    .map(|(d, e)| format!("disk {d}: {e}"))
                    .collect();
                anyhow::bail!(
                    "VM '{}' is in the cluster but node {} could not create its disks ({}); `convoy vm delete {}` and create it again once the host can hold them",
                    vm.name,
                    vm.host,
                    why.join("; "),
                    vm.name
                );
            }
            if let Some(image) = image {
                // The host exports the new disks once it applied the creation.
                let path = format!("/v1/vms/{}", encode_path(&name));
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                loop {
                    vm = client.get(&path).await?;
                    let exported = vm
                        .disks
                        .first()
                        .is_some_and(|d| d.uris.iter().any(|u| u.starts_with("nbd+unix://")));
                    if exported || std::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                import_image(&image, &vm).await.with_context(|| {
                    format!(
                        "VM '{name}' was created but the image was not imported; fix the problem and \
                         run `qemu-img convert -n -O raw IMAGE URI` on node {host}, or `convoy vm delete {name}`",
                    )
                })?;
            }
            if !out.is_json() {
                // The sizes as understood (`--disk 10G` is 10 GiB), before the VM's state.
                let sizes: Vec<String> = vm
                    .disks
                    .iter()
                    .map(|d| crate::units::format_size(d.size))
                    .collect();
                println!(
                    "created VM {} on node {} with {} disk{}: {}",
                    vm.name,
                    vm.host,
                    sizes.len(),
                    if sizes.len() == 1 { "" } else { "s" },
                    sizes.join(", ")
                );
            }
            out.vm(&vm)
        }
        VmCmd::List(r) => {
            let vms: Vec<VmView> = client.get(&format!("/v1/vms{}", read_query(&r))).await?;
            out.vms(&vms)
        }
        VmCmd::Show { name, read } => {
            let vm: VmView = client
                .get(&format!(
                    "/v1/vms/{}{}",
                    encode_path(&name),
                    read_query(&read)
                ))
                .await?;
            out.vm(&vm)
        }
        VmCmd::Delete { name } => {
            client
                .delete(&format!("/v1/vms/{}", encode_path(&name)))
                .await?;
            out.done(&format!("VM '{name}' deleted"))
        }
        VmCmd::Start { name } => {
            let path = format!("/v1/vms/{}/start", encode_path(&name));
            let vm: VmView = client.post(&path, &serde_json::json!({})).await?;
            out.vm(&vm)
        }
        VmCmd::Verify { name, verify } => {
            let path = format!("/v1/vms/{}/verify", encode_path(&name));
            let req = VerifyRequest {
                on: verify.on,
                prefix: verify.prefix,
            };
            let resp: VerifyResponse = client.post(&path, &req).await?;
            out.verified(&resp)
        }
        VmCmd::Stop { name } => {
            let path = format!("/v1/vms/{}/stop", encode_path(&name));
            let vm: VmView = client.post(&path, &serde_json::json!({})).await?;
            out.vm(&vm)
        }
        VmCmd::Move { name, to } => {
            let path = format!("/v1/vms/{}/move", encode_path(&name));
            let moved: MoveVmResponse = client.post(&path, &MoveVmRequest { to }).await?;
            out.moved(&moved)
        }
        VmCmd::Fence { name } => {
            let path = format!("/v1/vms/{}/fence", encode_path(&name));
            let vm: VmView = client.post(&path, &serde_json::json!({})).await?;
            out.vm(&vm)
        }
    }
}

/// Runs a consistency-group command.
pub async fn cg(global: &GlobalArgs, cmd: CgCmd) -> Result<()> {
    let client = global.client()?;
    let out = Output::new(global.output);
    match cmd {
        CgCmd::Create { name, vms } => {
            let req = CreateCgRequest {
                name,
                vms,
                request_id: Some(new_request_id()),
            };
            let cg: CgView = client.post("/v1/cgs", &req).await?;
            out.cg(&cg)
        }
        CgCmd::List(r) => {
            let cgs: Vec<CgView> = client.get(&format!("/v1/cgs{}", read_query(&r))).await?;
            out.cgs(&cgs)
        }
        CgCmd::Show { name, read, watch } => {
            let path = format!("/v1/cgs/{}{}", encode_path(&name), read_query(&read));
            if watch.watch {
                let title = format!("convoy cg show {name}");
                return follow::watch(
                    &watch,
                    &out,
                    &title,
                    || client.get::<CgView>(&path),
                    |out, cg| out.cg(cg),
                )
                .await;
            }
            let cg: CgView = client.get(&path).await?;
            out.cg(&cg)
        }
        CgCmd::Delete { name } => {
            client
                .delete(&format!("/v1/cgs/{}", encode_path(&name)))
                .await?;
            out.done(&format!("consistency group '{name}' deleted"))
        }
        CgCmd::Replicate {
            name,
            to,
            mode,
            wait,
            timeout,
        } => {
            let req = ReplicateRequest { to, mode };
            let path = format!("/v1/cgs/{}/replicas", encode_path(&name));
            let mut cg: CgView = client.post(&path, &req).await?;
            if wait {
                cg = follow::wait_replica(
                    &client,
                    global.output,
                    &name,
                    to,
                    timeout.map(std::time::Duration::from_secs),
                )
                .await?;
            }
            out.cg(&cg)
        }
        CgCmd::Unreplicate { name, from } => {
            client
                .delete(&format!("/v1/cgs/{}/replicas/{from}", encode_path(&name)))
                .await?;
            let message = format!("copy of '{name}' on node {from} dropped");
            // The group it left; the drop is done even if that read fails.
            match client
                .get::<CgView>(&format!("/v1/cgs/{}", encode_path(&name)))
                .await
            {
                Ok(cg) => out.done_with(&message, "cg", &cg, Output::cg),
                Err(_) => out.done(&message),
            }
        }
        CgCmd::SetMode { name, mode } => {
            let path = format!("/v1/cgs/{}/mode", encode_path(&name));
            let cg: CgView = client.post(&path, &SetModeRequest { mode }).await?;
            out.cg(&cg)
        }
        CgCmd::Sync { name, to, compare } => {
            let path = format!("/v1/cgs/{}/sync", encode_path(&name));
            let req = SyncRequest { to, compare };
            let report: crate::data::SyncReport = follow::with_sync_progress(
                global.client()?,
                global.output,
                &name,
                to,
                compare,
                async { client.post(&path, &req).await },
            )
            .await?;
            out.synced(&report)
        }
        CgCmd::Snapshot(cmd) => snapshot(&client, &out, cmd).await,
        CgCmd::Verify { name, verify } => {
            let path = format!("/v1/cgs/{}/verify", encode_path(&name));
            let req = VerifyRequest {
                on: verify.on,
                prefix: verify.prefix,
            };
            let resp: VerifyResponse = client.post(&path, &req).await?;
            out.verified(&resp)
        }
        CgCmd::Fence { name } => {
            let path = format!("/v1/cgs/{}/fence", encode_path(&name));
            let cg: CgView = client.post(&path, &serde_json::json!({})).await?;
            out.cg(&cg)
        }
        CgCmd::SwitchPrimary { name, to } => {
            let path = format!("/v1/cgs/{}/switch-primary", encode_path(&name));
            let resp: SwitchPrimaryResponse =
                client.post(&path, &SwitchPrimaryRequest { to }).await?;
            out.switched(&resp)
        }
    }
}

/// Names are validated server-side; escape anything that would break the URL path.
fn encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Resolves a disk given as an id or `VM:INDEX`.
async fn resolve_disk(client: &AdminClient, text: &str) -> Result<u64> {
    if let Ok(id) = text.parse::<u64>() {
        return Ok(id);
    }
    let (vm, index) = text
        .split_once(':')
        .context("a disk is a number (see `convoy disk list`) or VM:INDEX such as web:0")?;
    let index: u32 = index
        .parse()
        .with_context(|| format!("'{index}' is not a disk index"))?;
    let view: VmView = client.get(&format!("/v1/vms/{}", encode_path(vm))).await?;
    view.disks
        .iter()
        .find(|d| d.index == index)
        .map(|d| d.id)
        .with_context(|| {
            format!(
                "VM '{vm}' has no disk {index} (it has {})",
                view.disks.len()
            )
        })
}

/// Runs a disk command.
pub async fn disk(global: &GlobalArgs, cmd: DiskCmd) -> Result<()> {
    let client = global.client()?;
    let out = Output::new(global.output);
    match cmd {
        DiskCmd::List(r) => {
            let disks: Vec<DiskInfo> = client.get(&format!("/v1/disks{}", read_query(&r))).await?;
            out.disks(&disks)
        }
        DiskCmd::Expose { disk, on } => {
            let id = resolve_disk(&client, &disk).await?;
            let path = format!("/v1/disks/{id}/expose");
            let resp: ExposeResponse = client.post(&path, &ExposeRequest { on }).await?;
            out.exposed(&resp)
        }
    }
}

async fn snapshot(client: &AdminClient, out: &Output, cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Create { cg, name } => {
            let path = format!("/v1/cgs/{}/snapshots", encode_path(&cg));
            let view: SnapshotView = client.post(&path, &SnapshotRequest { name }).await?;
            out.snapshots(std::slice::from_ref(&view))
        }
        SnapshotCmd::List { cg } => {
            let views: Vec<SnapshotView> = client
                .get(&format!("/v1/cgs/{}/snapshots", encode_path(&cg)))
                .await?;
            out.snapshots(&views)
        }
        SnapshotCmd::Delete { cg, name } => {
            client
                .delete(&format!(
                    "/v1/cgs/{}/snapshots/{}",
                    encode_path(&cg),
                    encode_path(&name)
                ))
                .await?;
            let message = format!("snapshot '{name}' of '{cg}' deleted");
            // The snapshots left; the deletion is done even if that read fails.
            match client
                .get::<Vec<SnapshotView>>(&format!("/v1/cgs/{}/snapshots", encode_path(&cg)))
                .await
            {
                Ok(left) => out.done_with(&message, "snapshots", &left, |out, s| out.snapshots(s)),
                Err(_) => out.done(&message),
            }
        }
        SnapshotCmd::Restore { cg, name } => {
            let path = format!(
                "/v1/cgs/{}/snapshots/{}/restore",
                encode_path(&cg),
                encode_path(&name)
            );
            let view: SnapshotView = client.post(&path, &serde_json::json!({})).await?;
            out.snapshots(std::slice::from_ref(&view))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::CommandFactory;

    use super::Cli;

    /// Every `.rs` file under the workspace crates' `src` directories.
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// What is wrong with the command a hint names (the text after "`convoy "), if
    /// anything: each word must be a subcommand until a leaf (or the end), and each
    /// `--flag` one of the leaf's (or a global) flags.
    fn check_hint(hint: &str) -> Result<(), String> {
        let root = Cli::command();
        let mut cmd = &root;
        let mut words = hint.split_whitespace();
        let mut path = vec!["convoy".to_string()];
        while cmd.has_subcommands() {
            // A group alone (`convoy cert`) exists too: it prints its commands.
            let Some(w) = words.next() else {
                return Ok(());
            };
            match cmd.find_subcommand(w) {
                Some(sub) => {
                    cmd = sub;
                    path.push(w.to_string());
                }
                None => return Err(format!("`{} {w}`: no such command", path.join(" "))),
            }
        }
        for w in words {
            if let Some(flag) = w.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap_or(flag);
                let known = cmd
                    .get_arguments()
                    .chain(root.get_arguments())
                    .any(|a| a.get_long() == Some(flag));
                if !known {
                    return Err(format!("`{}` has no flag --{flag}", path.join(" ")));
                }
            }
        }
        Ok(())
    }

    /// Every hint that names a `convoy ...` command, in every crate's sources, names a
    /// command (and flags) the CLI has: an operator told to run something that does not
    /// exist is stuck exactly when they need help.
    #[test]
    fn every_hint_names_a_command_that_exists() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the agent crate is in the workspace");
        let mut files = Vec::new();
        for krate in std::fs::read_dir(workspace)
            .expect("workspace dir")
            .flatten()
        {
            sources(&krate.path().join("src"), &mut files);
        }
        assert!(files.len() > 20, "found only {} source files", files.len());
        let mut checked = 0;
        let mut wrong = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("read a source file");
            // Hints live in the code, not in its unit tests (this one quotes the pattern).
            let code = text.lines().take_while(|l| l.trim() != "#[cfg(test)]");
            for (n, line) in code.enumerate() {
                let mut rest = line;
                while let Some(at) = rest.find("`convoy ") {
                    let after = &rest[at + "`convoy ".len()..];
                    let Some(end) = after.find('`') else { break };
                    let hint = &after[..end];
                    checked += 1;
                    if hint.contains("{kind}") {
                        wrong.push(format!(
                            "{}:{}: `convoy {hint}`: the command depends on the kind",
                            file.display(),
                            n + 1
                        ));
                    } else if let Err(e) = check_hint(hint) {
                        wrong.push(format!("{}:{}: {e}", file.display(), n + 1));
                    }
                    rest = &after[end + 1..];
                }
            }
        }
        assert!(checked > 30, "found only {checked} hints");
        assert!(
            wrong.is_empty(),
            "hints naming no command:\n{}",
            wrong.join("\n")
        );
    }

    #[test]
    fn the_hint_check_refuses_commands_and_flags_that_do_not_exist() {
        assert!(check_hint("cg snapshot list GROUP").is_ok());
        assert!(check_hint("cg replicate shop --to 2 --mode sync").is_ok());
        assert!(check_hint("snapshot list").is_err());
        assert!(check_hint("host list").is_err());
        assert!(check_hint("replica list").is_err());
        assert!(check_hint("cg").is_ok());
        assert!(check_hint("cg replicate shop --into 2").is_err());
    }

    /// `convoy completions SHELL` completes nested subcommands and their flags in each
    /// shell operators use.
    #[test]
    fn completion_scripts_know_nested_commands_and_flags() {
        use clap::CommandFactory;
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "convoy", &mut script);
            let script = String::from_utf8(script).expect("a completion script is text");
            for word in ["switch-primary", "replicate", "interval", "completions"] {
                assert!(script.contains(word), "{shell} completion lacks {word}");
            }
        }
    }

    /// `--help` of the commands that run locally (`agent`, `dev`, `cert ...`,
    /// `completions`) lists only their own options, not the admin client's; remote
    /// commands still list those under their heading; and every spelling that parsed
    /// before still parses, before or after the subcommand.
    #[test]
    fn local_commands_list_only_options_that_apply_and_every_flag_still_parses() {
        use clap::FromArgMatches;
        let help = |args: &[&str]| -> String {
            let e = super::command()
                .try_get_matches_from(["convoy"].iter().chain(args))
                .expect_err("--help ends parsing");
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{e}");
            e.render().to_string()
        };
        for local in [
            &["agent", "--help"][..],
            &["dev", "--help"],
            &["cert", "--help"],
            &["cert", "issue-node", "--help"],
            &["cert", "init-ca", "--help"],
            &["completions", "--help"],
        ] {
            let h = help(local);
            for global in ["Global options", "--addr", "--ca ", "--key", "--output"] {
                assert!(
                    !h.contains(global),
                    "`convoy {}` lists {global}:\n{h}",
                    local.join(" ")
                );
            }
        }
        for remote in [
            &["vm", "create", "--help"][..],
            &["cluster", "status", "--help"],
            &["--help"],
        ] {
            let h = help(remote);
            let (_, global) = h
                .split_once("Global options:")
                .unwrap_or_else(|| panic!("{h}"));
            assert!(
                global.contains("--addr") && global.contains("--output"),
                "{h}"
            );
        }
        for args in [
            &["-o", "json", "--addr", "h:1", "vm", "list"][..],
            &["vm", "list", "-o", "json", "--addr", "h:1"],
            &["--addr", "h:1", "-o", "json", "agent", "--config", "c.toml"],
            &[
                "agent", "--config", "c.toml", "--addr", "h:1", "--output", "json",
            ],
            &[
                "cert",
                "issue-node",
                "--dir",
                "d",
                "--id",
                "1",
                "--addr",
                "h:1",
                "-o",
                "json",
            ],
            &["dev", "--nodes", "1", "--ca", "ca.crt", "-o", "json"],
        ] {
            let m = super::command()
                .try_get_matches_from(["convoy"].iter().chain(args))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let cli = Cli::from_arg_matches(&m).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.global.output, super::Format::Json, "{args:?}");
            if args.contains(&"--addr") {
                assert_eq!(cli.global.addr.as_deref(), Some("h:1"), "{args:?}");
            }
        }
    }

    /// `--help` shows the global options under their own heading, and `vm create --help`
    /// documents every workload key the parser accepts.
    #[test]
    fn help_lists_global_options_apart_and_documents_every_workload_key() {
        let mut root = super::command();
        root.build();
        let create = root
            .find_subcommand_mut("vm")
            .and_then(|vm| vm.find_subcommand_mut("create"))
            .expect("vm create exists");
        let help = create.render_long_help().to_string();
        assert!(help.contains("Global options:"), "{help}");
        let (own, global) = help.split_once("Global options:").expect("heading");
        assert!(
            global.contains("--addr") && !own.contains("--addr"),
            "{help}"
        );
        let parsed: convoy_guest::Workload =
            "iops=5,size=8k,pattern=hot,depth=2,span=1m,flush_every=3,seed=4,fill=1m"
                .parse()
                .expect("every key parses");
        for key in parsed
            .to_string()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
        {
            assert!(
                own.contains(&format!("{}=", key.0)),
                "workload key {} undocumented",
                key.0
            );
        }
    }
}

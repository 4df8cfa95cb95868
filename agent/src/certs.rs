//! `convoy cert`: create the cluster CA and issue node and client certificates.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use convoy_transport::pki::{self, CertAndKeyPem};

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Create a new cluster CA in DIR (ca.crt, ca.key). Keep ca.key offline when you can.
    InitCa {
        /// Directory for the CA files.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// CA common name.
        #[arg(long, default_value = "convoy cluster CA")]
        name: String,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue the certificate of node ID (node-ID.crt, node-ID.key) signed by the CA in DIR.
    IssueNode {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Node id the certificate proves.
        #[arg(long)]
        id: u64,
        /// Extra IP address or DNS name clients use to reach the node's admin API; repeat.
        #[arg(long = "san", value_name = "IP|NAME")]
        sans: Vec<String>,
        /// Where to write the files (default: DIR).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Issue an admin client certificate (client-NAME.crt, client-NAME.key) for the CLI.
    IssueClient {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Client name.
        #[arg(long, default_value = "admin")]
        name: String,
        /// Where to write the files (default: DIR).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// Loads a CA written by `init-ca`.
pub fn load_ca(dir: &Path) -> Result<CertAndKeyPem> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "cannot read {} (create a CA with `convoy cert init-ca --dir {}`)",
                p.display(),
                dir.display()
            )
        })
    };
    Ok(CertAndKeyPem {
        cert_pem: read("ca.crt")?,
        key_pem: read("ca.key")?,
    })
}

/// Creates a CA in `dir` unless one exists (or `force`).
pub fn init_ca(dir: &Path, name: &str, force: bool) -> Result<()> {
    if dir.join("ca.crt").exists() && !force {
        bail!(
            "{} already holds a CA; pass --force to replace it (all issued certificates stop working)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = pki::generate_ca(name)?;
    pki::write_pem_files(dir, "ca", &ca)?;
    Ok(())
}

/// Issues node `id`'s certificate into `out`.
pub fn issue_node(
    ca_dir: &Path,
    id: u64,
    sans: &[String],
    out: &Path,
) -> Result<(PathBuf, PathBuf)> {
    if id == 0 {
        bail!("--id must be 1 or more");
    }
    let ca = load_ca(ca_dir)?;
    let pem = pki::issue_node_cert(&ca, id, sans)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(pki::write_pem_files(out, &format!("node-{id}"), &pem)?)
}

/// Issues client `name`'s certificate into `out`.
pub fn issue_client(ca_dir: &Path, name: &str, out: &Path) -> Result<(PathBuf, PathBuf)> {
    let ca = load_ca(ca_dir)?;
    let pem = pki::issue_client_cert(&ca, name)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(pki::write_pem_files(out, &format!("client-{name}"), &pem)?)
}

/// Runs a `convoy cert` command.
pub fn run(cmd: CertCmd) -> Result<()> {
    match cmd {
        CertCmd::InitCa { dir, name, force } => {
            init_ca(&dir, &name, force)?;
            println!(
                "created CA {}/ca.crt and {}/ca.key",
                dir.display(),
                dir.display()
            );
        }
        CertCmd::IssueNode { dir, id, sans, out } => {
            let (c, k) = issue_node(&dir, id, &sans, out.as_deref().unwrap_or(&dir))?;
            println!("issued node {id}: {} {}", c.display(), k.display());
        }
        CertCmd::IssueClient { dir, name, out } => {
            let (c, k) = issue_client(&dir, &name, out.as_deref().unwrap_or(&dir))?;
            println!("issued client {name}: {} {}", c.display(), k.display());
        }
    }
    Ok(())
}

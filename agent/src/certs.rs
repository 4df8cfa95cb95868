//! `convoy cert`: create the cluster CA and issue node, admin client and NBD client
//! certificates, each with a lifetime (`--days`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use convoy_transport::pki::{self, CertAndKeyPem};

/// Longest `--days` any command accepts (the PKI's own limit).
const MAX_DAYS: u64 = pki::MAX_LIFETIME.as_secs() / 86_400;

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

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
        /// Days the CA stays valid; every certificate it issues ends before it does.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u64).range(1..=MAX_DAYS))]
        days: u64,
    },
    /// Issue the certificate of node ID (node-ID.crt, node-ID.key) signed by the CA in DIR.
    /// Issuing again for the same id replaces the files: that is how a node's certificate
    /// is rotated (then send its agent SIGHUP, or restart it).
    IssueNode {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Node id the certificate proves.
        #[arg(long)]
        id: u64,
        /// Extra IP address or DNS name clients use to reach the node's admin API or its
        /// NBD TCP listener; repeat.
        #[arg(long = "san", value_name = "IP|NAME")]
        sans: Vec<String>,
        /// Where to write the files (default: DIR).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Days the certificate stays valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=MAX_DAYS))]
        days: u64,
        /// Replace an existing node-ID.key/.crt in the output directory (a running agent
        /// may be using them; rotate with --out into a new directory instead).
        #[arg(long)]
        force: bool,
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
        /// Days the certificate stays valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=MAX_DAYS))]
        days: u64,
    },
    /// Issue an NBD client certificate for a hypervisor reaching exports over TCP (TLS),
    /// as the directory QEMU's `tls-creds-x509` and libnbd's `tls-certificates` read:
    /// OUT/ca-cert.pem, OUT/client-cert.pem, OUT/client-key.pem. It opens NBD exports
    /// only, never the admin API or the node transport.
    IssueNbdClient {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Client name (say, the hypervisor host's name).
        #[arg(long)]
        name: String,
        /// Directory to write the three files into (created if needed).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days the certificate stays valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=MAX_DAYS))]
        days: u64,
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

/// Creates a CA in `dir` valid for `lifetime` unless one exists (or `force`).
pub fn init_ca(dir: &Path, name: &str, force: bool, lifetime: Duration) -> Result<()> {
    if dir.join("ca.crt").exists() && !force {
        bail!(
            "{} already holds a CA; pass --force to replace it (all issued certificates stop working)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = pki::generate_ca_valid_for(name, lifetime)?;
    pki::write_pem_files(dir, "ca", &ca)?;
    Ok(())
}

/// Issues node `id`'s certificate, valid for `lifetime`, into `out`.
pub fn issue_node(
    ca_dir: &Path,
    id: u64,
    sans: &[String],
    out: &Path,
    lifetime: Duration,
) -> Result<(PathBuf, PathBuf)> {
    if id == 0 {
        bail!("--id must be 1 or more");
    }
    let ca = load_ca(ca_dir)?;
    let pem = pki::issue_node_cert_valid_for(&ca, id, sans, lifetime)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(pki::write_pem_files(out, &format!("node-{id}"), &pem)?)
}

/// Issues client `name`'s certificate, valid for `lifetime`, into `out`.
pub fn issue_client(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    lifetime: Duration,
) -> Result<(PathBuf, PathBuf)> {
    let ca = load_ca(ca_dir)?;
    let pem = pki::issue_client_cert_valid_for(&ca, name, lifetime)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(pki::write_pem_files(out, &format!("client-{name}"), &pem)?)
}

/// Issues NBD client `name`'s certificate, valid for `lifetime`, as a `tls-creds-x509`
/// directory `out` (`ca-cert.pem` 0644, `client-cert.pem` 0644, `client-key.pem` 0600).
pub fn issue_nbd_client(ca_dir: &Path, name: &str, out: &Path, lifetime: Duration) -> Result<()> {
    let ca = load_ca(ca_dir)?;
    let pem = pki::issue_nbd_client_cert(&ca, name, lifetime)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // Key first: a crash in between leaves a new key with an old certificate, which QEMU
    // reports as a mismatch rather than silently using a stale pair.
    for (file, text, mode) in [
        ("client-key.pem", &pem.key_pem, 0o600),
        ("client-cert.pem", &pem.cert_pem, 0o644),
        ("ca-cert.pem", &ca.cert_pem, 0o644),
    ] {
        let path = out.join(file);
        convoy_codec::file::durable_write_mode(&path, text.as_bytes(), mode)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// `YYYY-MM-DD` of a certificate's notAfter, for messages.
fn valid_until(cert: &Path) -> String {
    let end = std::fs::read_to_string(cert)
        .ok()
        .and_then(|pem| pki::not_after(&pem).ok());
    match end {
        Some(end) => format!("valid until {}", date(end)),
        None => "validity unknown".into(),
    }
}

/// A UTC calendar date (civil-from-days, proleptic Gregorian).
fn date(t: SystemTime) -> String {
    let days = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Runs a `convoy cert` command.
pub fn run(cmd: CertCmd) -> Result<()> {
    match cmd {
        CertCmd::InitCa {
            dir,
            name,
            force,
            days: d,
        } => {
            init_ca(&dir, &name, force, days(d))?;
            println!(
                "created CA {}/ca.crt and {}/ca.key ({})",
                dir.display(),
                dir.display(),
                valid_until(&dir.join("ca.crt"))
            );
        }
        CertCmd::IssueNode {
            dir,
            id,
            sans,
            out,
            days: d,
            force,
        } => {
            let out_dir = out.as_deref().unwrap_or(&dir);
            let key = out_dir.join(format!("node-{id}.key"));
            if key.exists() && !force {
                bail!(
                    "{} exists; pass --force to replace it, or --out DIR to issue into a new directory",
                    key.display()
                );
            }
            let (c, k) = issue_node(&dir, id, &sans, out_dir, days(d))?;
            println!(
                "issued node {id}: {} {} ({})",
                c.display(),
                k.display(),
                valid_until(&c)
            );
        }
        CertCmd::IssueClient {
            dir,
            name,
            out,
            days: d,
        } => {
            let (c, k) = issue_client(&dir, &name, out.as_deref().unwrap_or(&dir), days(d))?;
            println!(
                "issued client {name}: {} {} ({})",
                c.display(),
                k.display(),
                valid_until(&c)
            );
        }
        CertCmd::IssueNbdClient {
            dir,
            name,
            out,
            days: d,
        } => {
            issue_nbd_client(&dir, &name, &out, days(d))?;
            println!(
                "issued NBD client {name} into {} ({}); QEMU: --object tls-creds-x509,id=tls0,dir={},endpoint=client; libnbd: nbds://HOST:PORT/EXPORT?tls-certificates={}",
                out.display(),
                valid_until(&out.join("client-cert.pem")),
                out.display(),
                out.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days_left(cert: &Path) -> u64 {
        let pem = std::fs::read_to_string(cert).unwrap();
        pki::not_after(&pem)
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs()
            / 86_400
    }

    #[test]
    fn every_issuing_command_applies_its_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_ca(d, "test", false, days(100)).unwrap();
        assert_eq!(days_left(&d.join("ca.crt")), 99);
        let (node, _) = issue_node(d, 1, &["127.0.0.1".into()], d, days(30)).unwrap();
        assert_eq!(days_left(&node), 29);
        let (client, _) = issue_client(d, "admin", d, days(7)).unwrap();
        assert_eq!(days_left(&client), 6);
        let nbd = d.join("nbd");
        issue_nbd_client(d, "hv1", &nbd, days(2)).unwrap();
        assert_eq!(days_left(&nbd.join("client-cert.pem")), 1);
        // Longer than the CA: refused, with the reason.
        let err = issue_node(d, 2, &[], d, days(200)).unwrap_err();
        assert!(format!("{err:#}").contains("outlive the CA"), "{err:#}");
    }

    #[test]
    fn nbd_client_directory_is_what_qemu_reads_and_the_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        init_ca(d, "test", false, days(100)).unwrap();
        let out = d.join("qemu");
        issue_nbd_client(d, "hv1", &out, days(10)).unwrap();
        let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("client-key.pem"), 0o600);
        assert_eq!(mode("client-cert.pem"), 0o644);
        assert_eq!(
            std::fs::read_to_string(out.join("ca-cert.pem")).unwrap(),
            std::fs::read_to_string(d.join("ca.crt")).unwrap()
        );
        let id = pki::TlsIdentity::load(
            &out.join("ca-cert.pem"),
            &out.join("client-cert.pem"),
            &out.join("client-key.pem"),
        )
        .unwrap();
        assert_eq!(id.identity(), &pki::PeerIdentity::NbdClient("hv1".into()));
    }

    #[test]
    fn dates_are_rendered_in_utc() {
        assert_eq!(date(SystemTime::UNIX_EPOCH), "1970-01-01");
        assert_eq!(
            date(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29"
        );
        assert_eq!(
            date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_798_675_200)),
            "2026-12-31"
        );
    }
}

//! The cluster's public-key infrastructure: one CA per cluster, one certificate per node
//! and per admin client, and the rustls configurations built from them.
//!
//! Identity lives in exactly one URI subject alternative name per certificate:
//! `urn:convoy:node:<id>` for agents, `urn:convoy:client:<name>` for admin clients,
//! `urn:convoy:nbd:<name>` for hypervisors reaching NBD exports over TCP. Each kind opens
//! one door only: the node transport takes node certificates, the admin API client
//! certificates, NBD over TLS NBD client certificates.
//! Node certificates also carry the DNS name `node-<id>`, the TLS server name used when
//! dialing that node, so rustls itself refuses a server that is not the dialed node.
//!
//! Every configuration built here uses the `ring` crypto provider explicitly and never a
//! process-wide default, trusts only the cluster CA (no web roots), speaks TLS 1.3 only
//! (NBD: TLS 1.2 too, which the NBD spec requires), disables 0-RTT and session resumption,
//! and requires a certificate on both sides.
//!
//! Every certificate has a lifetime chosen at issue ([`DEFAULT_CERT_LIFETIME`] unless the
//! caller says otherwise) and never outlives the CA that signs it.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::Resumption;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use x509_parser::extensions::GeneralName;

const NODE_URN_PREFIX: &str = "urn:convoy:node:";
const CLIENT_URN_PREFIX: &str = "urn:convoy:client:";
const NBD_URN_PREFIX: &str = "urn:convoy:nbd:";
const CONVOY_URN_PREFIX: &str = "urn:convoy:";

const DAY: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a cluster CA: long, because replacing a CA means reissuing every
/// certificate (see the README's rotation procedure).
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of node, admin client and NBD client certificates: one year, so a
/// leaked key stops working on its own; rotate before it ends.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest lifetime any certificate may be given (CA included).
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
/// Certificates start being valid a day in the past so modest clock skew between hosts
/// does not reject a freshly issued certificate.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);

/// Errors of certificate generation, loading and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen could not generate a key or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file that must exist does not.
    #[error(
        "{path} does not exist; create it with the certificate tooling or fix the configured path"
    )]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("cannot read {path}: {source}; check its permissions")]
    Read {
        /// The unreadable file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// A file could not be written durably.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A PEM source contains no `CERTIFICATE` block.
    #[error("no certificate found in {source_name}; expected a PEM `BEGIN CERTIFICATE` block")]
    NoCertificate {
        /// The file path or in-memory source that was read.
        source_name: String,
    },
    /// A PEM source contains no private key block.
    #[error(
        "no private key found in {source_name}; expected a PEM `BEGIN PRIVATE KEY` (PKCS#8, SEC1 or PKCS#1) block"
    )]
    NoKey {
        /// The file path or in-memory source that was read.
        source_name: String,
    },
    /// A PEM source is malformed, or a certificate in it cannot be parsed.
    #[error("{source_name} is not valid: {reason}")]
    BadPem {
        /// The file path or in-memory source that was read.
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error(
        "the key in {key} does not match the certificate in {cert}: {reason}; they must come from the same issuance"
    )]
    KeyMismatch {
        /// Where the certificate came from.
        cert: String,
        /// Where the key came from.
        key: String,
        /// What rustls or rcgen reported.
        reason: String,
    },
    /// The certificate does not chain to the configured CA (or is expired, or lacks the
    /// client-authentication usage every Convoy certificate has).
    #[error(
        "the certificate in {cert} is not valid under the CA in {ca}: {reason}; was it issued by this cluster's CA?"
    )]
    NotIssuedByCa {
        /// Where the certificate came from.
        cert: String,
        /// Where the CA came from.
        ca: String,
        /// What the verifier reported.
        reason: String,
    },
    /// The certificate carries no `urn:convoy:` URI name.
    #[error(
        "certificate carries no Convoy identity (URI SAN `urn:convoy:node:<id>` or `urn:convoy:client:<name>`)"
    )]
    NoIdentity,
    /// The certificate carries more than one `urn:convoy:` URI name.
    #[error("certificate carries several Convoy identities ({0:?}); exactly one is allowed")]
    AmbiguousIdentity(Vec<String>),
    /// A `urn:convoy:` name or an input name is malformed.
    #[error("invalid identity {0:?}")]
    BadIdentity(String),
    /// An extra subject alternative name is neither an IP address nor a valid DNS name.
    #[error("invalid subject alternative name {0:?}: not an IP address nor a DNS name")]
    BadSan(String),
    /// rustls refused to build a configuration.
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    /// [`TlsIdentity::replace_certificate`] was given credentials that cannot stand in for
    /// the running ones (another identity, another CA).
    #[error("cannot switch to the new certificate: {0}")]
    CannotReplace(String),
    /// A requested lifetime is zero, longer than [`MAX_LIFETIME`], or would make the
    /// certificate outlive the CA that signs it.
    #[error("invalid certificate lifetime: {0}")]
    BadLifetime(String),
}

/// A certificate and its private key, both PEM-encoded.
///
/// `Debug` does not print the key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertAndKeyPem {
    /// The certificate, one PEM `CERTIFICATE` block.
    pub cert_pem: String,
    /// The private key, one PEM `PRIVATE KEY` (PKCS#8) block. Secret.
    pub key_pem: String,
}

impl fmt::Debug for CertAndKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAndKeyPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// A Convoy agent with this node id.
    Node(u64),
    /// An admin client (for example the CLI) with this name.
    Client(String),
    /// An NBD client (a hypervisor reaching exports over TCP) with this name; it opens
    /// NBD exports only, never the admin API or the node transport.
    NbdClient(String),
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Node(id) => write!(f, "node {id}"),
            PeerIdentity::Client(name) => write!(f, "client {name:?}"),
            PeerIdentity::NbdClient(name) => write!(f, "NBD client {name:?}"),
        }
    }
}

/// The TLS server name of node `id`: the DNS name its certificate carries and the name a
/// dialer asks rustls to verify.
pub fn node_server_name(id: u64) -> String {
    format!("node-{id}")
}

/// Generates a new self-signed cluster CA named `name`, valid for
/// [`DEFAULT_CA_LIFETIME`]; see [`generate_ca_valid_for`].
pub fn generate_ca(name: &str) -> Result<CertAndKeyPem, PkiError> {
    generate_ca_valid_for(name, DEFAULT_CA_LIFETIME)
}

/// Generates a new self-signed cluster CA named `name` (its common name), valid from a day
/// ago (clock skew) until `lifetime` from now.
///
/// The CA may sign end-entity certificates only (path length 0). Its key is ECDSA P-256.
/// Fails with [`PkiError::BadLifetime`] if `lifetime` is zero or over [`MAX_LIFETIME`].
pub fn generate_ca_valid_for(name: &str, lifetime: Duration) -> Result<CertAndKeyPem, PkiError> {
    check_lifetime(lifetime)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, lifetime);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(CertAndKeyPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues the certificate of node `node_id`, valid for [`DEFAULT_CERT_LIFETIME`]; see
/// [`issue_node_cert_valid_for`].
pub fn issue_node_cert(
    ca: &CertAndKeyPem,
    node_id: u64,
    extra_sans: &[String],
) -> Result<CertAndKeyPem, PkiError> {
    issue_node_cert_valid_for(ca, node_id, extra_sans, DEFAULT_CERT_LIFETIME)
}

/// Issues the certificate of node `node_id`, signed by `ca`, valid from a day ago until
/// `lifetime` from now.
///
/// The certificate carries the URI name `urn:convoy:node:<id>` (its identity), the DNS
/// name `node-<id>` (its QUIC server name), and each of `extra_sans` as an IP address if
/// it parses as one, else as a DNS name (so the admin HTTPS API and NBD over TLS can be
/// reached by address). It is valid for both TLS server and client authentication. Fails
/// with [`PkiError::BadLifetime`] if the lifetime is zero, over [`MAX_LIFETIME`], or
/// would end after the CA's.
pub fn issue_node_cert_valid_for(
    ca: &CertAndKeyPem,
    node_id: u64,
    extra_sans: &[String],
    lifetime: Duration,
) -> Result<CertAndKeyPem, PkiError> {
    let mut sans = vec![
        SanType::URI(ia5(format!("{NODE_URN_PREFIX}{node_id}"))?),
        SanType::DnsName(ia5(node_server_name(node_id))?),
    ];
    for san in extra_sans {
        sans.push(parse_extra_san(san)?);
    }
    issue_leaf(
        ca,
        &format!("convoy node {node_id}"),
        sans,
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        vec![KeyUsagePurpose::DigitalSignature],
        lifetime,
    )
}

/// Issues an admin client certificate named `name`, valid for [`DEFAULT_CERT_LIFETIME`];
/// see [`issue_client_cert_valid_for`].
pub fn issue_client_cert(ca: &CertAndKeyPem, name: &str) -> Result<CertAndKeyPem, PkiError> {
    issue_client_cert_valid_for(ca, name, DEFAULT_CERT_LIFETIME)
}

/// Issues an admin client certificate named `name`, signed by `ca`, valid from a day ago
/// until `lifetime` from now.
///
/// The certificate carries the URI name `urn:convoy:client:<name>` and is valid for TLS
/// client authentication only. `name` must be non-empty and use only ASCII letters,
/// digits, `.`, `_` and `-`. Lifetime rules as in [`issue_node_cert_valid_for`].
pub fn issue_client_cert_valid_for(
    ca: &CertAndKeyPem,
    name: &str,
    lifetime: Duration,
) -> Result<CertAndKeyPem, PkiError> {
    validate_client_name(name)?;
    issue_leaf(
        ca,
        &format!("convoy client {name}"),
        vec![SanType::URI(ia5(format!("{CLIENT_URN_PREFIX}{name}"))?)],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        vec![KeyUsagePurpose::DigitalSignature],
        lifetime,
    )
}

/// Issues an NBD client certificate named `name` (say, the hypervisor host's name),
/// signed by `ca`, valid from a day ago until `lifetime` from now.
///
/// The certificate carries the URI name `urn:convoy:nbd:<name>` and is valid for TLS
/// client authentication only; agents accept it for NBD over TLS and nowhere else.
/// Its key usage includes key encipherment besides digital signature, because QEMU's
/// `tls-creds-x509` refuses to load a client certificate whose (critical) key usage lacks
/// it. Name and lifetime rules as in [`issue_client_cert_valid_for`].
pub fn issue_nbd_client_cert(
    ca: &CertAndKeyPem,
    name: &str,
    lifetime: Duration,
) -> Result<CertAndKeyPem, PkiError> {
    validate_client_name(name)?;
    issue_leaf(
        ca,
        &format!("convoy NBD client {name}"),
        vec![SanType::URI(ia5(format!("{NBD_URN_PREFIX}{name}"))?)],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
        lifetime,
    )
}

/// The instant a PEM certificate (the first in `pem`) stops being valid: its notAfter.
pub fn not_after(pem: &str) -> Result<SystemTime, PkiError> {
    let der = parse_certs(pem.as_bytes(), "certificate")?;
    let first = der.first().ok_or_else(|| PkiError::NoCertificate {
        source_name: "certificate".into(),
    })?;
    not_after_der(first)
}

/// The instant a DER certificate stops being valid: its notAfter.
pub fn not_after_der(der: &CertificateDer<'_>) -> Result<SystemTime, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| PkiError::BadPem {
            source_name: "certificate".into(),
            reason: e.to_string(),
        })?;
    let secs = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn check_lifetime(lifetime: Duration) -> Result<(), PkiError> {
    if lifetime.is_zero() || lifetime > MAX_LIFETIME {
        return Err(PkiError::BadLifetime(format!(
            "{} days; give 1 to {} days",
            lifetime.as_secs() / DAY.as_secs(),
            MAX_LIFETIME.as_secs() / DAY.as_secs()
        )));
    }
    Ok(())
}

/// Reads the Convoy identity from a DER certificate's URI subject alternative names.
///
/// Fails if the certificate cannot be parsed, carries no `urn:convoy:` URI, carries more
/// than one, or the one it carries is malformed. Does not check the signature: call it
/// only on certificates a verifier (rustls, [`TlsIdentity::load`]) has accepted.
pub fn identity_from_cert(der: &CertificateDer<'_>) -> Result<PeerIdentity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| PkiError::BadPem {
            source_name: "peer certificate".into(),
            reason: e.to_string(),
        })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadPem {
            source_name: "peer certificate".into(),
            reason: format!("subject alternative names: {e}"),
        })?;
    let uris: Vec<String> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) if uri.starts_with(CONVOY_URN_PREFIX) => {
                        Some((*uri).to_string())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(PkiError::NoIdentity),
        [uri] => parse_identity_uri(uri),
        _ => Err(PkiError::AmbiguousIdentity(uris)),
    }
}

fn parse_identity_uri(uri: &str) -> Result<PeerIdentity, PkiError> {
    if let Some(id) = uri.strip_prefix(NODE_URN_PREFIX) {
        // Only canonical decimal, so one node id has exactly one spelling.
        let canonical = id == "0"
            || (!id.is_empty() && !id.starts_with('0') && id.bytes().all(|b| b.is_ascii_digit()));
        if let (true, Ok(id)) = (canonical, id.parse()) {
            return Ok(PeerIdentity::Node(id));
        }
    } else if let Some(name) = uri.strip_prefix(CLIENT_URN_PREFIX) {
        if validate_client_name(name).is_ok() {
            return Ok(PeerIdentity::Client(name.to_string()));
        }
    } else if let Some(name) = uri.strip_prefix(NBD_URN_PREFIX) {
        if validate_client_name(name).is_ok() {
            return Ok(PeerIdentity::NbdClient(name.to_string()));
        }
    }
    Err(PkiError::BadIdentity(uri.to_string()))
}

fn validate_client_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadIdentity(name.to_string()))
    }
}

fn ia5(s: String) -> Result<rcgen::Ia5String, PkiError> {
    rcgen::Ia5String::try_from(s.as_str()).map_err(|_| PkiError::BadSan(s))
}

fn parse_extra_san(san: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = san.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // Validate with the same rules rustls applies when verifying, so a name accepted here
    // can actually be used as a server name.
    rustls::pki_types::DnsName::try_from(san).map_err(|_| PkiError::BadSan(san.to_string()))?;
    Ok(SanType::DnsName(ia5(san.to_string())?))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Convoy");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
}

fn issue_leaf(
    ca: &CertAndKeyPem,
    common_name: &str,
    sans: Vec<SanType>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    key_usages: Vec<KeyUsagePurpose>,
    lifetime: Duration,
) -> Result<CertAndKeyPem, PkiError> {
    check_lifetime(lifetime)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| PkiError::BadPem {
        source_name: "CA key".into(),
        reason: e.to_string(),
    })?;
    let ca_params =
        CertificateParams::from_ca_cert_pem(&ca.cert_pem).map_err(|e| PkiError::BadPem {
            source_name: "CA certificate".into(),
            reason: e.to_string(),
        })?;
    check_ca_key(ca, &ca_key)?;
    let ca_end = not_after(&ca.cert_pem)?;
    if SystemTime::now() + lifetime > ca_end {
        let days_left = ca_end
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs()
            / DAY.as_secs();
        return Err(PkiError::BadLifetime(format!(
            "{} days would outlive the CA, which expires in {days_left} days; give a shorter lifetime or rotate the CA first",
            lifetime.as_secs() / DAY.as_secs()
        )));
    }
    // rcgen signs with an issuer `Certificate`; re-signing the parsed CA parameters with
    // the CA key yields one with the same subject and key identifier as the stored CA.
    let issuer = ca_params.self_signed(&ca_key)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = key_usages;
    params.extended_key_usages = ekus;
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, lifetime);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer, &ca_key)?;
    Ok(CertAndKeyPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Refuses to sign with a CA key that does not belong to the CA certificate: the issued
/// certificates would not verify, and the failure would only show much later.
fn check_ca_key(ca: &CertAndKeyPem, ca_key: &KeyPair) -> Result<(), PkiError> {
    let der = parse_certs(ca.cert_pem.as_bytes(), "CA certificate")?;
    let Some(first) = der.first() else {
        return Err(PkiError::NoCertificate {
            source_name: "CA certificate".into(),
        });
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| PkiError::BadPem {
            source_name: "CA certificate".into(),
            reason: e.to_string(),
        })?;
    if cert.public_key().raw != ca_key.public_key_der().as_slice() {
        return Err(PkiError::KeyMismatch {
            cert: "CA certificate".into(),
            key: "CA key".into(),
            reason: "public keys differ".into(),
        });
    }
    Ok(())
}

/// Writes `<dir>/<stem>.crt` (mode 0644) and `<dir>/<stem>.key` (mode 0600) crash-safely,
/// replacing existing files. Returns the two paths (certificate, key).
///
/// Each file is replaced atomically, but the pair is not: after a crash between the two
/// replacements the certificate may be new and the key old. [`TlsIdentity::load`] detects
/// that mismatch; reissue in that case.
pub fn write_pem_files(
    dir: &Path,
    stem: &str,
    pem: &CertAndKeyPem,
) -> Result<(PathBuf, PathBuf), PkiError> {
    if stem.is_empty() || stem.contains('/') {
        return Err(PkiError::BadIdentity(stem.to_string()));
    }
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    // Key first: a crash in between leaves a new key with an old certificate, which load
    // reports as a mismatch rather than silently using a stale pair.
    for (path, bytes, mode) in [
        (&key_path, pem.key_pem.as_bytes(), 0o600),
        (&cert_path, pem.cert_pem.as_bytes(), 0o644),
    ] {
        convoy_codec::file::durable_write_mode(path, bytes, mode).map_err(|source| {
            PkiError::Write {
                path: path.clone(),
                source,
            }
        })?;
    }
    Ok((cert_path, key_path))
}

/// The credentials one party presents and trusts: the cluster CA certificate(s), its own
/// certificate chain and private key, and the identity its certificate proves.
///
/// Constructing one checks that the key matches the certificate, that the certificate
/// chains to the CA and is currently valid, and that it carries a Convoy identity; a
/// `TlsIdentity` that exists is therefore usable. `Debug` does not print the key.
///
/// The configurations built from it ([`server_config`], [`nbd_server_config`],
/// [`client_config`], ...) present its certificate through a shared slot that
/// [`replace_certificate`](Self::replace_certificate) can swap while they are in use;
/// clones share that slot.
pub struct TlsIdentity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: PeerIdentity,
    presented: Arc<CertSlot>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
            presented: Arc::clone(&self.presented),
        }
    }
}

/// The certificate and key that handshakes present, swappable under running
/// configurations (rustls asks it on every handshake).
struct CertSlot(std::sync::RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot").finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("identity", &self.identity)
            .field("ca_certs", &self.ca.len())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// A secret derived from the private key, stable across restarts of the same node.
    /// Keys QUIC stateless resets, so peers of a restarted agent drop their dead
    /// connection to it at once instead of waiting for the idle timeout.
    pub(crate) fn stateless_reset_secret(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"convoy quic stateless reset v1");
        ctx.update(self.key.secret_der());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Loads the CA bundle, certificate chain and private key from PEM files.
    ///
    /// Errors name the file and what is wrong with it: missing, unreadable, no
    /// certificate/key found, malformed, key not matching, not issued by the CA.
    pub fn load(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let ca = read_file(ca_path)?;
        let cert = read_file(cert_path)?;
        let key = read_file(key_path)?;
        Self::build(
            (&ca, &ca_path.display().to_string()),
            (&cert, &cert_path.display().to_string()),
            (&key, &key_path.display().to_string()),
        )
    }

    /// Builds an identity from in-memory PEM text, with the same checks as [`Self::load`].
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        Self::build(
            (ca_pem.as_bytes(), "CA PEM"),
            (cert_pem.as_bytes(), "certificate PEM"),
            (key_pem.as_bytes(), "key PEM"),
        )
    }

    /// The identity this party's certificate proves.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// This party's end-entity certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        // `build` refuses an empty chain.
        &self.chain[0]
    }

    /// The trusted CA certificates.
    pub fn ca_certificates(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// Makes every configuration built from this identity (or a clone) present `new`'s
    /// certificate and key in handshakes from now on: how an agent rotates its certificate
    /// without a restart. Connections already open keep what they negotiated.
    ///
    /// `new` must prove the same identity and trust exactly the same CA certificates
    /// (the running configurations keep trusting the CA they were built with), else
    /// [`PkiError::CannotReplace`] and nothing changes. [`certificate`](Self::certificate)
    /// and the QUIC stateless-reset key keep this value's original certificate and key.
    pub fn replace_certificate(&self, new: &TlsIdentity) -> Result<(), PkiError> {
        if new.identity != self.identity {
            return Err(PkiError::CannotReplace(format!(
                "the new certificate identifies {}, not {}",
                new.identity, self.identity
            )));
        }
        if new.ca != self.ca {
            return Err(PkiError::CannotReplace(
                "the CA file changed; a new CA takes effect only at a restart".into(),
            ));
        }
        let key = new.presented.current();
        *self.presented.0.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }

    fn build(ca: (&[u8], &str), cert: (&[u8], &str), key: (&[u8], &str)) -> Result<Self, PkiError> {
        let (ca_bytes, ca_name) = ca;
        let (cert_bytes, cert_name) = cert;
        let (key_bytes, key_name) = key;

        let ca_certs = parse_certs(ca_bytes, ca_name)?;
        let chain = parse_certs(cert_bytes, cert_name)?;
        let private_key = parse_key(key_bytes, key_name)?;
        let provider = provider();

        let certified = CertifiedKey::from_der(chain.clone(), private_key.clone_key(), &provider)
            .map_err(|e| PkiError::KeyMismatch {
            cert: cert_name.to_string(),
            key: key_name.to_string(),
            reason: e.to_string(),
        })?;

        let roots = root_store(&ca_certs, ca_name)?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider))
                .build()
                .map_err(|e| PkiError::Tls(e.to_string()))?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| PkiError::NotIssuedByCa {
                cert: cert_name.to_string(),
                ca: ca_name.to_string(),
                reason: e.to_string(),
            })?;

        let identity = identity_from_cert(&chain[0])?;
        Ok(Self {
            ca: ca_certs,
            chain,
            key: private_key,
            identity,
            presented: Arc::new(CertSlot(std::sync::RwLock::new(Arc::new(certified)))),
        })
    }

    fn roots(&self) -> Result<RootCertStore, PkiError> {
        root_store(&self.ca, "CA")
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            PkiError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            PkiError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn parse_certs(bytes: &[u8], source_name: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = rustls_pemfile::certs(&mut &bytes[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadPem {
            source_name: source_name.to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            source_name: source_name.to_string(),
        });
    }
    Ok(certs)
}

fn parse_key(bytes: &[u8], source_name: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    match rustls_pemfile::private_key(&mut &bytes[..]) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(PkiError::NoKey {
            source_name: source_name.to_string(),
        }),
        Err(e) => Err(PkiError::BadPem {
            source_name: source_name.to_string(),
            reason: e.to_string(),
        }),
    }
}

fn root_store(
    ca_certs: &[CertificateDer<'static>],
    source_name: &str,
) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in ca_certs {
        roots.add(cert.clone()).map_err(|e| PkiError::BadPem {
            source_name: source_name.to_string(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn alpn_list(alpn: &[&[u8]]) -> Vec<Vec<u8>> {
    alpn.iter().map(|p| p.to_vec()).collect()
}

/// Builds the TLS server configuration of a Convoy agent.
///
/// The server presents `identity`'s certificate and requires every client to present a
/// certificate chaining to the cluster CA; clients without one fail the handshake.
/// Whether the client is a node or an admin client is the caller's decision (read it with
/// [`identity_from_cert`]). Offers exactly the protocols in `alpn`. Used by the QUIC
/// endpoint (ALPN [`crate::ALPN`]) and by the admin HTTPS server (ALPN `http/1.1`).
pub fn server_config(identity: &TlsIdentity, alpn: &[&[u8]]) -> Result<ServerConfig, PkiError> {
    server_config_admitting(identity, alpn, Arc::new(|_: &PeerIdentity| true))
}

/// Like [`server_config`], and the TLS handshake also fails for a client whose
/// certificate chains to the CA but whose identity `admit` refuses (for example a retired
/// node). `admit` is asked on every handshake, so it may change its mind over time; it
/// must be quick (it runs inside the handshake) and must not panic.
pub fn server_config_admitting(
    identity: &TlsIdentity,
    alpn: &[&[u8]],
    admit: Admit,
) -> Result<ServerConfig, PkiError> {
    let provider = Arc::new(provider());
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(identity.roots()?), provider.clone())
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
    let verifier = Arc::new(IdentityVerifier { inner, admit });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity.presented.clone());
    config.alpn_protocols = alpn_list(alpn);
    // 0-RTT data is replayable; Convoy never accepts it.
    config.max_early_data_size = 0;
    // No resumption: every connection runs a full handshake, so every connection carries
    // the peer's certificate and its identity is checked afresh.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Builds the TLS server configuration of an agent's NBD-over-TCP listener.
///
/// The server presents `identity`'s certificate (the node's own: NBD clients must reach
/// it by a name or address the certificate carries) and accepts only clients presenting
/// an NBD client certificate ([`issue_nbd_client_cert`]) that chains to the cluster CA:
/// no certificate, another CA, an expired one, or a node or admin certificate all fail
/// the handshake. Speaks TLS 1.3 and 1.2 (the NBD spec requires 1.2), no ALPN, no
/// resumption, no early data.
pub fn nbd_server_config(identity: &TlsIdentity) -> Result<ServerConfig, PkiError> {
    let provider = Arc::new(provider());
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(identity.roots()?), provider.clone())
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
    let verifier = Arc::new(IdentityVerifier {
        inner,
        admit: Arc::new(|id: &PeerIdentity| matches!(id, PeerIdentity::NbdClient(_))),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity.presented.clone());
    config.max_early_data_size = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Decides, during the TLS handshake, whether a certificate the CA vouches for may in.
pub type Admit = Arc<dyn Fn(&PeerIdentity) -> bool + Send + Sync>;

/// A client verifier that accepts only the identities `admit` lets in, on top of the
/// cluster CA check it wraps; a refused identity fails the TLS handshake itself, before a
/// single byte of the protocol behind it is read.
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    admit: Admit,
}

impl fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityVerifier").finish_non_exhaustive()
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match identity_from_cert(end_entity) {
            Ok(id) if (self.admit)(&id) => Ok(verified),
            Ok(id) => {
                tracing::warn!(identity = %id, "refused a certificate this listener does not admit");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a certificate without a usable identity");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds the TLS client configuration of a Convoy agent or admin client.
///
/// The client trusts only the cluster CA (no web roots), verifies the server name it
/// dials against the server's certificate, presents `identity`'s certificate, and offers
/// exactly the protocols in `alpn`. Used by QUIC dialing and by the admin CLI.
pub fn client_config(identity: &TlsIdentity, alpn: &[&[u8]]) -> Result<ClientConfig, PkiError> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(identity.roots()?)
        .with_client_cert_resolver(identity.presented.clone());
    config.alpn_protocols = alpn_list(alpn);
    config.enable_early_data = false;
    config.resumption = Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    fn der(pem: &CertAndKeyPem) -> CertificateDer<'static> {
        parse_certs(pem.cert_pem.as_bytes(), "test")
            .unwrap()
            .remove(0)
    }

    #[test]
    fn node_identity_round_trips() {
        let ca = generate_ca("test ca").unwrap();
        let node = issue_node_cert(&ca, 42, &[]).unwrap();
        assert_eq!(
            identity_from_cert(&der(&node)).unwrap(),
            PeerIdentity::Node(42)
        );
        let id = TlsIdentity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        assert_eq!(id.identity(), &PeerIdentity::Node(42));
    }

    #[test]
    fn client_identity_round_trips() {
        let ca = generate_ca("test ca").unwrap();
        let client = issue_client_cert(&ca, "admin").unwrap();
        assert_eq!(
            identity_from_cert(&der(&client)).unwrap(),
            PeerIdentity::Client("admin".into())
        );
        let id = TlsIdentity::from_pem(&ca.cert_pem, &client.cert_pem, &client.key_pem).unwrap();
        assert_eq!(id.identity(), &PeerIdentity::Client("admin".into()));
    }

    /// Seconds from now until `pem`'s notAfter (negative if past).
    fn secs_left(pem: &CertAndKeyPem) -> i64 {
        let end = not_after(&pem.cert_pem).unwrap();
        match end.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }

    fn assert_about(pem: &CertAndKeyPem, lifetime: Duration) {
        let left = secs_left(pem);
        let want = lifetime.as_secs() as i64;
        assert!(
            (want - 120..=want).contains(&left),
            "notAfter is {left} s away, wanted about {want} s"
        );
    }

    #[test]
    fn issued_certificates_carry_the_requested_lifetime() {
        let ca = generate_ca_valid_for("test ca", 400 * DAY).unwrap();
        assert_about(&ca, 400 * DAY);
        let node = issue_node_cert_valid_for(&ca, 1, &[], 30 * DAY).unwrap();
        assert_about(&node, 30 * DAY);
        let admin = issue_client_cert_valid_for(&ca, "admin", 7 * DAY).unwrap();
        assert_about(&admin, 7 * DAY);
        let nbd = issue_nbd_client_cert(&ca, "hv1", 2 * DAY).unwrap();
        assert_about(&nbd, 2 * DAY);
        // The defaults: one year for certificates, ten for a CA.
        assert_about(
            &issue_node_cert(&ca, 2, &[]).unwrap(),
            DEFAULT_CERT_LIFETIME,
        );
        assert_about(&issue_client_cert(&ca, "b").unwrap(), DEFAULT_CERT_LIFETIME);
        assert!(DEFAULT_CERT_LIFETIME <= 366 * DAY);
        assert_about(&generate_ca("other").unwrap(), DEFAULT_CA_LIFETIME);
        // Backdated a day for clock skew, and usable now.
        let id = TlsIdentity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        assert_eq!(id.identity(), &PeerIdentity::Node(1));
    }

    #[test]
    fn lifetimes_that_are_zero_too_long_or_outlive_the_ca_are_refused() {
        let ca = generate_ca_valid_for("short ca", 10 * DAY).unwrap();
        for bad in [Duration::ZERO, MAX_LIFETIME + DAY] {
            assert!(matches!(
                generate_ca_valid_for("x", bad),
                Err(PkiError::BadLifetime(_))
            ));
            assert!(matches!(
                issue_client_cert_valid_for(&ca, "a", bad),
                Err(PkiError::BadLifetime(_))
            ));
        }
        let err = issue_node_cert_valid_for(&ca, 1, &[], 20 * DAY).unwrap_err();
        assert!(matches!(err, PkiError::BadLifetime(_)), "{err}");
        assert!(err.to_string().contains("outlive the CA"), "{err}");
        assert!(issue_nbd_client_cert(&ca, "hv", 11 * DAY).is_err());
        assert!(issue_nbd_client_cert(&ca, "hv", 9 * DAY).is_ok());
    }

    #[test]
    fn nbd_client_identity_round_trips_and_allows_key_encipherment_for_qemu() {
        let ca = generate_ca("test ca").unwrap();
        let nbd = issue_nbd_client_cert(&ca, "hv-1", DAY).unwrap();
        assert_eq!(
            identity_from_cert(&der(&nbd)).unwrap(),
            PeerIdentity::NbdClient("hv-1".into())
        );
        let der = der(&nbd);
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(matches!(
            issue_nbd_client_cert(&ca, "a b", DAY),
            Err(PkiError::BadIdentity(_))
        ));
        assert_eq!(
            parse_identity_uri("urn:convoy:nbd:x").unwrap(),
            PeerIdentity::NbdClient("x".into())
        );
    }

    #[test]
    fn bad_client_names_are_refused() {
        let ca = generate_ca("test ca").unwrap();
        for name in ["", "a b", "x/y", "é"] {
            assert!(matches!(
                issue_client_cert(&ca, name),
                Err(PkiError::BadIdentity(_))
            ));
        }
    }

    #[test]
    fn node_cert_carries_server_name_extra_sans_and_both_usages() {
        let ca = generate_ca("test ca").unwrap();
        let node = issue_node_cert(&ca, 7, &["10.1.2.3".into(), "host7.example".into()]).unwrap();
        let der = der(&node);
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            names.contains(&"URI(urn:convoy:node:7)".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"DNSName(node-7)".to_string()), "{names:?}");
        assert!(
            names.contains(&"DNSName(host7.example)".to_string()),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n.starts_with("IPAddress(")),
            "{names:?}"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
    }

    #[test]
    fn bad_extra_san_is_refused() {
        let ca = generate_ca("test ca").unwrap();
        assert!(matches!(
            issue_node_cert(&ca, 1, &["not a name!".into()]),
            Err(PkiError::BadSan(_))
        ));
    }

    #[test]
    fn identity_uri_parsing_is_strict() {
        assert_eq!(
            parse_identity_uri("urn:convoy:node:0").unwrap(),
            PeerIdentity::Node(0)
        );
        for bad in [
            "urn:convoy:node:",
            "urn:convoy:node:01",
            "urn:convoy:node:+1",
            "urn:convoy:node:99999999999999999999999",
            "urn:convoy:client:",
            "urn:convoy:client:a b",
            "urn:convoy:other:1",
        ] {
            assert!(parse_identity_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mismatched_ca_key_is_refused() {
        let ca = generate_ca("a").unwrap();
        let other = generate_ca("b").unwrap();
        let franken = CertAndKeyPem {
            cert_pem: ca.cert_pem.clone(),
            key_pem: other.key_pem,
        };
        assert!(matches!(
            issue_node_cert(&franken, 1, &[]),
            Err(PkiError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn load_reports_missing_and_garbage_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test ca").unwrap();
        let node = issue_node_cert(&ca, 1, &[]).unwrap();
        let (ca_crt, _) = write_pem_files(dir.path(), "ca", &ca).unwrap();
        let (crt, key) = write_pem_files(dir.path(), "node-1", &node).unwrap();

        let id = TlsIdentity::load(&ca_crt, &crt, &key).unwrap();
        assert_eq!(id.identity(), &PeerIdentity::Node(1));

        let missing = dir.path().join("missing.crt");
        let err = TlsIdentity::load(&ca_crt, &missing, &key).unwrap_err();
        assert!(matches!(err, PkiError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("missing.crt"), "{err}");

        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, b"this is not PEM at all\n").unwrap();
        let err = TlsIdentity::load(&ca_crt, &garbage, &key).unwrap_err();
        assert!(matches!(err, PkiError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");
        let err = TlsIdentity::load(&ca_crt, &crt, &garbage).unwrap_err();
        assert!(matches!(err, PkiError::NoKey { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");
        let err = TlsIdentity::load(&garbage, &crt, &key).unwrap_err();
        assert!(matches!(err, PkiError::NoCertificate { .. }), "{err}");

        // A key file holding the certificate, not a key.
        let err = TlsIdentity::load(&ca_crt, &crt, &crt).unwrap_err();
        assert!(matches!(err, PkiError::NoKey { .. }), "{err}");

        // A corrupted base64 body inside a well-formed PEM frame.
        let broken = dir.path().join("broken.crt");
        fs::write(
            &broken,
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = TlsIdentity::load(&ca_crt, &broken, &key).unwrap_err();
        assert!(err.to_string().contains("broken.crt"), "{err}");
    }

    #[test]
    fn load_reports_key_mismatch_and_foreign_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test ca").unwrap();
        let other_ca = generate_ca("other ca").unwrap();
        let node1 = issue_node_cert(&ca, 1, &[]).unwrap();
        let node2 = issue_node_cert(&ca, 2, &[]).unwrap();
        let (ca_crt, _) = write_pem_files(dir.path(), "ca", &ca).unwrap();
        let (other_crt, _) = write_pem_files(dir.path(), "other", &other_ca).unwrap();
        let (crt1, _) = write_pem_files(dir.path(), "n1", &node1).unwrap();
        let (_, key2) = write_pem_files(dir.path(), "n2", &node2).unwrap();
        let err = TlsIdentity::load(&ca_crt, &crt1, &key2).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");

        let (_, key1) = write_pem_files(dir.path(), "n1", &node1).unwrap();
        let err = TlsIdentity::load(&other_crt, &crt1, &key1).unwrap_err();
        assert!(matches!(err, PkiError::NotIssuedByCa { .. }), "{err}");
    }

    #[test]
    fn key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test ca").unwrap();
        let (crt, key) = write_pem_files(dir.path(), "ca", &ca).unwrap();
        assert_eq!(
            fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(crt).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[test]
    fn configs_build_with_alpn_and_without_early_data() {
        let ca = generate_ca("test ca").unwrap();
        let node = issue_node_cert(&ca, 1, &[]).unwrap();
        let id = TlsIdentity::from_pem(&ca.cert_pem, &node.cert_pem, &node.key_pem).unwrap();
        let server = server_config(&id, &[b"http/1.1"]).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert_eq!(server.max_early_data_size, 0);
        let client = client_config(&id, &[crate::ALPN]).unwrap();
        assert!(!client.enable_early_data);
    }
}

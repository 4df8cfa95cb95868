//! HTTPS client of the admin API, used by the CLI, `convoy dev`, tests and benchmarks.
//!
//! It is given every agent address it may use and tries them in order, so the CLI keeps
//! working when a node dies. A connection is kept open between requests (keep-alive), which
//! matters for the benchmarks' request rates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use convoy_transport::pki::{self, TlsIdentity};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use crate::api::types::ErrorBody;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longer than the server's own leader wait, so the server's precise error arrives first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// An error the API returned (as opposed to a failure to reach it).
#[derive(Debug, thiserror::Error)]
#[error("{}", body.error)]
pub struct ApiFailure {
    /// HTTP status.
    pub status: StatusCode,
    /// The error body.
    pub body: ErrorBody,
}

/// Admin API client over a list of agent addresses.
pub struct AdminClient {
    addrs: Vec<SocketAddr>,
    connector: TlsConnector,
    conn: Mutex<Option<(usize, SendRequest<Full<Bytes>>)>>,
}

impl AdminClient {
    /// A client presenting `identity` and trusting only its CA.
    pub fn new(addrs: Vec<SocketAddr>, identity: &TlsIdentity) -> Result<Self> {
        if addrs.is_empty() {
            return Err(anyhow!(
                "no agent address given: pass --addr HOST:PORT or set CONVOY_ADDR"
            ));
        }
        let tls = pki::client_config(identity, &[b"http/1.1"])
            .context("cannot build the TLS client config")?;
        Ok(Self {
            addrs,
            connector: TlsConnector::from(Arc::new(tls)),
            conn: Mutex::new(None),
        })
    }

    /// Loads the identity from PEM files and builds a client.
    pub fn from_files(
        addrs: Vec<SocketAddr>,
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self> {
        let identity = TlsIdentity::load(ca, cert, key)
            .context("cannot load the CLI's TLS files (--ca/--cert/--key)")?;
        Self::new(addrs, &identity)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("cannot connect to {addr}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake with {addr} timed out"))?
            .with_context(|| format!("TLS handshake with {addr} failed (is the agent's certificate from the same CA as --ca?)"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .with_context(|| format!("HTTP handshake with {addr} failed"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends one request, trying each address in turn until one answers. The body of a
    /// successful (2xx) answer is returned; an API error becomes [`ApiFailure`].
    pub async fn send(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes> {
        let mut guard = self.conn.lock().await;
        let start = guard.as_ref().map_or(0, |(i, _)| *i);
        let mut errors = Vec::new();
        for k in 0..self.addrs.len() {
            let i = (start + k) % self.addrs.len();
            let addr = self.addrs[i];
            let mut sender = match guard.take() {
                Some((j, s)) if j == i && !s.is_closed() => s,
                _ => match self.connect(addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        errors.push(format!("{e:#}"));
                        continue;
                    }
                },
            };
            let req = hyper::Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, addr.to_string())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
                .context("cannot build the request")?;
            let exchange = async {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, bytes))
            };
            let (status, bytes) = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
                Err(_) => {
                    errors.push(format!(
                        "{addr}: no answer within {}s",
                        REQUEST_TIMEOUT.as_secs()
                    ));
                    continue;
                }
            };
            *guard = Some((i, sender));
            if status.is_success() {
                return Ok(bytes);
            }
            let body: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                error: format!(
                    "{addr} answered {status}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ),
                code: crate::api::types::ErrorCode::Internal,
            });
            return Err(ApiFailure { status, body }.into());
        }
        Err(anyhow!(
            "cannot reach any agent ({}): {}; is the agent (or `convoy dev`) running, and are --addr/CONVOY_ADDR right?",
            self.addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            errors.join("; ")
        ))
    }

    /// GET and decode JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let bytes = self.send(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer to GET {path}"))
    }

    /// POST JSON and decode JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let bytes = self
            .send(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await?;
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer to POST {path}"))
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(Method::DELETE, path, None).await?;
        Ok(())
    }
}

/// Parses a comma-separated address list (`CONVOY_ADDR`).
pub fn parse_addrs(text: &str) -> Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for s in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            addrs.push(addr);
            continue;
        }
        // A host name: every address it resolves to, in the resolver's order. TLS then
        // checks the address, which the node's certificate must name (`--san`).
        let resolved = std::net::ToSocketAddrs::to_socket_addrs(s).map_err(|e| {
            anyhow!(
                "invalid agent address '{s}': {e} (expected IP:PORT or NAME:PORT, e.g. 127.0.0.1:7401)"
            )
        })?;
        let before = addrs.len();
        addrs.extend(resolved);
        if addrs.len() == before {
            bail!("agent address '{s}' resolves to no address");
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::parse_addrs;

    #[test]
    fn agent_addresses_may_be_host_names() {
        let addrs = parse_addrs("127.0.0.1:7401, localhost:7402").expect("parse");
        assert_eq!(addrs[0].to_string(), "127.0.0.1:7401");
        assert!(
            addrs[1..]
                .iter()
                .all(|a| a.port() == 7402 && a.ip().is_loopback())
        );
        assert!(addrs.len() >= 2, "{addrs:?}");
        let bad = parse_addrs("no-such-host.invalid:7401").expect_err("unresolvable");
        assert!(bad.to_string().contains("no-such-host.invalid"), "{bad}");
        assert!(parse_addrs("127.0.0.1").is_err(), "a port is required");
    }
}

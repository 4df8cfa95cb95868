//! Fixed-newstyle negotiation: moves bytes between the socket and `proto::answer_option`,
//! and upgrades the connection to TLS when the server requires it.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use crate::error::Error;
use crate::export::{Export, ExportRegistry};
use crate::proto::{self, ClientFlags, IHAVEOPT, MAX_OPTION_DATA, Next, OPT_EXPORT_NAME, Tls};

/// How a handshake ended.
pub(crate) enum Opened<S> {
    /// The client entered transmission on `Export` over the plain stream.
    Plain(S, Export),
    /// The client entered transmission on `Export` inside TLS.
    Tls(Box<TlsStream<S>>, Export),
    /// The client aborted the negotiation.
    Closed,
}

/// Runs the whole handshake on `stream`: greeting, options, and, when `tls` is given,
/// the forced upgrade to TLS before any other option is honoured ('FORCEDTLS').
pub(crate) async fn handshake<S>(
    mut stream: S,
    exports: &ExportRegistry,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<Opened<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let flags = greet(&mut stream).await?;
    let Some(config) = tls else {
        return match options(&mut stream, exports, flags, Tls::Off).await? {
            Negotiated::Transmit(export) => Ok(Opened::Plain(stream, export)),
            Negotiated::Aborted => Ok(Opened::Closed),
            // Without TLS, STARTTLS is answered UNSUP and never acknowledged.
            Negotiated::StartTls => Err(Error::TlsRequired),
        };
    };
    // The spec allows TLS only after fixed-newstyle negotiation; such a client cannot
    // reach a server that requires TLS.
    if !flags.fixed_newstyle {
        return Err(Error::TlsRequired);
    }
    match options(&mut stream, exports, flags, Tls::Required).await? {
        Negotiated::StartTls => {}
        Negotiated::Aborted => return Ok(Opened::Closed),
        // Before TLS every way into transmission is refused, so this is not reached.
        Negotiated::Transmit(_) => return Err(Error::TlsRequired),
    }
    let mut stream = TlsAcceptor::from(Arc::clone(config))
        .accept(stream)
        .await
        .map_err(|e| Error::TlsHandshake(e.to_string()))?;
    // The configuration is meant to require a client certificate; checking here as well
    // means a configuration that forgot to cannot open the exports to anyone.
    let certs = stream.get_ref().1.peer_certificates().map_or(0, <[_]>::len);
    if certs == 0 {
        return Err(Error::TlsHandshake(
            "the client presented no certificate".into(),
        ));
    }
    debug!(certificates = certs, "TLS established");
    match options(&mut stream, exports, flags, Tls::Active).await? {
        Negotiated::Transmit(export) => Ok(Opened::Tls(Box::new(stream), export)),
        Negotiated::Aborted => {
            // The client shuts TLS down after ABORT; answer in kind, best effort.
            let _ = stream.shutdown().await;
            Ok(Opened::Closed)
        }
        // A second STARTTLS is answered INVALID and never acknowledged.
        Negotiated::StartTls => Err(Error::TlsRequired),
    }
}

/// Sends the greeting and reads the client's flags.
async fn greet<S>(stream: &mut S) -> Result<ClientFlags, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&proto::greeting()).await?;
    stream.flush().await?;
    proto::client_flags(stream.read_u32().await?).map_err(Error::UnknownClientFlags)
}

/// How option haggling ended.
enum Negotiated {
    Transmit(Export),
    Aborted,
    StartTls,
}

/// Answers options until the client enters transmission, aborts, or (when `tls` is
/// [`Tls::Required`]) asks for TLS. Reads only what each option announces, never ahead,
/// so the TLS handshake that may follow finds its first byte unread.
async fn options<S>(
    stream: &mut S,
    exports: &ExportRegistry,
    flags: ClientFlags,
    tls: Tls,
) -> Result<Negotiated, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let magic = stream.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(Error::BadMagic {
                what: "option",
                got: magic,
            });
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        let answer = if len > MAX_OPTION_DATA {
            if option == OPT_EXPORT_NAME {
                if tls == Tls::Required {
                    return Err(Error::TlsRequired);
                }
                // No name is that long, and this option has no error reply.
                return Err(Error::UnknownExport(format!("<{len}-byte name>")));
            }
            // Skip the data without holding it, so negotiation can go on.
            let skipped = tokio::io::copy(
                &mut (&mut *stream).take(u64::from(len)),
                &mut tokio::io::sink(),
            )
            .await?;
            if skipped != u64::from(len) {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            proto::answer_oversized_option(option, tls)
        } else {
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).await?;
            proto::answer_option(option, &data, exports, flags.no_zeroes, tls)
        };
        stream.write_all(&answer.reply).await?;
        stream.flush().await?;
        match answer.next {
            Next::Continue => {}
            Next::Close => return Ok(Negotiated::Aborted),
            Next::Transmit(export) => return Ok(Negotiated::Transmit(export)),
            Next::StartTls => return Ok(Negotiated::StartTls),
            Next::UnknownExport(name) => return Err(Error::UnknownExport(name)),
            Next::ExportBusy { name, max } => return Err(Error::ExportBusy { name, max }),
            Next::TlsRequired => return Err(Error::TlsRequired),
        }
    }
}

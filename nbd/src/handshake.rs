//! Fixed-newstyle negotiation: moves bytes between the socket and `proto::answer_option`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::export::{Export, ExportRegistry};
use crate::proto::{self, IHAVEOPT, MAX_OPTION_DATA, Next, OPT_EXPORT_NAME};

/// Runs the handshake. `Ok(Some(export))` when the client entered transmission on
/// `export`, `Ok(None)` when it aborted the negotiation.
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    exports: &ExportRegistry,
) -> Result<Option<Export>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&proto::greeting()).await?;
    stream.flush().await?;
    let no_zeroes =
        proto::client_flags(stream.read_u32().await?).map_err(Error::UnknownClientFlags)?;
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
            proto::answer_oversized_option(option)
        } else {
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).await?;
            proto::answer_option(option, &data, exports, no_zeroes)
        };
        stream.write_all(&answer.reply).await?;
        stream.flush().await?;
        match answer.next {
            Next::Continue => {}
            Next::Close => return Ok(None),
            Next::Transmit(export) => return Ok(Some(export)),
            Next::UnknownExport(name) => return Err(Error::UnknownExport(name)),
        }
    }
}

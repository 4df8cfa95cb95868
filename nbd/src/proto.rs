//! The NBD wire format and the server's decisions, free of I/O.
//!
//! Everything here works on byte slices and plain values so that the handshake and the
//! request checks can be tested exhaustively without sockets; `handshake` and
//! `transmission` only move bytes.

use crate::device::Errno;
use crate::export::{Export, ExportRegistry, OpenError};

/// Largest READ or WRITE payload the server accepts, and advertises as the maximum payload
/// in `NBD_INFO_BLOCK_SIZE`: 32 MiB, the size every client may assume without negotiation.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Block size advertised as preferred (unless the device's minimum is larger).
pub(crate) const PREFERRED_BLOCK: u32 = 4096;

/// Longest option payload the server reads into memory. Longer ones are skipped and
/// refused with `NBD_REP_ERR_TOO_BIG` (the longest legitimate one, `NBD_OPT_GO`, is a
/// 4 KiB name plus a few info requests).
pub(crate) const MAX_OPTION_DATA: u32 = 64 << 10;

pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(crate) const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TFLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub(crate) const REP_ERR_POLICY: u32 = 0x8000_0002;
pub(crate) const REP_ERR_INVALID: u32 = 0x8000_0003;
pub(crate) const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub(crate) const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub(crate) const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;

pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Length of a request header on the wire.
pub(crate) const REQUEST_LEN: usize = 28;
/// Length of a simple reply header on the wire.
pub(crate) const REPLY_LEN: usize = 16;

/// The handshake flags the server sends after its magic numbers.
pub(crate) const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// The server's greeting: magic, `IHAVEOPT`, handshake flags.
pub(crate) fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
    g
}

/// The flags a client answered the greeting with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`: the client may negotiate TLS.
    pub(crate) fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub(crate) no_zeroes: bool,
}

/// Checks the client's flags; `Err(unknown bits)` if it set any the server did not offer.
///
/// A client that omits `NBD_FLAG_C_FIXED_NEWSTYLE` is still served with fixed-newstyle
/// replies, which the spec permits (unless TLS is required: see the handshake); oldstyle
/// is never offered.
pub(crate) fn client_flags(flags: u32) -> Result<ClientFlags, u32> {
    let unknown = flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if unknown != 0 {
        return Err(unknown);
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Where a connection stands with TLS; decides how options are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tls {
    /// The server has no TLS ('NOTLS' in the spec): `NBD_OPT_STARTTLS` is unsupported.
    Off,
    /// TLS is required and not yet running ('FORCEDTLS'): only `NBD_OPT_STARTTLS` and
    /// `NBD_OPT_ABORT` are honoured; everything else gets `NBD_REP_ERR_TLS_REQD`.
    Required,
    /// TLS is running; a second `NBD_OPT_STARTTLS` is invalid.
    Active,
}

/// What the handshake does after answering an option.
pub(crate) enum Next {
    /// Read the next option.
    Continue,
    /// Close the connection (after `NBD_OPT_ABORT`).
    Close,
    /// Enter transmission on this export.
    Transmit(Export),
    /// `NBD_OPT_EXPORT_NAME` named no usable export: nothing may be sent, close.
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` named an export at its connection limit: close.
    ExportBusy {
        /// The export.
        name: String,
        /// Its connection limit.
        max: usize,
    },
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires it: close.
    TlsRequired,
    /// `NBD_OPT_STARTTLS` was acknowledged: run the TLS handshake next.
    StartTls,
}

/// The server's answer to one option: bytes to send, then what to do.
pub(crate) struct Answer {
    pub(crate) reply: Vec<u8>,
    pub(crate) next: Next,
}

/// Answers one option whose data is fully in `data`.
pub(crate) fn answer_option(
    option: u32,
    data: &[u8],
    exports: &ExportRegistry,
    no_zeroes: bool,
    tls: Tls,
) -> Answer {
    let mut reply = Vec::new();
    if tls == Tls::Required {
        let next = match option {
            OPT_STARTTLS if data.is_empty() => {
                option_reply(&mut reply, option, REP_ACK, &[]);
                Next::StartTls
            }
            OPT_STARTTLS => {
                option_reply(
                    &mut reply,
                    option,
                    REP_ERR_INVALID,
                    b"NBD_OPT_STARTTLS takes no data",
                );
                Next::Continue
            }
            OPT_ABORT => {
                option_reply(&mut reply, option, REP_ACK, &[]);
                Next::Close
            }
            // It cannot be refused with an error reply; the spec says to end the session.
            OPT_EXPORT_NAME => Next::TlsRequired,
            _ => {
                option_reply(
                    &mut reply,
                    option,
                    REP_ERR_TLS_REQD,
                    b"this server requires TLS with a client certificate: send NBD_OPT_STARTTLS first",
                );
                Next::Continue
            }
        };
        return Answer { reply, next };
    }
    let next = match option {
        OPT_EXPORT_NAME => {
            let name = String::from_utf8_lossy(data).into_owned();
            let opened = match std::str::from_utf8(data) {
                Ok(n) => exports.open(n),
                Err(_) => Err(OpenError::Unknown),
            };
            match opened {
                Ok(export) => {
                    reply.extend_from_slice(&export.limits.size.to_be_bytes());
                    reply.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                    if !no_zeroes {
                        reply.extend_from_slice(&[0u8; 124]);
                    }
                    Next::Transmit(export)
                }
                Err(OpenError::Unknown) => Next::UnknownExport(name),
                Err(OpenError::Busy(max)) => Next::ExportBusy { name, max },
            }
        }
        OPT_STARTTLS if tls == Tls::Active => {
            option_reply(
                &mut reply,
                option,
                REP_ERR_INVALID,
                b"TLS is already running on this connection",
            );
            Next::Continue
        }
        OPT_ABORT => {
            // The spec asks servers to ignore any data sent with ABORT.
            option_reply(&mut reply, option, REP_ACK, &[]);
            Next::Close
        }
        OPT_LIST => {
            if data.is_empty() {
                for (name, description) in exports.list() {
                    let mut body = Vec::with_capacity(4 + name.len() + description.len());
                    body.extend_from_slice(&len32(name.len()).to_be_bytes());
                    body.extend_from_slice(name.as_bytes());
                    body.extend_from_slice(description.as_bytes());
                    option_reply(&mut reply, option, REP_SERVER, &body);
                }
                option_reply(&mut reply, option, REP_ACK, &[]);
            } else {
                option_reply(
                    &mut reply,
                    option,
                    REP_ERR_INVALID,
                    b"NBD_OPT_LIST takes no data",
                );
            }
            Next::Continue
        }
        OPT_INFO | OPT_GO => answer_info(&mut reply, option, data, exports),
        _ => {
            // STARTTLS on a server without TLS, STRUCTURED_REPLY, meta contexts, extended
            // headers and anything unknown: the client falls back to the baseline protocol.
            option_reply(
                &mut reply,
                option,
                REP_ERR_UNSUP,
                b"option not supported by this server",
            );
            Next::Continue
        }
    };
    Answer { reply, next }
}

/// The answer to an option whose data was too long to read; it was skipped.
pub(crate) fn answer_oversized_option(option: u32, tls: Tls) -> Answer {
    let mut reply = Vec::new();
    if tls == Tls::Required && option != OPT_STARTTLS && option != OPT_ABORT {
        // Before TLS, the spec allows no other error for these options.
        option_reply(
            &mut reply,
            option,
            REP_ERR_TLS_REQD,
            b"this server requires TLS with a client certificate: send NBD_OPT_STARTTLS first",
        );
    } else {
        option_reply(
            &mut reply,
            option,
            REP_ERR_TOO_BIG,
            b"option data too long for this server",
        );
    }
    Answer {
        reply,
        next: Next::Continue,
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: name, then a list of requested info types.
fn answer_info(reply: &mut Vec<u8>, option: u32, data: &[u8], exports: &ExportRegistry) -> Next {
    let Some((name, requests)) = parse_info_request(data) else {
        option_reply(
            reply,
            option,
            REP_ERR_INVALID,
            b"malformed NBD_OPT_INFO/NBD_OPT_GO data",
        );
        return Next::Continue;
    };
    let found = match std::str::from_utf8(name) {
        // Only GO enters transmission, so only GO takes a connection slot.
        Ok(n) if option == OPT_GO => exports.open(n),
        Ok(n) => exports.get(n).ok_or(OpenError::Unknown),
        Err(_) => Err(OpenError::Unknown),
    };
    let export = match found {
        Ok(export) => export,
        Err(OpenError::Unknown) => {
            let msg = format!(
                "export {:?} does not exist; NBD_OPT_LIST shows the exports",
                String::from_utf8_lossy(name)
            );
            option_reply(reply, option, REP_ERR_UNKNOWN, msg.as_bytes());
            return Next::Continue;
        }
        Err(OpenError::Busy(max)) => {
            let msg = format!(
                "export {:?} already has {max} connections, its limit; close one and retry",
                String::from_utf8_lossy(name)
            );
            option_reply(reply, option, REP_ERR_POLICY, msg.as_bytes());
            return Next::Continue;
        }
    };
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.limits.size.to_be_bytes());
    info.extend_from_slice(&transmission_flags(&export).to_be_bytes());
    option_reply(reply, option, REP_INFO, &info);

    let wants = |t: u16| requests.clone().any(|r| r == t);
    if wants(INFO_NAME) {
        let mut body = INFO_NAME.to_be_bytes().to_vec();
        body.extend_from_slice(export.name.as_bytes());
        option_reply(reply, option, REP_INFO, &body);
    }
    if wants(INFO_DESCRIPTION) && !export.description.is_empty() {
        let mut body = INFO_DESCRIPTION.to_be_bytes().to_vec();
        body.extend_from_slice(export.description.as_bytes());
        option_reply(reply, option, REP_INFO, &body);
    }
    if wants(INFO_BLOCK_SIZE) {
        let min = export.limits.min_block;
        let mut body = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        body.extend_from_slice(&min.to_be_bytes());
        body.extend_from_slice(&PREFERRED_BLOCK.max(min).to_be_bytes());
        body.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        option_reply(reply, option, REP_INFO, &body);
    }
    option_reply(reply, option, REP_ACK, &[]);
    if option == OPT_GO {
        Next::Transmit(export)
    } else {
        Next::Continue
    }
}

/// Splits INFO/GO data into the name and the requested info types; `None` if the lengths
/// do not add up exactly.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], impl Iterator<Item = u16> + Clone + '_)> {
    let name_len = usize::try_from(u32::from_be_bytes(data.get(..4)?.try_into().ok()?)).ok()?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    Some((
        name,
        list.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]])),
    ))
}

/// Appends one fixed-newstyle option reply.
fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&len32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Lengths here are bounded by `MAX_STRING`-sized names and short messages.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The transmission flags for an export.
///
/// `CAN_MULTI_CONN` is always set: the [`BlockDevice`](crate::BlockDevice) contract makes a
/// flush cover writes acknowledged on every connection. Writable exports also get FUA,
/// TRIM and WRITE_ZEROES; read-only ones keep FLUSH (harmless, and some clients expect it).
pub(crate) fn transmission_flags(export: &Export) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if export.limits.read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    flags
}

/// A request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestHeader {
    pub(crate) flags: u16,
    pub(crate) kind: u16,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl RequestHeader {
    /// Decodes a header; `Err(magic)` if the magic is wrong.
    pub(crate) fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, u32> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Encodes a header (used by tests and clients).
    #[cfg(test)]
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// How many payload bytes follow this header: the length of a WRITE, else 0.
    /// `Err(len)` for a WRITE over [`MAX_PAYLOAD`], whose payload cannot be skipped safely.
    pub(crate) fn payload_len(&self) -> Result<u32, u32> {
        match self.kind {
            CMD_WRITE if self.len > MAX_PAYLOAD => Err(self.len),
            CMD_WRITE => Ok(self.len),
            _ => Ok(0),
        }
    }
}

/// What the device is asked to do for a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    },
    Disconnect,
}

/// The export's shape as a connection saw it at the end of the handshake.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) min_block: u32,
}

/// Decides whether a request may reach the device.
///
/// Any `Err` is the error reply; the device is not called. Writes, trims and zeroing of a
/// read-only export get `EPERM`; ranges past the end (or whose end overflows) get
/// `ENOSPC` for WRITE and WRITE_ZEROES and `EINVAL` for READ and TRIM, as the spec
/// recommends; unknown commands or flags, misaligned ranges, READs over
/// [`MAX_PAYLOAD`] and FLUSH with a range get `EINVAL`.
pub(crate) fn check(h: &RequestHeader, limits: &Limits) -> Result<Command, Errno> {
    let allowed_flags = match h.kind {
        // DISC has no reply, so nothing to refuse: always honour it.
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        // FUA is valid on every command; it only matters for the ones that write.
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        _ => return Err(Errno::Invalid),
    };
    if h.flags & !allowed_flags != 0 {
        return Err(Errno::Invalid);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && limits.read_only {
        return Err(Errno::Perm);
    }
    let (offset, len) = (h.offset, h.len);
    match h.kind {
        CMD_FLUSH => {
            if offset != 0 || len != 0 {
                return Err(Errno::Invalid);
            }
            Ok(Command::Flush)
        }
        CMD_READ => {
            if len > MAX_PAYLOAD {
                return Err(Errno::Invalid);
            }
            in_range(offset, len, limits, Errno::Invalid)?;
            Ok(Command::Read { offset, len })
        }
        CMD_WRITE => {
            in_range(offset, len, limits, Errno::NoSpace)?;
            Ok(Command::Write { offset, fua })
        }
        CMD_TRIM => {
            in_range(offset, len, limits, Errno::Invalid)?;
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_WRITE_ZEROES => {
            in_range(offset, len, limits, Errno::NoSpace)?;
            Ok(Command::WriteZeroes {
                offset,
                len,
                fua,
                may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
            })
        }
        // Every other kind returned above.
        _ => Err(Errno::Invalid),
    }
}

fn in_range(offset: u64, len: u32, limits: &Limits, past_end: Errno) -> Result<(), Errno> {
    let block = u64::from(limits.min_block.max(1));
    if offset % block != 0 || u64::from(len) % block != 0 {
        return Err(Errno::Invalid);
    }
    match offset.checked_add(u64::from(len)) {
        Some(end) if end <= limits.size => Ok(()),
        _ => Err(past_end),
    }
}

/// A simple reply header.
pub(crate) fn simple_reply(cookie: u64, error: u32) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        min_block: 1,
    };

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn header_round_trips_and_bad_magic_is_refused() {
        let h = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[0] ^= 1;
        assert!(RequestHeader::decode(&b).is_err());
    }

    #[test]
    fn writes_past_the_end_get_enospc_and_reads_einval() {
        let size = LIMITS.size;
        assert_eq!(
            check(&req(CMD_WRITE, 0, size, 1), &LIMITS),
            Err(Errno::NoSpace)
        );
        assert_eq!(
            check(&req(CMD_WRITE_ZEROES, 0, size - 1, 2), &LIMITS),
            Err(Errno::NoSpace)
        );
        assert_eq!(
            check(&req(CMD_READ, 0, size, 1), &LIMITS),
            Err(Errno::Invalid)
        );
        assert_eq!(
            check(&req(CMD_TRIM, 0, size, 1), &LIMITS),
            Err(Errno::Invalid)
        );
        // The end overflows u64: must be refused, not wrapped.
        assert_eq!(
            check(&req(CMD_WRITE, 0, u64::MAX, 2), &LIMITS),
            Err(Errno::NoSpace)
        );
        assert_eq!(
            check(&req(CMD_READ, 0, u64::MAX - 1, 4), &LIMITS),
            Err(Errno::Invalid)
        );
        // Exactly up to the end is fine.
        assert_eq!(
            check(&req(CMD_WRITE, 0, size - 512, 512), &LIMITS),
            Ok(Command::Write {
                offset: size - 512,
                fua: false
            })
        );
    }

    #[test]
    fn read_only_export_refuses_every_kind_of_write_with_eperm() {
        let ro = Limits {
            read_only: true,
            ..LIMITS
        };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(check(&req(kind, 0, 0, 512), &ro), Err(Errno::Perm));
        }
        assert!(check(&req(CMD_READ, 0, 0, 512), &ro).is_ok());
        assert_eq!(check(&req(CMD_FLUSH, 0, 0, 0), &ro), Ok(Command::Flush));
    }

    #[test]
    fn unknown_commands_and_flags_get_einval() {
        assert_eq!(check(&req(5, 0, 0, 512), &LIMITS), Err(Errno::Invalid)); // CACHE
        assert_eq!(check(&req(7, 0, 0, 512), &LIMITS), Err(Errno::Invalid)); // BLOCK_STATUS
        assert_eq!(check(&req(99, 0, 0, 512), &LIMITS), Err(Errno::Invalid));
        assert_eq!(
            check(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), &LIMITS),
            Err(Errno::Invalid)
        );
        assert_eq!(
            check(&req(CMD_READ, 1 << 2, 0, 512), &LIMITS),
            Err(Errno::Invalid)
        ); // DF
        assert_eq!(
            check(&req(CMD_WRITE_ZEROES, 1 << 4, 0, 512), &LIMITS), // FAST_ZERO
            Err(Errno::Invalid)
        );
        assert_eq!(
            check(&req(CMD_FLUSH, 0, 0, 1), &LIMITS),
            Err(Errno::Invalid)
        );
        assert_eq!(
            check(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &LIMITS),
            Err(Errno::Invalid)
        );
    }

    #[test]
    fn flags_reach_the_command() {
        assert_eq!(
            check(
                &req(CMD_WRITE_ZEROES, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, 0, 4096),
                &LIMITS
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 4096,
                fua: true,
                may_trim: false
            })
        );
        assert_eq!(
            check(&req(CMD_TRIM, CMD_FLAG_FUA, 512, 512), &LIMITS),
            Ok(Command::Trim {
                offset: 512,
                len: 512,
                fua: true
            })
        );
        // FUA on a read is accepted (clients are known to send it) and ignored.
        assert!(check(&req(CMD_READ, CMD_FLAG_FUA, 0, 1), &LIMITS).is_ok());
        assert_eq!(
            check(&req(CMD_DISC, 0xffff, 1, 1), &LIMITS),
            Ok(Command::Disconnect)
        );
    }

    #[test]
    fn misaligned_requests_get_einval_when_the_device_has_a_block_size() {
        let aligned = Limits {
            min_block: 512,
            ..LIMITS
        };
        assert_eq!(
            check(&req(CMD_READ, 0, 1, 512), &aligned),
            Err(Errno::Invalid)
        );
        assert_eq!(
            check(&req(CMD_WRITE, 0, 0, 100), &aligned),
            Err(Errno::Invalid)
        );
        assert!(check(&req(CMD_WRITE, 0, 512, 1024), &aligned).is_ok());
    }

    #[test]
    fn oversized_write_payload_is_fatal_but_other_lengths_carry_no_payload() {
        assert_eq!(
            req(CMD_WRITE, 0, 0, MAX_PAYLOAD).payload_len(),
            Ok(MAX_PAYLOAD)
        );
        assert_eq!(
            req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1).payload_len(),
            Err(MAX_PAYLOAD + 1)
        );
        assert_eq!(req(CMD_READ, 0, 0, u32::MAX).payload_len(), Ok(0));
        assert_eq!(req(CMD_WRITE_ZEROES, 0, 0, u32::MAX).payload_len(), Ok(0));
    }

    #[test]
    fn client_flags_refuse_unknown_bits() {
        let flags = |fixed_newstyle, no_zeroes| {
            Ok(ClientFlags {
                fixed_newstyle,
                no_zeroes,
            })
        };
        assert_eq!(client_flags(0), flags(false, false));
        assert_eq!(client_flags(FLAG_C_FIXED_NEWSTYLE), flags(true, false));
        assert_eq!(
            client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES),
            flags(true, true)
        );
        assert_eq!(client_flags(1 << 5), Err(1 << 5));
    }

    /// The reply type of the first option reply in `answer`.
    fn reply_kind(answer: &Answer) -> u32 {
        u32::from_be_bytes(answer.reply[12..16].try_into().unwrap())
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    #[test]
    fn forced_tls_refuses_every_option_but_starttls_and_abort_before_tls() {
        let dir = tempfile::tempdir().unwrap();
        let device = crate::FileDevice::create(dir.path().join("disk"), 4096).unwrap();
        let exports = ExportRegistry::new();
        exports
            .add("disk", std::sync::Arc::new(device), "")
            .unwrap();
        for option in [OPT_LIST, OPT_INFO, OPT_GO, 8, 11, 0xdead] {
            let data = if matches!(option, OPT_INFO | OPT_GO) {
                go_data("disk")
            } else {
                Vec::new()
            };
            let answer = answer_option(option, &data, &exports, false, Tls::Required);
            assert!(matches!(answer.next, Next::Continue), "option {option}");
            assert_eq!(reply_kind(&answer), REP_ERR_TLS_REQD, "option {option}");
            assert_eq!(
                answer.reply.len(),
                20 + u32::from_be_bytes(answer.reply[16..20].try_into().unwrap()) as usize
            );
        }
        assert_eq!(
            reply_kind(&answer_oversized_option(OPT_GO, Tls::Required)),
            REP_ERR_TLS_REQD
        );
        assert_eq!(
            reply_kind(&answer_oversized_option(OPT_GO, Tls::Active)),
            REP_ERR_TOO_BIG
        );
        // The export exists, yet EXPORT_NAME cannot be refused with a reply: close.
        let answer = answer_option(OPT_EXPORT_NAME, b"disk", &exports, false, Tls::Required);
        assert!(matches!(answer.next, Next::TlsRequired));
        assert!(answer.reply.is_empty());
        let answer = answer_option(OPT_ABORT, &[], &exports, false, Tls::Required);
        assert!(matches!(answer.next, Next::Close));
        assert_eq!(reply_kind(&answer), REP_ACK);
        let answer = answer_option(OPT_STARTTLS, &[], &exports, false, Tls::Required);
        assert!(matches!(answer.next, Next::StartTls));
        assert_eq!(reply_kind(&answer), REP_ACK);
        let answer = answer_option(OPT_STARTTLS, b"x", &exports, false, Tls::Required);
        assert_eq!(reply_kind(&answer), REP_ERR_INVALID);
        // Once TLS runs: STARTTLS again is invalid, GO works, TLS_REQD is never sent.
        let answer = answer_option(OPT_STARTTLS, &[], &exports, false, Tls::Active);
        assert_eq!(reply_kind(&answer), REP_ERR_INVALID);
        let answer = answer_option(OPT_GO, &go_data("disk"), &exports, false, Tls::Active);
        assert!(matches!(answer.next, Next::Transmit(_)));
        // Without TLS configured, STARTTLS is simply unsupported.
        let answer = answer_option(OPT_STARTTLS, &[], &exports, false, Tls::Off);
        assert_eq!(reply_kind(&answer), REP_ERR_UNSUP);
    }

    #[test]
    fn info_request_lengths_must_add_up() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let (name, reqs) = parse_info_request(&d).unwrap();
        assert_eq!(name, b"abc");
        assert_eq!(reqs.collect::<Vec<_>>(), vec![INFO_NAME, INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_none());
        let mut longer = d.clone();
        longer.push(0);
        assert!(parse_info_request(&longer).is_none());
        assert!(parse_info_request(&u32::MAX.to_be_bytes()).is_none());
        assert!(parse_info_request(&[]).is_none());
    }

    proptest! {
        #[test]
        fn checked_requests_stay_inside_the_export(
            flags in any::<u16>(),
            kind in 0u16..10,
            offset in prop_oneof![any::<u64>(), 0u64..(2 << 20)],
            len in prop_oneof![any::<u32>(), 0u32..(2 << 20)],
            size in 0u64..(4 << 20),
            read_only in any::<bool>(),
            min_shift in 0u32..13,
        ) {
            let limits = Limits { size, read_only, min_block: 1 << min_shift };
            let h = req(kind, flags, offset, len);
            match check(&h, &limits) {
                Ok(Command::Read { offset, len }) => {
                    prop_assert!(len <= MAX_PAYLOAD);
                    prop_assert!(offset + u64::from(len) <= size);
                }
                Ok(Command::Write { offset, .. }) => {
                    prop_assert!(!read_only);
                    prop_assert!(offset + u64::from(h.len) <= size);
                }
                Ok(Command::Trim { offset, len, .. })
                | Ok(Command::WriteZeroes { offset, len, .. }) => {
                    prop_assert!(!read_only);
                    prop_assert!(offset + u64::from(len) <= size);
                    prop_assert_eq!(offset % u64::from(limits.min_block), 0);
                }
                Ok(Command::Flush) => prop_assert_eq!((offset, len), (0, 0)),
                Ok(Command::Disconnect) => prop_assert_eq!(kind, CMD_DISC),
                Err(_) => {}
            }
        }

        #[test]
        fn any_header_bytes_decode_without_panicking(bytes in any::<[u8; REQUEST_LEN]>()) {
            if let Ok(h) = RequestHeader::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes);
                let _ = h.payload_len();
                let _ = check(&h, &LIMITS);
            }
        }

        #[test]
        fn any_option_data_is_answered_without_panicking(
            option in prop_oneof![0u32..16, any::<u32>()],
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let exports = ExportRegistry::new();
            for tls in [Tls::Off, Tls::Required, Tls::Active] {
                let answer = answer_option(option, &data, &exports, false, tls);
                match answer.next {
                    // No export exists, so nothing can start transmission.
                    Next::Transmit(_) => prop_assert!(false, "transmission with no exports"),
                    Next::ExportBusy { .. } => prop_assert!(false, "busy with no exports"),
                    Next::UnknownExport(_) => {
                        prop_assert_eq!(option, OPT_EXPORT_NAME);
                        prop_assert!(tls != Tls::Required);
                    }
                    Next::TlsRequired => {
                        prop_assert_eq!(option, OPT_EXPORT_NAME);
                        prop_assert_eq!(tls, Tls::Required);
                    }
                    Next::StartTls => {
                        prop_assert_eq!((option, tls), (OPT_STARTTLS, Tls::Required));
                        prop_assert!(data.is_empty());
                    }
                    Next::Close => prop_assert_eq!(option, OPT_ABORT),
                    Next::Continue => {
                        // Every answer is one or more well-formed option replies.
                        prop_assert!(answer.reply.len() >= 20);
                        prop_assert_eq!(&answer.reply[..8], &OPT_REPLY_MAGIC.to_be_bytes());
                        let kind = u32::from_be_bytes(answer.reply[12..16].try_into().unwrap());
                        // TLS_REQD only before TLS, and then for every refused option.
                        prop_assert_eq!(kind == REP_ERR_TLS_REQD, tls == Tls::Required && option != OPT_STARTTLS);
                    }
                }
            }
        }
    }
}

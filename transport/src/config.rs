//! Tuning knobs of an [`Endpoint`](crate::Endpoint).

use std::time::Duration;

use quinn::{IdleTimeout, MtuDiscoveryConfig, VarInt};

use crate::error::TransportError;
use crate::stream::DEFAULT_MAX_FRAME_SIZE;

const MIB: u64 = 1024 * 1024;

/// QUIC and connection-management settings of an [`Endpoint`](crate::Endpoint).
///
/// Start from [`TransportConfig::default`] and change fields; new knobs may be added, so
/// the struct cannot be built literally outside this crate. Both sides of a connection
/// should use the same values: QUIC uses the smaller idle timeout of the two, and each
/// side's receive windows limit what the other may send.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TransportConfig {
    /// Interval of QUIC keep-alive pings on an otherwise idle connection. Must be shorter
    /// than `idle_timeout`. Default 500 ms.
    pub keep_alive_interval: Duration,
    /// A connection with no packets from the peer for this long is dead (this is how a
    /// killed or partitioned peer is noticed). Default 3 s.
    pub idle_timeout: Duration,
    /// Upper bound on one dial (QUIC + TLS handshake). Default 1 s.
    pub connect_timeout: Duration,
    /// RTT assumed before the first measurement; sets the handshake's retransmission
    /// timer, so a lost first packet is resent after about 3× this. Default 100 ms (LAN).
    pub initial_rtt: Duration,
    /// How many bidirectional streams the peer may have open to us at once. Default 4096.
    pub max_concurrent_bidi_streams: u32,
    /// Bytes the peer may send on one stream before we read them. Default 16 MiB.
    pub stream_receive_window: u64,
    /// Bytes the peer may send on all streams of a connection before we read them.
    /// Default 64 MiB.
    pub connection_receive_window: u64,
    /// Bytes we keep in flight unacknowledged on a connection. Default 64 MiB.
    pub send_window: u64,
    /// Largest frame we accept; a longer frame header makes the receiver reset the stream
    /// without allocating. Also the largest frame we send. Default 64 MiB.
    pub max_frame_size: usize,
    /// UDP payload size used before path MTU discovery. Default 1200 (always safe).
    pub initial_mtu: u16,
    /// Largest UDP payload we accept (advertised to the peer), 1200..=65527. The endpoint's
    /// receive buffers scale with it. Default 1472 (Ethernet): with segmentation offload,
    /// larger packets measured slower even on loopback (about 400 MB/s at 65527 and 330 MB/s
    /// at 9000, against 570 MB/s at 1472).
    pub max_udp_payload_size: u16,
    /// Largest UDP payload MTU discovery probes for, or `None` to disable discovery.
    /// Probing above the path MTU is harmless; a high bound lets loopback and jumbo-frame
    /// links use large packets, capped by the peer's `max_udp_payload_size`. Default 65527.
    pub mtu_discovery_upper_bound: Option<u16>,
    /// Requested UDP socket send buffer, in bytes; the kernel may cap it
    /// (`net.core.wmem_max`). Default 4 MiB.
    pub socket_send_buffer: usize,
    /// Requested UDP socket receive buffer, in bytes; the kernel may cap it
    /// (`net.core.rmem_max`). Default 4 MiB.
    pub socket_recv_buffer: usize,
    /// Delay before redialing a peer after its first failed dial. Default 50 ms.
    pub backoff_initial: Duration,
    /// The redial delay doubles after each failed dial up to this cap. Default 1 s.
    pub backoff_max: Duration,
    /// Accepted streams buffered for [`Inbound`](crate::Inbound) before accepting more
    /// waits. Default 1024.
    pub inbound_queue: usize,
    /// How long an accepted stream may take to send its kind byte before it is reset.
    /// Default 10 s.
    pub stream_header_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            keep_alive_interval: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            initial_rtt: Duration::from_millis(100),
            max_concurrent_bidi_streams: 4096,
            stream_receive_window: 16 * MIB,
            connection_receive_window: 64 * MIB,
            send_window: 64 * MIB,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            initial_mtu: 1200,
            max_udp_payload_size: 1472,
            mtu_discovery_upper_bound: Some(65527),
            socket_send_buffer: 4 * MIB as usize,
            socket_recv_buffer: 4 * MIB as usize,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            inbound_queue: 1024,
            stream_header_timeout: Duration::from_secs(10),
        }
    }
}

impl TransportConfig {
    /// Checks the values and builds quinn's transport configuration from them.
    pub(crate) fn quinn_transport(&self) -> Result<quinn::TransportConfig, TransportError> {
        let bad = |what: &str| TransportError::Config(what.to_string());
        if self.keep_alive_interval.is_zero() || self.keep_alive_interval >= self.idle_timeout {
            return Err(bad(
                "keep_alive_interval must be non-zero and shorter than idle_timeout",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(bad("connect_timeout must be non-zero"));
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return Err(bad(
                "backoff_initial must be non-zero and at most backoff_max",
            ));
        }
        if self.max_frame_size == 0 || self.max_frame_size as u64 > u64::from(u32::MAX) {
            return Err(bad("max_frame_size must be between 1 and 4 GiB - 1"));
        }
        if self.inbound_queue == 0 {
            return Err(bad("inbound_queue must be non-zero"));
        }
        if !(1200..=65527).contains(&self.max_udp_payload_size)
            || self.initial_mtu < 1200
            || self.initial_mtu > self.max_udp_payload_size
        {
            return Err(bad(
                "need 1200 <= initial_mtu <= max_udp_payload_size <= 65527",
            ));
        }
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| bad("idle_timeout is too large"))?;
        let varint = |v: u64, what: &str| VarInt::from_u64(v).map_err(|_| bad(what));

        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive_interval))
            .max_idle_timeout(Some(idle))
            .initial_rtt(self.initial_rtt)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams))
            // Convoy uses bidirectional streams only.
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(varint(
                self.stream_receive_window,
                "stream_receive_window is too large",
            )?)
            .receive_window(varint(
                self.connection_receive_window,
                "connection_receive_window is too large",
            )?)
            .send_window(self.send_window)
            .initial_mtu(self.initial_mtu)
            .datagram_receive_buffer_size(None);
        match self.mtu_discovery_upper_bound {
            Some(bound) => {
                let mut mtu = MtuDiscoveryConfig::default();
                mtu.upper_bound(bound);
                t.mtu_discovery_config(Some(mtu));
            }
            None => {
                t.mtu_discovery_config(None);
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        TransportConfig::default().quinn_transport().unwrap();
    }

    #[test]
    fn keep_alive_must_be_shorter_than_idle_timeout() {
        let cfg = TransportConfig {
            keep_alive_interval: Duration::from_secs(5),
            ..TransportConfig::default()
        };
        assert!(matches!(
            cfg.quinn_transport(),
            Err(TransportError::Config(_))
        ));
    }

    #[test]
    fn mtu_bounds_are_checked() {
        let cfg = TransportConfig {
            initial_mtu: 2000,
            ..TransportConfig::default()
        };
        assert!(cfg.quinn_transport().is_err());
    }
}

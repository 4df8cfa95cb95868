//! Certificate rotation without a restart: `TlsIdentity::replace_certificate` changes what
//! a bound endpoint presents on new connections.
// Test helpers panic on failed setup, like unwrap inside a #[test].
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use convoy_transport::pki::{self, CertAndKeyPem, PkiError, TlsIdentity};
use convoy_transport::{Endpoint, StreamKind, TransportConfig};
use rustls::pki_types::CertificateDer;

const DAY: Duration = Duration::from_secs(86_400);

fn identity(ca: &CertAndKeyPem, id: u64, lifetime: Duration) -> TlsIdentity {
    let cert = pki::issue_node_cert_valid_for(ca, id, &[], lifetime).unwrap();
    TlsIdentity::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap()
}

/// Days until the notAfter of the certificate node 2 presents to a new connection.
async fn presented_days(client: &TlsIdentity, addr: std::net::SocketAddr) -> u64 {
    let (_endpoint, conn) = raw_connect(client, 2, addr).await;
    let certs = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<CertificateDer<'static>>>()
        .unwrap();
    let end = pki::not_after_der(&certs[0]).unwrap();
    end.duration_since(SystemTime::now()).unwrap().as_secs() / DAY.as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_presented_on_new_connections_without_rebinding() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let ca = pki::generate_ca("cluster").unwrap();
        let old = identity(&ca, 2, 30 * DAY);
        let (b, b_in) = Endpoint::bind(any_port(), 2, &old, TransportConfig::default()).unwrap();
        spawn_echo(b_in);
        let (a, _a_in) = bind(&ca, 1);
        let node1 = node_identity(&ca, 1);
        assert_eq!(presented_days(&node1, b.local_addr()).await, 29);
        a.request(
            2,
            b.local_addr(),
            StreamKind::Forward,
            b"before",
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();

        old.replace_certificate(&identity(&ca, 2, 90 * DAY))
            .unwrap();
        assert_eq!(presented_days(&node1, b.local_addr()).await, 89);
        // The cached connection keeps working, and so do new dials.
        a.request(
            2,
            b.local_addr(),
            StreamKind::Forward,
            b"after",
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
        let (c, _c_in) = bind(&ca, 3);
        c.request(
            2,
            b.local_addr(),
            StreamKind::Forward,
            b"new",
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();

        // Another node's certificate or another CA's cannot stand in; nothing changes.
        let err = old.replace_certificate(&identity(&ca, 3, DAY)).unwrap_err();
        assert!(matches!(err, PkiError::CannotReplace(_)), "{err}");
        let other_ca = pki::generate_ca("other").unwrap();
        let err = old
            .replace_certificate(&identity(&other_ca, 2, DAY))
            .unwrap_err();
        assert!(matches!(err, PkiError::CannotReplace(_)), "{err}");
        assert_eq!(presented_days(&node1, b.local_addr()).await, 89);
    })
    .await
    .unwrap();
}

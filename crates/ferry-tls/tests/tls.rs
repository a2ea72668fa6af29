#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_tls::{
    accept, client_config, connect, init_pki, load_identity, server_config, server_identity,
    TlsError,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(5);

fn lo() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

fn pki(dir: &Path) {
    init_pki(dir, &[("alpha".into(), lo()), ("beta".into(), lo())]).unwrap();
}

async fn listener(ip: &str) -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Accepts one connection, echoes one line back, and returns the accept result.
async fn serve_once(
    l: TcpListener,
    server_dir: &Path,
) -> tokio::task::JoinHandle<Result<String, TlsError>> {
    let id = load_identity(server_dir).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&id).unwrap());
    tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let (mut s, peer) = accept(tcp, &acceptor, T).await?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        s.flush().await.unwrap();
        Ok(peer.common_name)
    })
}

#[tokio::test]
async fn agent_to_agent_and_client_to_agent() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());

    for dialer in ["beta", "client"] {
        let (l, addr) = listener("127.0.0.1").await;
        let server = serve_once(l, &dir.path().join("alpha")).await;
        let cfg = client_config(&load_identity(&dir.path().join(dialer)).unwrap()).unwrap();
        let mut s = connect(addr, cfg, T).await.unwrap();
        assert_eq!(server_identity(&s).unwrap().common_name, "alpha");
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(server.await.unwrap().unwrap(), dialer);
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused_in_handshake() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let (l, addr) = listener("127.0.0.1").await;
    let server = serve_once(l, &dir.path().join("alpha")).await;

    let id = load_identity(&dir.path().join("client")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.ca_certs()[0].clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let ip = ServerName::IpAddress(addr.ip().into());
    // TLS 1.3: the client finishes its side before the server judges the (missing) certificate.
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ip, tcp)
        .await
        .unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    let read = s.read_exact(&mut buf).await;
    assert!(
        read.is_err(),
        "client read {buf:?} from a server that should have refused it"
    );

    let err = server.await.unwrap().unwrap_err();
    assert!(matches!(err, TlsError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    pki(dir.path());
    pki(other.path());
    let (l, addr) = listener("127.0.0.1").await;
    let server = serve_once(l, &dir.path().join("alpha")).await;

    // The foreign client still trusts our CA, so only the server's check can stop it.
    let foreign = load_identity(&other.path().join("client")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            load_identity(&dir.path().join("client"))
                .unwrap()
                .ca_certs()[0]
                .clone(),
        )
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        foreign.cert_chain().to_vec(),
        rustls_pki_types::PrivateKeyDer::from_pem_file(other.path().join("client/key.pem"))
            .unwrap(),
    )
    .unwrap();
    let mut s = connect(addr, Arc::new(cfg), T).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 5];
    assert!(s.read_exact(&mut buf).await.is_err());

    let err = server.await.unwrap().unwrap_err();
    assert!(matches!(err, TlsError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn server_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    pki(dir.path());
    pki(other.path());
    let (l, addr) = listener("127.0.0.1").await;
    let server = serve_once(l, &other.path().join("alpha")).await;

    let cfg = client_config(&load_identity(&dir.path().join("client")).unwrap()).unwrap();
    let err = connect(addr, cfg, T).await.unwrap_err();
    assert!(matches!(err, TlsError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(server.await.unwrap().is_err());
}

#[tokio::test]
async fn server_certificate_for_another_ip_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    // The whole of 127.0.0.0/8 is loopback on Linux; alpha's certificate names only 127.0.0.1.
    let (l, addr) = listener("127.0.0.2").await;
    let server = serve_once(l, &dir.path().join("alpha")).await;
    let cfg = client_config(&load_identity(&dir.path().join("client")).unwrap()).unwrap();
    let err = connect(addr, cfg, T).await.unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
    assert!(server.await.unwrap().is_err());
}

#[tokio::test]
async fn client_certificate_cannot_serve() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let (l, addr) = listener("127.0.0.1").await;
    let server = serve_once(l, &dir.path().join("client")).await;
    let cfg = client_config(&load_identity(&dir.path().join("alpha")).unwrap()).unwrap();
    let err = connect(addr, cfg, T).await.unwrap_err();
    assert!(matches!(err, TlsError::Handshake { .. }), "{err}");
    assert!(server.await.unwrap().is_err());
}

#[tokio::test]
async fn silent_peer_times_out() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let (l, addr) = listener("127.0.0.1").await;
    let id = load_identity(&dir.path().join("alpha")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&id).unwrap());
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = l.accept().await.unwrap();
    let err = accept(tcp, &acceptor, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Timeout { .. }), "{err}");
}

#[test]
fn layout_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let s = init_pki(dir.path(), &[("alpha".into(), lo())]).unwrap();
    assert!(s.ca_created);
    assert_eq!(s.created, ["alpha", "client"]);
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca/ca-key.pem"), 0o600);
    assert_eq!(mode("alpha/key.pem"), 0o600);
    assert_eq!(mode("client/key.pem"), 0o600);
    for f in [
        "ca/ca.pem",
        "alpha/ca.pem",
        "alpha/cert.pem",
        "client/ca.pem",
        "client/cert.pem",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    assert_eq!(
        load_identity(&dir.path().join("alpha"))
            .unwrap()
            .common_name(),
        "alpha"
    );
    assert_eq!(
        load_identity(&dir.path().join("client"))
            .unwrap()
            .common_name(),
        "client"
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
}

#[test]
fn existing_ca_is_reused_and_only_missing_identities_created() {
    let dir = tempfile::tempdir().unwrap();
    init_pki(dir.path(), &[("alpha".into(), lo())]).unwrap();
    let ca = std::fs::read(dir.path().join("ca/ca.pem")).unwrap();
    let alpha = std::fs::read(dir.path().join("alpha/cert.pem")).unwrap();

    let s = init_pki(dir.path(), &[("alpha".into(), lo()), ("beta".into(), lo())]).unwrap();
    assert!(!s.ca_created);
    assert_eq!(s.created, ["beta"]);
    assert_eq!(s.kept, ["alpha", "client"]);
    assert_eq!(std::fs::read(dir.path().join("ca/ca.pem")).unwrap(), ca);
    assert_eq!(
        std::fs::read(dir.path().join("alpha/cert.pem")).unwrap(),
        alpha
    );
    assert_eq!(std::fs::read(dir.path().join("beta/ca.pem")).unwrap(), ca);
    // beta, signed by the reloaded CA key, is trusted by alpha's CA file.
    load_identity(&dir.path().join("beta")).unwrap();
}

#[test]
fn existing_agent_with_other_ip_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    init_pki(dir.path(), &[("alpha".into(), lo())]).unwrap();
    let err = init_pki(
        dir.path(),
        &[("alpha".into(), "198.18.0.9".parse().unwrap())],
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("alpha/cert.pem") && msg.contains("198.18.0.9"),
        "{msg}"
    );
}

#[test]
fn invalid_names_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    for (names, needle) in [
        (vec![""], "empty"),
        (vec!["a/b"], "'/'"),
        (vec!["ca"], "reserved"),
        (vec!["client"], "reserved"),
        (vec!["a", "a"], "more than once"),
    ] {
        let agents: Vec<_> = names.iter().map(|n| (n.to_string(), lo())).collect();
        let err = init_pki(&dir.path().join("pki"), &agents).unwrap_err();
        assert!(err.to_string().contains(needle), "{names:?}: {err}");
    }
    assert!(!dir.path().join("pki").exists());
}

#[test]
fn load_identity_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    init_pki(dir.path(), &[("alpha".into(), lo()), ("beta".into(), lo())]).unwrap();
    init_pki(other.path(), &[]).unwrap();
    let alpha = dir.path().join("alpha");

    let expect = |needle: &str| {
        let err = load_identity(&alpha).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "wanted {needle:?} in: {err}"
        );
    };

    let key = std::fs::read(alpha.join("key.pem")).unwrap();
    std::fs::remove_file(alpha.join("key.pem")).unwrap();
    expect("alpha/key.pem");
    std::fs::write(
        alpha.join("key.pem"),
        std::fs::read(dir.path().join("beta/key.pem")).unwrap(),
    )
    .unwrap();
    expect("alpha/key.pem: does not match");
    std::fs::write(alpha.join("key.pem"), &key).unwrap();

    let cert = std::fs::read(alpha.join("cert.pem")).unwrap();
    std::fs::write(alpha.join("cert.pem"), b"garbage").unwrap();
    expect("alpha/cert.pem: contains no CERTIFICATE");
    std::fs::write(alpha.join("cert.pem"), &cert).unwrap();

    std::fs::write(
        alpha.join("ca.pem"),
        std::fs::read(other.path().join("ca/ca.pem")).unwrap(),
    )
    .unwrap();
    expect("alpha/cert.pem: not accepted under");
    std::fs::remove_file(alpha.join("ca.pem")).unwrap();
    expect("alpha/ca.pem");
}

//! Mutual TLS between ferry agents and the CLI.
//!
//! Restoring a checkpoint is root on a host, so there is no plaintext or server-only mode: every
//! connection authenticates both ends against the project CA created by [`init_pki`]. Agents
//! dial each other by IP, so agent certificates carry their IP as a SAN and the client checks
//! it. Only TLS 1.3 is offered: both ends are ferry, so there is no legacy peer to serve, and
//! one protocol version means one handshake shape to reason about.
//!
//! The crypto provider is always `ring`, passed explicitly, so the result does not depend on
//! which provider some other crate in the process installed as the default.

mod error;
mod pki;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::time::Instant;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use error::TlsError;
pub use pki::{init_pki, PkiSummary, CA_DIR, CLIENT_NAME};

/// The certificates and key of one ferry participant, loaded from a Docker-style TLS directory.
pub struct TlsIdentity {
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    common_name: String,
}

impl TlsIdentity {
    /// The CN of this identity's own certificate: the agent name, or [`CLIENT_NAME`].
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// CA certificates from `ca.pem`; the only roots this identity trusts.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// `cert.pem`: the identity's certificate first, then any intermediates.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            common_name: self.common_name.clone(),
        }
    }
}

/// Leaves the private key out so identities can be logged.
impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("common_name", &self.common_name)
            .field("ca_certs", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Who is on the other end, as vouched for by the project CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// An agent name, or [`CLIENT_NAME`] for the CLI (agents can never be named that).
    pub common_name: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads `ca.pem`, `cert.pem` and `key.pem` from `tls_dir`.
///
/// Everything that would otherwise only show up as a handshake failure on the peer — a key
/// that does not match the certificate, a certificate from another CA, an expired one — is
/// checked here, and the error names the file at fault.
pub fn load_identity(tls_dir: &Path) -> Result<TlsIdentity, TlsError> {
    let ca_path = tls_dir.join("ca.pem");
    let cert_path = tls_dir.join("cert.pem");
    let key_path = tls_dir.join("key.pem");

    let roots = read_certs(&ca_path)?;
    let chain = read_certs(&cert_path)?;
    let key_pem = pki::read_string(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::bad(&key_path, format!("no usable private key: {e}")))?;

    let provider = provider();
    CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| {
        TlsError::bad(
            &key_path,
            format!("does not match {}: {e}", cert_path.display()),
        )
    })?;

    let store = root_store(&roots).map_err(|reason| TlsError::bad(&ca_path, reason))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .map_err(TlsError::Verifier)?;
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|e| {
            TlsError::bad(
                &cert_path,
                format!("not accepted under {}: {e}", ca_path.display()),
            )
        })?;

    let common_name = common_name(&chain[0]).map_err(|reason| TlsError::bad(&cert_path, reason))?;
    Ok(TlsIdentity {
        roots,
        chain,
        key,
        common_name,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = pki::read_string(path)?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::bad(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::bad(path, "contains no CERTIFICATE block"));
    }
    Ok(certs)
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in roots {
        store
            .add(cert.clone())
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(store)
}

fn common_name(der: &CertificateDer<'_>) -> Result<String, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unparsable certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or("certificate has no common name")?;
    cn.as_str()
        .map(str::to_owned)
        .map_err(|e| format!("common name is not a string: {e}"))
}

/// Agent side: requires a client certificate issued by the project CA.
pub fn server_config(id: &TlsIdentity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let store = root_store(&id.roots).map_err(|reason| TlsError::BadFile {
        path: "ca.pem".into(),
        reason,
    })?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|cause| TlsError::Rustls {
            step: "selecting TLS 1.3",
            cause,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|cause| TlsError::Rustls {
            step: "installing the server certificate",
            cause,
        })?;
    Ok(Arc::new(config))
}

/// Dialing side (CLI, or an agent calling another): trusts only the project CA.
pub fn client_config(id: &TlsIdentity) -> Result<Arc<ClientConfig>, TlsError> {
    let store = root_store(&id.roots).map_err(|reason| TlsError::BadFile {
        path: "ca.pem".into(),
        reason,
    })?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|cause| TlsError::Rustls {
            step: "selecting TLS 1.3",
            cause,
        })?
        .with_root_certificates(store)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|cause| TlsError::Rustls {
            step: "installing the client certificate",
            cause,
        })?;
    Ok(Arc::new(config))
}

/// Dials `addr` and completes the handshake, checking that the server's certificate was issued
/// for that IP. `timeout` bounds TCP connect and handshake together.
///
/// With TLS 1.3 the server judges the client certificate after the client considers the
/// handshake done, so a rejected client sees the refusal on its first read, not here.
pub async fn connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
    let deadline = Instant::now() + timeout;
    let timed_out = |step| TlsError::Timeout {
        step,
        peer: addr,
        after: timeout,
    };

    let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out("TCP connect"))?
        .map_err(|cause| TlsError::Connect { addr, cause })?;
    tcp.set_nodelay(true)
        .map_err(|cause| TlsError::Connect { addr, cause })?;

    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout_at(
        deadline,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .map_err(|_| timed_out("TLS handshake"))?
    .map_err(|cause| TlsError::Handshake { peer: addr, cause })
}

/// Completes the server side of the handshake on an accepted socket and reports who the
/// client is. A client without a valid certificate fails here, before any application byte.
pub async fn accept(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    timeout: Duration,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, PeerIdentity), TlsError> {
    let peer = tcp.peer_addr().map_err(TlsError::PeerAddr)?;
    tcp.set_nodelay(true)
        .map_err(|cause| TlsError::Handshake { peer, cause })?;
    let stream = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| TlsError::Timeout {
            step: "TLS handshake",
            peer,
            after: timeout,
        })?
        .map_err(|cause| TlsError::Handshake { peer, cause })?;
    let identity = peer_identity(stream.get_ref().1.peer_certificates(), peer)?;
    Ok((stream, identity))
}

/// Who answered a [`connect`]; agents use it to log which peer they reached.
pub fn server_identity(
    stream: &tokio_rustls::client::TlsStream<TcpStream>,
) -> Result<PeerIdentity, TlsError> {
    let (tcp, conn) = stream.get_ref();
    let peer = tcp.peer_addr().map_err(TlsError::PeerAddr)?;
    peer_identity(conn.peer_certificates(), peer)
}

fn peer_identity(
    certs: Option<&[CertificateDer<'static>]>,
    peer: SocketAddr,
) -> Result<PeerIdentity, TlsError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| TlsError::PeerIdentity {
            peer,
            reason: "no certificate".into(),
        })?;
    let common_name =
        common_name(leaf).map_err(|reason| TlsError::PeerIdentity { peer, reason })?;
    Ok(PeerIdentity { common_name })
}

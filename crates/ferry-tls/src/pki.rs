//! Creating the project CA and the per-agent and CLI identities on disk.
//!
//! Each identity is written into a hidden temporary directory and renamed into place, so a
//! crash never leaves a half-written identity that a later run would mistake for a complete one.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::TlsError;

/// Directory and common name of the CLI's identity; reserved so no agent can impersonate it.
pub const CLIENT_NAME: &str = "client";
/// Directory holding the CA; reserved for the same reason.
pub const CA_DIR: &str = "ca";

const CA_VALID_YEARS: i32 = 20;
const LEAF_VALID_YEARS: i32 = 10;
const MAX_NAME_LEN: usize = 63;

/// What [`init_pki`] did, so the CLI can tell the operator which files are new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiSummary {
    pub dir: PathBuf,
    /// False when an existing `ca/ca.pem` was reused.
    pub ca_created: bool,
    /// Identity directories written by this call (agent names and possibly `client`).
    pub created: Vec<String>,
    /// Identity directories that already existed, were checked against the CA and left alone.
    pub kept: Vec<String>,
}

/// Creates (or completes) a PKI under `dir` in Docker's TLS layout.
///
/// An existing CA is reused so agents added later still trust, and are trusted by, the ones
/// already deployed; existing identity directories are kept only if they belong to that CA
/// (and, for agents, to the requested address), because silently keeping a stale identity
/// would surface much later as an unexplained handshake failure.
pub fn init_pki(dir: &Path, agents: &[(String, IpAddr)]) -> Result<PkiSummary, TlsError> {
    validate_names(agents)?;
    fs::create_dir_all(dir).map_err(|e| TlsError::io("creating", dir, e))?;

    let (ca, ca_created) = load_or_create_ca(dir)?;
    let mut summary = PkiSummary {
        dir: dir.to_path_buf(),
        ca_created,
        created: Vec::new(),
        kept: Vec::new(),
    };

    for (name, ip) in agents {
        let leaf = LeafSpec::Agent { name, ip: *ip };
        if ensure_leaf(dir, &ca, &leaf)? {
            summary.created.push(name.clone());
        } else {
            summary.kept.push(name.clone());
        }
    }
    if ensure_leaf(dir, &ca, &LeafSpec::Client)? {
        summary.created.push(CLIENT_NAME.to_string());
    } else {
        summary.kept.push(CLIENT_NAME.to_string());
    }
    Ok(summary)
}

fn validate_names(agents: &[(String, IpAddr)]) -> Result<(), TlsError> {
    let mut seen = HashSet::new();
    for (name, _) in agents {
        validate_name(name)?;
        if !seen.insert(name.as_str()) {
            return Err(TlsError::DuplicateName(name.clone()));
        }
    }
    Ok(())
}

/// Names become directory names, certificate CNs and DNS SANs, so they are held to the
/// intersection of what all three accept.
fn validate_name(name: &str) -> Result<(), TlsError> {
    let invalid = |reason| {
        Err(TlsError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("longer than 63 characters");
    }
    if name.contains('/') {
        return invalid("contains '/'");
    }
    if name == CA_DIR || name == CLIENT_NAME {
        return invalid("reserved (\"ca\" and \"client\" name the CA and the CLI identity)");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return invalid("only ASCII letters, digits, '-' and '.' are allowed");
    }
    if name.starts_with(['-', '.']) || name.ends_with(['-', '.']) || name.contains("..") {
        return invalid("must start and end with a letter or digit and not contain \"..\"");
    }
    Ok(())
}

struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn load_or_create_ca(dir: &Path) -> Result<(Ca, bool), TlsError> {
    let ca_dir = dir.join(CA_DIR);
    let cert_path = ca_dir.join("ca.pem");
    let key_path = ca_dir.join("ca-key.pem");

    if cert_path.exists() {
        let cert_pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| TlsError::bad(&key_path, format!("not a usable private key: {e}")))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| TlsError::bad(&cert_path, format!("no certificate: {e}")))?;
        let (_, parsed) = X509Certificate::from_der(&cert_der)
            .map_err(|e| TlsError::bad(&cert_path, format!("unparsable certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(TlsError::bad(
                &key_path,
                format!("does not belong to {}", cert_path.display()),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| TlsError::bad(&cert_path, format!("not usable as an issuer: {e}")))?;
        return Ok((
            Ca {
                cert_pem,
                cert_der,
                issuer,
            },
            false,
        ));
    }
    if ca_dir.exists() {
        return Err(TlsError::bad(
            &ca_dir,
            "exists without ca.pem; remove it to create a new CA (every identity must then be reissued)",
        ));
    }

    let key = KeyPair::generate().map_err(|e| TlsError::generate("generating the CA key", e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&ca_common_name(&key));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALID_YEARS);
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::generate("signing the CA certificate", e))?;
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();

    write_identity_dir(
        dir,
        CA_DIR,
        &[
            ("ca.pem", cert_pem.as_bytes(), 0o644),
            ("ca-key.pem", key_pem.as_bytes(), 0o600),
        ],
    )?;
    let cert_der = cert.der().clone();
    Ok((
        Ca {
            cert_pem,
            cert_der,
            issuer: Issuer::new(params, key),
        },
        true,
    ))
}

enum LeafSpec<'a> {
    Agent { name: &'a str, ip: IpAddr },
    Client,
}

impl LeafSpec<'_> {
    fn name(&self) -> &str {
        match self {
            LeafSpec::Agent { name, .. } => name,
            LeafSpec::Client => CLIENT_NAME,
        }
    }
}

/// Returns true when the identity was created, false when a matching one was already there.
fn ensure_leaf(dir: &Path, ca: &Ca, leaf: &LeafSpec<'_>) -> Result<bool, TlsError> {
    let leaf_dir = dir.join(leaf.name());
    if leaf_dir.exists() {
        check_existing_leaf(&leaf_dir, ca, leaf)?;
        return Ok(false);
    }

    let key = KeyPair::generate()
        .map_err(|e| TlsError::generate(format!("generating the key for {}", leaf.name()), e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(leaf.name());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALID_YEARS);
    match leaf {
        LeafSpec::Agent { name, ip } => {
            let dns = (*name)
                .to_string()
                .try_into()
                .map_err(|e| TlsError::generate(format!("using {name:?} as a DNS name"), e))?;
            params.subject_alt_names = vec![SanType::IpAddress(*ip), SanType::DnsName(dns)];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        LeafSpec::Client => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    let cert = params.signed_by(&key, &ca.issuer).map_err(|e| {
        TlsError::generate(format!("signing the certificate for {}", leaf.name()), e)
    })?;

    write_identity_dir(
        dir,
        leaf.name(),
        &[
            ("ca.pem", ca.cert_pem.as_bytes(), 0o644),
            ("cert.pem", cert.pem().as_bytes(), 0o644),
            ("key.pem", key.serialize_pem().as_bytes(), 0o600),
        ],
    )?;
    Ok(true)
}

fn check_existing_leaf(leaf_dir: &Path, ca: &Ca, leaf: &LeafSpec<'_>) -> Result<(), TlsError> {
    for file in ["ca.pem", "cert.pem", "key.pem"] {
        let path = leaf_dir.join(file);
        if !path.exists() {
            return Err(TlsError::bad(
                &path,
                format!(
                    "missing from an existing identity; remove {} to reissue it",
                    leaf_dir.display()
                ),
            ));
        }
    }

    let ca_path = leaf_dir.join("ca.pem");
    let leaf_ca = CertificateDer::from_pem_slice(read_string(&ca_path)?.as_bytes())
        .map_err(|e| TlsError::bad(&ca_path, format!("no certificate: {e}")))?;
    if leaf_ca != ca.cert_der {
        return Err(TlsError::bad(
            &ca_path,
            format!(
                "is not the current CA; remove {} to reissue it",
                leaf_dir.display()
            ),
        ));
    }

    if let LeafSpec::Agent { ip, .. } = leaf {
        let cert_path = leaf_dir.join("cert.pem");
        let der = CertificateDer::from_pem_slice(read_string(&cert_path)?.as_bytes())
            .map_err(|e| TlsError::bad(&cert_path, format!("no certificate: {e}")))?;
        let ips = certificate_ips(&der).map_err(|reason| TlsError::bad(&cert_path, reason))?;
        if !ips.contains(ip) {
            return Err(TlsError::bad(
                &cert_path,
                format!(
                    "was issued for {ips:?}, not {ip}; remove {} to reissue it for the new address",
                    leaf_dir.display()
                ),
            ));
        }
    }
    Ok(())
}

fn certificate_ips(der: &CertificateDer<'_>) -> Result<Vec<IpAddr>, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    let mut ips = Vec::new();
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::IPAddress(bytes) = name {
            match bytes.len() {
                4 => ips.push(IpAddr::from(
                    <[u8; 4]>::try_from(*bytes).map_err(|_| "bad IPv4 SAN")?,
                )),
                16 => ips.push(IpAddr::from(
                    <[u8; 16]>::try_from(*bytes).map_err(|_| "bad IPv6 SAN")?,
                )),
                _ => return Err(format!("IP SAN of {} bytes", bytes.len())),
            }
        }
    }
    Ok(ips)
}

/// Two ferry CAs with the same subject would make a foreign certificate fail as "bad
/// signature" instead of "unknown issuer"; a key-derived suffix keeps the diagnosis right.
fn ca_common_name(key: &KeyPair) -> String {
    let suffix: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ferry CA {suffix}")
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Starts validity a year back so hosts with a lagging clock still accept fresh certificates.
fn set_validity(params: &mut CertificateParams, years: i32) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let year = 1970 + (secs / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

fn write_identity_dir(
    dir: &Path,
    name: &str,
    files: &[(&str, &[u8], u32)],
) -> Result<(), TlsError> {
    let final_dir = dir.join(name);
    let tmp_dir = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp_dir.exists() {
        fs::remove_dir_all(&tmp_dir)
            .map_err(|e| TlsError::io("removing the leftover", &tmp_dir, e))?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(|e| TlsError::io("creating", &tmp_dir, e))?;

    let result = files
        .iter()
        .try_for_each(|(file, contents, mode)| write_new_file(&tmp_dir.join(file), contents, *mode))
        .and_then(|()| {
            fs::rename(&tmp_dir, &final_dir)
                .map_err(|e| TlsError::io("moving into place", &final_dir, e))
        });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp_dir);
    }
    result
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| TlsError::io("creating", path, e))?;
    file.write_all(contents)
        .map_err(|e| TlsError::io("writing", path, e))?;
    file.sync_all()
        .map_err(|e| TlsError::io("syncing", path, e))
}

pub(crate) fn read_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|e| TlsError::io("reading", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "agent-1", "host.example", "A9"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "ca",
            "client",
            "-a",
            "a-",
            ".a",
            "a..b",
            "a b",
            "a_b",
            "ü",
            &"x".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn duplicates_rejected() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let err =
            validate_names(&[("a".into(), ip), ("b".into(), ip), ("a".into(), ip)]).unwrap_err();
        assert!(matches!(err, TlsError::DuplicateName(n) if n == "a"));
    }
}

//! Loading TLS material for rustls: server certificate chains and keys, client trust roots.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Why TLS material could not be loaded.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read.
    Read {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key, or rustls refused it.
    Invalid {
        /// The path.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => write!(f, "reading {path}: {source}"),
            TlsError::Invalid { path, reason } => write!(f, "{path}: {reason}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { source, .. } => Some(source),
            TlsError::Invalid { .. } => None,
        }
    }
}

/// Installs `ring` as the process-wide rustls crypto provider (idempotent). Call before building any
/// TLS config, ureq agents included.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed (by us or by the embedding program), which
    // is exactly the state we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads `path` whole, so I/O errors and PEM errors are told apart and both name the file.
fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The PEM certificates in `path`.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// The PEM private key in `path` (the first one: PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => invalid(
            path,
            "no PEM private key found (expected PKCS#8, PKCS#1 or SEC1)",
        ),
        other => invalid(path, format!("malformed PEM: {other}")),
    })
}

/// Where distributions keep their CA bundle, most common first.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The certificates of the system trust store (`/etc/ssl/certs/ca-certificates.crt` and the like);
/// empty when there is none.
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    for bundle in SYSTEM_BUNDLES {
        let path = Path::new(bundle);
        if !path.exists() {
            continue;
        }
        match load_certificates(path) {
            Ok(certs) => return certs,
            Err(e) => log::warn!("skipping system CA bundle: {e}"),
        }
    }
    Vec::new()
}

/// A server config from a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    install_crypto_provider();
    let chain = load_certificates(cert_path)?;
    let key = load_private_key(key_path)?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            invalid(
                key_path,
                format!(
                    "rustls refused the key with the chain of {}: {e}",
                    cert_path.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tls")
            .join(name)
    }

    #[test]
    fn loads_the_test_certificates_and_builds_a_server_config() {
        let certs = load_certificates(&fixture("ca.pem")).unwrap();
        assert_eq!(certs.len(), 1);
        let config = server_config(&fixture("server.pem"), &fixture("server-key.pem")).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn errors_name_the_path() {
        let missing = fixture("no-such-file.pem");
        let e = load_certificates(&missing).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }));
        assert!(e.to_string().contains("no-such-file.pem"), "{e}");

        // A key file holds no certificate, and a certificate file holds no key.
        let e = load_certificates(&fixture("server-key.pem")).unwrap_err();
        assert!(e.to_string().contains("server-key.pem"), "{e}");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = load_private_key(&fixture("ca.pem")).unwrap_err();
        assert!(e.to_string().contains("no PEM private key"), "{e}");
    }

    #[test]
    fn a_key_not_matching_the_certificate_is_refused() {
        let e = server_config(&fixture("server.pem"), &fixture("ca-key.pem")).unwrap_err();
        assert!(matches!(e, TlsError::Invalid { .. }), "{e}");
    }

    #[test]
    fn system_roots_do_not_panic() {
        // The store may be absent in a minimal container; when present it parses to something.
        let roots = system_roots();
        if Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
            assert!(!roots.is_empty());
        }
    }
}

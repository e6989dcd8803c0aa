//! Loading TLS material for rustls: server certificate chains and keys, client trust roots.

use rustls_pki_types::CertificateDer;
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
        todo!()
    }
}

impl std::error::Error for TlsError {}

/// Installs `ring` as the process-wide rustls crypto provider (idempotent). Call before building any
/// TLS config, ureq agents included.
pub fn install_crypto_provider() {
    todo!()
}

/// The PEM certificates in `path`.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    todo!()
}

/// The certificates of the system trust store (`/etc/ssl/certs/ca-certificates.crt` and the like);
/// empty when there is none.
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    todo!()
}

/// A server config from a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    todo!()
}

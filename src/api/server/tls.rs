//! `--tls-cert-file` / `--tls-key-file`: rustls (ring, as kube's client uses), with the
//! files re-read when they change (cert-manager renews them in place; see `file_stamp`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::api::file_stamp::FileStamp;

pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    /// The versions of the two files last read; `None` while one can't be looked at.
    stamps: Option<(FileStamp, FileStamp)>,
    trusted: bool,
    acceptor: TlsAcceptor,
}

impl TlsFiles {
    /// Loads the certificate chain and key; an error keeps the agent from starting.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsFiles, String> {
        let stamps = stamps(cert, key).map_err(|e| format!("TLS files: {e}"))?;
        let config = server_config(cert, key)?;
        tracing::info!(cert = %cert.display(), "TLS certificate loaded");
        Ok(TlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new(Loaded {
                stamps: Some(stamps),
                trusted: stamps.0.settled() && stamps.1.settled(),
                acceptor: TlsAcceptor::from(config),
            }),
        })
    }

    /// The acceptor for a new connection, from the files as they are now. Files that
    /// can't be read, or don't make a valid pair (one renewed, the other not yet), leave
    /// the last good certificate in use; that is logged once per change.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut loaded = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match stamps(&self.cert, &self.key) {
            Ok(s) if loaded.stamps == Some(s) && loaded.trusted => {}
            Ok(s) => {
                let changed = loaded.stamps != Some(s);
                loaded.stamps = Some(s);
                loaded.trusted = s.0.settled() && s.1.settled();
                match server_config(&self.cert, &self.key) {
                    Ok(config) => {
                        if changed {
                            tracing::info!(cert = %self.cert.display(), "TLS certificate changed; reloaded");
                        }
                        loaded.acceptor = TlsAcceptor::from(config);
                    }
                    Err(e) if changed => {
                        tracing::warn!(error = %e, "cannot load the changed TLS files; keeping the previous certificate")
                    }
                    Err(_) => {}
                }
            }
            Err(e) => {
                if loaded.stamps.take().is_some() {
                    tracing::warn!(error = %e, "TLS files are gone; keeping the previous certificate");
                }
            }
        }
        loaded.acceptor.clone()
    }
}

fn stamps(cert: &Path, key: &Path) -> std::io::Result<(FileStamp, FileStamp)> {
    let c = FileStamp::of(cert).map_err(|e| with_path(cert, e))?;
    let k = FileStamp::of(key).map_err(|e| with_path(key, e))?;
    Ok((c, k))
}

fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// A rustls server configuration for HTTP/1.1 from a PEM chain and key.
fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| format!("{}: no PEM private key in it ({e})", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

//! Optional TLS for the API. The certificate and key come from files and are read again when
//! they change (cert-manager, or a projected volume, rotates them), without a restart; a
//! rotation that cannot be read keeps the previous pair and says so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ConnectInfo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::{Error, Result};

/// How often, at most, the files' modification times are looked at (on a handshake).
const RECHECK: Duration = Duration::from_secs(1);
/// A client that does not finish its handshake in this time is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);

pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: RwLock<Loaded>,
}

struct Loaded {
    stamp: Option<(SystemTime, SystemTime)>,
    checked: Instant,
    pair: Arc<CertifiedKey>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert").field("cert", &self.cert).field("key", &self.key).finish()
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    Some((std::fs::metadata(cert).ok()?.modified().ok()?, std::fs::metadata(key).ok()?.modified().ok()?))
}

fn read(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>> {
    let bad = |what: &Path, e: &dyn std::fmt::Display| Error::invalid(format!("TLS: {}: {e}", what.display()));
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    if chain.is_empty() {
        return Err(bad(cert, &"no certificate in the file"));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| bad(key, &e))?;
    let pair = CertifiedKey::new(chain, signer);
    pair.keys_match().map_err(|e| bad(key, &format!("does not belong to the certificate: {e}")))?;
    Ok(Arc::new(pair))
}

impl ReloadingCert {
    /// Reads the pair now: a configuration that cannot serve fails at start, not later.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let pair = read(cert, key)?;
        let state = RwLock::new(Loaded { stamp: stamp(cert, key), checked: Instant::now(), pair });
        Ok(ReloadingCert { cert: cert.into(), key: key.into(), state })
    }

    /// The pair to serve, read again first if the files changed since the last look.
    pub fn current(&self) -> Arc<CertifiedKey> {
        {
            let s = self.state.read().unwrap();
            if s.checked.elapsed() < RECHECK {
                return s.pair.clone();
            }
        }
        let mut s = self.state.write().unwrap();
        s.checked = Instant::now();
        let now = stamp(&self.cert, &self.key);
        if now.is_some() && now != s.stamp {
            match read(&self.cert, &self.key) {
                Ok(pair) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    s.pair = pair;
                    s.stamp = now;
                }
                // Half-written during a rotation, most likely: the next look tries again.
                Err(e) => tracing::warn!("TLS certificate not reloaded, serving the previous one: {}", e.message),
            }
        }
        s.pair.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<rustls::ServerConfig>> {
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then lets open connections
/// finish (up to 30 s).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (acceptor, builder, watcher) = (acceptor.clone(), builder.clone(), graceful.watcher());
        let app = app.clone().layer(axum::Extension(ConnectInfo::<SocketAddr>(peer)));
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(app));
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_a_pair_are_refused_with_the_path() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key) = (d.path().join("tls.crt"), d.path().join("tls.key"));
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let e = ReloadingCert::load(&cert, &key).unwrap_err();
        assert!(e.message.contains("tls.crt"), "{}", e.message);
        let e = ReloadingCert::load(&d.path().join("missing.crt"), &key).unwrap_err();
        assert!(e.message.contains("missing.crt"), "{}", e.message);
    }
}

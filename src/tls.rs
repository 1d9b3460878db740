//! The proxy's TLS certificate: loaded from PEM files at start, served to every handshake from
//! memory, and loaded again when the files change (checked every few seconds) or on `SIGHUP`,
//! so that a renewed certificate needs no restart. A renewal that cannot be loaded (a key
//! that does not match, a half-written file) keeps the certificate in use and says why.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use pingora_core::tls::sign::CertifiedKey;
use pingora_core::tls::CryptoProvider;
use pingora_core::tls::{ClientHello, ResolvesServerCert};

/// How often the certificate files are looked at for a change.
pub const RECHECK: Duration = Duration::from_secs(5);

/// What identifies a version of the two files: their modification times, sizes and inodes.
type Stamp = Option<[(SystemTime, u64, u64); 2]>;

/// The certificate chain and key the proxy presents, and where they come from.
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files as they were when last loaded (or tried).
    stamp: Mutex<Stamp>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

fn stamp_of(paths: [&Path; 2]) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let mut out = [(SystemTime::UNIX_EPOCH, 0, 0); 2];
    for (slot, path) in out.iter_mut().zip(paths) {
        let meta = std::fs::metadata(path).ok()?;
        *slot = (meta.modified().ok()?, meta.len(), meta.ino());
    }
    Some(out)
}

/// Reads a certificate chain and its private key, and checks that they belong together.
pub fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    pingora_core::tls::install_default_crypto_provider();
    let (cert_text, key_text) = (cert.display().to_string(), key.display().to_string());
    for (path, what) in [(cert, "certificate chain"), (key, "private key")] {
        std::fs::metadata(path)
            .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    }
    let (chain, private) = pingora_core::tls::load_certs_and_key_files(&cert_text, &key_text)
        .map_err(|e| format!("cannot read {cert_text} and {key_text}: {e}"))?
        .ok_or_else(|| {
            format!("{cert_text} holds no PEM certificate or {key_text} no PEM private key")
        })?;
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| "no TLS crypto provider is installed".to_owned())?;
    CertifiedKey::from_der(chain, private, provider)
        .map_err(|e| format!("{key_text} is not the key of {cert_text}, or not usable: {e}"))
}

impl CertStore {
    /// Loads the files: an error says which and why.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, String> {
        let stamp = stamp_of([cert, key]);
        let certified = read(cert, key)?;
        Ok(Arc::new(CertStore {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(certified)),
            stamp: Mutex::new(stamp),
        }))
    }

    /// Loads the files again when `force` or when they changed since they were last read:
    /// `Ok(true)` when a new certificate is in use, `Err` (the old one stays) when the new
    /// files cannot be used.
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let now = stamp_of([&self.cert, &self.key]);
        {
            let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *last == now {
                return Ok(false);
            }
            *last = now;
        }
        let certified = read(&self.cert, &self.key)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.cert == certified.cert {
            return Ok(false);
        }
        *current = Arc::new(certified);
        Ok(true)
    }

    /// Checks the files every [`RECHECK`] and on `SIGHUP` until the process ends, saying in
    /// the log what it loaded or why it could not.
    pub async fn watch(self: Arc<Self>) {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let forced = match hangup.as_mut() {
                Some(signal) => tokio::select! {
                    _ = signal.recv() => true,
                    _ = tokio::time::sleep(RECHECK) => false,
                },
                None => {
                    tokio::time::sleep(RECHECK).await;
                    false
                }
            };
            match self.reload(forced) {
                Ok(true) => {
                    log::info!("TLS: loaded a new certificate from {}", self.cert.display())
                }
                Ok(false) => {}
                Err(e) => log::warn!("TLS: kept the certificate in use: {e}"),
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

/// [`CertStore::watch`] as a Pingora background service.
pub struct CertWatch(pub Arc<CertStore>);

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for CertWatch {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        tokio::select! {
            _ = Arc::clone(&self.0).watch() => {}
            _ = shutdown.changed() => {}
        }
    }
}

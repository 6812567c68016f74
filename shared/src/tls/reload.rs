//! Certificate rotation without a restart.
//!
//! A node's TLS directory is looked at every [`RELOAD_INTERVAL`]: when `ca.pem`, `cert.pem`,
//! `key.pem` or `crl.pem` changed (size or modification time), the identity is loaded again
//! and the QUIC endpoint's server and client configurations ([`watch`]) or the control
//! plane's HTTPS material ([`watch_http`], see [`super::http`]) are replaced. New connections
//! use the new certificate and revocation list at once. Established QUIC connections are
//! checked again ([`super::live`]): those whose peer certificate no longer passes (revoked)
//! are closed. The control plane's HTTPS connections are checked per request by the
//! tracker ([`super::http::require_trusted_caller`]). A directory caught half-written (a
//! key that does not match the certificate) is logged and tried again at the next look,
//! and the old configuration stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::{Role, TlsError, TlsIdentity, CA_CERT_FILE, CERT_FILE, CRL_FILE, KEY_FILE};

/// How often the TLS directory is looked at.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// A certificate expiring sooner than this is warned about at every load.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// The client configuration a node dials peers with; replaced when its TLS directory is
/// reloaded. Cheap to clone (every clone sees the replacement).
#[derive(Clone)]
pub struct ClientTls(Arc<RwLock<quinn::ClientConfig>>);

impl ClientTls {
    pub fn new(config: quinn::ClientConfig) -> Self {
        Self(Arc::new(RwLock::new(config)))
    }

    /// The configuration to dial with now.
    pub fn current(&self) -> quinn::ClientConfig {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, config: quinn::ClientConfig) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

type Fingerprint = Vec<Option<(SystemTime, u64)>>;

fn fingerprint(dir: &Path) -> Fingerprint {
    [CA_CERT_FILE, CERT_FILE, KEY_FILE, CRL_FILE]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// Logs how long the node's certificate has left; a warning inside [`EXPIRY_WARNING`].
pub fn log_expiry(identity: &TlsIdentity) {
    let Some(not_after) = identity.expires_at() else { return };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let left = not_after - now;
    if left <= 0 {
        tracing::error!(role = %identity.role(), "node certificate has expired: peers refuse it; issue a new one");
    } else if left < EXPIRY_WARNING.as_secs() as i64 {
        tracing::warn!(role = %identity.role(), hours = left / 3600, "node certificate expires soon; issue a new one");
    } else {
        tracing::info!(role = %identity.role(), days = left / 86400, "node certificate loaded");
    }
}

fn apply(
    dir: &Path,
    role: Role,
    endpoint: &quinn::Endpoint,
    client: &ClientTls,
) -> Result<TlsIdentity, TlsError> {
    let identity = TlsIdentity::load(dir)?;
    // A certificate re-issued for another role (`ca issue` without `--role`) is refused:
    // peers would stop trusting this node.
    identity.require_role(role)?;
    let server = identity.server_config()?;
    let client_config = identity.client_config()?;
    endpoint.set_server_config(Some(server));
    client.set(client_config);
    Ok(identity)
}

/// Reloads `dir` into `endpoint` (what it accepts with) and `client` (what it dials with)
/// whenever it changes and still holds a certificate for `role`, looking every `every`,
/// until `shutdown`; after each reload, closes the connections of `live` whose peer
/// certificate no longer passes.
pub async fn watch(
    dir: PathBuf,
    role: Role,
    endpoint: quinn::Endpoint,
    client: ClientTls,
    live: super::live::LiveConnections,
    every: Duration,
    shutdown: CancellationToken,
) {
    watch_with(dir, "peer", every, shutdown, |dir| {
        let identity = apply(dir, role, &endpoint, &client)?;
        let closed = live.close_untrusted(&identity)?;
        if closed > 0 {
            tracing::warn!(closed, "closed peer connections whose certificate is no longer trusted");
        }
        Ok(identity)
    })
    .await
}

/// Reloads `dir` into `tls` (the control plane's HTTPS identity and verifiers) whenever it
/// changes and still holds a certificate for `role`, looking every `every`, until `shutdown`.
pub async fn watch_http(
    dir: PathBuf,
    role: Role,
    tls: super::http::HttpTls,
    every: Duration,
    shutdown: CancellationToken,
) {
    watch_with(dir, "control", every, shutdown, |dir| {
        let identity = TlsIdentity::load(dir)?;
        identity.require_role(role)?;
        tls.replace(&identity)?;
        Ok(identity)
    })
    .await
}

async fn watch_with(
    dir: PathBuf,
    plane: &'static str,
    every: Duration,
    shutdown: CancellationToken,
    mut apply: impl FnMut(&Path) -> Result<TlsIdentity, TlsError>,
) {
    let mut seen = fingerprint(&dir);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = fingerprint(&dir);
        if now == seen {
            continue;
        }
        match apply(&dir) {
            Ok(identity) => {
                seen = now;
                tracing::info!(dir = %dir.display(), plane, "TLS directory changed: certificate and revocation list reloaded");
                log_expiry(&identity);
            }
            // Maybe caught mid-write: the next look tries again.
            Err(e) => {
                tracing::warn!(dir = %dir.display(), plane, cause = %e, "TLS directory changed but does not load; keeping the old one")
            }
        }
    }
}

//! A rogue peer: serves whatever [`PieceSource`] a test hands it with a certificate from the
//! cluster CA and keeps announcing itself to the tracker as a seeder, so tests can check
//! that agents survive peers that lie, stall or corrupt.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use shoal_shared::client::Announce;
use shoal_shared::digest::Digest;
use shoal_shared::peer::{PeerStats, PieceSource};
use shoal_shared::tls::Role;
use shoal_shared::tracker::TrackerClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Cluster;

impl Cluster {
    /// Starts a peer serving `source` with a certificate from the cluster CA, and keeps
    /// announcing it to the tracker as a seeder of `digests` until it is stopped.
    pub async fn start_rogue_peer<S: PieceSource>(
        &self,
        name: &str,
        source: S,
        digests: Vec<Digest>,
    ) -> anyhow::Result<RoguePeer> {
        let tls = self.dir.path().join(format!("rogue-{name}"));
        shoal_shared::tls::issue(&self.ca_dir, name, Role::Agent, &tls)?;
        let identity = shoal_shared::tls::TlsIdentity::load(&tls)?;
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding UDP")?;
        let addr = socket.local_addr()?;
        let endpoint = shoal_shared::tls::endpoint(socket, &identity)?;
        let shutdown = CancellationToken::new();
        let stats = Arc::new(PeerStats::default());
        let server = tokio::spawn(shoal_shared::peer::serve(
            endpoint,
            Arc::new(source),
            stats.clone(),
            shoal_shared::peer::UploadLimits { budget: 64 << 20, queue: 16 },
            Default::default(),
            shutdown.clone(),
        ));
        // The guard first: if the announce below fails, dropping it stops the server.
        let mut peer = RoguePeer { addr, stats, shutdown: shutdown.clone(), tasks: vec![server] };
        let http = shoal_shared::tls::http::HttpTls::new(&identity)?;
        let tracker = TrackerClient::with_tls(std::slice::from_ref(&self.tracker_url), &http)?;
        for digest in &digests {
            tracker.announce(&Announce { digest: *digest, peer: addr, complete: true }).await?;
        }
        let announcer = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    for digest in &digests {
                        let _ =
                            tracker.announce(&Announce { digest: *digest, peer: addr, complete: true }).await;
                    }
                }
            }
        });
        peer.tasks.push(announcer);
        Ok(peer)
    }
}

/// A peer started by [`Cluster::start_rogue_peer`]; stopped when dropped.
#[derive(Debug)]
pub struct RoguePeer {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// What its server counted.
    pub stats: Arc<PeerStats>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RoguePeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

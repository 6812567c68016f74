//! The QUIC connections a node holds open, so that a revocation reaches them too.
//!
//! A handshake checks the peer's certificate once. A certificate revoked later is refused
//! on every new connection as soon as the node reloads its TLS directory
//! ([`super::reload`]), but a connection made before would carry on until it is idle for
//! 30 s or the node restarts. So the peer server ([`crate::peer::serve`]) and the peer
//! client's pool ([`crate::peer::PeerClient`]) record every connection they establish here,
//! and each reload calls [`LiveConnections::close_untrusted`]: every open connection's peer
//! chain is checked again, with the same webpki verifiers as a handshake, against the new
//! CA and revocation list, and those that no longer pass are closed with
//! [`NO_LONGER_TRUSTED`].
//!
//! One owner: the set lives behind one mutex that is never held across an await; entries
//! of closed connections are dropped whenever a connection is recorded or a check runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use quinn::{Connection, VarInt};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::{TlsError, TlsIdentity, PEER_SERVER_NAME};

/// QUIC application close code: the peer's certificate no longer passes (revoked, or not
/// from the cluster CA any more).
pub const NO_LONGER_TRUSTED: u32 = 3;

/// Which end of a connection this node is: what the peer's certificate was checked as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The peer dialled us: its certificate is a client certificate.
    Accepted,
    /// We dialled the peer: its certificate is a server certificate.
    Dialled,
}

#[derive(Debug)]
struct Entry {
    conn: Connection,
    side: Side,
}

/// The open QUIC connections of one node. Cheap to clone (every clone is the same set).
#[derive(Debug, Clone, Default)]
pub struct LiveConnections(Arc<Mutex<HashMap<usize, Entry>>>);

impl LiveConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Entry>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an established connection (and forgets the ones that have closed).
    pub fn track(&self, conn: &Connection, side: Side) {
        let mut set = self.lock();
        set.retain(|_, e| e.conn.close_reason().is_none());
        set.insert(conn.stable_id(), Entry { conn: conn.clone(), side });
    }

    /// How many recorded connections are still open.
    pub fn open(&self) -> usize {
        self.lock().values().filter(|e| e.conn.close_reason().is_none()).count()
    }

    /// Checks every open connection's peer certificate against `identity`'s CA and
    /// revocation list, as a new handshake would, and closes those that fail. Returns how
    /// many were closed.
    pub fn close_untrusted(&self, identity: &TlsIdentity) -> Result<usize, TlsError> {
        let clients = identity.client_verifier()?;
        let servers = identity.server_verifier()?;
        let name = ServerName::try_from(PEER_SERVER_NAME)
            .map_err(|_| TlsError::Config(rustls::Error::General("server name".into())))?;
        let open: Vec<(Connection, Side)> = {
            let mut set = self.lock();
            set.retain(|_, e| e.conn.close_reason().is_none());
            set.values().map(|e| (e.conn.clone(), e.side)).collect()
        };
        let now = UnixTime::now();
        let mut closed = 0;
        for (conn, side) in open {
            let chain = conn
                .peer_identity()
                .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|c| *c)
                .unwrap_or_default();
            let trusted = match chain.split_first() {
                None => false,
                Some((leaf, rest)) => match side {
                    Side::Accepted => clients.verify_client_cert(leaf, rest, now).is_ok(),
                    Side::Dialled => servers.verify_server_cert(leaf, rest, &name, &[], now).is_ok(),
                },
            };
            if !trusted {
                tracing::warn!(peer = %conn.remote_address(), ?side, "closing connection: the peer's certificate is no longer trusted (revoked?)");
                conn.close(VarInt::from_u32(NO_LONGER_TRUSTED), b"certificate no longer trusted");
                closed += 1;
            }
        }
        Ok(closed)
    }
}

//! The peer protocol over QUIC: serving pieces and fetching them.
//!
//! One bidirectional stream per request (see [`crate::wire`]). The server side is generic
//! over a [`PieceSource`], so the origin (whole blobs on disk) and the agent (its cache plus
//! downloads in progress) share the same code. The client side keeps one connection per
//! peer address, shared by every download, and returns pieces only as [`VerifiedPiece`]s.
//!
//! Bounds: request frames are at most [`wire::MAX_FRAME`] bytes and must arrive within
//! [`REQUEST_TIMEOUT`]; a malformed frame closes the whole connection; piece bodies are
//! allocated only after their length has been checked against the metainfo; concurrent piece
//! reads on the server are capped by a semaphore.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{watch, OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bitfield::{Bitfield, BitfieldError};
use crate::digest::Digest;
use crate::metainfo::{Metainfo, MetainfoError, VerifiedPiece};
use crate::ratelimit::RateLimiter;
use crate::tls::live::{LiveConnections, Side};
use crate::tls::PEER_SERVER_NAME;
use crate::wire::{self, FrameError, Refusal, Request, Response, MAX_HAVES, PROTOCOL_VERSION};

/// How long a peer may take to send its request frame.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Application error code for a protocol violation.
const PROTOCOL_VIOLATION: u32 = 1;
/// Application error code for a peer we no longer want (bad piece).
const BANNED: u32 = 2;

/// What a peer server can serve.
pub trait PieceSource: Send + Sync + 'static {
    /// The pieces held of `digest`, or `None` if the blob is unknown here.
    fn bitfield(&self, digest: Digest) -> impl Future<Output = Option<Bitfield>> + Send;
    /// The bytes of a held piece, or `None`. Must only return verified bytes.
    fn piece(&self, digest: Digest, index: u32) -> impl Future<Output = Option<Bytes>> + Send;
    /// The length of piece `index` of `digest` if known, before reading it: what sending it
    /// takes from the upload budget ([`UploadLimits`]). Unknown: counted as [`DEFAULT_COST`].
    fn piece_size(&self, _digest: Digest, _index: u32) -> impl Future<Output = Option<u32>> + Send {
        async { None }
    }
    /// Follows the pieces held of a blob still downloading, or `None` (unknown, or not
    /// downloading: ask for the bitfield instead). The stream ends when the sender drops.
    /// `from` is the subscriber's address (its peer server, as agents connect from the
    /// endpoint they serve on): a subscriber is downloading the blob too, worth following.
    fn subscribe(
        &self,
        _digest: Digest,
        _from: SocketAddr,
    ) -> impl Future<Output = Option<watch::Receiver<Bitfield>>> + Send {
        async { None }
    }
}

/// Counters kept by a peer server, exported as metrics.
#[derive(Debug, Default, Clone)]
pub struct PeerStats {
    pub pieces_served: Counter,
    pub bytes_served: Counter,
    pub protocol_errors: Counter,
    pub connections: Counter,
    pub busy: Counter,
}

impl PeerStats {
    /// Registers the counters under `shoal_peer_*`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_peer");
        r.register("pieces_served", "Pieces sent to peers", self.pieces_served.clone());
        r.register("bytes_served", "Piece bytes sent to peers", self.bytes_served.clone());
        r.register(
            "protocol_errors",
            "Connections closed for protocol violations",
            self.protocol_errors.clone(),
        );
        r.register("connections", "Peer connections accepted", self.connections.clone());
        r.register("busy", "Piece requests refused past the upload budget", self.busy.clone());
    }
}

/// What a piece of unknown length costs in upload budget.
pub const DEFAULT_COST: u32 = 1 << 20;
/// Unit of the upload budget's semaphore.
const BUDGET_UNIT: u64 = 64 << 10;
/// Longest sending one piece (writing it and waiting for its acknowledgement) holds its share
/// of the budget; past it the stream is reset.
const ACK_HOLD: Duration = Duration::from_secs(60);

/// A peer server's upload budget: piece bytes being sent at once, and requests that may
/// wait for some of it.
///
/// A piece holds its share from before it is read until the requester has acknowledged
/// every byte (not merely until QUIC has buffered it), so the budget bounds what is on the
/// wire. Past the budget, up to `queue` requests wait; more are refused [`Refusal::Busy`] at
/// once and the requester asks elsewhere. Few pieces at once, each at a larger share of the
/// uplink, is what makes a swarm a pipeline: a piece is re-shared only when complete, so
/// every extra concurrent upload delays every hop (see docs/ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Piece bytes sent at once (a piece larger than this is sent alone).
    pub budget: u64,
    /// Requests waiting for budget; past that, Busy.
    pub queue: usize,
}

#[derive(Debug)]
struct Uploads {
    budget: Semaphore,
    units: u32,
    line: Semaphore,
}

impl Uploads {
    fn new(limits: UploadLimits) -> Self {
        let units = (limits.budget / BUDGET_UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        let queue = limits.queue.min(Semaphore::MAX_PERMITS);
        Self { budget: Semaphore::new(units as usize), units, line: Semaphore::new(queue) }
    }

    /// Budget for a piece of `size` bytes, waiting in line if there is room there; `None`:
    /// refuse Busy.
    async fn acquire(&self, size: u32) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let need = u64::from(size).div_ceil(BUDGET_UNIT).clamp(1, u64::from(self.units)) as u32;
        if let Ok(p) = self.budget.try_acquire_many(need) {
            return Some(p);
        }
        let _waiting = self.line.try_acquire().ok()?;
        self.budget.acquire_many(need).await.ok()
    }
}

/// Serves `source` on `endpoint` until `shutdown` fires, within the upload `limits`.
/// Every accepted connection is recorded in `live`, so a reload of the TLS directory can
/// close it when its peer's certificate is revoked.
pub async fn serve<S: PieceSource>(
    endpoint: Endpoint,
    source: Arc<S>,
    stats: Arc<PeerStats>,
    limits: UploadLimits,
    live: LiveConnections,
    shutdown: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let uploads = Arc::new(Uploads::new(limits));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let (source, stats, uploads, live, shutdown) =
            (source.clone(), stats.clone(), uploads.clone(), live.clone(), shutdown.clone());
        tasks.spawn(async move {
            let remote = incoming.remote_address();
            // The handshake (and its client-certificate check) runs inside the task.
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(peer = %remote, cause = %e, "peer handshake refused");
                    return;
                }
            };
            stats.connections.inc();
            live.track(&conn, Side::Accepted);
            tracing::debug!(peer = %remote, "peer connected");
            serve_connection(conn, source, stats, uploads, shutdown).await;
        });
    }
    endpoint.close(VarInt::from_u32(0), b"shutdown");
    tasks.close();
    tasks.wait().await;
}

async fn serve_connection<S: PieceSource>(
    conn: Connection,
    source: Arc<S>,
    stats: Arc<PeerStats>,
    uploads: Arc<Uploads>,
    shutdown: CancellationToken,
) {
    let streams = TaskTracker::new();
    loop {
        let (send, recv) = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(peer = %conn.remote_address(), cause = %e, "peer connection ended");
                    break;
                }
            },
        };
        let (conn, source, stats, uploads) = (conn.clone(), source.clone(), stats.clone(), uploads.clone());
        streams.spawn(async move {
            let from = conn.remote_address();
            if let Err(e) = serve_stream(send, recv, from, &*source, &stats, &uploads).await {
                match e {
                    StreamError::Protocol(e) => {
                        stats.protocol_errors.inc();
                        tracing::warn!(peer = %conn.remote_address(), cause = %e, "closing connection: protocol violation");
                        conn.close(VarInt::from_u32(PROTOCOL_VIOLATION), b"protocol violation");
                    }
                    StreamError::Io(e) => {
                        tracing::debug!(peer = %conn.remote_address(), cause = %e, "stream ended early");
                    }
                }
            }
        });
    }
    streams.close();
    streams.wait().await;
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Protocol(#[from] FrameError),
    #[error("{0}")]
    Io(String),
}

async fn serve_stream<S: PieceSource>(
    mut send: SendStream,
    mut recv: RecvStream,
    from: SocketAddr,
    source: &S,
    stats: &PeerStats,
    uploads: &Uploads,
) -> Result<(), StreamError> {
    let request: Request = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            // Reset rather than drop: dropping would end the stream cleanly before the
            // connection close reaches the peer.
            let _ = send.reset(VarInt::from_u32(PROTOCOL_VIOLATION));
            return Err(e);
        }
        Err(_) => {
            let _ = send.reset(VarInt::from_u32(PROTOCOL_VIOLATION));
            return Err(StreamError::Io("request timed out".into()));
        }
    };
    let io = |e: quinn::WriteError| StreamError::Io(e.to_string());
    match request {
        Request::Bitfield { version, .. }
        | Request::Piece { version, .. }
        | Request::Subscribe { version, .. }
            if version != PROTOCOL_VERSION =>
        {
            write_frame(&mut send, &Response::Refused(Refusal::Version)).await?;
        }
        Request::Bitfield { digest, .. } => {
            let response = match source.bitfield(digest).await {
                Some(bits) => Response::Bitfield(bits),
                None => Response::Refused(Refusal::NotFound),
            };
            write_frame(&mut send, &response).await?;
        }
        Request::Piece { digest, index, .. } => {
            let size = source.piece_size(digest, index).await.unwrap_or(DEFAULT_COST);
            // A requester that gives up (its deadline, an endgame loss) stops the stream:
            // then stop waiting for budget, reading or the egress limit on its behalf.
            let gone = send.stopped();
            let permit = tokio::select! {
                permit = uploads.acquire(size) => permit,
                _ = gone => return Ok(()),
            };
            let Some(_permit) = permit else {
                stats.busy.inc();
                write_frame(&mut send, &Response::Refused(Refusal::Busy)).await?;
                let _ = send.finish();
                return Ok(());
            };
            let gone = send.stopped();
            let data = tokio::select! {
                data = source.piece(digest, index) => data,
                _ = gone => return Ok(()),
            };
            match data {
                Some(data) => {
                    // The budget is held until the requester has every byte, gives up, or
                    // ACK_HOLD passes, whichever is first.
                    let sent = tokio::time::timeout(ACK_HOLD, async {
                        let length = data.len() as u32;
                        write_frame(&mut send, &Response::Piece { index, length }).await?;
                        send.write_chunk(data).await.map_err(io)?;
                        stats.pieces_served.inc();
                        stats.bytes_served.inc_by(u64::from(length));
                        let _ = send.finish();
                        let _ = send.stopped().await;
                        Ok::<(), StreamError>(())
                    })
                    .await;
                    return match sent {
                        Ok(result) => result,
                        Err(_) => {
                            let _ = send.reset(VarInt::from_u32(0));
                            Err(StreamError::Io("piece not acknowledged in time".into()))
                        }
                    };
                }
                None => write_frame(&mut send, &Response::Refused(Refusal::NotFound)).await?,
            }
        }
        Request::Subscribe { digest, .. } => match source.subscribe(digest, from).await {
            Some(rx) => stream_haves(&mut send, rx).await?,
            None => write_frame(&mut send, &Response::Refused(Refusal::NotFound)).await?,
        },
    }
    let _ = send.finish();
    Ok(())
}

/// Writes the bitfield, then the indices of pieces as they arrive, until every piece is
/// held or the download ends. The watch keeps only the latest bitfield, so a slow reader
/// costs one bitfield of memory however far behind it is, and gets one batched frame.
async fn stream_haves(send: &mut SendStream, mut rx: watch::Receiver<Bitfield>) -> Result<(), StreamError> {
    let mut sent = rx.borrow_and_update().clone();
    write_frame(send, &Response::Bitfield(sent.clone())).await?;
    // Ends when the subscriber goes away or the connection closes (the server shutting
    // down closes its endpoint), not only when the download does: a stream waiting for
    // news of a stalled download must not hold up the server's shutdown.
    let gone = send.stopped();
    tokio::pin!(gone);
    while !sent.is_complete() {
        let changed = tokio::select! {
            changed = rx.changed() => changed,
            _ = &mut gone => break,
        };
        if changed.is_err() {
            break;
        }
        let now = rx.borrow_and_update().clone();
        if now.len() != sent.len() {
            break;
        }
        let new: Vec<u32> = now.iter().filter(|&i| !sent.get(i)).collect();
        for batch in new.chunks(MAX_HAVES) {
            write_frame(send, &Response::Have(batch.to_vec())).await?;
        }
        sent = now;
    }
    Ok(())
}

impl From<quinn::WriteError> for StreamError {
    fn from(e: quinn::WriteError) -> Self {
        StreamError::Io(e.to_string())
    }
}

async fn write_frame<T: serde::Serialize>(send: &mut SendStream, msg: &T) -> Result<(), StreamError> {
    let frame = wire::encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame; garbage or oversized frames are protocol errors, a closed stream is I/O.
async fn read_frame<T: serde::de::DeserializeOwned>(recv: &mut RecvStream) -> Result<T, StreamError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(|e| StreamError::Io(e.to_string()))?;
    let len = wire::frame_len(header)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| StreamError::Io(e.to_string()))?;
    Ok(wire::decode_body(&body)?)
}

/// Why fetching from a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot connect to {addr}: {cause}")]
    Connect { addr: SocketAddr, cause: String },
    #[error("peer {addr}: {cause}")]
    Transport { addr: SocketAddr, cause: String },
    #[error("peer {addr} broke the protocol: {cause}")]
    Protocol { addr: SocketAddr, cause: String },
    #[error("peer {addr} refused: {refusal:?}")]
    Refused { addr: SocketAddr, refusal: Refusal },
    #[error("peer {addr} sent a bad piece: {cause}")]
    BadPiece { addr: SocketAddr, cause: MetainfoError },
    #[error("peer {addr} sent a bad bitfield: {cause}")]
    BadBitfield { addr: SocketAddr, cause: BitfieldError },
}

impl PeerError {
    /// True when the peer misbehaved (as opposed to being unreachable or not having data).
    pub fn is_misbehaviour(&self) -> bool {
        matches!(self, Self::Protocol { .. } | Self::BadPiece { .. } | Self::BadBitfield { .. })
    }
}

type ConnCell = Arc<OnceCell<Connection>>;

/// A connection (or one being made) and when a request last went through it.
#[derive(Debug)]
struct Slot {
    cell: ConnCell,
    used: std::time::Instant,
}

/// How long a connection must have carried no new request before the cap may close it for
/// another peer.
const IDLE_BEFORE_EVICT: Duration = Duration::from_secs(10);

/// Fetches from peers, one QUIC connection per peer address shared by all downloads.
#[derive(Debug, Clone)]
pub struct PeerClient {
    endpoint: Endpoint,
    /// What to dial with, when it is reloaded at run time (else the endpoint's default).
    tls: Option<crate::tls::reload::ClientTls>,
    conns: Arc<Mutex<HashMap<SocketAddr, Slot>>>,
    /// Piece bytes received pass this limiter (QUIC flow control then slows the sender).
    ingress: Option<Arc<RateLimiter>>,
    max_connections: usize,
    idle_before_evict: Duration,
    /// Where dialled connections are recorded for revocation checks.
    live: LiveConnections,
}

/// Default cap on the peers a host keeps connections to at once.
pub const MAX_CONNECTIONS: usize = 256;

impl PeerClient {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            tls: None,
            conns: Arc::default(),
            ingress: None,
            max_connections: MAX_CONNECTIONS,
            idle_before_evict: IDLE_BEFORE_EVICT,
            live: LiveConnections::default(),
        }
    }

    /// Records every connection this client makes in `live`, so a reload of the TLS
    /// directory can close the ones to a peer whose certificate is revoked.
    pub fn with_live_connections(mut self, live: LiveConnections) -> Self {
        self.live = live;
        self
    }

    /// Dials with `tls`, which follows the node's TLS directory as it is reloaded.
    pub fn with_client_tls(mut self, tls: crate::tls::reload::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Limits the rate at which piece bytes are read, all peers together.
    pub fn with_ingress_limit(mut self, limiter: Option<Arc<RateLimiter>>) -> Self {
        self.ingress = limiter;
        self
    }

    /// Caps the peers this host is connected to at once (at least 1). At the cap, the
    /// connection idle longest (no request for [`IDLE_BEFORE_EVICT`]) is closed to make room;
    /// if none is idle, a download that needs one more is refused ([`PeerError::Connect`])
    /// and backs that peer off.
    /// Peers this host holds a connection (or a dial) to now.
    pub fn connected(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    #[cfg(test)]
    fn with_idle_before_evict(mut self, idle: Duration) -> Self {
        self.idle_before_evict = idle;
        self
    }

    fn cell(&self, addr: SocketAddr) -> Result<ConnCell, PeerError> {
        let now = std::time::Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if !conns.contains_key(&addr) && conns.len() >= self.max_connections {
            // Forget connections that closed (or never opened), then close the idlest one
            // nobody is connecting through, before refusing.
            conns.retain(|_, s| {
                Arc::strong_count(&s.cell) > 1 || s.cell.get().is_some_and(|c| c.close_reason().is_none())
            });
            if conns.len() >= self.max_connections {
                let idlest = conns
                    .iter()
                    .filter(|(_, s)| {
                        Arc::strong_count(&s.cell) == 1
                            && now.duration_since(s.used) >= self.idle_before_evict
                    })
                    .min_by_key(|(_, s)| s.used)
                    .map(|(&a, _)| a);
                let Some(idlest) = idlest else {
                    return Err(PeerError::Connect { addr, cause: "connection cap reached".into() });
                };
                if let Some(conn) = conns.remove(&idlest).and_then(|s| s.cell.get().cloned()) {
                    conn.close(VarInt::from_u32(0), b"idle");
                }
            }
        }
        let slot = conns.entry(addr).or_insert_with(|| Slot { cell: ConnCell::default(), used: now });
        slot.used = now;
        if slot.cell.get().is_some_and(|c| c.close_reason().is_some()) {
            slot.cell = ConnCell::default();
        }
        Ok(slot.cell.clone())
    }

    /// The live connection to `addr`, connecting (once, for all callers) if needed.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Connection, PeerError> {
        let cell = self.cell(addr)?;
        let conn = cell
            .get_or_try_init(|| async {
                let connecting = match &self.tls {
                    Some(tls) => self.endpoint.connect_with(tls.current(), addr, PEER_SERVER_NAME),
                    None => self.endpoint.connect(addr, PEER_SERVER_NAME),
                }
                .map_err(|e| PeerError::Connect { addr, cause: e.to_string() })?;
                let conn = connecting.await.map_err(|e| PeerError::Connect { addr, cause: e.to_string() })?;
                self.live.track(&conn, Side::Dialled);
                Ok::<_, PeerError>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// The role the certificate of the peer at `addr` carries (connecting if needed).
    pub async fn role(&self, addr: SocketAddr) -> Result<Option<crate::tls::Role>, PeerError> {
        Ok(crate::tls::peer_role(&self.connection(addr).await?))
    }

    /// Closes the connection to a peer that misbehaved.
    pub fn ban(&self, addr: SocketAddr) {
        let slot = self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
        if let Some(conn) = slot.as_ref().and_then(|s| s.cell.get()) {
            conn.close(VarInt::from_u32(BANNED), b"bad piece");
        }
    }

    async fn request(
        &self,
        addr: SocketAddr,
        request: &Request,
    ) -> Result<(Response, RecvStream), PeerError> {
        let conn = self.connection(addr).await?;
        let transport = |cause: String| PeerError::Transport { addr, cause };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(e.to_string()))?;
        let frame =
            wire::encode_frame(request).map_err(|e| PeerError::Protocol { addr, cause: e.to_string() })?;
        send.write_all(&frame).await.map_err(|e| transport(e.to_string()))?;
        let _ = send.finish();
        match read_frame::<Response>(&mut recv).await {
            Ok(Response::Refused(refusal)) => Err(PeerError::Refused { addr, refusal }),
            Ok(response) => Ok((response, recv)),
            Err(StreamError::Io(cause)) => Err(transport(cause)),
            Err(StreamError::Protocol(e)) => {
                conn.close(VarInt::from_u32(PROTOCOL_VIOLATION), b"protocol violation");
                Err(PeerError::Protocol { addr, cause: e.to_string() })
            }
        }
    }

    /// Which pieces of `metainfo`'s blob `addr` holds.
    pub async fn bitfield(&self, addr: SocketAddr, metainfo: &Metainfo) -> Result<Bitfield, PeerError> {
        let request = Request::Bitfield { version: PROTOCOL_VERSION, digest: metainfo.digest() };
        match self.request(addr, &request).await? {
            (Response::Bitfield(bits), _) => {
                bits.validate(metainfo.piece_count()).map_err(|cause| PeerError::BadBitfield { addr, cause })
            }
            (other, _) => Err(PeerError::Protocol { addr, cause: format!("unexpected {}", other.kind()) }),
        }
    }

    /// Subscribes to `addr`'s pieces of `metainfo`'s blob: what it holds now, and a stream
    /// of the pieces it verifies from now on. Refused when `addr` is not downloading it.
    pub async fn subscribe(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
    ) -> Result<(Bitfield, HaveStream), PeerError> {
        let request = Request::Subscribe { version: PROTOCOL_VERSION, digest: metainfo.digest() };
        match self.request(addr, &request).await? {
            (Response::Bitfield(bits), recv) => {
                let pieces = metainfo.piece_count();
                let bits = bits.validate(pieces).map_err(|cause| PeerError::BadBitfield { addr, cause })?;
                let conn = self.connection(addr).await?;
                Ok((bits, HaveStream { addr, conn, recv, pieces }))
            }
            (other, _) => Err(PeerError::Protocol { addr, cause: format!("unexpected {}", other.kind()) }),
        }
    }

    /// Fetches piece `index` and checks it against the metainfo.
    pub async fn piece(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
        index: u32,
    ) -> Result<VerifiedPiece, PeerError> {
        let expected = metainfo.piece_size(index).map_err(|cause| PeerError::BadPiece { addr, cause })?;
        let request = Request::Piece { version: PROTOCOL_VERSION, digest: metainfo.digest(), index };
        let (response, mut recv) = self.request(addr, &request).await?;
        match response {
            Response::Piece { index: got, length } if got == index && length == expected => {
                // Allocation bounded by the metainfo's piece length, not by the peer; filled
                // from quinn's chunks without zeroing it first.
                let length = length as usize;
                let mut buf = BytesMut::with_capacity(length);
                while buf.len() < length {
                    let chunk = recv
                        .read_chunk(length - buf.len(), true)
                        .await
                        .map_err(|e| PeerError::Transport { addr, cause: e.to_string() })?
                        .ok_or_else(|| PeerError::Transport { addr, cause: "piece cut short".into() })?;
                    if let Some(limiter) = &self.ingress {
                        limiter.acquire(chunk.bytes.len() as u64).await;
                    }
                    buf.extend_from_slice(&chunk.bytes);
                }
                metainfo
                    .verify_piece(index, buf.freeze())
                    .map_err(|cause| PeerError::BadPiece { addr, cause })
            }
            other => Err(PeerError::Protocol { addr, cause: format!("unexpected {}", other.kind()) }),
        }
    }
}

/// The pieces a peer announces on a [`Request::Subscribe`] stream. Dropping it resets the
/// stream.
#[derive(Debug)]
pub struct HaveStream {
    addr: SocketAddr,
    /// Closed when the peer breaks the protocol on this stream.
    conn: Connection,
    recv: RecvStream,
    pieces: u32,
}

impl HaveStream {
    /// The next batch of newly held pieces, every index checked against the blob; `None`
    /// once the peer finished the stream.
    pub async fn next(&mut self) -> Result<Option<Vec<u32>>, PeerError> {
        let next = self.read().await;
        if let Err(PeerError::Protocol { .. }) = &next {
            self.conn.close(VarInt::from_u32(PROTOCOL_VIOLATION), b"protocol violation");
        }
        next
    }

    async fn read(&mut self) -> Result<Option<Vec<u32>>, PeerError> {
        let addr = self.addr;
        let mut header = [0u8; 4];
        match self.recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(PeerError::Transport { addr, cause: e.to_string() }),
        }
        let protocol = |cause: String| PeerError::Protocol { addr, cause };
        let len = wire::frame_len(header).map_err(|e| protocol(e.to_string()))?;
        let mut body = vec![0u8; len];
        self.recv
            .read_exact(&mut body)
            .await
            .map_err(|e| PeerError::Transport { addr, cause: e.to_string() })?;
        match wire::decode_body::<Response>(&body).map_err(|e| protocol(e.to_string()))? {
            Response::Have(indices) if indices.len() <= MAX_HAVES => {
                if let Some(bad) = indices.iter().find(|&&i| i >= self.pieces) {
                    return Err(protocol(format!("have for piece {bad} of {}", self.pieces)));
                }
                Ok(Some(indices))
            }
            other => Err(protocol(format!("unexpected {} on a have stream", other.kind()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;
    use crate::metainfo::{MetainfoBuilder, MIN_PIECE_LENGTH};
    use crate::tls::{self, TlsIdentity};

    const WAIT: Duration = Duration::from_secs(10);

    /// Serves one blob still "downloading": its bitfield is a watch the test advances.
    struct Growing {
        digest: Digest,
        have: watch::Sender<Bitfield>,
    }

    impl PieceSource for Growing {
        async fn bitfield(&self, digest: Digest) -> Option<Bitfield> {
            (digest == self.digest).then(|| self.have.borrow().clone())
        }
        async fn piece(&self, _digest: Digest, _index: u32) -> Option<Bytes> {
            None
        }
        async fn subscribe(&self, digest: Digest, _from: SocketAddr) -> Option<watch::Receiver<Bitfield>> {
            (digest == self.digest).then(|| self.have.subscribe())
        }
    }

    struct Node {
        endpoint: Endpoint,
        have: watch::Sender<Bitfield>,
        _shutdown: tokio_util::sync::DropGuard,
    }

    fn node(dir: &std::path::Path, metainfo: &Metainfo) -> Node {
        let identity = TlsIdentity::load(dir).expect("identity");
        let endpoint =
            tls::endpoint(UdpSocket::bind("127.0.0.1:0").expect("udp"), &identity).expect("endpoint");
        let have = watch::Sender::new(Bitfield::new(metainfo.piece_count()));
        let source = Arc::new(Growing { digest: metainfo.digest(), have: have.clone() });
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            endpoint.clone(),
            source,
            Arc::default(),
            UploadLimits { budget: 4 << 20, queue: 4 },
            LiveConnections::default(),
            shutdown.clone(),
        ));
        Node { endpoint, have, _shutdown: shutdown.drop_guard() }
    }

    fn setup(names: &[&str]) -> (tempfile::TempDir, Vec<std::path::PathBuf>, Metainfo) {
        let tmp = tempfile::TempDir::new().expect("tmp");
        let ca = tmp.path().join("ca");
        tls::init_ca(&ca).expect("ca");
        let dirs = names
            .iter()
            .map(|n| {
                let out = tmp.path().join(n);
                tls::issue(&ca, n, tls::Role::Agent, &out).expect("issue");
                out
            })
            .collect();
        let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
        b.update(&vec![7u8; 10 * MIN_PIECE_LENGTH as usize]);
        (tmp, dirs, b.finish().expect("metainfo"))
    }

    #[tokio::test]
    async fn subscribers_get_haves_as_pieces_verify_and_the_end() {
        let (_tmp, dirs, m) = setup(&["server", "client"]);
        let server = node(&dirs[0], &m);
        let client = node(&dirs[1], &m);
        let peers = PeerClient::new(client.endpoint.clone());
        let addr = server.endpoint.local_addr().expect("addr");
        server.have.send_modify(|b| b.set(3));
        let (bits, mut haves) =
            tokio::time::timeout(WAIT, peers.subscribe(addr, &m)).await.expect("in time").expect("subscribe");
        assert_eq!(bits.iter().collect::<Vec<_>>(), vec![3]);
        server.have.send_modify(|b| b.set(0));
        let got = tokio::time::timeout(WAIT, haves.next()).await.expect("in time").expect("have");
        assert_eq!(got, Some(vec![0]));
        // Several pieces verified at once come as one batch; the stream ends once full.
        server.have.send_modify(|b| *b = Bitfield::full(10));
        let got = tokio::time::timeout(WAIT, haves.next()).await.expect("in time").expect("have");
        assert_eq!(got, Some(vec![1, 2, 4, 5, 6, 7, 8, 9]));
        assert_eq!(tokio::time::timeout(WAIT, haves.next()).await.expect("in time").expect("end"), None);
        // Unknown blobs are refused.
        let mut other = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
        other.update(b"other");
        let other = other.finish().expect("metainfo");
        let refused = peers.subscribe(addr, &other).await.map(|_| ());
        assert!(matches!(refused, Err(PeerError::Refused { refusal: Refusal::NotFound, .. })), "{refused:?}");
    }

    /// Serves every piece of one blob, each only once the test lets it through.
    struct Gated {
        metainfo: Metainfo,
        data: Bytes,
        entered: tokio::sync::mpsc::UnboundedSender<u32>,
        gate: Semaphore,
    }

    impl PieceSource for Gated {
        async fn bitfield(&self, _digest: Digest) -> Option<Bitfield> {
            Some(Bitfield::full(self.metainfo.piece_count()))
        }
        async fn piece_size(&self, _digest: Digest, index: u32) -> Option<u32> {
            self.metainfo.piece_size(index).ok()
        }
        async fn piece(&self, _digest: Digest, index: u32) -> Option<Bytes> {
            let _ = self.entered.send(index);
            self.gate.acquire().await.ok()?.forget();
            let start = self.metainfo.piece_offset(index) as usize;
            let len = self.metainfo.piece_size(index).ok()? as usize;
            Some(self.data.slice(start..start + len))
        }
    }

    #[tokio::test]
    async fn requests_past_the_budget_and_its_line_are_refused_busy() {
        let (_tmp, dirs, _) = setup(&["server", "client"]);
        let data = Bytes::from((0..4 * MIN_PIECE_LENGTH).map(|i| i as u8).collect::<Vec<u8>>());
        let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
        b.update(&data);
        let m = b.finish().expect("metainfo");
        let identity = TlsIdentity::load(&dirs[0]).expect("identity");
        let endpoint =
            tls::endpoint(UdpSocket::bind("127.0.0.1:0").expect("udp"), &identity).expect("endpoint");
        let addr = endpoint.local_addr().expect("addr");
        let (entered, mut entries) = tokio::sync::mpsc::unbounded_channel();
        let source = Arc::new(Gated { metainfo: m.clone(), data, entered, gate: Semaphore::new(0) });
        let stats = Arc::new(PeerStats::default());
        let shutdown = CancellationToken::new();
        let _guard = shutdown.clone().drop_guard();
        // Budget for one piece at a time, one request in line.
        let limits = UploadLimits { budget: u64::from(MIN_PIECE_LENGTH), queue: 1 };
        tokio::spawn(serve(endpoint, source.clone(), stats.clone(), limits, Default::default(), shutdown));
        let client = node(&dirs[1], &m);
        let peers = Arc::new(PeerClient::new(client.endpoint.clone()));

        let fetch = |index: u32| {
            let (peers, m) = (peers.clone(), m.clone());
            tokio::spawn(async move { peers.piece(addr, &m, index).await })
        };
        let first = fetch(0);
        let entered = tokio::time::timeout(WAIT, entries.recv()).await.expect("in time");
        assert_eq!(entered, Some(0), "the first request holds the budget");
        // Of two more, one waits in line and the other is refused at once.
        let (second, third) = (fetch(1), fetch(2));
        let refused = tokio::time::timeout(WAIT, async {
            loop {
                if second.is_finished() || third.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(refused.is_ok(), "one request must be refused without waiting");
        let (refused, waiting) = if second.is_finished() { (second, third) } else { (third, second) };
        let refused = refused.await.expect("task").map(|p| p.index());
        assert!(matches!(refused, Err(PeerError::Refused { refusal: Refusal::Busy, .. })), "{refused:?}");
        assert_eq!(stats.busy.get(), 1);
        assert!(!waiting.is_finished(), "the one in line waits for the budget");
        // Once the budget frees, the held and the waiting requests are served, whole.
        source.gate.add_permits(2);
        let got = tokio::time::timeout(WAIT, first).await.expect("in time").expect("task").expect("piece 0");
        assert_eq!(got.index(), 0);
        let got = tokio::time::timeout(WAIT, waiting).await.expect("in time").expect("task").expect("piece");
        assert!(got.index() == 1 || got.index() == 2);
        assert_eq!(stats.pieces_served.get(), 2);
        // And later requests get budget again.
        source.gate.add_permits(1);
        let got =
            tokio::time::timeout(WAIT, peers.piece(addr, &m, 3)).await.expect("in time").expect("piece 3");
        assert_eq!(got.index(), 3);
    }

    #[tokio::test]
    async fn open_subscriptions_do_not_hold_up_the_servers_shutdown() {
        let (_tmp, dirs, m) = setup(&["server", "client"]);
        let identity = TlsIdentity::load(&dirs[0]).expect("identity");
        let endpoint =
            tls::endpoint(UdpSocket::bind("127.0.0.1:0").expect("udp"), &identity).expect("endpoint");
        let addr = endpoint.local_addr().expect("addr");
        // A download that never progresses: its subscribers wait for news forever.
        let have = watch::Sender::new(Bitfield::new(m.piece_count()));
        let source = Arc::new(Growing { digest: m.digest(), have: have.clone() });
        let shutdown = CancellationToken::new();
        let limits = UploadLimits { budget: 4 << 20, queue: 4 };
        let server = tokio::spawn(serve(
            endpoint,
            source,
            Arc::default(),
            limits,
            Default::default(),
            shutdown.clone(),
        ));
        let client = node(&dirs[1], &m);
        let peers = PeerClient::new(client.endpoint.clone());
        let (_bits, _haves) =
            tokio::time::timeout(WAIT, peers.subscribe(addr, &m)).await.expect("in time").expect("subscribe");
        shutdown.cancel();
        tokio::time::timeout(WAIT, server)
            .await
            .expect("the server stops with a subscriber open")
            .expect("join");
        drop(have);
    }

    #[tokio::test]
    async fn connections_per_host_are_capped() {
        let (_tmp, dirs, m) = setup(&["a", "b", "client"]);
        let (a, b, client) = (node(&dirs[0], &m), node(&dirs[1], &m), node(&dirs[2], &m));
        let peers = PeerClient::new(client.endpoint.clone()).with_max_connections(1);
        let (a_addr, b_addr) = (a.endpoint.local_addr().expect("a"), b.endpoint.local_addr().expect("b"));
        let conn = tokio::time::timeout(WAIT, peers.connection(a_addr)).await.expect("in time").expect("a");
        // The same peer shares the connection; another is refused while it lives.
        let again = peers.connection(a_addr).await.expect("a again");
        assert_eq!(again.stable_id(), conn.stable_id());
        let refused = peers.connection(b_addr).await.map(|_| ());
        assert!(matches!(refused, Err(PeerError::Connect { .. })), "{refused:?}");
        conn.close(VarInt::from_u32(0), b"done");
        drop((conn, again));
        tokio::time::timeout(WAIT, peers.connection(b_addr))
            .await
            .expect("in time")
            .expect("b after a closed");
    }

    #[tokio::test]
    async fn at_the_cap_the_idlest_connection_makes_room() {
        let (_tmp, dirs, m) = setup(&["a", "b", "client"]);
        let (a, b, client) = (node(&dirs[0], &m), node(&dirs[1], &m), node(&dirs[2], &m));
        let peers = PeerClient::new(client.endpoint.clone())
            .with_max_connections(1)
            .with_idle_before_evict(Duration::from_millis(200));
        let (a_addr, b_addr) = (a.endpoint.local_addr().expect("a"), b.endpoint.local_addr().expect("b"));
        let to_a = tokio::time::timeout(WAIT, peers.connection(a_addr)).await.expect("in time").expect("a");
        // Open and just used: not idle yet, so b is refused.
        let refused = peers.connection(b_addr).await.map(|_| ());
        assert!(matches!(refused, Err(PeerError::Connect { .. })), "{refused:?}");
        // Idle past the threshold (though still open): closed to make room for b.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(to_a.close_reason().is_none(), "still open before the cap needs it");
        let to_b = tokio::time::timeout(WAIT, peers.connection(b_addr)).await.expect("in time").expect("b");
        assert!(to_a.close_reason().is_some(), "the idle connection to a was closed");
        assert!(to_b.close_reason().is_none());
    }
}

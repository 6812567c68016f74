//! The fetching side: one connection per peer address shared by every download (capped,
//! the idlest closed to make room), bitfields, subscriptions (`Have` streams) and pieces,
//! each piece verified against the metainfo before it is returned.

use super::*;

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
    /// Piece buffers reused across pieces (and downloads).
    buffers: PiecePool,
    /// Piece bytes received and then not kept ([`PeerClient::discarded`]).
    discarded: Counter,
}

/// Bytes of piece buffers kept for reuse ([`PiecePool`]): four pieces of the default length
/// (two of 4 MiB, the default when it was sized).
/// 16 MiB saved no measurable CPU more on a cold pull and let the peak RSS reach 66-70 MiB.
pub const PIECE_POOL: usize = 8 << 20;

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
            buffers: PiecePool::new(PIECE_POOL),
            discarded: Counter::default(),
        }
    }

    /// Piece bytes received and not kept: requests that failed, were cut short or were
    /// given up (an endgame copy that lost, a deadline) after some of their bytes arrived.
    /// Callers add the pieces that arrive whole but are no longer needed. Their sum is the
    /// download side's waste, which the senders' byte counters cannot show.
    pub fn discarded(&self) -> &Counter {
        &self.discarded
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
    pub(super) fn with_idle_before_evict(mut self, idle: Duration) -> Self {
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

    /// Fetches piece `index` and checks it against the metainfo, block by block, passing
    /// each block that passed on to `relays` (for peers that ask for the piece before it is
    /// whole here).
    pub async fn piece(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
        index: u32,
        relays: &Relays,
    ) -> Result<VerifiedPiece, PeerError> {
        let expected = metainfo.piece_size(index).map_err(|cause| PeerError::BadPiece { addr, cause })?;
        let request = Request::Piece { version: PROTOCOL_VERSION, digest: metainfo.digest(), index };
        let (response, mut recv) = self.request(addr, &request).await?;
        match response {
            Response::Piece { index: got, length, blocks } if got == index && length == expected => {
                // The block hashes are checked against the piece's hash first; then every
                // block as it lands, so a wrong byte ends the transfer within its block. The
                // buffer is sized by the metainfo, not by the peer.
                let bad = |cause| PeerError::BadPiece { addr, cause };
                let mut piece =
                    PieceReceiver::pooled(metainfo.check_blocks(index, blocks).map_err(bad)?, &self.buffers);
                let mut relay = relays.start(index, expected, piece.hashes());
                let mut relayed = 0;
                // Counted as discarded unless the piece comes out whole and verified: on an
                // error, and when the caller drops this future mid-piece.
                let mut unkept = Unkept { counter: &self.discarded, bytes: 0 };
                while piece.remaining() > 0 {
                    let chunk = recv
                        .read_chunk(piece.remaining(), true)
                        .await
                        .map_err(|e| PeerError::Transport { addr, cause: e.to_string() })?
                        .ok_or_else(|| PeerError::Transport { addr, cause: "piece cut short".into() })?;
                    if let Some(limiter) = &self.ingress {
                        limiter.acquire(chunk.bytes.len() as u64).await;
                    }
                    unkept.bytes += chunk.bytes.len() as u64;
                    piece.extend(&chunk.bytes).map_err(bad)?;
                    if let Some(relay) = &mut relay {
                        for block in &piece.blocks()[relayed..] {
                            relay.push(block.clone());
                        }
                        relayed = piece.blocks().len();
                    }
                }
                let piece = piece.finish().map_err(bad)?;
                unkept.bytes = 0;
                if let Some(relay) = relay {
                    relay.complete();
                }
                Ok(piece)
            }
            other => Err(PeerError::Protocol { addr, cause: format!("unexpected {}", other.kind()) }),
        }
    }
}

/// Bytes of a piece in transfer, added to `counter` when dropped unless reset to zero.
struct Unkept<'a> {
    counter: &'a Counter,
    bytes: u64,
}

impl Drop for Unkept<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.counter.inc_by(self.bytes);
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

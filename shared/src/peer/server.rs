//! The serving side: accepting connections, one task per request stream, the upload
//! budget, and `Have` streams to subscribers.

use super::*;

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
                        let blocks = BlockHashes::of(&data);
                        write_frame(&mut send, &Response::Piece { index, length, blocks }).await?;
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
                None => match source.relay(digest, index).await {
                    Some(relay) => {
                        let sent =
                            tokio::time::timeout(ACK_HOLD, send_relay(&mut send, index, &relay, stats)).await;
                        return match sent {
                            Ok(result) => result,
                            Err(_) => {
                                let _ = send.reset(VarInt::from_u32(0));
                                Err(StreamError::Io("relayed piece not acknowledged in time".into()))
                            }
                        };
                    }
                    None => write_frame(&mut send, &Response::Refused(Refusal::NotFound)).await?,
                },
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

/// Sends a piece still arriving here: its block hashes, then each block as it passes. If the
/// transfer feeding the relay fails, the stream is reset and the requester asks elsewhere.
async fn send_relay(
    send: &mut SendStream,
    index: u32,
    relay: &Relay,
    stats: &PeerStats,
) -> Result<(), StreamError> {
    let io = |e: quinn::WriteError| StreamError::Io(e.to_string());
    let length = relay.size();
    write_frame(send, &Response::Piece { index, length, blocks: relay.hashes().clone() }).await?;
    stats.pieces_relayed.inc();
    let mut sent = 0u32;
    let mut i = 0;
    while sent < length {
        let Some(block) = relay.block(i).await else {
            let _ = send.reset(VarInt::from_u32(0));
            return Err(StreamError::Io("the relayed piece's own transfer failed".into()));
        };
        sent += block.len() as u32;
        i += 1;
        send.write_chunk(block).await.map_err(io)?;
    }
    stats.pieces_served.inc();
    stats.bytes_served.inc_by(u64::from(length));
    let _ = send.finish();
    let _ = send.stopped().await;
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

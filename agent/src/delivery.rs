//! Where the bytes a client got came from: the local cache, another agent, or an origin.
//!
//! Every download records, per piece, who sent it ([`Sources`]); a response counts each
//! chunk it actually sends under the source of the piece that chunk lies in
//! ([`Counted`]). So the `shoal_agent_delivered_bytes_total{source}` counters add up to
//! exactly what clients received, whatever mix of hot and cold pulls.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, MessageBody};
use bytes::Bytes;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Where a piece came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Source {
    /// Already on this agent's disk (cached, or verified from an earlier partial download).
    Cache = 0,
    /// Another agent.
    Peer = 1,
    /// An origin.
    Origin = 2,
    /// An origin that pulled the blob through from its upstream registry for this pull.
    Upstream = 3,
}

impl EncodeLabelValue for Source {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Source::Cache => "cache",
            Source::Peer => "peer",
            Source::Origin => "origin",
            Source::Upstream => "upstream",
        })
    }
}

impl Source {
    const ALL: [Source; 4] = [Source::Cache, Source::Peer, Source::Origin, Source::Upstream];

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Source::Peer,
            2 => Source::Origin,
            3 => Source::Upstream,
            _ => Source::Cache,
        }
    }
}

/// The `source` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: Source,
}

/// Bytes delivered to clients, by source.
pub type Delivered = Family<SourceLabel, Counter>;

/// Who sent each piece of one download. Pieces not fetched (held on disk when the download
/// started) count as the cache.
#[derive(Debug)]
pub struct Sources {
    piece_length: u64,
    by_piece: Box<[AtomicU8]>,
    /// What a piece from an origin counts as: `Upstream` when the origin pulled the blob
    /// through for this pull.
    from_origin: Source,
}

impl Sources {
    pub fn new(piece_length: u32, pieces: u32) -> Self {
        Self {
            piece_length: u64::from(piece_length.max(1)),
            by_piece: (0..pieces).map(|_| AtomicU8::new(Source::Cache as u8)).collect(),
            from_origin: Source::Origin,
        }
    }

    /// Pieces from origins count as the upstream's (the origin pulled the blob through).
    pub fn from_upstream(mut self) -> Self {
        self.from_origin = Source::Upstream;
        self
    }

    /// What a piece sent by an origin counts as.
    pub fn origin(&self) -> Source {
        self.from_origin
    }

    /// Records who sent piece `index`.
    pub fn set(&self, index: u32, source: Source) {
        if let Some(slot) = self.by_piece.get(index as usize) {
            slot.store(source as u8, Ordering::Relaxed);
        }
    }

    /// Adds `[start, start + len)` to `delivered`, each byte under its piece's source.
    pub fn count(&self, delivered: &Delivered, start: u64, len: u64) {
        let mut split = [0u64; 4];
        let (mut offset, end) = (start, start.saturating_add(len));
        while offset < end {
            let index = offset / self.piece_length;
            let piece_end = ((index + 1) * self.piece_length).min(end);
            let source = self
                .by_piece
                .get(index as usize)
                .map_or(Source::Cache, |s| Source::from_u8(s.load(Ordering::Relaxed)));
            split[source as usize] += piece_end - offset;
            offset = piece_end;
        }
        for source in Source::ALL {
            if split[source as usize] > 0 {
                delivered.get_or_create(&SourceLabel { source }).inc_by(split[source as usize]);
            }
        }
    }
}

/// How a response's bytes are counted: all from the cache, or by the pieces of the download
/// the request waited for.
#[derive(Debug, Clone)]
pub enum Tally {
    Cache,
    Download(Arc<Sources>),
}

impl Tally {
    pub fn count(&self, delivered: &Delivered, start: u64, len: u64) {
        match self {
            Tally::Cache => {
                delivered.get_or_create(&SourceLabel { source: Source::Cache }).inc_by(len);
            }
            Tally::Download(sources) => sources.count(delivered, start, len),
        }
    }
}

/// A response body that counts what it sends, and keeps `hold` (e.g. the blob's pin in the
/// cache) until its last byte is sent: released then, not when the server gets round to
/// dropping the body (a kept-alive connection may keep it for long).
pub struct Counted<B, H> {
    body: B,
    offset: u64,
    /// Bytes still to send.
    left: u64,
    tally: Tally,
    delivered: Delivered,
    hold: Option<H>,
}

impl<B, H> std::fmt::Debug for Counted<B, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("offset", &self.offset)
            .field("tally", &self.tally)
            .finish_non_exhaustive()
    }
}

impl<B, H> Counted<B, H> {
    /// Counts `body`, whose first byte is byte `start` of the blob.
    pub fn new(body: B, start: u64, tally: Tally, delivered: Delivered, hold: H) -> Self
    where
        B: MessageBody,
    {
        let left = match body.size() {
            BodySize::Sized(n) => n,
            BodySize::None => 0,
            BodySize::Stream => u64::MAX,
        };
        Self { body, offset: start, left, tally, delivered, hold: (left > 0).then_some(hold) }
    }
}

impl<B: MessageBody + Unpin, H: Unpin> MessageBody for Counted<B, H> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.body).poll_next(cx);
        match &next {
            Poll::Ready(Some(Ok(chunk))) => {
                this.tally.count(&this.delivered, this.offset, chunk.len() as u64);
                this.offset += chunk.len() as u64;
                this.left = this.left.saturating_sub(chunk.len() as u64);
                if this.left == 0 {
                    this.hold = None;
                }
            }
            Poll::Ready(_) => this.hold = None,
            Poll::Pending => {}
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(d: &Delivered, source: Source) -> u64 {
        d.get_or_create(&SourceLabel { source }).get()
    }

    #[test]
    fn bytes_are_counted_under_their_pieces_sources() {
        let sources = Sources::new(100, 4);
        sources.set(1, Source::Peer);
        sources.set(2, Source::Origin);
        let d = Delivered::default();
        // 50..350 spans half of piece 0, pieces 1 and 2, half of piece 3.
        sources.count(&d, 50, 300);
        assert_eq!((get(&d, Source::Cache), get(&d, Source::Peer), get(&d, Source::Origin)), (100, 100, 100));
        Tally::Cache.count(&d, 0, 7);
        assert_eq!(get(&d, Source::Cache), 107);
    }
}

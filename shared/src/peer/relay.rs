//! Cut-through: pieces passed on to peers while they are still arriving.
//!
//! A download registers each piece it starts receiving from a peer in its [`Relays`], once
//! the piece's block hashes have been checked against the metainfo, and every block that
//! passes its hash is pushed into the [`Relay`]. Once a few blocks have passed, if they came
//! fast enough ([`EarlyOffer`]), the piece is *offered* (its bit set in [`Relays::offered`],
//! the bitfield `Subscribe` streams follow); a piece arriving slowly is offered only once it
//! is written, so that a slow link does not hold up the peers that would relay it. A peer
//! asking for the
//! piece before it is whole is sent the same block hashes and the blocks as they come
//! (`server.rs`), so each hop of the swarm costs a block time instead of a piece time. The
//! receiving peer checks every block itself; a relay never holds a byte that has not passed.
//!
//! A relay whose transfer fails is ended and removed at once, and peers reading it have their
//! stream reset (they ask elsewhere). A relay that completed stays until the download has
//! written the piece and set its bit ([`Relays::written`]), so there is no moment at which
//! the piece is neither relayed nor held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::bitfield::Bitfield;
use crate::blocks::BlockHashes;
use crate::session::EarlyOffer;

/// A piece being received, readable block by block.
#[derive(Debug)]
pub struct Relay {
    hashes: BlockHashes,
    size: u32,
    blocks: Mutex<Vec<Bytes>>,
    /// Blocks held, and whether the transfer ended (complete or not).
    state: watch::Sender<(usize, bool)>,
}

impl Relay {
    /// The piece's block hashes (checked against its hash by the receiver).
    pub fn hashes(&self) -> &BlockHashes {
        &self.hashes
    }

    /// The piece's length in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Block `i`, waiting for it; `None` once the transfer ended without it.
    pub async fn block(&self, i: usize) -> Option<Bytes> {
        let mut rx = self.state.subscribe();
        loop {
            if let Some(b) = self.blocks.lock().unwrap_or_else(|p| p.into_inner()).get(i) {
                return Some(b.clone());
            }
            if rx.borrow_and_update().1 {
                return None;
            }
            rx.changed().await.ok()?;
        }
    }

    fn push(&self, block: Bytes) {
        let n = {
            let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
            blocks.push(block);
            blocks.len()
        };
        self.state.send_modify(|s| s.0 = n);
    }

    fn end(&self) {
        self.state.send_modify(|s| s.1 = true);
    }
}

/// How many pieces' first blocks came fast enough to be offered early, and how many did
/// not, since the download started ([`Relays::judgements`]); the download loop grows or
/// shrinks its requests in flight by them (`Scheduler::on_first_blocks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Judgements {
    pub fast: u64,
    pub slow: u64,
}

/// The pieces one download is relaying, and what it offers to its followers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Relays {
    relays: Arc<Mutex<HashMap<u32, Arc<Relay>>>>,
    offered: watch::Sender<Bitfield>,
    judged: watch::Sender<Judgements>,
    /// Off: pieces are offered only once written (whole pieces only).
    enabled: bool,
    /// Counts pieces that arrived too slowly to be offered before they were whole.
    held_back: Counter,
}

impl Relays {
    /// Relays for a download that holds `have` already.
    pub fn new(have: Bitfield) -> Self {
        Self {
            relays: Arc::default(),
            offered: watch::Sender::new(have),
            judged: watch::Sender::new(Judgements::default()),
            enabled: true,
            held_back: Counter::default(),
        }
    }

    /// Counts in `held_back` the pieces that arrive too slowly to be offered early.
    pub fn counting_held_back(self, held_back: Counter) -> Self {
        Self { held_back, ..self }
    }

    /// Relays that pass on only whole pieces: nothing is relayed, and a piece is offered
    /// once written (the agent's `--cut-through false`).
    pub fn whole_pieces(have: Bitfield) -> Self {
        Self { enabled: false, ..Self::new(have) }
    }

    /// Relays that pass nothing on (a fetch whose pieces nobody else may ask for).
    pub fn none() -> Self {
        Self::new(Bitfield::new(0))
    }

    /// The pieces held or arriving: what followers are told of.
    pub fn offered(&self) -> watch::Receiver<Bitfield> {
        self.offered.subscribe()
    }

    /// The early-offer judgements of the pieces relayed so far (none when relaying is off).
    pub fn judgements(&self) -> watch::Receiver<Judgements> {
        self.judged.subscribe()
    }

    /// The relay of piece `index`, if it is arriving (or arrived and is not written yet).
    pub fn get(&self, index: u32) -> Option<Arc<Relay>> {
        self.lock().get(&index).cloned()
    }

    /// Starts relaying piece `index` of `size` bytes under `hashes` (already checked);
    /// `None` when it is relayed already (a second copy of it, in the endgame) or the
    /// download offers no pieces. The piece is offered once its first blocks show it
    /// arriving fast enough ([`EarlyOffer`]), or once it is written.
    pub fn start(&self, index: u32, size: u32, hashes: &BlockHashes) -> Option<RelayWriter> {
        if !self.enabled || index >= self.offered.borrow().len() {
            return None;
        }
        let relay = {
            let mut relays = self.lock();
            if relays.contains_key(&index) {
                return None;
            }
            let relay = Arc::new(Relay {
                hashes: hashes.clone(),
                size,
                blocks: Mutex::default(),
                state: watch::Sender::new((0, false)),
            });
            relays.insert(index, relay.clone());
            relay
        };
        Some(RelayWriter {
            relays: self.clone(),
            index,
            relay,
            complete: false,
            started: Instant::now(),
            offer: EarlyOffer::new(u64::from(size)),
        })
    }

    /// Piece `index` is written and its bit set: its relay is no longer needed.
    pub fn written(&self, index: u32) {
        self.offer(index);
        if let Some(relay) = self.lock().remove(&index) {
            relay.end();
        }
    }

    fn offer(&self, index: u32) {
        self.offered.send_if_modified(|bits| {
            let new = index < bits.len() && !bits.get(index);
            if new {
                bits.set(index);
            }
            new
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Relay>>> {
        self.relays.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receiving side of a relay: blocks go in as they pass. Dropped before the piece is
/// complete, it ends the relay and removes it (readers get no more blocks).
#[derive(Debug)]
pub struct RelayWriter {
    relays: Relays,
    index: u32,
    relay: Arc<Relay>,
    complete: bool,
    started: Instant,
    offer: EarlyOffer,
}

impl RelayWriter {
    /// Passes on a block that has passed its hash; offers the piece when the rule says so,
    /// and counts the rule's judgement in [`Relays::judgements`].
    pub fn push(&mut self, block: Bytes) {
        let len = block.len();
        self.relay.push(block);
        let Some(fast) = self.offer.on_block(self.started.elapsed(), len) else { return };
        if fast {
            self.relays.offer(self.index);
        } else {
            self.relays.held_back.inc();
        }
        self.relays.judged.send_modify(|j| if fast { j.fast += 1 } else { j.slow += 1 });
    }

    /// Every block is in: the relay stays readable until the piece is written.
    pub fn complete(mut self) {
        self.complete = true;
    }
}

impl Drop for RelayWriter {
    fn drop(&mut self) {
        if !self.complete {
            self.relay.end();
            let mut relays = self.relays.lock();
            if relays.get(&self.index).is_some_and(|r| Arc::ptr_eq(r, &self.relay)) {
                relays.remove(&self.index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes() -> BlockHashes {
        BlockHashes::of(&[1u8; 40_000])
    }

    #[tokio::test]
    async fn readers_get_blocks_as_they_come_and_the_end() {
        let relays = Relays::new(Bitfield::new(4));
        let mut offered = relays.offered();
        let mut w = relays.start(2, 40_000, &hashes()).expect("new");
        assert!(relays.start(2, 40_000, &hashes()).is_none(), "one relay per piece");
        assert!(!offered.has_changed().expect("open"), "not offered before blocks pass");
        let relay = relays.get(2).expect("relayed");
        let reader = tokio::spawn({
            let relay = relay.clone();
            async move { (relay.block(0).await, relay.block(1).await) }
        });
        w.push(Bytes::from_static(b"a"));
        w.push(Bytes::from_static(b"b"));
        let (a, b) = reader.await.expect("join");
        assert_eq!((a.as_deref(), b.as_deref()), (Some(&b"a"[..]), Some(&b"b"[..])));
        // 2 MiB more within far less than the two seconds that would make them too slow.
        w.push(Bytes::from(vec![0u8; 1 << 20]));
        assert!(!offered.has_changed().expect("open"), "not offered before its fourth block");
        w.push(Bytes::from(vec![0u8; 1 << 20]));
        assert!(offered.has_changed().expect("open"));
        assert!(offered.borrow_and_update().get(2), "offered once its first blocks came fast");
        assert_eq!(*relays.judgements().borrow(), Judgements { fast: 1, slow: 0 });
        w.push(Bytes::from(vec![0u8; 1 << 20]));
        assert_eq!(*relays.judgements().borrow(), Judgements { fast: 1, slow: 0 }, "judged once");
        w.complete();
        assert!(relays.get(2).is_some(), "kept until written");
        relays.written(2);
        assert!(relays.get(2).is_none());
        assert_eq!(relay.block(5).await, None, "ended");
    }

    #[tokio::test]
    async fn a_failed_transfer_ends_its_relay_and_readers_stop() {
        let relays = Relays::new(Bitfield::new(4));
        let mut w = relays.start(1, 40_000, &hashes()).expect("new");
        w.push(Bytes::from_static(b"a"));
        let relay = relays.get(1).expect("relayed");
        let waiting = tokio::spawn({
            let relay = relay.clone();
            async move { relay.block(1).await }
        });
        drop(w);
        assert_eq!(waiting.await.expect("join"), None);
        assert!(relays.get(1).is_none(), "removed");
        // Another copy may be relayed now.
        assert!(relays.start(1, 40_000, &hashes()).is_some());
        assert!(Relays::none().start(0, 1, &BlockHashes::default()).is_none());
    }

    #[tokio::test]
    async fn a_piece_arriving_slowly_is_offered_only_once_written() {
        let held_back = Counter::default();
        let relays = Relays::new(Bitfield::new(4)).counting_held_back(held_back.clone());
        let mut offered = relays.offered();
        // A 64 MiB piece in 16 KiB blocks at least 50 ms apart: 320 KB/s or less, far
        // slower than the whole piece within 4 s.
        let mut w = relays.start(3, 64 << 20, &hashes()).expect("new");
        for _ in 0..6 {
            w.push(Bytes::from(vec![0u8; 16 << 10]));
            assert!(relays.get(3).is_some(), "served to peers that ask");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(!offered.has_changed().expect("open"), "not offered while arriving slowly");
        assert_eq!(held_back.get(), 1);
        assert_eq!(*relays.judgements().borrow(), Judgements { fast: 0, slow: 1 });
        w.complete();
        relays.written(3);
        assert!(offered.borrow_and_update().get(3), "offered once written");
    }
}

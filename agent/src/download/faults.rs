//! The swarm loop over fault-injecting peers and tracker (the [`shoal_shared::seams`]
//! traits), in process: peers that lie, stall or vanish, with no network and no other node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_shared::bitfield::Bitfield;
use shoal_shared::blocks::{BlockHashes, BLOCK_SIZE};
use shoal_shared::client::{Announce, AnnounceResponse, PeerInfo};
use shoal_shared::metainfo::{Metainfo, MetainfoBuilder, VerifiedPiece, MIN_PIECE_LENGTH};
use shoal_shared::peer::PeerError;
use shoal_shared::seams::{Announcer, Haves, PeerTransport};
use shoal_shared::store::{BlobStore, PartialBlob};
use shoal_shared::tls::Role;
use shoal_shared::tracker::LookupError;
use shoal_shared::wire::Refusal;
use tokio::sync::watch;

use super::{swarm, Active, DownloadError, DownloadMetrics, Prefix, Settings, Sources};
use crate::cache::Cache;

/// How a fake peer behaves.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Sends every piece as it is.
    Honest,
    /// Sends every piece with one byte flipped.
    Lying,
    /// Answers what it holds, then never sends a piece.
    Stalling,
    /// Sends this many pieces, then is gone (every request fails at the transport).
    Vanishing { after: u32 },
    /// Passes every block on to the download's relays at once, as the real transport does
    /// when they verify (so the download judges the piece fast), and holds the request
    /// open this long before it ends.
    Relaying { hold: Duration },
}

/// Fake peers, each holding the whole blob and behaving as told; records bans and pieces sent.
#[derive(Debug, Clone)]
struct FakePeers {
    blob: Bytes,
    behaviour: Arc<HashMap<SocketAddr, Behaviour>>,
    sent: Arc<Mutex<HashMap<SocketAddr, u32>>>,
    banned: Arc<Mutex<Vec<SocketAddr>>>,
    /// Piece requests open now, and the most open at once.
    open: Arc<Mutex<(u32, u32)>>,
}

/// Counts a piece request open while it lives.
struct Open(Arc<Mutex<(u32, u32)>>);

impl Open {
    fn new(open: &Arc<Mutex<(u32, u32)>>) -> Self {
        let mut o = open.lock().expect("open");
        o.0 += 1;
        o.1 = o.1.max(o.0);
        Self(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.lock().expect("open").0 -= 1;
    }
}

/// A peer that never announces anything new (the fakes are seeders).
struct NoHaves;

impl Haves for NoHaves {
    async fn next(&mut self) -> Result<Option<Vec<u32>>, PeerError> {
        Ok(None)
    }
}

impl FakePeers {
    fn gone(&self, addr: SocketAddr) -> bool {
        match self.behaviour.get(&addr) {
            Some(Behaviour::Vanishing { after }) => {
                self.sent.lock().expect("sent").get(&addr).copied().unwrap_or(0) >= *after
            }
            Some(_) => false,
            None => true,
        }
    }

    fn transport(addr: SocketAddr) -> PeerError {
        PeerError::Transport { addr, cause: "connection lost".into() }
    }
}

impl PeerTransport for FakePeers {
    type Haves = NoHaves;

    async fn role(&self, _addr: SocketAddr) -> Result<Option<Role>, PeerError> {
        Ok(Some(Role::Agent))
    }

    async fn bitfield(&self, addr: SocketAddr, metainfo: &Metainfo) -> Result<Bitfield, PeerError> {
        if self.gone(addr) {
            return Err(Self::transport(addr));
        }
        Ok(Bitfield::full(metainfo.piece_count()))
    }

    async fn subscribe(
        &self,
        addr: SocketAddr,
        _metainfo: &Metainfo,
    ) -> Result<(Bitfield, NoHaves), PeerError> {
        Err(PeerError::Refused { addr, refusal: Refusal::NotFound })
    }

    async fn piece(
        &self,
        addr: SocketAddr,
        metainfo: &Metainfo,
        index: u32,
        relays: &shoal_shared::peer::Relays,
    ) -> Result<VerifiedPiece, PeerError> {
        if self.gone(addr) {
            return Err(Self::transport(addr));
        }
        let _open = Open::new(&self.open);
        let start = metainfo.piece_offset(index) as usize;
        let size = metainfo.piece_size(index).map_err(|cause| PeerError::BadPiece { addr, cause })? as usize;
        let mut bytes = self.blob.slice(start..start + size);
        match self.behaviour[&addr] {
            Behaviour::Stalling => std::future::pending::<()>().await,
            Behaviour::Lying => {
                let mut flipped = bytes.to_vec();
                flipped[size / 2] ^= 0x01;
                bytes = Bytes::from(flipped);
            }
            Behaviour::Relaying { hold } => {
                if let Some(mut relay) = relays.start(index, size as u32, &BlockHashes::of(&bytes)) {
                    for block in bytes.chunks(BLOCK_SIZE as usize) {
                        relay.push(bytes.slice_ref(block));
                    }
                    relay.complete();
                }
                tokio::time::sleep(hold).await;
            }
            Behaviour::Honest | Behaviour::Vanishing { .. } => {}
        }
        *self.sent.lock().expect("sent").entry(addr).or_default() += 1;
        // The real transport verifies every piece; so does the fake.
        metainfo.verify_piece(index, bytes).map_err(|cause| PeerError::BadPiece { addr, cause })
    }

    fn ban(&self, addr: SocketAddr) {
        self.banned.lock().expect("banned").push(addr);
    }
}

/// A tracker that lists the same peers on every announce.
#[derive(Debug, Clone)]
struct FakeTracker {
    peers: Vec<PeerInfo>,
}

impl Announcer for FakeTracker {
    async fn announce(&self, _announce: &Announce) -> Result<AnnounceResponse, LookupError> {
        Ok(AnnounceResponse { interval: 1, peers: self.peers.clone() })
    }
}

struct Outcome {
    result: Result<(), DownloadError>,
    took: Duration,
    banned: Vec<SocketAddr>,
    bad_pieces: u64,
    /// The most piece requests open at once.
    most_open: u32,
    /// Pieces the download marked as held, with what the partial file holds there.
    held: Vec<(u32, Bytes)>,
    blob: Bytes,
    /// The whole file when every piece is held.
    written: Bytes,
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 7000))
}

/// Downloads a 16-piece blob from `peers` (addresses 10.0.0.1, .2, ...) through the real
/// swarm loop, with a progress timeout of `timeout`.
async fn download(peers: &[Behaviour], timeout: Duration) -> Outcome {
    let blob: Bytes =
        (0..16 * MIN_PIECE_LENGTH).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut builder = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("piece length");
    builder.update(&blob);
    let metainfo = builder.finish().expect("metainfo");
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("store");
    let cache = Arc::new(Cache::open(store.clone(), 1 << 30, None).expect("cache"));
    let (hold, _) = cache.admit(metainfo.digest(), metainfo.length()).expect("admitted");
    let (partial, held) = PartialBlob::open_or_create(&store, metainfo.clone()).await.expect("partial");
    let (leads, leads_rx) = tokio::sync::mpsc::channel(swarm::LEAD_QUEUE);
    let active = Active {
        partial,
        written: Default::default(),
        relays: shoal_shared::peer::Relays::new(held.clone()),
        have: watch::Sender::new(held),
        leads,
        prefix: watch::Sender::new(Prefix::default()),
        sources: Arc::new(Sources::new(metainfo.piece_length(), metainfo.piece_count())),
        by_peer: Default::default(),
        started: Instant::now(),
        committed: Default::default(),
        _hold: hold,
    };
    let behaviour: HashMap<SocketAddr, Behaviour> =
        peers.iter().enumerate().map(|(i, b)| (addr(i as u8 + 1), *b)).collect();
    let fake = FakePeers {
        blob: blob.clone(),
        behaviour: Arc::new(behaviour),
        sent: Default::default(),
        banned: Default::default(),
        open: Default::default(),
    };
    let tracker = FakeTracker {
        peers: (0..peers.len())
            .map(|i| PeerInfo { addr: addr(i as u8 + 1), complete: true, origin: false })
            .collect(),
    };
    let settings = Settings {
        me: SocketAddr::from(([10, 0, 0, 99], 7000)),
        progress_timeout: timeout,
        seed_time: Duration::ZERO,
        max_peers: 8,
        cut_through: true,
    };
    let metrics = DownloadMetrics::default();
    let env = swarm::Env { peers: &fake, tracker: &tracker, settings: &settings, metrics: &metrics };
    let started = Instant::now();
    let result = swarm::run(&env, &metainfo, &active, leads_rx).await;
    let took = started.elapsed();
    let indices: Vec<u32> = (0..metainfo.piece_count()).filter(|&i| active.have.borrow().get(i)).collect();
    let mut held = Vec::new();
    for i in indices {
        held.push((i, active.partial.read_piece(i).await.expect("a held piece reads back")));
    }
    let written = if held.len() == metainfo.piece_count() as usize {
        active.partial.read_at(0, blob.len()).await.expect("the whole blob reads back")
    } else {
        Bytes::new()
    };
    let banned = fake.banned.lock().expect("banned").clone();
    let most_open = fake.open.lock().expect("open").1;
    Outcome { result, took, banned, bad_pieces: metrics.bad_pieces.get(), most_open, held, blob, written }
}

/// Every piece marked held holds exactly the blob's bytes.
fn held_pieces_are_right(o: &Outcome) {
    let piece = MIN_PIECE_LENGTH as usize;
    for (i, bytes) in &o.held {
        let start = *i as usize * piece;
        assert!(bytes[..] == o.blob[start..start + piece], "piece {i} written wrong");
    }
}

fn banned_once(o: &Outcome) -> Vec<SocketAddr> {
    let mut banned = o.banned.clone();
    banned.sort();
    banned.dedup();
    banned
}

fn whole(o: &Outcome) -> bool {
    o.written == o.blob
}

#[tokio::test]
async fn a_lying_peer_is_banned_and_the_blob_comes_whole_from_the_honest_one() {
    let o = download(&[Behaviour::Lying, Behaviour::Honest], Duration::from_secs(10)).await;
    o.result.as_ref().expect("download");
    assert!(whole(&o), "the blob is right");
    assert_eq!(banned_once(&o), vec![addr(1)], "the liar, and only the liar, is banned");
    assert!(o.bad_pieces >= 1);
    assert!(o.took < Duration::from_secs(5), "{:?}", o.took);
}

#[tokio::test]
async fn a_stalling_peer_does_not_hold_up_the_download() {
    let o = download(&[Behaviour::Stalling, Behaviour::Honest], Duration::from_secs(20)).await;
    o.result.as_ref().expect("download");
    assert!(whole(&o));
    assert!(o.banned.is_empty(), "stalling is not lying: {:?}", o.banned);
    eprintln!("with a stalling peer: {:?}", o.took);
}

#[tokio::test]
async fn a_peer_that_vanishes_mid_download_is_replaced() {
    let o = download(&[Behaviour::Vanishing { after: 3 }, Behaviour::Honest], Duration::from_secs(10)).await;
    o.result.as_ref().expect("download");
    assert!(whole(&o));
    assert!(o.banned.is_empty(), "vanishing is not lying: {:?}", o.banned);
    assert!(o.took < Duration::from_secs(5), "{:?}", o.took);
}

#[tokio::test]
async fn with_only_liars_the_download_fails_and_no_bad_byte_is_kept() {
    let o = download(&[Behaviour::Lying, Behaviour::Lying], Duration::from_secs(1)).await;
    assert!(matches!(o.result, Err(DownloadError::Stalled(_))), "{:?}", o.result.as_ref().err());
    assert!(o.held.is_empty(), "{} pieces marked held", o.held.len());
    assert_eq!(banned_once(&o), vec![addr(1), addr(2)]);
}

#[tokio::test]
async fn a_peer_that_vanishes_alone_fails_the_download_after_the_progress_timeout() {
    let o = download(&[Behaviour::Vanishing { after: 5 }], Duration::from_secs(1)).await;
    assert!(matches!(o.result, Err(DownloadError::Stalled(_))), "{:?}", o.result.as_ref().err());
    assert_eq!(o.held.len(), 5, "the pieces it sent before vanishing are kept");
    held_pieces_are_right(&o);
}

#[tokio::test]
async fn requests_in_flight_grow_as_pieces_come_fast() {
    // A download starts with few requests in flight (`AGENT_START_IN_FLIGHT`) and takes one
    // more for each piece whose first blocks came fast enough to offer early: the loop
    // carries the relays' judgements to its scheduler. Eight peers, each holding a request
    // open 50 ms after its blocks passed, have room for 16 at once.
    let start = shoal_shared::scheduler::AGENT_START_IN_FLIGHT;
    let hold = Duration::from_millis(50);
    let o = download(&[Behaviour::Relaying { hold }; 8], Duration::from_secs(10)).await;
    o.result.as_ref().expect("download");
    assert!(whole(&o));
    assert!(o.most_open >= 2 * start, "at most {} requests open at once (start {start})", o.most_open);
}

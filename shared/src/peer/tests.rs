//! The peer protocol between real QUIC endpoints in process.

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
    let endpoint = tls::endpoint(UdpSocket::bind("127.0.0.1:0").expect("udp"), &identity).expect("endpoint");
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
    let endpoint = tls::endpoint(UdpSocket::bind("127.0.0.1:0").expect("udp"), &identity).expect("endpoint");
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
        tokio::spawn(async move { peers.piece(addr, &m, index, &Relays::none()).await })
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
    let got = tokio::time::timeout(WAIT, peers.piece(addr, &m, 3, &Relays::none()))
        .await
        .expect("in time")
        .expect("piece 3");
    assert_eq!(got.index(), 3);
}

#[tokio::test]
async fn open_subscriptions_do_not_hold_up_the_servers_shutdown() {
    let (_tmp, dirs, m) = setup(&["server", "client"]);
    let identity = TlsIdentity::load(&dirs[0]).expect("identity");
    let endpoint = tls::endpoint(UdpSocket::bind("127.0.0.1:0").expect("udp"), &identity).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    // A download that never progresses: its subscribers wait for news forever.
    let have = watch::Sender::new(Bitfield::new(m.piece_count()));
    let source = Arc::new(Growing { digest: m.digest(), have: have.clone() });
    let shutdown = CancellationToken::new();
    let limits = UploadLimits { budget: 4 << 20, queue: 4 };
    let server =
        tokio::spawn(serve(endpoint, source, Arc::default(), limits, Default::default(), shutdown.clone()));
    let client = node(&dirs[1], &m);
    let peers = PeerClient::new(client.endpoint.clone());
    let (_bits, _haves) =
        tokio::time::timeout(WAIT, peers.subscribe(addr, &m)).await.expect("in time").expect("subscribe");
    shutdown.cancel();
    tokio::time::timeout(WAIT, server).await.expect("the server stops with a subscriber open").expect("join");
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
    tokio::time::timeout(WAIT, peers.connection(b_addr)).await.expect("in time").expect("b after a closed");
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

/// What a lying server answers to a piece request.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// The right bytes under block hashes with one value changed.
    DamagedProof,
    /// The right block hashes, one byte of block `.0` flipped; nothing after that block is
    /// ever sent (the stream stays open).
    BadBlockThenStall(usize),
    /// The block hashes of piece 1 with the bytes of piece 1, for piece 0.
    OtherPiece,
    /// The right proof and the first `.0` bytes, then the stream ends.
    CutShort(usize),
    /// The right proof and the first `.0` bytes, then nothing (the stream stays open).
    Stall(usize),
    /// No lie: the right proof and the whole piece.
    Truth,
}

/// A blob of three pieces of the smallest length, byte `i` being `byte(i)`, and its metainfo.
fn three_pieces(byte: impl Fn(u32) -> u8) -> (Bytes, Metainfo) {
    let data = Bytes::from((0..3 * MIN_PIECE_LENGTH).map(byte).collect::<Vec<u8>>());
    let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
    b.update(&data);
    (data, b.finish().expect("metainfo"))
}

/// A server that answers every piece request with `lie`, by hand over real QUIC.
async fn lying_server(dir: &std::path::Path, data: Bytes, m: Metainfo, lie: Lie) -> SocketAddr {
    let identity = TlsIdentity::load(dir).expect("identity");
    let endpoint = tls::endpoint(UdpSocket::bind("127.0.0.1:0").expect("udp"), &identity).expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    tokio::spawn(async move {
        let conn = endpoint.accept().await.expect("incoming").await.expect("handshake");
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let Ok(Request::Piece { index, .. }) = read_frame::<Request>(&mut recv).await else { continue };
            let piece = |i: u32| {
                let off = m.piece_offset(i) as usize;
                data.slice(off..off + m.piece_size(i).expect("size") as usize)
            };
            let good = piece(index);
            let length = good.len() as u32;
            let block = crate::blocks::BLOCK_SIZE as usize;
            let (blocks, body) = match lie {
                Lie::DamagedProof => (BlockHashes::of(&good).damaged(1), good.clone()),
                Lie::BadBlockThenStall(k) => {
                    let mut bad = good[..(k + 1) * block].to_vec();
                    bad[k * block + 17] ^= 0x40;
                    (BlockHashes::of(&good), Bytes::from(bad))
                }
                Lie::OtherPiece => (BlockHashes::of(&piece(1)), piece(1)),
                Lie::CutShort(n) | Lie::Stall(n) => (BlockHashes::of(&good), good.slice(..n)),
                Lie::Truth => (BlockHashes::of(&good), good.clone()),
            };
            write_frame(&mut send, &Response::Piece { index, length, blocks }).await.expect("frame");
            send.write_all(&body).await.expect("body");
            if let Lie::CutShort(_) | Lie::Truth = lie {
                let _ = send.finish();
            } else {
                // Keep the stream open: the client must give up on what it has.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(send);
                });
            }
        }
    });
    addr
}

#[tokio::test]
async fn lying_servers_are_caught_within_the_bad_block() {
    let (_tmp, dirs, _) = setup(&["server", "client"]);
    let (data, m) = three_pieces(|i| (i * 7 + i / 4099) as u8);
    let client = node(&dirs[1], &m);
    let last = (MIN_PIECE_LENGTH / crate::blocks::BLOCK_SIZE) as usize - 1;
    for lie in [
        Lie::DamagedProof,
        Lie::BadBlockThenStall(0),
        Lie::BadBlockThenStall(1),
        Lie::BadBlockThenStall(last),
        Lie::OtherPiece,
        Lie::CutShort(5000),
    ] {
        let addr = lying_server(&dirs[0], data.clone(), m.clone(), lie).await;
        let peers = PeerClient::new(client.endpoint.clone());
        let got = tokio::time::timeout(WAIT, peers.piece(addr, &m, 0, &Relays::none()))
            .await
            .unwrap_or_else(|_| panic!("{lie:?}: the client waited for the rest of a piece it must refuse"));
        match lie {
            Lie::CutShort(_) => assert!(matches!(got, Err(PeerError::Transport { .. })), "{lie:?}: {got:?}"),
            Lie::BadBlockThenStall(k) => assert!(
                matches!(got, Err(PeerError::BadPiece { cause: MetainfoError::BlockHash { index: 0, block }, .. }) if block as usize == k),
                "{lie:?}: {got:?}"
            ),
            _ => assert!(
                matches!(got, Err(PeerError::BadPiece { cause: MetainfoError::BlockHashes(0), .. })),
                "{lie:?}: {got:?}"
            ),
        }
    }
}

#[tokio::test]
async fn piece_bytes_received_and_not_kept_are_counted() {
    let (_tmp, dirs, _) = setup(&["server", "client"]);
    let (data, m) = three_pieces(|i| (i * 11 + i / 7001) as u8);
    let client = node(&dirs[1], &m);
    let peers = PeerClient::new(client.endpoint.clone());
    let ask = |lie| {
        let (dir, data, m, peers) = (dirs[0].clone(), data.clone(), m.clone(), peers.clone());
        async move {
            let addr = lying_server(&dir, data, m.clone(), lie).await;
            tokio::time::timeout(Duration::from_secs(2), peers.piece(addr, &m, 0, &Relays::none())).await
        }
    };
    // A whole, verified piece is kept.
    assert!(matches!(ask(Lie::Truth).await, Ok(Ok(_))));
    assert_eq!(peers.discarded().get(), 0);
    // A piece cut short: what arrived is dropped.
    assert!(matches!(ask(Lie::CutShort(5000)).await, Ok(Err(PeerError::Transport { .. }))));
    assert_eq!(peers.discarded().get(), 5000);
    // A request given up mid-piece (here at its deadline): what arrived before is dropped.
    assert!(ask(Lie::Stall(20_000)).await.is_err(), "the stalled piece never completes");
    assert_eq!(peers.discarded().get(), 25_000);
    // A piece refused for a bad block counts the bytes read up to the refusal.
    let before = peers.discarded().get();
    assert!(matches!(ask(Lie::BadBlockThenStall(1)).await, Ok(Err(PeerError::BadPiece { .. }))));
    assert!(peers.discarded().get() > before);
}

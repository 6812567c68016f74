use super::*;
use crate::metainfo::MIN_PIECE_LENGTH;

#[tokio::test]
async fn stage_commit_and_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let data = vec![42u8; MIN_PIECE_LENGTH as usize + 10];
    let digest = Digest::of(&data);
    let mut staged = store.stage(MIN_PIECE_LENGTH).await.expect("stage");
    staged.write(&data[..100]).await.expect("write");
    staged.write(&data[100..]).await.expect("write");
    let m = staged.commit(&digest).await.expect("commit");
    assert_eq!(m.piece_count(), 2);
    assert_eq!(store.size(&digest).await, Some(data.len() as u64));
    let again = store.metainfo(&digest, MIN_PIECE_LENGTH).await.expect("meta");
    assert_eq!(again, Some(m));
    let piece = store.read_range(&digest, 5, 10).await.expect("read");
    assert_eq!(piece.as_deref(), Some(&data[5..15]));
    assert_eq!(store.read_range(&digest, data.len() as u64, 1).await.expect("read"), None);
}

#[tokio::test]
async fn wrong_digest_stores_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let claimed = Digest::of(b"something else");
    let mut staged = store.stage(MIN_PIECE_LENGTH).await.expect("stage");
    staged.write(b"actual bytes").await.expect("write");
    assert!(matches!(staged.commit(&claimed).await, Err(StoreError::DigestMismatch { .. })));
    assert_eq!(store.size(&claimed).await, None);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
}

#[tokio::test]
async fn a_dropped_upload_leaves_no_temp_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let mut staged = store.stage(MIN_PIECE_LENGTH).await.expect("stage");
    staged.write(b"half an upload").await.expect("write");
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 1);
    drop(staged);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
}

#[tokio::test]
async fn partial_blob_with_the_wrong_content_is_not_published() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
    b.update(b"some bytes");
    let m = b.finish().expect("meta");
    let (partial, _) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
    let piece = m.verify_piece(0, Bytes::from_static(b"some bytes")).expect("verified");
    partial.write_piece(piece).await.expect("write");
    let wrong = Digest::of(b"other bytes");
    assert!(matches!(partial.commit_hashed(wrong).await, Err(StoreError::DigestMismatch { .. })));
    assert_eq!(store.size(&m.digest()).await, None);
    assert_eq!(std::fs::read_dir(dir.path().join("partial")).expect("partial").count(), 0);
}

#[tokio::test]
async fn partial_blob_assembles_verified_pieces() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let data: Vec<u8> = (0..MIN_PIECE_LENGTH * 2 + 3).map(|i| (i % 251) as u8).collect();
    let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
    b.update(&data);
    let m = b.finish().expect("meta");
    let (partial, _) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
    for i in (0..m.piece_count()).rev() {
        let off = m.piece_offset(i) as usize;
        let len = m.piece_size(i).expect("size") as usize;
        let piece = m.verify_piece(i, Bytes::copy_from_slice(&data[off..off + len]));
        partial.write_piece(piece.expect("verified")).await.expect("write");
    }
    assert_eq!(partial.read_piece(2).await.expect("read").len(), 3);
    partial.commit().await.expect("commit");
    let on_disk = std::fs::read(store.blob_path(&m.digest())).expect("read");
    assert_eq!(on_disk, data);
}

fn blob_of(len: u32) -> (Vec<u8>, Metainfo) {
    let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(7) % 253) as u8).collect();
    let mut b = MetainfoBuilder::new(MIN_PIECE_LENGTH).expect("builder");
    b.update(&data);
    (data, b.finish().expect("meta"))
}

fn piece_of(data: &[u8], m: &Metainfo, i: u32) -> VerifiedPiece {
    let off = m.piece_offset(i) as usize;
    let len = m.piece_size(i).expect("size") as usize;
    m.verify_piece(i, Bytes::copy_from_slice(&data[off..off + len])).expect("verified")
}

#[tokio::test]
async fn a_partial_download_resumes_with_only_its_intact_pieces() {
    let dir = tempfile::tempdir().expect("tmp");
    let (data, m) = blob_of(MIN_PIECE_LENGTH * 5 + 17);
    {
        let store = BlobStore::open(dir.path()).expect("open");
        let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
        assert_eq!(held.count(), 0);
        for i in [0, 2, 3, 5] {
            partial.write_piece(piece_of(&data, &m, i)).await.expect("write");
        }
    }
    // Piece 3 is damaged on disk (a torn write, a bad sector) while the agent is down.
    let path = dir.path().join("partial").join(m.digest().hex());
    let f = File::options().write(true).open(&path).expect("open partial");
    f.write_all_at(b"\xff\xff", m.piece_offset(3) + 100).expect("corrupt");
    drop(f);

    let store = BlobStore::open(dir.path()).expect("reopen");
    let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("resume");
    assert_eq!(held.iter().collect::<Vec<_>>(), vec![0, 2, 5]);
    assert_eq!(partial.read_piece(2).await.expect("read").as_ref(), piece_of(&data, &m, 2).data().as_ref());
    for i in [1, 3, 4] {
        partial.write_piece(piece_of(&data, &m, i)).await.expect("write");
    }
    partial.commit().await.expect("commit");
    assert_eq!(std::fs::read(store.blob_path(&m.digest())).expect("blob"), data);
    assert!(!path.exists(), "the partial file became the blob");

    // `discard` starts over whatever is on disk.
    let (partial, _) = PartialBlob::open_or_create(&store, m.clone()).await.expect("again");
    partial.write_piece(piece_of(&data, &m, 0)).await.expect("write");
    partial.discard().await;
    drop(partial);
    let (_, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("reopen");
    assert_eq!(held.count(), 0);
}

#[tokio::test]
async fn a_truncated_partial_file_counts_only_whole_pieces() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let (data, m) = blob_of(MIN_PIECE_LENGTH * 3);
    let path = dir.path().join("partial").join(m.digest().hex());
    // A file cut inside piece 1, as if the disk filled up.
    std::fs::write(&path, &data[..MIN_PIECE_LENGTH as usize + 10]).expect("write");
    let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("resume");
    assert_eq!(held.iter().collect::<Vec<_>>(), vec![0]);
    // Not extended: the file grows only as pieces are written.
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), u64::from(MIN_PIECE_LENGTH) + 10);
    // Publishing needs the whole blob, even with the right digest in hand.
    assert!(matches!(
        partial.commit_hashed(m.digest()).await,
        Err(StoreError::SizeMismatch { expected, actual }) if expected == m.length() && actual < expected
    ));
    assert_eq!(store.size(&m.digest()).await, None);
    assert!(!path.exists());
}

#[tokio::test]
async fn a_resumed_partial_reads_only_what_was_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let (data, m) = blob_of(MIN_PIECE_LENGTH * 40 + 5);
    let path = dir.path().join("partial").join(m.digest().hex());
    let two = 2 * u64::from(MIN_PIECE_LENGTH);
    {
        let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
        assert_eq!(held.count(), 0);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0, "not pre-extended");
        for i in [0, 1] {
            partial.write_piece(piece_of(&data, &m, i)).await.expect("write");
        }
    }
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), two);
    let (partial, held) = PartialBlob::open_or_create(&store, m.clone()).await.expect("resume");
    assert_eq!(held.iter().collect::<Vec<_>>(), vec![0, 1]);
    // Reads are exact (`read_exact_at`): opening would have failed had it read past the
    // two pieces on disk, and it did not grow the file to make room.
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), two);
    let file = File::open(&path).expect("open partial");
    let (again, verified) = held_pieces(&file, &path, &m, two).expect("verify");
    assert_eq!((again.count(), verified), (2, two));

    // The rest arrives out of order; the file ends exactly at the blob's length.
    for i in (2..m.piece_count()).rev() {
        partial.write_piece(piece_of(&data, &m, i)).await.expect("write");
    }
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), m.length());
    partial.commit().await.expect("commit");
    assert_eq!(std::fs::read(store.blob_path(&m.digest())).expect("blob"), data);
}

mod backed {
    use super::super::backing::testing::MemoryBacking;
    use super::super::backing::{blob_key, meta_key};
    use super::*;
    use std::sync::atomic::Ordering;

    fn backed(dir: &Path, backing: &Arc<MemoryBacking>) -> BlobStore {
        BlobStore::open_backed(dir, backing.clone() as Arc<dyn Backing>).expect("open")
    }

    async fn push(store: &BlobStore, data: &[u8]) -> Result<Metainfo, StoreError> {
        let mut staged = store.stage(MIN_PIECE_LENGTH).await?;
        staged.write(data).await?;
        staged.commit(&Digest::of(data)).await
    }

    #[test]
    fn keys_are_named_by_the_digest() {
        let d = Digest::of(b"x");
        assert_eq!(blob_key(&d), format!("blobs/sha256/{}", d.hex()));
        assert_eq!(meta_key(&d), format!("meta/{}", d.hex()));
    }

    #[tokio::test]
    async fn a_commit_is_in_the_backing_and_an_empty_disk_is_filled_from_it() {
        let backing = Arc::new(MemoryBacking::default());
        let (data, _) = blob_of(MIN_PIECE_LENGTH * 3 + 5);
        let digest = Digest::of(&data);
        let first = tempfile::tempdir().expect("tmp");
        let m = push(&backed(first.path(), &backing), &data).await.expect("commit");
        assert_eq!(backing.object(&blob_key(&digest)).as_deref(), Some(&data[..]));
        let meta: Metainfo =
            serde_json::from_slice(&backing.object(&meta_key(&digest)).expect("meta")).expect("json");
        assert_eq!(meta, m);

        // Another (or the same, wiped) disk: nothing there until it is asked for.
        let second = tempfile::tempdir().expect("tmp");
        let store = backed(second.path(), &backing);
        assert!(!store.blob_path(&digest).exists());
        assert_eq!(store.size(&digest).await, Some(data.len() as u64));
        assert_eq!(std::fs::read(store.blob_path(&digest)).expect("blob"), data);
        assert_eq!(store.stored_metainfo(&digest).await, Some(m));
        // Filling wrote nothing back.
        assert_eq!(backing.keys().len(), 2);
        // Absent in both: absent.
        assert_eq!(store.size(&Digest::of(b"nothing")).await, None);
    }

    #[tokio::test]
    async fn concurrent_requests_fill_once() {
        let backing = Arc::new(MemoryBacking::default());
        let (data, _) = blob_of(MIN_PIECE_LENGTH * 2);
        let digest = Digest::of(&data);
        let first = tempfile::tempdir().expect("tmp");
        push(&backed(first.path(), &backing), &data).await.expect("commit");
        let second = tempfile::tempdir().expect("tmp");
        let store = backed(second.path(), &backing);
        backing.calls.store(0, Ordering::Relaxed);
        let sizes = futures_util::future::join_all((0..8).map(|_| store.size(&digest))).await;
        assert!(sizes.iter().all(|s| *s == Some(data.len() as u64)));
        // One get of the blob and one of its metainfo.
        assert_eq!(backing.calls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_failing_backing_fails_the_commit_and_leaves_nothing() {
        let backing = Arc::new(MemoryBacking::default());
        let dir = tempfile::tempdir().expect("tmp");
        let store = backed(dir.path(), &backing);
        backing.fail.store(true, Ordering::Relaxed);
        let data = b"pushed while the store is down";
        let err = push(&store, data).await.expect_err("must fail");
        assert!(matches!(err, StoreError::Backing(_)), "{err}");
        let digest = Digest::of(data);
        assert!(!store.blob_path(&digest).exists());
        assert!(!dir.path().join("meta").join(digest.hex()).exists());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
        backing.fail.store(false, Ordering::Relaxed);
        assert!(backing.object(&blob_key(&digest)).is_none());
        assert_eq!(store.size(&digest).await, None);
    }

    #[tokio::test]
    async fn damaged_objects_are_not_served() {
        let backing = Arc::new(MemoryBacking::default());
        let data = vec![7u8; 5000];
        let digest = Digest::of(&data);
        let first = tempfile::tempdir().expect("tmp");
        push(&backed(first.path(), &backing), &data).await.expect("commit");
        let mut bad = data.clone();
        bad[4000] ^= 1;
        backing.insert(&blob_key(&digest), bad.into());
        let second = tempfile::tempdir().expect("tmp");
        let store = backed(second.path(), &backing);
        assert_eq!(store.size(&digest).await, None);
        assert!(matches!(store.ensure_local(&digest).await, Err(StoreError::DigestMismatch { .. })));
        assert!(!store.blob_path(&digest).exists());
        assert_eq!(std::fs::read_dir(second.path().join("tmp")).expect("tmp").count(), 0);
    }
}

#[tokio::test]
async fn stale_partials_are_removed() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let (_, m) = blob_of(MIN_PIECE_LENGTH);
    drop(PartialBlob::open_or_create(&store, m).await.expect("create"));
    assert_eq!(store.remove_stale_partials(Duration::from_secs(3600)).expect("clean"), 0);
    assert_eq!(store.remove_stale_partials(Duration::ZERO).expect("clean"), 1);
    assert_eq!(std::fs::read_dir(dir.path().join("partial")).expect("dir").count(), 0);
}

#[tokio::test]
async fn the_prefix_hash_takes_offered_pieces_from_memory_and_reads_back_the_rest() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = BlobStore::open(dir.path()).expect("open");
    let (data, m) = blob_of(MIN_PIECE_LENGTH * 6 + 17);
    let last = m.piece_count() - 1;
    let (partial, _) = PartialBlob::open_or_create(&store, m.clone()).await.expect("create");
    let mut hasher = partial.prefix_hasher();
    // Piece 0 in order (from memory), 2 ahead of the prefix (kept only within KEEP_AHEAD),
    // 1 never offered (read back), the rest in order (from memory).
    let order = [0, 2, 1].into_iter().chain(3..=last);
    let mut written = Bitfield::new(m.piece_count());
    for i in order {
        let piece = piece_of(&data, &m, i);
        partial.write_piece(piece.clone()).await.expect("write");
        written.set(i);
        if i != 1 {
            hasher.offer(piece);
        }
        let prefix = (0..m.piece_count()).find(|&p| !written.get(p)).unwrap_or(m.piece_count());
        hasher.advance(m.piece_offset(prefix).min(m.length())).await.expect("advance");
    }
    assert_eq!(hasher.offset(), m.length());
    let size = |i| u64::from(m.piece_size(i).expect("size"));
    let read_back = size(1) + if KEEP_AHEAD >= size(2) as usize { 0 } else { size(2) };
    assert_eq!(hasher.from_memory(), m.length() - read_back);
    assert_eq!(hasher.finish(), Digest::of(&data));
}

#[test]
fn ahead_keeps_the_next_piece_and_the_nearest_within_its_limit() {
    let (data, m) = blob_of(MIN_PIECE_LENGTH * 8);
    let at = |i| m.piece_offset(i);
    let mut ahead = Ahead::with_limit(MIN_PIECE_LENGTH, 2 * MIN_PIECE_LENGTH as usize);
    for i in [5, 3, 4] {
        ahead.offer(piece_of(&data, &m, i), at(1));
    }
    // Two pieces beyond the next: 5, the furthest, gave way.
    ahead.offer(piece_of(&data, &m, 1), at(1));
    // Behind the reader: never kept.
    ahead.offer(piece_of(&data, &m, 0), at(1));
    assert!(ahead.take(at(0)).is_none());
    assert_eq!(ahead.take(at(1)).map(|p| p.data()), Some(piece_of(&data, &m, 1).data()));
    assert!(ahead.take(at(2)).is_none());
    assert_eq!(ahead.take(at(4)).map(|p| p.index()), Some(4), "3 was dropped on the way");
    assert!(ahead.take(at(3)).is_none());
    assert!(ahead.take(at(5)).is_none());
    // With no room beyond the next piece, only that one is kept.
    let mut next_only = Ahead::with_limit(MIN_PIECE_LENGTH, 0);
    next_only.offer(piece_of(&data, &m, 3), at(2));
    next_only.offer(piece_of(&data, &m, 2), at(2));
    assert!(next_only.take(at(2)).is_some());
    assert!(next_only.take(at(3)).is_none());
}

//! Metainfo documents from a tracker or origin: parsing checks every invariant, so whatever
//! parses can be asked about any piece without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::metainfo::Metainfo;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Metainfo>(data) else { return };
    let count = m.piece_count();
    for index in [0, 1, count / 2, count.saturating_sub(1), count, u32::MAX] {
        let _ = m.piece_size(index);
        if index < count {
            let _ = m.piece_offset(index);
            let _ = m.verify_piece(index, bytes_of(data));
        }
    }
});

fn bytes_of(data: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&data[..data.len().min(64)])
}

//! Peer frames from a hostile peer: decoding never panics, and what decodes encodes back to
//! a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::wire::{decode_body, encode_frame, frame_len, Request, Response, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    // A peer's frame body is never longer (the reader refuses the header first).
    if data.len() > MAX_FRAME {
        return;
    }
    if let Some(header) = data.get(..4) {
        let _ = frame_len([header[0], header[1], header[2], header[3]]);
    }
    if let Ok(request) = decode_body::<Request>(data) {
        let frame = encode_frame(&request).expect("a decoded request encodes");
        assert_eq!(decode_body::<Request>(&frame[4..]).expect("round trip"), request);
    }
    if let Ok(response) = decode_body::<Response>(data) {
        let frame = encode_frame(&response).expect("a decoded response encodes");
        assert_eq!(decode_body::<Response>(&frame[4..]).expect("round trip"), response);
    }
});

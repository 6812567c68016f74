//! What upstream registries and operators hand the origin: `WWW-Authenticate` challenges,
//! token responses and Docker `config.json` files. Parsing never panics; a bearer challenge
//! always names an http(s) realm; a token is never one that would break a header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::registry_auth::{bearer_from_response, parse_challenge, Challenge, DockerConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(text) {
            assert!(realm.starts_with("https://") || realm.starts_with("http://"));
        }
    }
    if let Ok((header, _)) = bearer_from_response(data) {
        assert!(!header.bytes().any(|b| b.is_ascii_control()));
    }
    let _ = DockerConfig::parse(data);
});

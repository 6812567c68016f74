//! What upstream registries, operators and credential helpers hand the origin:
//! `WWW-Authenticate` challenges, `Authorization` headers, token responses, Docker `config.json` files (every field:
//! `auths`, `credsStore`, `credHelpers`) and helpers' answers. Parsing never panics; a bearer
//! challenge always names an http(s) realm; a token is never one that would break a header;
//! a helper is always a `docker-credential-` program without a path; `Debug` output of
//! parsed credentials never carries their secrets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_proto::docker_config::{parse_helper_output, Source};
use shoal_proto::registry_auth::{
    bearer_from_response, parse_challenge, presented_secret, Challenge, DockerConfig,
};

fn header_safe(token: &Option<String>) -> bool {
    token.as_ref().is_none_or(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(text) {
            assert!(realm.starts_with("https://") || realm.starts_with("http://"));
        }
        let _ = presented_secret(text);
    }
    if let Ok((header, _)) = bearer_from_response(data) {
        assert!(!header.bytes().any(|b| b.is_ascii_control()));
    }
    if let Ok(config) = DockerConfig::parse(data) {
        let _ = format!("{config:?}");
        // Look up every string the document contains, as registry names.
        if let Ok(serde_json::Value::Object(doc)) = serde_json::from_slice::<serde_json::Value>(data) {
            let hub = "docker.io".to_owned();
            let hosts = ["auths", "credHelpers"]
                .iter()
                .filter_map(|k| doc.get(*k)?.as_object())
                .flat_map(|m| m.keys())
                .chain(std::iter::once(&hub));
            for host in hosts {
                match config.source(host) {
                    Some(Source::Helper(h)) => {
                        let name = h.program.strip_prefix("docker-credential-").expect("helper prefix");
                        assert!(!name.is_empty() && !name.contains('/') && !name.starts_with('.'));
                    }
                    Some(Source::Stored(auth)) => {
                        assert!(header_safe(&auth.identity_token) && header_safe(&auth.registry_token));
                        // Only which kinds are present: no string value at all.
                        assert!(!format!("{auth:?} {:?}", auth.basic).contains('"'));
                    }
                    None => {}
                }
            }
        }
    }
    if let Ok(Some(auth)) = parse_helper_output(data) {
        assert!(header_safe(&auth.identity_token));
    }
});

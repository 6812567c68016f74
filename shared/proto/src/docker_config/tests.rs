//! Every field of `config.json`, Docker Hub's aliases, helper answers, and malformed input.

use proptest::prelude::*;

use super::*;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn stored(c: &DockerConfig, host: &str) -> Auth {
    match c.source(host) {
        Some(Source::Stored(a)) => a,
        other => panic!("{host}: {other:?}"),
    }
}

#[test]
fn every_auths_field() {
    let json = format!(
        r#"{{"auths": {{
            "https://index.docker.io/v1/": {{"auth": "{}"}},
            "ghcr.io": {{"username": "u", "password": "p"}},
            "myacr.azurecr.io": {{"auth": "{}", "identitytoken": "refresh-abc"}},
            "tokens.example": {{"registrytoken": "bearer-xyz"}},
            "http://registry.local:5000/v2/": {{"identitytoken": "idt"}},
            "helper.example": {{}},
            "empty.example": {{"auth": "", "identitytoken": ""}}
        }}, "psFormat": "table", "proxies": {{}}}}"#,
        b64("user:pass:word"),
        b64("00000000-0000-0000-0000-000000000000:")
    );
    let c = DockerConfig::parse(json.as_bytes()).expect("config");
    let hub = stored(&c, "registry-1.docker.io").basic.expect("hub basic");
    assert_eq!((hub.username.as_str(), hub.password.as_str()), ("user", "pass:word"));
    let gh = stored(&c, "ghcr.io").basic.expect("basic");
    assert_eq!((gh.username.as_str(), gh.password.as_str()), ("u", "p"));
    let acr = stored(&c, "myacr.azurecr.io");
    assert_eq!(acr.identity_token.as_deref(), Some("refresh-abc"));
    assert_eq!(acr.basic.map(|b| b.password), Some(String::new()));
    assert_eq!(stored(&c, "tokens.example").registry_token.as_deref(), Some("bearer-xyz"));
    assert_eq!(stored(&c, "registry.local:5000").identity_token.as_deref(), Some("idt"));
    assert_eq!(c.source("helper.example"), None);
    assert_eq!(c.source("empty.example"), None);
    assert_eq!(c.source("registry.local"), None, "the port is part of the host");
}

#[test]
fn docker_hub_aliases_and_key_forms() {
    let json = format!(r#"{{"auths": {{"index.docker.io": {{"auth": "{}"}}}}}}"#, b64("a:b"));
    let c = DockerConfig::parse(json.as_bytes()).expect("config");
    for host in [
        "docker.io",
        "index.docker.io",
        "registry-1.docker.io",
        "https://index.docker.io/v1/",
        "http://docker.io",
        "REGISTRY-1.Docker.IO",
    ] {
        assert!(stored(&c, host).basic.is_some(), "{host}");
    }
    assert_eq!(server_url("registry-1.docker.io"), DOCKER_HUB_SERVER);
    assert_eq!(server_url("https://Registry.Local:5000/"), "registry.local:5000");

    // Two keys for one registry: Docker's exact key wins, whatever the order.
    let json = format!(
        r#"{{"auths": {{"docker.io": {{"auth": "{}"}}, "https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
        b64("alias:x"),
        b64("exact:y")
    );
    let c = DockerConfig::parse(json.as_bytes()).expect("config");
    assert_eq!(stored(&c, "docker.io").basic.map(|b| b.username).as_deref(), Some("exact"));
}

#[test]
fn helpers_in_dockers_order() {
    let json = format!(
        r#"{{"auths": {{"ghcr.io": {{"auth": "{}"}}, "quay.io": {{}}}},
            "credsStore": "desktop",
            "credHelpers": {{
                "123.dkr.ecr.us-east-1.amazonaws.com": "ecr-login",
                "https://index.docker.io/v1/": "pass",
                "gcr.io": ""
            }}}}"#,
        b64("a:b")
    );
    let c = DockerConfig::parse(json.as_bytes()).expect("config");
    let helper = |program: &str, server_url: &str| {
        Some(Source::Helper(Helper { program: program.into(), server_url: server_url.into() }))
    };
    assert_eq!(
        c.source("123.dkr.ecr.us-east-1.amazonaws.com"),
        helper("docker-credential-ecr-login", "123.dkr.ecr.us-east-1.amazonaws.com")
    );
    assert_eq!(c.source("registry-1.docker.io"), helper("docker-credential-pass", DOCKER_HUB_SERVER));
    // credsStore covers every other host, inline `auths` included, as in Docker.
    assert_eq!(c.source("ghcr.io"), helper("docker-credential-desktop", "ghcr.io"));
    assert_eq!(c.source("gcr.io"), helper("docker-credential-desktop", "gcr.io"));

    let c =
        DockerConfig::parse(br#"{"credHelpers": {"gcr.io": "gcloud"}, "credsStore": ""}"#).expect("config");
    assert_eq!(c.source("gcr.io"), helper("docker-credential-gcloud", "gcr.io"));
    assert_eq!(c.source("ghcr.io"), None);
}

#[test]
fn helper_names_cannot_escape_the_prefix() {
    for name in ["../../bin/sh", "a/b", ".hidden", "a b", "x;rm", &"a".repeat(65)] {
        let json = serde_json::json!({ "credsStore": name }).to_string();
        let err = DockerConfig::parse(json.as_bytes()).expect_err(name);
        assert!(matches!(err, ConfigError::HelperName { .. }), "{name}: {err}");
        let json = serde_json::json!({ "credHelpers": { "gcr.io": name } }).to_string();
        assert!(DockerConfig::parse(json.as_bytes()).is_err(), "{name}");
    }
}

#[test]
fn helper_answers() {
    let basic =
        parse_helper_output(br#"{"ServerURL": "gcr.io", "Username": "oauth2accesstoken", "Secret": "ya29"}"#)
            .expect("answer")
            .expect("credentials");
    let b = basic.basic.expect("basic");
    assert_eq!((b.username.as_str(), b.password.as_str()), ("oauth2accesstoken", "ya29"));
    let token =
        parse_helper_output(br#"{"ServerURL": "x.azurecr.io", "Username": "<token>", "Secret": "rt"}"#)
            .expect("answer")
            .expect("credentials");
    assert_eq!((token.identity_token.as_deref(), token.basic.is_none()), (Some("rt"), true));
    assert_eq!(parse_helper_output(br#"{"ServerURL": "x", "Username": "", "Secret": ""}"#), Ok(None));
    assert!(parse_helper_output(b"credentials not found in native keychain").is_err());
    assert!(parse_helper_output(br#"{"Username": "<token>", "Secret": "a b"}"#).is_err());
    assert!(helper_not_found(b"credentials not found in native keychain\n"));
    assert!(!helper_not_found(b"error getting credentials - err: exit status 1"));
}

#[test]
fn malformed_entries_are_errors_without_secrets() {
    let cases: [(&str, &[u8]); 6] = [
        ("auth", br#"{"auths": {"x": {"auth": "!!"}}}"#),
        ("auth", br#"{"auths": {"x": {"auth": "c2VjcmV0"}}}"#), // "secret", no colon
        ("auth", br#"{"auths": {"x": {"auth": "/w=="}}}"#),     // not UTF-8
        ("identitytoken", br#"{"auths": {"x": {"identitytoken": "secret token"}}}"#),
        ("registrytoken", br#"{"auths": {"x": {"registrytoken": "secret\ntoken"}}}"#),
        ("json", br#"{"auths": {"x": {"password": "secret""#),
    ];
    for (field, json) in cases {
        let err = DockerConfig::parse(json).expect_err(field).to_string();
        assert!(!err.contains("secret"), "{field}: {err}");
        if field != "json" {
            assert!(err.contains(field) && err.contains("auths[x]"), "{err}");
        }
    }
    assert!(DockerConfig::parse(br#"{"auths": null, "credHelpers": null}"#).is_ok());
    assert!(DockerConfig::parse(br#"{"auths": []}"#).is_err());
    assert!(DockerConfig::parse(b"").is_err());
}

#[test]
fn debug_never_shows_secrets() {
    let json = format!(
        r#"{{"auths": {{"a.example": {{"auth": "{}", "identitytoken": "idtoken-secret", "registrytoken": "regtoken-secret"}}}}}}"#,
        b64("user:password-secret")
    );
    let c = DockerConfig::parse(json.as_bytes()).expect("config");
    let auth = stored(&c, "a.example");
    let shown = format!("{c:?} {auth:?} {:?} {:?}", auth.basic, c.source("a.example"));
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("a.example"), "{shown}");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = DockerConfig::parse(&bytes);
        let _ = parse_helper_output(&bytes);
        let _ = helper_not_found(&bytes);
    }

    #[test]
    fn arbitrary_entries_parse_or_fail_without_leaking(
        key in "[a-zA-Z0-9.:/-]{0,30}",
        user in "[a-z]{0,8}",
        secret in "[A-Za-z0-9 \n]{1,24}",
        field in prop_oneof![Just("auth"), Just("password"), Just("identitytoken"), Just("registrytoken")],
        helper in proptest::option::of("[a-z./ -]{0,12}"),
    ) {
        let secret = format!("S3CR3T{secret}");
        let value = if field == "auth" { b64(&format!("{user}{secret}")) } else { secret.clone() };
        let mut doc = serde_json::json!({ "auths": { key.clone(): { "username": user, field: value } } });
        if let Some(h) = &helper {
            doc["credHelpers"] = serde_json::json!({ key.clone(): h });
        }
        match DockerConfig::parse(doc.to_string().as_bytes()) {
            Ok(c) => {
                let shown = format!("{c:?} {:?}", c.source(&key));
                prop_assert!(!shown.contains("S3CR3T"), "{}", shown);
                if helper.is_none() && !key.is_empty() {
                    prop_assert!(c.source(&key).is_some());
                }
            }
            Err(e) => prop_assert!(!e.to_string().contains("S3CR3T"), "{}", e),
        }
    }
}

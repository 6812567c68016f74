//! Upstream credentials as Docker reads them, end to end against the real CNCF distribution
//! registry: a `docker-credential-*` helper (a shell script in the origin's helper path)
//! supplying htpasswd credentials, a helper that fails, and OAuth2 identity tokens (the
//! registry in token-auth mode, in front of this crate's token service; see
//! `shoal_tests::token_service` for what it emulates).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use serde_json::json;
use shoal_tests::cluster::{basic_auth_client, pull_image_in, Cluster, ClusterOptions, UpstreamOptions};
use shoal_tests::registry::Registry;
use shoal_tests::token_service::{TokenService, ISSUER, SERVICE, TENANT};

const PASSWORD: &str = "helper-s3cret";
const REFRESH: &str = "refresh-s3cret";

/// The helpers, written once before any test runs one (a script written while another
/// thread forks cannot be executed: "text file busy"). Each answers from files beside it:
/// `<name>.answer` is printed, and the server URL read from stdin is appended to
/// `<name>.asked`, so the tests see what the origin asked and how often.
fn helper_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tmp");
        for name in ["shoaltest", "shoaltoken"] {
            let path = dir.path().join(format!("docker-credential-{name}"));
            let script = format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r url\nd=$(dirname \"$0\")\necho \"$url\" >> \"$d/{name}.asked\"\ncat \"$d/{name}.answer\"\n"
            );
            std::fs::write(&path, script).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let broken = dir.path().join("docker-credential-shoalbroken");
        std::fs::write(&broken, format!("#!/bin/sh\necho 'bad {PASSWORD}'; echo 'oops {PASSWORD}' >&2; exit 1\n"))
            .expect("write");
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    })
    .path()
}

/// What the helper `name` was asked, one server URL a line.
fn asked(name: &str) -> Vec<String> {
    std::fs::read_to_string(helper_dir().join(format!("{name}.asked")))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn options(registry: &Registry, config: serde_json::Value, dir: &Path, agents: usize) -> ClusterOptions {
    let auth = dir.join(format!("config-{}.json", rand::random::<u32>()));
    std::fs::write(&auth, config.to_string()).expect("write config.json");
    let mut up = UpstreamOptions::new(&registry.url());
    up.auth_file = Some(auth);
    up.helper_path = Some(helper_dir().to_path_buf());
    ClusterOptions { agents, piece_length: 256 << 10, upstream: Some(up), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_credential_helper_supplies_the_credentials_and_a_failing_one_is_named() {
    let helpers = helper_dir();
    let registry = Registry::start(Some(("shoal", PASSWORD))).await.expect("registry");
    let image = registry.push_image("private/app:v1", &[100 << 10, 300 << 10], 31).await.expect("push");
    let host = registry.host.clone();
    std::fs::write(
        helpers.join("shoaltest.answer"),
        json!({"ServerURL": host, "Username": "shoal", "Secret": PASSWORD}).to_string(),
    )
    .expect("answer");
    let dir = tempfile::tempdir().expect("tmp");

    // credHelpers names the helper for this registry (the key as Docker writes it, with a
    // scheme); `auths` holds nothing for it, so only the helper can make this pull work.
    let config = json!({"auths": {host.clone(): {}}, "credHelpers": {format!("http://{host}"): "shoaltest"}});
    let cluster = Cluster::start(options(&registry, config, dir.path(), 2)).await.expect("cluster");
    // The repository is private: the agents serve it to a client whose credentials the
    // registry accepts (per-tenant authorization), which containerd sends with `?ns=`.
    let tenant = basic_auth_client("shoal", PASSWORD);
    let ns = format!("?ns={host}");
    for agent in &cluster.agents {
        let pulled =
            pull_image_in(&tenant, &agent.registry_url, "private/app", "v1", &ns).await.expect("pull");
        assert_eq!(pulled.manifest_digest, image.manifest);
    }
    // Asked with the registry's host on stdin, once for the whole burst of pulls.
    assert_eq!(asked("shoaltest"), vec![host.clone()]);
    drop(cluster);

    // A helper that fails: the client is told which helper, for which registry; never what
    // it printed.
    let config = json!({"credsStore": "shoalbroken"});
    let cluster = Cluster::start(options(&registry, config, dir.path(), 1)).await.expect("cluster");
    let agent = &cluster.agents[0].registry_url;
    let resp = cluster.client.get(format!("{agent}/v2/private/app/manifests/v1")).send().await.expect("get");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    assert!(status == 503 || status == 401, "{status}: {body}");
    assert!(
        body.contains(&format!("credential helper docker-credential-shoalbroken for {host} failed")),
        "{status}: {body}"
    );
    assert!(!body.contains(PASSWORD), "helper output leaked: {body}");
    let direct = cluster
        .client
        .get(format!("{}/v2/private/app/manifests/v1", cluster.origin_url))
        .send()
        .await
        .expect("get");
    assert_eq!(direct.status().as_u16(), 503, "the origin's own answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_tokens_are_exchanged_at_the_token_service() {
    let helpers = helper_dir();
    let dir = tempfile::tempdir().expect("tmp");
    let mut registry = Registry::start(None).await.expect("registry");
    let image = registry.push_image("acr/app:v1", &[200 << 10], 32).await.expect("push");
    let tokens = TokenService::start(REFRESH, dir.path()).await.expect("token service");
    registry.require_tokens(&tokens.realm, SERVICE, ISSUER, &tokens.root_pem).await.expect("token auth");
    let host = registry.host.clone();
    // The repository is private (anonymous pulls are refused): agents serve it to a client
    // whose credentials the registry accepts, a user of the registry, checked at its token
    // service with a basic-auth GET.
    let tenant = basic_auth_client(TENANT.0, TENANT.1);
    let ns = format!("?ns={host}");

    // The registry now refuses anonymous pulls: an origin without credentials gets nothing.
    let cluster = Cluster::start(options(&registry, json!({}), dir.path(), 1)).await.expect("cluster");
    let agent = &cluster.agents[0].registry_url;
    let resp = cluster.client.get(format!("{agent}/v2/acr/app/manifests/v1")).send().await.expect("get");
    assert_eq!(resp.status().as_u16(), 401, "{}", resp.text().await.unwrap_or_default());
    assert_eq!(tokens.seen.granted.load(Ordering::SeqCst), 0);
    drop(cluster);

    // `auths.<host>.identitytoken`: the refresh-token grant, POSTed.
    let config = json!({"auths": {host.clone(): {"identitytoken": REFRESH}}});
    let cluster = Cluster::start(options(&registry, config, dir.path(), 1)).await.expect("cluster");
    let pulled =
        pull_image_in(&tenant, &cluster.agents[0].registry_url, "acr/app", "v1", &ns).await.expect("pull");
    assert_eq!(pulled.manifest_digest, image.manifest);
    let granted = tokens.seen.granted.load(Ordering::SeqCst);
    assert!(granted >= 1, "access tokens came from refresh-token grants");
    assert_eq!(tokens.seen.refused.load(Ordering::SeqCst), 0);
    drop(cluster);

    // A helper answering `<token>`: its secret is an identity token (how ACR's helper works).
    std::fs::write(
        helpers.join("shoaltoken.answer"),
        json!({"ServerURL": host, "Username": "<token>", "Secret": REFRESH}).to_string(),
    )
    .expect("answer");
    let config = json!({"credHelpers": {host.clone(): "shoaltoken"}});
    let cluster = Cluster::start(options(&registry, config, dir.path(), 1)).await.expect("cluster");
    let pulled =
        pull_image_in(&tenant, &cluster.agents[0].registry_url, "acr/app", "v1", &ns).await.expect("pull");
    assert_eq!(pulled.manifest_digest, image.manifest);
    assert!(tokens.seen.granted.load(Ordering::SeqCst) > granted);
    assert_eq!(asked("shoaltoken"), vec![host.clone()]);
    drop(cluster);

    // A wrong identity token is refused by the token service: a clear 401.
    let config = json!({"auths": {host.clone(): {"identitytoken": "not-the-token"}}});
    let cluster = Cluster::start(options(&registry, config, dir.path(), 1)).await.expect("cluster");
    let agent = &cluster.agents[0].registry_url;
    let resp = cluster.client.get(format!("{agent}/v2/acr/app/manifests/v1")).send().await.expect("get");
    let (status, body) = (resp.status().as_u16(), resp.text().await.unwrap_or_default());
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token service refused the credentials"), "{body}");
    assert!(!body.contains("not-the-token"), "{body}");
    assert!(tokens.seen.refused.load(Ordering::SeqCst) >= 1);
    drop(cluster);

    // `registrytoken`: a bearer token sent as is; the token service is not asked.
    let before = tokens.seen.granted.load(Ordering::SeqCst);
    let bearer = tokens.access_token(&["repository:acr/app:pull"]).expect("token");
    let config = json!({"auths": {host.clone(): {"registrytoken": bearer}}});
    let cluster = Cluster::start(options(&registry, config, dir.path(), 1)).await.expect("cluster");
    let pulled =
        pull_image_in(&tenant, &cluster.agents[0].registry_url, "acr/app", "v1", &ns).await.expect("pull");
    assert_eq!(pulled.manifest_digest, image.manifest);
    let after = tokens.seen.granted.load(Ordering::SeqCst);
    assert_eq!(before, after, "no refresh-token grant: the registry token was used as is");
    assert!(tokens.seen.tenant_grants.load(Ordering::SeqCst) >= 1, "the tenant's credentials were checked");
}

//! Real helper processes (shell scripts) in a temporary helper path: the protocol, the
//! cache, and every way a helper can fail, without the secret ever reaching an error.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::OnceLock;

use super::*;

/// Every script is written once, before any test spawns one: a script being written while
/// another thread forks cannot be executed ("text file busy").
fn scripts() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tmp");
        let runs = dir.path().join("runs");
        let write = |name: &str, body: String| {
            let path = dir.path().join(format!("docker-credential-{name}"));
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        };
        write(
            "good",
            format!(
                r#"[ "$1" = get ] || exit 2
read -r url
echo run >> {runs}
sleep 0.2
printf '{{"ServerURL":"%s","Username":"u-%s","Secret":"hunter2"}}' "$url" "$url""#,
                runs = runs.display()
            ),
        );
        write("token", r#"printf '{"ServerURL":"x","Username":"<token>","Secret":"refresh-1"}'"#.into());
        write("empty", "echo 'credentials not found in native keychain'; exit 1".into());
        write("broken", "echo 'hunter2 leaked on stdout'; echo 'and hunter2 on stderr' >&2; exit 3".into());
        write("slow", "sleep 5".into());
        write("chatty", "yes hunter2 | head -c 1000000".into());
        write("garbled", "echo 'hunter2'".into());
        dir
    })
    .path()
}

fn helpers() -> Helpers {
    Helpers::with_timeout(Some(scripts().as_os_str().to_owned()), Duration::from_millis(500))
}

fn helper(name: &str) -> Helper {
    Helper { program: format!("docker-credential-{name}"), server_url: "registry.example:5000".into() }
}

#[tokio::test]
async fn answers_are_read_as_docker_does_and_a_burst_costs_one_run() {
    let helpers = helpers();
    let good = helper("good");
    let asks = (0..8).map(|_| helpers.get(&good));
    for auth in futures_util::future::join_all(asks).await {
        let basic = auth.expect("helper").expect("credentials").basic.expect("basic");
        // The helper read the server URL from stdin.
        assert_eq!(
            (basic.username.as_str(), basic.password.as_str()),
            ("u-registry.example:5000", "hunter2")
        );
    }
    let runs = std::fs::read_to_string(scripts().join("runs")).expect("runs");
    assert_eq!(runs.lines().count(), 1, "eight concurrent asks, one run");

    let token = helpers.get(&helper("token")).await.expect("helper").expect("credentials");
    assert_eq!((token.identity_token.as_deref(), token.basic.is_none()), (Some("refresh-1"), true));
    assert_eq!(helpers.get(&helper("empty")).await.expect("not found is no error"), None);
}

#[tokio::test]
async fn failures_name_the_helper_and_host_never_the_output() {
    let helpers = helpers();
    for (name, what) in [
        ("broken", "failed (exit status: 3)"),
        ("slow", "did not answer within"),
        ("chatty", "printed more than 65536 bytes"),
        ("garbled", "not credentials"),
        ("missing", "not found in the helper path"),
    ] {
        let started = std::time::Instant::now();
        let err = helpers.get(&helper(name)).await.expect_err(name);
        let text = err.to_string();
        assert!(text.contains(&format!("docker-credential-{name} for registry.example:5000")), "{text}");
        assert!(text.contains(what), "{name}: {text}");
        assert!(!text.contains("hunter2") && !format!("{err:?}").contains("hunter2"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(3), "{name} took {:?}", started.elapsed());
    }
    assert!(helpers.get(&helper("broken")).await.expect_err("again").transient(), "failures are not kept");
}

#[tokio::test]
async fn a_keychain_hands_out_stored_credentials_or_asks_the_helper() {
    let helpers = Arc::new(helpers());
    let stored = Auth { registry_token: Some("t".into()), ..Auth::default() };
    let kc = Keychain::new(Source::Stored(stored.clone()), &helpers);
    assert_eq!(kc.get().await.expect("stored"), Some(stored));
    let kc = Keychain::new(Source::Helper(helper("token")), &helpers);
    assert!(kc.get().await.expect("helper").is_some_and(|a| a.identity_token.is_some()));
    assert!(!format!("{kc:?}").contains("refresh-1"));
}

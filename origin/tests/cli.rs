//! The built `shoal-origin` binary runs and documents its flags (this test also makes
//! `cargo test --workspace` build the binary, which the install tests package and run).

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-origin")).args(args).output().expect("run shoal-origin");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8")
}

#[test]
fn version_and_flags() {
    assert!(run(&["--version"]).contains(env!("CARGO_PKG_VERSION")));
    let help = run(&["serve", "--help"]);
    for flag in [
        "--cluster",
        "--self",
        "--replicas",
        "--ring-key",
        "--store",
        "--pull-through-retention",
        "--drain-timeout",
    ] {
        assert!(help.contains(flag), "{flag} missing from serve --help:\n{help}");
    }
    assert!(run(&["ca", "issue", "--help"]).contains("--role"));
}

#[test]
fn every_environment_variable_is_shared_alike_or_this_binarys_own() {
    let help = run(&["serve", "--help"]);
    let unowned = shoal_shared::config::unowned_env(&help, "SHOAL_ORIGIN_", shoal_shared::config::ORIGIN_ENV);
    assert!(
        unowned.is_empty(),
        "list these in shoal_shared::config (shared with one meaning, or own): {unowned:?}"
    );
}

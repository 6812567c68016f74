//! `shoal-agent containerd-config`: the `hosts.toml` files that point containerd at the
//! agent, one directory per registry under containerd's `config_path`
//! (`/etc/containerd/certs.d` by convention).
//!
//! containerd tries the `[host]` entries in order and falls back to `server` (the upstream
//! registry itself) when the agent fails, so a broken agent slows pulls down but never
//! stops them. Mirror requests carry `?ns=<registry>`, which is how the cluster knows which
//! upstream an image comes from.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// containerd's name for "any registry without its own directory".
pub const DEFAULT_HOST: &str = "_default";

/// Why the files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("invalid registry host {0:?}: expected a host name or IP with an optional :port, or _default")]
    Registry(String),
    #[error("invalid agent endpoint {0:?}: expected http://host:port or https://host:port")]
    Endpoint(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Checks a registry host as containerd names its directories: `host[:port]`, or
/// `_default`.
pub fn valid_registry(host: &str) -> bool {
    host == DEFAULT_HOST || shoal_shared::hint::valid_ns(host)
}

fn valid_endpoint(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://")) else {
        return false;
    };
    let rest = rest.trim_end_matches('/');
    !rest.contains('/') && valid_registry(rest) && rest != DEFAULT_HOST
}

/// The upstream URL containerd falls back to for `registry` (`None` for `_default`, where
/// containerd derives it from the image name).
fn upstream(registry: &str) -> Option<String> {
    match registry {
        DEFAULT_HOST => None,
        // Docker Hub's images are named docker.io/... but served by registry-1.docker.io.
        "docker.io" => Some("https://registry-1.docker.io".to_owned()),
        other => Some(format!("https://{other}")),
    }
}

/// The `hosts.toml` for one registry, pointing at the agent's registry `endpoint`.
pub fn hosts_toml(registry: &str, endpoint: &str) -> Result<String, ContainerdConfigError> {
    if !valid_registry(registry) {
        return Err(ContainerdConfigError::Registry(registry.to_owned()));
    }
    if !valid_endpoint(endpoint) {
        return Err(ContainerdConfigError::Endpoint(endpoint.to_owned()));
    }
    let endpoint = endpoint.trim_end_matches('/');
    let mut out =
        String::from("# Written by `shoal-agent containerd-config`: pull through the local Shoal agent,\n");
    out.push_str("# and straight from the registry if the agent fails.\n");
    if let Some(server) = upstream(registry) {
        let _ = writeln!(out, "server = \"{server}\"");
    }
    let _ = write!(out, "\n[host.\"{endpoint}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    Ok(out)
}

/// Writes `<dir>/<registry>/hosts.toml` for each registry (atomically: temp file, then
/// rename) and returns the paths written.
pub fn write(
    dir: &Path,
    registries: &[String],
    endpoint: &str,
) -> Result<Vec<PathBuf>, ContainerdConfigError> {
    // Render everything first so a bad argument writes nothing.
    let files: Vec<(PathBuf, String)> = registries
        .iter()
        .map(|r| Ok((dir.join(r), hosts_toml(r, endpoint)?)))
        .collect::<Result<_, ContainerdConfigError>>()?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ContainerdConfigError::Io { path, source }
    };
    let mut written = Vec::with_capacity(files.len());
    for (host_dir, body) in files {
        std::fs::create_dir_all(&host_dir).map_err(io(&host_dir))?;
        let path = host_dir.join("hosts.toml");
        let tmp = host_dir.join(".hosts.toml.tmp");
        std::fs::write(&tmp, body).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// What to add to containerd's own configuration so it reads the files.
pub fn containerd_snippet(dir: &Path) -> String {
    format!(
        "# /etc/containerd/config.toml (containerd 1.x; restart containerd afterwards)\n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n\n\
         # containerd 2.x:\n\
         # [plugins.\"io.containerd.cri.v1.images\".registry]\n#   config_path = \"{}\"\n\n\
         # ctr reads the same files with: ctr images pull --hosts-dir {} IMAGE\n",
        dir.display(),
        dir.display(),
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts() {
        for ok in
            ["docker.io", "ghcr.io", "127.0.0.1:5000", "localhost", "my-reg.example.com:443", "_default"]
        {
            assert!(valid_registry(ok), "{ok}");
        }
        for bad in
            ["", "a/b", "../x", "host:", "host:0", "host:99999", "-a.com", "a..b", "a b", ".", "..", "h:p"]
        {
            assert!(!valid_registry(bad), "{bad}");
        }
    }

    #[test]
    fn renders_toml_with_fallback() {
        let text = hosts_toml("docker.io", "http://127.0.0.1:5050/").unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["server"].as_str(), Some("https://registry-1.docker.io"));
        let host = doc["host"]["http://127.0.0.1:5050"].as_table().unwrap();
        assert_eq!(host["capabilities"].as_array().unwrap().len(), 2);

        let text = hosts_toml("_default", "http://127.0.0.1:5050").unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert!(!doc.contains_key("server"));
        assert!(doc["host"].as_table().unwrap().contains_key("http://127.0.0.1:5050"));

        let doc: toml::Table = hosts_toml("reg.local:5000", "http://10.0.0.1:5050").unwrap().parse().unwrap();
        assert_eq!(doc["server"].as_str(), Some("https://reg.local:5000"));
    }

    #[test]
    fn bad_arguments_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let regs = vec!["docker.io".to_owned(), "../../etc".to_owned()];
        assert!(matches!(
            write(dir.path(), &regs, "http://127.0.0.1:5050"),
            Err(ContainerdConfigError::Registry(_))
        ));
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        for bad in ["127.0.0.1:5050", "ftp://x:1", "http://a/b", "http://\"]\n"] {
            assert!(matches!(hosts_toml("docker.io", bad), Err(ContainerdConfigError::Endpoint(_))), "{bad}");
        }
    }

    #[test]
    fn writes_one_directory_per_registry() {
        let dir = tempfile::tempdir().unwrap();
        let regs = vec!["docker.io".to_owned(), "_default".to_owned()];
        let paths = write(dir.path(), &regs, "http://127.0.0.1:5050").unwrap();
        assert_eq!(
            paths,
            vec![dir.path().join("docker.io/hosts.toml"), dir.path().join("_default/hosts.toml")]
        );
        for p in paths {
            let _: toml::Table = std::fs::read_to_string(p).unwrap().parse().unwrap();
        }
    }
}

//! `shoal-agent containerd-config`: the `hosts.toml` files that point containerd at the
//! agent, one directory per registry under containerd's `config_path`
//! (`/etc/containerd/certs.d` by convention).
//!
//! containerd tries the `[host]` entries in the order the file lists them and falls back to
//! `server` (the upstream registry itself) when they all fail, so a broken agent slows pulls
//! down but never stops them; the agent's entry carries a short `dial_timeout` so a dead
//! agent costs [`DIAL_TIMEOUT`], not containerd's 30 s. Mirror requests carry
//! `?ns=<registry>`, which is how the cluster knows which upstream an image comes from.
//!
//! A node often has these files already (a mirror, a private CA, credentials headers). The
//! agent's entry is therefore *merged* into an existing file as one marked block of lines,
//! inserted before the operator's first table so it is the first host containerd tries, and
//! nothing else in the file is touched: running it again rewrites nothing (byte-identical),
//! and [`remove`] takes out exactly that block, which restores the operator's file byte for
//! byte. A file that did not exist is created with the marker [`CREATED`] and deleted again
//! by [`remove`]. The edits are computed as text by pure functions ([`merged`],
//! [`unmerged`]) and each result is checked by parsing it: the merged document must equal
//! the operator's plus the agent's host, or nothing is written.

use std::path::{Path, PathBuf};

/// containerd's name for "any registry without its own directory".
pub const DEFAULT_HOST: &str = "_default";

/// How long containerd waits to connect to the agent before it tries the next host.
pub const DIAL_TIMEOUT: &str = "200ms";

/// First line of the agent's block in a `hosts.toml`.
const BEGIN: &str = "# >>> shoal-agent containerd-config: pull through the local Shoal agent first";
/// [`BEGIN`]'s suffix when the block was appended to a file whose last line had no newline
/// (one was added before the block, and [`remove`] takes it out again).
const ADDED_NEWLINE: &str = " (newline added above)";
/// Last line of the agent's block.
const END: &str =
    "# <<< shoal-agent containerd-config (`shoal-agent containerd-config --remove` takes this block out)";
/// First line of a file this tool created (no file existed): [`remove`] deletes it when
/// nothing but what it wrote is left.
pub const CREATED: &str = "# Created by `shoal-agent containerd-config`; `--remove` deletes it.";
/// First line of the files earlier versions wrote whole (no block markers): such a file is
/// entirely the agent's and is rewritten in the current form.
const LEGACY: &str = "# Written by `shoal-agent containerd-config`";

/// Why the files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("invalid registry host {0:?}: expected a host name or IP with an optional :port, or _default")]
    Registry(String),
    #[error("invalid agent endpoint {0:?}: expected http://host:port or https://host:port")]
    Endpoint(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid TOML, left as it is: {reason}")]
    Unparsable { path: PathBuf, reason: String },
    #[error("{path}: already has a [host.\"{endpoint}\"] entry of its own; left as it is (remove that entry, or keep it instead of running containerd-config)")]
    OwnEntry { path: PathBuf, endpoint: String },
    #[error("{path}: the shoal-agent block is damaged (a begin line without its end line, or the reverse); left as it is")]
    DamagedBlock { path: PathBuf },
    #[error("{path}: cannot merge the agent's host into this file ({reason}); add it by hand")]
    Merge { path: PathBuf, reason: String },
}

/// What [`apply`] or [`remove`] did to one `hosts.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// No file existed: one was created.
    Created,
    /// The agent's block was added to the operator's file.
    Merged,
    /// The agent's block was there with other settings and was rewritten.
    Updated,
    /// The file was already as asked; it was not written.
    Unchanged,
    /// The agent's block was taken out of the operator's file.
    Removed,
    /// The file held only what this tool created; it was deleted.
    Deleted,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Created => "created",
            Action::Merged => "merged the agent into",
            Action::Updated => "updated",
            Action::Unchanged => "unchanged",
            Action::Removed => "removed the agent from",
            Action::Deleted => "deleted",
        })
    }
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

fn check(registry: &str, endpoint: &str) -> Result<String, ContainerdConfigError> {
    if !valid_registry(registry) {
        return Err(ContainerdConfigError::Registry(registry.to_owned()));
    }
    if !valid_endpoint(endpoint) {
        return Err(ContainerdConfigError::Endpoint(endpoint.to_owned()));
    }
    Ok(endpoint.trim_end_matches('/').to_owned())
}

/// The agent's marked block: its `[host]` table between [`BEGIN`] and [`END`], followed by
/// a blank line.
fn block(endpoint: &str) -> String {
    format!(
        "{BEGIN}\n[host.\"{endpoint}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  \
         dial_timeout = \"{DIAL_TIMEOUT}\"\n{END}\n\n"
    )
}

/// What a created file holds besides the block: the marker and the fallback `server`.
fn created_rest(registry: &str) -> String {
    let mut out = format!("{CREATED}\n");
    if let Some(server) = upstream(registry) {
        out.push_str(&format!("server = \"{server}\"\n"));
    }
    out.push('\n');
    out
}

/// The `hosts.toml` for one registry when none exists yet, pointing at the agent's
/// registry `endpoint`.
pub fn hosts_toml(registry: &str, endpoint: &str) -> Result<String, ContainerdConfigError> {
    let endpoint = check(registry, endpoint)?;
    Ok(created_rest(registry) + &block(&endpoint))
}

/// Where the agent's block is in `text`: the byte range of its lines, and whether a newline
/// was added in front of it.
fn find_block(
    text: &str,
    path: &Path,
) -> Result<Option<(std::ops::Range<usize>, bool)>, ContainerdConfigError> {
    let mut start = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare.starts_with(BEGIN) {
            if start.is_some() {
                return Err(ContainerdConfigError::DamagedBlock { path: path.to_owned() });
            }
            start = Some((offset, bare.ends_with(ADDED_NEWLINE)));
        } else if bare == END {
            let Some((begin, added_newline)) = start else {
                return Err(ContainerdConfigError::DamagedBlock { path: path.to_owned() });
            };
            let mut end = offset + line.len();
            // The blank line that follows the block is part of it.
            if text[end..].starts_with('\n') {
                end += 1;
            }
            // One block per file: anything after this one is the operator's.
            if text[end..].lines().any(|l| l.starts_with(BEGIN) || l == END) {
                return Err(ContainerdConfigError::DamagedBlock { path: path.to_owned() });
            }
            return Ok(Some((begin..end, added_newline)));
        }
        offset += line.len();
    }
    match start {
        Some(_) => Err(ContainerdConfigError::DamagedBlock { path: path.to_owned() }),
        None => Ok(None),
    }
}

fn parse(text: &str, path: &Path) -> Result<toml::Table, ContainerdConfigError> {
    text.parse::<toml::Table>().map_err(|e| ContainerdConfigError::Unparsable {
        path: path.to_owned(),
        reason: e.message().to_owned(),
    })
}

/// The byte offset of the first line that opens a table (`[...]`), where the agent's block
/// goes so that it is the first host; `None` when the file has only top-level keys.
fn first_table(text: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

/// `existing` (the file at `path`, if any) with the agent's block for `endpoint` in it, and
/// what that is. Pure; every result is parsed and compared with the operator's document
/// before it is returned.
pub fn merged(
    existing: Option<&str>,
    path: &Path,
    registry: &str,
    endpoint: &str,
) -> Result<(String, Action), ContainerdConfigError> {
    let endpoint = check(registry, endpoint)?;
    let wanted = block(&endpoint);
    let Some(text) = existing.filter(|t| !t.starts_with(LEGACY)) else {
        let action = if existing.is_some() { Action::Updated } else { Action::Created };
        return Ok((created_rest(registry) + &wanted, action));
    };
    let had_block = find_block(text, path)?.is_some();
    let rest = strip_block(text, path)?;
    let theirs = parse(&rest, path)?;
    let host_tables = theirs.get("host").and_then(toml::Value::as_table);
    if host_tables.is_some_and(|hosts| hosts.contains_key(&endpoint)) {
        return Err(ContainerdConfigError::OwnEntry { path: path.to_owned(), endpoint });
    }
    let out = match find_block(text, path)? {
        // Already there: replace the block in place (same bytes: nothing changes).
        Some((range, added_newline)) => {
            let mut block = wanted.clone();
            if added_newline {
                block = block.replacen(BEGIN, &format!("{BEGIN}{ADDED_NEWLINE}"), 1);
            }
            format!("{}{block}{}", &text[..range.start], &text[range.end..])
        }
        None => match first_table(text) {
            Some(at) => format!("{}{wanted}{}", &text[..at], &text[at..]),
            None if text.is_empty() || text.ends_with('\n') => format!("{text}{wanted}"),
            None => format!("{text}\n{}", wanted.replacen(BEGIN, &format!("{BEGIN}{ADDED_NEWLINE}"), 1)),
        },
    };
    // The result must be the operator's document plus exactly the agent's host, and taking
    // the block out again must give their file back.
    let mut expected = theirs;
    let mut host = toml::Table::new();
    host.insert("capabilities".into(), toml::Value::Array(vec!["pull".into(), "resolve".into()]));
    host.insert("dial_timeout".into(), DIAL_TIMEOUT.into());
    let hosts = expected.entry("host").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(hosts) = hosts.as_table_mut() else {
        return Err(ContainerdConfigError::Merge {
            path: path.to_owned(),
            reason: "`host` is not a table".into(),
        });
    };
    hosts.insert(endpoint.clone(), toml::Value::Table(host));
    let got = parse(&out, path).map_err(|e| ContainerdConfigError::Merge {
        path: path.to_owned(),
        reason: format!("the merged file would not parse: {e}"),
    })?;
    if got != expected || unmerged(&out, path)? != unmerged(text, path)? {
        return Err(ContainerdConfigError::Merge {
            path: path.to_owned(),
            reason: "the merged file would not be the original plus the agent's host".into(),
        });
    }
    let action = match (out == text, had_block) {
        (true, _) => Action::Unchanged,
        (false, true) => Action::Updated,
        (false, false) => Action::Merged,
    };
    Ok((out, action))
}

/// `text` without the agent's block (and the newline it added, if any).
fn strip_block(text: &str, path: &Path) -> Result<String, ContainerdConfigError> {
    Ok(match find_block(text, path)? {
        None => text.to_owned(),
        Some((range, added_newline)) => {
            let start = if added_newline { range.start.saturating_sub(1) } else { range.start };
            format!("{}{}", &text[..start], &text[range.end..])
        }
    })
}

/// `text` without the agent's block: `Some` of what the operator had (the text itself when
/// there is no block), or `None` when the file was created by this tool and nothing else
/// was added to it (delete it). Files of earlier versions count as created.
pub fn unmerged(text: &str, path: &Path) -> Result<Option<String>, ContainerdConfigError> {
    if text.starts_with(LEGACY) {
        return Ok(None);
    }
    let rest = strip_block(text, path)?;
    if let Some(body) = rest.strip_prefix(CREATED) {
        // Only the marker, the `server` line this tool wrote and blank lines left.
        if body.lines().all(|l| l.trim().is_empty() || l.starts_with("server = \"")) {
            return Ok(None);
        }
    }
    Ok(Some(rest))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerdConfigError + '_ {
    move |source| ContainerdConfigError::Io { path: path.to_owned(), source }
}

fn read_existing(path: &Path) -> Result<Option<String>, ContainerdConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Replaces `path` with `body` atomically (temp file in the same directory, then rename),
/// keeping the old file's permissions.
fn replace(path: &Path, body: &str) -> Result<(), ContainerdConfigError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(".hosts.toml.shoal-tmp");
    std::fs::write(&tmp, body).map_err(io(&tmp))?;
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&tmp, meta.permissions()).map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Points containerd at the agent for each registry: creates `<dir>/<registry>/hosts.toml`
/// or merges the agent into the one there, writing only files that change. Every file is
/// read and its result computed before any is written, so a bad argument or a file that
/// cannot be merged writes nothing.
pub fn apply(
    dir: &Path,
    registries: &[String],
    endpoint: &str,
) -> Result<Vec<(PathBuf, Action)>, ContainerdConfigError> {
    let mut plan = Vec::with_capacity(registries.len());
    for registry in registries {
        check(registry, endpoint)?;
        let path = dir.join(registry).join("hosts.toml");
        let existing = read_existing(&path)?;
        let (body, action) = merged(existing.as_deref(), &path, registry, endpoint)?;
        plan.push((path, body, action));
    }
    let mut done = Vec::with_capacity(plan.len());
    for (path, body, action) in plan {
        if action != Action::Unchanged {
            replace(&path, &body)?;
        }
        done.push((path, action));
    }
    Ok(done)
}

/// [`apply`], returning the path of every file that now points at the agent.
pub fn write(
    dir: &Path,
    registries: &[String],
    endpoint: &str,
) -> Result<Vec<PathBuf>, ContainerdConfigError> {
    Ok(apply(dir, registries, endpoint)?.into_iter().map(|(path, _)| path).collect())
}

/// Undoes [`apply`] for each registry: takes the agent's block out of the file (the
/// operator's file comes back byte for byte), or deletes a file this tool created, and its
/// directory when that is left empty. Files without the block are not touched.
pub fn remove(dir: &Path, registries: &[String]) -> Result<Vec<(PathBuf, Action)>, ContainerdConfigError> {
    let mut plan = Vec::with_capacity(registries.len());
    for registry in registries {
        if !valid_registry(registry) {
            return Err(ContainerdConfigError::Registry(registry.clone()));
        }
        let path = dir.join(registry).join("hosts.toml");
        let Some(text) = read_existing(&path)? else {
            plan.push((path, None, Action::Unchanged));
            continue;
        };
        match unmerged(&text, &path)? {
            None => plan.push((path, None, Action::Deleted)),
            Some(rest) if rest == text => plan.push((path, None, Action::Unchanged)),
            Some(rest) => plan.push((path, Some(rest), Action::Removed)),
        }
    }
    let mut done = Vec::with_capacity(plan.len());
    for (path, body, action) in plan {
        match action {
            Action::Deleted => {
                std::fs::remove_file(&path).map_err(io(&path))?;
                if let Some(parent) = path.parent() {
                    // Only when empty; anything else in it is the operator's.
                    let _ = std::fs::remove_dir(parent);
                }
            }
            Action::Removed => replace(&path, body.as_deref().unwrap_or_default())?,
            _ => {}
        }
        done.push((path, action));
    }
    Ok(done)
}

/// What [`apply`] would write, without writing it (`--dry-run`): each file's path and
/// its new content.
pub fn preview(
    dir: &Path,
    registries: &[String],
    endpoint: &str,
) -> Result<Vec<(PathBuf, String)>, ContainerdConfigError> {
    registries
        .iter()
        .map(|registry| {
            let path = dir.join(registry).join("hosts.toml");
            let existing = read_existing(&path)?;
            let (body, _) = merged(existing.as_deref(), &path, registry, endpoint)?;
            Ok((path, body))
        })
        .collect()
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

    const AGENT: &str = "http://127.0.0.1:5050";

    /// An operator's file: comments, a fallback server, a mirror with a header table and
    /// a private CA, odd spacing.
    const OPERATOR: &str = "# our mirror first, then Docker Hub\n\
        server = \"https://registry-1.docker.io\"\n\
        \n\
        [host.\"https://mirror.corp.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/certs/corp.pem\"\n\
        \n\
        [host.\"https://mirror.corp.example\".header]\n  x-team = [\"platform\"]\n\
        \n\
        [host.\"https://backup.corp.example\"]\n    capabilities = [\"pull\"]   # blobs only\n";

    fn p() -> PathBuf {
        PathBuf::from("/etc/containerd/certs.d/docker.io/hosts.toml")
    }

    fn merge(existing: Option<&str>) -> (String, Action) {
        merged(existing, &p(), "docker.io", AGENT).unwrap()
    }

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
    fn renders_toml_with_fallback_and_dial_timeout() {
        let text = hosts_toml("docker.io", "http://127.0.0.1:5050/").unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert_eq!(doc["server"].as_str(), Some("https://registry-1.docker.io"));
        let host = doc["host"]["http://127.0.0.1:5050"].as_table().unwrap();
        assert_eq!(host["capabilities"].as_array().unwrap().len(), 2);
        assert_eq!(host["dial_timeout"].as_str(), Some(DIAL_TIMEOUT));

        let text = hosts_toml("_default", "http://127.0.0.1:5050").unwrap();
        let doc: toml::Table = text.parse().unwrap();
        assert!(!doc.contains_key("server"));
        assert!(doc["host"].as_table().unwrap().contains_key("http://127.0.0.1:5050"));

        let doc: toml::Table = hosts_toml("reg.local:5000", "http://10.0.0.1:5050").unwrap().parse().unwrap();
        assert_eq!(doc["server"].as_str(), Some("https://reg.local:5000"));
        assert_eq!(merge(None), (hosts_toml("docker.io", AGENT).unwrap(), Action::Created));
    }

    #[test]
    fn merge_keeps_the_operators_entries_and_puts_the_agent_first() {
        let (out, action) = merge(Some(OPERATOR));
        assert_eq!(action, Action::Merged);
        // Every byte of theirs is still there, in order, around the one block.
        let at = out.find(BEGIN).unwrap();
        assert_eq!(
            &out[..at],
            "# our mirror first, then Docker Hub\nserver = \"https://registry-1.docker.io\"\n\n"
        );
        assert!(out.ends_with(&OPERATOR[at..]), "{out}");
        // The agent's host is the first `[host]` containerd reads.
        let agent = out.find("[host.\"http://127.0.0.1:5050\"]").unwrap();
        let mirror = out.find("[host.\"https://mirror.corp.example\"]").unwrap();
        assert!(agent < mirror);
        let doc: toml::Table = out.parse().unwrap();
        let theirs: toml::Table = OPERATOR.parse().unwrap();
        for (key, value) in &theirs["host"].as_table().unwrap().clone() {
            assert_eq!(&doc["host"][key], value, "{key}");
        }
        assert_eq!(doc["host"][AGENT]["dial_timeout"].as_str(), Some("200ms"));
        assert_eq!(doc["server"], theirs["server"]);

        // Idempotent: a second run changes no byte.
        assert_eq!(merge(Some(&out)), (out.clone(), Action::Unchanged));
        // Removal gives their file back, byte for byte.
        assert_eq!(unmerged(&out, &p()).unwrap().as_deref(), Some(OPERATOR));
    }

    #[test]
    fn round_trips_over_files_of_every_shape() {
        for original in [
            "",
            "server = \"https://ghcr.io\"",
            "server = \"https://ghcr.io\"\n",
            "# only a comment",
            "server = \"https://ghcr.io\"\r\n\r\n[host.\"https://m.example\"]\r\n  capabilities = [\"pull\"]\r\n",
            "[host.\"https://m.example\"]\ncapabilities = [\n  \"pull\",\n  \"resolve\",\n]\n",
            "server = \"https://x.example\"\ncapabilities = [\"pull\", \"resolve\", \"push\"]\nskip_verify = false\n\n[header]\n  a = \"b\"\n",
            OPERATOR,
        ] {
            let (out, action) = merge(Some(original));
            assert_eq!(action, Action::Merged, "{original:?}");
            let doc: toml::Table = out.parse().unwrap_or_else(|e| panic!("{out}: {e}"));
            assert!(doc["host"].as_table().unwrap().contains_key(AGENT), "{out}");
            assert_eq!(merge(Some(&out)).1, Action::Unchanged, "{out}");
            assert_eq!(unmerged(&out, &p()).unwrap().as_deref(), Some(original), "{out}");
        }
    }

    #[test]
    fn a_new_endpoint_rewrites_the_block_in_place() {
        let (first, _) = merge(Some(OPERATOR));
        let (second, action) = merged(Some(&first), &p(), "docker.io", "http://127.0.0.1:6060").unwrap();
        assert_eq!(action, Action::Updated);
        assert!(!second.contains(AGENT) && second.contains("http://127.0.0.1:6060"));
        assert_eq!(second.matches(BEGIN).count(), 1);
        assert_eq!(unmerged(&second, &p()).unwrap().as_deref(), Some(OPERATOR));
    }

    #[test]
    fn created_and_legacy_files_are_the_agents_alone() {
        let (created, _) = merge(None);
        assert_eq!(unmerged(&created, &p()).unwrap(), None);
        let legacy = "# Written by `shoal-agent containerd-config`: pull through the local Shoal agent,\n\
                      # and straight from the registry if the agent fails.\nserver = \"https://registry-1.docker.io\"\n\n\
                      [host.\"http://127.0.0.1:5050\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
        assert_eq!(merge(Some(legacy)), (created.clone(), Action::Updated));
        assert_eq!(unmerged(legacy, &p()).unwrap(), None);
        // A created file the operator added a host to is theirs from then on.
        let grown = format!("{created}[host.\"https://m.example\"]\n  capabilities = [\"pull\"]\n");
        let kept = unmerged(&grown, &p()).unwrap().unwrap();
        assert!(kept.contains("m.example") && !kept.contains(AGENT));
    }

    #[test]
    fn refuses_what_it_cannot_merge_safely() {
        let own = format!("[host.\"{AGENT}\"]\n  capabilities = [\"pull\"]\n");
        assert!(matches!(
            merged(Some(&own), &p(), "docker.io", AGENT),
            Err(ContainerdConfigError::OwnEntry { .. })
        ));
        assert!(matches!(
            merged(Some("server = \n"), &p(), "docker.io", AGENT),
            Err(ContainerdConfigError::Unparsable { .. })
        ));
        let (out, _) = merge(Some(OPERATOR));
        let damaged = out.replacen(END, "# something else", 1);
        assert!(matches!(unmerged(&damaged, &p()), Err(ContainerdConfigError::DamagedBlock { .. })));
        assert!(matches!(
            merged(Some(&damaged), &p(), "docker.io", AGENT),
            Err(ContainerdConfigError::DamagedBlock { .. })
        ));
        let twice = format!("{out}{}", block(AGENT));
        assert!(matches!(unmerged(&twice, &p()), Err(ContainerdConfigError::DamagedBlock { .. })));
        // A table header inside a multi-line string is not the first table: the check
        // refuses rather than writing a broken file.
        let tricky = "server = \"https://x.example\"\nnote = \"\"\"\n[not a table]\n\"\"\"\n";
        assert!(matches!(
            merged(Some(tricky), &p(), "docker.io", AGENT),
            Err(ContainerdConfigError::Merge { .. })
        ));
    }

    #[test]
    fn bad_arguments_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let regs = vec!["docker.io".to_owned(), "../../etc".to_owned()];
        assert!(matches!(write(dir.path(), &regs, AGENT), Err(ContainerdConfigError::Registry(_))));
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        for bad in ["127.0.0.1:5050", "ftp://x:1", "http://a/b", "http://\"]\n"] {
            assert!(matches!(hosts_toml("docker.io", bad), Err(ContainerdConfigError::Endpoint(_))), "{bad}");
        }
        // One file that cannot be merged: no file is written.
        std::fs::create_dir_all(dir.path().join("ghcr.io")).unwrap();
        std::fs::write(dir.path().join("ghcr.io/hosts.toml"), "server = [").unwrap();
        let regs = vec!["docker.io".to_owned(), "ghcr.io".to_owned()];
        assert!(matches!(apply(dir.path(), &regs, AGENT), Err(ContainerdConfigError::Unparsable { .. })));
        assert!(!dir.path().join("docker.io").exists());
    }

    #[test]
    fn apply_and_remove_on_disk() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("docker.io/hosts.toml");
        std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
        std::fs::write(&theirs, OPERATOR).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o640)).unwrap();
        let regs = vec!["docker.io".to_owned(), "_default".to_owned()];

        let done = apply(dir.path(), &regs, AGENT).unwrap();
        assert_eq!(
            done,
            vec![(theirs.clone(), Action::Merged), (dir.path().join("_default/hosts.toml"), Action::Created)]
        );
        assert_eq!(std::fs::metadata(&theirs).unwrap().permissions().mode() & 0o777, 0o640);
        let merged_text = std::fs::read_to_string(&theirs).unwrap();
        let done = apply(dir.path(), &regs, AGENT).unwrap();
        assert!(done.iter().all(|(_, a)| *a == Action::Unchanged), "{done:?}");
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), merged_text);
        let preview = preview(dir.path(), &regs, AGENT).unwrap();
        assert_eq!(preview[0], (theirs.clone(), merged_text));

        let done = remove(dir.path(), &regs).unwrap();
        assert_eq!(done[0], (theirs.clone(), Action::Removed));
        assert_eq!(done[1].1, Action::Deleted);
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), OPERATOR);
        assert!(!dir.path().join("_default").exists());
        // Nothing left to remove: nothing changes.
        let done = remove(dir.path(), &regs).unwrap();
        assert!(done.iter().all(|(_, a)| *a == Action::Unchanged), "{done:?}");
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), OPERATOR);
        let names: Vec<_> =
            std::fs::read_dir(theirs.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("hosts.toml")], "no temp file left behind");
    }
}

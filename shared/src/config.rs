//! Layered configuration: command-line flags over `SHOAL_*` environment variables (both
//! handled by clap) over a TOML `--config` file over defaults.
//!
//! Each binary declares its flags as a clap struct whose fields are all optional and
//! serializable, and its typed configuration as a serde struct with defaults. [`layered`]
//! overlays the flags that were given on the file's table and parses the result, so a bad
//! value, wherever it came from, is reported with its key name.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Merges `flags` (only the ones set) over the TOML file at `file`, and parses the result.
pub fn layered<T: DeserializeOwned>(flags: &impl Serialize, file: Option<&Path>) -> Result<T, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
            toml::from_str::<toml::Table>(&text)
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?
        }
        None => toml::Table::new(),
    };
    let flags = toml::Table::try_from(flags).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    for (key, value) in flags {
        table.insert(key, value);
    }
    // Round-trip through text so that errors name the offending key.
    let text = toml::to_string(&table).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    toml::from_str(&text).map_err(|e| ConfigError::Invalid(e.to_string()))
}

/// Environment variables that more than one binary reads, each with the same meaning in
/// every one that reads it (this node's own address, data directory, certificates, the
/// cluster's shared settings). Every other variable carries its binary's prefix
/// (`SHOAL_AGENT_`, `SHOAL_ORIGIN_`, `SHOAL_TRACKER_`) or belongs to one binary alone; the
/// binaries' CLI tests hold them to this.
pub const SHARED_ENV: &[&str] = &[
    "SHOAL_ADVERTISE_PEER",
    "SHOAL_CACHE_SIZE",
    "SHOAL_CONFIG",
    "SHOAL_DATA",
    "SHOAL_DRAIN_TIMEOUT",
    "SHOAL_HTTP",
    "SHOAL_LOG_FORMAT",
    "SHOAL_METRICS",
    "SHOAL_ORIGIN",
    "SHOAL_PEER",
    "SHOAL_REPLICAS",
    "SHOAL_RING_KEY",
    "SHOAL_SEND_TIMEOUT",
    "SHOAL_TLS",
    "SHOAL_TRACKER",
    "SHOAL_UPLOAD_BUDGET",
    "SHOAL_UPLOAD_QUEUE",
    "SHOAL_UPLOAD_TOKEN",
];

/// Variables only the agent reads.
pub const AGENT_ENV: &[&str] = &[
    "SHOAL_CACHE_TTL",
    "SHOAL_EGRESS_LIMIT",
    "SHOAL_INGRESS_LIMIT",
    "SHOAL_PARTIAL_MAX_AGE",
    "SHOAL_PROGRESS_TIMEOUT",
    "SHOAL_REGISTRY",
    "SHOAL_SEED_TIME",
];

/// Variables only the origin reads.
pub const ORIGIN_ENV: &[&str] = &[
    "SHOAL_ALLOW_ANONYMOUS_WRITES",
    "SHOAL_CLUSTER",
    "SHOAL_HANDOFF_GRACE",
    "SHOAL_HTTP_WORKERS",
    "SHOAL_INTERNAL",
    "SHOAL_MAX_UPLOAD_BYTES",
    "SHOAL_PIECE_LENGTH",
    "SHOAL_PREFETCH_MAX_SIZE",
    "SHOAL_PREFETCH_MIN_SIZE",
    "SHOAL_PREFETCH_SYNC",
    "SHOAL_PULL_THROUGH_RETENTION",
    "SHOAL_SELF",
    "SHOAL_STORE",
    "SHOAL_TAG_TTL",
    "SHOAL_UPSTREAM",
    "SHOAL_UPSTREAM_ATTEMPTS",
    "SHOAL_UPSTREAM_AUTH",
    "SHOAL_UPSTREAM_CA",
    "SHOAL_UPSTREAM_HELPER_PATH",
    "SHOAL_UPSTREAM_STALL",
];

/// Variables only the tracker reads.
pub const TRACKER_ENV: &[&str] =
    &["SHOAL_ANNOUNCE_INTERVAL", "SHOAL_ORIGIN_TOKEN", "SHOAL_TRUST_ANNOUNCED_ADDRESSES"];

/// The `SHOAL_*` variables a `--help` text names (`[env: NAME=...]`) that are neither in
/// [`SHARED_ENV`] nor among `own` (the variables only this binary reads) nor prefixed with
/// `prefix`: names that could mean one thing here and another in a sibling binary.
pub fn unowned_env(help: &str, prefix: &str, own: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .filter(|name| !SHARED_ENV.contains(name) && !own.contains(name) && !name.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A duration written the way people write them: `30s`, `15m`, `6h`, `7d`, `1h 30m`; a bare
/// number is seconds. `0` turns off what it bounds, where the flag says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span(pub std::time::Duration);

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(secs) = t.parse::<u64>() {
            return Ok(Span(std::time::Duration::from_secs(secs)));
        }
        humantime::parse_duration(t).map(Span).map_err(|e| {
            format!(
                "invalid duration {:?}: {e} (e.g. 30s, 15m, 6h, 7d)",
                t.chars().take(64).collect::<String>()
            )
        })
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_zero() {
            return f.write_str("0s");
        }
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A value written as an integer or as text (`30`, `"30s"`; `1024`, `"1KiB"`): TOML integers
/// stop at i64 and units need text. The integer is parsed as its decimal text.
pub fn int_or_text<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    let text = match <Raw as serde::Deserialize>::deserialize(d)? {
        Raw::Int(n) => n.to_string(),
        Raw::Text(s) => s,
    };
    text.parse().map_err(serde::de::Error::custom)
}

/// A duration in whole seconds, written as a [`Span`] (`30s`, `5m`) or bare seconds; for
/// settings kept as seconds. A fraction of a second is refused rather than rounded.
pub fn secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let span: Span = int_or_text(d)?;
    if span.0.subsec_nanos() != 0 {
        return Err(serde::de::Error::custom(format!("{span}: give whole seconds")));
    }
    Ok(span.0.as_secs())
}

/// A byte count written with units (`4MiB`, `512KB`) or bare bytes.
pub fn bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let size: crate::ratelimit::ByteRate = int_or_text(d)?;
    Ok(size.0)
}

/// [`bytes`], for a count that must fit in 32 bits (a piece length).
pub fn bytes_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = bytes(d)?;
    u32::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} bytes: at most 4GiB")))
}

/// Read from an integer (seconds) or a string with units.
impl<'de> serde::Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_text(d)
    }
}

/// How much disk something may take: a size (`50GiB`, `500MB`, `1073741824`) or a share of
/// the filesystem it lives on (`80%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskShare {
    Bytes(u64),
    /// Per cent of the filesystem's size, 1 to 100.
    Percent(u8),
}

impl DiskShare {
    /// The bytes this share allows on a filesystem of `filesystem` bytes.
    pub fn bytes_of(self, filesystem: u64) -> u64 {
        match self {
            DiskShare::Bytes(b) => b,
            DiskShare::Percent(p) => (u128::from(filesystem) * u128::from(p) / 100) as u64,
        }
    }
}

impl std::str::FromStr for DiskShare {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(DiskShare::Percent(p)),
                _ => Err(format!("invalid share {t:?}: a percentage from 1% to 100%")),
            };
        }
        match t.parse::<crate::ratelimit::ByteRate>() {
            Ok(b) if t.to_ascii_lowercase().contains("bit") => {
                Err(format!("invalid size {t:?}: give bytes, not bits ({b})"))
            }
            Ok(b) if b.0 > 0 => Ok(DiskShare::Bytes(b.0)),
            _ => Err(format!(
                "invalid size {:?}: e.g. 50GiB, 500MB or 80%",
                t.chars().take(64).collect::<String>()
            )),
        }
    }
}

impl std::fmt::Display for DiskShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskShare::Bytes(b) => write!(f, "{b}"),
            DiskShare::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for DiskShare {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from an integer (bytes) or a string with units or a percentage.
impl<'de> serde::Deserialize<'de> for DiskShare {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_text(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_environment_variable_has_one_meaning() {
        let lists = [SHARED_ENV, AGENT_ENV, ORIGIN_ENV, TRACKER_ENV];
        let mut all: Vec<&str> = lists.iter().flat_map(|l| l.iter().copied()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a variable is listed twice: shared and own, or own by two binaries");
        let help = "--x <X>  Thing [env: SHOAL_TLS=]\n--y [env: SHOAL_NEW=] [env: SHOAL_AGENT_Z=]";
        assert_eq!(unowned_env(help, "SHOAL_AGENT_", AGENT_ENV), vec!["SHOAL_NEW".to_owned()]);
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        http: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tracker: Vec<String>,
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[serde(default = "default_http")]
        http: String,
        #[serde(default)]
        tracker: Vec<String>,
        #[serde(default)]
        piece_length: Option<u32>,
    }

    fn default_http() -> String {
        "127.0.0.1:1".into()
    }

    #[test]
    fn flags_override_file_and_defaults_fill_in() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "http = \"0.0.0.0:9\"\ntracker = [\"http://t\"]\npiece_length = 65536\n")
            .expect("write");
        let c: Config = layered(&Flags::default(), Some(&file)).expect("load");
        assert_eq!(c.http, "0.0.0.0:9");
        assert_eq!(c.piece_length, Some(65536));
        let flags = Flags { http: Some("1.2.3.4:5".into()), tracker: vec![] };
        let c: Config = layered(&flags, Some(&file)).expect("load");
        assert_eq!(c.http, "1.2.3.4:5");
        assert_eq!(c.tracker, vec!["http://t".to_string()]);
        let c: Config = layered(&Flags::default(), None).expect("load");
        assert_eq!(c.http, "127.0.0.1:1");
    }

    #[test]
    fn spans_and_disk_shares_parse_as_people_write_them() {
        use std::time::Duration;
        assert_eq!("90".parse::<Span>(), Ok(Span(Duration::from_secs(90))));
        assert_eq!("6h".parse::<Span>(), Ok(Span(Duration::from_secs(6 * 3600))));
        assert_eq!("1h 30m".parse::<Span>(), Ok(Span(Duration::from_secs(5400))));
        assert!("soon".parse::<Span>().is_err());
        assert!("-5s".parse::<Span>().is_err());
        assert_eq!(Span(Duration::from_secs(7200)).to_string(), "2h");
        assert_eq!(Span::default().to_string(), "0s");

        assert_eq!("50GiB".parse::<DiskShare>(), Ok(DiskShare::Bytes(50 << 30)));
        assert_eq!("1048576".parse::<DiskShare>(), Ok(DiskShare::Bytes(1 << 20)));
        assert_eq!("80%".parse::<DiskShare>(), Ok(DiskShare::Percent(80)));
        for bad in ["0", "0%", "101%", "lots", "100Mbit", "-1GiB", ""] {
            assert!(bad.parse::<DiskShare>().is_err(), "{bad}");
        }
        assert_eq!(DiskShare::Percent(50).bytes_of(1000), 500);
        assert_eq!(DiskShare::Bytes(7).bytes_of(1000), 7);
    }

    #[test]
    fn bad_values_name_the_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "piece_length = \"big\"\n").expect("write");
        let err = layered::<Config>(&Flags::default(), Some(&file)).expect_err("bad");
        assert!(err.to_string().contains("piece_length"), "{err}");
        std::fs::write(&file, "bogus = 1\n").expect("write");
        let err = layered::<Config>(&Flags::default(), Some(&file)).expect_err("bad");
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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

//! Which upstream repository a piece of pulled-through content is private to.
//!
//! An origin that learned a repository is private (its upstream refused it anonymously and
//! served it with `--upstream-auth` credentials) names it on every metainfo and tag answer
//! for its content with [`PRIVATE_HEADER`]: `registry/repository`. Trackers pass the header
//! on; agents then serve that content only to clients whose credentials the upstream accepts
//! for the repository. The header crosses network boundaries, so it is parsed, bounded and
//! validated at every hop like any other hostile input.

use crate::hint::valid_ns;
use crate::oci::valid_name;

/// Names the private repository (`registry/repository`) some content was pulled for.
pub const PRIVATE_HEADER: &str = "X-Shoal-Private";

/// Longest `registry/repository` accepted (a registry host and port, `/`, a name).
pub const MAX_PRIVATE_REPO: usize = 260 + 1 + crate::oci::MAX_NAME;

/// A repository of an upstream registry, as `registry/repository`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PrivateRepo {
    /// `host[:port]`, lowercase, as containerd's `ns` names it.
    pub registry: String,
    /// The repository name on that registry.
    pub name: String,
}

/// Text that is not `registry/repository`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected registry/repository")]
pub struct BadPrivateRepo;

impl PrivateRepo {
    /// A validated repository of `registry` (lowercased).
    pub fn new(registry: &str, name: &str) -> Result<Self, BadPrivateRepo> {
        if !valid_ns(registry) || !valid_name(name) {
            return Err(BadPrivateRepo);
        }
        Ok(Self { registry: registry.to_ascii_lowercase(), name: name.to_owned() })
    }

    /// Parses `registry/repository` (the header's value, a marker file's content).
    pub fn parse(text: &str) -> Result<Self, BadPrivateRepo> {
        let text = text.trim();
        if text.len() > MAX_PRIVATE_REPO {
            return Err(BadPrivateRepo);
        }
        let (registry, name) = text.split_once('/').ok_or(BadPrivateRepo)?;
        Self::new(registry, name)
    }
}

impl std::fmt::Display for PrivateRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_breaks_the_grammar() {
        let r = PrivateRepo::parse("Localhost:5000/team/app").expect("valid");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.name, "team/app");
        assert_eq!(PrivateRepo::parse(&r.to_string()), Ok(r));
        for bad in ["", "registry", "/app", "reg/", "reg/../x", "reg/App", "a b/app", "reg:0/app"] {
            assert_eq!(PrivateRepo::parse(bad), Err(BadPrivateRepo), "{bad:?}");
        }
        assert!(PrivateRepo::parse(&format!("r/{}", "a".repeat(MAX_PRIVATE_REPO))).is_err());
    }
}

//! Where a blob the cluster does not hold yet can be pulled from: the repository it was
//! asked for and, for containerd mirror requests, the upstream registry (`?ns=`).
//!
//! Agents pass the hint to the tracker, the tracker to the origins, as query parameters;
//! every hop validates it again because every hop is a network boundary.

use serde::Deserialize;

use crate::oci::valid_name;

/// Longest `ns` accepted (a DNS name is at most 253 bytes, plus `:port`).
const MAX_NS: usize = 253 + 6;

/// A repository name and the registry it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub name: String,
    pub ns: Option<String>,
}

/// A hint that breaks the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HintError {
    #[error("invalid repository name")]
    Name,
    #[error("invalid ns: expected a registry host[:port]")]
    Ns,
    #[error("ns given without a repository name")]
    NsWithoutName,
}

impl Hint {
    /// A validated hint.
    pub fn new(name: &str, ns: Option<&str>) -> Result<Self, HintError> {
        if !valid_name(name) {
            return Err(HintError::Name);
        }
        if let Some(ns) = ns {
            if !valid_ns(ns) {
                return Err(HintError::Ns);
            }
        }
        Ok(Self { name: name.to_owned(), ns: ns.map(str::to_owned) })
    }

    /// `name=...[&ns=...]`: both grammars exclude every character that needs escaping.
    pub fn query(&self) -> String {
        match &self.ns {
            Some(ns) => format!("name={}&ns={ns}", self.name),
            None => format!("name={}", self.name),
        }
    }
}

/// `host[:port]`: DNS labels of letters, digits and `-`, or an IPv4 address; the port, if
/// any, a number from 1 to 65535.
pub fn valid_ns(ns: &str) -> bool {
    if ns.is_empty() || ns.len() > MAX_NS {
        return false;
    }
    let (host, port) = match ns.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (ns, None),
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    port_ok && host.len() <= 253 && host.split('.').all(label_ok)
}

/// The hint as query parameters (`?name=...&ns=...`), for handlers.
#[derive(Debug, Default, Deserialize)]
pub struct HintQuery {
    pub name: Option<String>,
    pub ns: Option<String>,
}

impl HintQuery {
    /// `None` without a name; an error for an invalid one, or an `ns` without a name.
    pub fn hint(&self) -> Result<Option<Hint>, HintError> {
        match (&self.name, &self.ns) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(HintError::NsWithoutName),
            (Some(name), ns) => Hint::new(name, ns.as_deref()).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_grammar() {
        for good in ["docker.io", "ghcr.io", "127.0.0.1:5000", "localhost", "a-b.example.com:443"] {
            assert!(valid_ns(good), "{good}");
        }
        for bad in
            ["", "a/b", "host:", "host:0", "host:99999", "-a.com", "a..b", "a b", "h:12a", "[::1]:5000"]
        {
            assert!(!valid_ns(bad), "{bad}");
        }
    }

    #[test]
    fn hints_validate_and_round_trip() {
        let h = Hint::new("library/alpine", Some("docker.io")).expect("hint");
        assert_eq!(h.query(), "name=library/alpine&ns=docker.io");
        assert_eq!(Hint::new("Bad", None), Err(HintError::Name));
        assert_eq!(Hint::new("a", Some("x/y")), Err(HintError::Ns));
        let q = HintQuery { name: None, ns: Some("docker.io".into()) };
        assert_eq!(q.hint(), Err(HintError::NsWithoutName));
        assert_eq!(HintQuery::default().hint(), Ok(None));
    }
}

//! A ring's membership as configured and as it is now: base URLs (`http://o1:5000`, with an
//! optional weight, `http://o1:5000#weight=3`) and `dns:NAME:PORT` sources (every address of
//! a name as `http://IP:PORT`, such as a Kubernetes headless Service's), resolved again every
//! [`RESOLVE_EVERY`]. Origins (`--cluster`) and trackers (`--origin`) read the same lists the
//! same way, so both rank a blob's owners alike.

use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use shoal_proto::ring::Member;

/// How often `dns:` sources are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// The largest weight a member may have.
pub const MAX_WEIGHT: u32 = 1000;

/// A member source that is neither a base URL nor `dns:NAME:PORT`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}: expected a base URL (http[s]://HOST:PORT, optionally #weight=N with N in 1..={MAX_WEIGHT}) or dns:NAME:PORT")]
pub struct BadSource(pub String);

/// One configured source of members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A member by its base URL (normalized: no trailing slash), and its weight.
    Url(Member),
    /// Every address of `name`, as `http://IP:port`, weight 1.
    Dns { name: String, port: u16 },
}

impl Source {
    /// Parses one `--cluster`/`--origin` value.
    pub fn parse(text: &str) -> Result<Self, BadSource> {
        let text = text.trim();
        let bad = || BadSource(text.to_owned());
        if let Some(rest) = text.strip_prefix("dns:") {
            let (name, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let port = port.parse().map_err(|_| bad())?;
            if name.is_empty() || name.contains('/') {
                return Err(bad());
            }
            return Ok(Self::Dns { name: name.to_owned(), port });
        }
        let (url, weight) = match text.split_once('#') {
            None => (text, 1),
            Some((url, fragment)) => {
                let w: u32 = fragment.strip_prefix("weight=").and_then(|w| w.parse().ok()).ok_or_else(bad)?;
                if !(1..=MAX_WEIGHT).contains(&w) {
                    return Err(bad());
                }
                (url, w)
            }
        };
        let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).ok_or_else(bad)?;
        if host.trim_end_matches('/').is_empty() {
            return Err(bad());
        }
        Ok(Self::Url(Member { id: normalize(url), weight }))
    }
}

/// A member's base URL in the one form every member compares: no trailing slash.
pub fn normalize(url: &str) -> String {
    url.trim().trim_end_matches('/').to_owned()
}

/// The members now: the named ones in the order given, the resolved `dns:` ones and (for an
/// origin) itself.
#[derive(Debug)]
pub struct Members {
    sources: Vec<Source>,
    /// Always a member (an origin is one of its ring even before its name resolves).
    me: Option<String>,
    current: RwLock<Vec<Member>>,
}

impl Members {
    /// The members `sources` name, with `me` among them; `dns:` sources count once resolved
    /// ([`resolve`](Self::resolve)).
    pub fn new(sources: &[String], me: Option<&str>) -> Result<Self, BadSource> {
        let sources = sources.iter().map(|s| Source::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let me = me.map(normalize);
        let current = RwLock::new(Self::collect(&sources, me.as_deref(), Vec::new()));
        Ok(Self { sources, me, current })
    }

    /// Named members in the order given, then resolved ones sorted, then `me`; each id once.
    fn collect(sources: &[Source], me: Option<&str>, mut resolved: Vec<Member>) -> Vec<Member> {
        resolved.sort_by(|a, b| a.id.cmp(&b.id));
        let named = sources.iter().filter_map(|s| match s {
            Source::Url(m) => Some(m.clone()),
            Source::Dns { .. } => None,
        });
        let mut members: Vec<Member> = Vec::new();
        for m in named.chain(resolved).chain(me.map(Member::new)) {
            if !members.iter().any(|k| k.id == m.id) {
                members.push(m);
            }
        }
        members
    }

    /// Whether every source names its member (no `dns:` source).
    pub fn all_named(&self) -> bool {
        self.sources.iter().all(|s| matches!(s, Source::Url(_)))
    }

    /// Whether some `dns:` source needs resolving.
    pub fn has_dns(&self) -> bool {
        !self.all_named()
    }

    /// Whether `id` is one of the named members.
    pub fn names(&self, id: &str) -> bool {
        self.sources.iter().any(|s| matches!(s, Source::Url(m) if m.id == id))
    }

    /// The members now.
    pub fn snapshot(&self) -> Vec<Member> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Resolves the `dns:` sources again; a name that does not resolve keeps the last
    /// membership whole (a DNS outage must not shrink the ring). Returns whether the
    /// membership changed.
    pub async fn resolve(&self) -> bool {
        if !self.has_dns() {
            return false;
        }
        let mut resolved = Vec::new();
        for source in &self.sources {
            if let Source::Dns { name, port } = source {
                match tokio::net::lookup_host((name.as_str(), *port)).await {
                    Ok(addrs) => resolved.extend(addrs.map(|a| Member::new(format!("http://{a}")))),
                    Err(e) => {
                        tracing::warn!(%name, cause = %e, "cannot resolve members; keeping the last ones");
                        return false;
                    }
                }
            }
        }
        let members = Self::collect(&self.sources, self.me.as_deref(), resolved);
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if *current == members {
            return false;
        }
        tracing::info!(members = members.len(), "membership changed");
        *current = members;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_weights_and_bad_ones_are_refused() {
        assert_eq!(
            Source::parse("http://o1:5000/"),
            Ok(Source::Url(Member { id: "http://o1:5000".into(), weight: 1 }))
        );
        assert_eq!(
            Source::parse("https://o2:5000#weight=3"),
            Ok(Source::Url(Member { id: "https://o2:5000".into(), weight: 3 }))
        );
        assert_eq!(
            Source::parse("dns:shoal-origin.ns.svc:5000"),
            Ok(Source::Dns { name: "shoal-origin.ns.svc".into(), port: 5000 })
        );
        for bad in [
            "dns::5000",
            "dns:name",
            "o1:5000",
            "http://",
            "http://o#weight=0",
            "http://o#w=2",
            "http://o#weight=1001",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn dns_members_are_every_address_of_the_name_and_me_is_always_one() {
        let m =
            Members::new(&["dns:localhost:5000".into(), "http://b:1".into()], Some("http://10.9.9.9:5000"))
                .expect("members");
        let ids = |m: &Members| m.snapshot().into_iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(ids(&m), vec!["http://b:1", "http://10.9.9.9:5000"], "named ones until resolved");
        assert!(m.resolve().await, "changed");
        assert!(ids(&m).contains(&"http://127.0.0.1:5000".to_owned()), "{:?}", ids(&m));
        assert!(ids(&m).contains(&"http://b:1".to_owned()));
        assert!(!m.resolve().await, "unchanged the second time");
    }
}

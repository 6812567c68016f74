//! What origins and agents both need to call a registry: where `--upstream REGISTRY=URL`
//! says a registry is served, and which token realms may be sent credentials. (The origin
//! pulls with the cluster's credentials, `shoal_origin::upstream`; the agent checks a
//! client's own, `shoal_agent::tenant`.)

/// An upstream registry: the name containerd's `ns` and image references use, and the base
/// URL it is reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host[:port]`, lowercase.
    pub registry: String,
    /// `scheme://host[:port]`, no trailing slash.
    pub base: String,
    /// `host[:port]` of the base URL.
    pub host: String,
}

impl UpstreamUrl {
    /// Parses `REGISTRY=URL` (the registry named REGISTRY is served at URL, a mirror or a
    /// registry on this machine) or a bare `URL`. `URL` is `https://host[:port]`, or
    /// `http://` for a loopback host only; a bare `host[:port]` means https.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (registry, url) = match spec.split_once('=') {
            Some((registry, url)) if !registry.contains("://") => (Some(registry), url),
            _ => (None, spec),
        };
        let url = url.trim_end_matches('/');
        let (scheme, host) = match url.split_once("://") {
            Some((s, h)) => (s, h),
            None => ("https", url),
        };
        if !crate::hint::valid_ns(host) {
            return Err(format!("upstream {url}: expected scheme://host[:port]"));
        }
        let registry = registry.unwrap_or(host);
        if !crate::hint::valid_ns(registry) {
            return Err(format!("upstream {registry}={url}: {registry:?} is not a registry name"));
        }
        match scheme {
            "https" => {}
            "http" if loopback(host) => {}
            "http" => return Err(format!("upstream {url}: plain HTTP is only allowed for localhost")),
            other => return Err(format!("upstream {url}: unsupported scheme {other}")),
        }
        Ok(Self {
            registry: registry.to_ascii_lowercase(),
            base: format!("{scheme}://{host}"),
            host: host.to_owned(),
        })
    }

    /// Whether the base URL is plain HTTP (a registry on this machine).
    pub fn plain_http(&self) -> bool {
        self.base.starts_with("http://")
    }
}

/// Hosts (`host[:port]`) that may be reached over plain HTTP: `localhost` and IPv4
/// loopback addresses. The `host[:port]` grammar has no IPv6 literals.
pub fn loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// Whether a bearer challenge's `realm` may be asked for a token (with the credentials):
/// https always; plain HTTP only on a loopback host, or when the upstream itself is plain
/// HTTP (which only a registry on localhost may be).
pub fn realm_allowed(realm: &str, upstream_plain_http: bool) -> bool {
    let Ok(url) = reqwest::Url::parse(realm) else { return false };
    match url.scheme() {
        "https" => true,
        "http" => {
            // The parser normalizes IP addresses (`127.1` is `127.0.0.1`, IPv6 in brackets).
            let host = url.host_str().unwrap_or("");
            let ip = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            upstream_plain_http
                || host.eq_ignore_ascii_case("localhost")
                || ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_realms_only_on_this_machine() {
        assert!(realm_allowed("https://auth.docker.io/token", false));
        assert!(!realm_allowed("http://auth.example.com/token", false), "credentials in cleartext");
        assert!(!realm_allowed("http://127.evil.example/token", false));
        assert!(!realm_allowed("http://127.0.0.1.evil.example/token", false));
        assert!(realm_allowed("http://127.0.0.1:5001/token", false));
        assert!(realm_allowed("http://localhost/token", false));
        assert!(realm_allowed("http://[::1]:5001/token", false));
        // A plain-HTTP (localhost) upstream is in cleartext already.
        assert!(realm_allowed("http://auth.example.com/token", true));
        assert!(!realm_allowed("ftp://auth.example.com/token", true));
        assert!(!realm_allowed("not a url", true));
    }

    #[test]
    fn upstream_urls() {
        let u = UpstreamUrl::parse("Docker.io=https://mirror.example:5000/").expect("valid");
        assert_eq!((u.registry.as_str(), u.base.as_str()), ("docker.io", "https://mirror.example:5000"));
        assert_eq!(UpstreamUrl::parse("ghcr.io").expect("bare").base, "https://ghcr.io");
        assert!(UpstreamUrl::parse("reg=http://127.0.0.1:5000").expect("loopback").plain_http());
        assert!(UpstreamUrl::parse("reg=http://registry.example").is_err(), "plain HTTP off this machine");
        assert!(UpstreamUrl::parse("reg=ftp://127.0.0.1").is_err());
        assert!(UpstreamUrl::parse("bad name=https://r.example").is_err());
        assert!(UpstreamUrl::parse("https://r.example/path").is_err());
    }
}

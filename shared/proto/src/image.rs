//! Image references as docker and containerd read them: `[registry/]name[:tag|@digest]`,
//! with Docker Hub's rules. The one parser for preload (agent) and prefetch (origin), so that
//! `docker.io/alpine:3` means `library/alpine` everywhere.

use crate::hint::{valid_ns, Hint};
use crate::oci::{valid_name, Reference};

/// The tag a reference without one means.
const LATEST: &str = "latest";

/// Docker Hub's registry name in image references.
const DOCKER_HUB: &str = "docker.io";
/// Its legacy name, which docker and containerd read as [`DOCKER_HUB`].
const LEGACY_DOCKER_HUB: &str = "index.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry host when the reference names one (`ns` of a mirror request).
    pub registry: Option<String>,
    pub name: String,
    pub reference: Reference,
    /// False when the reference was left out (and is `latest`).
    pub tagged: bool,
}

/// A string that is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {0:?}")]
pub struct ImageRefError(pub String);

/// True when `image` names no tag or digest after its last path component.
fn reference_is_default(image: &str) -> bool {
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    !image[slash..].contains(':')
}

impl ImageRef {
    /// Parses `[registry/]name(:tag|@digest)`. The first path component is a registry when
    /// it looks like a host (has a dot or a port, or is `localhost`), as docker does; and as
    /// docker and containerd do, `index.docker.io` is `docker.io`, whose one-component names
    /// are its official images (`docker.io/nginx` is `docker.io/library/nginx`).
    ///
    /// A reference without a registry is left as written: it goes to the cluster's default
    /// upstream (the origins' first), which need not be Docker Hub.
    pub fn parse(image: &str) -> Result<Self, ImageRefError> {
        let bad = || ImageRefError(image.to_owned());
        if image.len() > 512 {
            return Err(bad());
        }
        let (path, reference) = if let Some((path, digest)) = image.split_once('@') {
            (path, Reference::Digest(digest.parse().map_err(|_| bad())?))
        } else {
            // The tag is after the last colon that follows the last slash (a registry port
            // is not a tag).
            let slash = image.rfind('/').map_or(0, |i| i + 1);
            match image[slash..].rfind(':') {
                Some(i) => (&image[..slash + i], image[slash + i + 1..].parse().map_err(|_| bad())?),
                None => (image, Reference::Tag(LATEST.to_owned())),
            }
        };
        let (registry, name) = match path.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                if !valid_ns(first) {
                    return Err(bad());
                }
                let registry = if first == LEGACY_DOCKER_HUB { DOCKER_HUB } else { first };
                (Some(registry.to_owned()), rest)
            }
            _ => (None, path),
        };
        let name = if registry.as_deref() == Some(DOCKER_HUB) && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_owned()
        };
        if !valid_name(&name) {
            return Err(bad());
        }
        let tagged = image.contains('@') || !reference_is_default(image);
        Ok(Self { registry, name, reference, tagged })
    }

    /// Where the cluster should pull the image from if it does not hold it.
    pub fn hint(&self) -> Hint {
        Hint { name: self.name.clone(), ns: self.registry.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(t: &str) -> Reference {
        Reference::Tag(t.to_owned())
    }

    #[test]
    fn parses_image_references() {
        let r = ImageRef::parse("docker.io/library/nginx:1.25").unwrap();
        assert_eq!(
            (r.registry.as_deref(), r.name.as_str(), r.reference),
            (Some("docker.io"), "library/nginx", tag("1.25"))
        );
        let r = ImageRef::parse("127.0.0.1:5000/a/b/c").unwrap();
        assert_eq!(
            (r.registry.as_deref(), r.name.as_str(), r.reference),
            (Some("127.0.0.1:5000"), "a/b/c", tag("latest"))
        );
        let r = ImageRef::parse("team/app:v1").unwrap();
        assert_eq!((r.registry, r.name.as_str()), (None, "team/app"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost/app@{d}")).unwrap();
        assert_eq!(
            (r.registry.as_deref(), r.reference),
            (Some("localhost"), Reference::Digest(d.parse().unwrap()))
        );
        // Docker Hub's official images, as docker and containerd name them.
        for hub in ["docker.io/nginx", "docker.io/library/nginx", "index.docker.io/nginx:latest"] {
            let r = ImageRef::parse(hub).unwrap();
            assert_eq!(
                (r.registry.as_deref(), r.name.as_str(), &r.reference),
                (Some("docker.io"), "library/nginx", &tag("latest")),
                "{hub}"
            );
            assert_eq!(r.hint(), Hint { name: "library/nginx".into(), ns: Some("docker.io".into()) });
        }
        let d = format!("sha256:{}", "b".repeat(64));
        let r = ImageRef::parse(&format!("docker.io/redis@{d}")).unwrap();
        assert_eq!((r.name.as_str(), r.reference), ("library/redis", Reference::Digest(d.parse().unwrap())));
        let r = ImageRef::parse("docker.io/bitnami/redis:7").unwrap();
        assert_eq!((r.registry.as_deref(), r.name.as_str()), (Some("docker.io"), "bitnami/redis"));
        // Only Docker Hub has `library/`; no registry means the cluster's default upstream.
        let r = ImageRef::parse("ghcr.io/app:v1").unwrap();
        assert_eq!((r.registry.as_deref(), r.name.as_str()), (Some("ghcr.io"), "app"));
        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(
            (r.registry, r.name.as_str(), r.reference, r.tagged),
            (None, "nginx", tag("latest"), false)
        );
        assert!(ImageRef::parse("nginx:latest").unwrap().tagged);
        assert!(ImageRef::parse("localhost:5000/nginx").is_ok_and(|r| !r.tagged), "a port is no tag");
        for bad in ["", "UPPER/app:v1", "app:", "app:bad tag", "app@sha256:zz", "a..b/x:1", "/app", "app/:v1"]
        {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
        assert!(ImageRef::parse(&"a".repeat(600)).is_err());
    }
}

//! Image references: `[host[:port]/]repo/name[:tag][@sha256:<hex>]`, with Docker's
//! defaults (`docker.io`, `library/` for one-component names on Docker Hub, tag `latest`).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The registry Docker Hub references name (`docker.io/...`).
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's API actually lives.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

const MAX_NAME_LEN: usize = 255;

/// A parsed image reference. Always has a registry and a repository; a tag, a digest,
/// both (the digest wins for fetching) or neither (meaning `latest`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parse a reference the way `docker pull` does.
    pub fn parse(input: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidReference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("empty reference"));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters"));
        }
        let (rest, digest) = match input.rsplit_once('@') {
            Some((r, d)) => {
                validate_digest(d).map_err(|e| match e {
                    Error::InvalidDigest { reason, .. } => bad(&format!("digest {d:?}: {reason}")),
                    other => other,
                })?;
                (r, Some(d.to_string()))
            }
            None => (input, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, after))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                validate_registry(first).map_err(|r| bad(&r))?;
                (first.to_string(), after)
            }
            _ => (DOCKER_HUB.to_string(), rest),
        };
        let (name, tag) = match path.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (path, None),
        };
        if let Some(t) = &tag {
            validate_tag(t).map_err(|r| bad(&r))?;
        }
        if name.is_empty() {
            return Err(bad("missing repository name"));
        }
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
                DOCKER_HUB.to_string()
            }
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_string()
        };
        validate_repository(&repository).map_err(|r| bad(&r))?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(bad(&format!("name longer than {MAX_NAME_LEN} characters")));
        }
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry as written (`docker.io` for Docker Hub), e.g. `localhost:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host[:port] the API is reached at (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path, e.g. `library/debian`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What goes after `/manifests/`: the digest if any, else the tag, else `latest`.
    pub fn tag_or_digest(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository with this digest (the tag is kept for display).
    pub fn with_digest(&self, digest: &str) -> Result<Self> {
        validate_digest(digest)?;
        Ok(Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        })
    }

    /// The same repository with this tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Self> {
        validate_tag(tag).map_err(|reason| Error::InvalidReference {
            input: format!("{}:{tag}", self.name()),
            reason,
        })?;
        Ok(Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

/// Check a digest is `sha256:` and 64 lowercase hex digits; returns the hex part.
/// Digests come from manifests (untrusted) and end up in URLs and file names.
pub fn validate_digest(digest: &str) -> Result<&str> {
    let bad = |reason: &str| Error::InvalidDigest {
        digest: digest.to_string(),
        reason: reason.to_string(),
    };
    let (algo, hex) = digest
        .split_once(':')
        .ok_or_else(|| bad("expected ALGORITHM:HEX"))?;
    if algo != "sha256" {
        return Err(bad("only sha256 digests are supported"));
    }
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad("expected 64 lowercase hex digits after sha256:"));
    }
    Ok(hex)
}

fn validate_registry(host: &str) -> std::result::Result<(), String> {
    let (name, port) = if let Some(inner) = host.strip_prefix('[') {
        // [IPv6]:port
        let (addr, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("registry {host:?}: unterminated '['"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("registry {host:?}: bad IPv6 address"));
        }
        match after {
            "" => return Ok(()),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(format!("registry {host:?}: junk after ']'")),
            },
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (Some(n), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(name) = name {
        let ok = !name.is_empty()
            && name.split('.').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !c.starts_with('-')
                    && !c.ends_with('-')
            });
        if !ok {
            return Err(format!("registry host {name:?} is not a valid host name"));
        }
    }
    if let Some(port) = port {
        if port.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
            return Err(format!("registry port {port:?} is not a port number"));
        }
    }
    Ok(())
}

fn validate_tag(tag: &str) -> std::result::Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = tag.as_bytes();
    if b.is_empty() {
        return Err("empty tag".into());
    }
    if b.len() > 128 {
        return Err(format!("tag {tag:?} is longer than 128 characters"));
    }
    if !word(b[0]) || !b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-') {
        return Err(format!(
            "tag {tag:?} must be letters, digits, '_', '.', '-' (not starting with '.' or '-')"
        ));
    }
    Ok(())
}

/// `component ('/' component)*`, component = `[a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*`.
fn validate_repository(repo: &str) -> std::result::Result<(), String> {
    if repo.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("repository name {repo:?} must be lowercase"));
    }
    for comp in repo.split('/') {
        if comp.is_empty() {
            return Err(format!(
                "repository name {repo:?} has an empty path component"
            ));
        }
        if !valid_component(comp) {
            return Err(format!(
                "repository path component {comp:?} must be lowercase letters and digits \
                 separated by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let mut need_alnum = true;
    while i < b.len() {
        if alnum(b[i]) {
            need_alnum = false;
            i += 1;
            continue;
        }
        if need_alnum {
            return false;
        }
        // A separator: '.', '_', '__' or one or more '-'.
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        need_alnum = true;
    }
    !need_alnum
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);

    #[test]
    fn table() {
        // input, registry, repository, tag, digest
        let cases: &[Case] = &[
            ("debian", "docker.io", "library/debian", None, None),
            ("debian:12", "docker.io", "library/debian", Some("12"), None),
            (
                "library/debian:12",
                "docker.io",
                "library/debian",
                Some("12"),
                None,
            ),
            (
                "docker.io/debian",
                "docker.io",
                "library/debian",
                None,
                None,
            ),
            (
                "index.docker.io/debian",
                "docker.io",
                "library/debian",
                None,
                None,
            ),
            (
                "user/app:v1.2-rc_3",
                "docker.io",
                "user/app",
                Some("v1.2-rc_3"),
                None,
            ),
            ("localhost/app", "localhost", "app", None, None),
            (
                "localhost:5000/a/b/c:t",
                "localhost:5000",
                "a/b/c",
                Some("t"),
                None,
            ),
            (
                "127.0.0.1:5000/x:tag",
                "127.0.0.1:5000",
                "x",
                Some("tag"),
                None,
            ),
            ("ghcr.io/o/r", "ghcr.io", "o/r", None, None),
            ("[::1]:5000/x", "[::1]:5000", "x", None, None),
            (
                "quay.io/a/b_c__d.e---f",
                "quay.io",
                "a/b_c__d.e---f",
                None,
                None,
            ),
            (
                "localhost:5000",
                "docker.io",
                "library/localhost",
                Some("5000"),
                None,
            ),
        ];
        for (input, reg, repo, tag, dig) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (r.registry(), r.repository(), r.tag(), r.digest()),
                (*reg, *repo, *tag, *dig),
                "{input}"
            );
        }
        let r = Reference::parse(&format!("reg.example:443/x/y:t@{D}")).unwrap();
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.tag(), Some("t"));
        assert_eq!(r.tag_or_digest(), D);
        assert_eq!(r.to_string(), format!("reg.example:443/x/y:t@{D}"));
        let r = Reference::parse(&format!("x@{D}")).unwrap();
        assert_eq!((r.repository(), r.tag()), ("library/x", None));
        assert_eq!(Reference::parse("x").unwrap().tag_or_digest(), "latest");
        assert_eq!(Reference::parse("x").unwrap().api_host(), DOCKER_HUB_API);
        assert_eq!(Reference::parse("a.b/x").unwrap().api_host(), "a.b");
    }

    #[test]
    fn errors_name_the_input() {
        let bad = [
            ("", "empty"),
            ("Debian", "lowercase"),
            ("a//b", "empty path component"),
            ("a/b:", "empty tag"),
            ("a/b:.x", "tag"),
            ("a/-b", "component"),
            ("a/b_", "component"),
            ("a/b...c", "component"),
            ("x@sha256:abc", "64"),
            ("x@md5:0123", "sha256"),
            ("x@", "ALGORITHM"),
            ("host:99999/x", "port"),
            ("host:0/x", "port"),
            ("-h.io/x", "host"),
            ("a b", "whitespace"),
            ("reg.io/", "missing repository"),
            ("reg.io/:t", "missing repository"),
        ];
        for (input, want) in bad {
            let e = Reference::parse(input).expect_err(input).to_string();
            assert!(e.contains(&format!("{input:?}")), "{input}: {e}");
            assert!(e.contains(want), "{input}: {e}");
        }
        let long = format!("r.io/{}", "a".repeat(300));
        assert!(Reference::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("longer"));
    }

    #[test]
    fn digest_validation() {
        assert_eq!(validate_digest(D).unwrap(), &D[7..]);
        for bad in ["sha256:../../etc/passwd", "sha256:ABC", "", "sha512:00"] {
            assert!(validate_digest(bad).is_err(), "{bad}");
        }
        assert!(validate_digest(&D.to_uppercase()).is_err());
    }
}

//! Credentials (explicit, docker/podman config files, credential helpers) and the parsing
//! of `WWW-Authenticate` challenges and token responses.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::reference::DOCKER_HUB;

/// A user name and password (or token) for Basic auth and token requests.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// The auth files searched when `ClientOptions::docker_config` is not set, in order.
pub fn default_auth_files() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let home = env("HOME");
    let mut v = Vec::new();
    if let Some(f) = env("REGISTRY_AUTH_FILE") {
        v.push(f);
    }
    if let Some(d) = env("DOCKER_CONFIG") {
        v.push(d.join("config.json"));
    }
    if let Some(h) = &home {
        v.push(h.join(".docker/config.json"));
    }
    if let Some(d) = env("XDG_RUNTIME_DIR") {
        v.push(d.join("containers/auth.json"));
    }
    if let Some(h) = &home {
        v.push(h.join(".config/containers/auth.json"));
    }
    v
}

#[derive(Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// `https://index.docker.io/v1/` → `docker.io`, `https://host:5000/` → `host:5000`,
/// `host/ns/repo` stays (podman allows repository-scoped entries).
fn normalize_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    let (host, path) = match k.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (k, None),
    };
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB,
        h => h,
    };
    match path {
        Some(p) => format!("{host}/{p}"),
        None => host.to_string(),
    }
}

/// How well `key` (normalized) matches `registry`/`repository`: the length of the matched
/// part, or `None`.
fn key_match(key: &str, registry: &str, repository: &str) -> Option<usize> {
    let key = normalize_key(key);
    if key == registry {
        return Some(key.len());
    }
    let path = key.strip_prefix(registry)?.strip_prefix('/')?;
    (repository == path || repository.starts_with(&format!("{path}/"))).then_some(key.len())
}

fn best<'a, V>(
    map: &'a BTreeMap<String, V>,
    registry: &str,
    repository: &str,
) -> Option<(&'a String, &'a V)> {
    map.iter()
        .filter_map(|(k, v)| key_match(k, registry, repository).map(|n| (n, k, v)))
        .max_by_key(|(n, _, _)| *n)
        .map(|(_, k, v)| (k, v))
}

/// Look `registry` (as in a reference, `docker.io` for Docker Hub) up in the auth files:
/// the first file with an entry for it wins.
pub(crate) fn lookup_credentials(
    files: &[PathBuf],
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>> {
    for file in files {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(Error::Credentials(format!("{}: {e}", file.display())));
            }
        };
        let parsed: AuthFile = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Credentials(format!("{}: not a valid auth file: {e}", file.display()))
        })?;
        if let Some(c) = from_file(&parsed, file, registry, repository)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

fn from_file(
    f: &AuthFile,
    file: &Path,
    registry: &str,
    repository: &str,
) -> Result<Option<Credentials>> {
    if let Some((_, helper)) = best(&f.cred_helpers, registry, repository) {
        return run_helper(helper, file, registry);
    }
    if let Some((key, entry)) = best(&f.auths, registry, repository) {
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| {
                    Error::Credentials(format!(
                        "{}: auths.{key:?}.auth is not base64: {e}",
                        file.display()
                    ))
                })?;
            let raw = String::from_utf8(raw).map_err(|_| {
                Error::Credentials(format!(
                    "{}: auths.{key:?}.auth is not UTF-8",
                    file.display()
                ))
            })?;
            let (u, p) = raw.split_once(':').ok_or_else(|| {
                Error::Credentials(format!(
                    "{}: auths.{key:?}.auth is not base64 of user:password",
                    file.display()
                ))
            })?;
            return Ok(Some(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }));
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
        if entry.identitytoken.is_some() {
            return Err(Error::Credentials(format!(
                "{}: auths.{key:?} holds an identity token (OAuth2 refresh token), which lode \
                 does not support; log in with a user name and password",
                file.display()
            )));
        }
    }
    if let Some(store) = f.creds_store.as_deref().filter(|s| !s.is_empty()) {
        return run_helper(store, file, registry);
    }
    Ok(None)
}

/// Ask `docker-credential-<helper> get` (the docker credential helper protocol).
fn run_helper(helper: &str, file: &Path, registry: &str) -> Result<Option<Credentials>> {
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Error::Credentials(format!(
            "{}: bad credential helper name {helper:?}",
            file.display()
        )));
    }
    let program = format!("docker-credential-{helper}");
    let server = if registry == DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::Credentials(format!(
                "{} names credential helper {program} for {registry}, which could not be run \
                 ({e}); install it, or give the credentials explicitly",
                file.display()
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = wait_with_timeout(child, Duration::from_secs(30)).map_err(|e| {
        Error::Credentials(format!("credential helper {program} for {registry}: {e}"))
    })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string()
            + String::from_utf8_lossy(&out.stderr).trim();
        if msg.contains("credentials not found") {
            return Ok(None);
        }
        return Err(Error::Credentials(format!(
            "credential helper {program} for {registry} failed ({}): {msg}",
            out.status
        )));
    }
    #[derive(Deserialize)]
    struct HelperOut {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let h: HelperOut = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::Credentials(format!(
            "credential helper {program} for {registry}: bad output: {e}"
        ))
    })?;
    if h.username == "<token>" {
        return Err(Error::Credentials(format!(
            "credential helper {program} for {registry} returned an identity token, which \
             lode does not support"
        )));
    }
    Ok(Some(Credentials {
        username: h.username,
        password: h.secret,
    }))
}

fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: Duration,
) -> std::io::Result<std::process::Output> {
    let start = std::time::Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// Lowercased scheme: `basic`, `bearer`, ...
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn param(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str)
    }
}

/// Parse a `WWW-Authenticate` value (RFC 7235: `scheme param=value, param="quoted, value"`,
/// several challenges separated by commas). Lenient, never panics.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let s: Vec<char> = header.chars().collect();
    let mut out: Vec<Challenge> = Vec::new();
    let mut i = 0;
    let is_tok = |c: char| !c.is_whitespace() && c != ',' && c != '=' && c != '"';
    while i < s.len() {
        while i < s.len() && (s[i].is_whitespace() || s[i] == ',') {
            i += 1;
        }
        let start = i;
        while i < s.len() && is_tok(s[i]) {
            i += 1;
        }
        if start == i {
            i += 1; // stray '=' or '"': skip it
            continue;
        }
        let token: String = s[start..i].iter().collect();
        let mut j = i;
        while j < s.len() && s[j].is_whitespace() {
            j += 1;
        }
        if j < s.len() && s[j] == '=' && !out.is_empty() {
            // key=value of the current challenge
            i = j + 1;
            while i < s.len() && s[i].is_whitespace() {
                i += 1;
            }
            let mut value = String::new();
            if i < s.len() && s[i] == '"' {
                i += 1;
                while i < s.len() && s[i] != '"' {
                    if s[i] == '\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    value.push(s[i]);
                    i += 1;
                }
                i += 1;
            } else {
                while i < s.len() && s[i] != ',' && !s[i].is_whitespace() {
                    value.push(s[i]);
                    i += 1;
                }
            }
            if let Some(c) = out.last_mut() {
                c.params.insert(token.to_ascii_lowercase(), value);
            }
        } else if j < s.len() && s[j] == '=' {
            // token68 or garbage before any scheme: skip
            i = j + 1;
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    out
}

/// The answer of a token endpoint.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<serde_json::Value>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let t = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        // Spec: default 60 s; at least 60 s is assumed.
        let secs = self
            .expires_in
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .unwrap_or(60)
            .clamp(60, 24 * 3600);
        Some((t, Duration::from_secs(secs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(
            c[0].param("scope"),
            Some("repository:samalba/my-app:pull,push")
        );
        let c = parse_challenges(
            r#"Basic realm="x \"y\"", Bearer realm=http://a/b , error=insufficient_scope"#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("x \"y\""));
        assert_eq!(c[1].param("realm"), Some("http://a/b"));
        assert_eq!(c[1].param("error"), Some("insufficient_scope"));
        for junk in [
            "",
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            ",,,",
            "a=b",
            "Basic ==x",
        ] {
            let _ = parse_challenges(junk);
        }
    }

    #[test]
    fn auth_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        std::fs::write(
            &f,
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},
                "reg.example:5000":{"username":"u","password":"p"},
                "reg.example:5000/team":{"auth":"dGVhbTp0cA=="},
                "bad.example":{"auth":"!!!"}
            }}"#,
        )
        .unwrap();
        let files = [dir.path().join("missing.json"), f.clone()];
        let get = |r: &str, repo: &str| lookup_credentials(&files, r, repo);
        let c = get("docker.io", "library/debian").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("hub", "secret")
        );
        let c = get("reg.example:5000", "x").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p"));
        let c = get("reg.example:5000", "team/app").unwrap().unwrap();
        assert_eq!(c.username, "team");
        assert_eq!(
            get("reg.example:5000", "teams/app")
                .unwrap()
                .unwrap()
                .username,
            "u"
        );
        assert!(get("other.example", "x").unwrap().is_none());
        let e = get("bad.example", "x").unwrap_err().to_string();
        assert!(e.contains("not base64") && e.contains("config.json"), "{e}");
        assert!(!format!("{c:?}").contains("tp"));

        std::fs::write(
            &f,
            r#"{"credHelpers":{"h.example":"lode-test-nonexistent"}}"#,
        )
        .unwrap();
        let e = lookup_credentials(std::slice::from_ref(&f), "h.example", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("docker-credential-lode-test-nonexistent"), "{e}");
        std::fs::write(&f, "not json").unwrap();
        let e = lookup_credentials(&[f], "h.example", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid auth file"), "{e}");
    }

    #[test]
    fn token_response() {
        let t: TokenResponse = serde_json::from_str(r#"{"token":"a","expires_in":300}"#).unwrap();
        assert_eq!(t.into_token(), Some(("a".into(), Duration::from_secs(300))));
        let t: TokenResponse =
            serde_json::from_str(r#"{"access_token":"b","expires_in":"x"}"#).unwrap();
        assert_eq!(t.into_token(), Some(("b".into(), Duration::from_secs(60))));
        let t: TokenResponse = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(t.into_token(), None);
    }
}

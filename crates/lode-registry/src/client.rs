//! The registry client: HTTP (reqwest, blocking, rustls), auth, retries and the
//! distribution-spec calls for manifests and blobs.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest as _, Sha256};

use crate::auth::{self, Credentials};
use crate::error::{Error, RegistryErrors, Result};
use crate::media;
use crate::progress::{no_progress, Counted, ProgressFn, Transfer};
use crate::reference::{validate_digest, Reference};

/// Largest manifest accepted (the spec asks registries to accept at least 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 8 << 20;
/// Largest error body read from a failed response.
const MAX_ERROR_BODY: u64 = 64 << 10;
/// How long a blob's storage URL (the target of the registry's redirect) is reused.
const REDIRECT_TTL: Duration = Duration::from_secs(5 * 60);
const MAX_REDIRECT_ENTRIES: usize = 4096;

/// How to reach registries. `Default`: HTTPS with verified certificates, credentials from
/// the usual docker/podman auth files, 4 retries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Talk `http://` instead of `https://` (local test registries).
    pub plain_http: bool,
    /// Accept any TLS certificate.
    pub insecure_tls: bool,
    /// User name and password for every registry; when `None`, the auth files are used.
    pub credentials: Option<(String, String)>,
    /// The docker/podman auth file to read; `None` searches [`auth::default_auth_files`]:
    /// `$REGISTRY_AUTH_FILE`, `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`,
    /// `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`.
    pub docker_config: Option<PathBuf>,
    /// Retries of a request after a connection error, a timeout, 429 or 5xx (exponential
    /// backoff from 250 ms, with jitter; `Retry-After` is honoured up to 30 s).
    pub retries: u32,
    pub user_agent: String,
    /// Per-operation timeout: connecting, waiting for a response, each read of a body.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            insecure_tls: false,
            credentials: None,
            docker_config: None,
            retries: 4,
            user_agent: format!("lode/{}", env!("CARGO_PKG_VERSION")),
            timeout: Duration::from_secs(60),
        }
    }
}

/// A manifest as fetched: its exact bytes, media type and digest (sha256 of the bytes,
/// checked against the reference's digest when it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

#[derive(Debug, Clone)]
enum AuthScheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Default)]
struct State {
    /// What each registry (api host) asked for in its last challenge.
    schemes: HashMap<String, AuthScheme>,
    /// (api host, scopes) → (token, expiry).
    tokens: HashMap<(String, String), (String, Instant)>,
    /// (registry, repository) → credentials found for it.
    creds: HashMap<(String, String), Option<Credentials>>,
    /// (api host, repository, digest) → storage URL the registry redirected the blob to.
    redirects: HashMap<(String, String, String), (Url, Instant)>,
}

/// An OCI distribution client. Blocking; `Send + Sync`, share it between threads (it keeps
/// one connection pool, the token cache and the blob redirect cache). Do not call it from
/// inside an async runtime.
pub struct RegistryClient {
    http: Client,
    opts: ClientOptions,
    state: Mutex<State>,
}

/// What a request needs: the registry and the token scopes for it.
struct Target<'a> {
    reference: &'a Reference,
    scopes: Vec<String>,
}

impl<'a> Target<'a> {
    fn pull(r: &'a Reference) -> Self {
        Target {
            reference: r,
            scopes: vec![format!("repository:{}:pull", r.repository())],
        }
    }
    fn push(r: &'a Reference) -> Self {
        Target {
            reference: r,
            scopes: vec![format!("repository:{}:pull,push", r.repository())],
        }
    }
    fn scope_key(&self) -> String {
        self.scopes.join(" ")
    }
    /// Cache keys of tokens that would do, best first: a `pull,push` token serves a pull.
    fn usable_keys(&self) -> Vec<String> {
        let mut keys = vec![self.scope_key()];
        if let [only] = &self.scopes[..] {
            if let Some(repo) = only
                .strip_prefix("repository:")
                .and_then(|s| s.strip_suffix(":pull"))
            {
                keys.push(format!("repository:{repo}:pull,push"));
            }
        }
        keys
    }
}

impl RegistryClient {
    pub fn new(opts: ClientOptions) -> Result<Self> {
        let http = Client::builder()
            .user_agent(opts.user_agent.clone())
            .danger_accept_invalid_certs(opts.insecure_tls)
            .connect_timeout(opts.timeout)
            .timeout(opts.timeout)
            .build()
            .map_err(|e| Error::Transport {
                method: "init".into(),
                url: String::new(),
                source: e,
            })?;
        Ok(RegistryClient {
            http,
            opts,
            state: Mutex::new(State::default()),
        })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves only caches behind: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn base(&self, r: &Reference) -> String {
        let scheme = if self.opts.plain_http {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/", r.api_host())
    }

    fn url(&self, r: &Reference, tail: &str) -> Result<Url> {
        let s = format!("{}{}/{tail}", self.base(r), r.repository());
        Url::parse(&s).map_err(|e| Error::InvalidReference {
            input: r.to_string(),
            reason: format!("gives a bad URL {s:?}: {e}"),
        })
    }

    fn same_origin(&self, r: &Reference, url: &Url) -> bool {
        Url::parse(&self.base(r))
            .map(|b| b.origin() == url.origin())
            .unwrap_or(false)
    }

    // ---------------------------------------------------------------- credentials, auth

    fn credentials(&self, r: &Reference) -> Result<Option<Credentials>> {
        if let Some((u, p)) = &self.opts.credentials {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
        let key = (r.registry().to_string(), r.repository().to_string());
        if let Some(c) = self.state().creds.get(&key) {
            return Ok(c.clone());
        }
        let files = self.auth_files();
        let c = auth::lookup_credentials(&files, r.registry(), r.repository())?;
        self.state().creds.insert(key, c.clone());
        Ok(c)
    }

    fn auth_files(&self) -> Vec<PathBuf> {
        match &self.opts.docker_config {
            Some(p) => vec![p.clone()],
            None => auth::default_auth_files(),
        }
    }

    fn no_credentials_hint(&self) -> String {
        if self.opts.credentials.is_some() {
            return String::new();
        }
        let files: Vec<String> = self
            .auth_files()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "no credentials given or found (searched {})",
            files.join(", ")
        )
    }

    /// The Authorization header to send for `t`, fetching a token if the registry is known
    /// to want one.
    fn auth_header(&self, t: &Target) -> Result<Option<String>> {
        let host = t.reference.api_host().to_string();
        let scheme = self.state().schemes.get(&host).cloned();
        match scheme {
            None => Ok(None),
            Some(AuthScheme::Basic) => Ok(self.credentials(t.reference)?.map(|c| c.basic_header())),
            Some(AuthScheme::Bearer { realm, service }) => {
                {
                    let st = self.state();
                    for key in t.usable_keys() {
                        if let Some((tok, exp)) = st.tokens.get(&(host.clone(), key)) {
                            if *exp > Instant::now() {
                                return Ok(Some(format!("Bearer {tok}")));
                            }
                        }
                    }
                }
                let tok = self.fetch_token(t, &realm, service.as_deref())?;
                Ok(Some(format!("Bearer {tok}")))
            }
        }
    }

    /// GET a token from `realm` (with Basic credentials if there are any) and cache it.
    fn fetch_token(&self, t: &Target, realm: &str, service: Option<&str>) -> Result<String> {
        let registry = t.reference.registry().to_string();
        let mut url = Url::parse(realm).map_err(|e| Error::Auth {
            registry: registry.clone(),
            reason: format!("bad token realm {realm:?} in WWW-Authenticate: {e}"),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Auth {
                registry,
                reason: format!("token realm {realm:?} is not an http(s) URL"),
            });
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in &t.scopes {
                q.append_pair("scope", s);
            }
        }
        let creds = self.credentials(t.reference)?;
        let who = match &creds {
            Some(c) => format!("as user {:?}", c.username),
            None => "anonymously".to_string(),
        };
        let resp = self.send_with_retries(&Method::GET, &url, true, &mut |rb| {
            Ok(match &creds {
                Some(c) => rb.header(AUTHORIZATION, c.basic_header()),
                None => rb,
            })
        })?;
        let status = resp.status();
        if !status.is_success() {
            let body = read_limited(resp, MAX_ERROR_BODY).unwrap_or_default();
            let mut reason = format!(
                "token server {} refused a token for {} {who}: HTTP {}{}",
                strip_query(&url),
                t.scope_key(),
                status.as_u16(),
                RegistryErrors::parse(&body)
            );
            if creds.is_none() && matches!(status.as_u16(), 401 | 403) {
                reason.push_str("; ");
                reason.push_str(&self.no_credentials_hint());
            }
            return Err(Error::Auth { registry, reason });
        }
        let body = read_limited(resp, 1 << 20)
            .map_err(|e| Error::io(format!("GET {}", strip_query(&url)), e))?;
        let parsed: auth::TokenResponse =
            serde_json::from_slice(&body).map_err(|e| Error::Protocol {
                url: strip_query(&url),
                reason: format!("token response is not JSON: {e}"),
            })?;
        let (tok, ttl) = parsed.into_token().ok_or_else(|| Error::Protocol {
            url: strip_query(&url),
            reason: "token response has neither token nor access_token".into(),
        })?;
        if tok.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(Error::Protocol {
                url: strip_query(&url),
                reason: "token contains spaces or control characters".into(),
            });
        }
        let margin = (ttl / 10).min(Duration::from_secs(30));
        self.state().tokens.insert(
            (t.reference.api_host().to_string(), t.scope_key()),
            (tok.clone(), Instant::now() + ttl - margin),
        );
        Ok(tok)
    }

    /// Learn from a 401. Returns whether a retry can succeed.
    fn on_unauthorized(&self, t: &Target, headers: &HeaderMap, sent_auth: bool) -> Result<bool> {
        let host = t.reference.api_host().to_string();
        let challenges: Vec<_> = headers
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(auth::parse_challenges)
            .collect();
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = c.param("realm").ok_or_else(|| Error::Protocol {
                url: self.base(t.reference),
                reason: "Bearer challenge without realm".into(),
            })?;
            let service = c.param("service").map(str::to_string);
            {
                let mut st = self.state();
                for key in t.usable_keys() {
                    st.tokens.remove(&(host.clone(), key));
                }
            }
            // Remember the scheme only once it worked: a bad challenge must not stick.
            self.fetch_token(t, realm, service.as_deref())?;
            self.state().schemes.insert(
                host,
                AuthScheme::Bearer {
                    realm: realm.to_string(),
                    service,
                },
            );
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            self.state().schemes.insert(host, AuthScheme::Basic);
            return Ok(!sent_auth && self.credentials(t.reference)?.is_some());
        }
        Ok(false)
    }

    fn auth_error(
        &self,
        t: &Target,
        method: &Method,
        url: &Url,
        resp: Response,
        sent_auth: bool,
    ) -> Error {
        let status = resp.status().as_u16();
        let body = read_limited(resp, MAX_ERROR_BODY).unwrap_or_default();
        let errs = RegistryErrors::parse(&body);
        let scheme = self.state().schemes.get(t.reference.api_host()).cloned();
        let creds = self.credentials(t.reference).ok().flatten();
        let reason = match (scheme, creds) {
            (Some(AuthScheme::Basic), Some(c)) if sent_auth => {
                format!(
                    "the registry rejected the credentials of user {:?}",
                    c.username
                )
            }
            (Some(AuthScheme::Bearer { .. }), _) => {
                format!(
                    "the registry did not accept the token for {}",
                    t.scope_key()
                )
            }
            (Some(AuthScheme::Basic), _) => {
                format!(
                    "the registry requires authentication; {}",
                    self.no_credentials_hint()
                )
            }
            (None, _) => "the registry requires authentication but sent no usable \
                          WWW-Authenticate challenge (Basic or Bearer)"
                .to_string(),
        };
        Error::Auth {
            registry: t.reference.registry().to_string(),
            reason: format!("{reason} ({method} {url}: HTTP {status}{errs})"),
        }
    }

    // ---------------------------------------------------------------- sending

    /// Send a request built by `build` (called again for each attempt), with retries on
    /// connection errors, timeouts, 429 and 5xx when `retry`, without auth handling.
    fn send_with_retries(
        &self,
        method: &Method,
        url: &Url,
        retry: bool,
        build: &mut dyn FnMut(RequestBuilder) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        let mut attempt = 0;
        loop {
            let rb = build(self.http.request(method.clone(), url.clone()))?;
            match rb.send() {
                Err(e) => {
                    if retry
                        && attempt < self.opts.retries
                        && (e.is_connect() || e.is_timeout() || e.is_request())
                    {
                        tracing::debug!(%url, error = %e, attempt, "retrying");
                        std::thread::sleep(backoff(attempt));
                        attempt += 1;
                        continue;
                    }
                    return Err(Error::Transport {
                        method: method.to_string(),
                        url: strip_query(url),
                        source: e,
                    });
                }
                Ok(resp) => {
                    let st = resp.status();
                    if retry
                        && attempt < self.opts.retries
                        && (st == StatusCode::TOO_MANY_REQUESTS || st.is_server_error())
                    {
                        let wait = retry_after(resp.headers()).unwrap_or_else(|| backoff(attempt));
                        tracing::debug!(%url, status = st.as_u16(), attempt, "retrying");
                        drop(resp);
                        std::thread::sleep(wait);
                        attempt += 1;
                        continue;
                    }
                    return Ok(resp);
                }
            }
        }
    }

    /// Send with registry auth: the Authorization header goes only to the registry's own
    /// origin; a 401 is answered once (fetch a token / add Basic credentials) and retried.
    fn execute(
        &self,
        t: &Target,
        method: Method,
        url: &Url,
        retry: bool,
        build: &mut dyn FnMut(RequestBuilder) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        let ours = self.same_origin(t.reference, url);
        let mut answered_401 = false;
        loop {
            let header = if ours { self.auth_header(t)? } else { None };
            let sent_auth = header.is_some();
            let resp = self.send_with_retries(&method, url, retry, &mut |rb| {
                let rb = match &header {
                    Some(h) => rb.header(AUTHORIZATION, h),
                    None => rb,
                };
                build(rb)
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED && ours {
                if !answered_401 && self.on_unauthorized(t, resp.headers(), sent_auth)? {
                    answered_401 = true;
                    continue;
                }
                return Err(self.auth_error(t, &method, url, resp, sent_auth));
            }
            return Ok(resp);
        }
    }

    // ---------------------------------------------------------------- manifests

    /// GET a manifest. `accept` lists the media types wanted (empty: OCI and Docker
    /// manifests and indexes). The digest is the sha256 of the bytes; if `reference` has a
    /// digest the bytes must match it.
    pub fn get_manifest(&self, reference: &Reference, accept: &[&str]) -> Result<FetchedManifest> {
        let t = Target::pull(reference);
        let url = self.url(
            reference,
            &format!("manifests/{}", reference.tag_or_digest()),
        )?;
        let accept = if accept.is_empty() {
            media::ALL_MANIFESTS.join(", ")
        } else {
            accept.join(", ")
        };
        let resp = self.execute(&t, Method::GET, &url, true, &mut |rb| {
            Ok(rb.header(ACCEPT, &accept))
        })?;
        let resp = check_status(&Method::GET, &url, resp, &[200])?;
        let content_type = header_str(resp.headers(), CONTENT_TYPE.as_str())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
        let header_digest = header_str(resp.headers(), "docker-content-digest").map(str::to_string);
        let bytes = read_limited(resp, MAX_MANIFEST_SIZE).map_err(|e| read_error(&url, e))?;
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(Error::Protocol {
                url: url.to_string(),
                reason: format!("manifest larger than {MAX_MANIFEST_SIZE} bytes"),
            });
        }
        let digest = sha256_digest(&bytes);
        if let Some(want) = reference.digest() {
            if want != digest {
                return Err(Error::DigestMismatch {
                    what: "manifest".into(),
                    url: url.to_string(),
                    expected: want.to_string(),
                    actual: digest,
                });
            }
        }
        if let Some(h) = header_digest.filter(|h| h.starts_with("sha256:")) {
            if h != digest {
                return Err(Error::DigestMismatch {
                    what: "manifest (Docker-Content-Digest)".into(),
                    url: url.to_string(),
                    expected: h,
                    actual: digest,
                });
            }
        }
        let media_type = match content_type {
            Some(ct) if ct.starts_with("application/vnd.") => ct,
            _ => media::sniff_manifest_type(&bytes).ok_or_else(|| Error::Protocol {
                url: url.to_string(),
                reason: "cannot tell the manifest's media type (no Content-Type, no mediaType)"
                    .into(),
            })?,
        };
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// PUT a manifest under the reference's tag (or digest, when there is no tag); returns
    /// its digest.
    pub fn put_manifest(
        &self,
        reference: &Reference,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String> {
        let digest = sha256_digest(bytes);
        let target = match reference.tag() {
            Some(tag) => tag.to_string(),
            None => reference.digest().unwrap_or("latest").to_string(),
        };
        let t = Target::push(reference);
        let url = self.url(reference, &format!("manifests/{target}"))?;
        let body = bytes.to_vec();
        let resp = self.execute(&t, Method::PUT, &url, true, &mut |rb| {
            Ok(rb.header(CONTENT_TYPE, media_type).body(body.clone()))
        })?;
        let resp = check_status(&Method::PUT, &url, resp, &[200, 201, 202])?;
        if let Some(h) =
            header_str(resp.headers(), "docker-content-digest").filter(|h| h.starts_with("sha256:"))
        {
            if h != digest {
                return Err(Error::DigestMismatch {
                    what: "stored manifest (Docker-Content-Digest)".into(),
                    url: url.to_string(),
                    expected: digest,
                    actual: h.to_string(),
                });
            }
        }
        Ok(digest)
    }

    // ---------------------------------------------------------------- blobs

    /// HEAD a blob: whether the repository has it.
    pub fn blob_exists(&self, repo: &Reference, digest: &str) -> Result<bool> {
        self.blob_exists_as(&Target::pull(repo), digest)
    }

    fn blob_exists_as(&self, t: &Target, digest: &str) -> Result<bool> {
        validate_digest(digest)?;
        let repo = t.reference;
        let url = self.url(repo, &format!("blobs/{digest}"))?;
        let resp = self.execute(t, Method::HEAD, &url, true, &mut |rb| Ok(rb))?;
        match resp.status().as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(status_error(&Method::HEAD, &url, resp)),
        }
    }

    /// GET a blob as a reader that checks its sha256 (and `size`, if given) at the end:
    /// the last `read` fails with `InvalidData` carrying an [`Error::DigestMismatch`] or
    /// [`Error::SizeMismatch`] (see [`Error::from_io`]).
    pub fn get_blob(
        &self,
        repo: &Reference,
        digest: &str,
        size: Option<u64>,
    ) -> Result<BlobReader> {
        let hex = validate_digest(digest)?.to_string();
        let (resp, url) = self.blob_request(repo, digest, None)?;
        let resp = check_status(&Method::GET, &url, resp, &[200])?;
        let len = resp.content_length();
        if let (Some(want), Some(got)) = (size, len) {
            if want != got {
                return Err(Error::SizeMismatch {
                    what: format!("blob {digest}"),
                    url: url.to_string(),
                    expected: want,
                    actual: got,
                });
            }
        }
        Ok(BlobReader {
            inner: resp,
            hasher: Sha256::new(),
            hex,
            digest: digest.to_string(),
            expected_size: size,
            content_length: len,
            read: 0,
            url: strip_query(&url),
            done: false,
        })
    }

    /// Read `len` bytes of a blob from `offset` with an HTTP Range request. Handles a 206
    /// and a server that ignores Range (200 with the whole blob: the slice is cut out). The
    /// result is shorter than `len` only if the blob ends first. Range reads cannot be
    /// verified against the blob digest; the caller verifies what it assembles.
    pub fn get_blob_range(
        &self,
        repo: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        validate_digest(digest)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset
            .checked_add(len - 1)
            .ok_or_else(|| Error::InvalidDigest {
                digest: digest.to_string(),
                reason: format!("range {offset}+{len} overflows"),
            })?;
        let (resp, url) = self.blob_request(repo, digest, Some((offset, end)))?;
        let status = resp.status().as_u16();
        let cap = usize::try_from(len.min(64 << 20)).unwrap_or(64 << 20);
        match status {
            206 => {
                let cr = header_str(resp.headers(), "content-range").map(str::to_string);
                if let Some(cr) = &cr {
                    let (start, _, _) = parse_content_range(cr).ok_or_else(|| Error::Protocol {
                        url: strip_query(&url),
                        reason: format!("bad Content-Range {cr:?}"),
                    })?;
                    if start != offset {
                        return Err(Error::Protocol {
                            url: strip_query(&url),
                            reason: format!(
                                "asked for bytes from {offset}, got Content-Range {cr:?}"
                            ),
                        });
                    }
                }
                let mut out = Vec::with_capacity(cap);
                resp.take(len)
                    .read_to_end(&mut out)
                    .map_err(|e| read_error(&url, e))?;
                if (out.len() as u64) < len {
                    // Short: fine only at the end of the blob.
                    let total = cr
                        .as_deref()
                        .and_then(parse_content_range)
                        .and_then(|(_, _, t)| t);
                    if total.is_some_and(|t| offset + (out.len() as u64) < t) {
                        return Err(Error::Protocol {
                            url: strip_query(&url),
                            reason: format!("short range body: {} of {len} bytes", out.len()),
                        });
                    }
                }
                Ok(out)
            }
            200 => {
                let mut body = resp;
                let skipped = io::copy(&mut (&mut body).take(offset), &mut io::sink())
                    .map_err(|e| read_error(&url, e))?;
                if skipped < offset {
                    return Ok(Vec::new());
                }
                let mut out = Vec::with_capacity(cap);
                body.take(len)
                    .read_to_end(&mut out)
                    .map_err(|e| read_error(&url, e))?;
                Ok(out)
            }
            _ => Err(status_error(&Method::GET, &url, resp)),
        }
    }

    /// GET a blob (optionally a byte range), from the cached storage URL when the registry
    /// redirected an earlier request for it, else from the registry (caching the redirect).
    fn blob_request(
        &self,
        repo: &Reference,
        digest: &str,
        range: Option<(u64, u64)>,
    ) -> Result<(Response, Url)> {
        let t = Target::pull(repo);
        let key = (
            repo.api_host().to_string(),
            repo.repository().to_string(),
            digest.to_string(),
        );
        let range_header = range.map(|(a, b)| format!("bytes={a}-{b}"));
        let mut build = |rb: RequestBuilder| -> Result<RequestBuilder> {
            Ok(match &range_header {
                Some(r) => rb.header(RANGE, r),
                None => rb,
            })
        };
        let cached = {
            let mut st = self.state();
            match st.redirects.get(&key) {
                Some((u, at)) if at.elapsed() < REDIRECT_TTL => Some(u.clone()),
                Some(_) => {
                    st.redirects.remove(&key);
                    None
                }
                None => None,
            }
        };
        if let Some(u) = cached {
            match self.execute(&t, Method::GET, &u, true, &mut build) {
                Ok(resp) if resp.status().is_success() => return Ok((resp, u)),
                Ok(resp) => {
                    tracing::debug!(url = %strip_query(&u), status = resp.status().as_u16(), "cached blob URL failed; asking the registry again");
                }
                Err(e) => {
                    tracing::debug!(url = %strip_query(&u), error = %e, "cached blob URL failed")
                }
            }
            self.state().redirects.remove(&key);
        }
        let url = self.url(repo, &format!("blobs/{digest}"))?;
        let resp = self.execute(&t, Method::GET, &url, true, &mut build)?;
        if resp.status().is_success() && resp.url() != &url {
            let final_url = resp.url().clone();
            let mut st = self.state();
            if st.redirects.len() >= MAX_REDIRECT_ENTRIES {
                st.redirects.clear();
            }
            st.redirects
                .insert(key, (final_url.clone(), Instant::now()));
            return Ok((resp, final_url));
        }
        Ok((resp, url))
    }

    /// Upload a blob from a file (monolithic: POST an upload session, PUT the bytes with
    /// the digest). Skipped when the registry already has it. Returns whether bytes were
    /// sent. The whole sequence is retried on connection errors, 429 and 5xx.
    pub fn push_blob_from_file(
        &self,
        repo: &Reference,
        path: &Path,
        digest: &str,
        size: u64,
    ) -> Result<bool> {
        self.push_blob_from_file_with(repo, path, digest, size, &no_progress())
    }

    /// [`push_blob_from_file`](Self::push_blob_from_file), telling `progress` when an upload
    /// (re)starts and how many bytes of the file have been sent.
    pub fn push_blob_from_file_with(
        &self,
        repo: &Reference,
        path: &Path,
        digest: &str,
        size: u64,
        progress: &ProgressFn,
    ) -> Result<bool> {
        validate_digest(digest)?;
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io(format!("{}", path.display()), e))?;
        if meta.len() != size {
            return Err(Error::SizeMismatch {
                what: format!("blob {digest} to upload"),
                url: path.display().to_string(),
                expected: size,
                actual: meta.len(),
            });
        }
        // HEAD with the push scope: one token for the whole push.
        let t = Target::push(repo);
        if self.blob_exists_as(&t, digest)? {
            return Ok(false);
        }
        let mut attempt = 0;
        loop {
            let location = self.start_upload(&t, None)?.1;
            let mut put_url = location;
            put_url.query_pairs_mut().append_pair("digest", digest);
            // Enough for 256 KiB/s, plus a margin; the client timeout would cut off uploads.
            let timeout = self.opts.timeout + Duration::from_secs(size / (256 << 10));
            let result = self.execute(&t, Method::PUT, &put_url, false, &mut |rb| {
                let f =
                    File::open(path).map_err(|e| Error::io(format!("{}", path.display()), e))?;
                progress(&Transfer::Start { digest, size });
                let f = Counted::new(f, digest, progress.clone());
                Ok(rb
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size)
                    .timeout(timeout)
                    .body(reqwest::blocking::Body::sized(f, size)))
            });
            let retriable = match &result {
                Err(Error::Transport { source, .. }) => {
                    source.is_connect() || source.is_timeout() || source.is_request()
                }
                Ok(r) => {
                    r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS
                }
                Err(_) => false,
            };
            if retriable && attempt < self.opts.retries {
                tracing::debug!(digest, attempt, "retrying blob upload");
                std::thread::sleep(backoff(attempt));
                attempt += 1;
                continue;
            }
            let resp = result?;
            check_status(&Method::PUT, &put_url, resp, &[201, 204])?;
            return Ok(true);
        }
    }

    /// POST `/blobs/uploads/` (optionally with `mount`/`from`); returns the status and the
    /// upload location (or the blob's location after a mount).
    fn start_upload(&self, t: &Target, mount: Option<(&str, &str)>) -> Result<(u16, Url)> {
        let mut url = self.url(t.reference, "blobs/uploads/")?;
        if let Some((digest, from)) = mount {
            url.query_pairs_mut()
                .append_pair("mount", digest)
                .append_pair("from", from);
        }
        let resp = self.execute(t, Method::POST, &url, true, &mut |rb| {
            Ok(rb.header(CONTENT_LENGTH, 0))
        })?;
        let resp = check_status(&Method::POST, &url, resp, &[201, 202])?;
        let status = resp.status().as_u16();
        let loc = header_str(resp.headers(), "location").ok_or_else(|| Error::Protocol {
            url: url.to_string(),
            reason: "upload response without Location header".into(),
        })?;
        let location = url.join(loc).map_err(|e| Error::Protocol {
            url: url.to_string(),
            reason: format!("bad upload Location {loc:?}: {e}"),
        })?;
        if !matches!(location.scheme(), "http" | "https") {
            return Err(Error::Protocol {
                url: url.to_string(),
                reason: format!("upload Location {loc:?} is not http(s)"),
            });
        }
        Ok((status, location))
    }

    /// Cross-repository mount: make blob `digest` of `from` (same registry) available in
    /// `repo` without uploading it. Returns false if the registry did not mount it (the
    /// caller then uploads).
    pub fn mount_blob(&self, repo: &Reference, from: &Reference, digest: &str) -> Result<bool> {
        validate_digest(digest)?;
        if from.api_host() != repo.api_host() {
            return Ok(false);
        }
        let t = Target {
            reference: repo,
            scopes: vec![
                format!("repository:{}:pull,push", repo.repository()),
                format!("repository:{}:pull", from.repository()),
            ],
        };
        let (status, location) = self.start_upload(&t, Some((digest, from.repository())))?;
        if status == 201 {
            return Ok(true);
        }
        // An upload session was opened instead: cancel it.
        if let Ok(r) = self.execute(&t, Method::DELETE, &location, false, &mut |rb| Ok(rb)) {
            drop(r);
        }
        Ok(false)
    }
}

/// A blob being downloaded; verifies size and sha256 when the body ends.
pub struct BlobReader {
    inner: Response,
    hasher: Sha256,
    hex: String,
    digest: String,
    expected_size: Option<u64>,
    content_length: Option<u64>,
    read: u64,
    url: String,
    done: bool,
}

impl BlobReader {
    /// The size announced by the server (Content-Length), if any.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    fn fail(&mut self, e: Error) -> io::Error {
        self.done = true;
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            let want = self.expected_size.or(self.content_length);
            if let Some(want) = want.filter(|w| *w != self.read) {
                let e = Error::SizeMismatch {
                    what: format!("blob {}", self.digest),
                    url: self.url.clone(),
                    expected: want,
                    actual: self.read,
                };
                return Err(self.fail(e));
            }
            let got = hex::encode(std::mem::take(&mut self.hasher).finalize());
            if got != self.hex {
                let e = Error::DigestMismatch {
                    what: "blob".into(),
                    url: self.url.clone(),
                    expected: self.digest.clone(),
                    actual: format!("sha256:{got}"),
                };
                return Err(self.fail(e));
            }
            self.done = true;
            return Ok(0);
        }
        self.read += n as u64;
        if let Some(want) = self.expected_size.filter(|w| self.read > *w) {
            let e = Error::SizeMismatch {
                what: format!("blob {}", self.digest),
                url: self.url.clone(),
                expected: want,
                actual: self.read,
            };
            return Err(self.fail(e));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl Error {
    /// Turn an `io::Error` from a [`BlobReader`] back into the crate error it carries
    /// (digest or size mismatch), or wrap it with `context`.
    pub fn from_io(e: io::Error, context: impl Into<String>) -> Error {
        if e.get_ref().is_some_and(|i| i.is::<Error>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(err) = inner.downcast::<Error>() {
                    return *err;
                }
            }
            return Error::io(context, io::Error::other("blob read failed"));
        }
        Error::io(context, e)
    }
}

// ---------------------------------------------------------------- helpers

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn header_str<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A URL for messages: without the query (upload state, signed storage URL parameters).
fn strip_query(u: &Url) -> String {
    let mut u = u.clone();
    u.set_query(None);
    u.to_string()
}

fn read_error(url: &Url, e: io::Error) -> Error {
    Error::from_io(e, format!("reading {}", strip_query(url)))
}

/// Read at most `limit` bytes of a body (one more tells the caller it was longer).
fn read_limited(resp: Response, limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    resp.take(limit + 1).read_to_end(&mut out)?;
    Ok(out)
}

fn status_error(method: &Method, url: &Url, resp: Response) -> Error {
    let status = resp.status().as_u16();
    let body = if *method == Method::HEAD {
        Vec::new()
    } else {
        read_limited(resp, MAX_ERROR_BODY).unwrap_or_default()
    };
    Error::Status {
        method: method.to_string(),
        url: strip_query(url),
        status,
        errors: RegistryErrors::parse(&body),
    }
}

fn check_status(method: &Method, url: &Url, resp: Response, ok: &[u16]) -> Result<Response> {
    if ok.contains(&resp.status().as_u16()) {
        Ok(resp)
    } else {
        Err(status_error(method, url, resp))
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let secs: u64 = header_str(h, "retry-after")?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(30)))
}

/// 250 ms · 2^attempt, at most 8 s, times a random factor in [0.5, 1.5).
fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.min(5)).min(8000);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let r = h.finish() % 1000; // 0..999
    Duration::from_millis(base / 2 + base * r / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes x-9/*"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        for a in 0..40 {
            let d = backoff(a);
            assert!(
                d >= Duration::from_millis(125) && d < Duration::from_secs(12),
                "{a}: {d:?}"
            );
        }
        assert!(backoff(0) < Duration::from_millis(400));
    }

    #[test]
    fn client_is_send_sync() {
        fn is<T: Send + Sync>() {}
        is::<RegistryClient>();
        is::<BlobReader>();
        is::<Error>();
    }
}

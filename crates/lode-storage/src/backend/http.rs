//! Blobs from any static web server: an image directory served as is (`python3 -m
//! http.server`, nginx, busybox httpd, an object store's website endpoint, a CDN).
//!
//! A blob is `{base_url}/blobs/{hex}`; reads are `Range: bytes=a-b` GETs answered by a 206
//! with a matching `Content-Range` (one that covers more is cut down: busybox httpd answers
//! `bytes=0-0` with the whole file). A server that ignores Range answers 200 with the whole
//! blob: the slice is cut out of it (and a warning is logged once — every read then
//! downloads the blob up to the end of the slice).
//!
//! Status mapping: 404/410/416 → NotFound; 401/403 and other 4xx → Permanent; 408, 429,
//! 5xx, connection errors, timeouts, short or long bodies, a wrong `Content-Range` →
//! Transient. No retries here: the fetcher retries.
//!
//! The helpers at the bottom (client building, status mapping, reading a range response)
//! are shared with the S3 backend.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::blocking::{Client, ClientBuilder, Response};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::Url;

use super::{digest_hex, Backend, BackendError, BackendErrorKind};

/// Largest body read for a failed response (for the error message).
const MAX_ERROR_BODY: u64 = 4 << 10;
/// After a 200 (Range ignored), up to this many bytes past the slice are read and thrown
/// away so the connection can be reused; with more left the connection is dropped instead.
const MAX_DRAIN: u64 = 64 << 10;

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Accept any TLS certificate (self-signed test servers).
    pub insecure_tls: bool,
    /// Connect timeout, and the limit for each wait for the server (response, each body read).
    pub timeout: Duration,
    /// Extra headers sent with every request (e.g. `Authorization: Bearer …`, a CDN key).
    pub headers: Vec<(String, String)>,
    /// Send every request through this HTTP proxy (`http://host:port`, also
    /// `http://user:pass@host:port`). `None`: the `HTTP(S)_PROXY`/`NO_PROXY` environment
    /// variables apply, as for any reqwest client.
    pub proxy: Option<String>,
    pub user_agent: String,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            insecure_tls: false,
            timeout: Duration::from_secs(30),
            headers: Vec::new(),
            proxy: None,
            user_agent: format!("lode/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// An image directory on a web server. `Send + Sync`; one connection pool per backend.
pub struct HttpBackend {
    /// Without a trailing slash.
    base: String,
    client: Client,
    /// `base` without credentials, for messages.
    shown: String,
    ranges_ignored: AtomicBool,
}

impl HttpBackend {
    /// `base_url` is the image directory's URL (`http(s)://host[:port]/path`); blobs are
    /// below `{base_url}/blobs/`.
    pub fn new(base_url: &str, opts: HttpOptions) -> Result<Self, BackendError> {
        let base = base_url.trim_end_matches('/').to_string();
        let url = Url::parse(&base).map_err(|e| {
            BackendError::new(
                BackendErrorKind::Permanent,
                format!("bad base URL {base_url:?}: {e}"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(BackendError::new(
                BackendErrorKind::Permanent,
                format!("bad base URL {base_url:?}: not an http(s) URL with a host"),
            ));
        }
        let client = ClientConfig {
            insecure_tls: opts.insecure_tls,
            timeout: opts.timeout,
            headers: &opts.headers,
            proxy: opts.proxy.as_deref(),
            user_agent: &opts.user_agent,
        }
        .build()?;
        Ok(HttpBackend {
            shown: display_url(&url).trim_end_matches('/').to_string(),
            base,
            client,
            ranges_ignored: AtomicBool::new(false),
        })
    }

    /// `{base_url}/blobs/{hex}`.
    pub fn blob_url(&self, digest: &str) -> Result<String, BackendError> {
        let hex = checked_hex(digest)?;
        Ok(format!("{}/blobs/{hex}", self.base))
    }

    /// Whether the server answered a range request with the whole blob (200) at least once.
    pub fn server_ignores_ranges(&self) -> bool {
        self.ranges_ignored.load(Ordering::Relaxed)
    }

    /// A whole (small) file of the image directory, e.g. `bootstrap` or `image.json`.
    /// `path` is relative to the base URL; `..` segments are refused.
    pub fn get_file(&self, path: &str) -> Result<Vec<u8>, BackendError> {
        let path = path.trim_start_matches('/');
        if path.is_empty() || path.split('/').any(|s| s == ".." || s == ".") {
            return Err(BackendError::new(
                BackendErrorKind::Permanent,
                format!("{}: bad file path {path:?}", self.shown),
            ));
        }
        let url = format!("{}/{path}", self.base);
        let ctx = format!("GET {}/{path}", self.shown);
        let resp = self
            .client
            .get(&url)
            .send()
            .map_err(|e| transport_error(&ctx, &e))?;
        read_whole_body(resp, &ctx)
    }
}

impl Backend for HttpBackend {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let url = self.blob_url(digest)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = range_end(offset, len).map_err(|m| {
            BackendError::new(BackendErrorKind::Permanent, format!("{}: {m}", self.shown))
        })?;
        let ctx = format!(
            "GET {}/blobs/{} bytes={offset}-{end}",
            self.shown,
            digest_hex(digest)
        );
        let resp = self
            .client
            .get(&url)
            .header(RANGE, format!("bytes={offset}-{end}"))
            .send()
            .map_err(|e| transport_error(&ctx, &e))?;
        read_range_response(resp, &ctx, offset, len, &self.ranges_ignored)
    }

    fn describe(&self) -> String {
        self.shown.clone()
    }
}

// ------------------------------------------------------------------ shared helpers

/// What both HTTP-based backends need from a reqwest client.
pub(crate) struct ClientConfig<'a> {
    pub insecure_tls: bool,
    pub timeout: Duration,
    pub headers: &'a [(String, String)],
    pub proxy: Option<&'a str>,
    pub user_agent: &'a str,
}

impl ClientConfig<'_> {
    pub(crate) fn build(&self) -> Result<Client, BackendError> {
        let permanent = |m: String| BackendError::new(BackendErrorKind::Permanent, m);
        let mut headers = HeaderMap::new();
        for (k, v) in self.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| permanent(format!("bad header name {k:?}: {e}")))?;
            let mut value = HeaderValue::from_str(v)
                .map_err(|e| permanent(format!("bad value for header {k}: {e}")))?;
            value.set_sensitive(true);
            headers.append(name, value);
        }
        let mut b: ClientBuilder = Client::builder()
            .user_agent(self.user_agent)
            .default_headers(headers)
            .danger_accept_invalid_certs(self.insecure_tls)
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .pool_max_idle_per_host(64);
        if let Some(p) = self.proxy {
            let proxy = reqwest::Proxy::all(p)
                .map_err(|e| permanent(format!("bad proxy URL {p:?}: {e}")))?;
            b = b.proxy(proxy);
        }
        b.build()
            .map_err(|e| permanent(format!("HTTP client: {}", error_chain(&e))))
    }
}

/// The hex of a `sha256:<hex>` digest, refused unless it is plain lowercase hex (it goes
/// into URLs and object keys).
pub(crate) fn checked_hex(digest: &str) -> Result<&str, BackendError> {
    let hex = digest_hex(digest);
    if hex.is_empty()
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(BackendError::new(
            BackendErrorKind::Permanent,
            format!("bad blob digest {digest:?}"),
        ));
    }
    Ok(hex)
}

/// The last byte of `len` bytes at `offset` (`len > 0`).
pub(crate) fn range_end(offset: u64, len: u64) -> Result<u64, String> {
    offset
        .checked_add(len - 1)
        .ok_or_else(|| format!("range {offset}+{len} overflows"))
}

/// A URL for messages: without user name and password.
pub(crate) fn display_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// The kind of an HTTP error status.
pub(crate) fn status_kind(status: u16) -> BackendErrorKind {
    match status {
        404 | 410 | 416 => BackendErrorKind::NotFound,
        408 | 429 | 500..=599 => BackendErrorKind::Transient,
        _ => BackendErrorKind::Permanent,
    }
}

/// `e` and its sources, `: `-separated (reqwest's own message names only the URL).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A failed send: connection, TLS, timeout, too many redirects.
pub(crate) fn transport_error(ctx: &str, e: &reqwest::Error) -> BackendError {
    let kind = if e.is_builder() || e.is_redirect() {
        BackendErrorKind::Permanent
    } else {
        BackendErrorKind::Transient
    };
    BackendError::new(kind, format!("{ctx}: {}", error_chain(e)))
}

fn body_error(ctx: &str, e: &io::Error) -> BackendError {
    BackendError::transient(format!("{ctx}: reading the body: {}", error_chain(e)))
}

/// The error for a response with an unexpected status; `detail` is what the body says
/// (filled by the caller for services with structured errors).
pub(crate) fn status_error(ctx: &str, status: u16, detail: &str) -> BackendError {
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    };
    BackendError::new(status_kind(status), format!("{ctx}: HTTP {status}{detail}"))
}

/// The first bytes of an error body, as text.
pub(crate) fn error_body(resp: Response) -> String {
    let mut body = Vec::new();
    let _ = resp.take(MAX_ERROR_BODY).read_to_end(&mut body);
    let s = String::from_utf8_lossy(&body);
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut short: String = s.chars().take(200).collect();
    if short.len() < s.len() {
        short.push('…');
    }
    short
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b, total))
}

/// Exactly `len` bytes of a successful body, else a Transient error.
fn read_exact_body(resp: Response, ctx: &str, len: u64) -> Result<Vec<u8>, BackendError> {
    let cap = usize::try_from(len.min(64 << 20)).unwrap_or(64 << 20);
    let mut out = Vec::with_capacity(cap);
    resp.take(len.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| body_error(ctx, &e))?;
    let got = out.len() as u64;
    if got < len {
        return Err(BackendError::transient(format!(
            "{ctx}: short body: {got} of {len} bytes"
        )));
    }
    if got > len {
        return Err(BackendError::transient(format!(
            "{ctx}: long body: more than the {len} bytes asked for"
        )));
    }
    Ok(out)
}

/// The next `len` bytes of a body that goes on past them (or ends right after).
fn read_prefix(body: &mut Response, ctx: &str, len: u64) -> Result<Vec<u8>, BackendError> {
    let cap = usize::try_from(len.min(64 << 20)).unwrap_or(64 << 20);
    let mut out = Vec::with_capacity(cap);
    body.take(len)
        .read_to_end(&mut out)
        .map_err(|e| body_error(ctx, &e))?;
    if (out.len() as u64) < len {
        return Err(BackendError::transient(format!(
            "{ctx}: short body: {} of {len} bytes",
            out.len()
        )));
    }
    Ok(out)
}

/// The answer to a `Range: bytes=offset-(offset+len-1)` GET: exactly `len` bytes or an
/// error. `ranges_ignored` is set (and a warning logged, once) when the server answers 200.
pub(crate) fn read_range_response(
    resp: Response,
    ctx: &str,
    offset: u64,
    len: u64,
    ranges_ignored: &AtomicBool,
) -> Result<Vec<u8>, BackendError> {
    let end = range_end(offset, len)
        .map_err(|m| BackendError::new(BackendErrorKind::Permanent, format!("{ctx}: {m}")))?;
    match resp.status().as_u16() {
        206 => {
            let cr = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let mut skip = None;
            match parse_content_range(&cr) {
                Some((a, b, _)) if a == offset && b == end => {}
                // More than asked for, but saying which bytes (busybox httpd answers
                // `bytes=0-0` with the whole file as 206): cut the range out.
                Some((a, b, _)) if a <= offset && b >= end => skip = Some(offset - a),
                Some((a, b, Some(total))) if a == offset && b < end && b + 1 == total => {
                    return Err(BackendError::new(
                        BackendErrorKind::NotFound,
                        format!("{ctx}: past the end of the blob ({total} bytes)"),
                    ));
                }
                None if cr.is_empty() => {
                    return Err(BackendError::transient(format!(
                        "{ctx}: 206 without Content-Range"
                    )));
                }
                _ => {
                    return Err(BackendError::transient(format!(
                        "{ctx}: asked for bytes {offset}-{end}, got Content-Range {cr:?}"
                    )));
                }
            }
            let Some(skip) = skip else {
                return read_exact_body(resp, ctx, len);
            };
            let mut body = resp;
            let skipped = io::copy(&mut (&mut body).take(skip), &mut io::sink())
                .map_err(|e| body_error(ctx, &e))?;
            if skipped < skip {
                return Err(BackendError::transient(format!(
                    "{ctx}: short body: Content-Range {cr:?} but the body ended before the range"
                )));
            }
            let out = read_prefix(&mut body, ctx, len)?;
            drop(body); // the rest, if any: the connection is not reused
            Ok(out)
        }
        200 => {
            if !ranges_ignored.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "{ctx}: the server ignores Range requests (200 with the whole blob); \
                     every read downloads the blob up to the end of the range"
                );
            }
            let total = resp.content_length();
            let want_end = offset.saturating_add(len);
            if let Some(t) = total {
                if want_end > t {
                    return Err(BackendError::new(
                        BackendErrorKind::NotFound,
                        format!("{ctx}: past the end of the blob ({t} bytes)"),
                    ));
                }
            }
            let mut body = resp;
            let skipped = io::copy(&mut (&mut body).take(offset), &mut io::sink())
                .map_err(|e| body_error(ctx, &e))?;
            if skipped < offset {
                return Err(BackendError::transient(format!(
                    "{ctx}: short body: the whole blob (200) ended at {skipped} bytes, before the range"
                )));
            }
            let out = read_prefix(&mut body, ctx, len)?;
            // Keep the connection if little is left; otherwise dropping the response closes it.
            if let Some(t) = total {
                if t - want_end <= MAX_DRAIN {
                    let _ = io::copy(&mut body.take(MAX_DRAIN), &mut io::sink());
                }
            }
            Ok(out)
        }
        status => {
            let detail = error_body(resp);
            Err(status_error(ctx, status, &detail))
        }
    }
}

/// A whole body of a 200, checked against Content-Length when the server sent one.
pub(crate) fn read_whole_body(resp: Response, ctx: &str) -> Result<Vec<u8>, BackendError> {
    let status = resp.status().as_u16();
    if status != 200 {
        let detail = error_body(resp);
        return Err(status_error(ctx, status, &detail));
    }
    match resp.content_length() {
        Some(n) => read_exact_body(resp, ctx, n),
        None => {
            let mut out = Vec::new();
            resp.take(u64::MAX)
                .read_to_end(&mut out)
                .map_err(|e| body_error(ctx, &e))?;
            Ok(out)
        }
    }
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
        assert_eq!(parse_content_range("bytes 9-5/100"), None);
        assert_eq!(parse_content_range("bytes x-9/*"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn statuses() {
        use BackendErrorKind::*;
        for (s, k) in [
            (404, NotFound),
            (410, NotFound),
            (416, NotFound),
            (401, Permanent),
            (403, Permanent),
            (400, Permanent),
            (408, Transient),
            (429, Transient),
            (500, Transient),
            (502, Transient),
            (503, Transient),
        ] {
            assert_eq!(status_kind(s), k, "{s}");
        }
    }

    #[test]
    fn urls_and_digests() {
        let b = HttpBackend::new(
            "http://user:secret@example.test:8080/img/",
            Default::default(),
        )
        .unwrap();
        assert_eq!(b.describe(), "http://example.test:8080/img");
        assert_eq!(
            b.blob_url("sha256:00ff").unwrap(),
            "http://user:secret@example.test:8080/img/blobs/00ff"
        );
        for bad in ["sha256:../x", "sha256:", "sha256:ABCD", "sha256:12/34"] {
            assert_eq!(
                b.blob_url(bad).unwrap_err().kind,
                BackendErrorKind::Permanent,
                "{bad}"
            );
        }
        assert!(b.get_file("../etc/passwd").is_err());
        assert!(HttpBackend::new("ftp://x/y", Default::default()).is_err());
        assert!(HttpBackend::new("not a url", Default::default()).is_err());
        let opts = HttpOptions {
            headers: vec![("bad header".into(), "x".into())],
            ..Default::default()
        };
        assert!(HttpBackend::new("http://x/", opts).is_err());
    }

    #[test]
    fn range_overflow_is_permanent() {
        let b = HttpBackend::new("http://127.0.0.1:9/img", Default::default()).unwrap();
        let e = b.read_range("sha256:00", u64::MAX, 2).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Permanent);
        assert!(b.read_range("sha256:00", 5, 0).unwrap().is_empty());
    }

    #[test]
    fn send_sync() {
        fn is<T: Send + Sync>() {}
        is::<HttpBackend>();
    }
}

//! Blobs in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, Garage, R2, …).
//!
//! The object of blob `sha256:<hex>` is `{prefix}{hex}` in `bucket`. Reads are ranged GETs
//! signed with AWS Signature V4 (header signing, payload hash in `x-amz-content-sha256`;
//! the `aws-sigv4` crate computes the signature), path-style
//! (`{endpoint}/{bucket}/{key}`) or virtual-hosted (`{scheme}://{bucket}.{host}/{key}`).
//! An empty access key sends unsigned requests (public buckets).
//!
//! Status mapping as for [`super::http`], refined by the S3 error code of the body:
//! `RequestTimeout` (400) is Transient; wrong keys (`SignatureDoesNotMatch`,
//! `InvalidAccessKeyId`, `AccessDenied`: 403) are Permanent; `NoSuchKey` (404) and
//! `InvalidRange` (416) are NotFound.
//!
//! [`S3Backend::put_object`] / [`S3Backend::put_object_file`] upload single objects (one PUT,
//! up to 5 GiB: no multipart), for tests and for pushing images.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use reqwest::header::RANGE;
use reqwest::{Method, Url};
use sha2::{Digest as _, Sha256};

use super::http::{self as h, ClientConfig};
use super::{Backend, BackendError, BackendErrorKind};

/// Largest single PUT S3 accepts.
const MAX_PUT: u64 = 5 << 30;

#[derive(Clone)]
pub struct S3Options {
    /// `http(s)://host[:port]` (a path is kept as a prefix of every request path).
    pub endpoint: String,
    /// The signing region (`us-east-1` for most S3-compatible servers).
    pub region: String,
    pub bucket: String,
    /// Prepended to the blob hex to make the object key (include a trailing `/` if wanted).
    pub prefix: String,
    /// Empty: anonymous (unsigned) requests.
    pub access_key: String,
    pub secret_key: String,
    /// For temporary (STS) credentials.
    pub session_token: Option<String>,
    /// `{endpoint}/{bucket}/{key}` instead of `{bucket}.{endpoint host}/{key}`. Most
    /// self-hosted servers want path style.
    pub path_style: bool,
    pub insecure_tls: bool,
    /// Connect timeout, and the limit for each wait for the server.
    pub timeout: Duration,
    /// Send requests through this HTTP proxy (`None`: environment variables apply).
    pub proxy: Option<String>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: String::new(),
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            access_key: String::new(),
            secret_key: String::new(),
            session_token: None,
            path_style: true,
            insecure_tls: false,
            timeout: Duration::from_secs(30),
            proxy: None,
        }
    }
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("insecure_tls", &self.insecure_tls)
            .field("timeout", &self.timeout)
            .field("proxy", &self.proxy)
            .finish()
    }
}

/// A bucket (and key prefix) of an S3-compatible store. `Send + Sync`, one connection pool.
pub struct S3Backend {
    opts: S3Options,
    /// Endpoint parsed, without a trailing slash in its path.
    endpoint: Url,
    client: Client,
    creds: Option<Credentials>,
    ranges_ignored: AtomicBool,
}

fn permanent(m: String) -> BackendError {
    BackendError::new(BackendErrorKind::Permanent, m)
}

impl S3Backend {
    pub fn new(opts: S3Options) -> Result<Self, BackendError> {
        let endpoint = Url::parse(opts.endpoint.trim_end_matches('/'))
            .map_err(|e| permanent(format!("bad S3 endpoint {:?}: {e}", opts.endpoint)))?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
            return Err(permanent(format!(
                "bad S3 endpoint {:?}: not an http(s) URL with a host",
                opts.endpoint
            )));
        }
        if endpoint.query().is_some() || !endpoint.username().is_empty() {
            return Err(permanent(format!(
                "bad S3 endpoint {:?}: no query or credentials in the URL (give the keys in the options)",
                opts.endpoint
            )));
        }
        if opts.bucket.is_empty()
            || opts.bucket.contains('/')
            || (!opts.path_style && opts.bucket.contains('.') && endpoint.scheme() == "https")
        {
            // Dotted buckets break TLS wildcard certificates in virtual-hosted style.
            return Err(permanent(format!(
                "bad S3 bucket {:?} (for path_style {})",
                opts.bucket, opts.path_style
            )));
        }
        if !opts.path_style {
            let mut u = endpoint.clone();
            let host = format!(
                "{}.{}",
                opts.bucket,
                endpoint.host_str().unwrap_or_default()
            );
            if endpoint.domain().is_none() || u.set_host(Some(&host)).is_err() {
                return Err(permanent(format!(
                    "S3 bucket {:?} at {:?}: virtual-hosted style needs a DNS name \
                     (bucket.host); use path_style",
                    opts.bucket, opts.endpoint
                )));
            }
        }
        if opts.region.is_empty() {
            return Err(permanent("S3 region is empty".into()));
        }
        let client = ClientConfig {
            insecure_tls: opts.insecure_tls,
            timeout: opts.timeout,
            headers: &[],
            proxy: opts.proxy.as_deref(),
            user_agent: &format!("lode/{}", env!("CARGO_PKG_VERSION")),
        }
        .build()?;
        let creds = (!opts.access_key.is_empty()).then(|| {
            Credentials::new(
                opts.access_key.clone(),
                opts.secret_key.clone(),
                opts.session_token.clone(),
                None,
                "lode-s3-options",
            )
        });
        Ok(S3Backend {
            opts,
            endpoint,
            client,
            creds,
            ranges_ignored: AtomicBool::new(false),
        })
    }

    /// `{prefix}{hex}`.
    pub fn object_key(&self, digest: &str) -> Result<String, BackendError> {
        let hex = h::checked_hex(digest)?;
        Ok(format!("{}{hex}", self.opts.prefix))
    }

    /// The URL of object `key` (`""`: the bucket itself).
    pub fn object_url(&self, key: &str) -> Url {
        let mut u = self.endpoint.clone();
        let base_path = u.path().trim_end_matches('/').to_string();
        let path = if self.opts.path_style {
            format!(
                "{base_path}/{}/{}",
                encode_key(&self.opts.bucket),
                encode_key(key)
            )
        } else {
            let host = format!("{}.{}", self.opts.bucket, u.host_str().unwrap_or_default());
            // Checked in new(): a bucket name makes a valid host label or this fails.
            let _ = u.set_host(Some(&host));
            format!("{base_path}/{}", encode_key(key))
        };
        // The path is already percent-encoded (S3 rules); `set_path` keeps `%XX` as is.
        u.set_path(&path);
        u
    }

    /// A request with SigV4 headers for `method url` carrying `headers` (signed too) and a
    /// body whose sha256 is `payload` (`None`: the empty body).
    fn signed(
        &self,
        method: Method,
        url: &Url,
        headers: &[(&str, String)],
        payload: Option<&str>,
    ) -> Result<RequestBuilder, BackendError> {
        let mut rb = self.client.request(method.clone(), url.clone());
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        let Some(creds) = &self.creds else {
            return Ok(rb);
        };
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let identity = creds.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.opts.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| permanent(format!("S3 signing parameters: {e}")))?
            .into();
        let body = match payload {
            Some(hash) => SignableBody::Precomputed(hash.to_string()),
            None => SignableBody::Bytes(&[]),
        };
        let signable = SignableRequest::new(
            method.as_str(),
            url.as_str(),
            headers.iter().map(|(k, v)| (*k, v.as_str())),
            body,
        )
        .map_err(|e| permanent(format!("S3 signing {url}: {}", h::error_chain(&e))))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| permanent(format!("S3 signing {url}: {}", h::error_chain(&e))))?
            .into_parts();
        for (k, v) in instructions.headers() {
            rb = rb.header(k, v);
        }
        Ok(rb)
    }

    fn send(&self, rb: RequestBuilder, ctx: &str) -> Result<Response, BackendError> {
        rb.send().map_err(|e| h::transport_error(ctx, &e))
    }

    fn ctx(&self, method: &str, key: &str) -> String {
        format!(
            "S3 {method} {}/{}/{key}",
            self.shown_endpoint(),
            self.opts.bucket
        )
    }

    fn shown_endpoint(&self) -> String {
        h::display_url(&self.endpoint)
            .trim_end_matches('/')
            .to_string()
    }

    /// `len` bytes at `offset` of object `key`.
    pub fn get_object_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, BackendError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = h::range_end(offset, len).map_err(permanent)?;
        let ctx = format!("{} bytes={offset}-{end}", self.ctx("GET", key));
        let url = self.object_url(key);
        let rb = self.signed(
            Method::GET,
            &url,
            &[(RANGE.as_str(), format!("bytes={offset}-{end}"))],
            None,
        )?;
        let resp = self.send(rb, &ctx)?;
        if !resp.status().is_success() {
            return Err(s3_status_error(resp, &ctx));
        }
        h::read_range_response(resp, &ctx, offset, len, &self.ranges_ignored)
    }

    /// A whole (small) object, e.g. `{prefix}bootstrap`.
    pub fn get_object(&self, key: &str) -> Result<Vec<u8>, BackendError> {
        let ctx = self.ctx("GET", key);
        let url = self.object_url(key);
        let rb = self.signed(Method::GET, &url, &[], None)?;
        let resp = self.send(rb, &ctx)?;
        if !resp.status().is_success() {
            return Err(s3_status_error(resp, &ctx));
        }
        h::read_whole_body(resp, &ctx)
    }

    /// Upload `data` as object `key` (one PUT).
    pub fn put_object(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        let ctx = self.ctx("PUT", key);
        let hash = hex::encode(Sha256::digest(data));
        let url = self.object_url(key);
        let rb = self
            .signed(Method::PUT, &url, &[], Some(&hash))?
            .body(data.to_vec());
        let resp = self.send(rb, &ctx)?;
        check_put(resp, &ctx)
    }

    /// Upload a file as object `key` (one PUT, streamed; the file is read twice: once for
    /// the payload hash that the signature covers).
    pub fn put_object_file(&self, key: &str, path: &Path) -> Result<(), BackendError> {
        let ctx = format!("{} from {}", self.ctx("PUT", key), path.display());
        let io_err = |e: std::io::Error| permanent(format!("{ctx}: {e}"));
        let mut f = File::open(path).map_err(io_err)?;
        let size = f.metadata().map_err(io_err)?.len();
        if size > MAX_PUT {
            return Err(permanent(format!(
                "{ctx}: {size} bytes is more than a single PUT takes (5 GiB)"
            )));
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let hash = hex::encode(hasher.finalize());
        let f = File::open(path).map_err(io_err)?;
        let url = self.object_url(key);
        let rb = self
            .signed(Method::PUT, &url, &[], Some(&hash))?
            .body(Body::sized(f, size));
        let resp = self.send(rb, &ctx)?;
        check_put(resp, &ctx)
    }

    /// Upload blob `digest` from a file (object key [`Self::object_key`]).
    pub fn put_blob_file(&self, digest: &str, path: &Path) -> Result<(), BackendError> {
        let key = self.object_key(digest)?;
        self.put_object_file(&key, path)
    }

    /// Create the bucket (in the options' region). An existing bucket of ours is fine.
    pub fn create_bucket(&self) -> Result<(), BackendError> {
        let ctx = format!(
            "S3 create bucket {}/{}",
            self.shown_endpoint(),
            self.opts.bucket
        );
        let body = if self.opts.region == "us-east-1" {
            Vec::new()
        } else {
            format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                self.opts.region
            )
            .into_bytes()
        };
        let hash = hex::encode(Sha256::digest(&body));
        let mut url = self.object_url("");
        if !self.opts.path_style {
            url.set_path(&format!("{}/", self.endpoint.path().trim_end_matches('/')));
        } else {
            let p = url.path().trim_end_matches('/').to_string();
            url.set_path(&p);
        }
        let rb = self.signed(Method::PUT, &url, &[], Some(&hash))?.body(body);
        let resp = self.send(rb, &ctx)?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status().as_u16();
        let (code, message) = s3_error(resp);
        if status == 409 && code == "BucketAlreadyOwnedByYou" {
            return Ok(());
        }
        Err(kind_error(status, &code, &message, &ctx))
    }
}

impl Backend for S3Backend {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let key = self.object_key(digest)?;
        self.get_object_range(&key, offset, len)
    }

    fn describe(&self) -> String {
        format!(
            "s3 {}/{}/{}",
            self.shown_endpoint(),
            self.opts.bucket,
            self.opts.prefix
        )
    }
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("opts", &self.opts)
            .finish()
    }
}

/// S3's URI encoding of a key: everything but `A-Za-z0-9-_.~` and `/` as `%XX`.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `<Code>` and `<Message>` of an S3 error body (empty if it has none, e.g. for HEAD).
fn s3_error(resp: Response) -> (String, String) {
    let body = h::error_body(resp);
    let tag = |t: &str| -> String {
        let open = format!("<{t}>");
        let close = format!("</{t}>");
        body.split_once(&open)
            .and_then(|(_, rest)| rest.split_once(&close))
            .map(|(v, _)| v.trim().to_string())
            .unwrap_or_default()
    };
    let (code, message) = (tag("Code"), tag("Message"));
    if code.is_empty() && message.is_empty() {
        (String::new(), body)
    } else {
        (code, message)
    }
}

fn kind_error(status: u16, code: &str, message: &str, ctx: &str) -> BackendError {
    let kind = match code {
        "RequestTimeout" | "SlowDown" | "InternalError" | "ServiceUnavailable" => {
            BackendErrorKind::Transient
        }
        "NoSuchKey" => BackendErrorKind::NotFound,
        _ => h::status_kind(status),
    };
    let detail = match (code.is_empty(), message.is_empty()) {
        (true, true) => String::new(),
        (true, false) => format!(": {message}"),
        (false, true) => format!(": {code}"),
        (false, false) => format!(": {code}: {message}"),
    };
    BackendError::new(kind, format!("{ctx}: HTTP {status}{detail}"))
}

fn s3_status_error(resp: Response, ctx: &str) -> BackendError {
    let status = resp.status().as_u16();
    let (code, message) = s3_error(resp);
    kind_error(status, &code, &message, ctx)
}

fn check_put(resp: Response, ctx: &str) -> Result<(), BackendError> {
    if resp.status().is_success() {
        // Read the (empty) body so the connection goes back to the pool.
        let _ = h::error_body(resp);
        Ok(())
    } else {
        Err(s3_status_error(resp, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(path_style: bool) -> S3Backend {
        S3Backend::new(S3Options {
            endpoint: "http://127.0.0.1:9000/".into(),
            bucket: "lode-blobs".into(),
            prefix: "images/x/".into(),
            access_key: "AK".into(),
            secret_key: "SK".into(),
            path_style,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn urls() {
        let b = backend(true);
        assert_eq!(b.object_key("sha256:abcd").unwrap(), "images/x/abcd");
        assert_eq!(
            b.object_url("images/x/abcd").as_str(),
            "http://127.0.0.1:9000/lode-blobs/images/x/abcd"
        );
        assert_eq!(
            b.object_url("a b+c%/é").as_str(),
            "http://127.0.0.1:9000/lode-blobs/a%20b%2Bc%25/%C3%A9"
        );
        let v = S3Backend::new(S3Options {
            endpoint: "https://s3.example.test".into(),
            bucket: "lode-blobs".into(),
            path_style: false,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            v.object_url("k").as_str(),
            "https://lode-blobs.s3.example.test/k"
        );
        assert_eq!(
            b.describe(),
            "s3 http://127.0.0.1:9000/lode-blobs/images/x/"
        );
        assert!(b.object_key("sha256:../../x").is_err());
    }

    #[test]
    fn bad_options() {
        let base = S3Options {
            endpoint: "http://127.0.0.1:9000".into(),
            bucket: "b".into(),
            ..Default::default()
        };
        assert!(S3Backend::new(base.clone()).is_ok());
        for o in [
            S3Options {
                endpoint: "ftp://x".into(),
                ..base.clone()
            },
            S3Options {
                endpoint: "http://ak:sk@x".into(),
                ..base.clone()
            },
            S3Options {
                bucket: String::new(),
                ..base.clone()
            },
            S3Options {
                region: String::new(),
                ..base.clone()
            },
        ] {
            assert_eq!(
                S3Backend::new(o).unwrap_err().kind,
                BackendErrorKind::Permanent
            );
        }
        let dbg = format!("{:?}", backend(true));
        assert!(!dbg.contains("\"SK\""), "{dbg}");
    }

    #[test]
    fn error_kinds() {
        use BackendErrorKind::*;
        assert_eq!(kind_error(400, "RequestTimeout", "", "x").kind, Transient);
        assert_eq!(
            kind_error(403, "SignatureDoesNotMatch", "", "x").kind,
            Permanent
        );
        assert_eq!(kind_error(404, "NoSuchKey", "", "x").kind, NotFound);
        assert_eq!(kind_error(503, "SlowDown", "", "x").kind, Transient);
        assert_eq!(kind_error(416, "InvalidRange", "", "x").kind, NotFound);
        assert_eq!(
            kind_error(403, "AccessDenied", "no", "GET k").message,
            "GET k: HTTP 403: AccessDenied: no"
        );
    }

    #[test]
    fn send_sync() {
        fn is<T: Send + Sync>() {}
        is::<S3Backend>();
    }
}

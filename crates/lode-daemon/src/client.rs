//! The client side of the API, for `lode mount/umount/ls/status`: one blocking HTTP/1.1
//! request per connection over the unix socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A daemon reachable on a socket.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// The daemon on `socket`, if one listens there (a missing or stale socket is `None`).
    pub fn connect(socket: &Path) -> Option<Client> {
        UnixStream::connect(socket).ok().map(|_| Client {
            socket: socket.to_path_buf(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; a non-2xx answer becomes an error carrying the daemon's message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let body = body.map(|b| b.to_string());
        let (status, text) = self.raw(method, path, body.as_deref(), timeout)?;
        let value: serde_json::Value = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| {
                format!("the daemon answered {method} {path} with something that is not JSON")
            })?
        };
        if !(200..300).contains(&status) {
            let msg = value["error"].as_str().unwrap_or(text.as_str());
            bail!("{msg}");
        }
        Ok(value)
    }

    /// Sends one request with `body` as it is; returns the status code and the body as text.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<(u16, String)> {
        let ctx = || format!("talking to the lode daemon on {}", self.socket.display());
        let mut s = UnixStream::connect(&self.socket).with_context(ctx)?;
        s.set_read_timeout(Some(timeout)).with_context(ctx)?;
        let body = body.unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: lode\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).with_context(ctx)?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).with_context(ctx)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad status line from the daemon: {line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            r.read_line(&mut line).with_context(ctx)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = v.parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                r.read_line(&mut line).with_context(ctx)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("bad chunk header from the daemon: {line:?}"))?;
                if n == 0 {
                    break;
                }
                let start = out.len();
                out.resize(start + n, 0);
                r.read_exact(&mut out[start..]).with_context(ctx)?;
                line.clear();
                r.read_line(&mut line).with_context(ctx)?;
            }
        } else if let Some(n) = length {
            out.resize(n, 0);
            r.read_exact(&mut out).with_context(ctx)?;
        } else {
            r.read_to_end(&mut out).with_context(ctx)?;
        }
        Ok((status, String::from_utf8_lossy(&out).into_owned()))
    }
}

/// `?mountpoint=…`, percent-encoded.
pub fn mountpoint_query(mnt: &Path) -> String {
    let mut q = String::from("mountpoint=");
    for &b in mnt.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    q
}

//! Helpers of the registry tests: hand-made lode image directories and a tiny HTTP server.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Write a lode image directory: `bootstrap`, `blobs/<hex>`, `image.json` with fields this
/// crate does not know (they must survive the round trip). Returns the image.json bytes.
pub fn make_image_dir(dir: &Path, bootstrap: &[u8], blobs: &[Vec<u8>]) -> Vec<u8> {
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::write(dir.join("bootstrap"), bootstrap).unwrap();
    let mut entries = Vec::new();
    for b in blobs {
        let d = sha256(b);
        std::fs::write(dir.join("blobs").join(&d[7..]), b).unwrap();
        entries.push(serde_json::json!({
            "digest": d, "size": b.len(), "uncompressed_size": b.len(),
            "compression": "none", "table_offset": 0, "chunk_count": 0
        }));
    }
    let json = serde_json::json!({
        "format_version": 1,
        "block_size": 4096,
        "chunk_size": 1048576,
        "bootstrap": {"digest": sha256(bootstrap), "size": bootstrap.len()},
        "blobs": entries,
        "a_future_field": {"nested": [1, 2, 3]}
    });
    let bytes = serde_json::to_vec_pretty(&json).unwrap();
    std::fs::write(dir.join("image.json"), &bytes).unwrap();
    bytes
}

/// A request as the tiny server saw it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// Path with query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    pub fn query(&self, key: &str) -> Vec<String> {
        let q = self.target.split_once('?').map(|x| x.1).unwrap_or("");
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| percent_decode(v))
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Resp {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// A one-thread HTTP/1.1 server on 127.0.0.1 (Connection: close). Returns its address and
/// the number of requests served so far.
pub fn serve<F>(handler: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(&Req) -> Resp + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(stream) = stream else { continue };
            if let Some(req) = read_request(&stream) {
                c.fetch_add(1, Ordering::SeqCst);
                let resp = handler(&req);
                let _ = write_response(stream, &req, resp);
            }
        }
    });
    (addr, count)
}

fn read_request(stream: &TcpStream) -> Option<Req> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Req {
        method,
        target,
        headers,
        body,
    })
}

fn write_response(mut s: TcpStream, req: &Req, resp: Resp) -> std::io::Result<()> {
    let reason = match resp.status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Whatever",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\nConnection: close\r\n", resp.status);
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", resp.body.len()));
    s.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        s.write_all(&resp.body)?;
    }
    s.flush()
}

//! A fault-injecting HTTP/1.1 proxy for tests of network code.
//!
//! [`FaultProxy::start`] listens on `127.0.0.1:0` and forwards every request to one upstream
//! `host:port`, one request per connection (it answers `Connection: close`, so clients open
//! a new connection per request). Faults are set at run time through a [`FaultHandle`]
//! (cloneable, shareable with other threads):
//!
//! - [`Fault::Status`]: answer this status (500, 503, 404, …) without asking the upstream;
//! - [`Fault::Reset`]: send the head and half the body, then reset the connection (RST);
//! - [`Fault::Truncate`]: send the head (full `Content-Length`) and only the first K body
//!   bytes, then close (FIN) — a dropped connection;
//! - [`Fault::ShortBody`]: a well-formed response whose `Content-Length` and body are cut to
//!   K bytes — a server or proxy that lies about the size;
//! - [`Fault::FlipBit`]: flip one bit of the body at a given or random offset;
//! - [`Fault::Refuse`]: reset the connection at once, before reading the request;
//! - a latency added before each request is forwarded ([`FaultHandle::set_latency`]).
//!
//! One-shot faults are queued ([`FaultHandle::inject`] — "the next N requests"); a
//! persistent fault ([`FaultHandle::set_persistent`]) applies to every request while the
//! queue is empty. Requests in absolute form (`GET http://host/path`, as clients send them
//! to a forward proxy) are forwarded in origin form, so the proxy also works as the HTTP
//! proxy of a client; the `Host` header is passed on as is (signatures stay valid).
//!
//! Dropping the proxy stops it: the listener is closed and every thread is joined.
//! Std-only apart from `rustix` for `SO_LINGER`.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a connection may wait on the client or the upstream.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_HEAD: usize = 64 << 10;

/// One way to break a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a short text body, without contacting the upstream.
    Status(u16),
    /// Send the response head and half the body, then reset the connection.
    Reset,
    /// Send the head (with the full Content-Length) and only this many body bytes, then
    /// close the connection.
    Truncate(u64),
    /// Cut the body to this many bytes and send a matching Content-Length.
    ShortBody(u64),
    /// Flip one bit of the body: at this byte offset (bit 0), or, with `None`, a random bit
    /// of a random byte. The flip is recorded in [`RequestRecord::flipped`].
    FlipBit(Option<u64>),
    /// Reset the connection as soon as it is accepted.
    Refuse,
}

/// What the proxy saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `PUT`, … (empty for a refused connection).
    pub method: String,
    /// The request target as sent (origin or absolute form).
    pub target: String,
    /// Headers as sent, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The fault applied, if any.
    pub fault: Option<Fault>,
    /// Upstream status (or the injected one); 0 if there was no response.
    pub status: u16,
    /// `(offset, mask)` of a flipped body byte.
    pub flipped: Option<(u64, u8)>,
}

impl RequestRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Rules {
    queue: VecDeque<(Fault, u64)>,
    persistent: Option<Fault>,
    latency: Duration,
    /// Bytes per second of the emulated link all responses share (0: unlimited).
    bandwidth: u64,
}

struct Shared {
    /// When the emulated link is free again (responses are serialized on it).
    link_free: Mutex<Option<std::time::Instant>>,
    upstream: Mutex<SocketAddr>,
    rules: Mutex<Rules>,
    records: Mutex<Vec<RequestRecord>>,
    stop: AtomicBool,
    connections: AtomicU64,
    forwarded: AtomicU64,
    faulted: AtomicU64,
}

impl Shared {
    fn next_fault(&self) -> (Option<Fault>, Duration) {
        let mut r = lock(&self.rules);
        let latency = r.latency;
        if let Some((f, n)) = r.queue.front_mut() {
            let f = f.clone();
            *n -= 1;
            if *n == 0 {
                r.queue.pop_front();
            }
            return (Some(f), latency);
        }
        (r.persistent.clone(), latency)
    }

    fn record(&self, rec: RequestRecord) {
        if rec.fault.is_some() {
            self.faulted.fetch_add(1, Ordering::SeqCst);
        }
        let mut v = lock(&self.records);
        if v.len() < 10_000 {
            v.push(rec);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Changes the faults of a running [`FaultProxy`] and reads its counters.
#[derive(Clone)]
pub struct FaultHandle(Arc<Shared>);

impl FaultHandle {
    /// Apply `fault` to the next `times` requests (after faults queued earlier).
    pub fn inject(&self, fault: Fault, times: u64) {
        if times > 0 {
            lock(&self.0.rules).queue.push_back((fault, times));
        }
    }

    pub fn fail_next(&self, times: u64, status: u16) {
        self.inject(Fault::Status(status), times);
    }

    pub fn reset_next(&self, times: u64) {
        self.inject(Fault::Reset, times);
    }

    pub fn truncate_next(&self, times: u64, after_bytes: u64) {
        self.inject(Fault::Truncate(after_bytes), times);
    }

    pub fn short_body_next(&self, times: u64, bytes: u64) {
        self.inject(Fault::ShortBody(bytes), times);
    }

    pub fn flip_bit_next(&self, times: u64, offset: Option<u64>) {
        self.inject(Fault::FlipBit(offset), times);
    }

    pub fn refuse_next(&self, times: u64) {
        self.inject(Fault::Refuse, times);
    }

    /// Apply `fault` to every request while no one-shot fault is queued (`None`: stop).
    pub fn set_persistent(&self, fault: Option<Fault>) {
        lock(&self.0.rules).persistent = fault;
    }

    /// Wait this long before forwarding each request.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.0.rules).latency = latency;
    }

    /// Cap the bytes per second of all responses together, like one shared link
    /// (0: unlimited).
    pub fn set_bandwidth(&self, bytes_per_second: u64) {
        lock(&self.0.rules).bandwidth = bytes_per_second;
    }

    /// No queued, persistent or latency faults any more.
    pub fn clear(&self) {
        *lock(&self.0.rules) = Rules::default();
    }

    /// One-shot faults still queued (sum of their remaining counts).
    pub fn pending(&self) -> u64 {
        lock(&self.0.rules).queue.iter().map(|(_, n)| n).sum()
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.0.upstream) = upstream;
    }

    /// Connections accepted (each carries at most one request).
    pub fn requests(&self) -> u64 {
        self.0.connections.load(Ordering::SeqCst)
    }

    /// Requests passed on to the upstream.
    pub fn forwarded(&self) -> u64 {
        self.0.forwarded.load(Ordering::SeqCst)
    }

    /// Requests a fault was applied to.
    pub fn faulted(&self) -> u64 {
        self.0.faulted.load(Ordering::SeqCst)
    }

    /// What was seen so far (recorded when each connection is done).
    pub fn records(&self) -> Vec<RequestRecord> {
        lock(&self.0.records).clone()
    }
}

/// The proxy; stops on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    handle: FaultHandle,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listen on `127.0.0.1:0`, forwarding to `upstream`. Panics if it cannot listen.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fault proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fault proxy: local addr");
        let shared = Arc::new(Shared {
            link_free: Mutex::new(None),
            upstream: Mutex::new(upstream),
            rules: Mutex::new(Rules::default()),
            records: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(listener, s))
            .expect("fault proxy: spawn");
        FaultProxy {
            addr,
            handle: FaultHandle(shared),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for FaultProxy {
    type Target = FaultHandle;
    fn deref(&self) -> &FaultHandle {
        &self.handle
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.handle.0.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = conn else { continue };
        workers.retain(|w| !w.is_finished());
        let s = shared.clone();
        match std::thread::Builder::new()
            .name("fault-proxy-conn".into())
            .spawn(move || handle_conn(stream, &s))
        {
            Ok(w) => workers.push(w),
            Err(_) => continue,
        }
    }
    drop(listener);
    for w in workers {
        let _ = w.join();
    }
}

/// Close with RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO));
    drop(stream);
}

/// Sleep up to `d`, returning early when the proxy stops.
fn sleep_unless_stopped(d: Duration, shared: &Shared) {
    let end = Instant::now() + d;
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(10)));
    }
}

struct Head {
    start_line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }
    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
    fn content_length(&self) -> Option<u64> {
        self.get("content-length").and_then(|v| v.parse().ok())
    }
}

fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in head"));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // stray CRLF before a request
            }
            break;
        }
        lines.push(line);
    }
    let start_line = lines.remove(0);
    let headers = lines
        .into_iter()
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Ok(Head {
        start_line,
        headers,
    })
}

/// A body framed by `head`: chunked (decoded), Content-Length, or (`to_eof`) until close.
fn read_body(r: &mut impl BufRead, head: &Head, to_eof: bool) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.chunked() {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in chunk"));
            }
            let size = line.trim().split(';').next().unwrap_or("");
            let size = u64::from_str_radix(size.trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t)? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                return Ok(body);
            }
            let before = body.len();
            r.take(size).read_to_end(&mut body)?;
            if (body.len() - before) as u64 != size {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short chunk"));
            }
            let mut crlf = String::new();
            r.read_line(&mut crlf)?;
        }
    }
    if let Some(n) = head.content_length() {
        r.take(n).read_to_end(&mut body)?;
        if body.len() as u64 != n {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
        }
        return Ok(body);
    }
    if to_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

fn is_hop_header(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "transfer-encoding"
            | "content-length"
            | "te"
            | "upgrade"
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Fault",
    }
}

fn simple_response(status: u16, text: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        reason(status),
        text.len()
    )
    .into_bytes()
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

fn handle_conn(stream: TcpStream, shared: &Shared) {
    shared.connections.fetch_add(1, Ordering::SeqCst);
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let (fault, latency) = shared.next_fault();
    if fault == Some(Fault::Refuse) {
        shared.record(RequestRecord {
            method: String::new(),
            target: String::new(),
            headers: Vec::new(),
            fault,
            status: 0,
            flipped: None,
        });
        reset(stream);
        return;
    }
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut rec = RequestRecord {
        method: String::new(),
        target: String::new(),
        headers: Vec::new(),
        fault: fault.clone(),
        status: 0,
        flipped: None,
    };
    let result = serve(&stream, shared, fault.as_ref(), latency, &mut rec);
    // Recorded before the client gets its answer, so a test sees the record of a request
    // as soon as the request returns.
    shared.record(rec);
    let close = match result {
        Ok((bytes, close)) => {
            let mut out = &stream;
            let bandwidth = lock(&shared.rules).bandwidth;
            match send_paced(&mut out, &bytes, bandwidth, shared).and_then(|()| out.flush()) {
                Ok(()) => close,
                Err(_) => Close::Normal,
            }
        }
        Err(_) => Close::Normal,
    };
    match close {
        Close::Reset => {
            std::thread::sleep(Duration::from_millis(20));
            reset(stream)
        }
        Close::Normal => {
            let _ = stream.shutdown(Shutdown::Write);
            // Let the client read what was sent before the socket goes away.
            let mut sink = [0u8; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let mut s = &stream;
            while let Ok(n) = s.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
    }
}

enum Close {
    Normal,
    Reset,
}

/// Writes `bytes` as if through a link of `bandwidth` bytes/s shared by every connection.
fn send_paced(
    out: &mut impl Write,
    bytes: &[u8],
    bandwidth: u64,
    shared: &Shared,
) -> io::Result<()> {
    if bandwidth == 0 {
        return out.write_all(bytes);
    }
    for piece in bytes.chunks(16 << 10) {
        let done_at = {
            let mut free = lock(&shared.link_free);
            let now = std::time::Instant::now();
            let start = free.map_or(now, |f| f.max(now));
            let end = start + Duration::from_secs_f64(piece.len() as f64 / bandwidth as f64);
            *free = Some(end);
            end
        };
        let now = std::time::Instant::now();
        if done_at > now {
            std::thread::sleep(done_at - now);
        }
        out.write_all(piece)?;
    }
    Ok(())
}

fn serve(
    stream: &TcpStream,
    shared: &Shared,
    fault: Option<&Fault>,
    latency: Duration,
    rec: &mut RequestRecord,
) -> io::Result<(Vec<u8>, Close)> {
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader)?;
    let mut parts = head.start_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    rec.method = method.clone();
    rec.target = target.clone();
    rec.headers = head
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let body = read_body(&mut reader, &head, false)?;
    if !latency.is_zero() {
        sleep_unless_stopped(latency, shared);
    }
    if let Some(Fault::Status(code)) = fault {
        rec.status = *code;
        let text = format!("fault injected: HTTP {code}\n");
        return Ok((simple_response(*code, &text), Close::Normal));
    }

    // Origin form of an absolute-form target.
    let path = match target.split_once("://") {
        Some((_, rest)) => match rest.find('/') {
            Some(i) => rest[i..].to_string(),
            None => "/".to_string(),
        },
        None => target.clone(),
    };
    let upstream_addr = *lock(&shared.upstream);
    let mut up = match TcpStream::connect_timeout(&upstream_addr, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            rec.status = 502;
            let text = format!("fault proxy: upstream {upstream_addr}: {e}\n");
            return Ok((simple_response(502, &text), Close::Normal));
        }
    };
    up.set_read_timeout(Some(IO_TIMEOUT))?;
    up.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in &head.headers {
        if !is_hop_header(k) {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if !body.is_empty() || head.content_length().is_some() || head.chunked() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes())?;
    up.write_all(&body)?;
    shared.forwarded.fetch_add(1, Ordering::SeqCst);

    let mut upr = BufReader::new(&up);
    let rhead = read_head(&mut upr)?;
    let status: u16 = rhead
        .start_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    rec.status = status;
    let no_body =
        method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 || status < 200;
    let mut rbody = if no_body {
        Vec::new()
    } else {
        read_body(&mut upr, &rhead, true)?
    };

    let mut status_line = rhead.start_line.clone();
    if let Some(rest) = status_line.strip_prefix("HTTP/1.0") {
        status_line = format!("HTTP/1.1{rest}");
    }
    let head_bytes = |content_length: u64| -> Vec<u8> {
        let mut h = format!("{status_line}\r\n");
        for (k, v) in &rhead.headers {
            if !is_hop_header(k) {
                h.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        if no_body {
            if let Some(n) = rhead.content_length() {
                h.push_str(&format!("Content-Length: {n}\r\n"));
            }
        } else {
            h.push_str(&format!("Content-Length: {content_length}\r\n"));
        }
        h.push_str("Connection: close\r\n\r\n");
        h.into_bytes()
    };
    let full = rbody.len() as u64;
    let (mut out, body, close) = match fault {
        Some(Fault::Reset) => (head_bytes(full), &rbody[..rbody.len() / 2], Close::Reset),
        Some(Fault::Truncate(k)) => {
            let k = (*k).min(full) as usize;
            (head_bytes(full), &rbody[..k], Close::Normal)
        }
        Some(Fault::ShortBody(k)) => {
            let k = (*k).min(full) as usize;
            (head_bytes(k as u64), &rbody[..k], Close::Normal)
        }
        Some(Fault::FlipBit(at)) => {
            if !rbody.is_empty() {
                let (off, mask) = match at {
                    Some(o) => ((*o).min(full - 1), 1u8),
                    None => {
                        let r = random_u64();
                        (r % full, 1u8 << ((r >> 32) % 8))
                    }
                };
                rbody[off as usize] ^= mask;
                rec.flipped = Some((off, mask));
            }
            (head_bytes(full), &rbody[..], Close::Normal)
        }
        _ => (head_bytes(full), &rbody[..], Close::Normal),
    };
    out.extend_from_slice(body);
    Ok((out, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny upstream: answers every request with `body` (200), echoing the request line
    /// in `X-Request-Line`. One request per connection.
    struct Upstream {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Upstream {
        fn start(body: Vec<u8>, chunked: bool) -> Upstream {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let st = stop.clone();
            let thread = std::thread::spawn(move || {
                for c in l.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(s) = c else { continue };
                    let mut r = BufReader::new(&s);
                    let Ok(head) = read_head(&mut r) else {
                        continue;
                    };
                    let _ = read_body(&mut r, &head, false);
                    let mut w = &s;
                    let line = head.start_line.clone();
                    if chunked {
                        let _ = write!(w, "HTTP/1.1 200 OK\r\nX-Request-Line: {line}\r\nTransfer-Encoding: chunked\r\n\r\n");
                        for part in body.chunks(7) {
                            let _ = write!(w, "{:x}\r\n", part.len());
                            let _ = w.write_all(part);
                            let _ = w.write_all(b"\r\n");
                        }
                        let _ = w.write_all(b"0\r\n\r\n");
                    } else {
                        let _ = write!(w, "HTTP/1.1 200 OK\r\nX-Request-Line: {line}\r\nContent-Length: {}\r\n\r\n", body.len());
                        let _ = w.write_all(&body);
                    }
                    let _ = s.shutdown(Shutdown::Write);
                }
            });
            Upstream {
                addr,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Upstream {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            let _ = self.thread.take().unwrap().join();
        }
    }

    /// One raw request; the status and the body, or the io error.
    fn get(addr: SocketAddr, target: &str) -> io::Result<(u16, Vec<u8>)> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut w = &s;
        write!(w, "GET {target} HTTP/1.1\r\nHost: example.test\r\n\r\n")?;
        let mut r = BufReader::new(&s);
        let head = read_head(&mut r)?;
        let status = head
            .start_line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let body = read_body(&mut r, &head, true)?;
        Ok((status, body))
    }

    #[test]
    fn forwards_and_injects() {
        let body: Vec<u8> = (0..100u8).collect();
        for chunked in [false, true] {
            let up = Upstream::start(body.clone(), chunked);
            let p = FaultProxy::start(up.addr);
            assert_eq!(get(p.addr(), "/a").unwrap(), (200, body.clone()));
            // Absolute form goes out in origin form.
            assert_eq!(get(p.addr(), "http://blobs.test:81/b/c").unwrap().1, body);

            p.fail_next(2, 503);
            assert_eq!(get(p.addr(), "/x").unwrap().0, 503);
            assert_eq!(get(p.addr(), "/x").unwrap().0, 503);
            assert_eq!(get(p.addr(), "/x").unwrap().0, 200);

            p.short_body_next(1, 10);
            assert_eq!(get(p.addr(), "/x").unwrap(), (200, body[..10].to_vec()));

            p.truncate_next(1, 10);
            assert!(
                get(p.addr(), "/x").is_err(),
                "truncated body must not parse"
            );

            p.reset_next(1);
            assert!(get(p.addr(), "/x").is_err());

            p.refuse_next(1);
            assert!(get(p.addr(), "/x").is_err());

            p.flip_bit_next(1, Some(42));
            let (_, got) = get(p.addr(), "/x").unwrap();
            let diff: Vec<usize> = (0..100).filter(|&i| got[i] != body[i]).collect();
            assert_eq!(diff, vec![42]);
            assert_eq!(got[42] ^ body[42], 1);

            p.flip_bit_next(1, None);
            let (_, got) = get(p.addr(), "/x").unwrap();
            let rec = p.records().last().unwrap().clone();
            let (off, mask) = rec.flipped.unwrap();
            assert_eq!(got[off as usize] ^ body[off as usize], mask);
            assert_eq!(mask.count_ones(), 1);

            p.set_latency(Duration::from_millis(150));
            let t = Instant::now();
            get(p.addr(), "/x").unwrap();
            assert!(t.elapsed() >= Duration::from_millis(150));
            p.set_latency(Duration::ZERO);

            p.set_persistent(Some(Fault::Status(500)));
            assert_eq!(get(p.addr(), "/x").unwrap().0, 500);
            assert_eq!(get(p.addr(), "/x").unwrap().0, 500);
            p.clear();
            assert_eq!(get(p.addr(), "/x").unwrap().0, 200);
            assert_eq!(p.pending(), 0);

            let recs = p.records();
            assert_eq!(recs[1].target, "http://blobs.test:81/b/c");
            assert_eq!(recs[1].header("host"), Some("example.test"));
            assert_eq!(p.requests(), 15);
            assert_eq!(p.faulted(), 10);
            // Status faults and the refused connection never reach the upstream.
            assert_eq!(p.forwarded(), 15 - 4 - 1);
        }
    }

    #[test]
    fn upstream_down_is_502_and_drop_stops() {
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p = FaultProxy::start(dead);
        let addr = p.addr();
        assert_eq!(get(addr, "/x").unwrap().0, 502);
        drop(p);
        assert!(TcpStream::connect(addr).is_err(), "listener closed on drop");
    }
}

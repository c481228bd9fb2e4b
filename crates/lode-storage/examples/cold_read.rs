//! Benchmark: a cold read of N scattered files of an image through the cache, over an HTTP
//! link with added latency and a bandwidth cap (busybox httpd behind lode-testkit's fault
//! proxy). Prints requests issued, bytes fetched vs needed, and time vs the physical bound
//! RTT·requests + bytes/bandwidth, for a few fetch settings side by side.
//!
//!   cargo run --release -p lode-storage --example cold_read -- IMAGE_DIR [FILES] [RTT_MS] [MBIT]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_format::reader::{Image, Inode};
use lode_storage::cache::BlobCache;
use lode_storage::fetch::{FetchOptions, LazyDevice};
use lode_storage::image::{open_image, ImageSource, SourceOptions};
use lode_testkit::faultproxy::FaultProxy;

struct Httpd(Child);
impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_httpd(dir: &Path) -> (Httpd, std::net::SocketAddr) {
    let port = free_port();
    let child = Command::new("busybox")
        .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox httpd (run scripts/setup.sh)");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (Httpd(child), addr)
}

/// Regular files of the image (path, inode), in a stable order.
fn files(img: &Image) -> Vec<(Vec<u8>, Inode)> {
    let mut out = Vec::new();
    let mut stack = vec![(b"".to_vec(), img.inode(img.root_nid()).unwrap())];
    while let Some((path, dir)) = stack.pop() {
        for e in img.read_dir(&dir).unwrap() {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let mut p = path.clone();
            p.push(b'/');
            p.extend_from_slice(&e.name);
            let ino = img.inode(e.nid).unwrap();
            if ino.is_dir() {
                stack.push((p, ino));
            } else if ino.is_regular() && ino.size > 0 {
                out.push((p, ino));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

struct Run {
    name: &'static str,
    seconds: f64,
    requests: u64,
    bytes_fetched: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image_dir = PathBuf::from(
        args.get(1)
            .expect("usage: cold_read IMAGE_DIR [FILES] [RTT_MS] [MBIT]"),
    );
    let n: usize = args.get(2).map_or(200, |s| s.parse().unwrap());
    let rtt_ms: u64 = args.get(3).map_or(20, |s| s.parse().unwrap());
    let mbit: u64 = args.get(4).map_or(100, |s| s.parse().unwrap());
    let bandwidth = mbit * 1_000_000 / 8;

    let (_httpd, addr) = start_httpd(&image_dir);
    let proxy = FaultProxy::start(addr);
    // A one-way added delay per request models one round trip per request.
    proxy.handle().set_latency(Duration::from_millis(rtt_ms));
    proxy.handle().set_bandwidth(bandwidth);

    // Pick N scattered files, deterministically, from the bootstrap alone.
    let bootstrap = std::fs::read(image_dir.join("bootstrap")).unwrap();
    let meta = Image::open(Box::new(bootstrap)).unwrap();
    let all = files(&meta);
    let step = (all.len() / n.max(1)).max(1);
    let chosen: Vec<&(Vec<u8>, Inode)> = all.iter().step_by(step).take(n).collect();
    let needed_bytes: u64 = chosen.iter().map(|(_, i)| i.size).sum();

    let configs: [(&'static str, FetchOptions); 3] = [
        (
            "exact (no merge gap, no readahead)",
            FetchOptions {
                merge_gap: 0,
                readahead: 0,
                ..Default::default()
            },
        ),
        ("default (64K merge gap)", FetchOptions::default()),
        (
            "readahead 256 KiB",
            FetchOptions {
                readahead: 256 << 10,
                ..Default::default()
            },
        ),
    ];
    println!(
        "cold read of {} scattered files ({:.1} MB) of {} over HTTP with {rtt_ms} ms per request and {mbit} Mbit/s",
        chosen.len(),
        needed_bytes as f64 / 1e6,
        image_dir.display()
    );
    let mut runs = Vec::new();
    let mut needed_compressed = 0u64;
    for (name, fetch) in configs {
        let tmp = tempfile::Builder::new()
            .prefix("lode-coldread-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let cache = BlobCache::open(tmp.path()).unwrap();
        let opts = SourceOptions {
            fetch,
            ..Default::default()
        };
        let opened = open_image(&ImageSource::Http(proxy.url()), &cache, &opts).unwrap();
        let base_requests = opened.stats.snapshot().requests;
        let base_bytes = opened.stats.snapshot().bytes_fetched;
        let mut img =
            Image::open(Box::new(std::fs::File::open(&opened.bootstrap).unwrap())).unwrap();
        for (i, f) in opened.fetchers.iter().enumerate() {
            img.set_device(i, Box::new(LazyDevice(f.clone())));
        }
        let img = Arc::new(img);
        let t0 = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        for (_, ino) in &chosen {
            let mut off = 0;
            while off < ino.size {
                let n = img.read_at(ino, off, &mut buf).unwrap();
                off += n as u64;
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let s = opened.stats.snapshot();
        // What an ideal fetcher must move: the compressed chunks holding the files' data.
        if needed_compressed == 0 {
            let mut seen = std::collections::HashSet::new();
            for (_, ino) in &chosen {
                let mut off = 0;
                while off < ino.size {
                    let ext = img.map(ino, off).unwrap();
                    if let lode_format::reader::ExtentKind::Mapped { device, physical } = ext.kind {
                        let f = &opened.fetchers[device as usize - 1];
                        let t = &f.cached().table;
                        if let Some(ci) = t.find(physical) {
                            if seen.insert((device, ci)) {
                                needed_compressed += t.entries[ci].compressed_len.get() as u64;
                            }
                        }
                    }
                    off = ext.logical + ext.len;
                }
            }
        }
        runs.push(Run {
            name,
            seconds,
            requests: s.requests - base_requests,
            bytes_fetched: s.bytes_fetched - base_bytes,
        });
        drop(opened);
    }
    println!(
        "needed: {:.2} MB of file data = {:.2} MB of compressed chunks",
        needed_bytes as f64 / 1e6,
        needed_compressed as f64 / 1e6
    );
    println!(
        "{:38} {:>8} {:>9} {:>12} {:>9} {:>9} {:>8}",
        "fetch settings", "time s", "requests", "fetched MB", "/needed", "bound s", "/bound"
    );
    for r in &runs {
        let bound = r.requests as f64 * rtt_ms as f64 / 1000.0
            + needed_compressed as f64 / bandwidth as f64;
        println!(
            "{:38} {:8.2} {:9} {:12.2} {:8.2}x {:9.2} {:7.2}x",
            r.name,
            r.seconds,
            r.requests,
            r.bytes_fetched as f64 / 1e6,
            r.bytes_fetched as f64 / needed_compressed.max(1) as f64,
            bound,
            r.seconds / bound
        );
    }
    println!(
        "bound = requests x RTT + compressed bytes needed / bandwidth (requests are issued one after another by the reading program)"
    );
}

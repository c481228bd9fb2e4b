//! End to end over a faulty network: a lode image served by busybox httpd behind the fault
//! proxy, read through `open_image` + fetchers while the proxy injects 503s, resets,
//! truncated bodies and bit flips. No bad byte is ever served; transient faults are survived;
//! a permanent fault is a clear error; and the fetch recovers once the network heals.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use lode_format::manifest::ImageManifest;
use lode_format::reader::ReadAt;
use lode_storage::cache::BlobCache;
use lode_storage::chunks::UncompressedView;
use lode_storage::fetch::FetchOptions;
use lode_storage::image::{open_image, ImageSource, SourceOptions};
use lode_testkit::faultproxy::{Fault, FaultProxy};

#[test]
fn no_bad_byte_under_network_faults() {
    let dir = tempfile::Builder::new()
        .prefix("lode-faulty-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..30u32 {
        let data = support::pseudo_random(20_000 + i as usize * 9_001, i as u64);
        std::fs::write(src.join(format!("f{i}")), data).unwrap();
    }
    let img = dir.path().join("img");
    let opts = lode_builder::BuildOptions {
        chunk_size: 16 << 10,
        inline_max: 0,
        ..Default::default()
    };
    lode_builder::build_dir(&src, &img, &opts).unwrap();
    let manifest: ImageManifest =
        serde_json::from_slice(&std::fs::read(img.join("image.json")).unwrap()).unwrap();
    let blob = manifest.blobs[0].clone();
    let reference = {
        let f = std::fs::File::open(img.join("blobs").join(blob.hex())).unwrap();
        let view = UncompressedView::open(f, blob.clone()).unwrap();
        let mut out = vec![0u8; blob.uncompressed_size as usize];
        view.read_exact_at(&mut out, 0).unwrap();
        out
    };

    let httpd = support::busybox_httpd(&img);
    let proxy = FaultProxy::start(httpd.addr());
    let faults = proxy.handle();
    let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
    let source_opts = SourceOptions {
        fetch: FetchOptions {
            retries: 6,
            backoff: Duration::from_millis(5),
            ..Default::default()
        },
        ..Default::default()
    };
    let opened = open_image(&ImageSource::Http(proxy.url()), &cache, &source_opts).unwrap();
    let f = &opened.fetchers[0];
    let n = f.cached().table.entries.len();
    assert!(n > 20, "{n} chunks");

    // Every other request fails in some way, cycling through the fault kinds.
    let kinds = [
        Fault::Status(503),
        Fault::Reset,
        Fault::Truncate(100),
        Fault::FlipBit(None),
        Fault::Status(500),
    ];
    for (i, e) in f.cached().table.entries.clone().iter().enumerate() {
        faults.inject(kinds[i % kinds.len()].clone(), 1);
        let off = e.blkaddr.get() as u64 * 4096;
        let len = e.uncompressed_len.get() as u64;
        f.ensure(off, len).unwrap();
        let mut got = vec![0u8; len as usize];
        f.cached().read_at(&mut got, off).unwrap();
        assert!(
            got == reference[off as usize..(off + len) as usize],
            "chunk {i} differs"
        );
    }
    let s = f.stats.snapshot();
    assert!(s.retries >= n as u64, "{s:?}");
    assert!(s.verify_failures >= 1, "bit flips were caught: {s:?}");

    // A permanent fault: a clear error naming the blob, nothing cached; then recovery.
    let cache2 = BlobCache::open(&dir.path().join("cache2")).unwrap();
    let opened2 = open_image(&ImageSource::Http(proxy.url()), &cache2, &source_opts).unwrap();
    let f2 = &opened2.fetchers[0];
    faults.set_persistent(Some(Fault::Status(403)));
    let err = f2.ensure(0, 4096).unwrap_err().to_string();
    assert!(err.contains(&blob.digest) && err.contains("403"), "{err}");
    assert_eq!(f2.cached().chunks_present.load(Ordering::SeqCst), 0);
    faults.set_persistent(Some(Fault::FlipBit(None)));
    let err = f2.ensure(0, 4096).unwrap_err().to_string();
    assert!(err.contains("digest"), "{err}");
    assert_eq!(f2.cached().chunks_present.load(Ordering::SeqCst), 0);
    faults.set_persistent(None);
    f2.ensure(0, blob.uncompressed_size).unwrap();
    let mut all = vec![0u8; blob.uncompressed_size as usize];
    f2.cached().read_at(&mut all, 0).unwrap();
    assert!(all == reference);
}

//! A prefetch list stored at build time is fetched in the background at mount time, so the
//! traced reads then hit the cache (no misses, no requests).

use std::sync::Arc;

use lode_storage::cache::BlobCache;
use lode_storage::fetch::PrefetchLimits;
use lode_storage::image::{open_image, ImageSource, SourceOptions};

#[test]
fn traced_files_are_fetched_before_they_are_read() {
    let dir = tempfile::Builder::new()
        .prefix("lode-prefetch-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("lib dir")).unwrap();
    for i in 0..50u32 {
        let data: Vec<u8> = (0..(5000 + i * 3001)).map(|j| (j * 31 + i) as u8).collect();
        std::fs::write(src.join(format!("lib dir/m{i}.py")), data).unwrap();
    }
    // The trace: five whole files, one range, a path the image lacks, a comment.
    let trace = dir.path().join("trace");
    std::fs::write(
        &trace,
        "# recorded\n/lib dir/m3.py\n/lib dir/m17.py\n/lib dir/m40.py 8192 4096\n/nope\n/lib dir/m49.py\n/lib dir/m5.py\n/lib dir/m8.py\n",
    )
    .unwrap();
    let img = dir.path().join("img");
    let opts = lode_builder::BuildOptions {
        chunk_size: 64 << 10,
        inline_max: 0,
        prefetch: Some(trace),
        ..Default::default()
    };
    let report = lode_builder::build_dir(&src, &img, &opts).unwrap();
    let p = report.prefetch.unwrap();
    assert_eq!((p.entries, p.skipped), (7, 1));

    let cache = BlobCache::open(&dir.path().join("cache")).unwrap();
    let opened = open_image(
        &ImageSource::Dir(img.clone()),
        &cache,
        &SourceOptions::default(),
    )
    .unwrap();
    assert!(!opened.manifest.prefetch.is_empty());
    let before = opened.stats.snapshot();
    opened
        .start_prefetch(false, Arc::new(PrefetchLimits::default()))
        .unwrap()
        .join()
        .unwrap();
    let after_prefetch = opened.stats.snapshot();
    assert!(after_prefetch.requests > before.requests);

    // Reading the traced files through the EROFS reader now needs no fetch.
    let mut image =
        lode_format::reader::Image::open(Box::new(std::fs::File::open(&opened.bootstrap).unwrap()))
            .unwrap();
    for (i, f) in opened.fetchers.iter().enumerate() {
        image.set_device(i, Box::new(lode_storage::fetch::LazyDevice(f.clone())));
    }
    for name in ["m3.py", "m17.py", "m49.py", "m5.py", "m8.py"] {
        let ino = image
            .resolve(format!("/lib dir/{name}").as_bytes())
            .unwrap();
        let mut buf = vec![0u8; ino.size as usize];
        image.read_at(&ino, 0, &mut buf).unwrap();
        assert_eq!(buf, std::fs::read(src.join("lib dir").join(name)).unwrap());
    }
    let ino = image.resolve(b"/lib dir/m40.py").unwrap();
    let mut buf = vec![0u8; 4096];
    image.read_at(&ino, 8192, &mut buf).unwrap();
    let after_reads = opened.stats.snapshot();
    assert_eq!(
        after_reads.requests, after_prefetch.requests,
        "traced reads fetched"
    );
    assert_eq!(
        after_reads.misses, after_prefetch.misses,
        "traced reads missed"
    );
    // An untraced file still fetches on demand.
    let ino = image.resolve(b"/lib dir/m30.py").unwrap();
    let mut buf = vec![0u8; ino.size as usize];
    image.read_at(&ino, 0, &mut buf).unwrap();
    assert!(opened.stats.snapshot().requests > after_reads.requests);
}

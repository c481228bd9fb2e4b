//! Corrupt images must give Ok or Err, never a panic, a hang or a huge allocation: valid
//! images are mutated (byte flips, planted "interesting" values, truncations; usually with a
//! fixed-up superblock checksum so the damage reaches past the superblock) and every part
//! of the reader is exercised on each.

mod common;

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use common::asm::{refresh_checksum, Asm, InodeSpec};
use common::{mkfs, populate_small, pseudo_random};
use lode_format::format::{xattr_index, FileType};
use lode_format::reader::Image;

/// Opens the bytes and touches everything reachable, within a budget of work. Returns
/// whether the image opened.
fn exercise(bytes: Vec<u8>, blob: Option<Vec<u8>>) -> bool {
    let Ok(mut image) = Image::open(Box::new(bytes)) else {
        return false;
    };
    if let Some(blob) = blob {
        if !image.devices().is_empty() {
            image.set_device(0, Box::new(blob));
        }
    }
    let _ = image.superblock().incompat_feature_names();
    let Ok(root) = image.inode(image.root_nid()) else {
        return true;
    };
    let mut budget: u32 = 20_000;
    let mut seen_dirs = HashSet::new();
    let mut pending = vec![root];
    let mut buf = vec![0u8; 10_000];
    while let Some(dir) = pending.pop() {
        if !seen_dirs.insert(dir.nid) {
            continue;
        }
        let Ok(entries) = image.read_dir(&dir) else {
            let _ = image.lookup(&dir, b"x");
            continue;
        };
        for entry in entries {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return true;
            }
            let _ = image.lookup(&dir, &entry.name);
            let Ok(inode) = image.inode(entry.nid) else {
                continue;
            };
            let _ = image.xattrs(&inode);
            if inode.is_symlink() {
                let _ = image.readlink(&inode);
            }
            if inode.is_regular() {
                // A few reads of odd sizes at the start, around block edges and at the end.
                for offset in [0, 4095, 4096, inode.size.saturating_sub(100)] {
                    let _ = image.read_at(&inode, offset, &mut buf);
                    let _ = image.map(&inode, offset);
                }
            }
            if inode.is_dir() && entry.name != b"." && entry.name != b".." {
                pending.push(inode);
            }
        }
    }
    let _ = image.resolve(b"/bigdir/entry-00003");
    let _ = image.resolve(b"/sub/hl_b");
    true
}

/// Deterministic xorshift.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(original: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = original.to_vec();
    // Most metadata lives in the first blocks; aim there most of the time.
    let hot = bytes.len().min(20_000);
    match rng.below(10) {
        0..=5 => {
            for _ in 0..1 + rng.below(4) {
                let span = if rng.below(5) == 0 { bytes.len() } else { hot };
                let at = rng.below(span);
                bytes[at] ^= 1 << rng.below(8);
            }
        }
        6..=7 => {
            let interesting: [u32; 8] = [
                0,
                1,
                0xFFFF_FFFF,
                0x7FFF_FFFF,
                0x8000_0000,
                4096,
                0xFFFF,
                12,
            ];
            let value = interesting[rng.below(interesting.len())].to_le_bytes();
            let width = [1, 2, 4][rng.below(3)];
            let at = rng.below(hot - 4);
            bytes[at..at + width].copy_from_slice(&value[..width]);
        }
        _ => {
            let len = rng.below(bytes.len());
            bytes.truncate(len);
        }
    }
    // Keep the superblock checksum valid most of the time so damage reaches inodes.
    let blkszbits_ok = bytes.len() >= 4096 && (9..=12).contains(&bytes[1024 + 12]);
    if blkszbits_ok && rng.below(5) != 0 {
        refresh_checksum(&mut bytes);
    }
    bytes
}

/// A small hand-made image with 512-byte blocks, chunk indexes into a device and xattrs.
fn handmade() -> (Vec<u8>, Vec<u8>) {
    let bs = 512;
    let mut asm = Asm::new(bs, 16);
    asm.prefixes = vec![(xattr_index::TRUSTED, b"overlay.".to_vec())];
    let root = asm.reserve(32);
    let shared = asm.shared_xattr(xattr_index::USER, b"shared", b"value");
    let mut entries = vec![
        (b".".to_vec(), root, FileType::Directory),
        (b"..".to_vec(), root, FileType::Directory),
    ];
    let mut spec = asm.inline(0o100644, &pseudo_random(1300, 1));
    spec.xattrs = vec![(xattr_index::LONG_PREFIX, b"opaque".to_vec(), b"y".to_vec())];
    spec.shared = vec![shared];
    entries.push((b"inline".to_vec(), asm.inode(&spec), FileType::Regular));
    let spec = asm.block_map(&pseudo_random(3000, 2), 1, &[1]);
    entries.push((b"map".to_vec(), asm.inode(&spec), FileType::Regular));
    let spec = asm.chunk_indexes(1500, 0, &[Some((1, 0)), None, Some((1, 1))]);
    entries.push((b"idx".to_vec(), asm.inode(&spec), FileType::Regular));
    let spec = asm.inline(0o120777, b"link/target");
    entries.push((b"link".to_vec(), asm.inode(&spec), FileType::Symlink));
    for i in 0..30 {
        let nid = asm.inode(&InodeSpec::new(0o100644, 0));
        entries.push((format!("f{i:03}").into_bytes(), nid, FileType::Regular));
    }
    let spec = asm.dir(entries);
    asm.write_inode(root, &spec);
    asm.devices = vec![(b"blob".to_vec(), 2, 0)];
    (asm.finish(root), pseudo_random(1024, 3))
}

#[test]
fn mutated_images_never_panic_or_hang() {
    let dir = tempfile::Builder::new()
        .prefix("lode-corrupt-")
        .tempdir()
        .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate_small(&src);
    let mut originals = Vec::new();
    for (name, args) in [("default", &[][..]), ("chunked", &["--chunksize=4096"][..])] {
        let path = dir.path().join(name);
        mkfs(&path, &src, args);
        originals.push((name, std::fs::read(&path).unwrap(), None));
    }
    let (image, blob) = handmade();
    originals.push(("handmade", image, Some(blob)));

    // The unmutated images must walk cleanly.
    for (name, bytes, blob) in &originals {
        let mut image =
            Image::open(Box::new(bytes.clone())).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(blob) = blob {
            image.set_device(0, Box::new(blob.clone()));
        }
        assert!(image
            .read_dir(&image.inode(image.root_nid()).unwrap())
            .is_ok());
    }

    let mut rng = Rng(0x1234_5678_9abc_def1);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    // LODE_CORRUPTION_ITERATIONS runs a longer soak by hand.
    let iterations: usize = std::env::var("LODE_CORRUPTION_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2100);
    let mut opened = 0;
    for i in 0..iterations {
        let (name, original, blob) = &originals[i % originals.len()];
        let mutated = mutate(original, &mut rng);
        let blob = blob.clone();
        let one = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| exercise(mutated.clone(), blob)));
        if outcome.as_ref().is_ok_and(|&ok| ok) {
            opened += 1;
        }
        if outcome.is_err() {
            let kept = std::env::temp_dir().join(format!("lode-panic-{name}-{i}.img"));
            std::fs::write(&kept, &mutated).unwrap();
            panic!(
                "iteration {i} ({name}) panicked; image kept at {}",
                kept.display()
            );
        }
        slowest = slowest.max(one.elapsed());
    }
    // Most mutations must get past the superblock, or the test proves little.
    assert!(
        opened > iterations / 2,
        "only {opened} of {iterations} mutated images opened"
    );
    // Generous bounds for a debug build on a busy 2-core machine.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest iteration took {slowest:?}"
    );
    let limit = Duration::from_secs(300).max(Duration::from_millis(150) * iterations as u32);
    assert!(started.elapsed() < limit, "took {:?}", started.elapsed());
}

//! Fuzzes the EROFS reader: the input is the primary image (and also backs every extra
//! device); everything reachable is opened, listed, looked up, read and mapped within a
//! fixed budget of work. Any panic, hang or runaway allocation is a bug.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use lode_format::format::{checksum_region_len, superblock_checksum};
use lode_format::reader::Image;

/// Directory entries visited per input, so deep or cyclic trees stay cheap.
const ENTRY_BUDGET: u32 = 5_000;

/// Byte 0 is ignored by EROFS; when it is odd the superblock checksum is recomputed, so
/// mutations are not all stopped by the checksum check.
fn with_valid_checksum(data: &[u8]) -> Vec<u8> {
    let mut bytes = data.to_vec();
    let wants_fixup = bytes.first().is_some_and(|b| b & 1 == 1);
    let blkszbits = bytes.get(1024 + 12).copied().unwrap_or(0);
    if wants_fixup && (9..=12).contains(&blkszbits) {
        let len = checksum_region_len(1 << blkszbits);
        if bytes.len() >= 1024 + len {
            let sum = superblock_checksum(&bytes[1024..1024 + len]);
            bytes[1028..1032].copy_from_slice(&sum.to_le_bytes());
        }
    }
    bytes
}

fuzz_target!(|data: &[u8]| {
    let bytes = Arc::new(with_valid_checksum(data));
    let Ok(mut image) = Image::open(Box::new(bytes.clone())) else {
        return;
    };
    for slot in 0..image.devices().len() {
        // Half the slots stay unset to exercise flat mode and missing devices.
        if slot % 2 == 0 {
            image.set_device(slot, Box::new(bytes.clone()));
        }
    }
    let _ = image.superblock().compat_feature_names();
    let Ok(root) = image.inode(image.root_nid()) else {
        return;
    };
    let mut budget = ENTRY_BUDGET;
    let mut seen_dirs = HashSet::new();
    let mut pending = vec![root];
    let mut buf = vec![0u8; 8192];
    while let Some(dir) = pending.pop() {
        if !seen_dirs.insert(dir.nid) {
            continue;
        }
        let _ = image.xattrs(&dir);
        let Ok(entries) = image.read_dir(&dir) else {
            let _ = image.lookup(&dir, b"a");
            continue;
        };
        for entry in entries {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return;
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
                for offset in [0, 4095, inode.size / 2, inode.size.saturating_sub(10)] {
                    let _ = image.map(&inode, offset);
                    let _ = image.read_at(&inode, offset, &mut buf);
                }
            }
            if inode.is_dir() && entry.name != b"." && entry.name != b".." {
                pending.push(inode);
            }
        }
    }
    let _ = image.resolve(b"/a/b/c");
});

//! Prefetch lists: an access trace (which files, and which ranges, a workload read, in order)
//! turned into the blob ranges a mount fetches in the background at once.
//!
//! The trace format is [`lode_format::trace`]'s (what `lode mount --record-trace` writes).
//! Paths that are not regular files of the image are skipped and counted (a trace of an
//! older image version still helps).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, Result};
use lode_format::manifest::PrefetchExtent;
use lode_format::trace;
use lode_format::tree::{Content, FileData, NodeId, Tree};

/// What resolving a trace did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PrefetchReport {
    pub entries: u64,
    pub skipped: u64,
    pub extents: u64,
    pub bytes: u64,
}

/// Resolves the trace at `path` against `tree` (whose chunks live in blobs 1..; device `d`
/// is blob `d - 1`).
pub fn resolve(tree: &Tree, path: &Path) -> Result<(Vec<PrefetchExtent>, PrefetchReport)> {
    let text = std::fs::read(path).with_context(|| format!("reading trace {}", path.display()))?;
    let mut out: Vec<PrefetchExtent> = Vec::new();
    let mut report = PrefetchReport::default();
    for (lineno, line) in text.split(|&b| b == b'\n').enumerate() {
        let entry = trace::parse_line(line)
            .with_context(|| format!("{}:{}: bad trace line", path.display(), lineno + 1))?;
        let Some((file, range)) = entry else {
            continue;
        };
        report.entries += 1;
        let Some(node) = lookup(tree, file) else {
            report.skipped += 1;
            continue;
        };
        let Content::File(FileData::Chunked {
            size,
            chunk_bits,
            chunks,
        }) = &tree.node(node).content
        else {
            // Inline (in the bootstrap) or not a regular file: nothing to fetch.
            report.skipped += 1;
            continue;
        };
        let (start, len) = range.unwrap_or((0, *size));
        let end = start.saturating_add(len).min(*size);
        if start >= end {
            continue;
        }
        let csize = 1u64 << chunk_bits;
        for i in (start / csize)..end.div_ceil(csize) {
            let c = chunks[i as usize];
            if c.is_hole() {
                continue;
            }
            let chunk_len = (size - i * csize).min(csize).next_multiple_of(4096);
            let ext = PrefetchExtent {
                blob: c.device as u32 - 1,
                offset: c.blkaddr as u64 * 4096,
                len: chunk_len,
            };
            match out.last_mut() {
                Some(last) if last.blob == ext.blob && last.offset + last.len == ext.offset => {
                    last.len += ext.len
                }
                Some(last)
                    if last.blob == ext.blob
                        && last.offset <= ext.offset
                        && ext.offset + ext.len <= last.offset + last.len => {}
                _ => out.push(ext),
            }
        }
    }
    let out = pieces_in_need_order(out);
    report.extents = out.len() as u64;
    report.bytes = out.iter().map(|e| e.len).sum();
    Ok((out, report))
}

/// The paths an access trace names, relative and `/`-separated (`usr/lib/x`), as layer
/// entries are normalized; empty without a trace.
pub fn traced_paths(trace: Option<&Path>) -> Result<HashSet<Vec<u8>>> {
    Ok(traced_in_order(trace)?.into_iter().collect())
}

fn traced_in_order(trace: Option<&Path>) -> Result<Vec<Vec<u8>>> {
    let Some(path) = trace else {
        return Ok(Vec::new());
    };
    let text = std::fs::read(path).with_context(|| format!("reading trace {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (lineno, line) in text.split(|&b| b == b'\n').enumerate() {
        let entry = trace::parse_line(line)
            .with_context(|| format!("{}:{}: bad trace line", path.display(), lineno + 1))?;
        if let Some((file, _)) = entry {
            let rel: Vec<&[u8]> = file
                .split(|&b| b == b'/')
                .filter(|c| !c.is_empty() && *c != b".")
                .collect();
            let rel = rel.join(&b'/');
            if seen.insert(rel.clone()) {
                out.push(rel);
            }
        }
    }
    Ok(out)
}

/// Puts the files the trace names first, in trace order (the rest keep their order), so their
/// chunks lie together at the start of the blob.
pub fn order_jobs(
    jobs: &mut [crate::walk::FileJob],
    src: &Path,
    trace: Option<&Path>,
) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let order: HashMap<Vec<u8>, usize> = traced_in_order(trace)?
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, i))
        .collect();
    if order.is_empty() {
        return Ok(());
    }
    let rank = |j: &crate::walk::FileJob| -> usize {
        j.path
            .strip_prefix(src)
            .ok()
            .and_then(|rel| order.get(rel.as_os_str().as_bytes()))
            .copied()
            .unwrap_or(usize::MAX)
    };
    // Stable: untraced files keep their walk order.
    jobs.sort_by_cached_key(rank);
    Ok(())
}

/// Largest prefetch extent (uncompressed bytes): big enough that a round trip is small next
/// to its transfer, small enough that a mount fetches several at once and the first files a
/// workload needs are not queued behind the last.
pub const PIECE_BYTES: u64 = 1 << 20;

/// `need` (extents in trace order) as pieces of at most [`PIECE_BYTES`] of adjacent data
/// (the traced files' chunks lie together: see `order_jobs` and the prefetch blob of layer
/// builds), ordered by when the workload first needed something in them. A layer build's
/// prefetch blob is in layer order, not trace order: this puts its pieces back in need order.
fn pieces_in_need_order(need: Vec<PrefetchExtent>) -> Vec<PrefetchExtent> {
    let mut ranked: Vec<(usize, PrefetchExtent)> = need.into_iter().enumerate().collect();
    ranked.sort_by_key(|(_, e)| (e.blob, e.offset));
    let mut pieces: Vec<(usize, PrefetchExtent)> = Vec::new();
    for (rank, e) in ranked {
        let end = e.offset + e.len;
        // Pieces already holding part of `e` are needed at least this early.
        for (r, p) in pieces.iter_mut().rev() {
            if p.blob != e.blob || p.offset + p.len <= e.offset {
                break;
            }
            *r = (*r).min(rank);
        }
        match pieces.last_mut() {
            Some((_, last)) if last.blob == e.blob && end <= last.offset + last.len => {}
            Some((_, last)) if last.blob == e.blob && e.offset <= last.offset + last.len => {
                if end - last.offset <= PIECE_BYTES.max(last.len) {
                    last.len = end - last.offset;
                } else {
                    // Too long to join: the rest starts where the last piece ends.
                    let start = last.offset + last.len;
                    let rest = PrefetchExtent {
                        blob: e.blob,
                        offset: start,
                        len: end - start,
                    };
                    pieces.push((rank, rest));
                }
            }
            _ => pieces.push((rank, e)),
        }
    }
    pieces.sort_by_key(|(rank, _)| *rank);
    pieces.into_iter().map(|(_, e)| e).collect()
}

/// The node at absolute `path` (no symlinks followed).
fn lookup(tree: &Tree, path: &[u8]) -> Option<NodeId> {
    let mut node = Tree::ROOT;
    for comp in path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
    {
        node = *tree.entries(node)?.get(comp)?;
    }
    Some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(blob: u32, offset: u64, len: u64) -> PrefetchExtent {
        PrefetchExtent { blob, offset, len }
    }

    #[test]
    fn pieces_merge_adjacent_data_and_keep_need_order() {
        let k = 4096;
        // Needed in this order: the end of the blob first, then its start.
        let need = vec![ext(1, 300 * k, k), ext(1, 0, k), ext(1, k, k), ext(0, 0, k)];
        let p = pieces_in_need_order(need);
        assert_eq!(p, vec![ext(1, 300 * k, k), ext(1, 0, 2 * k), ext(0, 0, k)]);
    }

    #[test]
    fn long_runs_are_cut_into_pieces() {
        let k = 4096;
        let need: Vec<_> = (0..600).map(|i| ext(0, i * k, k)).collect();
        let p = pieces_in_need_order(need);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().all(|e| e.len <= PIECE_BYTES));
        assert_eq!(p.iter().map(|e| e.len).sum::<u64>(), 600 * k);
        assert_eq!(p[0].offset, 0);
    }

    proptest::proptest! {
        /// Pieces cover exactly the needed blocks, never overlap, stay within the piece size
        /// unless one needed extent alone is larger, and the first piece holds the first need.
        #[test]
        fn pieces_cover_exactly_what_is_needed(
            need in proptest::collection::vec((0u32..3, 0u64..600, 1u64..300), 1..60)
        ) {
            let k = 4096;
            let need: Vec<_> = need.iter().map(|&(b, o, l)| ext(b, o * k, l * k)).collect();
            let blocks = |v: &[PrefetchExtent]| {
                let mut set = std::collections::BTreeSet::new();
                for e in v {
                    for blk in e.offset / k..(e.offset + e.len) / k {
                        set.insert((e.blob, blk));
                    }
                }
                set
            };
            let p = pieces_in_need_order(need.clone());
            proptest::prop_assert_eq!(blocks(&p), blocks(&need));
            let total: u64 = p.iter().map(|e| e.len / k).sum();
            proptest::prop_assert_eq!(total as usize, blocks(&p).len(), "pieces overlap");
            let largest = need.iter().map(|e| e.len).max().unwrap();
            for e in &p {
                proptest::prop_assert!(e.len <= PIECE_BYTES.max(largest) * 2, "{:?}", e);
            }
            let first = need[0];
            proptest::prop_assert!(p[0].blob == first.blob
                && p[0].offset < first.offset + first.len
                && first.offset < p[0].offset + p[0].len, "{:?} first need {:?}", p[0], first);
        }
    }

    #[test]
    fn contained_extents_add_nothing() {
        let k = 4096;
        let p = pieces_in_need_order(vec![ext(0, 0, 4 * k), ext(0, k, k)]);
        assert_eq!(p, vec![ext(0, 0, 4 * k)]);
    }
}

//! Prefetch lists: an access trace (which files, and which ranges, a workload read, in order)
//! turned into the blob ranges a mount fetches in the background at once.
//!
//! The trace format is [`lode_format::trace`]'s (what `lode mount --record-trace` writes).
//! Paths that are not regular files of the image are skipped and counted (a trace of an
//! older image version still helps).

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
    report.extents = out.len() as u64;
    report.bytes = out.iter().map(|e| e.len).sum();
    Ok((out, report))
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

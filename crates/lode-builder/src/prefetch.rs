//! Prefetch lists: an access trace (which files, and which ranges, a workload read, in order)
//! turned into the blob ranges a mount fetches in the background at once.
//!
//! Trace format, one entry per line (what `lode mount --record-trace` writes):
//!
//! ```text
//! # comment
//! /usr/bin/python3.11
//! /usr/lib/python3.11/json/__init__.py 0 4096
//! ```
//!
//! A path alone means the whole file; `OFFSET LEN` (decimal bytes) a range of it. Paths that
//! are not regular files of the image are skipped and counted (a trace of an older image
//! version still helps).

use std::path::Path;

use anyhow::{bail, Context, Result};
use lode_format::manifest::PrefetchExtent;
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
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        report.entries += 1;
        let (file, range) = parse_line(line)
            .with_context(|| format!("{}:{}: bad trace line", path.display(), lineno + 1))?;
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

/// A trace line: the path, and the byte range (offset, length) if one was given.
type TraceEntry<'a> = (&'a [u8], Option<(u64, u64)>);

fn parse_line(line: &[u8]) -> Result<TraceEntry<'_>> {
    // The path may contain spaces: the last two fields are a range only if both are numbers.
    let fields: Vec<&[u8]> = line.rsplitn(3, |&b| b == b' ').collect();
    if fields.len() == 3 {
        let num = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
        if let (Some(len), Some(off)) = (num(fields[0]), num(fields[1])) {
            return Ok((fields[2], Some((off, len))));
        }
    }
    if !line.starts_with(b"/") {
        bail!(
            "paths must be absolute: {:?}",
            String::from_utf8_lossy(line)
        );
    }
    Ok((line, None))
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

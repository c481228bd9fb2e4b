//! OCI layer import: applies layer tarballs, in order, onto one [`Tree`], writing the chunks
//! each layer adds to that layer's own blob.
//!
//! # Merge rules (OCI image spec, "Applying changesets")
//! - A later layer's entry replaces an earlier entry of the same path. A directory over a
//!   directory merges: the children stay and the new metadata (mode, owner, mtime, xattrs)
//!   replaces the old. Any other replacement drops the old entry with its subtree. Within one
//!   layer the last entry of a path wins, the same way.
//! - `.wh.NAME` removes NAME as lower layers left it; `.wh..wh..opq` in directory D removes
//!   everything lower layers put below D. Whiteouts never hide entries of their own layer,
//!   whatever the order of the tar: a whiteout of a same-layer directory hides only what lower
//!   layers put in it, and opaque directories are pruned when the layer ends. The whiteout files
//!   themselves never appear; other `.wh..wh.*` names (aufs metadata) are ignored.
//! - A hard link (`Link` entry) must name an entry present in the merged tree at that point
//!   (this layer or a lower one), and not a directory; it becomes a second name of that inode.
//! - Symlinks are stored as they are and never followed: a path whose parent in the merged tree
//!   is a symlink (or any non-directory) is an error, not a redirection.
//! - Parent directories a tar implies but does not contain are created with mode 0755, owner
//!   0:0, mtime 0 (the Unix epoch), no xattrs; the root directory has the same metadata until a
//!   layer has a `./` entry. (An existing directory used as an implied parent keeps its
//!   metadata.)
//!
//! # Hostile input
//! Names are normalized (leading `/`, empty and `.` components dropped, `..` resolved) and an
//! entry whose name escapes the root through `..` is rejected, as are names with NUL bytes or
//! components over 255 bytes. uid/gid beyond 32 bits, bad numeric fields, unsupported entry
//! types, device numbers EROFS cannot encode, empty or over-long symlink targets and truncated
//! streams are errors naming the layer and the entry. Nothing is written but blobs (by the
//! [`ChunkStore`]) and, later, the bootstrap.
//!
//! # Threads
//! The calling thread decompresses and parses (one layer at a time, in order) and cuts file
//! data into chunk buffers from a bounded pool; workers hash and compress them; a storing
//! thread puts them into the [`ChunkStore`] in the order they were cut, so the result does not
//! depend on timing, and closes the layer's blob at each layer boundary.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufReader, Read};
use std::rc::Rc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use lode_format::tree::{ChunkAddr, Content, FileData, Metadata, Node, NodeId, Tree};

use crate::pipeline::{buffer_count, is_zero};
use crate::progress::{DataBatch, Event, Progress, ReadTicker};
use crate::store::{ChunkStore, Compressor, PreparedChunk};
use crate::tarstream::{Decoded, Entry, EntryName, Kind, LayerFormat, TarReader};

/// Most chunks one file may have (bounds the chunk list a hostile size or sparse map can ask
/// for: 16 TiB with 1 MiB chunks).
pub const MAX_CHUNKS_PER_FILE: u64 = 1 << 24;

/// One layer to apply: a name for messages and reports, and its bytes (tar, gzip or zstd).
pub struct LayerInput {
    pub name: String,
    pub reader: Box<dyn Read + Send>,
    /// Bytes the reader will yield, if known (for progress reports only).
    pub size: Option<u64>,
}

impl LayerInput {
    pub fn new(name: impl Into<String>, reader: Box<dyn Read + Send>) -> Self {
        LayerInput {
            name: name.into(),
            reader,
            size: None,
        }
    }

    /// The size of the layer's source, for progress reports.
    pub fn with_size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
    }
}

#[derive(Debug, Clone)]
pub struct LayerOptions {
    pub chunk_bits: u8,
    pub inline_max: u64,
    pub threads: usize,
    pub progress: Progress,
    /// Paths (relative, `/`-separated) of the files an access trace names: their chunks go to
    /// the prefetch blob.
    pub hot: std::sync::Arc<HashSet<Vec<u8>>>,
}

/// What one layer contributed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    pub format: LayerFormat,
    /// Bytes read from the layer source (compressed size).
    pub input_bytes: u64,
    /// Bytes of the uncompressed tar stream.
    pub tar_bytes: u64,
    pub entries: u64,
    pub whiteouts: u64,
    pub files: u64,
    /// Bytes of regular-file data in the layer (logical sizes).
    pub file_bytes: u64,
    /// Chunks of this layer's files stored in this layer's blob.
    pub new_chunks: u64,
    /// Uncompressed bytes of those chunks.
    pub stored_bytes: u64,
    /// Bytes of this layer's file data found in earlier layers or the chunk dictionary.
    pub deduplicated_bytes: u64,
    /// `sha256:…` of the blob holding the new chunks (`None`: the layer added none).
    pub blob: Option<String>,
    pub blob_bytes: u64,
    /// What was skipped (xattrs EROFS cannot hold, data after the end of the archive).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Most warnings kept per layer (the rest are counted).
const MAX_WARNINGS: usize = 20;

/// Data totals of an import (the same as a directory build's).
pub use crate::pipeline::PipelineStats as LayerStats;

pub struct Applied {
    pub tree: Tree,
    pub layers: Vec<LayerReport>,
    pub stats: LayerStats,
}

/// Metadata of directories nobody described: implied parents and the initial root.
pub fn implied_dir_meta() -> Metadata {
    Metadata {
        permissions: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    }
}

struct Work {
    seq: u64,
    node: NodeId,
    index: u32,
    buf: Vec<u8>,
    hot: bool,
}

enum Msg {
    Chunk {
        seq: u64,
        node: NodeId,
        index: u32,
        /// `None`: all zeros.
        prepared: Option<PreparedChunk>,
        buf: Vec<u8>,
        /// Goes to the prefetch blob.
        hot: bool,
    },
    EndLayer {
        seq: u64,
    },
    Failed(anyhow::Error),
}

/// What the storing thread hands back.
#[derive(Default)]
struct Stored {
    addrs: Vec<(NodeId, u32, ChunkAddr)>,
    zero_chunks: u64,
    layers: Vec<LayerStored>,
}

/// What the store did for one layer.
struct LayerStored {
    new_chunks: u64,
    stored_bytes: u64,
    deduplicated_bytes: u64,
    /// Digest and size of the layer's blob, if it has one.
    blob: Option<(String, u64)>,
}

/// Applies `inputs` in order onto an empty tree, storing chunks in `store` (one blob per
/// layer that adds any chunk; the caller finishes the store).
pub fn apply_layers(
    inputs: Vec<LayerInput>,
    store: &mut ChunkStore,
    opts: &LayerOptions,
) -> Result<Applied> {
    let chunk_size = 1usize << opts.chunk_bits;
    let threads = opts.threads.max(1);
    let nbufs = buffer_count(chunk_size, threads);
    let (free_tx, free_rx) = bounded::<Vec<u8>>(nbufs);
    for _ in 0..nbufs {
        free_tx.send(Vec::new()).expect("pool has room");
    }
    let (work_tx, work_rx) = bounded::<Work>(nbufs);
    let (done_tx, done_rx) = unbounded::<Msg>();
    let compression = store.compression();

    std::thread::scope(|s| -> Result<Applied> {
        for _ in 0..threads {
            let compressor = Compressor::new(compression)?;
            let (rx, tx) = (work_rx.clone(), done_tx.clone());
            s.spawn(move || worker(rx, tx, compressor));
        }
        drop(work_rx);
        let storer = s.spawn(move || storer(store, done_rx, free_tx));

        let mut applier = Applier {
            tree: Tree::new(implied_dir_meta()),
            chunk_bits: opts.chunk_bits,
            inline_max: opts.inline_max,
            touched: HashMap::new(),
            opaque: HashSet::new(),
            seq: 0,
            work: work_tx,
            done: done_tx,
            free: free_rx,
            stats: LayerStats::default(),
            pipeline_closed: false,
            warnings: Vec::new(),
            dropped_warnings: 0,
            progress: opts.progress.clone(),
            batch: DataBatch::new(opts.progress.clone()),
            hot: opts.hot.clone(),
            source_read: Rc::new(Cell::new(0)),
            read_ticker: ReadTicker::new(),
        };
        let mut reports = Vec::new();
        let mut result = Ok(());
        let count = inputs.len();
        for (i, input) in inputs.into_iter().enumerate() {
            match applier.apply_layer(i, count, input) {
                Ok(r) => reports.push(r),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let Applier {
            mut tree,
            stats,
            work,
            done,
            pipeline_closed,
            ..
        } = applier;
        drop(work);
        drop(done);
        let stored = match storer.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // A failure to store (disk full, …) surfaces on this thread as a closed pipeline:
        // report the cause.
        let stored = match (result, stored) {
            (Err(e), Err(store_err)) if pipeline_closed => return Err(store_err.context(e)),
            (Err(e), _) => return Err(e),
            (Ok(()), stored) => stored?,
        };
        let mut stats = stats;
        stats.hole_chunks += stored.zero_chunks;
        for (node, index, addr) in stored.addrs {
            if let Content::File(FileData::Chunked { chunks, .. }) =
                &mut tree.node_mut(node).content
            {
                chunks[index as usize] = addr;
            }
        }
        for (report, done) in reports.iter_mut().zip(stored.layers) {
            report.new_chunks = done.new_chunks;
            report.stored_bytes = done.stored_bytes;
            report.deduplicated_bytes = done.deduplicated_bytes;
            if let Some((digest, size)) = done.blob {
                report.blob = Some(digest);
                report.blob_bytes = size;
            }
        }
        Ok(Applied {
            tree,
            layers: reports,
            stats,
        })
    })
}

fn worker(rx: Receiver<Work>, tx: Sender<Msg>, mut compressor: Compressor) {
    for w in rx {
        let prepared = if is_zero(&w.buf) {
            None
        } else {
            match compressor.prepare(&w.buf) {
                Ok(p) => Some(p),
                Err(e) => {
                    let _ = tx.send(Msg::Failed(e));
                    return;
                }
            }
        };
        let msg = Msg::Chunk {
            seq: w.seq,
            node: w.node,
            index: w.index,
            prepared,
            buf: w.buf,
            hot: w.hot,
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

fn storer(store: &mut ChunkStore, rx: Receiver<Msg>, free: Sender<Vec<u8>>) -> Result<Stored> {
    let mut out = Stored::default();
    let mut pending: BTreeMap<u64, Msg> = BTreeMap::new();
    let mut next = 0u64;
    let mut at_layer_start = store.stats.clone();
    for msg in rx {
        let seq = match &msg {
            Msg::Chunk { seq, .. } | Msg::EndLayer { seq } => *seq,
            Msg::Failed(_) => {
                let Msg::Failed(e) = msg else { unreachable!() };
                return Err(e);
            }
        };
        pending.insert(seq, msg);
        while let Some(msg) = pending.remove(&next) {
            next += 1;
            match msg {
                Msg::Chunk {
                    node,
                    index,
                    prepared,
                    buf,
                    hot,
                    ..
                } => {
                    match prepared {
                        None => out.zero_chunks += 1,
                        Some(p) => {
                            let addr = if hot {
                                store.put_hot(&p, &buf)?
                            } else {
                                store.put(&p, &buf)?
                            };
                            out.addrs.push((node, index, addr));
                        }
                    }
                    // The pool has room for every buffer; a closed pool means the parser quit.
                    let _ = free.send(buf);
                }
                Msg::EndLayer { .. } => {
                    let before = store.finished_blobs().len();
                    store.finish_blob()?;
                    let blob = (store.finished_blobs().len() > before).then(|| {
                        let b = store.finished_blobs().last().expect("just finished");
                        (b.digest.clone(), b.size)
                    });
                    let now = &store.stats;
                    out.layers.push(LayerStored {
                        new_chunks: now.unique_chunks - at_layer_start.unique_chunks,
                        stored_bytes: now.stored_bytes - at_layer_start.stored_bytes,
                        deduplicated_bytes: now.deduplicated_bytes
                            - at_layer_start.deduplicated_bytes,
                        blob,
                    });
                    at_layer_start = now.clone();
                }
                Msg::Failed(_) => unreachable!("failures are not queued"),
            }
        }
    }
    Ok(out)
}

/// Parser-side state: the merged tree and the bookkeeping of the layer being applied.
struct Applier {
    tree: Tree,
    chunk_bits: u8,
    inline_max: u64,
    /// Directory entries (directory node, name) the current layer created, replaced or passed
    /// through as implied parents: whiteouts and opaque markers leave them alone.
    touched: HashMap<NodeId, HashSet<Vec<u8>>>,
    /// Directories made opaque in the current layer, pruned when it ends.
    opaque: HashSet<NodeId>,
    seq: u64,
    work: Sender<Work>,
    done: Sender<Msg>,
    free: Receiver<Vec<u8>>,
    stats: LayerStats,
    pipeline_closed: bool,
    /// Warnings of the current layer.
    warnings: Vec<String>,
    dropped_warnings: u64,
    progress: Progress,
    batch: DataBatch,
    hot: std::sync::Arc<HashSet<Vec<u8>>>,
    /// Compressed bytes read from the current layer's source.
    source_read: Rc<Cell<u64>>,
    read_ticker: ReadTicker,
}

/// Normalizes an entry name into components; rejects escapes from the root.
pub fn normalize(raw: &[u8]) -> Result<Vec<&[u8]>> {
    ensure!(!raw.contains(&0), "the name contains a NUL byte");
    let mut out: Vec<&[u8]> = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    bail!("the name escapes the root of the image through '..'");
                }
            }
            c => {
                ensure!(
                    c.len() <= 255,
                    "a name component is {} bytes long (at most 255 allowed)",
                    c.len()
                );
                out.push(c);
            }
        }
    }
    Ok(out)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Applier {
    fn is_touched(&self, dir: NodeId, name: &[u8]) -> bool {
        self.touched.get(&dir).is_some_and(|s| s.contains(name))
    }

    fn touch(&mut self, dir: NodeId, name: &[u8]) {
        self.touched.entry(dir).or_default().insert(name.to_vec());
    }

    fn is_dir(&self, node: NodeId) -> bool {
        matches!(self.tree.node(node).content, Content::Directory(_))
    }

    fn new_dir(&mut self, meta: Metadata) -> NodeId {
        self.tree.add(Node {
            meta,
            content: Content::Directory(BTreeMap::new()),
        })
    }

    fn apply_layer(
        &mut self,
        index: usize,
        count: usize,
        input: LayerInput,
    ) -> Result<LayerReport> {
        let label = format!("layer {} ({})", index + 1, input.name);
        self.progress.emit(Event::LayerStart {
            index,
            count,
            name: &input.name,
            size: input.size,
        });
        self.read_ticker = ReadTicker::new();
        let (decoded, format, input_count) =
            Decoded::open(input.reader).with_context(|| format!("{label}: reading"))?;
        self.source_read = input_count.clone();
        let mut tar = TarReader::new(BufReader::with_capacity(128 << 10, decoded));
        let mut report = LayerReport {
            name: input.name.clone(),
            format,
            input_bytes: 0,
            tar_bytes: 0,
            entries: 0,
            whiteouts: 0,
            files: 0,
            file_bytes: 0,
            new_chunks: 0,
            stored_bytes: 0,
            deduplicated_bytes: 0,
            blob: None,
            blob_bytes: 0,
            warnings: Vec::new(),
        };
        let mut previous: Option<String> = None;
        loop {
            let entry = match tar.next_entry() {
                Ok(Some(e)) => e,
                Ok(None) => break,
                // Errors about a named entry name it already.
                Err(e) if e.downcast_ref::<EntryName>().is_some() => return Err(e.context(label)),
                Err(e) => {
                    let after = match &previous {
                        Some(p) => format!("after entry {p:?}"),
                        None => "at its first entry".to_string(),
                    };
                    return Err(e.context(format!("{label}: {after}")));
                }
            };
            let name = lossy(&entry.path);
            report.entries += 1;
            self.apply_entry(&mut tar, &entry, &mut report)
                .with_context(|| format!("{label}: entry {name:?}"))?;
            self.tick_read();
            previous = Some(name);
        }
        self.end_layer();
        // Read what follows the end-of-archive marker, then the rest of the compressed
        // input: the decompressor checks its trailer, a digest-checking source its digest.
        let (buffered, tar_bytes, trailing_data) = tar
            .finish()
            .map_err(anyhow::Error::new)
            .with_context(|| format!("{label}: reading past the end of the archive"))?;
        if trailing_data {
            self.warn(
                "data after the end-of-archive marker is ignored (concatenated archives are not read)"
                    .to_string(),
            );
        }
        report.warnings = std::mem::take(&mut self.warnings);
        if self.dropped_warnings > 0 {
            report
                .warnings
                .push(format!("… and {} more warnings", self.dropped_warnings));
            self.dropped_warnings = 0;
        }
        for w in &report.warnings {
            tracing::warn!("{label}: {w}");
        }
        buffered
            .into_inner()
            .drain_input()
            .with_context(|| format!("{label}: reading past the end of the archive"))?;
        report.tar_bytes = tar_bytes;
        report.input_bytes = input_count.get();
        self.batch.flush();
        self.progress.emit(Event::LayerDone {
            index,
            done: report.input_bytes,
        });
        let seq = self.next_seq();
        if self.done.send(Msg::EndLayer { seq }).is_err() {
            return Err(self.closed());
        }
        Ok(report)
    }

    /// Reports how far the layer's source has been read (in steps).
    #[inline]
    fn tick_read(&mut self) {
        self.read_ticker
            .tick(&self.progress, self.source_read.get());
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq - 1
    }

    fn closed(&mut self) -> anyhow::Error {
        self.pipeline_closed = true;
        anyhow!("the chunk pipeline stopped")
    }

    /// Prunes the layer's opaque directories and forgets its bookkeeping.
    fn end_layer(&mut self) {
        let mut opaque: Vec<NodeId> = self.opaque.drain().collect();
        opaque.sort_unstable();
        let mut stack = opaque;
        while let Some(dir) = stack.pop() {
            let Some(entries) = self.tree.entries(dir) else {
                continue;
            };
            let names: Vec<(Vec<u8>, NodeId)> =
                entries.iter().map(|(n, &id)| (n.clone(), id)).collect();
            for (name, child) in names {
                if !self.is_touched(dir, &name) {
                    self.tree
                        .entries_mut(dir)
                        .expect("a directory")
                        .remove(&name);
                } else if self.is_dir(child) {
                    stack.push(child);
                }
            }
        }
        self.touched.clear();
    }

    /// Walks to the directory holding `comps`'s last component, creating implied parents.
    fn make_parents(&mut self, comps: &[&[u8]]) -> Result<NodeId> {
        let mut cur = Tree::ROOT;
        let mut in_opaque = self.opaque.contains(&cur);
        for (i, &comp) in comps.iter().enumerate() {
            let existing = self
                .tree
                .entries(cur)
                .expect("walking directories")
                .get(comp)
                .copied();
            let hidden = in_opaque && !self.is_touched(cur, comp);
            let next = match existing {
                Some(id) if self.is_dir(id) => id,
                Some(id) if !hidden => bail!(
                    "its parent {:?} is a {} in the merged tree, not a directory (lode never follows symlinks)",
                    lossy(&comps[..=i].join(&b'/')),
                    kind_name(&self.tree.node(id).content)
                ),
                _ => {
                    let id = self.new_dir(implied_dir_meta());
                    self.tree.link(cur, comp.to_vec(), id);
                    id
                }
            };
            self.touch(cur, comp);
            in_opaque |= self.opaque.contains(&next);
            cur = next;
        }
        Ok(cur)
    }

    /// The node at `comps` in the merged tree as this layer sees it so far (entries hidden by a
    /// pending opaque directory are not there).
    fn lookup(&self, comps: &[&[u8]]) -> Option<NodeId> {
        let mut cur = Tree::ROOT;
        let mut in_opaque = self.opaque.contains(&cur);
        for &comp in comps {
            let id = *self.tree.entries(cur)?.get(comp)?;
            if in_opaque && !self.is_touched(cur, comp) {
                return None;
            }
            in_opaque |= self.opaque.contains(&id);
            cur = id;
        }
        Some(cur)
    }

    fn apply_entry<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        e: &Entry,
        report: &mut LayerReport,
    ) -> Result<()> {
        let comps = normalize(&e.path)?;
        let Some((&name, parents)) = comps.split_last() else {
            ensure!(
                e.kind == Kind::Directory,
                "the root of the image must be a directory, not a {}",
                e.kind.name()
            );
            let meta = self.metadata(e)?;
            self.tree.node_mut(Tree::ROOT).meta = meta;
            return Ok(());
        };
        if let Some(target) = name.strip_prefix(b".wh.") {
            report.whiteouts += 1;
            return self.whiteout(parents, target);
        }
        // Resolve a hard link's target before anything changes.
        let link_target = if e.kind == Kind::HardLink {
            let target = normalize(&e.link)
                .with_context(|| format!("hard link target {:?}", lossy(&e.link)))?;
            let node = self.lookup(&target).ok_or_else(|| {
                anyhow!(
                    "hard link target {:?} is not in this layer or a lower one (a hard link must point to an existing entry)",
                    lossy(&e.link)
                )
            })?;
            ensure!(
                !self.is_dir(node),
                "hard link target {:?} is a directory",
                lossy(&e.link)
            );
            Some(node)
        } else {
            None
        };
        let parent = self.make_parents(parents)?;
        let existing = self
            .tree
            .entries(parent)
            .expect("a directory")
            .get(name)
            .copied();
        let node = match e.kind {
            Kind::HardLink => link_target.expect("resolved above"),
            Kind::Directory => {
                let meta = self.metadata(e)?;
                match existing {
                    Some(id) if self.is_dir(id) => {
                        self.tree.node_mut(id).meta = meta;
                        id
                    }
                    _ => self.new_dir(meta),
                }
            }
            Kind::Symlink => {
                ensure!(!e.link.is_empty(), "symlink with an empty target");
                ensure!(!e.link.contains(&0), "symlink target contains a NUL byte");
                ensure!(
                    e.link.len() <= 4095,
                    "symlink target is {} bytes long (at most 4095 allowed)",
                    e.link.len()
                );
                let mut meta = self.metadata(e)?;
                // Symlink permissions mean nothing on Linux; they always read as 0777.
                meta.permissions = 0o777;
                self.tree.add(Node {
                    meta,
                    content: Content::Symlink(e.link.clone()),
                })
            }
            Kind::CharDevice | Kind::BlockDevice => {
                ensure!(
                    e.major <= 0xfff && e.minor <= 0xfffff,
                    "device number {}:{} cannot be stored in EROFS",
                    e.major,
                    e.minor
                );
                let (major, minor) = (e.major, e.minor);
                let content = if e.kind == Kind::CharDevice {
                    Content::CharDevice { major, minor }
                } else {
                    Content::BlockDevice { major, minor }
                };
                let meta = self.metadata(e)?;
                self.tree.add(Node { meta, content })
            }
            Kind::Fifo => {
                let meta = self.metadata(e)?;
                self.tree.add(Node {
                    meta,
                    content: Content::Fifo,
                })
            }
            Kind::Regular => {
                let meta = self.metadata(e)?;
                let node = self.tree.add(Node {
                    meta,
                    content: Content::File(FileData::Inline(Vec::new())),
                });
                report.files += 1;
                report.file_bytes += e.size;
                self.read_file(tar, e, node)?;
                node
            }
        };
        if existing != Some(node) {
            self.tree.link(parent, name.to_vec(), node);
        }
        self.touch(parent, name);
        Ok(())
    }

    fn whiteout(&mut self, parents: &[&[u8]], target: &[u8]) -> Result<()> {
        let dir = self.make_parents(parents)?;
        if target == b".wh..opq" {
            self.opaque.insert(dir);
            return Ok(());
        }
        if target.starts_with(b".wh.") {
            // Other `.wh..wh.*` names are aufs bookkeeping, not whiteouts.
            return Ok(());
        }
        ensure!(
            !target.is_empty() && target != b"." && target != b"..",
            "a whiteout must name an entry"
        );
        let Some(&id) = self.tree.entries(dir).expect("a directory").get(target) else {
            return Ok(());
        };
        if self.is_touched(dir, target) {
            // The entry is this layer's own: it stays, but what lower layers put in it goes.
            if self.is_dir(id) {
                self.opaque.insert(id);
            }
        } else {
            self.tree
                .entries_mut(dir)
                .expect("a directory")
                .remove(target);
        }
        Ok(())
    }

    fn warn(&mut self, w: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        } else {
            self.dropped_warnings += 1;
        }
    }

    fn metadata(&mut self, e: &Entry) -> Result<Metadata> {
        let uid =
            u32::try_from(e.uid).map_err(|_| anyhow!("uid {} does not fit in 32 bits", e.uid))?;
        let gid =
            u32::try_from(e.gid).map_err(|_| anyhow!("gid {} does not fit in 32 bits", e.gid))?;
        let mut xattrs = BTreeMap::new();
        for (name, value) in &e.xattrs {
            match lode_format::format::split_xattr_name(name) {
                Some((_, suffix)) => {
                    ensure!(
                        suffix.len() <= 255 && value.len() <= 65535,
                        "xattr {:?} is too large for EROFS (name {} bytes, value {} bytes)",
                        lossy(name),
                        name.len(),
                        value.len()
                    );
                    xattrs.insert(name.clone(), value.clone());
                }
                // Like containerd, skip what the target filesystem cannot hold.
                None => self.warn(format!(
                    "entry {:?}: xattr {:?} cannot be stored in EROFS; skipped",
                    lossy(&e.path),
                    lossy(name)
                )),
            }
        }
        Ok(Metadata {
            permissions: (e.mode & 0o7777) as u16,
            uid,
            gid,
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec,
            xattrs,
        })
    }

    /// Reads a regular file's data: inline in the tree if small, else cut into chunks that go
    /// to the workers (holes of a sparse map never leave this thread).
    fn read_file<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        e: &Entry,
        node: NodeId,
    ) -> Result<()> {
        let size = e.size;
        let whole = [(0, size)];
        let segs: &[(u64, u64)] = e.segments.as_deref().unwrap_or(&whole);
        self.stats.files += 1;
        self.stats.input_bytes += size;
        if size <= self.inline_max {
            let mut data = vec![0u8; size as usize];
            for &(off, len) in segs {
                tar.read_data(&mut data[off as usize..(off + len) as usize])?;
            }
            self.stats.inlined_files += (size > 0) as u64;
            self.tree.node_mut(node).content = Content::File(FileData::Inline(data));
            self.batch.add(1, size);
            return Ok(());
        }
        let cs = 1u64 << self.chunk_bits;
        let n = size.div_ceil(cs);
        let hot = !self.hot.is_empty()
            && normalize(&e.path).is_ok_and(|c| self.hot.contains(&c.join(&b'/')));
        ensure!(
            n <= MAX_CHUNKS_PER_FILE,
            "a file of {size} bytes has more than {MAX_CHUNKS_PER_FILE} chunks of {cs} bytes (use a larger --chunk-size)"
        );
        let mut chunks = Vec::with_capacity(n.min(1 << 16) as usize);
        // Position in the segment list: segment `si`, of which `done` bytes are read.
        let (mut si, mut done) = (0usize, 0u64);
        for c in 0..n {
            let start = c * cs;
            let end = (start + cs).min(size);
            self.batch.add(0, end - start);
            self.tick_read();
            while si < segs.len() && done == segs[si].1 {
                si += 1;
                done = 0;
            }
            if si == segs.len() || segs[si].0 + done >= end {
                chunks.push(ChunkAddr::HOLE);
                self.stats.hole_chunks += 1;
                continue;
            }
            let mut buf = match self.free.recv() {
                Ok(b) => b,
                Err(_) => return Err(self.closed()),
            };
            let len = (end - start) as usize;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            buf.truncate(len);
            let covered = segs[si].0 + done <= start && segs[si].0 + segs[si].1 >= end;
            if !covered {
                buf.fill(0);
            }
            while si < segs.len() {
                let (off, slen) = segs[si];
                let from = off + done;
                if from >= end {
                    break;
                }
                let to = (off + slen).min(end);
                tar.read_data(&mut buf[(from - start) as usize..(to - start) as usize])?;
                done += to - from;
                if done == slen {
                    si += 1;
                    done = 0;
                }
                if to == end {
                    break;
                }
            }
            chunks.push(ChunkAddr::HOLE);
            let seq = self.next_seq();
            let work = Work {
                seq,
                node,
                index: c as u32,
                buf,
                hot,
            };
            if self.work.send(work).is_err() {
                return Err(self.closed());
            }
        }
        self.tree.node_mut(node).content = Content::File(FileData::Chunked {
            size,
            chunk_bits: self.chunk_bits,
            chunks,
        });
        self.batch.add(1, 0);
        Ok(())
    }
}

fn kind_name(c: &Content) -> &'static str {
    match c {
        Content::Directory(_) => "directory",
        Content::File(_) => "regular file",
        Content::Symlink(_) => "symlink",
        Content::CharDevice { .. } => "character device",
        Content::BlockDevice { .. } => "block device",
        Content::Fifo => "fifo",
        Content::Socket => "socket",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize() {
        let n = |s: &[u8]| normalize(s).map(|v| v.iter().map(|c| lossy(c)).collect::<Vec<_>>());
        assert_eq!(n(b"/usr//bin/./ls").unwrap(), ["usr", "bin", "ls"]);
        assert_eq!(n(b"./").unwrap(), Vec::<String>::new());
        assert_eq!(n(b"a/b/../c").unwrap(), ["a", "c"]);
        assert!(n(b"../etc/passwd").is_err());
        assert!(n(b"a/../../b").is_err());
        assert!(n(b"/../x").is_err());
        assert!(n(b"a\0b").is_err());
        assert!(n(&[b'x'; 256]).is_err());
        assert!(n(&[b'x'; 255]).is_ok());
    }
}

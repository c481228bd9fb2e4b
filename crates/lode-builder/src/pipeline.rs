//! The data pipeline: worker threads read and hash file chunks in parallel; the calling
//! thread takes the results in a fixed order and stores them, so the blob layout does not
//! depend on thread timing.
//!
//! Memory is bounded by a pool of chunk buffers: a worker needs a free buffer before it
//! claims the next chunk, and the storing thread returns buffers as it consumes them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use lode_format::tree::{ChunkAddr, Content, FileData, Tree};

use crate::progress::{DataBatch, Progress};
use crate::store::{ChunkStore, Compressor, PreparedChunk};
use crate::walk::FileJob;

/// Total bytes of chunk buffers in flight (at least two chunks per worker).
const BUFFER_BUDGET: usize = 32 << 20;

pub struct PipelineOptions {
    pub chunk_bits: u8,
    pub inline_max: u64,
    pub threads: usize,
    pub progress: Progress,
}

impl PipelineOptions {
    /// Pieces a file is read in: inlined files are one piece whatever the chunk size.
    fn pieces(&self, job: &FileJob) -> u64 {
        if job.size <= self.inline_max {
            1
        } else {
            job.size.div_ceil(1 << self.chunk_bits)
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PipelineStats {
    pub files: u64,
    pub inlined_files: u64,
    /// Bytes of regular-file data (logical sizes).
    pub input_bytes: u64,
    /// Chunks that are holes (sparse regions, all-zero data).
    pub hole_chunks: u64,
}

/// How many chunk buffers a pipeline with `threads` workers keeps in flight: the
/// [`BUFFER_BUDGET`], but at least two per worker and two for the consumer.
pub(crate) fn buffer_count(chunk_size: usize, threads: usize) -> usize {
    (BUFFER_BUDGET / chunk_size).max(2 * threads + 2)
}

/// What a worker found in one chunk.
enum ChunkData {
    Hole,
    Data { prepared: PreparedChunk, len: usize },
    Inline { len: usize },
}

struct Done {
    seq: u64,
    job: usize,
    data: ChunkData,
    buf: Vec<u8>,
}

/// Which chunk to read next, in global order.
struct Cursor {
    job: usize,
    chunk: u64,
    seq: u64,
}

/// Reads every job's data into `tree`, storing chunks in `store`.
pub fn run(
    tree: &mut Tree,
    jobs: &[FileJob],
    store: &mut ChunkStore,
    opts: &PipelineOptions,
) -> Result<PipelineStats> {
    let chunk_size = 1usize << opts.chunk_bits;
    let threads = opts.threads.max(1);
    let nbufs = buffer_count(chunk_size, threads);
    let (free_tx, free_rx) = bounded::<Vec<u8>>(nbufs);
    for _ in 0..nbufs {
        free_tx.send(Vec::new()).expect("pool has room");
    }
    let (done_tx, done_rx) = bounded::<Result<Done>>(nbufs);
    let cursor = Mutex::new(Cursor {
        job: 0,
        chunk: 0,
        seq: 0,
    });
    let pieces = |j: &FileJob| opts.pieces(j);
    let mut stats = PipelineStats::default();
    let compression = store.compression();

    std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            let free_rx = free_rx.clone();
            let done_tx = done_tx.clone();
            let cursor = &cursor;
            let compressor = Compressor::new(compression)?;
            s.spawn(move || worker(jobs, cursor, free_rx, done_tx, opts, compressor));
        }
        drop(done_tx);

        let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next_seq = 0u64;
        let mut chunk_lists: Vec<Vec<ChunkAddr>> = Vec::new();
        let mut current_job = usize::MAX;
        // Progress: bytes of the current job already reported.
        let mut batch = DataBatch::new(opts.progress.clone());
        let mut job_reported = 0u64;
        let result = (|| -> Result<()> {
            for msg in done_rx.iter() {
                let done = msg?;
                pending.insert(done.seq, done);
                while let Some(done) = pending.remove(&next_seq) {
                    next_seq += 1;
                    let job = &jobs[done.job];
                    if done.job != current_job {
                        current_job = done.job;
                        stats.files += 1;
                        stats.input_bytes += job.size;
                        chunk_lists.clear();
                        chunk_lists.push(Vec::with_capacity(pieces(job) as usize));
                        job_reported = 0;
                    }
                    let list = chunk_lists.last_mut().expect("a list per job");
                    match done.data {
                        ChunkData::Inline { len } => {
                            stats.inlined_files += (len > 0) as u64;
                            tree.node_mut(job.node).content =
                                Content::File(FileData::Inline(done.buf[..len].to_vec()));
                        }
                        ChunkData::Hole => {
                            stats.hole_chunks += 1;
                            list.push(ChunkAddr::HOLE);
                        }
                        ChunkData::Data { ref prepared, len } => {
                            list.push(store.put(prepared, &done.buf[..len])?);
                        }
                    }
                    let inline = matches!(done.data, ChunkData::Inline { .. });
                    let reached = if inline {
                        job.size
                    } else {
                        (list.len() as u64) << opts.chunk_bits
                    }
                    .min(job.size);
                    let finished = inline || list.len() as u64 == pieces(job);
                    batch.add(finished as u64, reached - job_reported);
                    job_reported = reached;
                    if !inline && finished {
                        tree.node_mut(job.node).content = Content::File(FileData::Chunked {
                            size: job.size,
                            chunk_bits: opts.chunk_bits,
                            chunks: std::mem::take(list),
                        });
                    }
                    // The pool has room for every buffer; a closed pool means workers quit.
                    let _ = free_tx.send(done.buf);
                }
            }
            Ok(())
        })();
        // Stop the workers whatever happened: they exit when the pool is empty and closed.
        drop(free_tx);
        drop(done_rx);
        while free_rx.try_recv().is_ok() {}
        result
    })?;
    Ok(stats)
}

fn worker(
    jobs: &[FileJob],
    cursor: &Mutex<Cursor>,
    free_rx: Receiver<Vec<u8>>,
    done_tx: Sender<Result<Done>>,
    opts: &PipelineOptions,
    mut compressor: Compressor,
) {
    let chunk_size = 1usize << opts.chunk_bits;
    let mut open: Option<(usize, File)> = None;
    while let Ok(mut buf) = free_rx.recv() {
        let (seq, job_idx, chunk) = {
            let mut c = cursor.lock().expect("cursor lock");
            while c.job < jobs.len() && c.chunk >= opts.pieces(&jobs[c.job]) {
                c.job += 1;
                c.chunk = 0;
            }
            if c.job == jobs.len() {
                return;
            }
            let claimed = (c.seq, c.job, c.chunk);
            c.seq += 1;
            c.chunk += 1;
            claimed
        };
        let job = &jobs[job_idx];
        let result = read_chunk(job, job_idx, chunk, &mut open, &mut buf, chunk_size, opts)
            .and_then(|data| match data {
                ChunkData::Data { len, .. } => Ok(ChunkData::Data {
                    prepared: compressor.prepare(&buf[..len])?,
                    len,
                }),
                other => Ok(other),
            })
            .map(|data| Done {
                seq,
                job: job_idx,
                data,
                buf,
            });
        let failed = result.is_err();
        if done_tx.send(result).is_err() || failed {
            return;
        }
    }
}

fn read_chunk(
    job: &FileJob,
    job_idx: usize,
    chunk: u64,
    open: &mut Option<(usize, File)>,
    buf: &mut Vec<u8>,
    chunk_size: usize,
    opts: &PipelineOptions,
) -> Result<ChunkData> {
    let inline = job.size <= opts.inline_max;
    let start = chunk * chunk_size as u64;
    let len = if inline {
        job.size as usize
    } else {
        (job.size - start).min(chunk_size as u64) as usize
    };
    if len == 0 {
        return Ok(ChunkData::Inline { len: 0 });
    }
    if open.as_ref().map(|(i, _)| *i) != Some(job_idx) {
        let f = File::open(&job.path).with_context(|| format!("opening {}", job.path.display()))?;
        *open = Some((job_idx, f));
    }
    let file = &open.as_ref().expect("opened above").1;
    if job.sparse && !inline {
        match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(start)) {
            Ok(data) if data >= start + len as u64 => return Ok(ChunkData::Hole),
            Err(rustix::io::Errno::NXIO) => return Ok(ChunkData::Hole),
            _ => {}
        }
    }
    buf.resize(len, 0);
    let mut filled = 0;
    while filled < len {
        let n = file
            .read_at(&mut buf[filled..len], start + filled as u64)
            .with_context(|| format!("reading {}", job.path.display()))?;
        if n == 0 {
            bail!(
                "{} shrank while being read (expected {} bytes)",
                job.path.display(),
                job.size
            );
        }
        filled += n;
    }
    if inline {
        return Ok(ChunkData::Inline { len });
    }
    if is_zero(&buf[..len]) {
        return Ok(ChunkData::Hole);
    }
    Ok(ChunkData::Data {
        prepared: PreparedChunk {
            digest: [0; 32],
            payload: None,
        },
        len,
    })
}

/// Whether every byte is zero (such a chunk is stored as a hole).
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(16);
    let tail = words.remainder();
    words
        .into_iter()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && tail.iter().all(|&b| b == 0)
}

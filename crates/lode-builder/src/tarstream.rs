//! Reading one layer: decompression chosen by magic bytes, and a streaming tar reader.
//!
//! Headers are decoded with the `tar` crate's [`tar::Header`] API (ustar/GNU/v7 fields,
//! octal and base-256 numbers, ustar prefixes, GNU sparse headers). The stream itself is
//! walked here rather than with `tar::Archive`, because the layer importer needs what that
//! iterator does not give:
//! - PAX records are split by their length prefix: `tar::PaxExtensions` splits on `\n`, so
//!   a binary xattr value containing a newline byte (e.g. a `security.capability` with
//!   `cap_dac_override,cap_fowner`) is rejected as malformed there;
//! - sparse files (old GNU `S` entries and PAX sparse 0.0, 0.1 and 1.0) come out as a map of
//!   data segments, so holes are never read as zero bytes (the crate expands GNU holes into
//!   zero reads and does not know the PAX formats);
//! - a stream that ends without the end-of-archive blocks is reported as truncated.
//!
//! Nothing here allocates more than [`MAX_META`] for metadata an entry claims to have.

use std::cell::Cell;
use std::io::{self, BufReader, Cursor, Read};
use std::rc::Rc;

use anyhow::{anyhow, bail, ensure, Context, Result};

pub const BLOCK: u64 = 512;
/// Largest PAX header, GNU long name or sparse map accepted (hostile input cannot make the
/// importer buffer more than this per entry).
pub const MAX_META: u64 = 16 << 20;
/// Most data segments a sparse file may have.
pub const MAX_SPARSE_SEGMENTS: usize = 1 << 20;

/// How a layer's bytes are compressed, from their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerFormat {
    Tar,
    Gzip,
    Zstd,
}

impl LayerFormat {
    pub fn detect(magic: &[u8]) -> LayerFormat {
        if magic.starts_with(&[0x1f, 0x8b]) {
            LayerFormat::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            LayerFormat::Zstd
        } else {
            LayerFormat::Tar
        }
    }
}

/// Whether a file starting with `head` (its first 512 bytes, or all of it if shorter) can be
/// a layer: gzip or zstd magic, or a tar header with a valid checksum (or the zero block of an
/// empty archive).
pub fn looks_like_layer(head: &[u8]) -> bool {
    if LayerFormat::detect(head) != LayerFormat::Tar {
        return true;
    }
    let Ok(block) = <&[u8; 512]>::try_from(head) else {
        return false;
    };
    block.iter().all(|&b| b == 0) || check_checksum(tar::Header::from_byte_slice(block), 0).is_ok()
}

/// Counts the bytes read through it.
pub struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R> Counting<R> {
    pub fn new(inner: R) -> (Self, Rc<Cell<u64>>) {
        let count = Rc::new(Cell::new(0));
        (
            Counting {
                inner,
                count: count.clone(),
            },
            count,
        )
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

type Raw = BufReader<io::Chain<Cursor<Vec<u8>>, Counting<Box<dyn Read + Send>>>>;

/// The decompressed bytes of a layer.
pub enum Decoded {
    Tar(Raw),
    Gzip(Box<flate2::bufread::MultiGzDecoder<Raw>>),
    Zstd(zstd::stream::read::Decoder<'static, Raw>),
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Tar(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
            Decoded::Zstd(r) => r.read(buf),
        }
    }
}

impl Decoded {
    /// Opens a layer: sniffs the compression and returns the decompressing reader, the
    /// format, and a counter of the compressed bytes read so far.
    pub fn open(raw: Box<dyn Read + Send>) -> io::Result<(Decoded, LayerFormat, Rc<Cell<u64>>)> {
        let (mut counting, count) = Counting::new(raw);
        let mut magic = Vec::with_capacity(4);
        while magic.len() < 4 {
            let mut b = [0u8; 4];
            let n = counting.read(&mut b[..4 - magic.len()])?;
            if n == 0 {
                break;
            }
            magic.extend_from_slice(&b[..n]);
        }
        let format = LayerFormat::detect(&magic);
        let raw: Raw = BufReader::with_capacity(256 << 10, Cursor::new(magic).chain(counting));
        let decoded = match format {
            LayerFormat::Tar => Decoded::Tar(raw),
            LayerFormat::Gzip => Decoded::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(raw))),
            LayerFormat::Zstd => Decoded::Zstd(zstd::stream::read::Decoder::with_buffer(raw)?),
        };
        Ok((decoded, format, count))
    }

    /// Reads whatever compressed input is left (a digest-checking source checks at its end).
    pub fn drain_input(self) -> io::Result<u64> {
        let mut raw = match self {
            Decoded::Tar(r) => r,
            Decoded::Gzip(r) => r.into_inner(),
            Decoded::Zstd(r) => r.finish(),
        };
        io::copy(&mut raw, &mut io::sink())
    }
}

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Directory,
    Symlink,
    HardLink,
    CharDevice,
    BlockDevice,
    Fifo,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Regular => "regular file",
            Kind::Directory => "directory",
            Kind::Symlink => "symlink",
            Kind::HardLink => "hard link",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
            Kind::Fifo => "fifo",
        }
    }
}

/// One member of the archive with its extension headers applied.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Raw name bytes (PAX `path` / `GNU.sparse.name`, GNU long name, or the header's).
    pub path: Vec<u8>,
    /// Link target (symlinks and hard links).
    pub link: Vec<u8>,
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub major: u32,
    pub minor: u32,
    /// From PAX `SCHILY.xattr.NAME` records, in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Logical file size (the real size of a sparse file).
    pub size: u64,
    /// Data segments `(offset, length)` in file order for a sparse file; `None` means the
    /// data is the whole file.
    pub segments: Option<Vec<(u64, u64)>>,
    /// Offset of the entry's first header in the uncompressed stream.
    pub offset: u64,
}

/// Walks a tar stream entry by entry; the data of the current entry is read with
/// [`TarReader::read_data`] (what is not read is skipped by the next [`TarReader::next_entry`]).
pub struct TarReader<R> {
    inner: R,
    pos: u64,
    data_left: u64,
    pad: u64,
    finished: bool,
}

fn eof_context(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        anyhow!("unexpected end of the layer data (truncated layer?)")
    } else {
        anyhow::Error::new(e)
    }
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            pos: 0,
            data_left: 0,
            pad: 0,
            finished: false,
        }
    }

    /// Uncompressed bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Reads and discards whatever follows the end-of-archive marker (normally zero padding
    /// to a record). Returns the reader, the stream's length and whether anything but zeros
    /// followed the marker (e.g. a second archive appended to the first, which is ignored).
    pub fn finish(mut self) -> io::Result<(R, u64, bool)> {
        let mut buf = vec![0u8; 64 << 10];
        let mut trailing_data = false;
        loop {
            let n = match self.inner.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            trailing_data |= buf[..n].iter().any(|&b| b != 0);
            self.pos += n as u64;
        }
        Ok((self.inner, self.pos, trailing_data))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(eof_context)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Fills a header block; `false` at a clean end of stream.
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<bool> {
        let mut filled = 0;
        while filled < block.len() {
            let n = match self.inner.read(&mut block[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(eof_context(e)),
            };
            if n == 0 {
                if filled == 0 {
                    return Ok(false);
                }
                bail!(
                    "unexpected end of the layer data inside a header at byte {} (truncated layer?)",
                    self.pos
                );
            }
            filled += n;
            self.pos += n as u64;
        }
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Reads a whole metadata member (PAX header, long name) of `size` bytes plus padding.
    fn read_meta(&mut self, size: u64, what: &str) -> Result<Vec<u8>> {
        ensure!(
            size <= MAX_META,
            "{what} of {size} bytes is larger than the {MAX_META} bytes accepted"
        );
        let mut v = vec![0u8; size as usize];
        self.read_exact(&mut v)?;
        self.skip(padding(size))?;
        Ok(v)
    }

    /// Reads exactly `buf.len()` bytes of the current entry's data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<()> {
        ensure!(
            buf.len() as u64 <= self.data_left,
            "entry data is shorter than its sparse map says"
        );
        self.read_exact(buf)?;
        self.data_left -= buf.len() as u64;
        Ok(())
    }

    /// Bytes of the current entry's data not read yet.
    pub fn data_left(&self) -> u64 {
        self.data_left
    }

    /// The next entry, `None` after the end-of-archive marker.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.finished {
            return Ok(None);
        }
        self.skip(self.data_left + self.pad)?;
        self.data_left = 0;
        self.pad = 0;

        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut extensions = 0usize;
        let mut header = tar::Header::new_old();
        let offset = loop {
            let offset = self.pos;
            if !self.read_block(header.as_mut_bytes())? {
                if extensions > 0 {
                    bail!("the layer ends after an extension header, without its entry (truncated layer?)");
                }
                bail!(
                    "the layer ends at byte {} without the end-of-archive marker (truncated layer?)",
                    self.pos
                );
            }
            if header.as_bytes().iter().all(|&b| b == 0) {
                ensure!(
                    extensions == 0,
                    "an extension header at byte {offset} is followed by the end of the archive"
                );
                self.finished = true;
                return Ok(None);
            }
            check_checksum(&header, offset)?;
            let size = header
                .entry_size()
                .map_err(|e| anyhow!("header at byte {offset}: bad size field: {e}"))?;
            let flag = header.as_old().linkflag[0];
            match flag {
                b'x' => {
                    let data = self.read_meta(size, "PAX header")?;
                    pax.extend(
                        parse_pax(&data).with_context(|| format!("PAX header at byte {offset}"))?,
                    );
                }
                b'g' => {
                    // Global PAX headers (e.g. `git archive`'s comment) are ignored.
                    self.skip(size + padding(size))?;
                    continue;
                }
                b'L' => {
                    let mut v = self.read_meta(size, "GNU long name")?;
                    strip_nuls(&mut v);
                    long_name = Some(v);
                }
                b'K' => {
                    let mut v = self.read_meta(size, "GNU long link name")?;
                    strip_nuls(&mut v);
                    long_link = Some(v);
                }
                b'V' => {
                    // A GNU volume label is not a file.
                    self.skip(size + padding(size))?;
                    continue;
                }
                _ => break offset,
            }
            extensions += 1;
        };
        let path = entry_path(&header, &pax, long_name);
        self.entry_from(header, offset, &pax, path.clone(), long_link)
            .map(Some)
            .map_err(|e| e.context(EntryName(path)))
    }

    fn entry_from(
        &mut self,
        header: tar::Header,
        offset: u64,
        pax: &[(Vec<u8>, Vec<u8>)],
        mut path: Vec<u8>,
        long_link: Option<Vec<u8>>,
    ) -> Result<Entry> {
        let get = |key: &[u8]| pax_get(pax, key);
        let link = get(b"linkpath")
            .map(|p| p.to_vec())
            .or(long_link)
            .or_else(|| header.link_name_bytes().map(|l| l.into_owned()))
            .unwrap_or_default();
        let flag = header.as_old().linkflag[0];
        let kind = match flag {
            b'0' | b'7' | b'S' => Kind::Regular,
            // Old (pre-POSIX) archives mark directories with a trailing slash.
            0 if path.last() == Some(&b'/') => Kind::Directory,
            0 => Kind::Regular,
            b'1' => Kind::HardLink,
            b'2' => Kind::Symlink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'5' | b'D' => Kind::Directory,
            b'6' => Kind::Fifo,
            other => bail!("unsupported tar entry type {:?}", other as char),
        };
        if path.is_empty() {
            path = b".".to_vec();
        }
        let mode = header.mode().map_err(|e| anyhow!("bad mode field: {e}"))? & 0o7777;
        let uid = match get(b"uid") {
            Some(v) => parse_decimal(v)
                .ok_or_else(|| anyhow!("bad PAX uid {:?}", String::from_utf8_lossy(v)))?,
            None => header.uid().map_err(|e| anyhow!("bad uid field: {e}"))?,
        };
        let gid = match get(b"gid") {
            Some(v) => parse_decimal(v)
                .ok_or_else(|| anyhow!("bad PAX gid {:?}", String::from_utf8_lossy(v)))?,
            None => header.gid().map_err(|e| anyhow!("bad gid field: {e}"))?,
        };
        let (mtime, mtime_nsec) = match get(b"mtime") {
            Some(v) => parse_pax_time(v)
                .ok_or_else(|| anyhow!("bad PAX mtime {:?}", String::from_utf8_lossy(v)))?,
            None => (header_mtime(&header.as_old().mtime)?, 0),
        };
        let (major, minor) = if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            (
                header
                    .device_major()
                    .map_err(|e| anyhow!("bad device major field: {e}"))?
                    .unwrap_or(0),
                header
                    .device_minor()
                    .map_err(|e| anyhow!("bad device minor field: {e}"))?
                    .unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        let xattrs = pax
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(b"SCHILY.xattr.")
                    .map(|name| (decode_xattr_keyword(name), v.clone()))
            })
            .collect();
        let data_size = match get(b"size") {
            Some(v) => parse_decimal(v)
                .ok_or_else(|| anyhow!("bad PAX size {:?}", String::from_utf8_lossy(v)))?,
            None => header
                .entry_size()
                .map_err(|e| anyhow!("bad size field: {e}"))?,
        };

        let mut size = data_size;
        let mut segments = None;
        if flag == b'S' {
            let (real, segs) = self.gnu_sparse_map(&header)?;
            size = real;
            segments = Some(segs);
        }
        self.data_left = data_size;
        self.pad = padding(data_size);
        let is_pax_sparse = pax.iter().any(|(k, _)| k.starts_with(b"GNU.sparse."));
        if is_pax_sparse && kind == Kind::Regular && flag != b'S' {
            let (real, segs) = self.pax_sparse_map(pax)?;
            size = real;
            segments = Some(segs);
        }
        if kind != Kind::Regular {
            size = 0;
        }
        if let Some(segs) = &segments {
            check_segments(segs, size, self.data_left)?;
        }
        Ok(Entry {
            path,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            major,
            minor,
            xattrs,
            size,
            segments,
            offset,
        })
    }

    /// The sparse map of an old GNU `S` entry: four slots in the header, then extension
    /// blocks while `isextended` is set.
    fn gnu_sparse_map(&mut self, header: &tar::Header) -> Result<(u64, Vec<(u64, u64)>)> {
        let gnu = header
            .as_gnu()
            .context("sparse entry type 'S' without a GNU header")?;
        let real = gnu
            .real_size()
            .map_err(|e| anyhow!("bad sparse real size: {e}"))?;
        let mut segs = Vec::new();
        let mut add = |s: &tar::GnuSparseHeader| -> Result<()> {
            if s.is_empty() {
                return Ok(());
            }
            let off = s.offset().map_err(|e| anyhow!("bad sparse map: {e}"))?;
            let len = s.length().map_err(|e| anyhow!("bad sparse map: {e}"))?;
            ensure!(
                segs.len() < MAX_SPARSE_SEGMENTS,
                "sparse map has more than {MAX_SPARSE_SEGMENTS} segments"
            );
            segs.push((off, len));
            Ok(())
        };
        for s in &gnu.sparse {
            add(s)?;
        }
        let mut extended = gnu.is_extended();
        while extended {
            let mut ext = tar::GnuExtSparseHeader::new();
            ensure!(
                self.read_block(ext.as_mut_bytes())?,
                "unexpected end of the layer data in a sparse map (truncated layer?)"
            );
            for s in ext.sparse() {
                add(s)?;
            }
            extended = ext.is_extended();
        }
        Ok((real, segs))
    }

    /// The sparse map of a PAX sparse file: 0.0 (`GNU.sparse.offset`/`numbytes` pairs),
    /// 0.1 (`GNU.sparse.map`) or 1.0 (map at the start of the data).
    fn pax_sparse_map(&mut self, pax: &[(Vec<u8>, Vec<u8>)]) -> Result<(u64, Vec<(u64, u64)>)> {
        let get = |key: &[u8]| pax_get(pax, key);
        let num = |key: &str| -> Result<Option<u64>> {
            get(key.as_bytes())
                .map(|v| {
                    parse_decimal(v)
                        .ok_or_else(|| anyhow!("bad PAX {key} {:?}", String::from_utf8_lossy(v)))
                })
                .transpose()
        };
        let major = num("GNU.sparse.major")?;
        if major == Some(1) {
            let real = num("GNU.sparse.realsize")?
                .context("PAX sparse 1.0 entry without GNU.sparse.realsize")?;
            let segs = self.sparse_map_1_0()?;
            return Ok((real, segs));
        }
        ensure!(
            major.is_none_or(|m| m == 0),
            "unsupported PAX sparse format version {}",
            major.unwrap_or(0)
        );
        let real = num("GNU.sparse.size")?
            .or(num("GNU.sparse.realsize")?)
            .context("PAX sparse entry without GNU.sparse.size")?;
        let mut values = Vec::new();
        if get(b"GNU.sparse.map").is_none() && get(b"GNU.sparse.offset").is_some() {
            // 0.0: repeated offset/numbytes records, in order.
            for (k, v) in pax {
                let key = match k.as_slice() {
                    b"GNU.sparse.offset" => "GNU.sparse.offset",
                    b"GNU.sparse.numbytes" => "GNU.sparse.numbytes",
                    _ => continue,
                };
                ensure!(
                    (key == "GNU.sparse.offset") == (values.len() % 2 == 0),
                    "GNU.sparse.offset and GNU.sparse.numbytes records do not alternate"
                );
                values
                    .push(parse_decimal(v).ok_or_else(|| {
                        anyhow!("bad PAX {key} {:?}", String::from_utf8_lossy(v))
                    })?);
                ensure!(
                    values.len() <= 2 * MAX_SPARSE_SEGMENTS,
                    "sparse map has more than {MAX_SPARSE_SEGMENTS} segments"
                );
            }
        } else if let Some(map) = get(b"GNU.sparse.map") {
            // 0.1: "offset,size,offset,size,…"
            for v in map.split(|&b| b == b',') {
                values.push(parse_decimal(v).ok_or_else(|| {
                    anyhow!("bad GNU.sparse.map value {:?}", String::from_utf8_lossy(v))
                })?);
                ensure!(
                    values.len() <= 2 * MAX_SPARSE_SEGMENTS,
                    "sparse map has more than {MAX_SPARSE_SEGMENTS} segments"
                );
            }
        } else {
            bail!("PAX sparse entry without a sparse map");
        }
        ensure!(
            values.len() % 2 == 0,
            "GNU.sparse.map has an odd count of numbers"
        );
        if let Some(n) = num("GNU.sparse.numblocks")? {
            ensure!(
                n == values.len() as u64 / 2,
                "GNU.sparse.numblocks is {n} but the map has {} blocks",
                values.len() / 2
            );
        }
        Ok((real, values.chunks(2).map(|p| (p[0], p[1])).collect()))
    }

    /// PAX sparse 1.0: decimal lines at the start of the data (count, then offset/size
    /// pairs), padded to a block.
    fn sparse_map_1_0(&mut self) -> Result<Vec<(u64, u64)>> {
        let start_left = self.data_left;
        let read_number = |this: &mut Self| -> Result<u64> {
            let mut digits = Vec::new();
            loop {
                let mut b = [0u8; 1];
                ensure!(
                    this.data_left > 0,
                    "PAX sparse 1.0 map runs past the entry data"
                );
                this.read_data(&mut b)?;
                if b[0] == b'\n' {
                    break;
                }
                ensure!(
                    b[0].is_ascii_digit() && digits.len() < 20,
                    "bad number in the PAX sparse 1.0 map"
                );
                digits.push(b[0]);
            }
            parse_decimal(&digits).context("bad number in the PAX sparse 1.0 map")
        };
        let count = read_number(self)?;
        ensure!(
            count <= MAX_SPARSE_SEGMENTS as u64,
            "sparse map has {count} segments, more than {MAX_SPARSE_SEGMENTS}"
        );
        let mut segs = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let off = read_number(self)?;
            let len = read_number(self)?;
            segs.push((off, len));
        }
        let used = start_left - self.data_left;
        let pad = padding(used).min(self.data_left);
        let mut skip = vec![0u8; pad as usize];
        self.read_data(&mut skip)?;
        Ok(segs)
    }
}

/// The value of PAX key `key`: the last record wins, an empty value removes the key (POSIX).
fn pax_get<'p>(pax: &'p [(Vec<u8>, Vec<u8>)], key: &[u8]) -> Option<&'p [u8]> {
    pax.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
        .filter(|v| !v.is_empty())
}

/// An entry's name: `GNU.sparse.name`, PAX `path`, a GNU long name, or the header's.
fn entry_path(
    header: &tar::Header,
    pax: &[(Vec<u8>, Vec<u8>)],
    long_name: Option<Vec<u8>>,
) -> Vec<u8> {
    pax_get(pax, b"GNU.sparse.name")
        .or(pax_get(pax, b"path"))
        .map(|p| p.to_vec())
        .or(long_name)
        .unwrap_or_else(|| header.path_bytes().into_owned())
}

/// Context of an error about a named entry (so callers need not name it again).
#[derive(Debug)]
pub struct EntryName(pub Vec<u8>);

impl std::fmt::Display for EntryName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry {:?}", String::from_utf8_lossy(&self.0))
    }
}

/// Data segments must be in order, inside the file, and account for all stored data.
fn check_segments(segs: &[(u64, u64)], size: u64, stored: u64) -> Result<()> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in segs {
        let seg_end = off
            .checked_add(len)
            .context("sparse map segment overflows")?;
        ensure!(
            off >= end || len == 0,
            "sparse map segments overlap or are out of order (segment at {off})"
        );
        ensure!(
            seg_end <= size,
            "sparse map segment {off}+{len} ends past the file size {size}"
        );
        if len > 0 {
            end = seg_end;
        }
        total += len;
    }
    ensure!(
        total == stored,
        "sparse map holds {total} bytes of data but the entry stores {stored}"
    );
    Ok(())
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn strip_nuls(v: &mut Vec<u8>) {
    while v.last() == Some(&0) {
        v.pop();
    }
}

fn check_checksum(header: &tar::Header, offset: u64) -> Result<()> {
    let bytes = header.as_bytes();
    let stored = header
        .cksum()
        .map_err(|_| anyhow!("not a tar header at byte {offset} (bad checksum field)"))?;
    let (mut unsigned, mut signed) = (0u32, 0i32);
    for (i, &b) in bytes.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as u32;
        signed += b as i8 as i32;
    }
    ensure!(
        stored == unsigned || stored as i32 == signed,
        "not a tar header at byte {offset} (checksum mismatch)"
    );
    Ok(())
}

/// A decimal number made of ASCII digits only (no sign, no spaces), fitting in u64.
pub fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A PAX time: `[-]SECONDS[.FRACTION]`; the fraction is kept to nanoseconds (truncated).
pub fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let (neg, v) = match v.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &v[v.len()..]),
    };
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = i64::try_from(parse_decimal(int)?).ok()?;
    let mut nsec = 0u32;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map_or(0, |d| (d - b'0') as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    if nsec == 0 {
        Some((secs.checked_neg()?, 0))
    } else {
        Some((secs.checked_neg()?.checked_sub(1)?, 1_000_000_000 - nsec))
    }
}

/// The 12-byte header mtime: octal, or base-256 (GNU) which may be negative.
fn header_mtime(field: &[u8; 12]) -> Result<i64> {
    match field[0] {
        0x80 | 0xff => {
            let fill = if field[0] == 0xff { 0xff } else { 0 };
            ensure!(
                field[1..4].iter().all(|&b| b == fill) && (field[4] & 0x80) == (fill & 0x80),
                "mtime field out of range"
            );
            Ok(i64::from_be_bytes(
                field[4..12].try_into().expect("8 bytes"),
            ))
        }
        b if b & 0x80 != 0 => bail!("mtime field out of range"),
        _ => {
            let end = field.iter().position(|&b| b == 0).unwrap_or(12);
            let text = std::str::from_utf8(&field[..end])
                .map_err(|_| anyhow!("bad mtime field"))?
                .trim();
            let v = if text.is_empty() {
                0
            } else {
                u64::from_str_radix(text, 8).map_err(|_| anyhow!("bad mtime field {text:?}"))?
            };
            i64::try_from(v).map_err(|_| anyhow!("mtime field out of range"))
        }
    }
}

/// PAX records: `LEN KEY=VALUE\n`, where LEN counts the whole record; values are binary.
pub fn parse_pax(data: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .context("malformed PAX record (no length)")?;
        let len = parse_decimal(&rest[..sp]).context("malformed PAX record length")? as usize;
        ensure!(
            len > sp + 1 && len <= rest.len(),
            "malformed PAX record (length {len} out of range)"
        );
        let record = &rest[sp + 1..len];
        let record = record
            .strip_suffix(b"\n")
            .context("malformed PAX record (no newline at its end)")?;
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .context("malformed PAX record (no '=')")?;
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// GNU tar writes `%` and `=` in xattr names as `%25` and `%3D` (a PAX keyword cannot hold
/// `=`); undo exactly that, as GNU tar's own reader does.
fn decode_xattr_keyword(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        if name[i..].starts_with(b"%25") {
            out.push(b'%');
            i += 3;
        } else if name[i..].starts_with(b"%3D") {
            out.push(b'=');
            i += 3;
        } else {
            out.push(name[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1700000000, 0)));
        assert_eq!(
            parse_pax_time(b"1700000000.123456789123"),
            Some((1700000000, 123456789))
        );
        assert_eq!(parse_pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"-3"), Some((-3, 0)));
        assert_eq!(parse_pax_time(b"0."), Some((0, 0)));
        for bad in [
            &b""[..],
            b"-",
            b".5",
            b"1e9",
            b"+1",
            b" 1",
            b"1.2.3",
            b"99999999999999999999",
        ] {
            assert_eq!(
                parse_pax_time(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn pax_records_with_binary_values() {
        let mut data = Vec::new();
        let value = b"a\nb=c\0d";
        let body = [&b"SCHILY.xattr.user.x="[..], value, b"\n"].concat();
        let mut len = body.len() + 3;
        if (len.to_string().len() + 1 + body.len()) != len {
            len = len.to_string().len() + 1 + body.len();
        }
        data.extend_from_slice(format!("{len} ").as_bytes());
        data.extend_from_slice(&body);
        data.extend_from_slice(b"12 path=a/b\n");
        let recs = parse_pax(&data).unwrap();
        assert_eq!(recs[0].0, b"SCHILY.xattr.user.x");
        assert_eq!(decode_xattr_keyword(b"user.a%3Db%25c%41"), b"user.a=b%c%41");
        assert_eq!(recs[0].1, value);
        assert_eq!(recs[1], (b"path".to_vec(), b"a/b".to_vec()));
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"5 a=\n").is_ok());
        assert!(parse_pax(b"x path=x\n").is_err());
    }

    #[test]
    fn header_mtimes() {
        let mut f = [0u8; 12];
        f[..11].copy_from_slice(b"00000000012");
        assert_eq!(header_mtime(&f).unwrap(), 10);
        let mut neg = [0xffu8; 12];
        neg[11] = 0xfe;
        assert_eq!(header_mtime(&neg).unwrap(), -2);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 5;
        assert_eq!(header_mtime(&big).unwrap(), 5);
        big[2] = 1;
        assert!(header_mtime(&big).is_err());
        assert!(header_mtime(b"0000000009x\0").is_err());
    }

    #[test]
    fn magic_detection() {
        assert_eq!(LayerFormat::detect(&[0x1f, 0x8b, 8, 0]), LayerFormat::Gzip);
        assert_eq!(
            LayerFormat::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            LayerFormat::Zstd
        );
        assert_eq!(LayerFormat::detect(b"usr/"), LayerFormat::Tar);
        assert_eq!(LayerFormat::detect(b""), LayerFormat::Tar);
    }
}

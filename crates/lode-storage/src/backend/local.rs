//! A directory of blobs named by their hex digest (an image directory's `blobs/`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::{digest_hex, Backend, BackendError, BackendErrorKind};

pub struct LocalDirBackend {
    dir: PathBuf,
}

impl LocalDirBackend {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalDirBackend { dir: dir.into() }
    }
}

impl Backend for LocalDirBackend {
    fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BackendError> {
        let path = self.dir.join(digest_hex(digest));
        let file = File::open(&path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                BackendErrorKind::NotFound
            } else {
                BackendErrorKind::Permanent
            };
            BackendError::new(kind, format!("{}: {e}", path.display()))
        })?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).map_err(|e| {
            BackendError::new(
                BackendErrorKind::Permanent,
                format!("{}: reading {len} bytes at {offset}: {e}", path.display()),
            )
        })?;
        Ok(buf)
    }

    fn describe(&self) -> String {
        format!("dir {}", self.dir.display())
    }
}

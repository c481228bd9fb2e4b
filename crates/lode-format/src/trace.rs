//! Access traces: which files (and which byte ranges of them) a workload read, in the order
//! of first access. `lode mount --record-trace` writes them, `lode build --prefetch` reads
//! them (and turns them into the image's prefetch list).
//!
//! One entry per line:
//!
//! ```text
//! # comment
//! /usr/bin/python3.11
//! /usr/lib/python3.11/json/__init__.py 0 4096
//! ```
//!
//! A path alone means the whole file; `OFFSET LEN` (decimal bytes) a range of it. Paths are
//! absolute image paths and may contain spaces (the last two fields are a range only if both
//! are numbers); a path containing a newline cannot be written.

/// A trace line: the path, and the byte range (offset, length) if one was given.
pub type TraceEntry<'a> = (&'a [u8], Option<(u64, u64)>);

/// Why a trace line is not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("paths must be absolute: {0:?}")]
    NotAbsolute(String),
}

/// Parses one line (without its newline). Blank lines and comments are `Ok(None)`.
pub fn parse_line(line: &[u8]) -> Result<Option<TraceEntry<'_>>, TraceError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() || line.starts_with(b"#") {
        return Ok(None);
    }
    let fields: Vec<&[u8]> = line.rsplitn(3, |&b| b == b' ').collect();
    let (path, range) = match fields.as_slice() {
        [len, off, path] => match (number(len), number(off)) {
            (Some(len), Some(off)) => (*path, Some((off, len))),
            _ => (line, None),
        },
        _ => (line, None),
    };
    if !path.starts_with(b"/") {
        return Err(TraceError::NotAbsolute(
            String::from_utf8_lossy(line).into_owned(),
        ));
    }
    Ok(Some((path, range)))
}

fn number(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse::<u64>().ok()
}

/// Appends the lines of one file to `out`: the path alone when `whole`, else one
/// `PATH OFFSET LEN` line per range. Returns false (and writes nothing) for a path that
/// cannot be written (not absolute, or containing a newline).
pub fn write_entry(out: &mut Vec<u8>, path: &[u8], whole: bool, ranges: &[(u64, u64)]) -> bool {
    if !path.starts_with(b"/") || path.contains(&b'\n') || path.ends_with(b"\r") {
        return false;
    }
    // A whole-file line whose path ends in " <n> <n>" would read back as a range: write
    // such paths with explicit ranges only.
    let looks_ranged = matches!(parse_line(path), Ok(Some((_, Some(_)))));
    if whole && !looks_ranged {
        out.extend_from_slice(path);
        out.push(b'\n');
        return true;
    }
    for &(off, len) in ranges {
        out.extend_from_slice(path);
        out.extend_from_slice(format!(" {off} {len}\n").as_bytes());
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let mut out = Vec::new();
        assert!(write_entry(&mut out, b"/a b/c", true, &[(0, 10)]));
        assert!(write_entry(
            &mut out,
            b"/x",
            false,
            &[(0, 4096), (8192, 10)]
        ));
        assert!(write_entry(&mut out, b"/odd 1 2", true, &[(0, 7)]));
        assert!(!write_entry(&mut out, b"/new\nline", true, &[]));
        assert!(!write_entry(&mut out, b"relative", true, &[]));
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            text, "/a b/c\n/x 0 4096\n/x 8192 10\n/odd 1 2 0 7\n",
            "{text}"
        );
        let parsed: Vec<_> = out
            .split(|&b| b == b'\n')
            .filter_map(|l| parse_line(l).unwrap())
            .collect();
        assert_eq!(
            parsed,
            vec![
                (&b"/a b/c"[..], None),
                (&b"/x"[..], Some((0, 4096))),
                (&b"/x"[..], Some((8192, 10))),
                (&b"/odd 1 2"[..], Some((0, 7))),
            ]
        );
        assert_eq!(parse_line(b"# c").unwrap(), None);
        assert_eq!(parse_line(b"").unwrap(), None);
        assert!(parse_line(b"x 1 2").is_err());
    }
}

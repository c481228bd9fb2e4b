//! The fanotify user ABI this crate needs, written out by hand: the `libc` crate and Debian
//! 12's headers lack the pre-content parts (`FAN_PRE_ACCESS`, range info records,
//! `FAN_DENY_ERRNO`), see `shared/spec/fanotify-precontent.md` §1–§2.
//!
//! Structs are zerocopy types in native byte order and are parsed from byte buffers (never
//! by pointer casts); [`parse_events`] walks a `read(2)` buffer, and info records by their
//! own `len`.

use zerocopy::native_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

// fanotify_init flags.
pub const FAN_CLOEXEC: u32 = 0x0000_0001;
pub const FAN_NONBLOCK: u32 = 0x0000_0002;
pub const FAN_CLASS_NOTIF: u32 = 0x0000_0000;
pub const FAN_CLASS_PRE_CONTENT: u32 = 0x0000_0008;
pub const FAN_UNLIMITED_QUEUE: u32 = 0x0000_0010;

// fanotify_mark flags.
pub const FAN_MARK_ADD: u32 = 0x0000_0001;
pub const FAN_MARK_REMOVE: u32 = 0x0000_0002;
pub const FAN_MARK_INODE: u32 = 0x0000_0000;

// Event mask bits.
pub const FAN_OPEN: u64 = 0x0000_0020;
pub const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;

// Info records.
pub const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;

pub const FANOTIFY_METADATA_VERSION: u8 = 3;
/// The `fd` of an event that carries none (e.g. `FAN_Q_OVERFLOW`).
pub const FAN_NOFD: i32 = -1;

// Responses.
pub const FAN_ALLOW: u32 = 0x01;
pub const FAN_DENY: u32 = 0x02;
const FAN_ERRNO_SHIFT: u32 = 24;
const FAN_ERRNO_MASK: u32 = 0xff;

/// `FAN_DENY_ERRNO(e)`: deny with this errno (pre-content groups only; the kernel accepts
/// EPERM, EIO, EBUSY, ETXTBSY, EAGAIN, ENOSPC, EDQUOT).
pub const fn fan_deny_errno(errno: i32) -> u32 {
    FAN_DENY | (((errno as u32) & FAN_ERRNO_MASK) << FAN_ERRNO_SHIFT)
}

/// `struct fanotify_event_metadata` (24 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EventMetadata {
    /// Whole event including info records.
    pub event_len: U32,
    pub vers: u8,
    pub reserved: u8,
    pub metadata_len: U16,
    pub mask: U64,
    pub fd: I32,
    pub pid: I32,
}

/// `struct fanotify_event_info_header` (4 bytes); `len` is the whole record's length.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoHeader {
    pub info_type: u8,
    pub pad: u8,
    pub len: U16,
}

/// `struct fanotify_event_info_range` (24 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RangeInfo {
    pub hdr: InfoHeader,
    pub pad: U32,
    pub offset: U64,
    pub count: U64,
}

/// `struct fanotify_response` (8 bytes): what is written to the group fd.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Response {
    pub fd: I32,
    pub response: U32,
}

const _: () = assert!(size_of::<EventMetadata>() == 24);
const _: () = assert!(size_of::<InfoHeader>() == 4);
const _: () = assert!(size_of::<RangeInfo>() == 24);
const _: () = assert!(size_of::<Response>() == 8);

pub const METADATA_LEN: usize = size_of::<EventMetadata>();

impl Response {
    pub fn new(fd: i32, response: u32) -> Response {
        Response {
            fd: fd.into(),
            response: response.into(),
        }
    }
}

/// One event as read from the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub mask: u64,
    /// The event fd (owned by the reader once read), or negative.
    pub fd: i32,
    pub pid: i32,
    /// `(offset, count)` of a range info record, page-granular as the kernel reports it.
    pub range: Option<(u64, u64)>,
}

/// Parses the events of a buffer filled by `read(2)` on a group fd. Stops at the end of the
/// buffer or at the first header that is not a valid event (a zeroed header ends a journal
/// slot: see the crate docs); `.1` tells whether it stopped on such garbage rather than at
/// a zero header or the end.
pub fn parse_events(buf: &[u8]) -> (Vec<Event>, bool) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while buf.len() - pos >= METADATA_LEN {
        let Ok((m, _)) = EventMetadata::read_from_prefix(&buf[pos..]) else {
            break;
        };
        let len = m.event_len.get() as usize;
        if len == 0 {
            return (out, false);
        }
        if m.vers != FANOTIFY_METADATA_VERSION
            || (m.metadata_len.get() as usize) < METADATA_LEN
            || len < m.metadata_len.get() as usize
            || len > buf.len() - pos
        {
            return (out, true);
        }
        let rec = &buf[pos..pos + len];
        out.push(Event {
            mask: m.mask.get(),
            fd: m.fd.get(),
            pid: m.pid.get(),
            range: find_range(&rec[m.metadata_len.get() as usize..]),
        });
        pos += len;
    }
    (out, false)
}

/// The first range record among `info` records.
fn find_range(mut info: &[u8]) -> Option<(u64, u64)> {
    while let Ok((h, _)) = InfoHeader::read_from_prefix(info) {
        let len = h.len.get() as usize;
        if len < size_of::<InfoHeader>() || len > info.len() {
            return None;
        }
        if h.info_type == FAN_EVENT_INFO_TYPE_RANGE {
            let r = RangeInfo::read_from_prefix(&info[..len]).ok()?.0;
            return Some((r.offset.get(), r.count.get()));
        }
        info = &info[len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(fd: i32, mask: u64, range: Option<(u64, u64)>, pidfd: bool) -> Vec<u8> {
        let mut info = Vec::new();
        if pidfd {
            // FAN_EVENT_INFO_TYPE_PIDFD record: header + pidfd.
            info.extend_from_slice(
                InfoHeader {
                    info_type: 4,
                    pad: 0,
                    len: 8.into(),
                }
                .as_bytes(),
            );
            info.extend_from_slice(&7i32.to_ne_bytes());
        }
        if let Some((o, c)) = range {
            info.extend_from_slice(
                RangeInfo {
                    hdr: InfoHeader {
                        info_type: FAN_EVENT_INFO_TYPE_RANGE,
                        pad: 0,
                        len: 24.into(),
                    },
                    pad: 0.into(),
                    offset: o.into(),
                    count: c.into(),
                }
                .as_bytes(),
            );
        }
        let m = EventMetadata {
            event_len: ((METADATA_LEN + info.len()) as u32).into(),
            vers: FANOTIFY_METADATA_VERSION,
            reserved: 0,
            metadata_len: (METADATA_LEN as u16).into(),
            mask: mask.into(),
            fd: fd.into(),
            pid: 42.into(),
        };
        let mut v = m.as_bytes().to_vec();
        v.extend_from_slice(&info);
        v
    }

    #[test]
    fn constants_match_the_uapi() {
        assert_eq!(fan_deny_errno(libc::EIO), 0x0500_0002);
        assert_eq!(FAN_PRE_ACCESS, 0x0010_0000);
    }

    #[test]
    fn parses_batches_and_stops_at_zero() {
        let mut buf = event(5, FAN_PRE_ACCESS, Some((4096, 8192)), false);
        buf.extend(event(6, FAN_PRE_ACCESS, Some((0, 4096)), true));
        buf.extend(event(FAN_NOFD, FAN_Q_OVERFLOW, None, false));
        assert_eq!(buf.len(), 48 + 56 + 24);
        let whole = buf.len();
        buf.resize(4096, 0);
        let (ev, garbage) = parse_events(&buf);
        assert!(!garbage);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].range, Some((4096, 8192)));
        assert_eq!(ev[1].range, Some((0, 4096)));
        assert_eq!(ev[1].fd, 6);
        assert_eq!(ev[2].fd, FAN_NOFD);
        assert_eq!(ev[2].range, None);
        // Exactly the bytes read.
        assert_eq!(parse_events(&buf[..whole]).0.len(), 3);
        // A torn / foreign header is reported.
        let mut bad = buf.clone();
        bad[48 + 4] = 9;
        let (ev, garbage) = parse_events(&bad);
        assert_eq!(ev.len(), 1);
        assert!(garbage);
        // An event longer than the buffer is not trusted.
        let (ev, garbage) = parse_events(&buf[..80]);
        assert_eq!(ev.len(), 1);
        assert!(garbage);
    }
}

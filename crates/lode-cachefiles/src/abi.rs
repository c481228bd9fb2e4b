//! The cachefiles on-demand user ABI (Linux 6.12 `include/uapi/linux/cachefiles.h` and
//! `fs/cachefiles/{daemon,ondemand}.c`), written out by hand.
//!
//! Messages read from `/dev/cachefiles` are parsed from bytes with zerocopy (no unsafe casts,
//! no alignment assumptions) by [`parse_message`], which never panics: a malformed message is
//! an error that still carries whatever the daemon needs to answer it (its header, and for an
//! OPEN the anonymous fd), so a bad message never leaves a kernel waiter hanging.
//! See shared/spec/cachefiles-ondemand.md.

use zerocopy::byteorder::native_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `CACHEFILES_MSG_MAX_SIZE`: no message is longer; read with a buffer of this size.
pub const MSG_MAX_SIZE: usize = 1024;
/// Size of [`MsgHeader`].
pub const HEADER_SIZE: usize = 16;
/// Size of [`OpenPayload`] (before the keys).
pub const OPEN_PAYLOAD_SIZE: usize = 16;
/// Size of [`ReadPayload`].
pub const READ_PAYLOAD_SIZE: usize = 16;
/// Longest cookie key cachefiles accepts without hitting a `BUG_ON` (NAME_MAX − 3).
pub const MAX_COOKIE_KEY: usize = 252;
/// Longest volume key (it becomes the directory name `I<key>`, NAME_MAX = 255).
pub const MAX_VOLUME_KEY: usize = 254;
/// Largest errno a negative `copen` size may carry (`MAX_ERRNO`).
pub const MAX_ERRNO: i32 = 4095;
/// Commands are one `write()` each, shorter than a page.
pub const MAX_COMMAND: usize = 4095;
/// Cache-file writes through the anonymous fd are O_DIRECT at page granularity.
pub const PAGE_SIZE: u64 = 4096;

/// `enum cachefiles_opcode`.
pub const OP_OPEN: u32 = 0;
pub const OP_CLOSE: u32 = 1;
pub const OP_READ: u32 = 2;

/// `struct cachefiles_msg` (header of every message; the payload follows).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MsgHeader {
    pub msg_id: U32,
    pub opcode: U32,
    /// Total length, header included.
    pub len: U32,
    pub object_id: U32,
}

/// `struct cachefiles_open` (payload of OPEN; volume key and cookie key follow).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpenPayload {
    /// Includes the volume key's terminating NUL.
    pub volume_key_size: U32,
    /// Binary, no NUL.
    pub cookie_key_size: U32,
    /// The anonymous fd the kernel installed in the reader's fd table.
    pub fd: U32,
    pub flags: U32,
}

/// `struct cachefiles_read` (payload of READ).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReadPayload {
    pub off: U64,
    pub len: U64,
}

const _: () = assert!(size_of::<MsgHeader>() == HEADER_SIZE);
const _: () = assert!(size_of::<OpenPayload>() == OPEN_PAYLOAD_SIZE);
const _: () = assert!(size_of::<ReadPayload>() == READ_PAYLOAD_SIZE);

/// The header fields every message has, in host types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub msg_id: u32,
    pub opcode: u32,
    pub len: u32,
    pub object_id: u32,
}

/// An OPEN request: answer with [`copen`] / [`copen_error`]; `fd` is now ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open<'a> {
    pub msg_id: u32,
    pub object_id: u32,
    /// Without the terminating NUL, e.g. `erofs,lode`.
    pub volume_key: &'a [u8],
    pub cookie_key: &'a [u8],
    pub fd: i32,
    pub flags: u32,
}

/// A CLOSE request: close every fd of `object_id`; no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub msg_id: u32,
    pub object_id: u32,
}

/// A READ request: fill `off..off + len` of the object's cache file, then complete it with
/// `CACHEFILES_IOC_READ_COMPLETE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub msg_id: u32,
    pub object_id: u32,
    pub off: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Open(Open<'a>),
    Close(Close),
    Read(Read),
}

impl Message<'_> {
    pub fn msg_id(&self) -> u32 {
        match self {
            Message::Open(m) => m.msg_id,
            Message::Close(m) => m.msg_id,
            Message::Read(m) => m.msg_id,
        }
    }
}

/// What is wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("{0} bytes is shorter than the 16-byte message header")]
    Short(usize),
    #[error("header length {header} does not match the {actual} bytes read")]
    LengthMismatch { header: u32, actual: usize },
    #[error("message of {0} bytes is longer than CACHEFILES_MSG_MAX_SIZE")]
    TooLong(usize),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u32),
    #[error("{what}: length {len}, expected {expected}")]
    BadPayloadLength {
        what: &'static str,
        len: u32,
        expected: &'static str,
    },
    #[error("OPEN keys ({volume} + {cookie} bytes) do not fill the {available} payload bytes")]
    KeySizes {
        volume: u32,
        cookie: u32,
        available: usize,
    },
    #[error("OPEN volume key is not a NUL-terminated string")]
    VolumeKeyNotTerminated,
    #[error("OPEN anonymous fd {0} is not a valid descriptor number")]
    BadFd(u32),
    #[error("READ range {off}+{len} overflows")]
    RangeOverflow { off: u64, len: u64 },
}

/// A malformed message, with what could be salvaged to answer it anyway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed cachefiles message{}: {kind}", header.map(|h| format!(" (id {}, opcode {})", h.msg_id, h.opcode)).unwrap_or_default())]
pub struct ParseError {
    /// The header, when at least 16 bytes arrived.
    pub header: Option<Header>,
    /// For an OPEN: the anonymous fd the kernel installed, if the payload held one. The
    /// daemon must answer the OPEN with an error and then close it.
    pub open_fd: Option<i32>,
    pub kind: ParseErrorKind,
}

/// Parses one message as returned by one `read()` of `/dev/cachefiles` (the return value is
/// the message length, so `buf` must be exactly the message).
pub fn parse_message(buf: &[u8]) -> Result<Message<'_>, ParseError> {
    let fail = |header: Option<Header>, open_fd: Option<i32>, kind| {
        Err(ParseError {
            header,
            open_fd,
            kind,
        })
    };
    let Ok((h, payload)) = MsgHeader::ref_from_prefix(buf) else {
        return fail(None, None, ParseErrorKind::Short(buf.len()));
    };
    let header = Header {
        msg_id: h.msg_id.get(),
        opcode: h.opcode.get(),
        len: h.len.get(),
        object_id: h.object_id.get(),
    };
    let hdr = Some(header);
    if buf.len() > MSG_MAX_SIZE {
        return fail(hdr, None, ParseErrorKind::TooLong(buf.len()));
    }
    if header.len as usize != buf.len() {
        return fail(
            hdr,
            None,
            ParseErrorKind::LengthMismatch {
                header: header.len,
                actual: buf.len(),
            },
        );
    }
    match header.opcode {
        OP_OPEN => {
            let Ok((p, keys)) = OpenPayload::ref_from_prefix(payload) else {
                return fail(
                    hdr,
                    None,
                    ParseErrorKind::BadPayloadLength {
                        what: "OPEN",
                        len: header.len,
                        expected: "at least 32",
                    },
                );
            };
            let raw_fd = p.fd.get();
            let fd = i32::try_from(raw_fd).ok();
            let Some(fd) = fd else {
                return fail(hdr, None, ParseErrorKind::BadFd(raw_fd));
            };
            let (vks, cks) = (p.volume_key_size.get(), p.cookie_key_size.get());
            let sizes_ok = (vks as u64) + (cks as u64) == keys.len() as u64;
            if !sizes_ok || vks == 0 {
                return fail(
                    hdr,
                    Some(fd),
                    ParseErrorKind::KeySizes {
                        volume: vks,
                        cookie: cks,
                        available: keys.len(),
                    },
                );
            }
            let (volume, cookie) = keys.split_at(vks as usize);
            let volume_key = match volume.split_last() {
                Some((0, v)) if !v.contains(&0) => v,
                _ => return fail(hdr, Some(fd), ParseErrorKind::VolumeKeyNotTerminated),
            };
            Ok(Message::Open(Open {
                msg_id: header.msg_id,
                object_id: header.object_id,
                volume_key,
                cookie_key: cookie,
                fd,
                flags: p.flags.get(),
            }))
        }
        OP_CLOSE => {
            if !payload.is_empty() {
                return fail(
                    hdr,
                    None,
                    ParseErrorKind::BadPayloadLength {
                        what: "CLOSE",
                        len: header.len,
                        expected: "16",
                    },
                );
            }
            Ok(Message::Close(Close {
                msg_id: header.msg_id,
                object_id: header.object_id,
            }))
        }
        OP_READ => {
            let Ok(p) = ReadPayload::ref_from_bytes(payload) else {
                return fail(
                    hdr,
                    None,
                    ParseErrorKind::BadPayloadLength {
                        what: "READ",
                        len: header.len,
                        expected: "32",
                    },
                );
            };
            let (off, len) = (p.off.get(), p.len.get());
            if off.checked_add(len).is_none() {
                return fail(hdr, None, ParseErrorKind::RangeOverflow { off, len });
            }
            Ok(Message::Read(Read {
                msg_id: header.msg_id,
                object_id: header.object_id,
                off,
                len,
            }))
        }
        op => fail(hdr, None, ParseErrorKind::UnknownOpcode(op)),
    }
}

/// The `copen` reply accepting an OPEN: the object (cache file) is `size` bytes. Plain decimal
/// (the kernel parses base 0, so a leading zero would mean octal).
pub fn copen(msg_id: u32, size: u64) -> String {
    format!("copen {msg_id},{size}")
}

/// The `copen` reply failing an OPEN with `errno` (1..=4095): the mount, or the access to
/// the blob, fails with that error.
pub fn copen_error(msg_id: u32, errno: i32) -> String {
    let e = errno.clamp(1, MAX_ERRNO);
    format!("copen {msg_id},-{e}")
}

/// A text command (`dir`, `tag`, `bind`, `restore`, …) checked against what the device
/// accepts: one line, no NUL, shorter than a page.
pub fn command(word: &str, arg: Option<&str>) -> Result<Vec<u8>, String> {
    let mut s = word.to_string();
    if let Some(a) = arg {
        s.push(' ');
        s.push_str(a);
    }
    if s.len() > MAX_COMMAND {
        return Err(format!(
            "command {word} is {} bytes, the limit is {MAX_COMMAND}",
            s.len()
        ));
    }
    if s.bytes().any(|b| b == 0 || b == b'\n') {
        return Err(format!("command {word} contains a NUL or newline"));
    }
    Ok(s.into_bytes())
}

/// The volume key EROFS uses: `erofs,<domain_id>` (or `erofs,<fsid>` without a domain).
/// Returns the id part.
pub fn erofs_volume_id(volume_key: &[u8]) -> Option<&[u8]> {
    volume_key.strip_prefix(b"erofs,")
}

/// Whether `key` can be used as an EROFS fsid, domain id or device tag under cachefiles:
/// 1..=252 printable ASCII bytes without space, `/` (it becomes a file name) or `,` (it is a
/// mount option), so the cache file is simply named `D<key>`.
pub fn valid_key(key: &str) -> bool {
    (1..=MAX_COOKIE_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| (0x21..0x7f).contains(&b) && b != b'/' && b != b',')
}

/// Linux asm-generic `_IOC` encoding (x86, arm, arm64, riscv, loongarch, s390).
const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_WRITE: u32 = 1;

/// `CACHEFILES_IOC_READ_COMPLETE = _IOW(0x98, 1, int)`, issued on an anonymous fd of the
/// object with the msg_id **by value** as the argument. It carries no status: a READ whose
/// range start is still a hole in the cache file fails with EIO for the reader.
pub const CACHEFILES_IOC_READ_COMPLETE: u32 = ioc(IOC_WRITE, 0x98, 1, 4);

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "loongarch64",
    target_arch = "s390x"
)))]
compile_error!(
    "CACHEFILES_IOC_READ_COMPLETE uses the asm-generic ioctl encoding; add this architecture's"
);

/// Encodes a message the way the kernel does (tests, fuzz seeds).
pub fn encode(header: Header, payload: &[u8]) -> Vec<u8> {
    let h = MsgHeader {
        msg_id: header.msg_id.into(),
        opcode: header.opcode.into(),
        len: header.len.into(),
        object_id: header.object_id.into(),
    };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// An OPEN message as the kernel sends it (`volume_key` without its NUL).
pub fn encode_open(
    msg_id: u32,
    object_id: u32,
    volume_key: &[u8],
    cookie_key: &[u8],
    fd: u32,
) -> Vec<u8> {
    let p = OpenPayload {
        volume_key_size: (volume_key.len() as u32 + 1).into(),
        cookie_key_size: (cookie_key.len() as u32).into(),
        fd: fd.into(),
        flags: 0.into(),
    };
    let mut payload = p.as_bytes().to_vec();
    payload.extend_from_slice(volume_key);
    payload.push(0);
    payload.extend_from_slice(cookie_key);
    let len = (HEADER_SIZE + payload.len()) as u32;
    encode(
        Header {
            msg_id,
            opcode: OP_OPEN,
            len,
            object_id,
        },
        &payload,
    )
}

/// A READ message as the kernel sends it.
pub fn encode_read(msg_id: u32, object_id: u32, off: u64, len: u64) -> Vec<u8> {
    let p = ReadPayload {
        off: off.into(),
        len: len.into(),
    };
    encode(
        Header {
            msg_id,
            opcode: OP_READ,
            len: (HEADER_SIZE + READ_PAYLOAD_SIZE) as u32,
            object_id,
        },
        p.as_bytes(),
    )
}

/// A CLOSE message as the kernel sends it.
pub fn encode_close(msg_id: u32, object_id: u32) -> Vec<u8> {
    encode(
        Header {
            msg_id,
            opcode: OP_CLOSE,
            len: HEADER_SIZE as u32,
            object_id,
        },
        &[],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ioctl_number_matches_the_kernel_header() {
        // Verified by compiling against <linux/cachefiles.h> (see the spec, §5.3).
        assert_eq!(CACHEFILES_IOC_READ_COMPLETE, 0x4004_9801);
    }

    #[test]
    fn parses_open() {
        let hex = "a".repeat(64);
        let m = encode_open(7, 3, b"erofs,lode", hex.as_bytes(), 9);
        assert_eq!(m.len(), 32 + 11 + 64);
        let Message::Open(o) = parse_message(&m).unwrap() else {
            panic!("not an OPEN")
        };
        assert_eq!((o.msg_id, o.object_id, o.fd, o.flags), (7, 3, 9, 0));
        assert_eq!(o.volume_key, b"erofs,lode");
        assert_eq!(o.cookie_key, hex.as_bytes());
        assert_eq!(erofs_volume_id(o.volume_key), Some(&b"lode"[..]));
    }

    #[test]
    fn parses_open_of_the_largest_size() {
        // 16 + 16 + 256 + 255 = 543 bytes (the spec's largest OPEN).
        let v = vec![b'v'; 255];
        let c = vec![b'c'; 255];
        let m = encode_open(1, 1, &v, &c, 3);
        assert_eq!(m.len(), 543);
        assert!(matches!(parse_message(&m), Ok(Message::Open(_))));
    }

    #[test]
    fn parses_read_and_close() {
        let m = encode_read(11, 4, 8192, 131072);
        assert_eq!(
            parse_message(&m).unwrap(),
            Message::Read(Read {
                msg_id: 11,
                object_id: 4,
                off: 8192,
                len: 131072
            })
        );
        let m = encode_close(12, 4);
        assert_eq!(
            parse_message(&m).unwrap(),
            Message::Close(Close {
                msg_id: 12,
                object_id: 4
            })
        );
    }

    fn kind(buf: &[u8]) -> ParseErrorKind {
        parse_message(buf).unwrap_err().kind
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert_eq!(kind(&[]), ParseErrorKind::Short(0));
        assert_eq!(kind(&[0; 15]), ParseErrorKind::Short(15));
        // Header length disagrees with the bytes read (both ways).
        let mut m = encode_read(1, 1, 0, 4096);
        m.push(0);
        assert!(matches!(kind(&m), ParseErrorKind::LengthMismatch { .. }));
        let m = encode_read(1, 1, 0, 4096);
        assert!(matches!(
            kind(&m[..31]),
            ParseErrorKind::LengthMismatch { .. }
        ));
        // Unknown opcode, still with its header for the log.
        let m = encode(
            Header {
                msg_id: 5,
                opcode: 3,
                len: 16,
                object_id: 1,
            },
            &[],
        );
        let e = parse_message(&m).unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::UnknownOpcode(3));
        assert_eq!(e.header.unwrap().msg_id, 5);
        // CLOSE with a payload, READ with a short or long one.
        let m = encode(
            Header {
                msg_id: 1,
                opcode: OP_CLOSE,
                len: 20,
                object_id: 1,
            },
            &[0; 4],
        );
        assert!(matches!(kind(&m), ParseErrorKind::BadPayloadLength { .. }));
        for n in [0, 8, 24] {
            let m = encode(
                Header {
                    msg_id: 1,
                    opcode: OP_READ,
                    len: 16 + n,
                    object_id: 1,
                },
                &vec![0; n as usize],
            );
            assert!(matches!(kind(&m), ParseErrorKind::BadPayloadLength { .. }));
        }
        // READ range overflowing u64.
        let m = encode_read(1, 1, u64::MAX - 10, 4096);
        assert!(matches!(kind(&m), ParseErrorKind::RangeOverflow { .. }));
        // Longer than the kernel ever sends.
        let big = vec![b'x'; 2000];
        let m = encode_open(1, 1, b"erofs,x", &big, 3);
        assert!(matches!(kind(&m), ParseErrorKind::TooLong(_)));
    }

    #[test]
    fn malformed_open_keeps_its_fd_for_the_error_reply() {
        let mut m = encode_open(8, 2, b"erofs,lode", b"key", 42);
        // Cookie key size one too many.
        let cks = u32::from_ne_bytes(m[20..24].try_into().unwrap()) + 1;
        m[20..24].copy_from_slice(&cks.to_ne_bytes());
        let e = parse_message(&m).unwrap_err();
        assert!(matches!(e.kind, ParseErrorKind::KeySizes { .. }));
        assert_eq!(e.open_fd, Some(42));
        assert_eq!(e.header.unwrap().msg_id, 8);
        // Volume key without its NUL.
        let mut m = encode_open(8, 2, b"erofs,lode", b"key", 42);
        m[32 + 10] = b'!';
        let e = parse_message(&m).unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::VolumeKeyNotTerminated);
        assert_eq!(e.open_fd, Some(42));
        // Sizes that overflow u32 when added.
        let mut m = encode_open(8, 2, b"v", b"k", 42);
        m[16..20].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(kind(&m), ParseErrorKind::KeySizes { .. }));
        // Zero-sized volume key.
        let mut m = encode_open(8, 2, b"", b"k", 42);
        m[16..20].copy_from_slice(&0u32.to_ne_bytes());
        m[20..24].copy_from_slice(&2u32.to_ne_bytes());
        assert!(matches!(kind(&m), ParseErrorKind::KeySizes { .. }));
        // A negative fd.
        let m = encode_open(8, 2, b"v", b"k", u32::MAX);
        assert_eq!(kind(&m), ParseErrorKind::BadFd(u32::MAX));
        // OPEN shorter than its fixed payload.
        let m = encode(
            Header {
                msg_id: 1,
                opcode: OP_OPEN,
                len: 24,
                object_id: 1,
            },
            &[0; 8],
        );
        assert!(matches!(kind(&m), ParseErrorKind::BadPayloadLength { .. }));
    }

    #[test]
    fn replies_and_commands() {
        assert_eq!(copen(7, 10485760), "copen 7,10485760");
        assert_eq!(copen(0, 0), "copen 0,0");
        assert_eq!(copen_error(9, 2), "copen 9,-2");
        assert_eq!(copen_error(9, 99999), "copen 9,-4095");
        assert_eq!(copen_error(9, 0), "copen 9,-1");
        assert_eq!(command("bind", Some("ondemand")).unwrap(), b"bind ondemand");
        assert_eq!(command("restore", None).unwrap(), b"restore");
        assert!(command("dir", Some("/a\nb")).is_err());
        assert!(command("dir", Some("/a\0b")).is_err());
        assert!(command("dir", Some(&"x".repeat(5000))).is_err());
    }

    #[test]
    fn keys() {
        assert!(valid_key(&"0123456789abcdef".repeat(4)));
        assert!(valid_key("lode"));
        assert!(!valid_key(""));
        assert!(!valid_key("a/b"));
        assert!(!valid_key("a,b"));
        assert!(!valid_key("a b"));
        assert!(!valid_key(&"k".repeat(253)));
        assert!(valid_key(&"k".repeat(252)));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = parse_message(&bytes);
        }

        #[test]
        fn mutated_valid_messages_never_panic(
            which in 0..3usize,
            pos in any::<prop::sample::Index>(),
            val in any::<u8>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut m = match which {
                0 => encode_open(3, 4, b"erofs,lode", b"0123abcd", 5),
                1 => encode_read(3, 4, 4096, 8192),
                _ => encode_close(3, 4),
            };
            let i = pos.index(m.len());
            m[i] = val;
            let n = cut.index(m.len() + 1);
            // Whatever parses is self-consistent.
            if let Ok(Message::Open(o)) = parse_message(&m[..n]) {
                prop_assert_eq!(32 + o.volume_key.len() + 1 + o.cookie_key.len(), n);
            }
        }
    }
}

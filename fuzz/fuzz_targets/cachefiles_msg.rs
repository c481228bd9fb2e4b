//! Fuzzes the cachefiles on-demand message parser: any bytes a `read()` of /dev/cachefiles
//! could return. It must never panic; whatever parses must be self-consistent, and a
//! malformed OPEN must still expose what the daemon needs to answer it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lode_cachefiles::abi::{self, Message};

fuzz_target!(|data: &[u8]| {
    match abi::parse_message(data) {
        Ok(Message::Open(o)) => {
            assert_eq!(
                abi::HEADER_SIZE + abi::OPEN_PAYLOAD_SIZE + o.volume_key.len() + 1 + o.cookie_key.len(),
                data.len()
            );
            assert!(o.fd >= 0);
            assert!(!o.volume_key.contains(&0));
            let _ = abi::erofs_volume_id(o.volume_key);
            let _ = abi::copen(o.msg_id, data.len() as u64);
        }
        Ok(Message::Read(r)) => {
            assert_eq!(data.len(), abi::HEADER_SIZE + abi::READ_PAYLOAD_SIZE);
            assert!(r.off.checked_add(r.len).is_some());
        }
        Ok(Message::Close(_)) => assert_eq!(data.len(), abi::HEADER_SIZE),
        Err(e) => {
            if let Some(h) = e.header {
                assert!(data.len() >= abi::HEADER_SIZE);
                let _ = abi::copen_error(h.msg_id, 22);
            }
            if e.open_fd.is_some() {
                assert_eq!(e.header.map(|h| h.opcode), Some(abi::OP_OPEN));
            }
            let _ = e.to_string();
        }
    }
});

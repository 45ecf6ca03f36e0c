//! The DTLS gate before the handshake: record framing, then the ClientHello reader
//! that collects fragments across datagrams. The input is a series of datagrams, each
//! prefixed by a two-byte length, as a client (or a spoofer) would send them.
#![no_main]

use edgefwd::webrtc::dtls::{ClientHelloReader, HelloState, well_framed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = ClientHelloReader::default();
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let (datagram, tail) = rest[2..].split_at(n);
        rest = tail;
        if !well_framed(datagram) {
            continue;
        }
        if let Ok(HelloState::Complete(_)) = reader.push(datagram) {
            let kept = std::mem::take(&mut reader).into_datagrams();
            assert!(!kept.is_empty(), "a complete ClientHello came in no datagram");
        }
    }
});

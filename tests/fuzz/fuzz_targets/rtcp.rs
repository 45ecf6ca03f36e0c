//! The decrypted RTCP compound packets the SFU reads from subscribers and publishers
//! (PLI, FIR, NACK, SR, RR): never a panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgefwd::media::rtcp::parse(data);
});

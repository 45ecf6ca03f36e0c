//! ICE-lite connectivity checks: STUN parsing, then authentication and the answer
//! (both run on every binding request from any address).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(check) = edgefwd::webrtc::ice::parse_check(data) {
        let from = "192.0.2.1:5000".parse().unwrap();
        let _ = check.answer("fuzzfuzzfuzzfuzzfuzzfuzz", from);
    }
});

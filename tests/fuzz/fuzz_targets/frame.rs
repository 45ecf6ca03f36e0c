//! Whole Ethernet frames as `edgefwd simulate` and the test diagnostics decode them
//! (VLAN tags, IPv4/IPv6, UDP, checksums verified from scratch, RTP).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let d = edgefwd::dataplane::packet::decode(data);
    let _ = d.to_string();
});

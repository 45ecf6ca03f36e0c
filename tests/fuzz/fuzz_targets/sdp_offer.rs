//! WHIP/WHEP offers: SDP parsing and codec choice, as the HTTP API runs them on any
//! body that claims `application/sdp`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(offer) = edgefwd::webrtc::sdp::parse_offer(text) {
        for m in &offer.media {
            if let Some(c) = m.publish_codec() {
                let _ = m.subscribe_codec(c);
            }
        }
    }
});

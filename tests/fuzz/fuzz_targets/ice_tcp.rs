//! ICE-TCP's RFC 4571 framing, as a connection's bytes arrive from anyone: every frame
//! read is 1..=1500 bytes and within what was sent; a bad length ends the stream with
//! an error, never a panic or a read past the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut rd = data;
        let mut buf = [0u8; edgefwd::webrtc::tcp::MAX_FRAME];
        let mut taken = 0;
        while let Ok(Some(n)) = edgefwd::webrtc::tcp::read_frame(&mut rd, &mut buf).await {
            assert!((1..=edgefwd::webrtc::tcp::MAX_FRAME).contains(&n));
            taken += n + 2;
            assert!(taken <= data.len());
            // A connection's first frame must be a check: what the server runs on it.
            let _ = edgefwd::webrtc::ice::parse_check(&buf[..n]);
        }
    });
});

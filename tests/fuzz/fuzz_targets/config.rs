//! The TOML config, with the checks `edgefwd run` applies before starting.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = edgefwd::daemon::config::Config::parse(text)
        && let Some(w) = &cfg.webrtc
    {
        let _ = w.check();
    }
});

//! The data plane's sections of the configuration: `[[listener]]`s (addresses XDP
//! treats as media ports) and `[[route]]`s (a stream's copies and their rewrite), as
//! TOML gives them, before resolution into map entries (`resolve`).

use std::net::SocketAddr;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    #[serde(default = "yes")]
    pub drop_unknown_source: bool,
    #[serde(default)]
    pub drop_no_route: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub listen: SocketAddr,
    pub source: SocketAddr,
    pub ssrc: u32,
    pub out_src: SocketAddr,
    pub out_dst: SocketAddr,
    pub ssrc_out: Option<u32>,
    #[serde(default)]
    pub seq_delta: u16,
    #[serde(default)]
    pub ts_delta: u32,
    pub pt_from: Option<u8>,
    pub pt_to: Option<u8>,
    pub egress: Option<String>,
    pub dst_mac: Option<String>,
    /// 802.1Q VLAN id the copy leaves with (1-4094); default: untagged. The ingress
    /// frame's tag never leaks to the egress.
    pub vlan: Option<u16>,
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        bail!("{s:?} is not a MAC address (want six hex bytes like 02:00:5e:10:00:01)");
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .with_context(|| format!("{s:?} is not a MAC address (bad byte {p:?})"))?;
    }
    Ok(mac)
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

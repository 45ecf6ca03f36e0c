//! Human-readable decoding of frames for `simulate` and test failure messages, with
//! checksums verified from scratch.

use std::fmt::Write as _;

use etherparse::{LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use forwarder_common::{
    csum,
    rtp::{Class, classify},
};
use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct Decoded {
    pub eth_src: Option<String>,
    pub eth_dst: Option<String>,
    pub vlan: Option<u16>,
    pub ip_src: Option<String>,
    pub ip_dst: Option<String>,
    pub ttl: Option<u8>,
    pub ipv4_checksum_ok: Option<bool>,
    pub udp_src: Option<u16>,
    pub udp_dst: Option<u16>,
    pub udp_checksum: Option<u16>,
    pub udp_checksum_ok: Option<bool>,
    pub class: Option<String>,
    pub rtp_pt: Option<u8>,
    pub rtp_marker: Option<bool>,
    pub rtp_seq: Option<u16>,
    pub rtp_ts: Option<u32>,
    pub rtp_ssrc: Option<u32>,
    pub error: Option<String>,
}

pub fn decode(frame: &[u8]) -> Decoded {
    let mut d = Decoded::default();
    let p = match SlicedPacket::from_ethernet(frame) {
        Ok(p) => p,
        Err(e) => {
            d.error = Some(e.to_string());
            return d;
        }
    };
    if let Some(LinkSlice::Ethernet2(e)) = &p.link {
        d.eth_src = Some(crate::dataplane::config::fmt_mac(&e.source()));
        d.eth_dst = Some(crate::dataplane::config::fmt_mac(&e.destination()));
    }
    if let Some(v) = p.vlan_ids().first() {
        d.vlan = Some(v.value());
    }
    let (src, dst): (Vec<u8>, Vec<u8>) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            d.ip_src = Some(h.source_addr().to_string());
            d.ip_dst = Some(h.destination_addr().to_string());
            d.ttl = Some(h.ttl());
            let mut raw = h.slice().to_vec();
            raw[10] = 0;
            raw[11] = 0;
            d.ipv4_checksum_ok = Some(csum::checksum(&raw) == h.header_checksum());
            (h.source().to_vec(), h.destination().to_vec())
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            d.ip_src = Some(h.source_addr().to_string());
            d.ip_dst = Some(h.destination_addr().to_string());
            d.ttl = Some(h.hop_limit());
            (h.source().to_vec(), h.destination().to_vec())
        }
        _ => (vec![], vec![]),
    };
    if let Some(TransportSlice::Udp(u)) = &p.transport {
        d.udp_src = Some(u.source_port());
        d.udp_dst = Some(u.destination_port());
        d.udp_checksum = Some(u.checksum());
        let mut raw = u.slice().to_vec();
        raw[6] = 0;
        raw[7] = 0;
        if u.checksum() != 0 || src.len() == 16 {
            d.udp_checksum_ok = Some(csum::udp_checksum(&src, &dst, &raw) == u.checksum());
        }
        let pl = u.payload();
        if pl.len() >= 2 {
            let class = classify(pl[0], pl[1]);
            d.class = Some(format!("{class:?}").to_lowercase());
            if class == Class::Rtp && pl.len() >= 12 {
                d.rtp_marker = Some(pl[1] & 0x80 != 0);
                d.rtp_pt = Some(pl[1] & 0x7f);
                d.rtp_seq = Some(u16::from_be_bytes([pl[2], pl[3]]));
                d.rtp_ts = Some(u32::from_be_bytes([pl[4], pl[5], pl[6], pl[7]]));
                d.rtp_ssrc = Some(u32::from_be_bytes([pl[8], pl[9], pl[10], pl[11]]));
            }
        }
    }
    d
}

impl std::fmt::Display for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        if let (Some(a), Some(b)) = (&self.eth_src, &self.eth_dst) {
            let _ = write!(s, "eth {a} -> {b}");
            if let Some(v) = self.vlan {
                let _ = write!(s, " vlan {v}");
            }
            s.push('\n');
        }
        if let (Some(a), Some(b)) = (&self.ip_src, &self.ip_dst) {
            let _ = write!(s, "ip  {a} -> {b} ttl {}", self.ttl.unwrap_or(0));
            if let Some(ok) = self.ipv4_checksum_ok {
                let _ = write!(s, " checksum {}", if ok { "ok" } else { "BAD" });
            }
            s.push('\n');
        }
        if let (Some(a), Some(b)) = (self.udp_src, self.udp_dst) {
            let _ = write!(
                s,
                "udp {a} -> {b} checksum {:#06x}",
                self.udp_checksum.unwrap_or(0)
            );
            match self.udp_checksum_ok {
                Some(true) => s.push_str(" ok"),
                Some(false) => s.push_str(" BAD"),
                None => s.push_str(" (none)"),
            }
            s.push('\n');
        }
        if let Some(c) = &self.class {
            let _ = write!(s, "payload {c}");
            if let (Some(pt), Some(seq), Some(ts), Some(ssrc)) =
                (self.rtp_pt, self.rtp_seq, self.rtp_ts, self.rtp_ssrc)
            {
                let _ = write!(
                    s,
                    " pt {pt}{} seq {seq} ts {ts} ssrc {ssrc:#010x}",
                    if self.rtp_marker == Some(true) {
                        " (marker)"
                    } else {
                        ""
                    }
                );
            }
            s.push('\n');
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "undecodable: {e}");
        }
        f.write_str(s.trim_end())
    }
}

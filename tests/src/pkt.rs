//! Frame builders for fixtures. Checksums come from etherparse, a from-scratch
//! computation independent of the data plane's incremental updates.

use std::net::IpAddr;

use etherparse::{PacketBuilder, VlanId};

pub const MAC_PUB: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_FWD: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const MAC_NEXT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
pub const MAC_FWD_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x04];

/// An RTP packet's header fields and payload.
#[derive(Clone, Debug)]
pub struct Rtp {
    pub marker: bool,
    pub pt: u8,
    pub seq: u16,
    pub ts: u32,
    pub ssrc: u32,
    pub csrcs: Vec<u32>,
    /// (profile, extension words)
    pub ext: Option<(u16, Vec<u32>)>,
    pub payload: Vec<u8>,
    /// Padding bytes to add (including the count byte); 0 = none.
    pub padding: u8,
}

impl Rtp {
    pub fn new(ssrc: u32, seq: u16, ts: u32, payload_len: usize) -> Rtp {
        Rtp {
            marker: false,
            pt: 96,
            seq,
            ts,
            ssrc,
            csrcs: vec![],
            ext: None,
            payload: (0..payload_len).map(|i| (i * 7) as u8).collect(),
            padding: 0,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b0 = 0x80 | self.csrcs.len() as u8;
        if self.ext.is_some() {
            b0 |= 0x10;
        }
        if self.padding > 0 {
            b0 |= 0x20;
        }
        let mut v = vec![b0, (self.marker as u8) << 7 | self.pt];
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.ts.to_be_bytes());
        v.extend_from_slice(&self.ssrc.to_be_bytes());
        for c in &self.csrcs {
            v.extend_from_slice(&c.to_be_bytes());
        }
        if let Some((profile, words)) = &self.ext {
            v.extend_from_slice(&profile.to_be_bytes());
            v.extend_from_slice(&(words.len() as u16).to_be_bytes());
            for w in words {
                v.extend_from_slice(&w.to_be_bytes());
            }
        }
        v.extend_from_slice(&self.payload);
        if self.padding > 0 {
            v.extend(std::iter::repeat_n(0u8, self.padding as usize - 1));
            v.push(self.padding);
        }
        v
    }
}

/// Ethernet/IP/UDP framing.
#[derive(Clone, Debug)]
pub struct Frame {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Frame {
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.eth_src, self.eth_dst);
        let mut out = Vec::new();
        macro_rules! finish {
            ($ip:expr) => {{
                let b = $ip.udp(self.sport, self.dport);
                b.write(&mut out, payload).expect("build frame");
            }};
        }
        match (self.vlan, self.src, self.dst) {
            (None, IpAddr::V4(s), IpAddr::V4(d)) => {
                finish!(eth.ipv4(s.octets(), d.octets(), self.ttl))
            }
            (None, IpAddr::V6(s), IpAddr::V6(d)) => {
                finish!(eth.ipv6(s.octets(), d.octets(), self.ttl))
            }
            (Some(v), IpAddr::V4(s), IpAddr::V4(d)) => finish!(
                eth.single_vlan(VlanId::try_new(v).unwrap())
                    .ipv4(s.octets(), d.octets(), self.ttl)
            ),
            (Some(v), IpAddr::V6(s), IpAddr::V6(d)) => finish!(
                eth.single_vlan(VlanId::try_new(v).unwrap())
                    .ipv6(s.octets(), d.octets(), self.ttl)
            ),
            _ => panic!("mixed address families"),
        }
        out
    }

    pub fn l3_offset(&self) -> usize {
        if self.vlan.is_some() { 18 } else { 14 }
    }

    pub fn l4_offset(&self) -> usize {
        self.l3_offset() + if self.src.is_ipv6() { 40 } else { 20 }
    }
}

//! `EFWD_VERDICT_V4` (V4: 32 verdicts): per-CPU array indexed by [`Verdict`]. Every packet the XDP program
//! sees is counted exactly once, under the reason for what it did with it. The index is
//! the enum discriminant; userspace gets names from [`Verdict::name`], never from
//! positions.

use crate::assert_size;

pub const MAP_NAME: &str = "EFWD_VERDICT_V4";

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VerdictStats {
    pub packets: u64,
    pub bytes: u64,
}
assert_size!(VerdictStats, 16);

// SAFETY: #[repr(C)], two u64s, no padding (size asserted): every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for VerdictStats {}

/// What the program did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Forward,
    Pass,
    Drop,
}

macro_rules! verdicts {
    ($( $variant:ident = $idx:literal, $name:literal, $action:ident, $help:literal; )+) => {
        /// Why the program did what it did with a packet.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Verdict {
            $( $variant = $idx, )+
        }

        impl Verdict {
            pub const ALL: &'static [Verdict] = &[ $( Verdict::$variant, )+ ];

            /// Stable snake_case name used by the CLI, JSON and Prometheus labels.
            pub const fn name(self) -> &'static str {
                match self { $( Verdict::$variant => $name, )+ }
            }

            pub const fn action(self) -> Action {
                match self { $( Verdict::$variant => Action::$action, )+ }
            }

            pub const fn help(self) -> &'static str {
                match self { $( Verdict::$variant => $help, )+ }
            }
        }
    };
}

verdicts! {
    ForwardTx = 0, "forward_tx", Forward, "RTP rewritten and sent back out the ingress interface (XDP_TX)";
    ForwardRedirect = 1, "forward_redirect", Forward, "RTP rewritten and redirected to another interface (XDP_REDIRECT)";
    PassNotIp = 2, "pass_not_ip", Pass, "not IPv4/IPv6 (ARP, LLDP, double VLAN tags, runt frames)";
    PassNotUdp = 3, "pass_not_udp", Pass, "IP but not UDP (or behind IPv6 extension headers)";
    PassFragment = 4, "pass_fragment", Pass, "IP fragment: the stack reassembles it";
    PassNotListener = 5, "pass_not_listener", Pass, "UDP to a port that is not a media listener";
    PassStun = 6, "pass_stun", Pass, "STUN (RFC 7983 first byte 0-3): ICE, for the control plane";
    PassDtls = 7, "pass_dtls", Pass, "DTLS (first byte 20-63): handshake, for the control plane";
    PassTurnChannel = 8, "pass_turn_channel", Pass, "TURN channel data (first byte 64-79)";
    PassRtcp = 9, "pass_rtcp", Pass, "RTCP (RFC 5761 payload type 192-223), for the control plane";
    PassNoRoute = 10, "pass_no_route", Pass, "RTP from a known source with an SSRC that has no route";
    PassUnknownSource = 11, "pass_unknown_source", Pass, "RTP/RTCP from a source this listener has no route from";
    DropMalformedIp = 12, "drop_malformed_ip", Drop, "truncated IP header, bad IHL or version, total length beyond the frame";
    DropMalformedUdp = 13, "drop_malformed_udp", Drop, "truncated UDP header or UDP length that disagrees with the IP length";
    DropMalformedRtp = 14, "drop_malformed_rtp", Drop, "RTP shorter than its header, CSRC list or extension; bad padding";
    DropUnknownProtocol = 15, "drop_unknown_protocol", Drop, "first payload byte outside every RFC 7983 range";
    DropUnknownSource = 16, "drop_unknown_source", Drop, "RTP/RTCP from a source this listener has no route from";
    DropNoRoute = 17, "drop_no_route", Drop, "RTP from a known source with an SSRC that has no route";
    DropTtlExceeded = 18, "drop_ttl_exceeded", Drop, "TTL/hop limit would reach 0: a forwarding loop between relays";
    DropFamilyMismatch = 19, "drop_family_mismatch", Drop, "route sends IPv4 input to an IPv6 destination or the reverse";
    DropRedirectError = 20, "drop_redirect_error", Drop, "egress interface missing from the egress devmap";
    DropZeroUdpChecksumV6 = 21, "drop_zero_udp_checksum_v6", Drop, "IPv6 UDP with checksum 0, which RFC 8200 forbids";
    DropIpChecksum = 22, "drop_ip_checksum", Drop, "IPv4 header checksum wrong (RFC 1812 5.2.2: a router must not forward it)";
    DropIpInvalid = 23, "drop_ip_invalid", Drop, "IP header a router must not forward: reserved flag set, or a martian source (0/8, 127/8, multicast, 240/4; ::, ::1, ff00::/8)";
    DropNotForUs = 24, "drop_not_for_us", Drop, "frame not addressed to the receiving interface's MAC (broadcast, multicast, another host's unicast)";
    PassIpOptions = 25, "pass_ip_options", Pass, "IPv4 with options: left to the stack, which processes them (media never carries any)";
    DropEncapError = 26, "drop_encap_error", Drop, "the route's egress VLAN tag could not be pushed or popped (no headroom)";
    ForwardXsk = 27, "forward_xsk", Forward, "SRTP/SRTCP of a bound WebRTC peer, steered to the AF_XDP worker of its queue";
    PassNoWorker = 28, "pass_no_worker", Pass, "SRTP/SRTCP of a bound WebRTC peer on a queue with no AF_XDP worker: to the socket path";
    DropUnknownPeer = 29, "drop_unknown_peer", Drop, "SRTP/SRTCP on the WebRTC port from an address ICE has not bound to a session";
    ForwardFanout = 30, "forward_fanout", Forward, "RTP of a stream with several copies, validated and handed to the TC replicator (XDP_PASS with metadata); its copies are counted in the copy verdicts";
    DropFanoutNoMeta = 31, "drop_fanout_no_meta", Drop, "no longer counted: the hand-off to the TC replicator needs no XDP metadata (kept for the map layout)";
}

pub const NUM_VERDICTS: u32 = 32;
const _: () = assert!(Verdict::ALL.len() as u32 == NUM_VERDICTS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_dense_and_names_unique() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "{} out of place", v.name());
            for w in &Verdict::ALL[i + 1..] {
                assert_ne!(v.name(), w.name());
            }
            let prefix = match v.action() {
                Action::Forward => "forward_",
                Action::Pass => "pass_",
                Action::Drop => "drop_",
            };
            assert!(v.name().starts_with(prefix), "{}", v.name());
        }
    }
}

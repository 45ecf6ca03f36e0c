//! The TOML configuration, every part's section in one file: the data plane's
//! listeners and routes (`dataplane::config`), the cluster's links and streams, and
//! the WebRTC control plane. Each part defines its own section's types; this module
//! puts them together and checks what spans parts.
//!
//! ```toml
//! [[listener]]
//! addr = "198.51.100.2:5004"
//! drop_unknown_source = true   # default true: RTP from strangers dies in XDP
//! drop_no_route = false        # default false: unrouted SSRCs go to the stack
//!
//! [[route]]
//! listen = "198.51.100.2:5004"  # where the publisher sends
//! source = "198.51.100.1:40000" # the publisher
//! ssrc = 0x11223344
//! out_src = "203.0.113.2:5006"  # the copy leaves from here
//! out_dst = "203.0.113.1:6000"  # ... to here
//! ssrc_out = 0x55667788         # default: unchanged
//! seq_delta = 1000              # default 0, added mod 2^16
//! ts_delta = 90000              # default 0, added mod 2^32
//! pt_from = 96                  # optional payload-type remap,
//! pt_to = 100                   # both or neither
//! egress = "eth1"               # optional: else from the kernel routing table
//! dst_mac = "02:00:00:00:00:01" # optional: else from the neighbour table
//! vlan = 100                    # optional: the copy leaves 802.1Q-tagged (default untagged)
//!
//! # Fan-out: more [[route]]s with the same listen, source and ssrc are more copies of
//! # that stream (subscribers, or trunks to relay nodes that keep the packet as it
//! # is); the kernel replicates them. Each copy needs its own out_dst; copies of a
//! # stream with several leave untagged.
//! [[route]]
//! listen = "198.51.100.2:5004"
//! source = "198.51.100.1:40000"
//! ssrc = 0x11223344
//! out_src = "203.0.113.2:5006"
//! out_dst = "203.0.113.9:6000"
//!
//! # Cluster (see cluster/): this node's name, its node API and the shared secret,
//! # for both kinds of trunk (plain-RTP links, WebRTC rooms).
//! [cluster]
//! node = "origin"
//! api = "203.0.113.2:7000"        # the node API: links' demand, rooms' relays (private)
//! secret_file = "/etc/edgefwd/cluster.secret"
//! lapse = 5                       # s a downstream's demand lasts without refresh
//! new_rooms_per_second = 20       # rooms new here asked of upstreams, at most
//!
//! [[cluster.upstream]]            # WebRTC: room (or "*") from node, at its node API
//! room = "*"
//! node = "origin-2"
//! api = "203.0.113.5:7000"
//!
//! [[stream]]                      # offered on down links without a local subscriber
//! listen = "198.51.100.2:5004"
//! source = "198.51.100.1:40000"
//! ssrc = 0x11223344
//!
//! [[link]]                        # we feed relay-1 the SSRCs it asks for
//! peer = "relay-1"
//! direction = "down"
//! local = "203.0.113.2:5004"      # trunk copies leave from here
//! remote = "203.0.113.7:5004"     # relay-1's listener
//! # at relay-1: peer = "origin", direction = "up", the two addresses swapped,
//! # api = "203.0.113.2:7000"
//!
//! [webrtc]                      # optional: WHIP/WHEP control plane (see webrtc::WebrtcConfig)
//! http = "0.0.0.0:8080"
//! media = "0.0.0.0:50000"
//! candidates = ["203.0.113.10"]
//! ```

use std::{net::SocketAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::cluster::{ClusterConfig, Direction, Link, StreamConfig};
pub use crate::dataplane::config::{ListenerConfig, RouteConfig, fmt_mac, parse_mac};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// WebRTC control plane (WHIP/WHEP); absent: off.
    pub webrtc: Option<crate::webrtc::WebrtcConfig>,
    /// This node in a cascade; needed by `[[link]]`.
    pub cluster: Option<ClusterConfig>,
    #[serde(default, rename = "link")]
    pub links: Vec<Link>,
    #[serde(default, rename = "stream")]
    pub streams: Vec<StreamConfig>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text)?;
        for (i, r) in cfg.routes.iter().enumerate() {
            if r.pt_from.is_some() != r.pt_to.is_some() {
                bail!(
                    "route #{} (ssrc {}): set both pt_from and pt_to, or neither",
                    i + 1,
                    r.ssrc
                );
            }
            if let Some(v) = r.vlan
                && !(1..=4094).contains(&v)
            {
                bail!(
                    "route #{} (ssrc {}): vlan = {v}; VLAN ids are 1-4094 (leave it out for untagged)",
                    i + 1,
                    r.ssrc
                );
            }
            if let Some(j) = cfg.routes[..i].iter().position(|o| {
                (o.listen, o.source, o.ssrc, o.out_dst) == (r.listen, r.source, r.ssrc, r.out_dst)
            }) {
                bail!(
                    "route #{} (ssrc {}) repeats route #{}: same stream, same out_dst {}; \
                     a stream's copies each need their own destination",
                    i + 1,
                    r.ssrc,
                    j + 1,
                    r.out_dst
                );
            }
            if !cfg.listeners.iter().any(|l| l.addr == r.listen) {
                bail!(
                    "route #{} (ssrc {}): listen {} has no [[listener]] with that addr; add one",
                    i + 1,
                    r.ssrc,
                    r.listen
                );
            }
        }
        cfg.check_cascade()?;
        Ok(cfg)
    }

    fn check_cascade(&self) -> Result<()> {
        let is_listener = |a: SocketAddr| self.listeners.iter().any(|l| l.addr == a);
        for s in &self.streams {
            if !is_listener(s.listen) {
                bail!(
                    "[[stream]] (ssrc {}): listen {} has no [[listener]] with that addr; add one",
                    s.ssrc,
                    s.listen
                );
            }
        }
        let Some(c) = &self.cluster else {
            if !self.links.is_empty() {
                bail!(
                    "[[link]] needs a [cluster] section: node = this node's name, \
                     secret_file = the cluster secret (and api = an address, for down links)"
                );
            }
            return Ok(());
        };
        c.check()?;
        if !c.upstream.is_empty() && self.webrtc.is_none() {
            bail!(
                "[[cluster.upstream]] names where WebRTC rooms come from, and this config has \
                 no [webrtc] section to serve them; add one or remove the upstreams"
            );
        }
        crate::cluster::check_links(&c.node, &self.links)?;
        for l in &self.links {
            match l.direction {
                Direction::Up if !is_listener(l.local) => bail!(
                    "link {}: its trunk arrives at local {}, which has no [[listener]]; add one",
                    l.peer,
                    l.local
                ),
                Direction::Down if c.api.is_none() => bail!(
                    "link {} is a down link: set [cluster] api, where {} sends its demand",
                    l.peer,
                    l.peer
                ),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webrtc_section_and_its_candidate_rule() {
        let c = Config::parse(
            "[webrtc]\nhttp = \"127.0.0.1:8080\"\nmedia = \"127.0.0.1:50000\"\ntoken = \"t\"\n",
        )
        .unwrap();
        let w = c.webrtc.unwrap();
        assert_eq!(
            w.candidates().unwrap(),
            vec!["127.0.0.1:50000".parse().unwrap()]
        );
        assert_eq!((w.token.as_deref(), w.consent_timeout), (Some("t"), 30));
        let c = Config::parse("[webrtc]\nhttp = \"0.0.0.0:8080\"\nmedia = \"0.0.0.0:50000\"\n")
            .unwrap();
        let e = c.webrtc.unwrap().candidates().unwrap_err().to_string();
        assert!(e.contains("set candidates"), "{e}");
        let c = Config::parse(
            "[webrtc]\nhttp = \"0.0.0.0:8080\"\nmedia = \"0.0.0.0:50000\"\ncandidates = [\"192.0.2.7\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.webrtc.unwrap().candidates().unwrap(),
            vec!["192.0.2.7:50000".parse().unwrap()]
        );
        let e = format!(
            "{:#}",
            Config::parse("[webrtc]\nhttp = \"127.0.0.1:1\"\nmedia = \"x\"\n").unwrap_err()
        );
        assert!(e.contains("media"), "{e}");
    }

    #[test]
    fn parses_full_example() {
        let c = Config::parse(
            r#"
            [[listener]]
            addr = "198.51.100.2:5004"
            [[route]]
            listen = "198.51.100.2:5004"
            source = "198.51.100.1:40000"
            ssrc = 0x11223344
            out_src = "203.0.113.2:5006"
            out_dst = "203.0.113.1:6000"
            pt_from = 96
            pt_to = 100
            dst_mac = "02:00:00:00:00:01"
            "#,
        )
        .unwrap();
        assert!(c.listeners[0].drop_unknown_source);
        assert!(!c.listeners[0].drop_no_route);
        assert_eq!(c.routes[0].ssrc, 0x11223344);
        assert_eq!(
            parse_mac(c.routes[0].dst_mac.as_deref().unwrap()).unwrap()[5],
            1
        );
    }

    #[test]
    fn errors_say_what_to_fix() {
        let e = Config::parse("[[listener]]\naddr = \"1.2.3.4\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("invalid socket address"), "{e:#}");
        let e = Config::parse("[[listner]]\n").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field"), "{e:#}");
        let e = Config::parse(
            "[[route]]\nlisten=\"1.1.1.1:1\"\nsource=\"1.1.1.2:1\"\nssrc=1\nout_src=\"1.1.1.1:2\"\nout_dst=\"1.1.1.3:1\"\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("has no [[listener]]"), "{e:#}");
        let copy = "[[route]]\nlisten=\"1.1.1.1:1\"\nsource=\"1.1.1.2:1\"\nssrc=1\nout_src=\"1.1.1.1:2\"\nout_dst=\"1.1.1.3:1\"\n";
        let two = format!(
            "[[listener]]\naddr=\"1.1.1.1:1\"\n{copy}{}",
            copy.replace("1.1.1.3", "1.1.1.4")
        );
        assert_eq!(
            Config::parse(&two).unwrap().routes.len(),
            2,
            "two copies of one stream"
        );
        let e =
            Config::parse(&format!("[[listener]]\naddr=\"1.1.1.1:1\"\n{copy}{copy}")).unwrap_err();
        assert!(format!("{e:#}").contains("repeats route #1"), "{e:#}");
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:zz").is_err());
    }
}

//! Turns a configured route into map values: egress interface from the kernel routing
//! table, MAC addresses from the interface and the neighbour table. Done once, in the
//! control plane; the data plane never pays for a FIB lookup.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use crate::{
    dataplane::config::{RouteConfig, parse_mac},
    dataplane::maps::Route,
    dataplane::preflight,
};

/// `ip -j ARGS` as JSON.
fn ip_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running `ip` (iproute2): install iproute2")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Value::Array(vec![]));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing `ip -j {}`", args.join(" ")))
}

/// The interface's MAC. Asks netlink (`ip link`) rather than /sys/class/net, which
/// shows the interfaces of the namespace sysfs was mounted in, not necessarily ours.
pub fn iface_mac(iface: &str) -> Result<[u8; 6]> {
    let v = ip_json(&["link", "show", "dev", iface])?;
    let mac = v[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow!("interface {iface} has no MAC address (not Ethernet?)"))?;
    parse_mac(mac)
}

/// The interface's receive queues in use (one AF_XDP socket per queue), from the
/// ethtool channel settings (ETHTOOL_GCHANNELS): `ip` shows only the allocated maximum,
/// and sysfs may be another namespace's. A driver without channel settings has one.
pub fn rx_queues(iface: &str) -> Result<u32> {
    #[repr(C)]
    #[derive(Default)]
    struct Channels {
        cmd: u32,
        max: [u32; 4],
        rx: u32,
        tx: u32,
        other: u32,
        combined: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut Channels,
        _pad: [u8; 16],
    }
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if iface.len() >= 16 {
        bail!("interface name {iface} is longer than 15 bytes");
    }
    let mut ch = Channels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut ch,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket only for the ioctl, closed below; `req` and `ch` live
    // across the call, which writes only inside `ch`.
    let r = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!(
                "socket for the ethtool query: {}",
                std::io::Error::last_os_error()
            );
        }
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        libc::close(fd);
        r
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(1);
        }
        bail!("reading the channel settings of {iface}: {e}");
    }
    Ok((ch.rx + ch.combined).max(1))
}

/// (egress interface, next hop) for `dst` as the kernel would route it.
pub fn route_get(dst: IpAddr) -> Result<(String, IpAddr)> {
    let v = ip_json(&["route", "get", &dst.to_string()])?;
    let r = v
        .get(0)
        .ok_or_else(|| anyhow!("no route to {dst}: add one (`ip route`)"))?;
    let dev = r["dev"]
        .as_str()
        .ok_or_else(|| anyhow!("no egress device for {dst} in `ip route get`"))?
        .to_string();
    let hop = match r["gateway"].as_str() {
        Some(g) => g.parse()?,
        None => dst,
    };
    Ok((dev, hop))
}

fn neigh(hop: IpAddr, dev: &str) -> Result<Option<[u8; 6]>> {
    let v = ip_json(&["neigh", "show", "to", &hop.to_string(), "dev", dev])?;
    for n in v.as_array().into_iter().flatten() {
        let failed = n["state"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "FAILED" || x == "INCOMPLETE"));
        if let (Some(mac), false) = (n["lladdr"].as_str(), failed) {
            return Ok(Some(parse_mac(mac)?));
        }
    }
    Ok(None)
}

/// The next hop's MAC; if the kernel has none yet, makes it resolve one by sending an
/// empty datagram to the discard port (9) of the next hop, then waits up to 3 s.
pub fn neighbour_mac(hop: IpAddr, dev: &str, from: IpAddr) -> Result<[u8; 6]> {
    if let Some(m) = neigh(hop, dev)? {
        return Ok(m);
    }
    let s = UdpSocket::bind(SocketAddr::new(from, 0))
        .with_context(|| format!("binding {from} to trigger neighbour resolution"))?;
    let _ = s.send_to(&[], SocketAddr::new(hop, 9));
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(m) = neigh(hop, dev)? {
            return Ok(m);
        }
    }
    bail!(
        "no MAC address for next hop {hop} on {dev} (neighbour resolution timed out): is the \
         host up? Or set dst_mac in the route"
    )
}

/// Resolves a configured route; `ingress_ifindex` makes routes back out of the
/// ingress interface use XDP_TX.
pub fn resolve(rc: &RouteConfig) -> Result<Route> {
    let (dev, hop) = match &rc.egress {
        Some(dev) => (dev.clone(), rc.out_dst.ip()),
        None => route_get(rc.out_dst.ip())?,
    };
    let ifindex = preflight::ifindex(&dev)?;
    let src_mac = iface_mac(&dev)?;
    let dst_mac = match &rc.dst_mac {
        Some(m) => parse_mac(m)?,
        None => neighbour_mac(hop, &dev, rc.out_src.ip())?,
    };
    Ok(Route {
        egress_ifindex: ifindex,
        src_mac,
        dst_mac,
        ..unresolved(rc)
    })
}

/// The route as configured, without egress interface or MACs: what the userspace data
/// path needs (the kernel's stack does L2 there), and the base `resolve` fills in.
pub fn unresolved(rc: &RouteConfig) -> Route {
    Route {
        listen: rc.listen,
        source: rc.source,
        ssrc: rc.ssrc,
        out_src: rc.out_src,
        out_dst: rc.out_dst,
        egress_ifindex: 0,
        src_mac: [0; 6],
        dst_mac: [0; 6],
        ssrc_out: rc.ssrc_out.unwrap_or(rc.ssrc),
        seq_delta: rc.seq_delta,
        ts_delta: rc.ts_delta,
        pt_remap: rc.pt_from.zip(rc.pt_to),
        vlan: rc.vlan,
    }
}

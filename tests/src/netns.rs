//! Network namespaces with unique names, deleted on drop even when a test panics.

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    process::{Command, Output},
};

use crate::{orphaned, require_root, unique};

pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deletes namespaces left by killed test or bench processes (once per process); their
/// names are `efwd-<role>-<pid>x<n>`.
fn sweep() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let out = ip(&["netns", "list"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let role_end = name
                .strip_prefix("efwd-")
                .and_then(|r| r.find('-'))
                .map(|i| "efwd-".len() + i + 1);
            if let Some(end) = role_end
                && orphaned(name, &name[..end])
            {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    });
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        require_root();
        sweep();
        let name = unique(&format!("efwd-{prefix}-"));
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // No duplicate address detection, link-local addresses included: a tentative
        // address stalls neighbour discovery for a second or two.
        for key in ["all", "default"] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.accept_dad=0"),
            ]);
        }
        ns
    }

    /// Runs a command inside the namespace; panics with its stderr if it fails.
    /// Runs a command in the namespace and returns what it did, failed or not; a
    /// command still running after 60 s is killed and fails the test.
    pub fn exec_status(&self, args: &[&str]) -> Output {
        crate::output_within(
            self.command(args[0]).args(&args[1..]),
            std::time::Duration::from_secs(60),
        )
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let out = self.exec_status(args);
        assert!(
            out.status.success(),
            "{} in {} failed: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A command that runs in this network namespace. Unlike `ip netns exec`, it keeps
    /// the caller's mount namespace, so /sys/fs/bpf (and pinned maps) stay visible.
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.name, program)
    }

    /// Runs `f` on a thread that has entered this namespace (sockets, ifindexes and
    /// XDP attachments it makes belong to the namespace).
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The namespace's UDP checksum error counters (InCsumErrors), IPv4 and IPv6: the
    /// kernel's own check of what a data plane sent into it.
    pub fn udp_csum_errors(&self) -> (u64, u64) {
        let snmp = String::from_utf8(self.exec(&["cat", "/proc/net/snmp"]).stdout).unwrap();
        let snmp6 = String::from_utf8(self.exec(&["cat", "/proc/net/snmp6"]).stdout).unwrap();
        let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (h, v) = (lines.next().unwrap(), lines.next().unwrap());
        let idx = h
            .split_whitespace()
            .position(|f| f == "InCsumErrors")
            .unwrap();
        let v4: u64 = v.split_whitespace().nth(idx).unwrap().parse().unwrap();
        let v6: u64 = snmp6
            .lines()
            .find(|l| l.starts_with("Udp6InCsumErrors"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        (v4, v6)
    }

    /// Like `run`, but returns the handle so the caller can do other work meanwhile.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

pub fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a file descriptor we opened and hold; it only changes this thread's namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Publisher ⇄ forwarder ⇄ receiver, each in its own namespace:
///
/// ```text
///  pub: p0 198.51.100.1/24 2001:db8:a::1  ──  f0 198.51.100.2 2001:db8:a::2 :fwd
///  rcv: r0 203.0.113.1/24  2001:db8:b::1  ──  f1 203.0.113.2  2001:db8:b::2 :fwd
/// ```
pub struct Topology {
    pub publisher: NetNs,
    pub forwarder: NetNs,
    pub receiver: NetNs,
}

pub const PUB_V4: &str = "198.51.100.1";
pub const FWD_A_V4: &str = "198.51.100.2";
pub const FWD_B_V4: &str = "203.0.113.2";
pub const RCV_V4: &str = "203.0.113.1";
pub const PUB_V6: &str = "2001:db8:a::1";
pub const FWD_A_V6: &str = "2001:db8:a::2";
pub const FWD_B_V6: &str = "2001:db8:b::2";
pub const RCV_V6: &str = "2001:db8:b::1";

impl Topology {
    pub fn new() -> Topology {
        Self::with_queues(1)
    }

    /// The topology with `queues` receive and transmit queues on the publisher's link
    /// (p0/f0): one AF_XDP socket, worker and engine per queue at the forwarder.
    pub fn with_queues(queues: u32) -> Topology {
        let t = Topology {
            publisher: NetNs::new("pub"),
            forwarder: NetNs::new("fwd"),
            receiver: NetNs::new("rcv"),
        };
        link_with_queues(
            &t.publisher,
            "p0",
            &[PUB_V4, PUB_V6],
            &t.forwarder,
            "f0",
            &[FWD_A_V4, FWD_A_V6],
            queues,
        );
        link(
            &t.receiver,
            "r0",
            &[RCV_V4, RCV_V6],
            &t.forwarder,
            "f1",
            &[FWD_B_V4, FWD_B_V6],
        );
        t
    }
}

impl Topology {
    /// Resolves every neighbour the tests send to, and waits until each is resolved:
    /// a burst into an unresolved neighbour mostly dies in the stack's small queue.
    pub fn settle(&self) {
        for (ns, targets) in [
            (&self.publisher, [FWD_A_V4, FWD_A_V6]),
            (&self.forwarder, [RCV_V4, RCV_V6]),
            (&self.forwarder, [PUB_V4, PUB_V6]),
        ] {
            for t in targets {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                loop {
                    let addr: std::net::IpAddr = t.parse().unwrap();
                    let bind = if addr.is_ipv6() {
                        "[::]:0"
                    } else {
                        "0.0.0.0:0"
                    };
                    let target = std::net::SocketAddr::new(addr, 9);
                    ns.run(move || {
                        let s = std::net::UdpSocket::bind(bind).unwrap();
                        let _ = s.send_to(b"", target);
                    });
                    let out = ns.exec(&["ip", "neigh", "show", "to", t]);
                    let text = String::from_utf8_lossy(&out.stdout);
                    if text.contains("lladdr")
                        && !text.contains("INCOMPLETE")
                        && !text.contains("FAILED")
                    {
                        break;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "neighbour {t} never resolved in {}",
                        ns.name
                    );
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

pub fn link(a: &NetNs, an: &str, aaddrs: &[&str], b: &NetNs, bn: &str, baddrs: &[&str]) {
    link_with_queues(a, an, aaddrs, b, bn, baddrs, 1)
}

/// [`link`] with `queues` receive and transmit queues on both ends (a veth frame
/// arrives on the receive queue numbered as the transmit queue it left by).
pub fn link_with_queues(
    a: &NetNs,
    an: &str,
    aaddrs: &[&str],
    b: &NetNs,
    bn: &str,
    baddrs: &[&str],
    queues: u32,
) {
    let q = queues.to_string();
    ip(&[
        "link",
        "add",
        an,
        "netns",
        &a.name,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        bn,
        "netns",
        &b.name,
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
    ]);
    for (ns, dev, addrs) in [(a, an, aaddrs), (b, bn, baddrs)] {
        for addr in addrs {
            // An address may name its prefix (a.b.c.d/26: several links share one
            // documentation /24); else /24 or /64.
            let cidr = if addr.contains('/') {
                addr.to_string()
            } else if addr.contains(':') {
                format!("{addr}/64")
            } else {
                format!("{addr}/24")
            };
            // nodad: no 1-2 s of duplicate address detection before the address works.
            if addr.contains(':') {
                ns.exec(&["ip", "addr", "add", &cidr, "dev", dev, "nodad"]);
            } else {
                ns.exec(&["ip", "addr", "add", &cidr, "dev", dev]);
            }
        }
        // Locally sent UDP leaves veth with a partial checksum (CHECKSUM_PARTIAL: only
        // the pseudo-header sum, to be completed by "hardware"); XDP sees that raw
        // frame and its rewrite cannot complete it. Packets off a real wire carry full
        // checksums, so make the test hosts send those.
        ns.exec(&["ethtool", "-K", dev, "tx", "off"]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
    }
}

/// A command that runs in the network namespace named `name` (see [`NetNs::command`]).
pub fn command_in(name: &str, program: &str) -> Command {
    let path = CString::new(format!("/run/netns/{name}")).unwrap();
    let mut c = Command::new(program);
    // SAFETY: the pre_exec closure only calls open, setns and close (async-signal-safe)
    // on a path made before the fork.
    unsafe {
        c.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    c
}

/// A hub namespace with a bridge at 198.51.100.1/24 (where a test puts Redis and its
/// clients) and `n` node namespaces on it at 198.51.100.11, .12, ... (each `eth0`);
/// all deleted on drop, which deletes their links too.
pub struct Fabric {
    pub hub: NetNs,
    pub nodes: Vec<NetNs>,
}

impl Fabric {
    /// The hub's address on the bridge.
    pub const HUB: &'static str = "198.51.100.1";

    /// Node `i`'s address.
    pub fn ip_of(i: usize) -> String {
        format!("198.51.100.{}", 11 + i)
    }

    pub fn new(n: usize) -> Fabric {
        let hub = NetNs::new("hub");
        hub.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        hub.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", Self::HUB),
            "dev",
            "br0",
        ]);
        hub.exec(&["ip", "link", "set", "br0", "up"]);
        let nodes: Vec<NetNs> = (0..n)
            .map(|i| {
                let ns = NetNs::new("node");
                let port = format!("v{i}");
                hub.exec(&[
                    "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                    &ns.name,
                ]);
                hub.exec(&["ip", "link", "set", &port, "master", "br0"]);
                hub.exec(&["ip", "link", "set", &port, "up"]);
                ns.exec(&[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", Self::ip_of(i)),
                    "dev",
                    "eth0",
                ]);
                ns.exec(&["ip", "link", "set", "eth0", "up"]);
                ns
            })
            .collect();
        Fabric { hub, nodes }
    }

    /// `GET url` from the hub: the body.
    pub fn get(&self, url: &str) -> String {
        let url = url.to_string();
        self.hub.run(move || {
            ureq::get(&url)
                .call()
                .unwrap_or_else(|e| panic!("GET {url}: {e}"))
                .body_mut()
                .read_to_string()
                .unwrap()
        })
    }
}

//! Network namespaces with unique names, deleted on drop even when a test panics.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
};

use crate::{require_root, unique};

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

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        require_root();
        let name = unique(&format!("efwd-{prefix}-"));
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; panics with its stderr if it fails.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
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
        let t = Topology {
            publisher: NetNs::new("pub"),
            forwarder: NetNs::new("fwd"),
            receiver: NetNs::new("rcv"),
        };
        link(
            &t.publisher,
            "p0",
            &[PUB_V4, PUB_V6],
            &t.forwarder,
            "f0",
            &[FWD_A_V4, FWD_A_V6],
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

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

fn link(a: &NetNs, an: &str, aaddrs: &[&str], b: &NetNs, bn: &str, baddrs: &[&str]) {
    ip(&[
        "link", "add", an, "netns", &a.name, "type", "veth", "peer", "name", bn, "netns", &b.name,
    ]);
    for (ns, dev, addrs) in [(a, an, aaddrs), (b, bn, baddrs)] {
        for addr in addrs {
            let cidr = if addr.contains(':') {
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
        ns.exec(&["ip", "link", "set", dev, "up"]);
    }
}

//! Checks that turn kernel errno soup into a sentence saying what to fix.

use std::path::Path;

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "edgefwd needs root (CAP_BPF, CAP_NET_ADMIN) to load XDP programs and open pinned \
             maps: run it with sudo"
        );
    }
    Ok(())
}

/// The pin directory must be on a bpffs; creates the directory if the bpffs is there.
pub fn require_bpffs(pin_dir: &Path) -> Result<()> {
    // The nearest existing ancestor tells which filesystem the directory would be on.
    let parent = pin_dir
        .ancestors()
        .skip(1)
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    // SAFETY: statfs is plain C data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes())?;
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-parameter for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem, so maps cannot be pinned: mount one with \
             `mount -t bpf bpf {}` (or run `cargo xtask setup`). Note that `ip netns exec` \
             gives the command a fresh /sys without the bpffs; use `nsenter --net=/run/netns/NS` \
             instead",
            pin_dir.display(),
            parent.display()
        );
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    Ok(())
}

pub fn ifindex(iface: &str) -> Result<u32> {
    let c = std::ffi::CString::new(iface)?;
    // SAFETY: `c` is a NUL-terminated interface name.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!(
            "interface {iface:?} does not exist in this network namespace: check `ip link` \
             (inside a namespace, run edgefwd with `ip netns exec NS`)"
        );
    }
    Ok(idx)
}

pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname succeeded (checked above), so `buf` holds a NUL-terminated name.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

/// Kernel (major, minor) from uname.
pub fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: utsname is plain C data; all zeroes is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid out-parameter for the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: uname succeeded (checked above), so `release` is NUL-terminated.
    let rel = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
    let mut it = rel.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// BPF-to-BPF calls with packet pointers, DEVMAP_HASH and bpf_link XDP attach need 5.9.
pub fn require_kernel() -> Result<()> {
    if let Some((maj, min)) = kernel_version()
        && (maj, min) < (5, 9)
    {
        bail!(
            "kernel {maj}.{min} is too old for the XDP data plane (needs 5.9+): upgrade the \
             kernel or run with `--datapath user`"
        );
    }
    Ok(())
}

/// Raises the open-file limit to its hard limit: every WebRTC client holds an HTTP
/// connection while it signals, and the default soft limit (1024) is reached by a
/// burst of clients well below the configured caps. Returns (before, after).
pub fn raise_fd_limit() -> Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    let before = l.rlim_cur;
    if l.rlim_cur < l.rlim_max {
        l.rlim_cur = l.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
            bail!(
                "setrlimit(RLIMIT_NOFILE, {}): {} (raise LimitNOFILE in the service unit)",
                l.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok((before, l.rlim_cur))
}

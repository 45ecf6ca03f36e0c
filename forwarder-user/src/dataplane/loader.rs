//! Loads the XDP object with its maps pinned under the pin directory, and attaches it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapInfo,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use forwarder_common::{
    PROG_FANOUT, egress, fanout, ifmac, links, listeners, peers, route_stats, routes, routes4,
    sources, verdicts,
};

use crate::{EBPF_OBJECT, EBPF_TOOLS_OBJECT, dataplane::preflight};

/// Maps that carry control-plane state, shared by the daemon, the CLI and simulate.
pub const STATE_MAPS: [&str; 9] = [
    links::MAP_NAME,
    peers::MAP_NAME,
    fanout::COPIES_MAP_NAME,
    routes4::MAP_NAME,
    routes::MAP_NAME,
    listeners::MAP_NAME,
    sources::MAP_NAME,
    egress::MAP_NAME,
    ifmac::MAP_NAME,
];
/// Counter maps; simulate leaves these unpinned so its runs do not count as traffic.
pub const COUNTER_MAPS: [&str; 4] = [
    links::STATE_MAP_NAME,
    route_stats::MAP_NAME,
    verdicts::MAP_NAME,
    fanout::COPY_VERDICT_MAP_NAME,
];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Counters {
    /// Pinned: the live counters the stats CLI and /metrics read.
    Pinned,
    /// Private to this load (simulate, fixture tests).
    Private,
}

/// Loads the object; state maps are pinned at (or reused from) `pin_dir`.
pub fn load(pin_dir: &Path, counters: Counters) -> Result<Ebpf> {
    load_sized(pin_dir, counters, &[])
}

/// [`load`] with some maps given another capacity than the object's (tests fill a
/// small route table to its end).
pub fn load_sized(pin_dir: &Path, counters: Counters, sizes: &[(&str, u32)]) -> Result<Ebpf> {
    preflight::require_root()?;
    preflight::require_kernel()?;
    preflight::require_bpffs(pin_dir)?;
    let paths: Vec<(&str, PathBuf)> = STATE_MAPS
        .iter()
        .chain(if counters == Counters::Pinned {
            &COUNTER_MAPS[..]
        } else {
            &[]
        })
        .map(|name| (*name, pin_dir.join(name)))
        .collect();
    check_pinned_layouts(&paths, sizes)?;
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, n) in sizes {
        loader.map_max_entries(name, *n);
    }
    let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
        format!(
            "loading the XDP object (maps pinned in {})",
            pin_dir.display()
        )
    })?;
    load_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// Loads the test and benchmark programs (`edgefwd_pass`, `edgefwd_drop`,
/// `edgefwd_udp_verify`, `edgefwd_gen`): their own object, nothing pinned, so the
/// daemon's object carries the forwarder alone.
pub fn load_tools() -> Result<Ebpf> {
    preflight::require_root()?;
    preflight::require_kernel()?;
    let mut ebpf = EbpfLoader::new()
        .load(EBPF_TOOLS_OBJECT)
        .context("loading the test/benchmark XDP object")?;
    load_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// Loads every program of an object into the kernel: XDP programs, and TC ones (the
/// replicator; a benchmark sink in the tools object).
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for (name, prog) in ebpf.programs_mut() {
        let loaded = match prog {
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::Xdp(p) => p.load(),
            _ => bail!("{name} is neither an XDP nor a TC program"),
        };
        loaded.with_context(|| format!("the verifier rejected {name}"))?;
    }
    Ok(())
}

/// Attaches the TC program `name` of a loaded object to `iface`'s ingress, for as long
/// as the `Ebpf` lives (tests, benchmarks).
pub fn attach_tc(ebpf: &mut Ebpf, name: &str, iface: &str) -> Result<()> {
    if let Err(e) = tc::qdisc_add_clsact(iface) {
        log::debug!("clsact on {iface}: {e} (exists already, or tcx makes it unneeded)");
    }
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("{name} is not a TC program"))?;
    prog.attach(iface, TcAttachType::Ingress)
        .with_context(|| format!("attaching {name} to the ingress of {iface}"))?;
    Ok(())
}

fn replicator(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(PROG_FANOUT)
        .ok_or_else(|| anyhow!("program {PROG_FANOUT} missing from the object"))?
        .try_into()
        .with_context(|| format!("{PROG_FANOUT} is not a TC program"))
}

/// Attaches the TC replicator to `iface`'s ingress (tcx): streams with several copies
/// are replicated there. Lasts as long as the `Ebpf` (tests, bench); the daemon uses
/// [`attach_pinned`], which does this too.
pub fn attach_fanout(ebpf: &mut Ebpf, iface: &str) -> Result<()> {
    attach_fanout_link(ebpf, iface).map(|_| ())
}

fn attach_fanout_link(
    ebpf: &mut Ebpf,
    iface: &str,
) -> Result<aya::programs::tc::SchedClassifierLinkId> {
    // Kernels before tcx (6.6) need the clsact qdisc; with tcx it is harmless.
    if let Err(e) = tc::qdisc_add_clsact(iface) {
        log::debug!("clsact on {iface}: {e} (exists already, or tcx makes it unneeded)");
    }
    replicator(ebpf)?
        .attach(iface, TcAttachType::Ingress)
        .with_context(|| {
            format!("attaching the TC replicator {PROG_FANOUT} to the ingress of {iface}")
        })
}

/// The layout of a map as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// aya reuses a pinned map of the same name without looking at it, so a pin left by
/// an incompatible build would be handed to this program silently (its entries read
/// with the wrong layout). A layout change gets a new map name (`_V2`...), so a pin
/// whose layout differs is damage or a downgrade: refuse, and say how to clear it.
fn check_pinned_layouts(paths: &[(&str, PathBuf)], sizes: &[(&str, u32)]) -> Result<()> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the embedded XDP object")?;
    for (name, path) in paths {
        if !path.exists() {
            continue;
        }
        let def = obj
            .maps
            .get(*name)
            .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))?;
        let want = Layout {
            map_type: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries: sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(def.max_entries(), |(_, n)| *n),
        };
        let info = MapInfo::from_pin(path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        let have = Layout {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if have != want {
            bail!(
                "the pinned map {} has another layout than this build's {name} ({have}; this \
                 build needs {want}): it is from an incompatible build of edgefwd. Stop \
                 forwarding and clear the pins with `edgefwd down --pin-dir {}` (or \
                 `rm {}`), then start again",
                path.display(),
                path.parent().unwrap_or(Path::new("/")).display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// Pins in `pin_dir` that look like ours but that this build neither uses nor makes:
/// maps of older layouts (`EFWD_ROUTES4_V1` once `_V2` is current).
pub fn stale_pins(pin_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("EFWD_")
            && !name.starts_with(LINK_PIN_PREFIX)
            && !name.starts_with(TC_LINK_PIN_PREFIX)
            && !STATE_MAPS.contains(&name.as_str())
            && !COUNTER_MAPS.contains(&name.as_str())
        {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// Removes [`stale_pins`] once every pinned link in `pin_dir` runs this build's
/// program (an older daemon on another interface may still use them; its program
/// holds its maps either way, but its CLI opens them by pin). Returns what it removed.
pub fn remove_stale_pins(pin_dir: &Path, adopted_ifaces: &[&str]) -> Result<Vec<PathBuf>> {
    let others: Vec<String> = pinned_links(pin_dir)
        .into_iter()
        .map(|(i, _)| i)
        .filter(|i| !adopted_ifaces.contains(&i.as_str()))
        .collect();
    let stale = stale_pins(pin_dir);
    if !others.is_empty() {
        if !stale.is_empty() {
            log::warn!(
                "keeping {} pin(s) of an older layout in {}: the XDP link(s) on {} may still \
                 use them; restart those daemons, then this one removes them",
                stale.len(),
                pin_dir.display(),
                others.join(", ")
            );
        }
        return Ok(Vec::new());
    }
    for p in &stale {
        std::fs::remove_file(p)
            .with_context(|| format!("removing the stale pin {}", p.display()))?;
    }
    Ok(stale)
}

pub fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}

/// Attaches in native mode, falling back to generic (skb) mode with a warning.
/// Returns the mode used. The attachment lasts as long as the `Ebpf` (tests, bench);
/// the daemon uses [`attach_pinned`].
pub fn attach(ebpf: &mut Ebpf, prog_name: &str, iface: &str) -> Result<XdpMode> {
    attach_link(ebpf, prog_name, iface).map(|(m, _)| m)
}

fn attach_link(ebpf: &mut Ebpf, prog_name: &str, iface: &str) -> Result<(XdpMode, XdpLinkId)> {
    preflight::ifindex(iface)?;
    let prog = program(ebpf, prog_name)?;
    match prog.attach(iface, XdpMode::Driver) {
        Ok(id) => Ok((XdpMode::Driver, id)),
        Err(native) => {
            log::warn!(
                "native XDP attach on {iface} failed ({native}); falling back to generic mode, \
                 which runs after skb allocation and is several times slower"
            );
            let id = prog.attach(iface, XdpMode::Skb).with_context(|| {
                format!(
                    "attaching {prog_name} to {iface} failed in native and generic mode; is \
                     another XDP program attached? (`ip link show {iface}`)"
                )
            })?;
            Ok((XdpMode::Skb, id))
        }
    }
}

/// The XDP link of an interface is pinned as `EFWD_XDPLINK_V1_<mode>_<iface>` (mode
/// `native` or `generic`), so XDP stays attached and forwarding goes on while no
/// daemon runs (a crash, kill -9, an upgrade), and the next daemon finds it with the
/// mode it was attached in. bpffs refuses names with a dot, which interface names
/// may have (eth0.100): the name is escaped.
pub const LINK_PIN_PREFIX: &str = "EFWD_XDPLINK_V1_";
/// The TC replicator's link of an interface: `EFWD_TCLINK_V1_<iface>`, beside its XDP
/// link and for the same reason.
pub const TC_LINK_PIN_PREFIX: &str = "EFWD_TCLINK_V1_";

fn tc_link_pin_name(iface: &str) -> String {
    let escaped = iface.replace('%', "%25").replace('.', "%2e");
    format!("{TC_LINK_PIN_PREFIX}{escaped}")
}

/// Takes over the TC link an earlier daemon pinned for `iface` (program replaced in
/// one step), or attaches anew and pins the link.
fn attach_fanout_pinned(ebpf: &mut Ebpf, iface: &str, pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(tc_link_pin_name(iface));
    if path.exists() {
        let adopted = PinnedLink::from_pin(&path)
            .map_err(anyhow::Error::from)
            .and_then(|p| Ok(SchedClassifierLink::try_from(FdLink::from(p))?))
            .and_then(|l| Ok(replicator(ebpf)?.attach_to_link(l)?));
        match adopted {
            Ok(_) => return Ok(()),
            Err(e) => {
                log::warn!(
                    "the pinned TC link {} could not be taken over ({e:#}); attaching anew",
                    path.display()
                );
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing the stale pin {}", path.display()))?;
            }
        }
    }
    let id = attach_fanout_link(ebpf, iface)?;
    let link = replicator(ebpf)?
        .take_link(id)
        .context("taking the TC link to pin it")?;
    let fd = FdLink::try_from(link).map_err(|e: aya::programs::links::LinkError| {
        anyhow!(
            "the TC replicator on {iface} was attached without a bpf_link ({e}), so it \
             cannot outlive the daemon: this kernel is older than 6.6 (tcx)"
        )
    })?;
    drop(
        fd.pin(&path)
            .with_context(|| format!("pinning the TC link at {}", path.display()))?,
    );
    Ok(())
}

fn link_pin_name(iface: &str, mode: XdpMode) -> String {
    let escaped = iface.replace('%', "%25").replace('.', "%2e");
    format!("{LINK_PIN_PREFIX}{}_{escaped}", mode_name(mode))
}

fn unescape(name: &str) -> String {
    name.replace("%2e", ".").replace("%25", "%")
}

fn mode_name(mode: XdpMode) -> &'static str {
    if mode == XdpMode::Skb {
        "generic"
    } else {
        "native"
    }
}

/// How `attach_pinned` got the program onto the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// Native ("driver") or generic.
    pub mode: XdpMode,
    /// An earlier daemon's pinned link was taken over (its program replaced in one
    /// step, bpf_link_update: no packet sees no program).
    pub adopted: bool,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.mode == XdpMode::Skb {
            "Skb"
        } else {
            "Driver"
        };
        write!(
            f,
            "XDP {mode}{}",
            if self.adopted { ", adopted" } else { "" }
        )
    }
}

/// The pinned link of `iface` in `pin_dir`, if any, with its mode.
pub fn pinned_link(pin_dir: &Path, iface: &str) -> Option<(PathBuf, XdpMode)> {
    for mode in [XdpMode::Driver, XdpMode::Skb] {
        let p = pin_dir.join(link_pin_name(iface, mode));
        if p.exists() {
            return Some((p, mode));
        }
    }
    None
}

/// Every pinned XDP link in `pin_dir`: (interface, path).
pub fn pinned_links(pin_dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(LINK_PIN_PREFIX)
            && let Some((_mode, iface)) = rest.split_once('_')
        {
            out.push((unescape(iface), e.path()));
        }
    }
    out.sort();
    out
}

/// Attaches `prog_name` to `iface` through a link pinned in `pin_dir`: takes over the
/// link an earlier daemon left (replacing its program atomically), or attaches anew
/// (native, else generic with a warning) and pins the link.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    prog_name: &str,
    iface: &str,
    pin_dir: &Path,
) -> Result<Attached> {
    preflight::ifindex(iface)?;
    if let Some((path, mode)) = pinned_link(pin_dir, iface) {
        let prog = program(ebpf, prog_name)?;
        let adopted = PinnedLink::from_pin(&path)
            .map_err(anyhow::Error::from)
            .and_then(|p| Ok(XdpLink::try_from(FdLink::from(p))?))
            .and_then(|l| Ok(prog.attach_to_link(l)?));
        match adopted {
            Ok(_) => {
                attach_fanout_pinned(ebpf, iface, pin_dir)?;
                return Ok(Attached {
                    mode,
                    adopted: true,
                });
            }
            Err(e) => {
                // The interface went away and came back, or the pin is not a link:
                // start over.
                log::warn!(
                    "the pinned XDP link {} could not be taken over ({e:#}); attaching anew",
                    path.display()
                );
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing the stale pin {}", path.display()))?;
            }
        }
    }
    let (mode, id) = attach_link(ebpf, prog_name, iface)?;
    let link = program(ebpf, prog_name)?
        .take_link(id)
        .context("taking the XDP link to pin it")?;
    let fd = FdLink::try_from(link).map_err(|e| {
        anyhow!(
            "XDP on {iface} was attached without a bpf_link ({e}), so it cannot outlive the \
             daemon: this kernel is older than 5.9"
        )
    })?;
    let path = pin_dir.join(link_pin_name(iface, mode));
    let pinned = fd
        .pin(&path)
        .with_context(|| format!("pinning the XDP link at {}", path.display()))?;
    // The pin holds the attachment now; the daemon's fd is not needed.
    drop(pinned);
    attach_fanout_pinned(ebpf, iface, pin_dir)?;
    Ok(Attached {
        mode,
        adopted: false,
    })
}

/// Detaches and removes the pinned links of `iface`, XDP and TC. Returns whether
/// there was an XDP one.
pub fn unpin_link(pin_dir: &Path, iface: &str) -> Result<bool> {
    let tc = pin_dir.join(tc_link_pin_name(iface));
    if tc.exists() {
        detach_now(&tc)?;
        std::fs::remove_file(&tc).with_context(|| format!("removing {}", tc.display()))?;
    }
    match pinned_link(pin_dir, iface) {
        Some((p, _)) => {
            detach_now(&p)?;
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Detaches the link pinned at `p` from its hook at once (BPF_LINK_DETACH). Removing
/// the pin alone lets the kernel free the link only after an RCU grace period (bpffs
/// frees its inodes that way), so the program could still be attached when `edgefwd
/// down` returns.
fn detach_now(p: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    // union bpf_attr, zeroed: obj_get is {pathname: u64, bpf_fd: u32, file_flags: u32},
    // link_detach is {link_fd: u32}.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: `attr` is a zeroed bpf_attr whose pathname points at `path`, which
    // outlives the call; the kernel reads only within its 128 bytes.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_ptr(), 128usize) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening the pinned link {}", p.display()));
    }
    let mut attr = [0u64; 16];
    attr[0] = fd as u32 as u64;
    // SAFETY: `attr` is a zeroed bpf_attr holding the link fd BPF_OBJ_GET returned.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), 128usize) };
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours (from BPF_OBJ_GET) and closed once, here.
    unsafe { libc::close(fd as libc::c_int) };
    if r < 0 {
        return Err(err).with_context(|| format!("detaching the link pinned at {}", p.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_carry_mode_and_interface_without_dots() {
        let n = link_pin_name("eth0.100", XdpMode::Driver);
        assert_eq!(n, "EFWD_XDPLINK_V1_native_eth0%2e100");
        assert!(!n.contains('.'), "bpffs refuses dots");
        let rest = n.strip_prefix(LINK_PIN_PREFIX).unwrap();
        let (mode, iface) = rest.split_once('_').unwrap();
        assert_eq!((mode, unescape(iface).as_str()), ("native", "eth0.100"));
        let n = link_pin_name("we%ird_if", XdpMode::Skb);
        let (mode, iface) = n
            .strip_prefix(LINK_PIN_PREFIX)
            .unwrap()
            .split_once('_')
            .unwrap();
        assert_eq!((mode, unescape(iface).as_str()), ("generic", "we%ird_if"));
    }
}

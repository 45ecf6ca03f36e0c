//! Loads the XDP object with its maps pinned under the pin directory, and attaches it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode},
};
use forwarder_common::{egress, listeners, route_stats, routes, routes4, sources, verdicts};

use crate::{EBPF_OBJECT, preflight};

/// Maps that carry control-plane state, shared by the daemon, the CLI and simulate.
pub const STATE_MAPS: [&str; 5] = [
    routes4::MAP_NAME,
    routes::MAP_NAME,
    listeners::MAP_NAME,
    sources::MAP_NAME,
    egress::MAP_NAME,
];
/// Counter maps; simulate leaves these unpinned so its runs do not count as traffic.
pub const COUNTER_MAPS: [&str; 2] = [route_stats::MAP_NAME, verdicts::MAP_NAME];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Counters {
    /// Pinned: the live counters the stats CLI and /metrics read.
    Pinned,
    /// Private to this load (simulate, fixture tests).
    Private,
}

/// Loads the object; state maps are pinned at (or reused from) `pin_dir`.
pub fn load(pin_dir: &Path, counters: Counters) -> Result<Ebpf> {
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
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
        format!(
            "loading the XDP object (maps pinned in {}); if a map there has another layout, \
             it is from an incompatible build: remove it with `rm {}/EFWD_*`",
            pin_dir.display(),
            pin_dir.display()
        )
    })?;
    for (name, prog) in ebpf.programs_mut() {
        let prog: &mut Xdp = prog
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))?;
        prog.load()
            .with_context(|| format!("the verifier rejected {name}"))?;
    }
    Ok(ebpf)
}

pub fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}

/// Attaches in native mode, falling back to generic (skb) mode with a warning.
/// Returns the mode used.
pub fn attach(ebpf: &mut Ebpf, prog_name: &str, iface: &str) -> Result<XdpMode> {
    preflight::ifindex(iface)?;
    let prog = program(ebpf, prog_name)?;
    match prog.attach(iface, XdpMode::Driver) {
        Ok(_) => Ok(XdpMode::Driver),
        Err(native) => {
            log::warn!(
                "native XDP attach on {iface} failed ({native}); falling back to generic mode, \
                 which runs after skb allocation and is several times slower"
            );
            prog.attach(iface, XdpMode::Skb).with_context(|| {
                format!(
                    "attaching {prog_name} to {iface} failed in native and generic mode; is \
                     another XDP program attached? (`ip link show {iface}`)"
                )
            })?;
            Ok(XdpMode::Skb)
        }
    }
}

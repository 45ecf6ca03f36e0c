//! The CLI's commands on the live pinned maps and on config files: `down`,
//! `routes`, `links`, `subs`, `check-config`.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use super::{
    args::{LinkDirection, LinksCmd, RoutesCmd, SubsCmd},
    stats,
};
use crate::{
    daemon::config::Config,
    dataplane::loader,
    dataplane::maps::{Maps, Route},
    dataplane::resolve,
};

pub fn down(pin_dir: &std::path::Path, iface: Option<&str>, keep_maps: bool) -> Result<()> {
    crate::dataplane::preflight::require_root()?;
    let links: Vec<_> = loader::pinned_links(pin_dir)
        .into_iter()
        .filter(|(i, _)| iface.is_none_or(|want| want == i))
        .collect();
    if links.is_empty() && iface.is_some() {
        bail!(
            "no pinned XDP link for {} in {} (see `ls {}`)",
            iface.unwrap_or_default(),
            pin_dir.display(),
            pin_dir.display()
        );
    }
    for (i, _) in &links {
        loader::unpin_link(pin_dir, i)?;
        println!("XDP detached from {i} (and the TC replicator)");
    }
    if !keep_maps && loader::pinned_links(pin_dir).is_empty() {
        let mut n = 0;
        for e in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("EFWD_") {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
                n += 1;
            }
        }
        let _ = std::fs::remove_dir(pin_dir);
        println!("{n} pinned map(s) removed from {}", pin_dir.display());
    }
    Ok(())
}

pub fn routes_cmd(pin_dir: &std::path::Path, cmd: RoutesCmd) -> Result<()> {
    let mut maps = Maps::open_pinned(pin_dir)?;
    match cmd {
        RoutesCmd::List { json } => {
            let rows = stats::route_rows(maps.routes()?);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                stats::print_routes(&rows);
            }
        }
        RoutesCmd::Add { copy, replace } => {
            let route = copy.route(&mut maps)?;
            if replace {
                maps.put_route(&route)?;
            } else {
                maps.add_route(&route)?;
            }
            println!(
                "route {:#010x} from {} on {} -> {} {}",
                route.ssrc,
                route.source,
                route.listen,
                route.out_dst,
                if replace { "set" } else { "added" }
            );
        }
        RoutesCmd::Del { stream: s } => {
            if !maps.del_route(&s.key())? {
                bail!(
                    "no route for SSRC {:#010x} from {} on {} (see `edgefwd routes list`)",
                    s.ssrc,
                    s.source,
                    s.listen
                );
            }
            println!(
                "route {:#010x} from {} on {} deleted",
                s.ssrc, s.source, s.listen
            );
        }
    }
    Ok(())
}

/// What `run` would refuse, found without loading anything: the same parser and the
/// same route and stream checks as the map writer. Interfaces and next hops are
/// resolved only by `run`, on the host that runs it.
pub fn check_config(files: &[PathBuf]) -> Result<()> {
    let mut nodes = Vec::new();
    for file in files {
        let cfg = Config::load(file)?;
        let ctx = || format!("in config {}", file.display());
        if let Some(w) = &cfg.webrtc {
            w.check().with_context(ctx)?;
        }
        if let Some(c) = &cfg.cluster {
            c.identity().with_context(ctx)?;
            nodes.push((c.node.clone(), cfg.links.clone()));
        }
        let routes: Vec<Route> = cfg.routes.iter().map(resolve::unresolved).collect();
        let streams = crate::dataplane::maps::group_streams(&routes);
        for (_, s) in &streams {
            crate::dataplane::maps::check_stream(s).with_context(ctx)?;
        }
        let fanout = streams.iter().filter(|(_, s)| s.len() > 1).count();
        println!(
            "{}: OK: {} listener(s), {} stream(s) with {} cop{} ({fanout} fanned out in the kernel), {} link(s), webrtc {}",
            file.display(),
            cfg.listeners.len(),
            streams.len(),
            cfg.routes.len(),
            if cfg.routes.len() == 1 { "y" } else { "ies" },
            cfg.links.len(),
            if cfg.webrtc.is_some() { "on" } else { "off" }
        );
    }
    if files.len() > 1 {
        crate::cluster::check_topology(&nodes).context("the configs together")?;
        println!(
            "cascade OK: {} node(s), {} link(s) between them, a tree",
            nodes.len(),
            nodes.iter().map(|(_, l)| l.len()).sum::<usize>() / 2
        );
    }
    Ok(())
}

pub fn links_cmd(pin_dir: &std::path::Path, cmd: LinksCmd) -> Result<()> {
    let mut maps = Maps::open_pinned(pin_dir)?;
    match cmd {
        LinksCmd::List { json } => {
            let rows = crate::cluster::status::link_rows(&maps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                stats::print_links(&rows);
            }
        }
        LinksCmd::Add {
            peer,
            direction,
            local,
            remote,
            api,
        } => {
            let l = crate::cluster::Link {
                peer,
                direction: match direction {
                    LinkDirection::Up => crate::cluster::Direction::Up,
                    LinkDirection::Down => crate::cluster::Direction::Down,
                },
                local,
                remote,
                api,
            };
            // The node's own name is the daemon's; the CLI checks everything else:
            // with this one in place of any to the same peer, still a tree.
            let mut all: Vec<_> = maps
                .links()?
                .into_iter()
                .filter(|o| o.peer != l.peer)
                .collect();
            all.push(l.clone());
            crate::cluster::check_links("", &all)?;
            maps.put_link(&l)?;
            println!("link to {} ({:?}) set", l.peer, l.direction);
        }
        LinksCmd::Del { peer } => {
            if !maps.del_link(&peer)? {
                bail!("there is no link to {peer} (see `edgefwd links list`)");
            }
            println!("link to {peer} deleted");
        }
    }
    Ok(())
}

pub fn subs_cmd(pin_dir: &std::path::Path, cmd: SubsCmd) -> Result<()> {
    let mut maps = Maps::open_pinned(pin_dir)?;
    match cmd {
        SubsCmd::List { json } => {
            let rows = stats::stream_rows(maps.streams()?);
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                stats::print_streams(&rows);
            }
        }
        SubsCmd::Add { copy } => {
            let route = copy.route(&mut maps)?;
            maps.add_copy(&route)?;
            let n = maps.copies_of(&route.key())?.len();
            println!(
                "copy of {:#010x} from {} on {} -> {} added ({n} cop{})",
                route.ssrc,
                route.source,
                route.listen,
                route.out_dst,
                if n == 1 { "y" } else { "ies" }
            );
        }
        SubsCmd::Del { stream: s, out_dst } => {
            if !maps.del_copy(&s.key(), out_dst)? {
                bail!(
                    "the stream of SSRC {:#010x} from {} on {} has no copy to {out_dst} (see \
                     `edgefwd subs list`)",
                    s.ssrc,
                    s.source,
                    s.listen
                );
            }
            println!(
                "copy of {:#010x} from {} on {} -> {out_dst} removed",
                s.ssrc, s.source, s.listen
            );
        }
        SubsCmd::Move {
            stream: s,
            out_dst,
            to_source,
            to_ssrc,
            to_listen,
        } => {
            let to = Route::key_of(to_listen.unwrap_or(s.listen), to_source, to_ssrc);
            let m = maps.move_copy(&s.key(), out_dst, &to)?;
            let r = &m.route;
            match m.continued_from {
                Some((seq, ts)) => println!(
                    "copy -> {out_dst} moved to {:#010x} from {} on {}: continues after seq {seq}, \
                     ts {ts} (seq delta {}, ts delta {})",
                    r.ssrc, r.source, r.listen, r.seq_delta, r.ts_delta
                ),
                None => println!(
                    "copy -> {out_dst} moved to {:#010x} from {} on {}, offsets kept (no packet \
                     on one of the streams yet to continue from)",
                    r.ssrc, r.source, r.listen
                ),
            }
        }
    }
    Ok(())
}

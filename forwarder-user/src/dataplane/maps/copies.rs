//! Streams and their copies in the maps: a copy added, removed or moved, and the
//! copy list a stream with several copies keeps for the TC replicator. A change
//! writes a new list and swaps the stream's route value, then waits until no
//! replication loop can still read the old list.

use super::*;

impl Maps {
    /// Adds a copy to the stream of `r`'s key (creating the stream): fan-out.
    pub fn add_copy(&mut self, r: &Route) -> Result<()> {
        let key = r.key();
        let mut copies = self.copies_of(&key)?;
        if copies.iter().any(|c| c.out_dst == r.out_dst) {
            bail!(
                "the stream of SSRC {:#010x} from {} has a copy to {} already; `edgefwd subs \
                 del` it first to change it",
                r.ssrc,
                r.source,
                r.out_dst
            );
        }
        copies.push(r.clone());
        self.change(|m, b| m.write_stream(&key, &copies, b))
    }

    /// Removes the copy to `out_dst` from the stream of `key` (the stream itself with
    /// its last copy); false if there was none. The other copies go on undisturbed.
    pub fn del_copy(&mut self, key: &RouteKey, out_dst: SocketAddr) -> Result<bool> {
        Ok(self.del_copy_counted(key, out_dst)?.is_some())
    }

    /// [`Maps::del_copy`], returning the removed copy's final counters (read once no
    /// replication loop can count in its slot any more); None if there was none.
    pub fn del_copy_counted(
        &mut self,
        key: &RouteKey,
        out_dst: SocketAddr,
    ) -> Result<Option<RouteStats>> {
        let Some((_, values)) = self.stream_values(key)? else {
            return Ok(None);
        };
        let Some(slot) = values
            .iter()
            .find(|v| Route::from_map(key, v).out_dst == out_dst)
            .map(|v| v.stats_slot)
        else {
            return Ok(None);
        };
        let copies: Vec<Route> = values
            .iter()
            .map(|v| Route::from_map(key, v))
            .filter(|c| c.out_dst != out_dst)
            .collect();
        self.change(|m, b| m.write_stream(key, &copies, b))?;
        Ok(Some(self.stats(slot)))
    }

    /// Moves the copy to `out_dst` from the stream of `from` to the stream of `to`
    /// (a viewer switching channels, a relay re-parented), so that its receiver sees
    /// one sequence: the first packet of `to` it gets is numbered one after the last
    /// packet of `from` it got, and its timestamps continue from there. The copy is
    /// removed first, so no packet of either stream can reach it under a number the
    /// other already used; packets of `to` that arrive during the move are not sent
    /// to it and read as a gap (loss), never as a step back. Everything else of the
    /// copy (addresses, SSRC out, payload type, egress) stays. Both streams must exist.
    pub fn move_copy(
        &mut self,
        from: &RouteKey,
        out_dst: SocketAddr,
        to: &RouteKey,
    ) -> Result<Moved> {
        let name = |k: &RouteKey| {
            let r = Route::from_map(k, &RouteValue::default());
            format!("SSRC {:#010x} from {} on {}", r.ssrc, r.source, r.listen)
        };
        let Some(copy) = self
            .copies_of(from)?
            .into_iter()
            .find(|c| c.out_dst == out_dst)
        else {
            bail!(
                "the stream of {} has no copy to {out_dst} (see `edgefwd subs list`)",
                name(from)
            );
        };
        if from == to {
            bail!(
                "the copy to {out_dst} is in the stream of {} already",
                name(to)
            );
        }
        let target = self.copies_of(to)?;
        if target.is_empty() {
            bail!(
                "no stream of {} to move the copy to: add it first (`edgefwd subs add` or \
                 `edgefwd routes add`)",
                name(to)
            );
        }
        if target.iter().any(|c| c.out_dst == out_dst) {
            bail!(
                "the stream of {} has a copy to {out_dst} already; `edgefwd subs del` one of \
                 them first",
                name(to)
            );
        }
        let last = self
            .del_copy_counted(from, out_dst)?
            .context("the copy vanished while moving it (another writer?)")?;
        // The newest packet of the target stream: its copies' slots record it (XDP for
        // a stream of one copy, TC per copy for a list).
        let mut newest = RouteStats::default();
        if let Some((v, copies)) = self.stream_values(to)? {
            newest.merge(&self.stats(v.stats_slot));
            for c in &copies {
                newest.merge(&self.stats(c.stats_slot));
            }
        }
        let r = Route::from_map(to, &RouteValue::default());
        let mut moved = Route {
            listen: r.listen,
            source: r.source,
            ssrc: r.ssrc,
            ..copy.clone()
        };
        let continued = match (last.last(), newest.last()) {
            (Some((seq, ts)), Some((to_seq, to_ts))) => {
                let (seq_out, ts_out) = (
                    seq.wrapping_add(copy.seq_delta),
                    ts.wrapping_add(copy.ts_delta),
                );
                // to_seq + 1 becomes seq_out + 1; to_ts becomes ts_out.
                moved.seq_delta = seq_out.wrapping_sub(to_seq);
                moved.ts_delta = ts_out.wrapping_sub(to_ts);
                Some((seq_out, ts_out))
            }
            _ => None,
        };
        if let Err(e) = self.add_copy(&moved) {
            // Put it back where it was rather than lose the subscriber.
            let restored = self.add_copy(&copy);
            return Err(e).context(match restored {
                Ok(()) => "moving the copy; it is back in its old stream".to_string(),
                Err(r) => format!("moving the copy; putting it back failed too: {r:#}"),
            });
        }
        Ok(Moved {
            route: moved,
            continued_from: continued,
        })
    }

    /// Rejects a copy the data plane cannot send, saying what to change; makes sure
    /// its egress interface is in the devmap.
    pub(super) fn check_copy(&mut self, r: &Route) -> Result<()> {
        r.validate()?;
        let key = r.key();
        let listener = ListenerKey {
            addr: key.listen_addr,
            port_be: key.listen_port_be,
            _pad: [0; 2],
        };
        if self.listeners.get(&listener, 0).is_err() {
            bail!(
                "route {}: {} is not a listener; add it first (config [[listener]] or \
                 `edgefwd routes add` creates it)",
                r.ssrc,
                r.listen
            );
        }
        if r.egress_ifindex != 0 {
            self.egress
                .insert(r.egress_ifindex, r.egress_ifindex, None, 0)
                .with_context(|| {
                    format!(
                        "adding ifindex {} to the egress devmap: does the interface exist in \
                         this namespace?",
                        r.egress_ifindex
                    )
                })?;
        }
        Ok(())
    }

    /// Runs a batch of writes, then waits until no replication loop can still read a
    /// copy list the batch retired.
    pub(super) fn change<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut Batch) -> Result<T>,
    ) -> Result<T> {
        let mut batch = Batch::default();
        let out = f(self, &mut batch);
        batch.settle();
        out
    }

    /// The copies of a stream as routes (empty if there is no stream).
    pub fn copies_of(&self, key: &RouteKey) -> Result<Vec<Route>> {
        Ok(self
            .stream_values(key)?
            .map(|(_, copies)| copies.iter().map(|c| Route::from_map(key, c)).collect())
            .unwrap_or_default())
    }

    /// A stream's route value and its copies' values (the route value itself for a
    /// stream with one copy).
    pub(super) fn stream_values(
        &self,
        key: &RouteKey,
    ) -> Result<Option<(RouteValue, Vec<RouteValue>)>> {
        let v = match self.get_route(key) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e).context("looking up route"),
        };
        Ok(Some((v, self.copy_values(&v)?)))
    }

    pub(super) fn copy_values(&self, v: &RouteValue) -> Result<Vec<RouteValue>> {
        if v.flags & FLAG_FANOUT == 0 {
            return Ok(vec![*v]);
        }
        (v.fanout_first..v.fanout_first + v.fanout_count)
            .map(|i| {
                self.copies
                    .get(&i, 0)
                    .with_context(|| format!("reading copy slot {i}"))
            })
            .collect()
    }

    /// Makes the stream of `key` have exactly `copies` (none: removes it).
    pub(super) fn write_stream(
        &mut self,
        key: &RouteKey,
        copies: &[Route],
        batch: &mut Batch,
    ) -> Result<()> {
        if copies.is_empty() {
            self.remove_stream(key, batch)?;
            return Ok(());
        }
        let first = &copies[0];
        for r in copies {
            if r.key() != *key {
                bail!("copy to {} belongs to another stream", r.out_dst);
            }
        }
        check_stream(copies)?;
        for r in copies {
            self.check_copy(r)?;
        }
        let old = self.stream_values(key)?;
        // A copy keeps its counters by its destination; a stream with a list keeps its own.
        let mut kept: std::collections::HashMap<SocketAddr, u32> = Default::default();
        // Some: the stream had a copy list (retired below, once the new value is in).
        let mut stream_slot = None;
        if let Some((v, old_copies)) = &old {
            for c in old_copies {
                kept.insert(Route::from_map(key, c).out_dst, c.stats_slot);
            }
            if v.flags & FLAG_FANOUT != 0 {
                stream_slot = Some(v.stats_slot);
            }
        }
        let mut fresh = Vec::new();
        let mut slot_of = |r: Option<&Route>, maps: &Maps, batch: &mut Batch| -> Result<u32> {
            if let Some(s) = r.and_then(|r| kept.get(&r.out_dst)) {
                return Ok(*s);
            }
            let s = batch.slots.take(maps)?;
            fresh.push(s);
            Ok(s)
        };
        let value = if copies.len() == 1 {
            copies[0].value(slot_of(Some(&copies[0]), self, batch)?)
        } else {
            let mut values = Vec::with_capacity(copies.len());
            for r in copies {
                values.push(r.value(slot_of(Some(r), self, batch)?));
            }
            let stream = match stream_slot {
                Some(s) => s,
                None => slot_of(None, self, batch)?,
            };
            let start = batch.ranges.take(self, copies.len() as u32)?;
            // Nobody reads these slots until the route value below names them.
            for (i, v) in values.iter().enumerate() {
                self.copies
                    .set(start + i as u32, *v, 0)
                    .with_context(|| format!("writing copy slot {}", start + i as u32))?;
            }
            RouteValue {
                flags: FLAG_FANOUT
                    | if first.out_dst.is_ipv6() {
                        FLAG_IPV6
                    } else {
                        0
                    },
                stats_slot: stream,
                fanout_first: start,
                fanout_count: copies.len() as u32,
                ..Default::default()
            }
        };
        for s in &fresh {
            let zeros = PerCpuValues::try_from(vec![RouteStats::default(); ncpus()?])?;
            self.route_stats.set(*s, zeros, 0)?;
        }
        let cap = self.route_capacity();
        let inserted = match RouteKey4::from_mapped(key) {
            Some(k4) => self.routes4.insert(k4, value, 0),
            None => self.routes6.insert(*key, value, 0),
        };
        if let Err(e) = inserted {
            for s in fresh {
                batch.slots.give_back(s);
            }
            return Err(full_or(e, "routes", cap))
                .with_context(|| format!("adding route for SSRC {:#010x}", first.ssrc));
        }
        if stream_slot.is_some() {
            batch.ranges.retire();
        }
        if old.is_none() {
            let sk = first.source_key();
            let n = self.sources.get(&sk, 0).map(|v| v.routes).unwrap_or(0);
            self.sources
                .insert(sk, SourceValue { routes: n + 1 }, 0)
                .map_err(|e| full_or(e, "sources", sources::MAX_SOURCES))?;
        }
        Ok(())
    }
}

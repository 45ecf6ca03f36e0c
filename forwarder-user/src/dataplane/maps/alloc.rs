//! Allocation in the maps: statistics slots (one per route, counters zeroed before
//! reuse) and ranges of the copy-list array, and the batch that retires what a
//! change replaced once no replication loop can read it.

use super::*;

/// Hands out free statistics slots. The used set is read from the tables on first
/// need and then kept up to date by the caller's batch, and the search resumes where
/// it stopped, so a batch of n new routes costs one table walk, not n.
#[derive(Default)]
pub(super) struct SlotAllocator {
    used: Option<BTreeSet<u32>>,
    next: u32,
}

impl SlotAllocator {
    pub(super) fn take(&mut self, maps: &Maps) -> Result<u32> {
        let cap = maps.route_capacity();
        if self.used.is_none() {
            self.used = Some(maps.used_slots()?);
        }
        let used = self.used.as_mut().expect("filled above");
        let free = (self.next..cap)
            .chain(0..self.next.min(cap))
            .find(|s| !used.contains(s))
            .ok_or_else(|| {
                anyhow!(
                    "the route table is full ({cap} routes): remove routes you no longer need \
                     (`edgefwd routes del`, or drop them from the config)"
                )
            })?;
        used.insert(free);
        self.next = free + 1;
        Ok(free)
    }

    pub(super) fn give_back(&mut self, slot: u32) {
        if let Some(used) = self.used.as_mut() {
            used.remove(&slot);
        }
    }
}

/// Hands out contiguous ranges of the copies array for new copy lists. Ranges named by
/// a route value are in use, and so are ranges this batch retired: a replication loop
/// may still read them until [`Batch::settle`].
#[derive(Default)]
pub(super) struct RangeAllocator {
    used: Option<Vec<(u32, u32)>>,
    retired: bool,
}

impl RangeAllocator {
    pub(super) fn take(&mut self, maps: &Maps, n: u32) -> Result<u32> {
        if self.used.is_none() {
            let mut used = Vec::new();
            for (_, v) in maps.all_routes()? {
                if v.flags & FLAG_FANOUT != 0 {
                    used.push((v.fanout_first, v.fanout_count));
                }
            }
            self.used = Some(used);
        }
        let used = self.used.as_mut().expect("filled above");
        used.sort_unstable();
        let cap = maps.copies.len();
        // First fit over the gaps between used ranges.
        let mut at = 0u32;
        for (first, count) in used.iter() {
            if first.saturating_sub(at) >= n {
                break;
            }
            at = at.max(first + count);
        }
        if cap.saturating_sub(at) < n {
            bail!(
                "the copies array is full ({cap} slots, shared by every stream's copy list \
                 while it changes): remove copies you no longer need (`edgefwd subs del`)"
            );
        }
        used.push((at, n));
        Ok(at)
    }

    /// A range left its stream. It stays in `used` (read from the maps, or taken in
    /// this batch), so the batch never hands it out again; the batch waits at the end.
    pub(super) fn retire(&mut self) {
        self.retired = true;
    }
}

/// The allocators of one batch of writes.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) slots: SlotAllocator,
    pub(super) ranges: RangeAllocator,
}

impl Batch {
    /// Waits until no replication loop can read a copy list this batch retired.
    pub(super) fn settle(self) {
        if self.ranges.retired {
            std::thread::sleep(std::time::Duration::from_millis(fanout::GRACE_MS));
        }
    }
}

pub(super) fn ncpus() -> Result<usize> {
    nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))
}

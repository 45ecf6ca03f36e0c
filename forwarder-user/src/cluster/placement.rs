//! Where a new room goes: rendezvous (highest-random-weight) hashing of the room name
//! over the live nodes, skipping nodes loaded well above the mean. Any node computes
//! the same preference list from the same leases without asking anyone; the claim in
//! Redis stays the truth (placement only says where to publish a room no one holds).
//! Sans-I/O: leases in, a node name out.

use super::redis::Lease;

/// A node is passed over while its sessions exceed this many times the mean (plus
/// [`LOAD_SLACK`], so a few sessions on an idle cluster do not move rooms around).
pub const LOAD_BOUND: f64 = 1.25;
pub const LOAD_SLACK: f64 = 10.0;

/// FNV-1a, 64 bits: stable across nodes, versions and platforms (the preference list
/// must be the same everywhere).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly: finish with a 64-bit mixer.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The nodes in `room`'s preference order (highest weight first).
pub fn rank<'a>(room: &str, nodes: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<(u64, &str)> = nodes
        .into_iter()
        .map(|n| (fnv1a(&[room.as_bytes(), n.as_bytes()]), n))
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    v.into_iter().map(|(_, n)| n).collect()
}

/// The nodes a new `room` may go to, best first: those under the load bound in the
/// room's preference order, then the others in that order. (The caller takes the first
/// that still has placements left this second.)
pub fn candidates<'a>(room: &str, leases: &'a [Lease]) -> Vec<&'a Lease> {
    if leases.is_empty() {
        return vec![];
    }
    let mean = leases.iter().map(|l| l.sessions as f64).sum::<f64>() / leases.len() as f64;
    let bound = mean * LOAD_BOUND + LOAD_SLACK;
    let order = rank(room, leases.iter().map(|l| l.node.as_str()));
    let of = |n: &str| leases.iter().find(|l| l.node == n);
    let (under, over): (Vec<&Lease>, Vec<&Lease>) = order
        .iter()
        .filter_map(|n| of(n))
        .partition(|l| (l.sessions as f64) <= bound);
    under.into_iter().chain(over).collect()
}

/// The node a new `room` goes to when no node is out of placements: the first
/// candidate.
pub fn choose<'a>(room: &str, leases: &'a [Lease]) -> Option<&'a Lease> {
    candidates(room, leases).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, sessions: u64) -> Lease {
        Lease {
            sessions,
            ..Lease::bare(node, "127.0.0.1:9".parse().unwrap())
        }
    }

    /// The order depends on the room and the set of nodes only, not on the order they
    /// are listed in; rooms spread over the nodes; a node leaving moves only its rooms.
    #[test]
    fn rendezvous_order_is_stable_spread_and_minimal_on_change() {
        let nodes = ["a", "b", "c", "d"];
        let r1 = rank("room-1", nodes);
        let mut rev = nodes;
        rev.reverse();
        assert_eq!(rank("room-1", rev), r1);
        let mut firsts = std::collections::BTreeMap::new();
        for i in 0..1000 {
            *firsts.entry(rank(&format!("r{i}"), nodes)[0]).or_insert(0) += 1;
        }
        for n in nodes {
            let k = firsts[n];
            assert!((180..=320).contains(&k), "{n}: {k} of 1000 ({firsts:?})");
        }
        // Without c: a room first at another node stays there.
        for i in 0..200 {
            let room = format!("r{i}");
            let before = rank(&room, nodes)[0];
            let after = rank(&room, ["a", "b", "d"])[0];
            if before != "c" {
                assert_eq!(before, after, "{room}");
            }
        }
    }

    /// A node far above the mean load is passed over for the next in order; when
    /// every node is loaded the same, the first is taken.
    #[test]
    fn a_loaded_node_is_passed_over() {
        let even = [lease("a", 100), lease("b", 100), lease("c", 100)];
        let first = rank("r", ["a", "b", "c"])[0];
        assert_eq!(choose("r", &even).unwrap().node, first);
        let loaded: Vec<Lease> = even
            .iter()
            .map(|l| lease(&l.node, if l.node == first { 1000 } else { 10 }))
            .collect();
        let chosen = choose("r", &loaded).unwrap();
        assert_ne!(chosen.node, first);
        assert_eq!(chosen.node, rank("r", ["a", "b", "c"])[1]);
        assert!(choose("r", &[]).is_none());
    }
}

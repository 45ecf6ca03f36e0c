//! A room's tree of nodes in the cluster's Redis: the origin at the root, every other
//! node carrying the room under one parent. Edges are written in one place only (the
//! attach script, atomic), and a node attaches under a node already in the tree that is
//! not below it, so the tree is loop-free by construction; each node has at most
//! `degree` children. A node's parent is its upstream for the room.
//!
//! Key: `edgefwd:tree:{ROOM}` (the room's hash tag): a hash of member -> parent, and
//! `@epoch`, the origin's epoch it was built for (a re-homed room starts a new tree).
//! The scripts read only the room's keys; which nodes are alive comes from the caller
//! (its leases), so Redis Cluster can hold them.
//!
//! The caller orders the candidate parents: by the inter-node RTT it measured
//! ([`super::rtt`]), then by load. Sans-I/O here: [`parent_order`] is that order.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use super::redis::{Directory, Lease, Origin, room_key};

pub fn tree_key(room: &str) -> String {
    format!("edgefwd:tree:{{{room}}}")
}

/// KEYS[1] the room, KEYS[2] its tree. ARGV[1] the node attaching, ARGV[2] the degree,
/// ARGV[3] the deepest a member may be, ARGV[4..] the live nodes in the caller's
/// order of preference. Returns {parent, epoch}; {"", epoch} when the node is the
/// origin, {"", 0} when the room has no origin.
const ATTACH: &str = r#"
local me = ARGV[1]
local degree = tonumber(ARGV[2])
local deepest = tonumber(ARGV[3])
local origin = redis.call('HGET', KEYS[1], 'node')
if not origin then return {'', 0} end
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
if origin == me then return {'', tonumber(epoch)} end
if redis.call('HGET', KEYS[2], '@epoch') ~= epoch then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], '@epoch', epoch)
end
local live = {}
live[origin] = true
for i = 4, #ARGV do live[ARGV[i]] = true end
local parent = {}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  if flat[i] ~= '@epoch' then parent[flat[i]] = flat[i + 1] end
end
-- Members whose lease lapsed leave the tree (their children re-attach).
for n, _ in pairs(parent) do
  if not live[n] then redis.call('HDEL', KEYS[2], n); parent[n] = nil end
end
-- Depth of a member (the origin 0); nil if its chain does not reach the origin.
local function depth(n)
  local d = 0
  while n ~= origin do
    n = parent[n]
    d = d + 1
    if not n or d > deepest then return nil end
  end
  return d
end
local cur = parent[me]
if cur and (cur == origin or parent[cur]) and depth(me) then
  return {cur, tonumber(epoch)}
end
local children = {}
for n, p in pairs(parent) do
  if n ~= me then children[p] = (children[p] or 0) + 1 end
end
-- Whether n is me or below me (attaching there would close a loop).
local function below_me(n)
  local hops = 0
  while n and hops <= deepest do
    if n == me then return true end
    n = parent[n]
    hops = hops + 1
  end
  return false
end
local pick = nil
for i = 4, #ARGV do
  local c = ARGV[i]
  if c ~= me and (c == origin or parent[c]) then
    local d = depth(c)
    if d and d < deepest and not below_me(c) and (children[c] or 0) < degree then
      pick = c
      break
    end
  end
end
if not pick then pick = origin end
redis.call('HSET', KEYS[2], me, pick)
return {pick, tonumber(epoch)}
"#;

/// KEYS[1] the tree; ARGV[1] the node leaving. It leaves only without children (a node
/// with children still relays the room to them). Returns 1 when it left.
const DETACH: &str = r#"
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  if flat[i] ~= '@epoch' and flat[i + 1] == ARGV[1] then return 0 end
end
return redis.call('HDEL', KEYS[1], ARGV[1])
"#;

/// Candidate parents for `me`, best first: the live nodes other than `me` by the
/// RTT `me` measured to them (unmeasured last), then by sessions, then by name.
pub fn parent_order<'a>(
    me: &str,
    live: &'a [Lease],
    rtt_us: &BTreeMap<String, u64>,
) -> Vec<&'a str> {
    let mut v: Vec<&Lease> = live.iter().filter(|l| l.node != me).collect();
    v.sort_by_key(|l| {
        (
            rtt_us.get(&l.node).copied().unwrap_or(u64::MAX),
            l.sessions,
            l.node.clone(),
        )
    });
    v.into_iter().map(|l| l.node.as_str()).collect()
}

impl Directory {
    /// This node's parent in `room`'s tree (attached now if it was not, or if its
    /// parent left or is in `avoid`): None when the room has no origin or is ours.
    /// A node of `avoid` counts as dead here: it leaves the tree, its children attach
    /// again when they next ask (the origin is never avoided: it is the room).
    pub async fn attach(
        &self,
        room: &str,
        degree: u32,
        avoid: &[String],
    ) -> Result<Option<Origin>> {
        let mut live = self.live_nodes().await?;
        // A draining node takes no children (it leaves the tree as they move).
        live.retain(|l| !avoid.contains(&l.node) && !l.draining);
        let rtt = self.rtt_row(self.me()).await.unwrap_or_default();
        let order = parent_order(self.me(), &live, &rtt);
        let mut con = self.con();
        let attach = redis::Script::new(ATTACH);
        let mut script = attach.prepare_invoke();
        script
            .key(room_key(room))
            .key(tree_key(room))
            .arg(self.me())
            .arg(degree.max(1))
            .arg(super::MAX_DEPTH - 1);
        for n in &order {
            script.arg(*n);
        }
        let (parent, epoch): (String, u64) = script
            .invoke_async(&mut con)
            .await
            .with_context(|| format!("attaching to room {room:?}'s tree in Redis"))?;
        Ok((!parent.is_empty()).then_some(Origin {
            node: parent,
            epoch,
        }))
    }

    /// This node leaves `room`'s tree, unless nodes below still hang on it.
    pub async fn detach(&self, room: &str) -> Result<bool> {
        let mut con = self.con();
        let n: u32 = redis::Script::new(DETACH)
            .key(tree_key(room))
            .arg(self.me())
            .invoke_async(&mut con)
            .await
            .with_context(|| format!("leaving room {room:?}'s tree in Redis"))?;
        Ok(n == 1)
    }

    /// `room`'s tree: member -> parent (the origin is no member), and the epoch it
    /// was built for.
    pub async fn tree(&self, room: &str) -> Result<(BTreeMap<String, String>, u64)> {
        let mut con = self.con();
        let mut all: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(tree_key(room))
            .query_async(&mut con)
            .await
            .with_context(|| format!("reading room {room:?}'s tree from Redis"))?;
        let epoch = all
            .remove("@epoch")
            .and_then(|e| e.parse().ok())
            .unwrap_or(0);
        Ok((all, epoch))
    }
}

/// A room as the operator sees it (the CLI's `cluster rooms`, the page): origin,
/// epoch, whether the origin is alive, and its tree with each member's parent and
/// depth. None when the room has no origin.
pub async fn room_view(d: &Directory, room: &str) -> Result<Option<serde_json::Value>> {
    let Some(o) = d.origin(room).await? else {
        return Ok(None);
    };
    let alive = d.lease(&o.node).await?.is_some();
    let (tree, epoch) = d.tree(room).await?;
    // A tree built for another epoch is the old origin's: not this one's.
    let tree = if epoch == o.epoch {
        tree
    } else {
        Default::default()
    };
    let depths = depths(&o.node, &tree);
    let members: Vec<_> = tree
        .iter()
        .map(|(n, p)| serde_json::json!({"node": n, "parent": p, "depth": depths.get(n)}))
        .collect();
    Ok(Some(serde_json::json!({
        "room": room, "origin": o.node, "epoch": o.epoch, "origin_alive": alive,
        "tree": members, "depth": depths.values().max().copied().unwrap_or(0),
    })))
}

/// Each member's depth below the origin (1 for its children), for the operator view.
pub fn depths(origin: &str, tree: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for n in tree.keys() {
        let (mut cur, mut d) = (n.as_str(), 0);
        while cur != origin && d <= super::MAX_DEPTH {
            match tree.get(cur) {
                Some(p) => {
                    cur = p;
                    d += 1;
                }
                None => break,
            }
        }
        if cur == origin {
            out.insert(n.clone(), d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, sessions: u64) -> Lease {
        Lease {
            sessions,
            ..Lease::bare(node, "127.0.0.1:1".parse().unwrap())
        }
    }

    #[test]
    fn parents_are_ordered_by_rtt_then_load() {
        let live = [lease("a", 5), lease("b", 1), lease("c", 0), lease("me", 0)];
        let rtt = BTreeMap::from([("a".to_string(), 300), ("b".to_string(), 300)]);
        // a and b measured alike: b has fewer sessions; c unmeasured comes last.
        assert_eq!(parent_order("me", &live, &rtt), ["b", "a", "c"]);
        // Nothing measured: by load.
        assert_eq!(parent_order("me", &live, &BTreeMap::new()), ["c", "b", "a"]);
    }

    #[test]
    fn depths_follow_the_chain_to_the_origin() {
        let t = BTreeMap::from([
            ("b".to_string(), "o".to_string()),
            ("c".to_string(), "b".to_string()),
            ("x".to_string(), "gone".to_string()),
        ]);
        let d = depths("o", &t);
        assert_eq!((d["b"], d["c"]), (1, 2));
        assert!(!d.contains_key("x"));
    }
}

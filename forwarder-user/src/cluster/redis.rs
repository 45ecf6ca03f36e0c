//! The cluster's truth in Redis (7.0, or Valkey: only commands both have): node
//! leases and the room directory, claims fenced by epochs. Read at join time and by
//! the control plane's rounds, never on the packet path.
//!
//! Keys (a room's keys carry its name as a hash tag, so Redis Cluster can hold them):
//! * `edgefwd:node:NAME` — the node's [`Lease`] as JSON, expiring [`LEASE`] after its
//!   last renewal (once a second): a node whose key is gone is dead for placement.
//! * `edgefwd:nodes` — a set of the names ever seen, to list the leases.
//! * `edgefwd:room:{ROOM}` — a hash: `node` (the room's origin) and `epoch`.
//!
//! A claim is one Lua script, so atomic: the room goes to the claimant when it has no
//! origin, or its origin's lease has lapsed, and every change of origin bumps the
//! epoch. So a room never has two live origins, and a node holding an older epoch
//! learns it is stale: the node API refuses requests that name one.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use super::directory::UpstreamConfig;

/// How long a lease lives without renewal (renewed every second).
pub const LEASE: Duration = Duration::from_secs(3);

/// What a node announces about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub node: String,
    /// Its node API (`[cluster] api`): where other nodes ask it for rooms.
    pub api: SocketAddr,
    /// Its WHIP/WHEP address as clients reach it, if it serves WebRTC.
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default)]
    pub region: String,
    /// Load: its sessions now.
    #[serde(default)]
    pub sessions: u64,
    /// Its media address as other nodes reach it (RTT probes go there).
    #[serde(default)]
    pub media: Option<SocketAddr>,
    /// Its WHEP viewers now, and how many it takes (`[cluster] capacity`; None: no
    /// bound but its session limits).
    #[serde(default)]
    pub viewers: u64,
    #[serde(default)]
    pub capacity: Option<u64>,
    /// Copies it sent per second (RTP to viewers and trunks), over the last second.
    #[serde(default)]
    pub copies_per_s: u64,
    /// Its process's CPU use over the last second, per cent of one core.
    #[serde(default)]
    pub cpu_pct: f64,
    /// Draining: no new rooms, viewers or children (placement, edges and trees pass
    /// it over).
    #[serde(default)]
    pub draining: bool,
    /// Nodes it suspects dead now: their probes went unanswered for 300 ms while it
    /// takes rooms from them (their lapsed lease confirms it, 3 s on).
    #[serde(default)]
    pub suspects: Vec<String>,
}

impl Lease {
    /// A node's lease with its node API only (no WebRTC, no load): for tools and tests
    /// that take part in the directory without serving media.
    pub fn bare(node: &str, api: SocketAddr) -> Lease {
        Lease {
            node: node.to_string(),
            api,
            http: None,
            region: String::new(),
            sessions: 0,
            media: None,
            viewers: 0,
            capacity: None,
            copies_per_s: 0,
            cpu_pct: 0.0,
            draining: false,
            suspects: vec![],
        }
    }

    /// Whether it takes another viewer.
    pub fn has_room(&self) -> bool {
        !self.draining && self.capacity.is_none_or(|c| self.viewers < c)
    }
}

/// A room's origin as the directory has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub node: String,
    pub epoch: u64,
}

fn rtt_key(node: &str) -> String {
    format!("edgefwd:rtt:{node}")
}

/// How long a node's RTT row lives without being measured again.
const RTT_TTL: Duration = Duration::from_secs(30);

fn node_key(node: &str) -> String {
    format!("edgefwd:node:{node}")
}

pub(super) fn room_key(room: &str) -> String {
    format!("edgefwd:room:{{{room}}}")
}

/// KEYS[1] the room, ARGV[1] the claimant, ARGV[2] the lease key prefix. The room
/// stays with a live origin; else it is the claimant's, one epoch on.
const CLAIM: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'node')
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if cur then
  if cur == ARGV[1] or redis.call('EXISTS', ARGV[2] .. cur) == 1 then
    return {cur, epoch}
  end
end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', epoch)
return {ARGV[1], epoch}
"#;

/// Places a room no live node holds on a candidate, if it has placements left this
/// second. KEYS[1] the room; ARGV[1] the candidate, ARGV[2] the lease key prefix,
/// ARGV[3] placements per node and second, ARGV[4] the counter key prefix. Returns the
/// room's origin, or {"", 0} when the candidate is out of placements.
const PLACE: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'node')
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if cur and redis.call('EXISTS', ARGV[2] .. cur) == 1 then
  return {cur, epoch}
end
local k = ARGV[4] .. ARGV[1] .. ':' .. redis.call('TIME')[1]
local n = redis.call('INCR', k)
redis.call('EXPIRE', k, 2)
if n > tonumber(ARGV[3]) then
  return {'', 0}
end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', epoch)
return {ARGV[1], epoch}
"#;

/// Hands a room over from its draining origin. KEYS[1] the room; ARGV[1] the new
/// origin, ARGV[2] the old one, ARGV[3] the old epoch. The room is the new origin's,
/// one epoch on, only if it is still the old one's at that epoch (else unchanged).
const TAKE_OVER: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'node')
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if cur == ARGV[2] and epoch == tonumber(ARGV[3]) then
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', epoch)
  return {ARGV[1], epoch}
end
return {cur or '', epoch}
"#;

/// This node's connection to the cluster's Redis.
#[derive(Clone)]
pub struct Directory {
    con: ConnectionManager,
    me: String,
}

impl Directory {
    /// Connects to `url` (`redis://host:port/`; RESP3 is asked for). The connection
    /// manager reconnects by itself; each call fails fast while Redis is away.
    pub async fn connect(url: &str, me: &str) -> Result<Directory> {
        let url = if url.contains("protocol=") {
            url.to_string()
        } else if url.contains('?') {
            format!("{url}&protocol=resp3")
        } else {
            format!("{url}?protocol=resp3")
        };
        let client = redis::Client::open(url.as_str())
            .with_context(|| format!("[cluster] redis_url {url:?} is not a Redis URL"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1))
            // Nothing is subscribed yet; the resubscription (and the push sender it
            // needs) are on so channels added later survive reconnects.
            .set_push_sender(|_: redis::PushInfo| Ok::<(), redis::aio::SendError>(()))
            .set_automatic_resubscription();
        let con = ConnectionManager::new_with_config(client, config)
            .await
            .with_context(|| format!("connecting to Redis at {url}: is it running?"))?;
        Ok(Directory {
            con,
            me: me.to_string(),
        })
    }

    /// A connection for one call (the manager's handle: cheap to clone).
    pub(super) fn con(&self) -> ConnectionManager {
        self.con.clone()
    }

    /// Stores the RTTs this node measured to its peers (microseconds), replacing the
    /// last row.
    pub async fn set_rtt(&self, row: &std::collections::BTreeMap<String, u64>) -> Result<()> {
        let mut con = self.con.clone();
        let key = rtt_key(&self.me);
        let mut p = redis::pipe();
        p.atomic().cmd("DEL").arg(&key).ignore();
        if !row.is_empty() {
            p.cmd("HSET").arg(&key);
            for (n, us) in row {
                p.arg(n).arg(*us);
            }
            p.ignore();
            p.cmd("PEXPIRE")
                .arg(&key)
                .arg(RTT_TTL.as_millis() as u64)
                .ignore();
        }
        p.query_async::<()>(&mut con)
            .await
            .context("storing this node's RTTs in Redis")
    }

    /// The RTTs `node` measured to its peers, microseconds.
    pub async fn rtt_row(&self, node: &str) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut con = self.con.clone();
        redis::cmd("HGETALL")
            .arg(rtt_key(node))
            .query_async(&mut con)
            .await
            .context("reading a node's RTTs from Redis")
    }

    /// Renews this node's lease.
    pub async fn renew(&self, lease: &Lease) -> Result<()> {
        let mut con = self.con.clone();
        let json = serde_json::to_string(lease).expect("a lease serializes");
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(node_key(&lease.node))
            .arg(json)
            .arg("PX")
            .arg(LEASE.as_millis() as u64)
            .ignore()
            .cmd("SADD")
            .arg("edgefwd:nodes")
            .arg(&lease.node)
            .ignore()
            .query_async::<()>(&mut con)
            .await
            .context("renewing this node's lease in Redis")
    }

    /// Says in this node's lease that it drains now, rather than at the next renewal
    /// (clients told to move ask other nodes at once, which must not send them back).
    pub async fn mark_draining(&self) -> Result<()> {
        if let Some(mut l) = self.lease(&self.me).await? {
            l.draining = true;
            self.renew(&l).await?;
        }
        Ok(())
    }

    /// A node's lease, if it is alive.
    pub async fn lease(&self, node: &str) -> Result<Option<Lease>> {
        let mut con = self.con.clone();
        let json: Option<String> = redis::cmd("GET")
            .arg(node_key(node))
            .query_async(&mut con)
            .await
            .context("reading a node's lease from Redis")?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Every node name ever seen, sorted (lapsed ones too).
    pub async fn known_nodes(&self) -> Result<Vec<String>> {
        let mut con = self.con.clone();
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg("edgefwd:nodes")
            .query_async(&mut con)
            .await
            .context("listing the nodes in Redis")?;
        names.sort();
        Ok(names)
    }

    /// Every live node's lease.
    pub async fn live_nodes(&self) -> Result<Vec<Lease>> {
        let mut con = self.con.clone();
        let names = self.known_nodes().await?;
        if names.is_empty() {
            return Ok(vec![]);
        }
        // One round trip for all of them (a lapsed lease reads as nil). Under Redis
        // Cluster the node keys would need one hash tag; today one Redis holds all.
        let keys: Vec<String> = names.iter().map(|n| node_key(n)).collect();
        let jsons: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .context("reading the nodes' leases from Redis")?;
        let mut out: Vec<Lease> = jsons
            .into_iter()
            .flatten()
            .filter_map(|j| serde_json::from_str(&j).ok())
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    /// Claims `room` for this node: its origin afterwards (this node, or the live node
    /// that holds it) with the epoch.
    pub async fn claim(&self, room: &str) -> Result<Origin> {
        let mut con = self.con.clone();
        let (node, epoch): (String, u64) = redis::Script::new(CLAIM)
            .key(room_key(room))
            .arg(&self.me)
            .arg("edgefwd:node:")
            .invoke_async(&mut con)
            .await
            .with_context(|| format!("claiming room {room:?} in Redis"))?;
        Ok(Origin { node, epoch })
    }

    /// The room's origin, if it has one.
    pub async fn origin(&self, room: &str) -> Result<Option<Origin>> {
        let mut con = self.con.clone();
        let (node, epoch): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(room_key(room))
            .arg("node")
            .arg("epoch")
            .query_async(&mut con)
            .await
            .with_context(|| format!("reading room {room:?} from Redis"))?;
        Ok(node.map(|node| Origin {
            node,
            epoch: epoch.unwrap_or(0),
        }))
    }

    /// Milliseconds left on a node's lease (negative: none).
    pub async fn lease_ttl_ms(&self, node: &str) -> Result<i64> {
        let mut con = self.con.clone();
        redis::cmd("PTTL")
            .arg(node_key(node))
            .query_async(&mut con)
            .await
            .context("reading a lease's time left from Redis")
    }

    /// Every room with an origin, by name.
    pub async fn rooms(&self) -> Result<Vec<(String, Origin)>> {
        let mut con = self.con.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("edgefwd:room:*")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .context("listing the rooms in Redis")?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut out = Vec::new();
        for k in keys {
            // edgefwd:room:{NAME}
            let Some(name) = k
                .strip_prefix("edgefwd:room:{")
                .and_then(|r| r.strip_suffix('}'))
            else {
                continue;
            };
            if let Some(o) = self.origin(name).await? {
                out.push((name.to_string(), o));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// The origin of a room about to be published: its live origin if it has one,
    /// else the node the placement puts it on, claimed for that node now (so an offer
    /// redirected there, and any other node asked meanwhile, agree): the first
    /// candidate among the live nodes serving WHIP (and this one) that has placements
    /// left this second (`per_second`), else the first candidate.
    pub async fn place(&self, room: &str, per_second: u32) -> Result<Origin> {
        if let Some(o) = self.origin(room).await?
            && (o.node == self.me || self.lease(&o.node).await?.is_some())
        {
            return Ok(o);
        }
        let leases: Vec<Lease> = self
            .live_nodes()
            .await?
            .into_iter()
            .filter(|l| (l.http.is_some() || l.node == self.me) && !l.draining)
            .collect();
        let candidates = super::placement::candidates(room, &leases);
        let mut con = self.con.clone();
        for l in &candidates {
            let (node, epoch): (String, u64) = redis::Script::new(PLACE)
                .key(room_key(room))
                .arg(&l.node)
                .arg("edgefwd:node:")
                .arg(per_second)
                .arg("edgefwd:placed:")
                .invoke_async(&mut con)
                .await
                .with_context(|| format!("placing room {room:?} in Redis"))?;
            if !node.is_empty() {
                return Ok(Origin { node, epoch });
            }
        }
        // Every node out of placements this second (or none live): the first
        // candidate all the same, else this node.
        match candidates.first() {
            Some(l) => {
                let (node, epoch): (String, u64) = redis::Script::new(PLACE)
                    .key(room_key(room))
                    .arg(&l.node)
                    .arg("edgefwd:node:")
                    .arg(u32::MAX)
                    .arg("edgefwd:placed:")
                    .invoke_async(&mut con)
                    .await
                    .with_context(|| format!("placing room {room:?} in Redis"))?;
                Ok(Origin { node, epoch })
            }
            None => self.claim(room).await,
        }
    }

    /// Where `room` goes when its origin drains: the first placement candidate among
    /// the live nodes that serve WHIP (or this one, unless `draining_here`: its lease
    /// may not say so yet) and do not drain (None: no such node is live).
    pub async fn successor(&self, room: &str, draining_here: bool) -> Result<Option<Lease>> {
        let leases: Vec<Lease> = self
            .live_nodes()
            .await?
            .into_iter()
            .filter(|l| (l.http.is_some() || l.node == self.me) && !l.draining)
            .filter(|l| !(draining_here && l.node == self.me))
            .collect();
        Ok(super::placement::candidates(room, &leases)
            .first()
            .map(|l| (*l).clone()))
    }

    /// Takes `room` over from `from`, its draining origin, for this node: the room's
    /// origin afterwards (this node one epoch on, or whoever got it meanwhile).
    pub async fn take_over(&self, room: &str, from: &Origin) -> Result<Origin> {
        let mut con = self.con.clone();
        let (node, epoch): (String, u64) = redis::Script::new(TAKE_OVER)
            .key(room_key(room))
            .arg(&self.me)
            .arg(&from.node)
            .arg(from.epoch)
            .invoke_async(&mut con)
            .await
            .with_context(|| format!("taking room {room:?} over in Redis"))?;
        Ok(Origin { node, epoch })
    }

    /// Where this node gets `room` from: its parent in the room's tree (attached now
    /// if need be, under at most `degree` children per node, never under a node of
    /// `avoid`), when the room's origin is another live node (None when the room is
    /// ours or no one's yet).
    pub async fn upstream(
        &self,
        room: &str,
        degree: u32,
        avoid: &[String],
    ) -> Result<Option<UpstreamConfig>> {
        let Some(o) = self.origin(room).await? else {
            return Ok(None);
        };
        if o.node == self.me || self.lease(&o.node).await?.is_none() {
            return Ok(None);
        }
        let Some(parent) = self.attach(room, degree, avoid).await? else {
            return Ok(None);
        };
        Ok(self.lease(&parent.node).await?.map(|l| UpstreamConfig {
            room: room.to_string(),
            node: parent.node,
            api: l.api,
            epoch: Some(parent.epoch),
        }))
    }
}

//! The maps of the forwarding program, by name (forwarder-common has their layouts;
//! forwarder-user's `dataplane::maps` is their one writer).

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, PerCpuArray, XskMap},
};
use forwarder_common::{
    egress::MAX_EGRESS,
    fanout::{MAX_COPY_SLOTS, NUM_COPY_VERDICTS},
    ifmac::{IfMac, MAX_IFINDEX},
    links::{LinkKey, LinkState, LinkValue, MAX_LINKS},
    listeners::{ListenerKey, ListenerValue, MAX_LISTENERS},
    peers::{MAX_PEERS, MAX_QUEUES, PeerValue},
    route_stats::RouteStats,
    routes::{MAX_ROUTES, RouteKey, RouteValue},
    routes4::RouteKey4,
    sources::{MAX_SOURCES, SourceKey, SourceValue},
    verdicts::{NUM_VERDICTS, VerdictStats},
};

#[map]
pub static EFWD_ROUTES4_V3: HashMap<RouteKey4, RouteValue> =
    HashMap::with_max_entries(MAX_ROUTES, 0);
#[map]
pub static EFWD_ROUTES6_V3: HashMap<RouteKey, RouteValue> =
    HashMap::with_max_entries(MAX_ROUTES, 0);
#[map]
pub static EFWD_LISTEN_V1: HashMap<ListenerKey, ListenerValue> =
    HashMap::with_max_entries(MAX_LISTENERS, 0);
#[map]
pub static EFWD_SOURCES_V1: HashMap<SourceKey, SourceValue> =
    HashMap::with_max_entries(MAX_SOURCES, 0);
#[map]
pub static EFWD_PEERS_V1: HashMap<SourceKey, PeerValue> = HashMap::with_max_entries(MAX_PEERS, 0);
#[map]
pub static EFWD_XSKS_V1: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);
#[map]
pub static EFWD_RSTATS_V3: PerCpuArray<RouteStats> = PerCpuArray::with_max_entries(MAX_ROUTES, 0);
#[map]
pub static EFWD_VERDICT_V4: PerCpuArray<VerdictStats> =
    PerCpuArray::with_max_entries(NUM_VERDICTS, 0);
#[map]
pub static EFWD_EGRESS_V1: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS, 0);
#[map]
pub static EFWD_IFMAC_V1: Array<IfMac> = Array::with_max_entries(MAX_IFINDEX, 0);
#[map]
pub static EFWD_COPIES_V1: Array<RouteValue> = Array::with_max_entries(MAX_COPY_SLOTS, 0);
#[map]
pub static EFWD_COPYVERDICT_V1: PerCpuArray<VerdictStats> =
    PerCpuArray::with_max_entries(NUM_COPY_VERDICTS, 0);
// Read and written by userspace only (the cascade links and their state), kept here
// so they are created and pinned with the others.
#[map]
pub static EFWD_LINKS_V1: HashMap<LinkKey, LinkValue> = HashMap::with_max_entries(MAX_LINKS, 0);
#[map]
pub static EFWD_LINKSTATE_V1: HashMap<LinkKey, LinkState> = HashMap::with_max_entries(MAX_LINKS, 0);

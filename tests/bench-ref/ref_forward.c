// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * Reference XDP RTP forwarder in C, for `cargo xtask bench forward` only: the same
 * job as edgefwd_xdp's IPv4 fast path (validate Ethernet/802.1Q, IPv4, UDP and the
 * RTP header; one hash lookup by listener address/port, source address/port and SSRC;
 * rewrite MACs, addresses, ports, SSRC, sequence number, timestamp and payload type;
 * fix both checksums incrementally; count per route; redirect through a devmap),
 * written the way a C programmer would for IPv4 alone. The benchmark runs it in the
 * same topology and the same run as the Rust program, so the two can be compared as
 * a ratio on a noisy machine.
 *
 * Built by xtask with clang -O2 -target bpf; loaded and programmed by edgefwd-bench.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* All network byte order. */
struct ref_key {
	__u32 listen_addr;
	__u32 src_addr;
	__u16 listen_port;
	__u16 src_port;
	__u32 ssrc;
};

struct ref_route {
	__u8 dst_mac[6];
	__u8 src_mac[6];
	__u32 out_src_addr; /* network order */
	__u32 out_dst_addr; /* network order */
	__u16 out_src_port; /* network order */
	__u16 out_dst_port; /* network order */
	__u32 ssrc_out; /* network order */
	__u32 ts_delta; /* host order */
	__u16 seq_delta; /* host order */
	__u8 pt_from;
	__u8 pt_to;
	__u32 egress_ifindex; /* the ingress one: XDP_TX */
	__u32 stats_slot;
};

struct ref_stats {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ref_key);
	__type(value, struct ref_route);
} REF_ROUTES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct ref_stats);
} REF_STATS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} REF_EGRESS SEC(".maps");

/* The MAC registered per ingress interface (the router's "addressed to us" check). */
struct ref_ifmac {
	__u8 mac[6];
	__u8 flags; /* 1: set */
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct ref_ifmac);
} REF_IFMAC SEC(".maps");

/* One's complement: accumulate ~old + new per changed 16-bit word, fold at the end. */
static __always_inline __u32 csum_word(__u32 sum, __u16 old, __u16 new)
{
	return sum + (__u16)~old + new;
}

static __always_inline __u32 csum_u32(__u32 sum, __u32 old, __u32 new)
{
	sum = csum_word(sum, old >> 16, new >> 16);
	return csum_word(sum, old & 0xffff, new & 0xffff);
}

static __always_inline __u16 csum_apply(__u16 check, __u32 sum)
{
	sum += (__u16)~check;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

SEC("xdp")
int ref_forward(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	__u16 proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		__u16 *vlan = data + off;
		if ((void *)(vlan + 2) > end)
			return XDP_PASS;
		proto = vlan[1];
		off += 4;
	}
	if (proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;

	struct iphdr *ip = data + off;
	if ((void *)(ip + 1) > end)
		return XDP_DROP;
	__u32 ihl = ip->ihl * 4;
	if (ip->version != 4 || ihl < sizeof(*ip))
		return XDP_DROP;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl || data + off + tot_len > end)
		return XDP_DROP;
	if (ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	if (ip->frag_off & bpf_htons(0x3fff))
		return XDP_PASS;

	struct udphdr *udp = (void *)ip + ihl;
	__u8 *rtp = (__u8 *)(udp + 1);
	if ((void *)(rtp + 12) > end)
		return XDP_DROP;
	__u32 udp_len = bpf_ntohs(udp->len);
	if (udp_len != tot_len - ihl)
		return XDP_DROP;
	__u32 rtp_len = udp_len - sizeof(*udp);

	/* RFC 7983: 128..191 is RTP/RTCP; RFC 5761: PT 64..95 is RTCP. The rest is for
	 * the stack (STUN, DTLS, RTCP). */
	__u8 b0 = rtp[0], b1 = rtp[1];
	if (b0 < 128 || b0 > 191)
		return XDP_PASS;
	if ((b1 & 0x7f) >= 64 && (b1 & 0x7f) <= 95)
		return XDP_PASS;
	if (rtp_len > 1400)
		return XDP_DROP;
	__u32 hlen = 12 + 4 * (b0 & 0x0f);
	if (hlen > rtp_len)
		return XDP_DROP;
	if (b0 & 0x10) {
		__u8 *x = rtp + (hlen & 0x7f);
		if ((void *)(x + 4) > end)
			return XDP_DROP;
		hlen += 4 + 4 * ((x[2] << 8) | x[3]);
		if (hlen > rtp_len)
			return XDP_DROP;
	}
	if (b0 & 0x20) {
		__u8 *last = rtp + ((rtp_len - 1) & 0x7ff);
		if ((void *)(last + 1) > end)
			return XDP_DROP;
		if (*last == 0 || hlen + *last > rtp_len)
			return XDP_DROP;
	}

	struct ref_key key = {
		.listen_addr = ip->daddr,
		.src_addr = ip->saddr,
		.listen_port = udp->dest,
		.src_port = udp->source,
		.ssrc = *(__u32 *)(rtp + 8),
	};
	struct ref_route *r = bpf_map_lookup_elem(&REF_ROUTES, &key);
	if (!r)
		return XDP_DROP;
	/* The router's checks edgefwd makes before it forwards (RFC 1812): unicast to the
	 * ingress interface's MAC, no IP options, no reserved flag or martian source, a
	 * right header checksum, TTL above 1. */
	if (eth->h_dest[0] & 1)
		return XDP_DROP;
	__u32 ifindex = ctx->ingress_ifindex;
	struct ref_ifmac *m = bpf_map_lookup_elem(&REF_IFMAC, &ifindex);
	if (m && (m->flags & 1) &&
	    (*(__u32 *)m->mac != *(__u32 *)eth->h_dest ||
	     *(__u16 *)(m->mac + 4) != *(__u16 *)(eth->h_dest + 4)))
		return XDP_DROP;
	if (ihl != sizeof(*ip))
		return XDP_PASS;
	__u8 src0 = ((__u8 *)&ip->saddr)[0];
	if ((ip->frag_off & bpf_htons(0x8000)) || src0 == 0 || src0 == 127 || src0 >= 224)
		return XDP_DROP;
	__u32 hsum = 0;
	__u16 *hw = (__u16 *)ip;
#pragma unroll
	for (int i = 0; i < 10; i++)
		hsum += hw[i];
	hsum = (hsum & 0xffff) + (hsum >> 16);
	hsum = (hsum & 0xffff) + (hsum >> 16);
	if (hsum != 0xffff)
		return XDP_DROP;
	if (ip->ttl <= 1)
		return XDP_DROP;

	/* IPv4: TTL, addresses. The addresses also feed the UDP pseudo-header. */
	__u32 ipsum = 0, l4sum = 0;
	__u16 *ttl_word = (__u16 *)&ip->ttl;
	__u16 old_ttl = *ttl_word;
	ip->ttl--;
	ipsum = csum_word(ipsum, old_ttl, *ttl_word);
	l4sum = csum_u32(l4sum, ip->saddr, r->out_src_addr);
	l4sum = csum_u32(l4sum, ip->daddr, r->out_dst_addr);
	ip->saddr = r->out_src_addr;
	ip->daddr = r->out_dst_addr;
	ip->check = csum_apply(ip->check, ipsum + l4sum);

	/* UDP ports. */
	l4sum = csum_word(l4sum, udp->source, r->out_src_port);
	l4sum = csum_word(l4sum, udp->dest, r->out_dst_port);
	udp->source = r->out_src_port;
	udp->dest = r->out_dst_port;

	/* RTP: payload type, sequence number, timestamp, SSRC. */
	__u16 *w = (__u16 *)rtp;
	__u16 old = w[0];
	if ((b1 & 0x7f) == r->pt_from)
		rtp[1] = (b1 & 0x80) | (r->pt_to & 0x7f);
	l4sum = csum_word(l4sum, old, w[0]);
	old = w[1];
	w[1] = bpf_htons(bpf_ntohs(old) + r->seq_delta);
	l4sum = csum_word(l4sum, old, w[1]);
	__u32 *ts = (__u32 *)(rtp + 4);
	__u32 old_ts = *ts;
	*ts = bpf_htonl(bpf_ntohl(old_ts) + r->ts_delta);
	l4sum = csum_u32(l4sum, old_ts, *ts);
	__u32 *ssrc = (__u32 *)(rtp + 8);
	l4sum = csum_u32(l4sum, *ssrc, r->ssrc_out);
	*ssrc = r->ssrc_out;
	if (udp->check) {
		__u16 c = csum_apply(udp->check, l4sum);
		udp->check = c ? c : 0xffff;
	}

	__builtin_memcpy(eth->h_dest, r->dst_mac, 6);
	__builtin_memcpy(eth->h_source, r->src_mac, 6);

	struct ref_stats *s = bpf_map_lookup_elem(&REF_STATS, &r->stats_slot);
	if (s) {
		s->packets++;
		s->bytes += end - data;
	}
	if (r->egress_ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect_map(&REF_EGRESS, r->egress_ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";

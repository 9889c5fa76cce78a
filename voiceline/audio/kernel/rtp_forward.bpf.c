// SPDX-License-Identifier: GPL-2.0
/*
 * TC ingress (direct action): relays an established leg's RTP inside the kernel.
 *
 * `routes` is keyed by the destination of a received datagram (a leg's RTP
 * socket). A hit forwards only plain RTP (version 2, no padding, extension or
 * CSRC) of the audio payload type, from the latched source and SSRC, rewritten
 * as the listening leg's stream: addresses and ports, SSRC, payload type,
 * sequence and timestamp shifted as voiceline/audio/rtp.py's OutboundStream
 * shifts them (the offsets fixed by the first packet after a change of source,
 * which is also marked), checksums updated. Everything else returns
 * TC_ACT_UNSPEC: the next filter (another process's) or the socket decides.
 *
 * The rewritten packet leaves as one this host sends: with media bound to a
 * loopback address (the program on `lo` alone) or to a loopback destination
 * arriving on `lo`, up the stack as before (no route lookup); otherwise the
 * kernel's FIB (`bpf_fib_lookup`, looked up as a packet of this host: from
 * `lo`) names the egress interface and next hop, and the packet is redirected
 * out of it with the neighbour's MAC. A local destination is reached up the
 * stack from `lo` only: from another interface the stack would drop a packet
 * with a local source address as a martian (routes.py installs no such route).
 * When the lookup cannot answer (no neighbour yet, MTU, unreachable,
 * forwarding off on `lo`) nothing is changed or counted: the socket gets the
 * packet and userspace relays it.
 *
 * `legs[slot]` holds the route's rewrite and reception state under a spin lock;
 * `enabled[slot]` is read under that lock, so once userspace has cleared it and
 * taken the lock once (a locked lookup), no packet is forwarded or counted any
 * more: every packet is either forwarded and counted here or left to the socket.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MAX_LEGS 16384
#define RTP_HEADER 12
#define MAX_PAYLOAD 1460
#define MAX_DROPOUT 3000
#define MAX_MISORDER 100
#define PLAIN_FIRST_BYTE 0x80
#define MARKER 0x80

struct route_key {
	__u32 addr; /* network order */
	__u16 port; /* network order */
	__u16 pad;
};

struct route {
	__u32 peer_addr; /* the latched source, network order */
	__u16 peer_port; /* network order */
	__u8 in_pt;
	__u8 out_pt;
	__u32 peer_ssrc; /* host order */
	__u32 src_addr; /* what the packet leaves as: the listening leg's socket */
	__u32 dst_addr; /* and where to: the listening leg's peer */
	__u16 src_port; /* host order */
	__u16 dst_port;
	__u32 ssrc; /* the listening leg's stream, host order */
	__u32 clock_rate;
	__u32 frame_samples;
	__u32 slot;
};

struct leg {
	struct bpf_spin_lock lock;
	__u32 changed; /* the next packet starts a new source: fix the shifts, set the marker */
	__u64 sent_ns; /* when the newest packet went out (0: never) */
	__u64 last_ns; /* when the last forwarded packet arrived */
	__u64 packets;
	__u64 octets; /* of payload */
	__u32 seq_shift;
	__u32 ts_shift;
	__u32 newest_seq; /* the newest packet sent, as sent */
	__u32 newest_ts;
	__u32 src_max; /* the source's highest sequence number (RFC 3550 A.1) */
	__u32 src_cycles; /* wraps of it seen here */
	__u32 jitter16; /* interarrival jitter in timestamp units, times 16 (RFC 3550 A.8) */
	__u32 transit; /* of the previous packet, when has_transit */
	__u32 has_transit;
	__u32 pad;
};

/* The layouts forwarding.py packs (_ROUTE_KEY, _ROUTE, _LEG). */
_Static_assert(sizeof(struct route_key) == 8, "route_key layout");
_Static_assert(sizeof(struct route) == 40, "route layout");
_Static_assert(sizeof(struct leg) == 80, "leg layout");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* an element is never reused under a reader */
	__uint(max_entries, MAX_LEGS);
	__type(key, struct route_key);
	__type(value, struct route);
} routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_LEGS);
	__type(key, __u32);
	__type(value, struct leg);
} legs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_LEGS);
	__type(key, __u32);
	__type(value, __u32);
} enabled SEC(".maps");

/* [0]: the media bind address, network order; 0 (any address) keys routes by port alone. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} bind SEC(".maps");

/* Packets of a route left to the socket because the route lookup could not answer, by its
 * BPF_FIB_LKUP_RET_* code (a negative one counted at 0). */
#define FIB_CODES 16
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FIB_CODES);
	__type(key, __u32);
	__type(value, __u64);
} fib_fallbacks SEC(".maps");

#define LOOPBACK_IFINDEX 1 /* in every network namespace */
#define AF_INET 2
#define IP_OFF ETH_HLEN
#define UDP_OFF (IP_OFF + sizeof(struct iphdr))
#define RTP_OFF (UDP_OFF + sizeof(struct udphdr))
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))
#define IP_SRC_OFF (IP_OFF + offsetof(struct iphdr, saddr))
#define UDP_CSUM_OFF (UDP_OFF + offsetof(struct udphdr, check))

static __always_inline int replace4(struct __sk_buff *skb, __u32 offset, __u32 from, __u32 to, int pseudo)
{
	if (from == to)
		return 0;
	if (bpf_skb_store_bytes(skb, offset, &to, 4, BPF_F_RECOMPUTE_CSUM))
		return -1;
	return bpf_l4_csum_replace(skb, UDP_CSUM_OFF, from, to,
				   BPF_F_MARK_MANGLED_0 | (pseudo ? BPF_F_PSEUDO_HDR : 0) | 4);
}

SEC("tc")
int voiceline_rtp(struct __sk_buff *skb)
{
	/* Other traffic leaves after a few loads: not IPv4 UDP (checked in the linear head), or no route. */
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->gso_segs > 1)
		return TC_ACT_UNSPEC; /* one datagram per packet only */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + IP_OFF;
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_UNSPEC;
	if (ip->version != 4 || ip->ihl != 5 || ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_UNSPEC;
	if (data + RTP_OFF + RTP_HEADER > data_end) {
		if (skb->len < RTP_OFF + RTP_HEADER || bpf_skb_pull_data(skb, RTP_OFF + RTP_HEADER))
			return TC_ACT_UNSPEC;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + RTP_OFF + RTP_HEADER > data_end)
			return TC_ACT_UNSPEC;
		ip = data + IP_OFF;
	}
	struct udphdr *udp = data + UDP_OFF;
	__u32 zero = 0;
	__u32 *bound = bpf_map_lookup_elem(&bind, &zero);
	if (!bound || (*bound && *bound != ip->daddr))
		return TC_ACT_UNSPEC;
	struct route_key key = {.addr = *bound, .port = udp->dest};
	struct route *route = bpf_map_lookup_elem(&routes, &key);
	if (!route)
		return TC_ACT_UNSPEC;
	if (ip->saddr != route->peer_addr || udp->source != route->peer_port)
		return TC_ACT_UNSPEC; /* not the latched source: the leg's own rules decide */
	__u32 udp_len = bpf_ntohs(udp->len);
	if (udp_len < sizeof(struct udphdr) + RTP_HEADER || udp_len > sizeof(struct udphdr) + RTP_HEADER + MAX_PAYLOAD ||
	    UDP_OFF + udp_len > skb->len)
		return TC_ACT_UNSPEC;
	__u8 *rtp = data + RTP_OFF;
	if (rtp[0] != PLAIN_FIRST_BYTE || (rtp[1] & 0x7f) != route->in_pt)
		return TC_ACT_UNSPEC; /* telephone-events, other payload types, extended headers */
	__u32 word0 = *(__u32 *)rtp; /* network order: first byte, marker and payload type, sequence */
	__u32 ts_be = *(__u32 *)(rtp + 4);
	__u32 ssrc_be = *(__u32 *)(rtp + 8);
	if (bpf_ntohl(ssrc_be) != route->peer_ssrc)
		return TC_ACT_UNSPEC; /* a new SSRC: the leg's statistics start over in userspace */
	__u32 sequence = bpf_ntohl(word0) & 0xffff;
	__u32 timestamp = bpf_ntohl(ts_be);
	__u32 marker = rtp[1] & MARKER;
	__u32 payload = udp_len - sizeof(struct udphdr) - RTP_HEADER;
	__u32 new_src = route->src_addr, new_dst = route->dst_addr;
	struct bpf_fib_lookup fib = {};
	long found = BPF_FIB_LKUP_RET_NOT_FWDED; /* what the FIB says of a local destination */
	if ((new_dst & 0xff) != 127 && (*bound & 0xff) != 127) { /* network order: the first octet */
		fib.family = AF_INET;
		fib.l4_protocol = IPPROTO_UDP;
		fib.tot_len = bpf_ntohs(ip->tot_len);
		fib.ifindex = LOOPBACK_IFINDEX; /* the rewritten packet is this host's own */
		fib.ipv4_src = new_src;
		fib.ipv4_dst = new_dst;
		found = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	}
	if (found != BPF_FIB_LKUP_RET_SUCCESS &&
	    (found != BPF_FIB_LKUP_RET_NOT_FWDED || skb->ingress_ifindex != LOOPBACK_IFINDEX)) {
		__u32 code = found > 0 && found < FIB_CODES ? found : 0;
		__u64 *fallbacks = bpf_map_lookup_elem(&fib_fallbacks, &code);
		if (fallbacks)
			*fallbacks += 1;
		return TC_ACT_UNSPEC; /* the socket's path relays it (and resolves the neighbour) */
	}
	__u32 slot = route->slot;
	__u32 *on = bpf_map_lookup_elem(&enabled, &slot);
	struct leg *leg = bpf_map_lookup_elem(&legs, &slot);
	if (!on || !leg)
		return TC_ACT_UNSPEC;
	__u64 now = bpf_ktime_get_ns();
	__u32 arrival = (__u32)(now / 1000 * route->clock_rate / 1000000); /* in timestamp units */
	__u32 out_seq, out_ts;

	bpf_spin_lock(&leg->lock);
	if (!*on) {
		bpf_spin_unlock(&leg->lock);
		return TC_ACT_UNSPEC;
	}
	__u32 delta = (sequence - leg->src_max) & 0xffff;
	if (delta >= MAX_DROPOUT && delta <= 0x10000 - MAX_MISORDER) {
		bpf_spin_unlock(&leg->lock); /* the peer restarted its numbering: userspace starts over */
		return TC_ACT_UNSPEC;
	}
	if (delta < MAX_DROPOUT) {
		if (sequence < leg->src_max)
			leg->src_cycles += 1;
		leg->src_max = sequence;
	}
	__u32 transit = arrival - timestamp;
	if (leg->has_transit) {
		__s32 d = (__s32)(transit - leg->transit);
		if (d < 0)
			d = -d;
		leg->jitter16 += d - ((leg->jitter16 + 8) >> 4);
	}
	leg->transit = transit;
	leg->has_transit = 1;
	if (leg->changed) {
		__u64 advance = route->frame_samples;
		if (leg->sent_ns && now > leg->sent_ns) {
			/* elapsed time in clock ticks, rounded, but at least one frame */
			__u64 elapsed = ((now - leg->sent_ns) * route->clock_rate + 500000000ULL) / 1000000000ULL;
			if (elapsed > advance)
				advance = elapsed;
		}
		leg->changed = 0;
		marker = MARKER;
		leg->seq_shift = (leg->newest_seq + 1 - sequence) & 0xffff;
		leg->ts_shift = leg->newest_ts + (__u32)advance - timestamp;
	}
	out_seq = (sequence + leg->seq_shift) & 0xffff;
	out_ts = timestamp + leg->ts_shift;
	if (((out_seq - leg->newest_seq) & 0xffff) < 0x8000) { /* the newest yet */
		leg->newest_seq = out_seq;
		leg->newest_ts = out_ts;
		leg->sent_ns = now;
	}
	leg->packets += 1;
	leg->octets += payload;
	leg->last_ns = now;
	bpf_spin_unlock(&leg->lock);

	__u32 new_word0 = bpf_htonl((PLAIN_FIRST_BYTE << 24) | ((marker | route->out_pt) << 16) | out_seq);
	__u32 old_addr_src = ip->saddr, old_addr_dst = ip->daddr;
	__u32 old_ports = *(__u32 *)udp;
	/* source then destination port, as they lie in memory (a little-endian load) */
	__u32 new_ports = (__u32)bpf_htons(route->src_port) | ((__u32)bpf_htons(route->dst_port) << 16);

	if (replace4(skb, RTP_OFF, word0, new_word0, 0) || replace4(skb, RTP_OFF + 4, ts_be, bpf_htonl(out_ts), 0) ||
	    replace4(skb, RTP_OFF + 8, ssrc_be, bpf_htonl(route->ssrc), 0) ||
	    replace4(skb, UDP_OFF, old_ports, new_ports, 0) || replace4(skb, IP_SRC_OFF, old_addr_src, new_src, 1) ||
	    replace4(skb, IP_SRC_OFF + 4, old_addr_dst, new_dst, 1))
		return TC_ACT_SHOT; /* counted as sent: cannot happen for a linear packet we just read */
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr_src, new_src, 4) ||
	    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr_dst, new_dst, 4))
		return TC_ACT_SHOT;
	if (found != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK; /* up the stack to the listening leg's peer, on this host */
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) || bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	return bpf_redirect(fib.ifindex, 0); /* out of the interface the FIB named, to the next hop */
}

char LICENSE[] SEC("license") = "GPL";

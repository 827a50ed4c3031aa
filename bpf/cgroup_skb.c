/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * cgroup_skb egress: the packet-level backstop, run on every packet the node sends, so its
 * common case must cost next to nothing. It has two jobs:
 *   - raw, ICMP and other non-TCP/UDP sockets never pass the socket hooks: their every packet is
 *     judged here;
 *   - connect/sendmsg judge by the sending task's cgroup (bpf/lib/origin.h). A packet that opens
 *     a flow (a TCP SYN, any UDP datagram) from a socket whose cgroup is not the sender's — a
 *     socket passed over SCM_RIGHTS, a task moved after socket(), an MPTCP subflow opened by a
 *     kernel worker — is judged again here by the socket's own cgroup, and dropped if denied.
 * It also records who sends each UDP datagram and TCP SYN addressed to the node resolver
 * (bpf/lib/dns.h), the only thing that tells the resolver which workload asked.
 * Everything else (packets of flows already judged, replies from request and timewait sockets)
 * passes after a few field reads, before any map lookup.
 */
#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_CGROUP_SKB

#define SKB_DROP 0
#define SKB_PASS 1

/*
 * __skb_destination() - fill @a, and the packet's source, from its headers.
 * @src: out, source address (IPv4 mapped) and port, for the DNS sender record
 *
 * Returns: 0, or -1 if unparseable.
 */
static __always_inline int __skb_destination(struct __sk_buff *skb, struct emit_args *a,
					     struct dns_client_key *src)
{
	__u32 l4off;
	__u8 l4proto;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return -1;
		a->daddr[0] = 0;
		a->daddr[1] = 0;
		a->daddr[2] = bpf_htonl(0xffff);
		a->daddr[3] = ip.daddr;
		src->addr[0] = 0;
		src->addr[1] = 0;
		src->addr[2] = bpf_htonl(0xffff);
		src->addr[3] = ip.saddr;
		a->family = HA_AF_INET;
		l4proto = ip.protocol;
		l4off = ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return -1;
		__builtin_memcpy(a->daddr, &ip6.daddr, sizeof(a->daddr));
		__builtin_memcpy(src->addr, &ip6.saddr, sizeof(src->addr));
		a->family = HA_AF_INET6;
		/* extension headers are not walked: their packets are judged without a port */
		l4proto = ip6.nexthdr;
		l4off = sizeof(ip6);
	} else {
		return -1;
	}
	a->protocol = l4proto;
	src->protocol = l4proto;
	if (l4proto == IPPROTO_TCP || l4proto == IPPROTO_UDP) {
		__u16 ports[2];

		/* source and dest are the first two 16-bit fields of both headers */
		if (!bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports))) {
			src->port = bpf_ntohs(ports[0]);
			a->dport = bpf_ntohs(ports[1]);
		}
	}
	return 0;
}

int skb_egress(struct __sk_buff *skb)
{
	struct emit_args a = { .hook = HOOK_SKB_EGRESS, .in_task = 0 };
	struct dns_client_key src = {};
	struct bpf_sock *sk = skb->sk;
	struct dns_config *dc;
	struct binding *b;
	struct decision d;
	int raw, same_task;

	if (!sk)
		return SKB_PASS;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return SKB_PASS;
	raw = !__is_plain_socket(sk->type, sk->protocol);
	if (!raw) {
		if (sk->protocol != IPPROTO_UDP && sk->state != BPF_TCP_SYN_SENT)
			return SKB_PASS;
		/* headers are read only for a judge or a resolver that needs them */
		a.cgroup_id = bpf_skb_cgroup_id(skb);
		same_task = a.cgroup_id == bpf_get_current_cgroup_id();
		dc = __dns_config();
		/* A SYN's socket is connected: its port tells whether the resolver can be the
		 * destination, without reading the headers (a UDP socket may be unconnected). */
		if (dc && sk->protocol != IPPROTO_UDP && bpf_ntohs(sk->dst_port) != dc->port)
			dc = NULL;
		if (same_task && !dc)
			return SKB_PASS;
		if (__skb_destination(skb, &a, &src))
			return SKB_PASS;
		if (dc)
			__dns_record_sender(skb, dc, &a, &src);
		if (same_task)
			return SKB_PASS;
	} else {
		a.cgroup_id = bpf_skb_cgroup_id(skb);
		if (__skb_destination(skb, &a, &src))
			return SKB_PASS;
	}
	b = __binding_of_skb(skb, a.cgroup_id);
	if (raw) {
		__decide_raw(b, &d);
		if (d.verdict != VERDICT_ALLOW || d.emit_allow)
			__emit(skb, &d, &a);
		else
			__count_decision(d.policy_id, d.verdict, d.reason, a.hook);
		if (d.verdict == VERDICT_DENY)
			return SKB_DROP;
		/* allowRawSockets lets a workload send raw packets anywhere but to metadata */
		__decide(b, a.cgroup_id, a.daddr, a.dport, __proto_bit(a.protocol), &d);
		if (d.reason != REASON_METADATA_BLOCK)
			return SKB_PASS;
	} else {
		__decide(b, a.cgroup_id, a.daddr, a.dport, __proto_bit(a.protocol), &d);
		/* A plain socket outside any policy keeps the node default its sender got at
		 * connect; what the backstop adds for it is the metadata block. */
		if (d.reason == REASON_NODE_DEFAULT)
			return SKB_PASS;
	}
	/* allowed packets are counted, not sent: the flow's connect already was */
	if (d.verdict != VERDICT_ALLOW)
		__emit(skb, &d, &a);
	else
		__count_decision(d.policy_id, d.verdict, d.reason, a.hook);
	return d.verdict == VERDICT_DENY ? SKB_DROP : SKB_PASS;
}

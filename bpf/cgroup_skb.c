/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * cgroup_skb egress: the packet-level backstop. The socket hooks judge every TCP/UDP
 * destination; what they never see is a raw or ICMP socket's packets (hand-made TCP, ICMP
 * tunnels) and traffic of sockets that existed before the agent. Per packet we only do what
 * is cheap (one metadata lookup, the socket type); the full decision runs only for metadata
 * destinations and non-plain sockets.
 */
#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_CGROUP_SKB

#define SKB_DROP 0
#define SKB_PASS 1

int skb_egress(struct __sk_buff *skb)
{
	struct emit_args a = { .hook = HOOK_SKB_EGRESS, .in_task = 0 };
	struct metadata_key mkey = { .prefixlen = 128 };
	struct bpf_sock *sk;
	struct origin o = {};
	struct decision d;
	__u32 l4off;
	__u8 l4proto;
	int raw = 0, is_meta;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return SKB_PASS;
		a.daddr[0] = 0;
		a.daddr[1] = 0;
		a.daddr[2] = bpf_htonl(0xffff);
		a.daddr[3] = ip.daddr;
		a.family = HA_AF_INET;
		l4proto = ip.protocol;
		l4off = ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return SKB_PASS;
		__builtin_memcpy(a.daddr, &ip6.daddr, sizeof(a.daddr));
		a.family = HA_AF_INET6;
		/* extension headers are not walked: their packets are judged without a port */
		l4proto = ip6.nexthdr;
		l4off = sizeof(ip6);
	} else {
		return SKB_PASS;
	}

	sk = skb->sk;
	if (sk)
		sk = bpf_sk_fullsock(sk);
	if (sk)
		raw = !__is_plain_socket(sk->type, sk->protocol);

	mkey.addr[0] = a.daddr[0];
	mkey.addr[1] = a.daddr[1];
	mkey.addr[2] = a.daddr[2];
	mkey.addr[3] = a.daddr[3];
	is_meta = metadata.lookup(&mkey) != NULL;
	if (!is_meta && !raw)
		return SKB_PASS;

	__origin_from_skb(skb, &o);
	a.protocol = l4proto;
	a.cookie = bpf_get_socket_cookie(skb);
	if (l4proto == IPPROTO_TCP || l4proto == IPPROTO_UDP) {
		__u16 port;

		/* dest is the second 16-bit field of both headers */
		if (!bpf_skb_load_bytes(skb, l4off + 2, &port, sizeof(port)))
			a.dport = bpf_ntohs(port);
	}

	if (raw) {
		__decide_raw(&o, &d);
		if (d.verdict == VERDICT_DENY || !is_meta) {
			__emit(&o, &d, &a);
			return d.verdict == VERDICT_DENY ? SKB_DROP : SKB_PASS;
		}
	}
	__decide(&o, a.daddr, a.dport, __proto_bit(l4proto), &d);
	/* allowed packets of allowed connections are not news: count them, do not repeat them */
	if (d.verdict != VERDICT_ALLOW)
		__emit(&o, &d, &a);
	else
		__count_decision(d.policy_id, d.verdict, d.reason, a.hook);
	return d.verdict == VERDICT_DENY ? SKB_DROP : SKB_PASS;
}

/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Sending governed workloads' DNS to the node resolver (hostagent/dns).
 *
 * connect/sendmsg to port 53 of any address, TCP or UDP, is rewritten to the resolver's address
 * and port, whatever resolver the workload was configured with. The socket remembers what it
 * asked for (socket storage, only on redirected sockets), so recvmsg and getpeername can show
 * the replies as coming from there: stub resolvers (glibc, musl, dnspython) drop answers from
 * any other source. The skb hook then records which socket (cgroup, cookie) sent each packet
 * to the resolver, by source address and port; the resolver reads that record to attribute the
 * query to a workload, and never trusts anything inside the packet.
 */
#ifndef HOSTAGENT_DNS_H
#define HOSTAGENT_DNS_H

#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_DNS

#define DNS_PORT 53

static __always_inline struct dns_config *__dns_config(void)
{
	__u32 zero = 0;
	struct dns_config *dc = dns_config_map.lookup(&zero);

	if (!dc || !(dc->flags & DNS_REDIRECT))
		return NULL;
	/* keeps clang from turning the test into a mask on the pointer (verifier: "bitwise
	 * operator &= on pointer prohibited") */
	asm volatile("" : "+r"(dc));
	return dc;
}

static __always_inline int __is_resolver(const struct dns_config *dc, const __u32 daddr[4],
					 __u16 dport)
{
	return dport == dc->port && daddr[0] == dc->addr[0] && daddr[1] == dc->addr[1] &&
	       daddr[2] == dc->addr[2] && daddr[3] == dc->addr[3];
}

static __always_inline int __resolver_v4(const struct dns_config *dc)
{
	return !dc->addr[0] && !dc->addr[1] && dc->addr[2] == bpf_htonl(0xffff);
}

/*
 * __dns_redirect() - send a governed socket's DNS to the node resolver.
 * @ctx: connect/sendmsg context; its destination is rewritten
 * @b: the socket's binding
 * @a: the destination as named (IPv4 mapped), for the socket's record
 * @v6: an IPv6 hook
 * @d: out, filled when 1 is returned
 *
 * Returns: 1 if decided here (redirected, or addressed to the resolver itself), 0 if the
 * destination is not DNS of a governed workload and goes through the policy.
 */
static __always_inline int __dns_redirect(struct bpf_sock_addr *ctx, const struct binding *b,
					  const struct emit_args *a, int v6, struct decision *d)
{
	struct dns_config *dc;
	struct dns_origin *o;
	struct bpf_sock *sk;

	if (!b || b->mode == MODE_NONE || (b->flags & BINDING_FIXED))
		return 0;
	if (!__proto_bit(ctx->protocol))
		return 0;
	dc = __dns_config();
	if (!dc || (a->dport != DNS_PORT && a->dport != dc->port))
		return 0;

	__decision_init(d, __config(), b);
	d->verdict = VERDICT_ALLOW;
	d->reason = REASON_DNS_REDIRECT;
	/* already the resolver: also the second pass of an IPv6 socket's mapped destination */
	if (__is_resolver(dc, a->daddr, a->dport))
		return 1;
	if (a->dport != DNS_PORT)
		return 0;
	sk = ctx->sk;
	if (!sk)
		return 0;
	/* The resolver's own upstream queries: marked (CAP_NET_ADMIN) and from the agent's cgroup. */
	if (sk->mark == dc->mark && a->cgroup_id == dc->agent_cgroup_id)
		return 0;
	if (v6 ? (a->hook == HOOK_SENDMSG6 && __resolver_v4(dc)) : !__resolver_v4(dc)) {
		/* Refused rather than let by: an IPv4 socket cannot reach an IPv6 resolver, and the
		 * kernel rejects (ENOTSUPP) a sendmsg6 rewritten to an IPv4-mapped address.
		 * connect6 to the mapped address works, so connected stubs (glibc) are served. */
		d->verdict = VERDICT_DENY;
		return 1;
	}

	o = dns_origins.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o) {
		o->addr[0] = a->daddr[0];
		o->addr[1] = a->daddr[1];
		o->addr[2] = a->daddr[2];
		o->addr[3] = a->daddr[3];
		o->port = (__u16)ctx->user_port;
		o->family = a->family;
	} else {
		/* still redirected: the workload's stub may reject the reply, nothing bypasses */
		COUNT_ERROR(ERROR_DNS_ORIGIN);
	}
	if (v6) {
		ctx->user_ip6[0] = dc->addr[0];
		ctx->user_ip6[1] = dc->addr[1];
		ctx->user_ip6[2] = dc->addr[2];
		ctx->user_ip6[3] = dc->addr[3];
	} else {
		ctx->user_ip4 = dc->addr[3];
	}
	ctx->user_port = bpf_htons(dc->port);
	return 1;
}

/*
 * __dns_unredirect() - recvmsg/getpeername: show the resolver the socket asked for.
 * @v6: an IPv6 hook (user_ip6; the resolver may appear IPv4-mapped)
 */
static __always_inline void __dns_unredirect(struct bpf_sock_addr *ctx, int v6)
{
	struct dns_config *dc;
	struct dns_origin *o;
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return;
	o = dns_origins.sk_storage_get(sk, 0, 0);
	if (!o)
		return;
	dc = __dns_config();
	if (!dc || ctx->user_port != bpf_htons(dc->port))
		return;
	if (v6) {
		__u32 shown[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
				   ctx->user_ip6[3] };

		if (!__is_resolver(dc, shown, dc->port))
			return;
		ctx->user_ip6[0] = o->addr[0];
		ctx->user_ip6[1] = o->addr[1];
		ctx->user_ip6[2] = o->addr[2];
		ctx->user_ip6[3] = o->addr[3];
	} else {
		if (!__resolver_v4(dc) || ctx->user_ip4 != dc->addr[3])
			return;
		ctx->user_ip4 = o->addr[3];
	}
	ctx->user_port = o->port;
}

/*
 * __dns_record_sender() - skb egress: remember which socket sent a packet to the resolver.
 * @skb: a UDP datagram or TCP SYN
 * @dc: the resolver
 * @a: the packet's destination, and the socket's cgroup
 * @src: the packet's source (the record's key once protocol and port are in)
 */
static __always_inline void __dns_record_sender(struct __sk_buff *skb,
						const struct dns_config *dc,
						const struct emit_args *a, struct dns_client_key *src)
{
	struct dns_client val, *old;
	__u32 zero = 0;
	__u64 *gen;

	if (a->protocol != IPPROTO_UDP && a->protocol != IPPROTO_TCP)
		return;
	if (!__is_resolver(dc, a->daddr, a->dport))
		return;
	val.cgroup_id = a->cgroup_id;
	val.sock_cookie = bpf_get_socket_cookie(skb);
	old = dns_clients.lookup(src);
	if (old && old->cgroup_id == val.cgroup_id && old->sock_cookie == val.sock_cookie)
		return; /* the same socket again: what the resolver remembers of it still holds */
	if (dns_clients.update(src, &val))
		COUNT_ERROR(ERROR_DNS_CLIENT);
	/* after the update, before the packet reaches the resolver: a resolver that sees the
	 * generation unchanged since it read a record knows that record is still the kernel's */
	gen = dns_senders_gen.lookup(&zero);
	if (gen)
		__sync_fetch_and_add(gen, 1);
}

#endif /* HOSTAGENT_DNS_H */

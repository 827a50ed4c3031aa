/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The decision every hook shares: which policy governs the socket's workload, and does it allow
 * this destination, port and protocol. Order matters and is the documented precedence:
 *   1. metadata endpoints are denied unless the workload is exempt or its policy names them;
 *   2. a governed workload gets its policy's rules, then the addresses DNS answers opened for
 *      it (fqdn rules), except that encrypted-DNS endpoints and ports need a rule naming them;
 *      otherwise enforce denies and audit reports;
 *   3. anything else gets the node's defaultAction.
 */
#ifndef HOSTAGENT_POLICY_H
#define HOSTAGENT_POLICY_H

#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_POLICY

/* Values the kernel defines outside uapi; fixed by the socket ABI. */
#define HA_AF_INET 2
#define HA_AF_INET6 10
#define HA_SOCK_STREAM 1
#define HA_SOCK_DGRAM 2
#define HA_IPPROTO_MPTCP 262

struct decision {
	__u32 policy_id;
	__u32 ruleset_id;
	__u32 generation;
	__u16 rule;          /* RULE_NONE unless a rule matched */
	__u8 verdict;        /* enum hostagent_verdict */
	__u8 reason;         /* enum hostagent_reason */
	__u8 emit_allow;     /* config asks for allow events */
	__u8 pad[3];
};

/* __proto_bit() - PROTO_BIT_* for an IPPROTO_*; 0 for protocols no rule can name. */
static __always_inline __u8 __proto_bit(__u32 protocol)
{
	if (protocol == IPPROTO_TCP || protocol == HA_IPPROTO_MPTCP)
		return PROTO_BIT_TCP;
	if (protocol == IPPROTO_UDP)
		return PROTO_BIT_UDP;
	return 0;
}

/*
 * __is_plain_socket() - TCP, MPTCP or UDP: the sockets whose every destination passes through
 * the connect/sendmsg hooks. Anything else (raw, packet, ICMP "ping", SCTP, UDP-Lite) is not
 * seen there and is governed at creation and by the skb backstop instead.
 */
static __always_inline int __is_plain_socket(__u32 type, __u32 protocol)
{
	if (type == HA_SOCK_STREAM)
		return protocol == IPPROTO_TCP || protocol == HA_IPPROTO_MPTCP;
	if (type == HA_SOCK_DGRAM)
		return protocol == IPPROTO_UDP;
	return 0;
}

/*
 * __ports_match() - does a port set allow a port and protocol.
 * @portset_id: index in portsets
 * @dport: destination port, host byte order
 * @proto_bit: PROTO_BIT_* of the socket
 * @rule: out, the egress rule that allowed it
 *
 * Returns: 1 if allowed, 0 otherwise.
 */
static __always_inline int __ports_match(__u32 portset_id, __u16 dport, __u8 proto_bit, __u16 *rule)
{
	struct portset *ps = portsets.lookup(&portset_id);

	if (!ps)
		return 0;
	for (int i = 0; i < MAX_PORT_RANGES; i++) {
		struct port_range *r;

		if (i >= ps->count)
			break;
		r = &ps->ranges[i];
		if ((r->protocols & proto_bit) && dport >= r->first && dport <= r->last) {
			*rule = r->rule;
			return 1;
		}
	}
	return 0;
}

/* __node_default() - the verdict for a workload no policy governs. */
static __always_inline __u8 __node_default(const struct config *cfg)
{
	if (!cfg)
		return VERDICT_ALLOW;
	switch (cfg->default_action) {
	case DEFAULT_ACTION_DENY:
		return VERDICT_DENY;
	case DEFAULT_ACTION_AUDIT:
		return VERDICT_AUDIT;
	default:
		return VERDICT_ALLOW;
	}
}

static __always_inline struct config *__config(void)
{
	__u32 zero = 0;
	struct config *cfg = config_map.lookup(&zero);

	/* The loader writes the config before it attaches anything; an empty one means a bug or
	 * a hand-made attach. Node default falls back to allow, governed workloads keep their
	 * bindings, and the error is counted. */
	if (!cfg || !cfg->abi_version) {
		COUNT_ERROR(ERROR_CONFIG_MISSING);
		return NULL;
	}
	return cfg;
}

static __always_inline void __decision_init(struct decision *d, const struct config *cfg,
					    const struct binding *b)
{
	d->policy_id = b ? b->policy_id : 0;
	d->ruleset_id = b ? b->ruleset_id : 0;
	d->generation = cfg ? cfg->generation : 0;
	d->rule = RULE_NONE;
	d->verdict = VERDICT_UNSPECIFIED;
	d->reason = REASON_UNSPECIFIED;
	d->emit_allow = cfg ? (cfg->flags & CONFIG_EMIT_ALLOW) != 0 : 0;
}

/*
 * __fixed_verdict() - a binding that stands for no policy yet (identity pending) or for a
 * selector conflict: its mode alone decides, for every destination.
 */
static __always_inline void __fixed_verdict(const struct binding *b, struct decision *d)
{
	if (b->mode == MODE_ENFORCE)
		d->verdict = VERDICT_DENY;
	else if (b->mode == MODE_AUDIT)
		d->verdict = VERDICT_AUDIT;
	else
		d->verdict = VERDICT_ALLOW;
	d->reason = (b->flags & BINDING_CONFLICT) ? REASON_SELECTOR_CONFLICT : REASON_PENDING_IDENTITY;
}

/*
 * __fqdn_match() - did a DNS answer open this destination for this workload.
 * @cgid: the socket's cgroup (the resolver keys allowances by the querying socket's cgroup)
 * @named: out, the name was listed exactly by the rule (FQDN_NAMED)
 *
 * Expiry is checked here, not left to user space's sweep, so an address is closed the moment
 * its TTL and grace run out; connections opened before stay open (only new ones are judged).
 * Returns: 1 if allowed, 0 otherwise.
 */
static __always_inline int __fqdn_match(__u64 cgid, const __u32 daddr[4], __u16 dport,
					__u8 proto_bit, __u16 *rule, int *named)
{
	struct fqdn_key key = { .cgroup_id = cgid };
	struct fqdn_value *v;

	key.addr[0] = daddr[0];
	key.addr[1] = daddr[1];
	key.addr[2] = daddr[2];
	key.addr[3] = daddr[3];
	v = fqdn.lookup(&key);
	if (!v || v->expires_ns <= bpf_ktime_get_ns())
		return 0;
	if (!__ports_match(v->portset_id, dport, proto_bit, rule))
		return 0;
	*named = (v->flags & FQDN_NAMED) != 0;
	return 1;
}

/* __encrypted_dns_port() - a DNS-over-TLS/QUIC port of the node config. */
static __always_inline int __encrypted_dns_port(__u16 dport)
{
	__u32 zero = 0;
	struct dns_config *dc = dns_config_map.lookup(&zero);

	if (!dc)
		return 0;
#pragma unroll
	for (int i = 0; i < MAX_ENCRYPTED_DNS_PORTS; i++)
		if (dc->encrypted_ports[i] && dc->encrypted_ports[i] == dport)
			return 1;
	return 0;
}

/*
 * __maybe_protected() - could metadata_v1 hold a prefix covering @daddr.
 * @daddr: destination, network byte order, IPv4 mapped
 *
 * The protected_filter pre-check (abi.h): two loads and a shift where the trie lookup it spares
 * costs ≈ 50 ns on every connect.
 * Returns: 0 if no protected prefix covers @daddr (proven by a clear bit), 1 if it may.
 */
static __always_inline int __maybe_protected(const __u32 daddr[4])
{
	__u32 zero = 0, top, i;
	struct protected_filter *f = protected_filter.lookup(&zero);
	__u64 word;

	if (!f || !f->ready)
		return 1;
	if (!daddr[0] && !daddr[1] && daddr[2] == bpf_htonl(0xffff)) {
		i = bpf_ntohl(daddr[3]) >> 16;
		word = f->v4[(i / 64) & (PROTECTED_FILTER_WORDS - 1)];
	} else {
		top = bpf_ntohl(daddr[0]);
		i = ((top >> 16) ^ top) & 0xffff;
		word = f->v6[(i / 64) & (PROTECTED_FILTER_WORDS - 1)];
	}
	return (word >> (i % 64)) & 1;
}

/*
 * __decide() - judge a destination for a socket.
 * @b: the binding that governs the socket's cgroup (__binding_of_*), NULL if none
 * @cgid: the socket's cgroup, for DNS-opened addresses
 * @daddr: destination, network byte order, IPv4 mapped
 * @dport: destination port, host byte order
 * @proto_bit: PROTO_BIT_* of the socket (0: no rule can match)
 * @d: out
 */
static __always_inline void __decide(const struct binding *b, __u64 cgid, const __u32 daddr[4],
				     __u16 dport, __u8 proto_bit, struct decision *d)
{
	struct config *cfg = __config();
	struct metadata_key mkey = { .prefixlen = 128 };
	struct rule_value *rv;
	__u8 *kind, protected;
	int governed, matched = 0, named = 0, fqdn_named = 0;

	__decision_init(d, cfg, b);

	protected = 0;
	if (__maybe_protected(daddr)) {
		mkey.addr[0] = daddr[0];
		mkey.addr[1] = daddr[1];
		mkey.addr[2] = daddr[2];
		mkey.addr[3] = daddr[3];
		kind = metadata.lookup(&mkey);
		protected = kind ? *kind : 0;
	}

	governed = b && b->mode != MODE_NONE && !(b->flags & BINDING_FIXED);
	if (governed) {
		struct rule_key rkey = { .prefixlen = 32 + 128 };

		rkey.ruleset_id = bpf_htonl(b->ruleset_id);
		rkey.addr[0] = daddr[0];
		rkey.addr[1] = daddr[1];
		rkey.addr[2] = daddr[2];
		rkey.addr[3] = daddr[3];
		rv = rules.lookup(&rkey);
		if (rv && __ports_match(rv->portset_id, dport, proto_bit, &d->rule)) {
			matched = 1;
			named = (rv->flags & RULE_NAMED) != 0;
		}
		if (!matched && (b->flags & BINDING_FQDN))
			matched = __fqdn_match(cgid, daddr, dport, proto_bit, &d->rule, &fqdn_named);
	}

	if (protected == PROTECTED_METADATA && !(b && (b->flags & BINDING_METADATA_EXEMPT))) {
		/* Node protection: enforced even for audit-mode policies, granted only by a rule
		 * that names the endpoint itself (a 0.0.0.0/0 rule does not, nor does a DNS
		 * answer: the resolver drops metadata addresses from answers). */
		if (matched && named) {
			d->verdict = VERDICT_ALLOW;
			d->reason = REASON_POLICY_RULE;
		} else {
			d->verdict = VERDICT_DENY;
			d->reason = REASON_METADATA_BLOCK;
			d->rule = RULE_NONE;
		}
		return;
	}

	if (b && (b->flags & BINDING_FIXED)) {
		__fixed_verdict(b, d);
		return;
	}
	if (governed) {
		if ((protected == PROTECTED_ENCRYPTED_DNS || __encrypted_dns_port(dport)) &&
		    !(matched && (named || fqdn_named))) {
			/* DNS that would bypass the node resolver: only a rule naming the
			 * endpoint opens it, whatever broader rule allows its address */
			d->verdict = b->mode == MODE_AUDIT ? VERDICT_AUDIT : VERDICT_DENY;
			d->reason = REASON_ENCRYPTED_DNS;
			d->rule = RULE_NONE;
			return;
		}
		if (matched) {
			d->verdict = VERDICT_ALLOW;
			d->reason = REASON_POLICY_RULE;
		} else {
			d->verdict = b->mode == MODE_AUDIT ? VERDICT_AUDIT : VERDICT_DENY;
			d->reason = REASON_POLICY_DEFAULT;
		}
		return;
	}

	d->verdict = __node_default(cfg);
	d->reason = protected == PROTECTED_METADATA ? REASON_METADATA_EXEMPT : REASON_NODE_DEFAULT;
}

/*
 * __decide_raw() - judge the creation or a packet of a socket that is not plain TCP/UDP.
 * @b: the binding that governs the socket's cgroup, NULL if none
 * @d: out
 */
static __always_inline void __decide_raw(const struct binding *b, struct decision *d)
{
	struct config *cfg = __config();

	__decision_init(d, cfg, b);
	if (b && (b->flags & BINDING_FIXED)) {
		__fixed_verdict(b, d);
		return;
	}
	if (b && b->mode != MODE_NONE) {
		d->reason = REASON_RAW_SOCKET;
		if (b->flags & BINDING_ALLOW_RAW)
			d->verdict = VERDICT_ALLOW;
		else
			d->verdict = b->mode == MODE_AUDIT ? VERDICT_AUDIT : VERDICT_DENY;
		return;
	}
	d->verdict = __node_default(cfg);
	d->reason = REASON_NODE_DEFAULT;
}

#endif /* HOSTAGENT_POLICY_H */

/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * sock_ops: a close event for every outbound TCP connection, with the bytes it carried each way
 * and how long it lived (events.connectionClose). Attached only when the node config asks:
 * each connection then costs a socket storage allocation, a second judgement and a run at each
 * of its state changes, ≈ 3 µs in all on the bench's loopback cycle (docs/benchmarks.md,
 * `python -m bench.run --close-events`).
 *
 * At TCP_CONNECT_CB (in the connecting task, just after connect4/6 let it through) the
 * destination is judged again the way connect4/6 judged it, and who connected under which
 * decision is kept with the socket; at the change to TCP_CLOSE (a FIN exchange, an RST, a
 * failed connect or a timeout alike) that record goes out with the counters of the tcp_sock.
 */
#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_SOCK_OPS

#define SOCK_OPS_OK 1

static __always_inline void __flow_destination(struct bpf_sock_ops *skops, __u32 daddr[4])
{
	/* Every field read up front, each pinned to its own load: left to itself clang merges
	 * the two branches' reads into one load through a computed context pointer, which the
	 * verifier refuses ("dereference of modified ctx ptr"). */
	__u32 ip4 = skops->remote_ip4, a0 = skops->remote_ip6[0], a1 = skops->remote_ip6[1];
	__u32 a2 = skops->remote_ip6[2], a3 = skops->remote_ip6[3];

	asm volatile("" : "+r"(ip4), "+r"(a0), "+r"(a1), "+r"(a2), "+r"(a3));
	if (skops->family == HA_AF_INET6) {
		daddr[0] = a0;
		daddr[1] = a1;
		daddr[2] = a2;
		daddr[3] = a3;
	} else {
		daddr[0] = 0;
		daddr[1] = 0;
		daddr[2] = bpf_htonl(0xffff);
		daddr[3] = ip4;
	}
}

/* __flow_open() - keep who opened this connection and under which decision. */
static __always_inline void __flow_open(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct flow_origin *o;
	struct dns_config *dc;
	struct decision d;
	__u32 daddr[4];
	__u16 dport;
	__u64 id;

	if (!sk)
		return;
	o = flow_origins.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o) {
		COUNT_ERROR(ERROR_FLOW_ORIGIN);
		return;
	}
	__flow_destination(skops, daddr);
	/* remote_port holds the port in network byte order in its upper 16 bits */
	dport = bpf_ntohl(skops->remote_port);
	o->cgroup_id = bpf_get_current_cgroup_id();
	dc = __dns_config();
	if (dc && __is_resolver(dc, daddr, dport)) {
		/* connect4/6 sent it here: a redirected query, not a destination of its own */
		__decision_init(&d, __config(), __binding_of_current(o->cgroup_id));
		d.verdict = VERDICT_ALLOW;
		d.reason = REASON_DNS_REDIRECT;
	} else {
		__decide(__binding_of_current(o->cgroup_id), o->cgroup_id, daddr, dport,
			 PROTO_BIT_TCP, &d);
	}
	o->start_ns = bpf_ktime_get_boot_ns();
	id = bpf_get_current_pid_tgid();
	o->pid = id >> 32;
	o->tid = (__u32)id;
	id = bpf_get_current_uid_gid();
	o->uid = (__u32)id;
	o->gid = id >> 32;
	bpf_get_current_comm(o->comm, sizeof(o->comm));
	o->policy_id = d.policy_id;
	o->ruleset_id = d.ruleset_id;
	o->generation = d.generation;
	o->rule = d.rule;
	o->verdict = d.verdict;
	o->reason = d.reason;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* __flow_close() - send what the connection carried, under the decision it was opened by. */
static __always_inline void __flow_close(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct flow_origin *o;
	struct close_event *c;
	struct event *e;

	if (!sk)
		return;
	o = flow_origins.sk_storage_get(sk, 0, 0);
	if (!o)
		return;
	c = events.ringbuf_reserve(sizeof(*c));
	if (!c) {
		COUNT_ERROR(ERROR_RINGBUF_FULL);
		return;
	}
	e = &c->event;
	e->time_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = o->cgroup_id;
	e->sock_cookie = bpf_get_socket_cookie(skops);
	e->pid = o->pid;
	e->tid = o->tid;
	e->uid = o->uid;
	e->gid = o->gid;
	e->policy_id = o->policy_id;
	e->ruleset_id = o->ruleset_id;
	__flow_destination(skops, e->daddr);
	e->dport = bpf_ntohl(skops->remote_port);
	e->rule = o->rule;
	e->family = skops->family;
	e->protocol = IPPROTO_TCP;
	e->verdict = o->verdict;
	e->reason = o->reason;
	e->hook = HOOK_TCP_CLOSE;
	e->pad[0] = 0;
	e->pad[1] = 0;
	e->pad[2] = 0;
	e->generation = o->generation;
	__builtin_memcpy(e->comm, o->comm, sizeof(e->comm));
	c->bytes_sent = skops->bytes_acked;
	c->bytes_received = skops->bytes_received;
	c->duration_ns = e->time_ns - o->start_ns;
	events.ringbuf_submit(c, BPF_RB_NO_WAKEUP);
	/* once only: a socket can be closed, then connected and closed again */
	flow_origins.sk_storage_delete(sk);
}

int sock_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		__flow_open(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			__flow_close(skops);
		break;
	}
	return SOCK_OPS_OK;
}

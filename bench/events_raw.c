/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * events_raw: the floor under the agent's event path, for bench/events.py.
 *
 * One cgroup/connect4 program that denies every connect and sends one record of the agent's
 * own `struct event` (bpf/lib/abi.h, included, so the size can never drift) per decision into
 * a BPF ring buffer, the way bpf/lib/events.h does: the same helpers fill the same fields, and
 * the record is submitted without waking the reader (BPF_RB_NO_WAKEUP; user space drains on a
 * timer). What it leaves out is the agent's policy: no binding, rule or config lookup, no
 * decision counter.
 *
 * bcc's ring buffer reports no loss to Python, so failed reservations are counted here, in
 * raw_counts[RAW_DROPPED]; raw_counts[RAW_SUBMITTED] counts records sent. Both are per-CPU
 * (no atomic on the hot path); user space sums the CPUs.
 *
 * cflags: -I<repo>/bpf (for lib/abi.h), -DRAW_RINGBUF_PAGES=<pages, a power of two>.
 */
#include <uapi/linux/bpf.h>

#include "lib/abi.h"

#ifndef RAW_RINGBUF_PAGES
#define RAW_RINGBUF_PAGES 1024 /* 4 MiB, as the agent's RINGBUF_PAGES (bpf/lib/maps.h) */
#endif /* RAW_RINGBUF_PAGES */

#define RAW_SUBMITTED 0
#define RAW_DROPPED 1
#define RAW_COUNTS 2

/* connect4 verdicts, as the kernel reads a cgroup/connect4 program's return value */
#define CONNECT_DENY 0

BPF_RINGBUF_OUTPUT(raw_events, RAW_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(raw_counts, __u64, RAW_COUNTS);

static __always_inline void __raw_count(__u32 which)
{
	__u64 *n = raw_counts.lookup(&which);

	if (n)
		*n += 1;
}

int raw_connect4(struct bpf_sock_addr *ctx)
{
	struct event *e = raw_events.ringbuf_reserve(sizeof(*e));
	__u64 pid_tgid, uid_gid;

	if (!e) {
		__raw_count(RAW_DROPPED);
		return CONNECT_DENY;
	}
	pid_tgid = bpf_get_current_pid_tgid();
	uid_gid = bpf_get_current_uid_gid();
	e->time_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->sock_cookie = bpf_get_socket_cookie(ctx);
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)uid_gid;
	e->gid = uid_gid >> 32;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->policy_id = 0;
	e->ruleset_id = 0;
	/* as abi.h keeps addresses: IPv4 written as ::ffff:a.b.c.d, network byte order */
	e->daddr[0] = 0;
	e->daddr[1] = 0;
	e->daddr[2] = bpf_htonl(0x0000ffff);
	e->daddr[3] = ctx->user_ip4;
	e->dport = bpf_ntohs((__u16)ctx->user_port);
	e->rule = RULE_NONE;
	e->family = ctx->family;
	e->protocol = ctx->protocol;
	e->verdict = VERDICT_DENY;
	e->reason = REASON_POLICY_DEFAULT;
	e->hook = HOOK_CONNECT4;
	e->pad[0] = 0;
	e->pad[1] = 0;
	e->pad[2] = 0;
	e->generation = 0;
	raw_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	__raw_count(RAW_SUBMITTED);
	return CONNECT_DENY;
}

/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Emitting decisions. Waking the reader on every event costs the connecting process more than
 * the connect itself (shared/design/kernel-notes.md), so records are submitted without a wake-up
 * and user space drains the ring on a short timer.
 */
#ifndef HOSTAGENT_EVENTS_H
#define HOSTAGENT_EVENTS_H

#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_EVENTS

struct emit_args {
	__u64 cgroup_id;     /* the socket's cgroup as the hook knows it */
	__u32 daddr[4];
	__u16 dport;
	__u8 family;
	__u8 protocol;
	__u8 hook;
	__u8 in_task;        /* current task is the socket's user (not softirq) */
	__u8 pad[2];
};

/*
 * __emit() - count a decision and, unless it is an allow nobody asked to see, send it.
 * @ctx: the hook's context, for the socket cookie (fetched only when an event is sent)
 * @d: the decision
 * @a: what was decided about
 */
static __always_inline void __emit(void *ctx, const struct decision *d, const struct emit_args *a)
{
	struct event *e;

	__count_decision(d->policy_id, d->verdict, d->reason, a->hook);
	if (d->verdict == VERDICT_ALLOW && !d->emit_allow)
		return;

	e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		COUNT_ERROR(ERROR_RINGBUF_FULL);
		return;
	}
	e->time_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = a->cgroup_id;
	e->sock_cookie = bpf_get_socket_cookie(ctx);
	if (a->in_task) {
		__u64 pid_tgid = bpf_get_current_pid_tgid();
		__u64 uid_gid = bpf_get_current_uid_gid();

		e->pid = pid_tgid >> 32;
		e->tid = (__u32)pid_tgid;
		e->uid = (__u32)uid_gid;
		e->gid = uid_gid >> 32;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
	} else {
		e->pid = 0;
		e->tid = 0;
		e->uid = 0;
		e->gid = 0;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
	}
	e->policy_id = d->policy_id;
	e->ruleset_id = d->ruleset_id;
	e->daddr[0] = a->daddr[0];
	e->daddr[1] = a->daddr[1];
	e->daddr[2] = a->daddr[2];
	e->daddr[3] = a->daddr[3];
	e->dport = a->dport;
	e->rule = d->rule;
	e->family = a->family;
	e->protocol = a->protocol;
	e->verdict = d->verdict;
	e->reason = d->reason;
	e->hook = a->hook;
	e->pad[0] = 0;
	e->pad[1] = 0;
	e->pad[2] = 0;
	e->generation = d->generation;
	events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

#endif /* HOSTAGENT_EVENTS_H */

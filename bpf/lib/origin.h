/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Whose socket is it, and which binding governs it.
 *
 * The hot path never stores anything per socket: allocating socket storage in sock_create costs
 * ~1.5 µs per socket on this kernel, more than everything else we do together
 * (docs/benchmarks.md). sock_addr programs have no helper for a socket's cgroup, so connect and
 * sendmsg judge by the calling task's cgroup, which is the socket's own in every case but a
 * socket handed across cgroups (SCM_RIGHTS, a task migrated after socket()). The skb backstop
 * closes that gap: it sees the socket's real cgroup and re-judges any connection-opening packet
 * whose socket cgroup is not the sender's (bpf/cgroup_skb.c).
 *
 * Bindings are looked up for the exact cgroup first. User space binds every cgroup it knows, so
 * the ancestor walk only runs for a cgroup created since the agent last looked: a workload that
 * makes a child cgroup stays under its parent's policy in the meantime.
 */
#ifndef HOSTAGENT_ORIGIN_H
#define HOSTAGENT_ORIGIN_H

#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_ORIGIN

/*
 * __binding_of_current() - the binding that governs the current task's cgroup.
 * @cgid: bpf_get_current_cgroup_id()
 *
 * Returns: the cgroup's own binding, else its nearest bound ancestor's, else NULL.
 */
static __always_inline struct binding *__binding_of_current(__u64 cgid)
{
	struct binding *b = bindings.lookup(&cgid);

	if (b)
		return b;
	/* deepest first: the nearest bound ancestor wins; levels past the cgroup's own give 0 */
#pragma unroll
	for (int level = MAX_CGROUP_DEPTH - 1; level >= 0; level--) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (!id || id == cgid)
			continue;
		b = bindings.lookup(&id);
		if (b)
			return b;
	}
	return NULL;
}

/* __binding_of_skb() - likewise for the cgroup of the socket that owns @skb. */
static __always_inline struct binding *__binding_of_skb(struct __sk_buff *skb, __u64 cgid)
{
	struct binding *b = bindings.lookup(&cgid);

	if (b)
		return b;
#pragma unroll
	for (int level = MAX_CGROUP_DEPTH - 1; level >= 0; level--) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);

		if (!id || id == cgid)
			continue;
		b = bindings.lookup(&id);
		if (b)
			return b;
	}
	return NULL;
}

#endif /* HOSTAGENT_ORIGIN_H */

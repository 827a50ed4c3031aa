/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Who a socket belongs to. The kernel runs cgroup programs for the cgroup a socket was created
 * in, not the cgroup of whoever uses it later, and we judge the same way: the creator's cgroup
 * chain is stored on the socket at creation (sock_create) and read back at connect/sendmsg.
 * sock_addr programs have no helper for a socket's cgroup, hence the socket storage.
 */
#ifndef HOSTAGENT_ORIGIN_H
#define HOSTAGENT_ORIGIN_H

#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_ORIGIN

/* __origin_from_current() - fill @o with the current task's cgroup chain. */
static __always_inline void __origin_from_current(struct origin *o)
{
	o->cgroup_id = bpf_get_current_cgroup_id();
	o->depth = 0;
#pragma unroll
	for (int level = 0; level < MAX_CGROUP_DEPTH; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		/* the helper returns 0 past the task's own level */
		o->ancestors[level] = id;
		if (id)
			o->depth = level + 1;
	}
}

/* __origin_from_skb() - fill @o with the cgroup chain of the socket that owns @skb. */
static __always_inline void __origin_from_skb(struct __sk_buff *skb, struct origin *o)
{
	o->cgroup_id = bpf_skb_cgroup_id(skb);
	o->depth = 0;
#pragma unroll
	for (int level = 0; level < MAX_CGROUP_DEPTH; level++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);

		o->ancestors[level] = id;
		if (id)
			o->depth = level + 1;
	}
}

/*
 * __binding_of() - the binding that governs a cgroup chain.
 * @o: the chain
 *
 * The cgroup's own binding if user space wrote one, else the nearest ancestor's: a workload
 * that creates a child cgroup stays under its parent's policy even before the agent has seen
 * the child.
 *
 * Returns: the binding, or NULL when nothing on the chain is bound.
 */
static __always_inline struct binding *__binding_of(const struct origin *o)
{
	struct binding *b = bindings.lookup((__u64 *)&o->cgroup_id);

	if (b)
		return b;
#pragma unroll
	for (int i = MAX_CGROUP_DEPTH - 1; i >= 0; i--) {
		__u64 id;

		if (i >= o->depth)
			continue;
		id = o->ancestors[i];
		b = bindings.lookup(&id);
		if (b)
			return b;
	}
	return NULL;
}

#endif /* HOSTAGENT_ORIGIN_H */

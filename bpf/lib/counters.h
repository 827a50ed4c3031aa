/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Counting kernel-side failures and decisions. A failure we cannot count is a failure nobody
 * sees, so every map update and ring buffer reservation that can fail goes through here.
 */
#ifndef HOSTAGENT_COUNTERS_H
#define HOSTAGENT_COUNTERS_H

#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_COUNTERS

/*
 * __count_error() - remember that something failed, and where.
 * @error: enum hostagent_error
 * @file_id: HOSTAGENT_FILE_ID of the calling file
 * @line: __LINE__ of the call
 */
static __always_inline void __count_error(__u32 error, __u16 file_id, __u16 line)
{
	struct error_key key = { .error = error, .file_id = file_id, .line = line };
	__u64 one = 1, *count;

	count = errors.lookup(&key);
	if (count) {
		/* per-CPU value: no other writer on this CPU while we run */
		*count += 1;
		return;
	}
	/* BPF_NOEXIST: another CPU may have created it meanwhile; its own slot is separate. */
	errors.update(&key, &one);
}

#define COUNT_ERROR(error) __count_error(error, HOSTAGENT_FILE_ID, __LINE__)

_Static_assert(HOOK_SKB_EGRESS < ALLOW_COUNT_NODE_DEFAULT, "hooks must fit below the offset");

/*
 * __count_decision() - count one decision; every decision is counted, allow included.
 *
 * Allows by a rule or by the node default (nearly every decision of a working node) go to their
 * slot of allow_counts, everything else to decisions under its key: see abi.h for why and for
 * the slot arithmetic that user space undoes.
 */
static __always_inline void __count_decision(__u32 policy_id, __u8 verdict, __u8 reason, __u8 hook)
{
	struct decision_key key = {
		.policy_id = policy_id, .verdict = verdict, .reason = reason, .hook = hook,
	};
	__u64 one = 1, *count;

	if (verdict == VERDICT_ALLOW && policy_id < ALLOW_COUNT_POLICIES &&
	    (reason == REASON_POLICY_RULE || reason == REASON_NODE_DEFAULT)) {
		__u32 slot = policy_id * ALLOW_COUNT_STRIDE + hook +
			     (reason == REASON_NODE_DEFAULT ? ALLOW_COUNT_NODE_DEFAULT : 0);

		count = allow_counts.lookup(&slot);
		if (count) {
			/* per-CPU value, as below */
			*count += 1;
			return;
		}
	}
	count = decisions.lookup(&key);
	if (count) {
		*count += 1;
		return;
	}
	if (decisions.update(&key, &one))
		COUNT_ERROR(ERROR_COUNTER_UPDATE);
}

#endif /* HOSTAGENT_COUNTERS_H */

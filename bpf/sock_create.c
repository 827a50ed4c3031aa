/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * sock_create: runs when a process creates an AF_INET/AF_INET6 socket, and refuses raw, ICMP
 * and other non-TCP/UDP sockets to governed workloads whose policy does not allow them: those
 * never pass the connect/sendmsg hooks. Plain TCP/UDP sockets leave at the first test: this
 * program runs on every socket() of the node.
 * AF_PACKET sockets do not reach this hook at all; see docs/threat-coverage.md.
 */
#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_SOCK_CREATE

#define SOCK_CREATE_DENY 0
#define SOCK_CREATE_ALLOW 1

int sock_create(struct bpf_sock *sk)
{
	struct emit_args a = { .hook = HOOK_SOCK_CREATE, .in_task = 1 };
	struct decision d;

	if (__is_plain_socket(sk->type, sk->protocol))
		return SOCK_CREATE_ALLOW;

	/* the creator is the current task, so its cgroup is the socket's */
	a.cgroup_id = bpf_get_current_cgroup_id();
	a.family = sk->family;
	a.protocol = sk->protocol;
	__decide_raw(__binding_of_current(a.cgroup_id), &d);
	__emit(sk, &d, &a);
	return d.verdict == VERDICT_DENY ? SOCK_CREATE_DENY : SOCK_CREATE_ALLOW;
}

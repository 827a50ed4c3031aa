/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * sock_create: runs when a process creates an AF_INET/AF_INET6 socket. Two jobs: remember the
 * creator's cgroup chain on the socket (the identity every later decision uses), and refuse raw,
 * ICMP and other non-TCP/UDP sockets to governed workloads whose policy does not allow them:
 * those never pass the connect/sendmsg hooks.
 * AF_PACKET sockets do not reach this hook at all; see docs/threat-coverage.md.
 */
#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_SOCK_CREATE

#define SOCK_CREATE_DENY 0
#define SOCK_CREATE_ALLOW 1

int sock_create(struct bpf_sock *sk)
{
	struct origin o = {};
	struct origin *stored;
	struct emit_args a = { .hook = HOOK_SOCK_CREATE, .in_task = 1 };
	struct decision d;

	__origin_from_current(&o);
	stored = origins.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (stored)
		__builtin_memcpy(stored, &o, sizeof(o));
	else
		COUNT_ERROR(ERROR_SK_STORAGE);

	if (__is_plain_socket(sk->type, sk->protocol))
		return SOCK_CREATE_ALLOW;

	a.family = sk->family;
	a.protocol = sk->protocol;
	a.cookie = bpf_get_socket_cookie(sk);
	__decide_raw(&o, &d);
	__emit(&o, &d, &a);
	return d.verdict == VERDICT_DENY ? SOCK_CREATE_DENY : SOCK_CREATE_ALLOW;
}

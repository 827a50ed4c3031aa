/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * connect4/connect6/sendmsg4/sendmsg6: every TCP and UDP destination a process names passes
 * here, TCP Fast Open and io_uring connects included. A denied call fails at once with EPERM.
 * Governed workloads' DNS is sent to the node resolver here too; recvmsg4/6 and getpeername4/6
 * only undo that rewrite for what the workload sees (bpf/lib/dns.h).
 */
#undef HOSTAGENT_FILE_ID
#define HOSTAGENT_FILE_ID FILE_SOCK_ADDR

#define SOCK_ADDR_DENY 0
#define SOCK_ADDR_ALLOW 1

/*
 * __sock_addr() - judge one connect/sendmsg.
 * @ctx: the hook's context
 * @hook: HOOK_*
 * @v6: the hook is an IPv6 one (user_ip6 holds the address, IPv4-mapped included)
 *
 * Judged by the calling task's cgroup: see bpf/lib/origin.h for why, and for how a socket used
 * outside the cgroup that created it is still judged as its creator's.
 */
static __always_inline int __sock_addr(struct bpf_sock_addr *ctx, __u8 hook, int v6)
{
	struct emit_args a = { .hook = hook, .in_task = 1 };
	struct binding *b;
	struct decision d;

	a.cgroup_id = bpf_get_current_cgroup_id();
	if (v6) {
		a.daddr[0] = ctx->user_ip6[0];
		a.daddr[1] = ctx->user_ip6[1];
		a.daddr[2] = ctx->user_ip6[2];
		a.daddr[3] = ctx->user_ip6[3];
		a.family = HA_AF_INET6;
	} else {
		a.daddr[0] = 0;
		a.daddr[1] = 0;
		a.daddr[2] = bpf_htonl(0xffff);
		a.daddr[3] = ctx->user_ip4;
		a.family = HA_AF_INET;
	}
	/* user_port holds the port in network byte order in its low 16 bits */
	a.dport = bpf_ntohs((__u16)ctx->user_port);
	a.protocol = ctx->protocol;

	b = __binding_of_current(a.cgroup_id);
	if (!__dns_redirect(ctx, b, &a, v6, &d))
		__decide(b, a.cgroup_id, a.daddr, a.dport, __proto_bit(ctx->protocol), &d);
	__emit(ctx, &d, &a);
	return d.verdict == VERDICT_DENY ? SOCK_ADDR_DENY : SOCK_ADDR_ALLOW;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
	return __sock_addr(ctx, HOOK_CONNECT4, 0);
}

int sock6_connect(struct bpf_sock_addr *ctx)
{
	return __sock_addr(ctx, HOOK_CONNECT6, 1);
}

int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return __sock_addr(ctx, HOOK_SENDMSG4, 0);
}

int sock6_sendmsg(struct bpf_sock_addr *ctx)
{
	return __sock_addr(ctx, HOOK_SENDMSG6, 1);
}

/* recvmsg and getpeername programs must return 1: they rewrite what is shown, never refuse. */
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	__dns_unredirect(ctx, 0);
	return 1;
}

int sock6_recvmsg(struct bpf_sock_addr *ctx)
{
	__dns_unredirect(ctx, 1);
	return 1;
}

int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	__dns_unredirect(ctx, 0);
	return 1;
}

int sock6_getpeername(struct bpf_sock_addr *ctx)
{
	__dns_unredirect(ctx, 1);
	return 1;
}

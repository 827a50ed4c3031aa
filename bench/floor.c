/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The benchmark's dispatch floor (bench/run.py): programs that do nothing but allow, one for
 * each attach point the benchmark's workload passes (connect4, sock_create, cgroup_skb egress).
 * A cgroup running them pays only for the kernel running a program there, so the difference
 * between it and the baseline is the part of hostagent's cost no program body can remove.
 * One C function per attach type: bcc caches load_func by name.
 */
#include <uapi/linux/bpf.h>

#define ALLOW 1

int floor_connect4(struct bpf_sock_addr *ctx)
{
	return ALLOW;
}

int floor_sock_create(struct bpf_sock *sk)
{
	return ALLOW;
}

int floor_egress(struct __sk_buff *skb)
{
	return ALLOW;
}

/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The head of the one translation unit bcc compiles. bcc rewrites map calls (map.lookup(),
 * ringbuf_reserve(), ...) only in its main file, so the loader (hostagent/bpf/loader.py, SOURCES)
 * appends the map declarations, the helpers of lib/ and the hook families after this file, each
 * under a #line marker so that compiler messages and __LINE__ name the real file and line.
 * One unit: every program shares one ring buffer and one compile (~1 s at start).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "lib/abi.h"

/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The one contract between hostagent's kernel programs and user space.
 *
 * Every map key/value, the event record, every MAX_* and every enum is defined here and nowhere
 * else. hostagent/bpf/abi.py mirrors them with ctypes (for building keys) and
 * tests/test_abi.py compiles this header and checks sizeof and every field offset against it.
 * The enums' numbers are also those of proto/hostagent/v1 (when it exists) and of the Python
 * IntEnums in abi.py: change one, change all three, and bump HOSTAGENT_ABI_VERSION together
 * with the _v<N> suffix of every map whose layout changed.
 *
 * Byte order: addresses are kept as the kernel hands them to sock_addr programs, in network
 * byte order, IPv4 always written as the IPv4-mapped IPv6 address ::ffff:a.b.c.d so that one
 * lookup serves AF_INET, AF_INET6 and mapped destinations alike. Ports are host byte order.
 */
#ifndef HOSTAGENT_ABI_H
#define HOSTAGENT_ABI_H

#define HOSTAGENT_ABI_VERSION 1

/* Ancestor levels the kernel walks on a binding miss; deeper cgroups are matched by their own id. */
#define MAX_CGROUP_DEPTH 16
/* Port ranges one destination prefix can carry, after merging every rule that covers it. */
#define MAX_PORT_RANGES 16
#define RULE_NONE 0xffff

/* Verdicts. Python: abi.Verdict. */
enum hostagent_verdict {
	VERDICT_UNSPECIFIED = 0,
	VERDICT_ALLOW = 1,
	VERDICT_DENY = 2,
	VERDICT_AUDIT = 3, /* would have been denied; allowed because the policy is in audit mode */
};

/* Why a verdict was reached. Python: abi.Reason. */
enum hostagent_reason {
	REASON_UNSPECIFIED = 0,
	REASON_POLICY_RULE = 1,      /* a rule of the workload's policy matched */
	REASON_POLICY_DEFAULT = 2,   /* the workload's policy has no rule for it */
	REASON_METADATA_BLOCK = 3,   /* a cloud metadata endpoint, not granted */
	REASON_NODE_DEFAULT = 4,     /* no policy selects the workload: node defaultAction */
	REASON_RAW_SOCKET = 5,       /* raw, packet or non-TCP/UDP socket */
	REASON_METADATA_EXEMPT = 6,  /* metadata endpoint, workload exempt by node config */
	REASON_PENDING_IDENTITY = 7, /* a pod not yet known to the agent: node pendingAction */
	REASON_SELECTOR_CONFLICT = 8,/* policies of equal precedence select it: denied until fixed */
	REASON_DNS_REDIRECT = 9,     /* a DNS query, sent to the node's resolver instead */
	REASON_ENCRYPTED_DNS = 10,   /* DNS over HTTPS/TLS endpoint or port, not named by a rule */
};

/* Which program decided. Python: abi.Hook. */
enum hostagent_hook {
	HOOK_UNSPECIFIED = 0,
	HOOK_CONNECT4 = 1,
	HOOK_CONNECT6 = 2,
	HOOK_SENDMSG4 = 3,
	HOOK_SENDMSG6 = 4,
	HOOK_SOCK_CREATE = 5,
	HOOK_SKB_EGRESS = 6,
	HOOK_TCP_CLOSE = 7,          /* sockops: an outbound TCP connection ended (close_event) */
};

/* Node defaultAction. Python: config.DefaultAction. */
enum hostagent_default_action {
	DEFAULT_ACTION_UNSPECIFIED = 0, /* config not written yet */
	DEFAULT_ACTION_ALLOW = 1,
	DEFAULT_ACTION_AUDIT = 2,
	DEFAULT_ACTION_DENY = 3,
};

/* Policy mode of a binding. Python: abi.BindingMode. */
enum hostagent_mode {
	MODE_NONE = 0,    /* no policy: node defaultAction applies (binding exists for exemption) */
	MODE_ENFORCE = 1,
	MODE_AUDIT = 2,
};

/* Kernel-side failures, counted in errors_v1. Python: abi.KernelError. */
enum hostagent_error {
	ERROR_UNSPECIFIED = 0,
	ERROR_RINGBUF_FULL = 1,      /* event lost: ring buffer had no room */
	ERROR_COUNTER_UPDATE = 2,    /* decision counter could not be created */
	ERROR_SK_STORAGE = 3,        /* retired (socket storage is no longer used); number kept */
	ERROR_CONFIG_MISSING = 4,    /* config map empty: decided fail-closed for governed sockets */
	ERROR_DNS_ORIGIN = 5,        /* a redirected socket's original resolver could not be kept */
	ERROR_DNS_CLIENT = 6,        /* a query's sender could not be recorded for the resolver */
	ERROR_FLOW_ORIGIN = 7,       /* a connection's origin could not be kept: no close event */
};

/* Source files, for error_key.file_id. Python: abi.SourceFile. */
enum hostagent_file {
	FILE_UNSPECIFIED = 0,
	FILE_COUNTERS = 1,
	FILE_ORIGIN = 2,
	FILE_POLICY = 3,
	FILE_EVENTS = 4,
	FILE_SOCK_ADDR = 5,
	FILE_SOCK_CREATE = 6,
	FILE_CGROUP_SKB = 7,
	FILE_DNS = 8,
	FILE_SOCK_OPS = 9,
};

/* Protocol bits of a port range; same values as policy.Protocol. */
#define PROTO_BIT_TCP 1
#define PROTO_BIT_UDP 2

/* config_v1[0] */
#define CONFIG_EMIT_ALLOW 0x1 /* also send allow decisions as events */
struct config {
	__u32 abi_version;    /* HOSTAGENT_ABI_VERSION of the agent that wrote it; 0 = not ready */
	__u32 generation;     /* policy generation in force, for events */
	__u8 default_action;  /* enum hostagent_default_action */
	__u8 flags;           /* CONFIG_* */
	__u16 pad;
	__u32 reserved;
};

/* bindings_v1: cgroup id -> the policy that governs it. */
#define BINDING_METADATA_EXEMPT 0x1 /* node config exempts it from the metadata block */
#define BINDING_ALLOW_RAW 0x2       /* policy allowRawSockets */
#define BINDING_PENDING 0x4         /* identity not known yet: mode says what happens, no rules */
#define BINDING_CONFLICT 0x8        /* selector conflict: mode says what happens, no rules */
#define BINDING_FQDN 0x10           /* policy has fqdn rules: look in fqdn_v1 on a rule miss */
#define BINDING_FIXED (BINDING_PENDING | BINDING_CONFLICT)
struct binding {
	__u32 ruleset_id;   /* key prefix in rules_v1; 0 = no policy */
	__u32 policy_id;    /* stable per policy name, for counters and events */
	__u8 mode;          /* enum hostagent_mode */
	__u8 flags;         /* BINDING_* */
	__u16 pad;
	__u32 generation;   /* policy generation that wrote this binding */
};

/*
 * rules_v1 (LPM trie): (ruleset, destination prefix) -> port set. prefixlen counts the 32 bits
 * of ruleset_id plus the address bits, so every lookup stays inside one ruleset. A ruleset is
 * immutable once a binding points at it: a reload writes new rulesets, then flips bindings.
 */
struct rule_key {
	__u32 prefixlen;
	__u32 ruleset_id;     /* big-endian, so that it is a proper prefix of the trie key */
	__u32 addr[4];        /* network byte order; IPv4 as ::ffff:a.b.c.d */
};

/* The rule names the destination itself: its prefix is a single address, or lies inside a
 * protected endpoint (metadata_v1). Only such rules open protected endpoints and DoT ports. */
#define RULE_NAMED 0x1
struct rule_value {
	__u32 portset_id;     /* index in portsets_v1 */
	__u8 flags;           /* RULE_* */
	__u8 pad[3];
};

struct port_range {
	__u16 first;          /* inclusive, host byte order */
	__u16 last;           /* inclusive */
	__u8 protocols;       /* PROTO_BIT_* */
	__u8 pad;
	__u16 rule;           /* index of the policy's egress rule, for events */
};

/* portsets_v1 (array): shared, deduplicated port lists. */
struct portset {
	__u32 count;
	__u32 pad;
	struct port_range ranges[MAX_PORT_RANGES];
};

/* metadata_v1 (LPM trie): node-wide protected endpoints; the __u8 value is a PROTECTED_*. */
#define PROTECTED_METADATA 1      /* cloud metadata: denied to all but exempt workloads */
#define PROTECTED_ENCRYPTED_DNS 2 /* DNS over HTTPS/TLS service: denied to governed workloads */
struct metadata_key {
	__u32 prefixlen;
	__u32 addr[4];        /* network byte order; IPv4 as ::ffff:a.b.c.d */
};

/*
 * protected_filter_v1[0] (array): a pre-check in front of metadata_v1, so that a destination no
 * protected prefix covers (nearly every one) costs two loads instead of an LPM trie lookup
 * (≈ 50 ns per connect, docs/benchmarks.md). Bit i of v4 is set when a metadata_v1 prefix
 * covers an IPv4 (IPv4-mapped) address whose top 16 bits are i. Bit i of v6 is set when a
 * prefix covers an IPv6 address outside ::ffff:0:0/96 whose top 32 bits t fold to
 * i = (t >> 16) ^ (t & 0xffff): the fold keeps fd00:ec2::/32 apart from fd00:10::/32 (pod
 * networks), which the top 16 bits alone would not. Word w, bit b stands for i = 64 * w + b.
 * A clear bit proves that metadata_v1 holds nothing for the address; a set bit says "look".
 * User space keeps the bits a superset of the trie at every instant (bits set before entries
 * are inserted, cleared after they are deleted); while ready is 0 every destination is looked
 * up, so a filter not yet written never hides an endpoint.
 */
#define PROTECTED_FILTER_BITS 65536
#define PROTECTED_FILTER_WORDS 1024 /* PROTECTED_FILTER_BITS / 64 */
struct protected_filter {
	__u32 ready;          /* 1 once user space has written the bits for metadata_v1 */
	__u32 pad;
	__u64 v4[PROTECTED_FILTER_WORDS];
	__u64 v6[PROTECTED_FILTER_WORDS];
};

/* dns_v1[0]: the node resolver that governed workloads' DNS is sent to. */
#define DNS_REDIRECT 0x1
#define MAX_ENCRYPTED_DNS_PORTS 4
struct dns_config {
	__u32 addr[4];        /* resolver address, network byte order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;           /* resolver port, host byte order */
	__u8 flags;           /* DNS_* */
	__u8 pad;
	__u32 mark;           /* SO_MARK on the resolver's upstream sockets */
	__u64 agent_cgroup_id;/* marked sockets of this cgroup are the resolver's: never redirected */
	__u16 encrypted_ports[MAX_ENCRYPTED_DNS_PORTS]; /* DoT/DoQ ports; 0 = unused slot */
};

/* dns_origins_v1 (socket storage): the resolver a redirected socket asked for, so that replies
 * and getpeername() show it rather than the node resolver. */
struct dns_origin {
	__u32 addr[4];        /* network byte order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;           /* network byte order, as in bpf_sock_addr.user_port */
	__u8 family;          /* AF_INET / AF_INET6 of the destination as the socket named it */
	__u8 pad;
};

/* dns_clients_v1 (LRU hash): the socket behind each source that sent to the resolver. Written
 * by the skb hook when the packet leaves, so it is there before the resolver reads the query. */
struct dns_client_key {
	__u32 addr[4];        /* source address, network byte order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;           /* source port, host byte order */
	__u8 protocol;        /* IPPROTO_UDP / IPPROTO_TCP */
	__u8 pad;
};

struct dns_client {
	__u64 cgroup_id;      /* the sending socket's cgroup */
	__u64 sock_cookie;
};

/* fqdn_v1 (hash): an address a DNS answer opened for one workload (cgroup). */
#define FQDN_NAMED 0x1    /* opened by a rule that lists the exact name: may reach DoT ports
			   * and encrypted-DNS endpoints (never metadata) */
struct fqdn_key {
	__u64 cgroup_id;
	__u32 addr[4];        /* network byte order; IPv4 as ::ffff:a.b.c.d */
};

struct fqdn_value {
	__u64 expires_ns;     /* bpf_ktime_get_ns() (CLOCK_MONOTONIC): answer TTL plus grace */
	__u32 portset_id;     /* the ports of the rules that allowed the name(s) */
	__u8 flags;           /* FQDN_* */
	__u8 pad[3];
};

/* decisions_v1 (per-CPU hash): count of every decision, allow included. */
struct decision_key {
	__u32 policy_id;
	__u8 verdict;
	__u8 reason;
	__u8 hook;
	__u8 pad;
};

/*
 * allow_counts_v1 (per-CPU array): the commonest decisions, allowed by a policy rule or by the
 * node default, counted in a slot found by arithmetic instead of under a hashed decision_key
 * (the percpu_hash lookup cost ≈ 45 ns per connect). For policy_id < ALLOW_COUNT_POLICIES:
 *   slot = policy_id * ALLOW_COUNT_STRIDE + (reason == REASON_NODE_DEFAULT) * 8 + hook
 * holds the count of decision_key {policy_id, VERDICT_ALLOW, reason, hook}. Every other
 * decision is counted in decisions_v1. Each decision is counted once, in one of the two maps;
 * readers add both up (hostagent/enforcement.py, Enforcement.decisions()).
 */
#define ALLOW_COUNT_POLICIES 1024
#define ALLOW_COUNT_STRIDE 16
#define ALLOW_COUNT_SLOTS 16384 /* ALLOW_COUNT_POLICIES * ALLOW_COUNT_STRIDE */
#define ALLOW_COUNT_NODE_DEFAULT 8 /* slot offset of REASON_NODE_DEFAULT; hooks fit below it */

/* errors_v1 (per-CPU hash): where a kernel-side operation failed. */
struct error_key {
	__u32 error;          /* enum hostagent_error */
	__u16 file_id;        /* HOSTAGENT_FILE_ID of the source file */
	__u16 line;
};

/* events ring buffer record. */
struct event {
	__u64 time_ns;        /* bpf_ktime_get_boot_ns(): CLOCK_BOOTTIME */
	__u64 cgroup_id;      /* the socket's (creator's) cgroup */
	__u64 sock_cookie;    /* bpf_get_socket_cookie(), 0 where unknown */
	__u32 pid;            /* tgid of the current task; 0 in softirq (skb hook) */
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u32 policy_id;      /* 0 = no policy */
	__u32 ruleset_id;
	__u32 daddr[4];       /* network byte order; IPv4 as ::ffff:a.b.c.d; zero for sock_create */
	__u16 dport;          /* host byte order */
	__u16 rule;           /* egress rule index, RULE_NONE if none */
	__u8 family;          /* AF_INET / AF_INET6 of the socket */
	__u8 protocol;        /* IPPROTO_* */
	__u8 verdict;         /* enum hostagent_verdict */
	__u8 reason;          /* enum hostagent_reason */
	__u8 hook;            /* enum hostagent_hook */
	__u8 pad[3];
	__u32 generation;     /* config generation when decided */
	char comm[16];
};

/*
 * flow_origins_v1 (socket storage, only while events.connectionClose attaches sock_ops): who
 * opened an outbound TCP connection and under which decision, kept from connect to close.
 */
struct flow_origin {
	__u64 start_ns;       /* bpf_ktime_get_boot_ns() at connect */
	__u64 cgroup_id;      /* the connecting task's cgroup */
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u32 policy_id;
	__u32 ruleset_id;
	__u32 generation;
	__u16 rule;
	__u8 verdict;
	__u8 reason;
	char comm[16];
};

/* events ring buffer record of a connection that ended (event.hook == HOOK_TCP_CLOSE): the
 * decision it was opened under, then what it carried. */
struct close_event {
	struct event event;
	__u64 bytes_sent;     /* acknowledged by the peer (tcp_sock bytes_acked; SYN, FIN: 1 each) */
	__u64 bytes_received; /* tcp_sock bytes_received (the peer's FIN: 1) */
	__u64 duration_ns;    /* connect to close */
};

#endif /* HOSTAGENT_ABI_H */

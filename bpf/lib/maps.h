/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Every map of hostagent, pinned under HOSTAGENT_PIN_DIR (the node config's bpffsDir, given as
 * a cflag by the loader) so that enforcement survives the agent: a restarted agent compiles the
 * same declarations and bcc reopens the pinned maps instead of creating new ones.
 * Sizes come from cflags too (limits.* and dns.maxAllowances in the node config).
 */
#ifndef HOSTAGENT_MAPS_H
#define HOSTAGENT_MAPS_H

#ifndef HOSTAGENT_PIN_DIR
#error "HOSTAGENT_PIN_DIR must be given by the loader"
#endif
#ifndef MAX_RULES
#define MAX_RULES 262144
#endif
#ifndef MAX_CGROUPS
#define MAX_CGROUPS 65536
#endif
#ifndef MAX_PORTSETS
#define MAX_PORTSETS 16384
#endif
#ifndef MAX_METADATA
#define MAX_METADATA 256
#endif
#ifndef MAX_FQDN
#define MAX_FQDN 65536
#endif
#ifndef MAX_DNS_CLIENTS
#define MAX_DNS_CLIENTS 65536 /* in-flight queries: an entry is needed only until it is read */
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024 /* 4 MiB: ~40k events of headroom at a 10 ms drain */
#endif

#define PIN(name) HOSTAGENT_PIN_DIR "/" name

BPF_TABLE_PINNED("array", __u32, struct config, config_map, 1,
		 PIN("hostagent_config_v1"));
BPF_TABLE_PINNED("hash", __u64, struct binding, bindings, MAX_CGROUPS,
		 PIN("hostagent_bindings_v1"));
BPF_TABLE_PINNED("lpm_trie", struct rule_key, struct rule_value, rules, MAX_RULES,
		 PIN("hostagent_rules_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, struct portset, portsets, MAX_PORTSETS,
		 PIN("hostagent_portsets_v1"));
BPF_TABLE_PINNED("lpm_trie", struct metadata_key, __u8, metadata, MAX_METADATA,
		 PIN("hostagent_metadata_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, struct protected_filter, protected_filter, 1,
		 PIN("hostagent_protected_filter_v1"));
BPF_TABLE_PINNED("array", __u32, struct dns_config, dns_config_map, 1,
		 PIN("hostagent_dns_v1"));
BPF_TABLE_PINNED("hash", struct fqdn_key, struct fqdn_value, fqdn, MAX_FQDN,
		 PIN("hostagent_fqdn_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct dns_client_key, struct dns_client, dns_clients,
		 MAX_DNS_CLIENTS, PIN("hostagent_dns_clients_v1"));
/* Bumped whenever dns_clients gets a new socket for a source: the resolver memoizes who sent
 * from each source and reads this (mmapped, no syscall) to know its memo still holds. */
BPF_TABLE_PINNED("array", __u32, __u64, dns_senders_gen, 1,
		 PIN("hostagent_dns_senders_gen_v1"), BPF_F_MMAPABLE);
#ifdef HOSTAGENT_SOCK_OPS
/* Socket storage only for outbound TCP connections, and only with sock_ops compiled in
 * (events.connectionClose; the loader defines the macro): the hot path never touches it. */
BPF_TABLE_PINNED("sk_storage", int, struct flow_origin, flow_origins, 0,
		 PIN("hostagent_flow_origins_v1"), BPF_F_NO_PREALLOC);
#endif
/* Socket storage only for sockets whose DNS was redirected: the hot path never touches it. */
BPF_TABLE_PINNED("sk_storage", int, struct dns_origin, dns_origins, 0,
		 PIN("hostagent_dns_origins_v1"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_hash", struct decision_key, __u64, decisions, 16384,
		 PIN("hostagent_decisions_v1"));
BPF_TABLE_PINNED("percpu_array", __u32, __u64, allow_counts, ALLOW_COUNT_SLOTS,
		 PIN("hostagent_allow_counts_v1"));
BPF_TABLE_PINNED("percpu_hash", struct error_key, __u64, errors, 1024,
		 PIN("hostagent_errors_v1"));

/*
 * Pinned like the maps, so that events the programs emit while no agent runs (a restart, a
 * rolling update) wait in the ring for the next agent instead of vanishing with an unpinned
 * ring nobody reads; what does not fit is counted (ERROR_RINGBUF_FULL). bcc has no pinned
 * variant of BPF_RINGBUF_OUTPUT: this is its definition with the pin in the section name, which
 * bcc reads as for BPF_TABLE_PINNED.
 */
struct events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN("hostagent_events_v1"))))
struct events_table_t events = { .max_entries = RINGBUF_PAGES * PAGE_SIZE };

#endif /* HOSTAGENT_MAPS_H */

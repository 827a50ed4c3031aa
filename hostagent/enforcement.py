"""The policy in force in the kernel, and how a new one replaces it.

A reload is applied so that every connection is judged by the old policy or by the new one,
never by half of each:
  1. every ruleset that changed is written under a fresh id (existing ids are never modified);
  2. each cgroup's binding is switched to its new ruleset (one atomic map update per cgroup,
     and only for cgroups whose binding changed);
  3. rulesets nothing points at any more are deleted.
Capacity is checked before step 1, so a policy that does not fit is rejected whole and the old
one stays in force.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from hostagent.bpf import abi
from hostagent.errors import KernelError, PolicyCapacityError
from hostagent.policy.bind import BindingSpec
from hostagent.policy.compile import PortEntry, Ruleset

log = logging.getLogger(__name__)

_RULE_KEY = struct.Struct("<I4s16s")
_RULE_VALUE = struct.Struct("<IB3x")
_MAX_PORTSETS = 16384  # MAX_PORTSETS in bpf/lib/maps.h
_NONZERO = re.compile(rb"[^\x00]")


@dataclass
class InstalledRuleset:
    id: int
    ruleset: Ruleset
    keys: bytes            # packed rule keys, for deletion
    portsets: tuple[tuple[int, int], ...]   # (port set id, references held) per port set used
    generation: int


@dataclass
class RulesetInfo:
    """What events need to name a ruleset after the fact."""

    policy: str
    rule_names: tuple[str, ...]
    generation: int
    rule_tickets: tuple[str | None, ...] = ()


@dataclass
class State:
    generation: int = 0
    policy_ids: dict[str, int] = field(default_factory=dict)


class Enforcement:
    """Owns the contents of the pinned maps."""

    def __init__(self, programs, state_dir: str, max_rules: int, max_cgroups: int) -> None:
        self._t = programs
        self._state_path = os.path.join(state_dir, "state.json")
        self.max_rules = max_rules
        self.max_cgroups = max_cgroups
        self.state = self._load_state()
        self.installed: dict[str, InstalledRuleset] = {}        # by digest
        self.by_id: dict[int, RulesetInfo] = {}                 # every id events may name
        self._portsets: dict[tuple[PortEntry, ...], list[int]] = {}   # content -> [id, refs]
        self._portset_content: dict[int, tuple[PortEntry, ...]] = {}  # id -> content
        self._free_portsets: list[int] = []
        self._next_portset = 1
        self._bindings: dict[int, tuple] = {}                   # cgroup id -> value written
        self._by_policy: dict[str, InstalledRuleset] = {}       # policy name -> ruleset in force
        self._next_ruleset = 1
        self.rule_entries = 0
        self._by_ruleset_id: dict[int, Ruleset] = {}
        self._touched: set[int] = set()
        self.extra_fill: dict[str, Callable[[], tuple[int, int]]] = {}   # maps others own
        # the resolver thread holds port sets for DNS allowances while the main loop reloads
        self._portset_lock = threading.RLock()
        # called with the cgroups whose binding changed or went away (DNS allowances follow)
        self.on_rebind: Callable[[set[int]], None] | None = None
        self._adopt()

    # -- state that survives the agent ------------------------------------------------------------

    def _load_state(self) -> State:
        try:
            with open(self._state_path, encoding="utf-8") as f:
                raw = json.load(f)
            return State(int(raw.get("generation", 0)),
                         {str(k): int(v) for k, v in raw.get("policy_ids", {}).items()})
        except FileNotFoundError:
            return State()
        except (ValueError, TypeError, AttributeError) as err:
            log.warning("ignoring unreadable %s: %s", self._state_path, err)
            return State()

    def _save_state(self) -> None:
        os.makedirs(os.path.dirname(self._state_path), exist_ok=True)
        tmp = self._state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"generation": self.state.generation,
                       "policy_ids": self.state.policy_ids}, f)
        os.replace(tmp, self._state_path)

    def _adopt(self) -> None:
        """Learn what a previous agent left in the pinned maps, so nothing in use is reused."""
        in_use = set()
        for key, value in self._t["bindings"].items():
            self._bindings[key.value] = (value.ruleset_id, value.policy_id, value.mode,
                                         value.flags, value.generation)
            in_use.add(value.ruleset_id)
        self._adopted_rulesets = in_use - {0}
        self._next_ruleset = max(in_use | {0}) + 1
        used_portsets = set()
        for key, value in self._t["portsets"].items_lookup_batch():
            if value.count:
                used_portsets.add(int(getattr(key, "value", key)))
        self._adopted_portsets = used_portsets
        self._next_portset = max(used_portsets | {0}) + 1
        self.adopted = bool(self._bindings)

    # -- config and metadata ----------------------------------------------------------------------

    def write_config(self, default_action: int, emit_allow: bool) -> None:
        cfg = abi.Config(abi_version=abi.ABI_VERSION, generation=self.state.generation,
                         default_action=int(default_action),
                         flags=abi.CONFIG_EMIT_ALLOW if emit_allow else 0)
        table = self._t["config_map"]
        table[table.Key(0)] = table.Leaf.from_buffer_copy(bytes(cfg))

    def write_protected(self, metadata: Sequence, encrypted_dns: Sequence = ()) -> None:
        """The node's protected endpoints (metadata_v1): metadata, then encrypted-DNS services
        (a network in both is metadata, the stricter)."""
        table = self._t["metadata"]
        want: dict[tuple[int, int], int] = {}
        for kind, networks in ((abi.PROTECTED_ENCRYPTED_DNS, encrypted_dns),
                               (abi.PROTECTED_METADATA, metadata)):
            for net in networks:
                v6 = abi.as_v6_network(net)
                want[(int(v6.network_address), v6.prefixlen)] = kind
        have = {}
        for key, value in table.items():
            plen, addr = struct.unpack("<I16s", bytes(key))
            have[(int.from_bytes(addr, "big"), plen)] = (key, value.value)
        # The kernel skips the trie where the filter's bit is clear, so the bits must cover
        # the trie at every instant: those of both sets while entries come and go, then only
        # the new set's (abi.h, protected_filter).
        self._write_protected_filter(abi.protected_filter([*want, *have]))
        for prefix, kind in want.items():
            if have.get(prefix, (None, None))[1] != kind:
                raw = struct.pack("<I16s", prefix[1], prefix[0].to_bytes(16, "big"))
                table[table.Key.from_buffer_copy(raw)] = table.Leaf(kind)
        for prefix, (key, _) in have.items():
            if prefix not in want:
                del table[key]
        self._write_protected_filter(abi.protected_filter(want))

    def _write_protected_filter(self, value: abi.ProtectedFilter) -> None:
        table = self._t["protected_filter"]
        table[table.Key(0)] = table.Leaf.from_buffer_copy(bytes(value))

    def write_dns_config(self, listen: tuple[str, int] | None, mark: int, agent_cgroup_id: int,
                         encrypted_ports: Sequence[int]) -> None:
        """Where the kernel sends governed workloads' DNS; listen None turns the redirect off."""
        dc = abi.DnsConfig(mark=mark, agent_cgroup_id=agent_cgroup_id)
        for i, port in enumerate(list(encrypted_ports)[:abi.MAX_ENCRYPTED_DNS_PORTS]):
            dc.encrypted_ports[i] = port
        if listen is not None:
            dc.addr[:] = abi.address_key(ipaddress.ip_address(listen[0]))
            dc.port = listen[1]
            dc.flags = abi.DNS_REDIRECT
        table = self._t["dns_config_map"]
        table[table.Key(0)] = table.Leaf.from_buffer_copy(bytes(dc))

    def ruleset(self, ruleset_id: int) -> Ruleset | None:
        """The ruleset installed under an id (None once replaced)."""
        return self._by_ruleset_id.get(ruleset_id)

    def adopt_portset(self, pid: int) -> None:
        """Hold a port set a previous agent's DNS allowance points at, by its kernel content."""
        with self._portset_lock:
            if pid in self._portset_content:
                self._portsets[self._portset_content[pid]][1] += 1
                return
            table = self._t["portsets"]
            ps = table[table.Key(pid)]
            ports = tuple(PortEntry(r.first, r.last, r.protocols, r.rule)
                          for r in ps.ranges[:ps.count])
            self._portsets[ports] = [pid, 1]
            self._portset_content[pid] = ports
            self._next_portset = max(self._next_portset, pid + 1)

    # -- rulesets ---------------------------------------------------------------------------------

    def hold_portset(self, ports: tuple[PortEntry, ...]) -> int:
        """The id of a port set with this content, written if new; one more reference to it.
        Thread-safe: the resolver holds port sets for DNS allowances during reloads."""
        with self._portset_lock:
            return self._hold_portset(ports)

    def _hold_portset(self, ports: tuple[PortEntry, ...], refs: int = 1) -> int:
        slot = self._portsets.get(ports)
        if slot:
            slot[1] += refs
            return slot[0]
        if self._free_portsets:
            pid = self._free_portsets.pop()
        else:
            pid = self._next_portset
            if pid >= _MAX_PORTSETS:
                raise PolicyCapacityError(f"more than {_MAX_PORTSETS - 1} distinct port sets")
            self._next_portset += 1
        ps = abi.PortSet(count=len(ports))
        for i, p in enumerate(ports):
            ps.ranges[i] = abi.PortRange(first=p.first, last=p.last, protocols=p.protocols,
                                         rule=p.rule)
        table = self._t["portsets"]
        table[table.Key(pid)] = table.Leaf.from_buffer_copy(bytes(ps))
        self._portsets[ports] = [pid, refs]
        self._portset_content[pid] = ports
        return pid

    def release_portset(self, pid: int) -> None:
        """Drop one reference; the last one frees the slot."""
        with self._portset_lock:
            self._release_portset(pid)

    def _release_portset(self, pid: int, refs: int = 1) -> None:
        ports = self._portset_content.get(pid)
        if ports is None:
            return
        slot = self._portsets[ports]
        slot[1] -= refs
        if slot[1] <= 0:
            del self._portsets[ports]
            del self._portset_content[pid]
            table = self._t["portsets"]
            table[table.Key(pid)] = table.Leaf()   # count 0 = free
            self._free_portsets.append(pid)

    def _install(self, ruleset: Ruleset, generation: int) -> InstalledRuleset:
        rid = self._next_ruleset
        self._next_ruleset += 1
        rid_be = rid.to_bytes(4, "big")
        # The entries of one rule share one port tuple (compile_ruleset): hold each distinct
        # tuple once, with as many references as entries use it, not 100k times over.
        uses: dict[int, list] = {}   # id(ports) -> [ports, entries using it, port set id]
        for ports, _ in ruleset.entries.values():
            use = uses.get(id(ports))
            if use is None:
                uses[id(ports)] = [ports, 1, 0]
            else:
                use[1] += 1
        with self._portset_lock:
            for use in uses.values():
                use[2] = self._hold_portset(use[0], use[1])
        keys = bytearray()
        values = bytearray()
        key, value, named = _RULE_KEY.pack, _RULE_VALUE.pack, abi.RULE_NAMED
        for (addr, plen), (ports, grant) in ruleset.entries.items():
            keys += key(32 + plen, rid_be, addr.to_bytes(16, "big"))
            values += value(uses[id(ports)][2], named if grant else 0)
        self._write_rules(bytes(keys), bytes(values), len(ruleset.entries))
        self._by_ruleset_id[rid] = ruleset
        portsets = tuple((pid, refs) for _, refs, pid in uses.values())
        return InstalledRuleset(rid, ruleset, bytes(keys), portsets, generation)

    def _write_rules(self, keys: bytes, values: bytes, n: int) -> None:
        if not n:
            return
        table = self._t["rules"]
        karr = (table.Key * n).from_buffer_copy(keys)
        varr = (table.Leaf * n).from_buffer_copy(values)
        try:
            table.items_update_batch(karr, varr)
        except Exception as err:  # bcc raises bare Exception with the errno text
            raise KernelError(f"writing {n} rule entries failed: {err}") from err

    def _uninstall(self, inst: InstalledRuleset) -> None:
        self._by_ruleset_id.pop(inst.id, None)
        table = self._t["rules"]
        n = len(inst.keys) // _RULE_KEY.size
        if n:
            karr = (table.Key * n).from_buffer_copy(inst.keys)
            try:
                table.items_delete_batch(karr)
            except Exception:
                # lpm_trie has no batch delete on some kernels: fall back to one by one
                for k in karr:
                    try:
                        del table[k]
                    except KeyError:
                        pass  # already gone: deletion is the goal
        with self._portset_lock:
            for pid, refs in inst.portsets:
                self._release_portset(pid, refs)
        self.rule_entries -= n

    def _gc_adopted(self) -> None:
        """Delete what a previous agent left and nothing points at any more."""
        live = {inst.id for inst in self.installed.values()}
        stale = self._adopted_rulesets - live
        if stale:
            table = self._t["rules"]
            for key in list(table.keys()):
                if int.from_bytes(bytes(key)[4:8], "big") in stale:
                    del table[key]
        table = self._t["portsets"]
        with self._portset_lock:
            mine = {slot[0] for slot in self._portsets.values()}
            for pid in self._adopted_portsets - mine:
                table[table.Key(pid)] = table.Leaf()
        self._adopted_rulesets = set()
        self._adopted_portsets = set()

    # -- the whole swap ---------------------------------------------------------------------------

    def policy_id(self, name: str) -> int:
        pid = self.state.policy_ids.get(name)
        if pid is None:
            pid = max(self.state.policy_ids.values(), default=0) + 1
            self.state.policy_ids[name] = pid
        return pid

    def apply(self, rulesets: Mapping[str, Ruleset], bindings: Mapping[int, BindingSpec],
              default_action: int, emit_allow: bool, new_generation: bool) -> dict:
        """Make the kernel enforce rulesets (by policy name) bound as given. Atomic per cgroup."""
        new = [r for r in rulesets.values() if r.digest not in self.installed]
        need = self.rule_entries + sum(len(r) for r in new)
        if need > self.max_rules:
            raise PolicyCapacityError(
                f"the policy needs {sum(len(r) for r in rulesets.values())} rule entries and "
                f"{need} during the swap; limits.maxRules is {self.max_rules}")
        if len(bindings) > self.max_cgroups:
            raise PolicyCapacityError(f"{len(bindings)} cgroups to bind; limits.maxCgroups is "
                                      f"{self.max_cgroups}")

        generation = self.state.generation + 1 if new_generation else self.state.generation
        for r in new:
            inst = self._install(r, generation)
            self.installed[r.digest] = inst
            self.rule_entries += len(r)
            self.by_id[inst.id] = RulesetInfo(r.policy, r.rule_names, generation, r.rule_tickets)
        by_policy = {name: self.installed[r.digest] for name, r in rulesets.items()}
        changed = self._write_bindings(by_policy, bindings, generation)

        self.state.generation = generation
        self.write_config(default_action, emit_allow)
        live = {r.digest for r in rulesets.values()}
        removed = 0
        for digest in list(self.installed):
            if digest not in live:
                self._uninstall(self.installed.pop(digest))
                removed += 1
        if self._adopted_rulesets or self._adopted_portsets:
            self._gc_adopted()
        self._save_state()
        return {"generation": generation, "rulesets_added": len(new),
                "rulesets_removed": removed, **changed}

    def _binding_value(self, spec: BindingSpec, by_policy: Mapping[str, InstalledRuleset]
                       ) -> tuple[int, int, int, int]:
        flags = (abi.BINDING_METADATA_EXEMPT if spec.exempt else 0) | \
                (abi.BINDING_ALLOW_RAW if spec.allow_raw else 0) | \
                (abi.BINDING_PENDING if spec.pending else 0) | \
                (abi.BINDING_CONFLICT if spec.conflict else 0)
        if spec.pending or spec.conflict:
            return (0, 0, int(spec.mode), flags)
        if spec.policy is None:
            return (0, 0, int(abi.BindingMode.NONE), flags)
        inst = by_policy[spec.policy]
        if inst.ruleset.fqdn is not None:
            flags |= abi.BINDING_FQDN
        return (inst.id, self.policy_id(spec.policy), int(spec.mode), flags)

    def _write_bindings(self, by_policy: Mapping[str, InstalledRuleset],
                        bindings: Mapping[int, BindingSpec], generation: int) -> dict:
        self._by_policy = dict(by_policy)
        want = {cgid: self._binding_value(spec, by_policy) for cgid, spec in bindings.items()}
        added, changed = self._put_bindings(want, generation)
        removed = self._drop_bindings(self._bindings.keys() - want.keys())
        self._notify()
        return {"bindings_added": added, "bindings_changed": changed,
                "bindings_removed": removed}

    def _put_bindings(self, want: Mapping[int, tuple[int, int, int, int]], generation: int
                      ) -> tuple[int, int]:
        table = self._t["bindings"]
        added = changed = 0
        for cgid, value in want.items():
            old = self._bindings.get(cgid)
            if old is not None and old[:4] == value:
                continue
            leaf = table.Leaf(ruleset_id=value[0], policy_id=value[1], mode=value[2],
                              flags=value[3], generation=generation)
            table[table.Key(cgid)] = leaf
            self._bindings[cgid] = (*value, generation)
            self._touched.add(cgid)
            if old is None:
                added += 1
            else:
                changed += 1
        return added, changed

    def _drop_bindings(self, cgids) -> int:
        table = self._t["bindings"]
        removed = 0
        for cgid in list(cgids):
            if cgid not in self._bindings:
                continue
            try:
                del table[table.Key(cgid)]
            except KeyError:
                pass  # the kernel freed it with the cgroup? keep our mirror honest anyway
            del self._bindings[cgid]
            self._touched.add(cgid)
            removed += 1
        return removed

    def update_bindings(self, changed: Mapping[int, BindingSpec], removed=()) -> dict:
        """Bind or rebind some cgroups under the rulesets already in force, and forget removed
        ones: what a new container or a label change needs, without a reload. Each cgroup
        switches with one map update, as in apply()."""
        new = [cgid for cgid in changed if cgid not in self._bindings]
        if len(self._bindings) + len(new) > self.max_cgroups:
            raise PolicyCapacityError(f"{len(self._bindings) + len(new)} cgroups to bind; "
                                      f"limits.maxCgroups is {self.max_cgroups}")
        want = {cgid: self._binding_value(spec, self._by_policy)
                for cgid, spec in changed.items()}
        added, rebound = self._put_bindings(want, self.state.generation)
        dropped = self._drop_bindings(removed)
        self._notify()
        return {"bindings_added": added, "bindings_changed": rebound,
                "bindings_removed": dropped}

    def _notify(self) -> None:
        touched, self._touched = self._touched, set()
        if touched and self.on_rebind is not None:
            self.on_rebind(touched)

    # -- reading back -----------------------------------------------------------------------------

    def fill(self) -> dict[str, tuple[int, int]]:
        """Map fill: name -> (entries, capacity)."""
        return {"rules": (self.rule_entries, self.max_rules),
                "bindings": (len(self._bindings), self.max_cgroups),
                "portsets": (len(self._portsets), _MAX_PORTSETS - 1),
                **{name: fn() for name, fn in self.extra_fill.items()}}

    def binding(self, cgid: int) -> tuple | None:
        """(ruleset_id, policy_id, mode, flags, generation) written for a cgroup, if any."""
        return self._bindings.get(cgid)

    def decisions(self) -> dict[tuple[int, int, int, int], int]:
        """(policy_id, verdict, reason, hook) -> count, from both maps the kernel counts in:
        decisions_v1 by key, allow_counts_v1 by slot (bpf/lib/abi.h)."""
        out = {}
        for key, values in self._t["decisions"].items():
            out[(key.policy_id, key.verdict, key.reason, key.hook)] = sum(values)
        for slot, n in self._allow_counts():
            key = abi.allow_count_key(slot)
            out[key] = out.get(key, 0) + n
        return out

    def _allow_counts(self) -> list[tuple[int, int]]:
        """(slot, count summed over CPUs) of every allow_counts_v1 slot that counted anything.

        One BPF_MAP_LOOKUP_BATCH of the whole array (bcc's items_lookup_batch passes one
        variable as both its batch token and its count, which an array map does not survive),
        then only the slots holding a non-zero byte are decoded: a node uses few of them."""
        from bcc.libbcc import lib  # Debian's python3-bpfcc, as for the programs

        table = self._t["allow_counts"]
        per_cpu = table.Leaf            # __u64 per possible CPU
        keys = (table.Key * abi.ALLOW_COUNT_SLOTS)()
        values = (per_cpu * abi.ALLOW_COUNT_SLOTS)()
        count, token = ct.c_uint32(abi.ALLOW_COUNT_SLOTS), ct.c_uint32(0)
        if lib.bpf_lookup_batch(table.map_fd, None, ct.byref(token), ct.byref(keys),
                                ct.byref(values), ct.byref(count)) != 0:
            err = ct.get_errno()
            if err != errno.ENOENT:  # ENOENT: the whole array was read, as asked
                raise KernelError(f"reading allow_counts_v1: {os.strerror(err)}", errno=err)
        raw = bytes(values)
        stride = ct.sizeof(per_cpu)
        out = []
        pos = _NONZERO.search(raw, 0, count.value * stride)
        while pos is not None:
            i = pos.start() // stride
            n = sum(values[i])
            out.append((int(keys[i]), n))
            pos = _NONZERO.search(raw, (i + 1) * stride, count.value * stride)
        return out

    def errors(self) -> dict[tuple[int, int, int], int]:
        out = {}
        for key, values in self._t["errors"].items():
            out[(key.error, key.file_id, key.line)] = sum(values)
        return out

    def policy_name(self, policy_id: int) -> str:
        for name, pid in self.state.policy_ids.items():
            if pid == policy_id:
                return name
        return ""

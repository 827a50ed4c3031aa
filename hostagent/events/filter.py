"""Which events a subscriber asked for (GetEventsRequest's filters, `hostagent events` flags).

Within one list any entry matches (OR); across lists all must match (AND); an empty list
matches everything. Lost-event records always pass: a filter must never hide that something is
missing.

- workloads: ``key=pattern`` on a workload field (``namespace=prod``, ``pod=api-*``,
  ``cgroup_path=/workloads/**``) or ``label:key=pattern`` on a label; fnmatch patterns.
- destinations: a CIDR or an address (``10.0.0.0/8``, ``2001:db8::1``), or a name pattern
  (``*.openai.com``, ``api.openai.com``) matched against the name the address was resolved
  from, or a DNS event's query name.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from hostagent.errors import HostAgentError


class FilterError(HostAgentError):
    pass


@dataclass(frozen=True)
class EventFilter:
    kinds: frozenset[str] = frozenset()
    verdicts: frozenset[str] = frozenset()
    workloads: tuple[tuple[str, str], ...] = ()       # (field or "label:<key>", pattern)
    networks: tuple = ()                                # ip_network
    names: tuple[str, ...] = ()                          # lower-case fnmatch patterns

    @classmethod
    def build(cls, kinds: Iterable[str] = (), verdicts: Iterable[str] = (),
              workloads: Iterable[str] = (), destinations: Iterable[str] = ()) -> "EventFilter":
        sel = []
        for w in workloads:
            key, sep, pattern = w.partition("=")
            if not sep or not key:
                raise FilterError(f"workload selector {w!r}: expected key=pattern "
                                  "(namespace=prod, label:app=web)")
            sel.append((key.strip(), pattern.strip()))
        nets, names = [], []
        for d in destinations:
            try:
                nets.append(ipaddress.ip_network(d, strict=False))
            except ValueError:
                if not d or " " in d:
                    raise FilterError(f"destination {d!r}: expected a CIDR, an address or a "
                                      "name pattern") from None
                names.append(d.lower().rstrip("."))
        return cls(frozenset(kinds), frozenset(verdicts), tuple(sel), tuple(nets), tuple(names))

    @property
    def empty(self) -> bool:
        return not (self.kinds or self.verdicts or self.workloads or self.networks or self.names)

    def match(self, e: dict) -> bool:
        kind = e.get("kind")
        if kind == "lost":
            return True
        if self.kinds and kind not in self.kinds:
            return False
        if self.verdicts and e.get("verdict") not in self.verdicts:
            return False
        if self.workloads and not self._workload(e.get("workload") or {}):
            return False
        if (self.networks or self.names) and not self._destination(e):
            return False
        return True

    def _workload(self, w: dict) -> bool:
        for key, pattern in self.workloads:
            if key.startswith("label:"):
                value = (w.get("labels") or {}).get(key[6:])
            else:
                value = w.get(key)
            if value is not None and fnmatch.fnmatchcase(str(value), pattern):
                return True
        return False

    def _destination(self, e: dict) -> bool:
        d = e.get("destination") or {}
        name = d.get("name") or (e.get("query") or {}).get("name")
        addresses = [d.get("ip")] if d.get("ip") else [a["ip"] for a in e.get("answers") or ()]
        for a in addresses:
            ip = ipaddress.ip_address(a)
            if any(ip.version == n.version and ip in n for n in self.networks):
                return True
        if name:
            name = name.lower().rstrip(".")
            return any(fnmatch.fnmatchcase(name, p) for p in self.names)
        return False

"""What the resolver needs from the rest of the agent, as injected callables.

The resolver never imports the policy engine or the kernel loader: it asks ``ResolverHooks``
who sent a query (``attribute``), whether that workload may resolve a name (``check``), has the
answer's addresses opened in the kernel before the answer leaves (``allow``) and reports what it
did (``emit``). Tests implement the same protocol with recording fakes.

Every hook is called from the resolver's own thread (its event loop), synchronously: a hook that
blocks stalls every query, so each must return quickly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Client", "IPAddress", "NameVerdict", "ResolverHooks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NameVerdict.verdict values.
ALLOW = "allow"
DENY = "deny"
AUDIT = "audit"  # answered, but reported as "would be denied"
VERDICTS = (ALLOW, DENY, AUDIT)


@dataclass(frozen=True, slots=True)
class Client:
    """Who sent a query, as the kernel recorded it (never what the packet claims)."""

    cgroup_id: int
    cookie: int  # socket cookie, 0 if unknown


@dataclass(frozen=True, slots=True)
class NameVerdict:
    """check()'s answer for one (workload, name)."""

    verdict: str  # "allow" | "deny" | "audit"
    reason: str  # "policy_rule", "policy_default", "node_default", "encrypted_dns", ...
    policy: str | None
    rule: str | None  # rule name, for events
    grant: object = None  # opaque, handed back to allow(); None: nothing to open in the kernel
    # Which rebind-protected addresses (DnsConfig.rebind_protect) the workload's policy allows
    # explicitly; None: none of them.
    private_ok: Callable[[IPAddress], bool] | None = None
    ticket: str | None = None  # the allowing rule's change ticket, for events


class ResolverHooks(Protocol):
    def attribute(self, src_ip: str, src_port: int, proto: int) -> Client | None:
        """The workload that sent a query from (src_ip, src_port) over proto (6 TCP, 17 UDP).

        None: the kernel has no record of it; the query is refused.
        """

    def check(self, client: Client, qname: str) -> NameVerdict:
        """May ``client`` resolve ``qname`` (lower case, no trailing dot; "." for the root)?

        A name that is not plain letters, digits, "-" and "_" arrives in dnspython's escaped
        text form ("a\\.b.example.com" for a label holding a dot), so no two different wire
        names share a text form. Results are memoized per (cgroup_id, qname) until
        Resolver.invalidate().
        """

    def allow(self, client: Client, verdict: NameVerdict, qname: str,
              addrs: Sequence[tuple[IPAddress, int]]) -> None:
        """Open (address, ttl seconds) for ``client`` in the kernel before the answer is sent.

        Called once per (workload, cached answer) while the answer lives in the cache, and again
        after Resolver.invalidate(). Raising fails the query closed: SERVFAIL, event reason
        "allowance_failed".
        """

    def emit(self, event: dict) -> None:
        """Report one DNS event (a plain dict, see hostagent.dns.server). Must not block long."""

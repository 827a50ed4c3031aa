"""The allowlists both enforcers get: the same N addresses as agent policy YAML and nft sets.

Every list holds 127.0.0.1/32 (the workload's own listener) plus N-1 distinct random /32s drawn
from 127.0.0.0/8 outside 127.0.0.0/24. Drawing them from the loopback /8 rather than from an
unrelated network is deliberate: the LPM trie (and nft's interval tree) must then walk a full-depth
path to find 127.0.0.1, as for any address in a dense list. With the filler in 10.0.0.0/8 the
lookup of 127.0.0.1 would branch off after a bit or two and a 100k-rule trie would cost what a
10-rule one does.

127.0.0.0/24 is kept out of the random draw and holds the fixed addresses:
  127.0.0.1       allowed everywhere (the measured connects)
  127.0.0.2       in no list: the probe a working enforcer must refuse
  127.0.0.16+k    marker of the k-th reload, so a probe can see when the new policy is in force
"""

from __future__ import annotations

import ipaddress
import random

ALLOWED = "127.0.0.1"
DENIED = "127.0.0.2"
_MARKER_BASE = int(ipaddress.IPv4Address("127.0.0.16"))
_POOL = range(int(ipaddress.IPv4Address("127.0.1.0")), int(ipaddress.IPv4Address("128.0.0.0")))


def marker(k: int) -> str:
    """The address only the k-th reloaded policy allows."""
    if not 0 <= k < 200:
        raise ValueError(repr(k))
    return str(ipaddress.IPv4Address(_MARKER_BASE + k))


def allowlist(n: int, seed: int, extra: tuple[str, ...] = ()) -> list[str]:
    """n /32 CIDRs: 127.0.0.1, the extra addresses, and random filler (reproducible by seed)."""
    fixed = [ALLOWED, *extra]
    if n < len(fixed):
        raise ValueError(f"{n} rules cannot hold {len(fixed)} fixed addresses")
    filler = random.Random(seed).sample(_POOL, n - len(fixed))
    return [f"{a}/32" for a in fixed] + [f"{ipaddress.IPv4Address(a)}/32" for a in filler]


def policy_yaml(name: str, cgroup_path: str, cidrs: list[str]) -> str:
    """An EgressPolicy allowing TCP to every port of cidrs from cgroup_path (written as text:
    yaml.dump of 100k entries is slower than the agent's whole reload)."""
    lines = [
        "apiVersion: hostagent.io/v1",
        "kind: EgressPolicy",
        f"metadata: {{name: {name}}}",
        "spec:",
        f'  selector: {{cgroupPath: "{cgroup_path}"}}',
        "  egress:",
        "    - name: bench",
        "      to:",
    ]
    lines += [f"        - cidr: {c}" for c in cidrs]
    lines += ["      ports:", "        - {port: 1, endPort: 65535, protocol: TCP}", ""]
    return "\n".join(lines)


def nft_ruleset(table: str, cgroup_level: int, cgroup_path: str, cidrs: list[str]) -> str:
    """An inet table whose output chain drops what a cgroup sends outside the address set.

    cgroup_path is relative to /sys/fs/cgroup, where nft (1.0.6) looks it up to get the cgroup
    id; cgroup_level is the cgroup's depth below the cgroup2 root, which the kernel compares.
    The set has `flags interval` because a CIDR allowlist needs ranges, as the agent's does.
    """
    elements = ",\n    ".join(cidrs)
    return (
        f"table inet {table} {{\n"
        "  set allow {\n"
        "    type ipv4_addr\n"
        "    flags interval\n"
        f"    elements = {{\n    {elements}\n    }}\n"
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority filter; policy accept;\n"
        f'    socket cgroupv2 level {cgroup_level} "{cgroup_path}" ip daddr != @allow drop\n'
        "  }\n"
        "}\n"
    )

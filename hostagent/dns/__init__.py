"""DNS: the names policies allow (hostagent.dns.names) and the node resolver.

The resolver's public names are exported lazily (PEP 562): the policy code imports
hostagent.dns.names, and that must not pull in uvloop and dnspython.
"""

from __future__ import annotations

import importlib

__all__ = [
    "AddressInUseError",
    "Client",
    "DnsCollector",
    "NameVerdict",
    "Resolver",
    "ResolverError",
    "ResolverHooks",
    "system_upstreams",
]

_EXPORTS = {
    "AddressInUseError": "hostagent.dns.server",
    "Resolver": "hostagent.dns.server",
    "ResolverError": "hostagent.dns.server",
    "Client": "hostagent.dns.hooks",
    "NameVerdict": "hostagent.dns.hooks",
    "ResolverHooks": "hostagent.dns.hooks",
    "DnsCollector": "hostagent.dns.metrics",
    "system_upstreams": "hostagent.dns.upstream",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

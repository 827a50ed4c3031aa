"""The node config: one YAML file (packaging/hostagent.yaml is the commented default) plus flags.

Every key has a default, so an empty file is valid. Unknown keys, at any level, are errors that
name the key, the file and the line, and list the keys allowed there: a misspelt key silently
falling back to its default is how an agent ends up not enforcing what its operator wrote.

The file is read with ``yaml.compose`` rather than ``yaml.safe_load`` so every value still knows
its line. The node tree is turned into plain Python (recording each key's line), then checked
against a small schema whose leaves are the converters in ``hostagent.converters``. Command-line
overrides go through the same schema and converters, so a flag and a file key can never disagree
about what a value means.

Nothing here looks at the host: whether ``cgroupRoot`` is in a cgroup2 mount or ``bpffsDir`` in a
bpf filesystem is checked once at start-up by the code that uses them.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import yaml

from hostagent import converters
from hostagent.converters import IPNetwork
from hostagent.errors import ConfigError

__all__ = [
    "DefaultAction",
    "DnsConfig",
    "MetadataConfig",
    "NAT64_PREFIX",
    "NodeConfig",
    "default_config",
    "load_config",
]


class DefaultAction(enum.IntEnum):
    """What the kernel does with a connection from a cgroup that no policy selects.

    The numbers are part of the kernel ABI (the config map the BPF programs read): keep them equal
    to the HOSTAGENT_DEFAULT_ACTION_* values in bpf/lib/abi.h; never renumber.
    """

    ALLOW = 1
    AUDIT = 2  # allowed, but reported as an event and counted as a would-be deny
    DENY = 3


# RFC 6052 well-known prefix: a DNS64/NAT64 network lets a workload reach 169.254.169.254 as
# 64:ff9b::a9fe:a9fe, so blocking only the IPv4 spelling would leave the metadata service open.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")

# (CIDR, who serves it). packaging/hostagent.yaml lists the same entries; a test compares them.
_DEFAULT_METADATA_ENDPOINTS = (
    ("169.254.169.254/32", "AWS, GCP, Azure, OCI, DigitalOcean, OpenStack instance metadata"),
    ("169.254.170.2/32", "AWS ECS task metadata and credentials"),
    ("169.254.170.23/32", "EKS Pod Identity agent"),
    ("169.254.169.123/32", "AWS time sync (listed in our threat model)"),
    ("fd00:ec2::254/128", "AWS instance metadata, IPv6"),
    ("fd00:ec2::23/128", "EKS Pod Identity agent, IPv6"),
    ("fd20:ce::254/128", "GCP metadata, IPv6"),
    ("100.100.100.200/32", "Alibaba Cloud metadata"),
    ("168.63.129.16/32", "Azure WireServer"),
)
# Already in the form normalize_cgroup_pattern() returns (a test checks it), so that
# default_config() does not need the policy package.
_DEFAULT_METADATA_EXEMPT = ("/system.slice/**",)

_RESYNC_MIN, _RESYNC_MAX = 0.1, 3600.0
# BPF map max_entries is a __u32.
_MAX_MAP_ENTRIES = 2**32 - 1


@dataclass(frozen=True)
class MetadataConfig:
    """Cloud metadata endpoints every workload is denied, except the ``exempt`` cgroups."""

    endpoints: tuple[IPNetwork, ...]
    exempt: tuple[str, ...]  # cgroupPath patterns, normalised by normalize_cgroup_pattern()
    nat64: bool

    def blocked_networks(self) -> tuple[IPNetwork, ...]:
        """``endpoints``, plus the NAT64 spelling of each IPv4 endpoint when ``nat64`` is on."""
        networks = list(self.endpoints)
        if self.nat64:
            base = int(NAT64_PREFIX.network_address)
            for net in self.endpoints:
                if net.version == 4:
                    networks.append(ipaddress.IPv6Network(
                        (base | int(net.network_address), NAT64_PREFIX.prefixlen + net.prefixlen)))
        return tuple(dict.fromkeys(networks))


# Answers in these ranges are dropped unless the workload's policy allows the range (rebinding).
_DEFAULT_REBIND_PROTECT = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8",
                           "169.254.0.0/16", "100.64.0.0/10", "fc00::/7", "fe80::/10", "::1/128",
                           "0.0.0.0/8", "::/128", "::ffff:0:0/96")

# Well-known public DNS-over-HTTPS / DNS-over-TLS services: their addresses are denied to governed
# workloads (any port) unless a rule names the address, and their names are refused unless a
# rule lists the exact fqdn. packaging/hostagent.yaml lists the same entries; a test compares.
_DEFAULT_ENCRYPTED_DNS_ENDPOINTS = (
    "1.1.1.1/32", "1.0.0.1/32", "1.1.1.2/32", "1.0.0.2/32", "1.1.1.3/32", "1.0.0.3/32",
    "2606:4700:4700::1111/128", "2606:4700:4700::1001/128",
    "8.8.8.8/32", "8.8.4.4/32", "2001:4860:4860::8888/128", "2001:4860:4860::8844/128",
    "9.9.9.9/32", "149.112.112.112/32", "9.9.9.11/32", "149.112.112.11/32",
    "2620:fe::fe/128", "2620:fe::9/128",
    "208.67.222.222/32", "208.67.220.220/32", "2620:119:35::35/128", "2620:119:53::53/128",
    "94.140.14.14/32", "94.140.15.15/32", "2a10:50c0::ad1:ff/128", "2a10:50c0::ad2:ff/128",
    "185.228.168.9/32", "185.228.169.9/32", "76.76.2.0/32", "76.76.10.0/32",
    "45.90.28.0/32", "45.90.30.0/32",
)
_DEFAULT_ENCRYPTED_DNS_NAMES = (
    "cloudflare-dns.com", "mozilla.cloudflare-dns.com", "one.one.one.one", "1dot1dot1dot1.cloudflare-dns.com",
    "security.cloudflare-dns.com", "family.cloudflare-dns.com",
    "dns.google", "dns.google.com", "dns64.dns.google",
    "dns.quad9.net", "dns9.quad9.net", "dns10.quad9.net", "dns11.quad9.net",
    "doh.opendns.com", "dns.opendns.com", "doh.familyshield.opendns.com",
    "dns.adguard.com", "dns.adguard-dns.com", "dns-unfiltered.adguard.com",
    "doh.cleanbrowsing.org", "dns.nextdns.io", "doh.mullvad.net", "dns.mullvad.net",
    "doh.dns.sb", "dns.alidns.com", "doh.pub", "dns.controld.com",
)


@dataclass(frozen=True)
class DnsConfig:
    """The node's DNS resolver (hostagent.dns) and the kernel redirect to it.

    Durations are seconds. ``upstreams == ()`` means the nameservers of /etc/resolv.conf, read
    once at start (the stub of systemd-resolved is replaced by its real upstreams).
    """

    enabled: bool = True
    listen: tuple[str, int] = ("127.0.0.53", 53)
    upstreams: tuple[tuple[str, int], ...] = ()
    rebind_protect: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(c)
                                                  for c in _DEFAULT_REBIND_PROTECT)
    ttl_min: int = 5
    ttl_max: int = 3600
    ttl_grace: int = 30
    refused_rcode: str = "REFUSED"  # or NXDOMAIN
    fqdn_pattern_min_labels: int = 2  # fixed labels a fqdnPattern needs: "*.com" has 1
    emit_allowed: bool = True  # an event for every answered query, not only refused ones
    rate_limit_qps: float = 100.0  # per workload (cgroup), token bucket
    rate_limit_burst: int = 200
    tunnel_max_label_length: int = 52  # a longer label is refused as a tunnel outright
    tunnel_entropy_min_length: int = 24  # labels at least this long are checked for entropy
    tunnel_entropy_bits: float = 3.8  # Shannon bits per character above which they are refused
    tunnel_max_unique_subdomains: int = 200  # distinct names under one zone per workload ...
    tunnel_window: float = 60.0  # ... within this many seconds
    encrypted_dns_endpoints: tuple[IPNetwork, ...] = tuple(
        ipaddress.ip_network(c) for c in _DEFAULT_ENCRYPTED_DNS_ENDPOINTS)
    encrypted_dns_names: tuple[str, ...] = _DEFAULT_ENCRYPTED_DNS_NAMES
    encrypted_dns_ports: tuple[int, ...] = (853,)  # DNS over TLS / QUIC, to any address
    cache_size: int = 10000  # answers
    max_allowances: int = 65536  # kernel map: (workload, address) pairs opened by answers
    socket_mark: int = 0x48410053  # SO_MARK of the resolver's upstream sockets; never redirected
    upstream_timeout: float = 2.0
    interface: str | None = "hostagent0"  # made (dummy) for a dns.listen address no link has


@dataclass(frozen=True)
class NodeConfig:
    """The validated node config. Build it with load_config() or default_config()."""

    cgroup_root: str  # "auto" (the cgroup2 mount from /proc/self/mountinfo) or an absolute path
    bpffs_dir: str
    state_dir: str
    policy_dir: str
    default_action: DefaultAction
    metadata: MetadataConfig
    metrics_listen: tuple[str, int] | None  # (host, port); IPv6 host without brackets; None = off
    event_log: str | None  # absolute path, "-" for stdout, None for no event log
    emit_allow_events: bool
    resync_interval: float  # seconds
    max_rules: int
    max_cgroups: int
    log_level: str  # debug | info | warning | error
    kube_enabled: str = "auto"  # "auto" (on when credentials exist) | "true" | "false"
    kubeconfig: str | None = None  # None: in-cluster service account credentials
    node_name: str | None = None  # None: $NODE_NAME, else the host name
    pending_action: DefaultAction = DefaultAction.DENY  # pods whose metadata is not known yet
    trust_domain: str = "cluster.local"
    unit_spiffe_template: str = "spiffe://{trustDomain}/node/{node}/unit/{unit}"
    container_spiffe_template: str = "spiffe://{trustDomain}/node/{node}/container/{containerId}"
    dns: DnsConfig = DnsConfig()
    # the gRPC event API (hostagent.api): HOST:PORT or unix:///path; None = off
    grpc_listen: str | None = "127.0.0.1:50051"
    grpc_tls_cert: str | None = None       # PEM files; no cert = plain text (loopback/unix only)
    grpc_tls_key: str | None = None
    grpc_tls_client_ca: str | None = None  # set: clients need a certificate from this CA
    grpc_max_subscribers: int = 16         # concurrent GetEvents streams
    event_buffer: int = 20000              # events kept in memory for subscribers to resume
    event_spool_max_bytes: int = 64 << 20  # on-disk spool under stateDir; 0 = none
    aggregate_window: float = 0.0          # seconds identical allowed flows fold into one; 0 = off
    connection_close_events: bool = False  # a close event per outbound TCP connection (sock_ops)
    source: str | None = None  # the file it was loaded from; None for defaults only


def default_config() -> NodeConfig:
    """The config an empty file gives."""
    return NodeConfig(
        cgroup_root="auto",
        bpffs_dir="/sys/fs/bpf/hostagent",
        state_dir="/var/lib/hostagent",
        policy_dir="/etc/hostagent/policies",
        default_action=DefaultAction.ALLOW,
        metadata=MetadataConfig(
            endpoints=tuple(ipaddress.ip_network(c) for c, _ in _DEFAULT_METADATA_ENDPOINTS),
            exempt=_DEFAULT_METADATA_EXEMPT,
            nat64=True,
        ),
        metrics_listen=("127.0.0.1", 9402),
        event_log="/var/log/hostagent/events.jsonl",
        emit_allow_events=False,
        resync_interval=2.0,
        max_rules=262144,
        max_cgroups=65536,
        log_level="info",
    )


# ---------------------------------------------------------------------------------------------
# Converters specific to this file (the generic ones live in hostagent.converters).


def _cgroup_root(value: object) -> str:
    if value == "auto":
        return "auto"
    if isinstance(value, str) and not value.startswith("/"):
        raise ValueError(f'{value!r}: expected "auto" or an absolute path')
    return converters.absolute_path(value)


def _default_action(value: object) -> DefaultAction:
    name = converters.one_of(a.name.lower() for a in DefaultAction)(value)
    return DefaultAction[name.upper()]


def _cgroup_pattern(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: expected a string cgroup path pattern")
    # Imported here, not at module level: the config must load without pulling in the policy
    # package, and the policy package may one day import the config.
    from hostagent.policy.selector import normalize_cgroup_pattern

    try:
        return normalize_cgroup_pattern(value)
    except ValueError as err:
        msg = str(err)
        if msg == repr(value):
            msg += ": not a valid cgroup path pattern"
        raise ValueError(msg) from None


def _kube_enabled(value: object) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if value == "auto":
        return "auto"
    raise ValueError(f'{value!r}: expected true, false or "auto"')


def _optional_path(value: object) -> str | None:
    return None if value is None or value == "" else converters.absolute_path(value)


def _node_name(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", value):
        raise ValueError(f"{value!r}: not a Kubernetes node name (lowercase DNS subdomain)")
    return value


def _trust_domain(value: object) -> str:
    from hostagent.identity.spiffe import validate_trust_domain

    if not isinstance(value, str):
        raise ValueError(f"{value!r}: expected a string")
    return validate_trust_domain(value)


def _spiffe_template(kind: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        from hostagent.identity.spiffe import validate_template

        if not isinstance(value, str):
            raise ValueError(f"{value!r}: expected a string")
        return validate_template(value, kind)
    return convert


def _metrics_listen(value: object) -> tuple[str, int] | None:
    if value is None or value == "":
        return None
    return converters.host_port(value)


def _event_log(value: object) -> str | None:
    if value is None or value == "":
        return None
    if value == "-":
        return "-"
    return converters.absolute_path(value)


def _grpc_listen(value: object) -> str | None:
    """HOST:PORT, [IPv6]:PORT or unix:///absolute/path; "" or null turns the API off."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.startswith("unix:"):
        path = value.removeprefix("unix://").removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{value!r}: a Unix socket path must be absolute (unix:///run/...)")
        return "unix://" + path
    host, port = converters.host_port(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _dns_listen(value: object) -> tuple[str, int]:
    host, port = converters.host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: the resolver listens on an IP address, not a host name") from None
    return host, port


def _interface_name(value: object) -> str | None:
    """A network interface name (at most 15 bytes, no '/', ':' or white space); null: none."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", value):
        raise ValueError(f"{value!r}: expected an interface name of 1-15 letters, digits, "
                         "'_', '.' or '-'")
    return value


def _upstream(value: object) -> tuple[str, int]:
    """"10.0.0.2", "10.0.0.2:53", "[fd00::2]:53": an address; the port defaults to 53."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value)), 53
        except ValueError:
            pass
    return _dns_listen(value)


def _rcode(value: object) -> str:
    return converters.one_of(("REFUSED", "NXDOMAIN"))(value)


def _dns_name(value: object) -> str:
    """An exact DNS name, normalised as policies' fqdn peers are (hostagent.dns.names)."""
    from hostagent.dns.names import normalize_name

    if not isinstance(value, str):
        raise ValueError(f"{value!r}: expected a DNS name")
    return normalize_name(value)


def _bounded_int(lo: int, hi: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{value!r}: expected an integer from {lo} to {hi}")
        return value
    return convert


def _bounded_float(lo: float, hi: float) -> Callable[[object], float]:
    return lambda value: converters.seconds(value, lo, hi)


def _resync_interval(value: object) -> float:
    return converters.seconds(value, _RESYNC_MIN, _RESYNC_MAX)


def _map_entries(value: object) -> int:
    return converters.positive_int(value, hi=_MAX_MAP_ENTRIES)


# ---------------------------------------------------------------------------------------------
# Schema: a tree of sections, lists and leaf converters.


@dataclass(frozen=True)
class _Section:
    fields: Mapping[str, _Spec]
    required: frozenset[str] = frozenset()
    # Turns the checked dict into the item's value (used for list items); None keeps the dict.
    build: Callable[[dict[str, object]], object] | None = None


@dataclass(frozen=True)
class _ListOf:
    item: _Spec
    unique: bool = True


_Spec = _Section | _ListOf | Callable[[object], object]

# Where each leaf lands in NodeConfig ("metadata.x" is a field of NodeConfig.metadata).
_ATTRS: Mapping[str, str] = types.MappingProxyType({
    "cgroupRoot": "cgroup_root",
    "bpffsDir": "bpffs_dir",
    "stateDir": "state_dir",
    "policyDir": "policy_dir",
    "defaultAction": "default_action",
    "metadata.endpoints": "metadata.endpoints",
    "metadata.exempt": "metadata.exempt",
    "metadata.nat64": "metadata.nat64",
    "metrics.listen": "metrics_listen",
    "eventLog": "event_log",
    "events.allow": "emit_allow_events",
    "events.replayBuffer": "event_buffer",
    "events.spool.maxBytes": "event_spool_max_bytes",
    "events.aggregate.window": "aggregate_window",
    "events.connectionClose": "connection_close_events",
    "grpc.listen": "grpc_listen",
    "grpc.tls.cert": "grpc_tls_cert",
    "grpc.tls.key": "grpc_tls_key",
    "grpc.tls.clientCA": "grpc_tls_client_ca",
    "grpc.maxSubscribers": "grpc_max_subscribers",
    "resyncInterval": "resync_interval",
    "limits.maxRules": "max_rules",
    "limits.maxCgroups": "max_cgroups",
    "logLevel": "log_level",
    "kubernetes.enabled": "kube_enabled",
    "kubernetes.kubeconfig": "kubeconfig",
    "kubernetes.nodeName": "node_name",
    "kubernetes.pendingAction": "pending_action",
    "identity.trustDomain": "trust_domain",
    "identity.unitSpiffeTemplate": "unit_spiffe_template",
    "identity.containerSpiffeTemplate": "container_spiffe_template",
    "dns.enabled": "dns.enabled",
    "dns.listen": "dns.listen",
    "dns.upstreams": "dns.upstreams",
    "dns.rebindProtect": "dns.rebind_protect",
    "dns.ttl.min": "dns.ttl_min",
    "dns.ttl.max": "dns.ttl_max",
    "dns.ttl.grace": "dns.ttl_grace",
    "dns.refusedRcode": "dns.refused_rcode",
    "dns.fqdnPatternMinLabels": "dns.fqdn_pattern_min_labels",
    "dns.emitAllowed": "dns.emit_allowed",
    "dns.rateLimit.qps": "dns.rate_limit_qps",
    "dns.rateLimit.burst": "dns.rate_limit_burst",
    "dns.tunnel.maxLabelLength": "dns.tunnel_max_label_length",
    "dns.tunnel.entropyMinLength": "dns.tunnel_entropy_min_length",
    "dns.tunnel.entropyBitsPerChar": "dns.tunnel_entropy_bits",
    "dns.tunnel.maxUniqueSubdomains": "dns.tunnel_max_unique_subdomains",
    "dns.tunnel.window": "dns.tunnel_window",
    "dns.encryptedDns.endpoints": "dns.encrypted_dns_endpoints",
    "dns.encryptedDns.names": "dns.encrypted_dns_names",
    "dns.encryptedDns.ports": "dns.encrypted_dns_ports",
    "dns.cacheSize": "dns.cache_size",
    "dns.maxAllowances": "dns.max_allowances",
    "dns.socketMark": "dns.socket_mark",
    "dns.upstreamTimeout": "dns.upstream_timeout",
    "dns.interface": "dns.interface",
})


def _schema() -> _Section:
    return _Section({
        "cgroupRoot": _cgroup_root,
        "bpffsDir": converters.absolute_path,
        "stateDir": converters.absolute_path,
        "policyDir": converters.absolute_path,
        "defaultAction": _default_action,
        "metadata": _Section({
            "endpoints": _ListOf(converters.cidr),
            "exempt": _ListOf(_Section(
                {"cgroupPath": _cgroup_pattern},
                required=frozenset({"cgroupPath"}),
                build=lambda entry: entry["cgroupPath"],
            )),
            "nat64": converters.boolean,
        }),
        "metrics": _Section({"listen": _metrics_listen}),
        "eventLog": _event_log,
        "events": _Section({"allow": converters.boolean,
                            "replayBuffer": _bounded_int(1000, 10**7),
                            "spool": _Section({"maxBytes": _bounded_int(0, 2**40)}),
                            "aggregate": _Section({"window": _bounded_float(0.0, 3600.0)}),
                            "connectionClose": converters.boolean}),
        "grpc": _Section({"listen": _grpc_listen,
                          "tls": _Section({"cert": _optional_path, "key": _optional_path,
                                           "clientCA": _optional_path}),
                          "maxSubscribers": _bounded_int(1, 1024)}),
        "resyncInterval": _resync_interval,
        "limits": _Section({"maxRules": _map_entries, "maxCgroups": _map_entries}),
        "logLevel": converters.log_level,
        "kubernetes": _Section({"enabled": _kube_enabled, "kubeconfig": _optional_path,
                                "nodeName": _node_name, "pendingAction": _default_action}),
        "identity": _Section({"trustDomain": _trust_domain,
                              "unitSpiffeTemplate": _spiffe_template("unit"),
                              "containerSpiffeTemplate": _spiffe_template("container")}),
        "dns": _Section({
            "enabled": converters.boolean,
            "listen": _dns_listen,
            "upstreams": _ListOf(_upstream),
            "rebindProtect": _ListOf(converters.cidr),
            "ttl": _Section({"min": _bounded_int(0, 86400), "max": _bounded_int(1, 604800),
                             "grace": _bounded_int(0, 3600)}),
            "refusedRcode": _rcode,
            "fqdnPatternMinLabels": _bounded_int(1, 10),
            "emitAllowed": converters.boolean,
            "rateLimit": _Section({"qps": _bounded_float(0.1, 1e6),
                                   "burst": _bounded_int(1, 10**6)}),
            "tunnel": _Section({"maxLabelLength": _bounded_int(8, 63),
                                "entropyMinLength": _bounded_int(4, 63),
                                "entropyBitsPerChar": _bounded_float(1.0, 6.0),
                                "maxUniqueSubdomains": _bounded_int(1, 10**6),
                                "window": _bounded_float(1.0, 86400.0)}),
            "encryptedDns": _Section({"endpoints": _ListOf(converters.cidr),
                                      "names": _ListOf(_dns_name),
                                      "ports": _ListOf(_bounded_int(1, 65535))}),
            "cacheSize": _bounded_int(0, 10**7),
            "maxAllowances": _bounded_int(16, 2**24),
            "socketMark": _bounded_int(1, 2**32 - 1),
            "upstreamTimeout": _bounded_float(0.05, 30.0),
            "interface": _interface_name,
        }),
    })


_Path = tuple[str | int, ...]
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Fail = Callable[[_Path, str], ConfigError]


def _dotted(path: _Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _type_name(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "null" if value is None else f"{value!r}"


def _check(value: object, spec: _Spec, path: _Path, fail: _Fail) -> object:
    """Convert one plain value against its spec; sections give dicts of the keys present."""
    if isinstance(spec, _Section):
        if value is None and not spec.required:
            value = {}  # "metadata:" with every child commented out means all defaults
        if not isinstance(value, dict):
            want = f"a mapping with key {', '.join(sorted(spec.required))}" if spec.required else "a mapping"
            raise fail(path, f"expected {want}, got {_type_name(value)}")
        for key in value:
            if key not in spec.fields:
                where = f" in {_dotted(path)}" if path else ""
                raise fail(path + (key,), f"unknown key; allowed keys{where}: {', '.join(spec.fields)}")
        missing = sorted(spec.required - value.keys())
        if missing:
            raise fail(path, f"missing key {', '.join(missing)}")
        checked = {key: _check(item, spec.fields[key], path + (key,), fail) for key, item in value.items()}
        return spec.build(checked) if spec.build else checked
    if isinstance(spec, _ListOf):
        if not isinstance(value, (list, tuple)):
            hint = " (write [] for an empty list)" if value is None else ""
            raise fail(path, f"expected a list, got {_type_name(value)}{hint}")
        items: list[object] = []
        for i, item in enumerate(value):
            checked = _check(item, spec.item, path + (i,), fail)
            if spec.unique and checked in items:
                raise fail(path + (i,), f"duplicate entry {item!r}")
            items.append(checked)
        return tuple(items)
    if isinstance(value, (list, tuple, dict)):
        raise fail(path, f"expected a single value, got {_type_name(value)}")
    try:
        return spec(value)
    except ValueError as err:
        raise fail(path, str(err)) from None


def _leaves(checked: Mapping[str, object], spec: _Section, prefix: str = "") -> dict[str, object]:
    """Flatten the checked top-level tree into {"metadata.nat64": value, ...}."""
    out: dict[str, object] = {}
    for key, value in checked.items():
        sub = spec.fields[key]
        dotted = prefix + key
        if isinstance(sub, _Section) and sub.build is None:
            out.update(_leaves(value, sub, dotted + "."))  # type: ignore[arg-type]
        else:
            out[dotted] = value
    return out


# ---------------------------------------------------------------------------------------------
# YAML nodes -> plain Python, remembering each key's line.


def _plain(loader: yaml.SafeLoader, node: yaml.Node, path: _Path, lines: dict[_Path, int],
           seen: set[int], source: str) -> object:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        # YAML 1.1 reads plain 1:30 as the base-60 number 90; nobody writing a config means that.
        if node.style is None and ":" in node.value and node.tag in _NUMBER_TAGS:
            number = loader.construct_object(node)
            raise ConfigError(f"{_dotted(path)}: {node.value!r} is the base-60 number {number} in YAML 1.1;"
                              f" write {number}, or quote it if it is text",
                              path=source, line=lines[path], key=_dotted(path))
        return loader.construct_object(node)
    # An alias of a list or mapping is refused: it is never needed here, and refusing it rules
    # out both recursive documents and exponential "billion laughs" expansion.
    if id(node) in seen:
        raise ConfigError(f"{_dotted(path) or 'document'}: aliases of lists or mappings are not supported",
                          path=source, line=lines[path], key=_dotted(path))
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        return [_plain(loader, child, path + (i,), lines, seen, source) for i, child in enumerate(node.value)]
    out: dict[str, object] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        where = f" in {_dotted(path)}" if path else ""
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise ConfigError(f"merge keys (<<) are not supported{where}", path=source, line=line)
        key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings{where}, got {_type_name(key)}", path=source, line=line)
        lines[path + (key,)] = line
        if key in out:
            raise ConfigError(f"{_dotted(path + (key,))}: duplicate key", path=source, line=line,
                              key=_dotted(path + (key,)))
        out[key] = _plain(loader, value_node, path + (key,), lines, seen, source)
    return out


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError("config file not found", path=path) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file is not UTF-8: {err.reason}", path=path) from None
    except OSError as err:
        raise ConfigError(f"cannot read config file: {err.strerror or err}", path=path) from None


def _load_file(source: str, schema: _Section) -> dict[str, object]:
    text = _read(source)
    lines: dict[_Path, int] = {}

    def fail(path: _Path, msg: str) -> ConfigError:
        line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
        prefix = f"{_dotted(path)}: " if path else ""
        return ConfigError(prefix + msg, path=source, line=line, key=_dotted(path))

    loader = None
    try:
        loader = yaml.SafeLoader(text)
        root = loader.get_single_node()
        tree = None if root is None else _plain(loader, root, (), lines, set(), source)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "syntax error"
        raise ConfigError(f"invalid YAML: {problem}", path=source,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as err:  # ReaderError (control characters) carries no mark
        position = getattr(err, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        raise ConfigError(f"invalid YAML: {err}", path=source, line=line) from None
    finally:
        if loader is not None:
            loader.dispose()
    if tree is None:  # empty file, only comments, or an empty document ("---")
        tree = {}
    if not isinstance(tree, dict):
        raise fail((), f"expected a mapping of settings at the top level, got {_type_name(tree)}")
    return _leaves(_check(tree, schema, (), fail), schema)  # type: ignore[arg-type]


def _load_overrides(overrides: Mapping[str, object], flag_names: Mapping[str, str],
                    schema: _Section) -> dict[str, object]:
    out: dict[str, object] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue  # argparse's "flag not given"; pass "" to turn metrics or the event log off
        label = flag_names.get(dotted) or f"command-line override {dotted}"
        if dotted not in _ATTRS:
            raise ConfigError(f"{label}: unknown setting; allowed: {', '.join(_ATTRS)}", key=dotted)
        spec: _Spec = schema
        for part in dotted.split("."):
            spec = spec.fields[part]  # type: ignore[union-attr]
        key_path: _Path = tuple(dotted.split("."))

        def fail(path: _Path, msg: str, label: str = label, dotted: str = dotted) -> ConfigError:
            suffix = _dotted(path)[len(dotted):]
            return ConfigError(f"{label}{suffix}: {msg}", key=dotted, flag=flag_names.get(dotted))

        out[dotted] = _check(value, spec, key_path, fail)
    return out


def _check_grpc(values: Mapping[str, object], source: str | None) -> None:
    """Plain text only where no one else can listen in; a key without a certificate is a typo."""
    where = source or "config"
    cert, key = values["grpc_tls_cert"], values["grpc_tls_key"]
    if bool(cert) != bool(key) or (values["grpc_tls_client_ca"] and not cert):
        raise ConfigError(f"{where}: grpc.tls: cert and key go together (and clientCA needs "
                          "them): set both, or neither for plain text")
    listen = values["grpc_listen"]
    if listen is not None and not cert and not converters.is_local(str(listen)):
        raise ConfigError(f"{where}: grpc.listen {listen}: plain text is allowed only on "
                          "loopback or a Unix socket; set grpc.tls.cert and grpc.tls.key")


def load_config(path: str | os.PathLike[str] | None,
                overrides: Mapping[str, object] | None = None,
                *, flag_names: Mapping[str, str] | None = None) -> NodeConfig:
    """Load the node config file at ``path`` (None: defaults only) and apply ``overrides``.

    ``overrides`` maps YAML key names, dotted for nesting ("metrics.listen"), to values of the
    type the YAML would hold (str, int, float, bool, list): they go through the same converters
    as the file and win over it. A None value means "not given" and is skipped. ``flag_names``
    maps the same keys to the flag that set them ("--metrics-listen") so errors can name it.

    Raises ConfigError; str() of it reads "file:line: message" for errors in the file.
    """
    schema = _schema()
    source = os.fspath(path) if path is not None else None
    values = _load_file(source, schema) if source is not None else {}
    values.update(_load_overrides(overrides or {}, flag_names or {}, schema))

    config = default_config()
    top: dict[str, object] = {}
    metadata: dict[str, object] = {}
    dns: dict[str, object] = {}
    for dotted, value in values.items():
        attr = _ATTRS[dotted]
        if attr.startswith("metadata."):
            metadata[attr.removeprefix("metadata.")] = value
        elif attr.startswith("dns."):
            dns[attr.removeprefix("dns.")] = value
        else:
            top[attr] = value
    dns_config = dataclasses.replace(config.dns, **dns)
    _check_grpc({**{k: getattr(config, k) for k in ("grpc_listen", "grpc_tls_cert",
                                                      "grpc_tls_key", "grpc_tls_client_ca")},
                 **top}, source)
    if dns_config.ttl_min > dns_config.ttl_max:
        raise ConfigError(f"{source or 'config'}: dns.ttl: min ({dns_config.ttl_min}) is above "
                          f"max ({dns_config.ttl_max})")
    return dataclasses.replace(
        config, **top, metadata=dataclasses.replace(config.metadata, **metadata), dns=dns_config,
        source=source)

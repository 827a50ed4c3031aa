"""The collector's config: one YAML file (every key optional) plus flags that win over it.

```yaml
agents: ["10.0.0.5:50051", "[fd00::5]:50051", "unix:///run/hostagent/api.sock"]
discovery:
  dns: ["hostagent.kube-system.svc.cluster.local:50051"]   # every A/AAAA record, re-resolved
  files: ["/etc/hostagent-collector/agents.txt"]           # one address a line, re-read on change
  interval: 30s              # between DNS lookups
tls: {ca: /etc/hostagent-collector/ca.pem, cert: ..., key: ..., serverName: null}
database: sqlite:///var/lib/hostagent-collector/events.db  # or postgresql://user@host/db
retention: {maxAge: 30d, interval: 10m}                    # maxAge null: keep everything
maxBatch: 4096               # events per message asked of each agent
probeInterval: 30s           # GetStatus on each stream's connection; no answer: reconnect
metrics: {listen: "127.0.0.1:9403"}                        # null: off
logLevel: info
```

Unknown keys are errors naming the file, the line and the keys allowed there, with the same
reader as the node config (hostagent.config): a misspelt key must never fall back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from hostagent import converters
from hostagent.collector import times
from hostagent.collector.store import DEFAULT_DB, check_url
from hostagent.config import _check, _ListOf, _load_file, _Section
from hostagent.errors import ConfigError

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class TlsConfig:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class CollectorConfig:
    agents: tuple[str, ...] = ()
    discover_dns: tuple[tuple[str, int], ...] = ()
    discover_files: tuple[str, ...] = ()
    discovery_interval: float = 30.0      # seconds between DNS lookups
    tls: TlsConfig = TlsConfig()
    database: str = DEFAULT_DB
    retention: float | None = 30 * 86400.0   # seconds; None: keep everything
    retention_interval: float = 600.0
    max_batch: int = 4096
    probe_interval: float = 30.0
    metrics_listen: tuple[str, int] | None = None
    log_level: str = "info"
    source: str | None = None


# -- converters -----------------------------------------------------------------------------------

def agent_address(value: object) -> str:
    """HOST:PORT, [IPv6]:PORT or unix:///path (what the agent's grpc.listen takes); a bare host
    gets the default port."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r}: expected HOST:PORT, [IPV6]:PORT or unix:///PATH")
    s = value.strip()
    if s.startswith("unix:"):
        path = s.removeprefix("unix://").removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{value!r}: a Unix socket path must be absolute (unix:///run/...)")
        return "unix://" + path
    if not s.startswith("[") and s.count(":") != 1:
        if ":" in s:   # a bare IPv6 address
            return agent_address(f"[{s}]:{DEFAULT_PORT}")
        return agent_address(f"{s}:{DEFAULT_PORT}")
    host, port = converters.host_port(s)
    if port == 0:
        raise ValueError(f"{value!r}: port 0 is not an agent's port")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dns_target(value: object) -> tuple[str, int]:
    """NAME:PORT (a DNS name whose every A/AAAA record is an agent); the port defaults."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r}: expected NAME:PORT")
    if ":" not in value:
        value = f"{value}:{DEFAULT_PORT}"
    host, port = converters.host_port(value)
    if port == 0:
        raise ValueError(f"{value!r}: port 0 is not an agent's port")
    return host, port


def _duration(lo: float, hi: float):
    def convert(value: object) -> float:
        seconds = times.duration(value)
        if not lo <= seconds <= hi:
            raise ValueError(f"{value!r}: must be between {lo:g} and {hi:g} seconds")
        return seconds
    return convert


def _retention(value: object) -> float | None:
    if value is None or value == "" or value == "forever":
        return None
    return _duration(60.0, 100 * 365 * 86400.0)(value)


def _optional_path(value: object) -> str | None:
    return None if value is None or value == "" else converters.absolute_path(value)


def _optional_name(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: expected a host name")
    return value


def _metrics_listen(value: object) -> tuple[str, int] | None:
    return None if value is None or value == "" else converters.host_port(value)


def _max_batch(value: object) -> int:
    return converters.positive_int(value, hi=4096)


def _database(value: object) -> str:
    url = check_url(value)
    if "://" not in url or url.startswith("sqlite:"):
        from hostagent.collector.store import sqlite_path

        path = sqlite_path(url)
        if not os.path.isabs(path):
            raise ValueError(f"{value!r}: a SQLite path must be absolute in the config "
                             "(sqlite:///var/lib/...)")
    return url


def _schema() -> _Section:
    return _Section({
        "agents": _ListOf(agent_address),
        "discovery": _Section({"dns": _ListOf(dns_target),
                               "files": _ListOf(converters.absolute_path),
                               "interval": _duration(1.0, 86400.0)}),
        "tls": _Section({"ca": _optional_path, "cert": _optional_path, "key": _optional_path,
                         "serverName": _optional_name}),
        "database": _database,
        "retention": _Section({"maxAge": _retention, "interval": _duration(1.0, 86400.0)}),
        "maxBatch": _max_batch,
        "probeInterval": _duration(1.0, 3600.0),
        "metrics": _Section({"listen": _metrics_listen}),
        "logLevel": converters.log_level,
    })


_ATTRS = {"agents": "agents", "discovery.dns": "discover_dns",
          "discovery.files": "discover_files", "discovery.interval": "discovery_interval",
          "tls.ca": "tls.ca", "tls.cert": "tls.cert", "tls.key": "tls.key",
          "tls.serverName": "tls.server_name", "database": "database",
          "retention.maxAge": "retention", "retention.interval": "retention_interval",
          "maxBatch": "max_batch", "probeInterval": "probe_interval",
          "metrics.listen": "metrics_listen", "logLevel": "log_level"}
# flags that add to a list rather than replace it
_APPEND = ("agents", "discovery.dns", "discovery.files")


def load_config(path: str | None, overrides: Mapping[str, object] | None = None,
                flag_names: Mapping[str, str] | None = None) -> CollectorConfig:
    """The file at ``path`` (None: defaults), then ``overrides`` (dotted keys as in the file,
    values as YAML would hold them; None = not given; list keys add to the file's list).
    Raises ConfigError ("file:line: key: what is wrong")."""
    schema = _schema()
    source = os.fspath(path) if path is not None else None
    values = _load_file(source, schema) if source is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is None or value == [] or value == ():
            continue
        label = (flag_names or {}).get(dotted) or dotted
        spec = schema
        for part in dotted.split("."):
            spec = spec.fields[part]

        def fail(p, msg, label=label):
            return ConfigError(f"{label}: {msg}", key=dotted)

        checked = _check(value, spec, tuple(dotted.split(".")), fail)
        if dotted in _APPEND:
            checked = tuple(dict.fromkeys((*values.get(dotted, ()), *checked)))
        values[dotted] = checked
    top: dict[str, object] = {}
    tls: dict[str, object] = {}
    for dotted, value in values.items():
        attr = _ATTRS[dotted]
        if attr.startswith("tls."):
            tls[attr[4:]] = value
        else:
            top[attr] = value
    cfg = CollectorConfig(**top, tls=TlsConfig(**tls), source=source)
    where = source or "collector config"
    if bool(cfg.tls.cert) != bool(cfg.tls.key):
        raise ConfigError(f"{where}: tls: cert and key go together (mutual TLS)")
    if cfg.tls.cert and not cfg.tls.ca:
        raise ConfigError(f"{where}: tls: cert/key need ca: mutual TLS is on top of TLS")
    return cfg

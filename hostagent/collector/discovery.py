"""Where the agents are: a static list, DNS names, and files of addresses.

Each source answers ``addresses()``: the set it names now. The collector asks every second and
streams from the union; a source that fails (DNS down, file unreadable) keeps its last good
answer, so a lookup failure never disconnects a working stream.

- DNS: a name resolved to all its A and AAAA records (a Kubernetes headless Service of the
  agent DaemonSet has one per node), re-resolved every ``interval`` seconds.
- File: one address a line (``#`` comments, blank lines ignored), read again when the file
  changes (a ConfigMap mount, or a list kept by configuration management).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from hostagent.collector.config import agent_address

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]


def resolve_all(name: str, port: int) -> list[str]:
    """Every address of ``name`` (A and AAAA), via the system resolver."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StaticSource:
    def __init__(self, addresses: tuple[str, ...]) -> None:
        self._addresses = frozenset(addresses)

    def addresses(self) -> frozenset[str]:
        return self._addresses

    def due(self) -> None:
        """Look again at the next addresses() (SIGHUP)."""

    def __repr__(self) -> str:
        return "static list"


class DnsSource:
    def __init__(self, name: str, port: int, interval: float,
                 resolver: Resolver = resolve_all, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.name, self.port, self.interval = name, port, interval
        self._resolver, self._clock = resolver, clock
        self._next = 0.0
        self._addresses: frozenset[str] = frozenset()
        self.failures = 0

    def addresses(self) -> frozenset[str]:
        now = self._clock()
        if now >= self._next:
            self._next = now + self.interval
            try:
                found = frozenset(_join(a, self.port) for a in self._resolver(self.name,
                                                                              self.port))
            except OSError as err:
                self.failures += 1
                log.warning("discovery: %s: %s (keeping %d addresses)", self.name,
                            getattr(err, "strerror", None) or err, len(self._addresses))
                return self._addresses
            if found != self._addresses:
                log.info("discovery: %s: %d agents (%s)", self.name, len(found),
                         ", ".join(sorted(found)))
            self._addresses = found
        return self._addresses

    def due(self) -> None:
        self._next = 0.0

    def __repr__(self) -> str:
        return f"DNS {self.name}:{self.port}"


class FileSource:
    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple | None = None
        self._addresses: frozenset[str] = frozenset()
        self.failures = 0

    def addresses(self) -> frozenset[str]:
        try:
            st = os.stat(self.path)
        except OSError as err:
            if self._stamp != ("missing",):
                log.warning("discovery: %s: %s (keeping %d addresses)", self.path,
                            err.strerror, len(self._addresses))
                self._stamp = ("missing",)
                self.failures += 1
            return self._addresses
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return self._addresses
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            log.warning("discovery: %s: %s", self.path, err)
            self.failures += 1
            return self._addresses
        found, bad = set(), []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                found.add(agent_address(line))
            except ValueError as err:
                bad.append(f"{self.path}:{number}: {err}")
        for msg in bad:
            log.warning("discovery: %s (line ignored)", msg)
        self._stamp = stamp
        if frozenset(found) != self._addresses:
            log.info("discovery: %s: %d agents", self.path, len(found))
        self._addresses = frozenset(found)
        return self._addresses

    def due(self) -> None:
        self._stamp = None

    def __repr__(self) -> str:
        return f"file {self.path}"


def sources_of(cfg) -> list:
    out: list = []
    if cfg.agents:
        out.append(StaticSource(cfg.agents))
    out += [DnsSource(name, port, cfg.discovery_interval) for name, port in cfg.discover_dns]
    out += [FileSource(path) for path in cfg.discover_files]
    return out

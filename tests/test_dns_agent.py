"""The node resolver end to end: real queries from processes in governed cgroups, redirected by
the kernel to the agent's resolver, forwarded to an authoritative server the test runs on
loopback; then real connects to what the answers opened.

Every query is addressed to a decoy nameserver on loopback (127.0.0.99:53) that fails the test
if anything reaches it: an answer that arrives anyway came through the redirect.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.dnszone import DnsZone
from tests.harness import wait_for

pytestmark = pytest.mark.privileged

DECOY = "127.0.0.99"


class Decoy:
    """Something at the address workloads think is their nameserver, counting what reaches it."""

    def __init__(self, host: str = DECOY, port: int = 53) -> None:
        self.hits = 0
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.udp.bind((host, port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, port))
        self.tcp.listen(16)
        self._stop = False
        for target in (self._udp_loop, self._tcp_loop):
            threading.Thread(target=target, daemon=True).start()

    def _udp_loop(self) -> None:
        while True:
            try:
                self.udp.recvfrom(65535)
            except OSError:
                return
            self.hits += 1

    def _tcp_loop(self) -> None:
        while True:
            try:
                c, _ = self.tcp.accept()
            except OSError:
                return
            self.hits += 1
            c.close()

    def close(self) -> None:
        # shutdown wakes the threads blocked in accept/recv; close alone would not free the port
        for sock in (self.udp, self.tcp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class Holder:
    """A TCP server of the test's that keeps connections open (for "open connections keep
    working")."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.conns = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._read, args=(c,), daemon=True).start()

    def _read(self, c) -> None:
        while True:
            try:
                data = c.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.received += len(data)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def zone():
    with DnsZone() as z:
        yield z


@pytest.fixture
def decoy():
    d = Decoy()
    yield d
    d.close()


def fqdn_policy(name: str, cgroup: str, peers: str, port: int, mode: str = "enforce") -> str:
    return f"""apiVersion: hostagent.io/v1
kind: EgressPolicy
metadata: {{name: {name}}}
spec:
  selector: {{cgroupPath: "{cgroup}"}}
  mode: {mode}
  egress:
    - name: api
      to:
{peers}
      ports: [{{port: {port}, protocol: TCP}}]
"""


# The default rebindProtect without 127.0.0.0/8: the test's "public" servers live on loopback.
REBIND = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10",
          "fc00::/7", "fe80::/10", "::1/128"]


def start(node, zone, **dns):
    host, port = zone.address
    node.write_config(dns={"listen": "127.0.0.1:0", "upstreams": [f"{host}:{port}"],
                           "upstreamTimeout": 1, "rebindProtect": REBIND, **dns})
    return node.start_agent()


def query(w, name, **kw):
    return w.do("dns", server=kw.pop("server", DECOY), name=name, **kw)


@pytest.fixture
def ports(node):
    """Two listeners on 127.0.0.10, in a process no policy governs."""
    w = node.workload(None)
    return {"good": w.do("listen_tcp", host="127.0.0.10")["port"],
            "other": w.do("listen_tcp", host="127.0.0.10")["port"]}


def test_allowed_name_is_answered_through_the_redirect_and_opens_only_its_ports(
        node, zone, decoy, ports):
    zone.add("api.test", "A", "127.0.0.10", ttl=60)
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: api.test",
                                       ports["good"]))
    start(node, zone)
    w = node.workload("agent")

    # before any answer, the address is closed to the workload
    assert w.verdict("connect", host="127.0.0.10", port=ports["good"]) == "EPERM"
    r = query(w, "api.test")
    assert (r["rcode"], r["ips"]) == ("NOERROR", ["127.0.0.10"])
    assert decoy.hits == 0
    assert w.verdict("connect", host="127.0.0.10", port=ports["good"]) == "ok"
    assert w.verdict("connect", host="127.0.0.10", port=ports["other"]) == "EPERM"

    # the allowance is the querying workload's, not its policy's
    sibling = node.workload("agent/sibling")
    assert sibling.verdict("connect", host="127.0.0.10", port=ports["good"]) == "EPERM"

    e = node.wait_event(kind="dns", verdict="allow", query__name="api.test")
    assert e["policy"] == "agent" and e["rule"] == "api"
    assert e["workload"]["cgroup_path"] == "/agent"
    assert e["answers"][0]["ip"] == "127.0.0.10"


def test_denied_name_is_refused_and_never_reaches_upstream(node, zone, decoy):
    zone.add("secret.test", "A", "127.0.0.11")
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: api.test", 443))
    start(node, zone)
    w = node.workload("agent")
    r = query(w, "secret.test")
    assert r["rcode"] == "REFUSED"
    assert zone.count("secret.test") == 0
    e = node.wait_event(kind="dns", verdict="deny", query__name="secret.test")
    assert e["reason"] == "policy_default" and e["workload"]["cgroup_path"] == "/agent"
    assert decoy.hits == 0

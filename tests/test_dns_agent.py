"""The node resolver end to end: real queries from processes in governed cgroups, redirected by
the kernel to the agent's resolver, forwarded to an authoritative server the test runs on
loopback; then real connects to what the answers opened.

Every query is addressed to a decoy nameserver on loopback (127.0.0.99:53) that fails the test
if anything reaches it: an answer that arrives anyway came through the redirect.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.dnszone import DnsZone
from tests.harness import REPO, wait_for

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


def test_tcp_queries_and_truncated_answers_are_redirected_and_governed_alike(node, zone, decoy):
    zone.add("api.test", "A", "127.0.0.10")
    zone.big("big.test", 80)
    node.write_policy("p", fqdn_policy("agent", "/agent",
                                       "        - fqdn: api.test\n        - fqdn: big.test", 443))
    start(node, zone)
    w = node.workload("agent")
    r = query(w, "api.test", tcp=True)
    assert (r["rcode"], r["ips"], r["tcp"]) == ("NOERROR", ["127.0.0.10"], True)
    r = query(w, "big.test")          # UDP answer truncated, the stub retries over TCP
    assert r["rcode"] == "NOERROR" and r["tcp"] is True and len(r["ips"]) == 80
    assert query(w, "other.test", tcp=True)["rcode"] == "REFUSED"
    assert zone.count("other.test") == 0
    assert decoy.hits == 0


def test_a_connected_udp_socket_sees_its_own_nameserver_as_peer_and_source(node, zone, decoy):
    zone.add("api.test", "A", "127.0.0.10")
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: api.test", 443))
    start(node, zone)
    w = node.workload("agent")
    r = w.do("dns_connected_udp", server=DECOY, name="api.test")
    assert r["peer"] == [DECOY, 53] and r["source"] == [DECOY, 53]
    assert r["id_ok"] and r["ips"] == ["127.0.0.10"]
    assert decoy.hits == 0


def test_an_ipv6_nameserver_is_redirected_or_refused_never_reached(node, zone, ports):
    zone.add("api.test", "A", "127.0.0.10")
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: api.test",
                                       ports["good"]))
    start(node, zone)
    w = node.workload("agent")
    # connected (glibc) and TCP: the IPv4 resolver, through its IPv4-mapped address
    r = w.do("dns_connected_udp", server="::1", name="api.test")
    assert r["peer"] == ["::1", 53] and r["source"] == ["::1", 53] and r["ips"] == ["127.0.0.10"]
    assert query(w, "api.test", server="::1", tcp=True)["ips"] == ["127.0.0.10"]
    assert w.verdict("connect", host="::ffff:127.0.0.10", port=ports["good"]) == "ok"
    # unconnected sendto: the kernel cannot rewrite it to an IPv4 resolver, so it is refused
    assert w.verdict("udp_sendto", host="::1", port=53) == "EPERM"
    node.wait_event(verdict="deny", reason="dns_redirect", hook="sendmsg6")


def test_workloads_no_policy_governs_keep_their_own_resolver(node, zone, decoy):
    start(node, zone)
    w = node.workload("free")
    assert query(w, "api.test", timeout=1)["errno"] == "TIMEOUT"  # the decoy never answers
    wait_for(lambda: decoy.hits >= 1, 5, "the query at the decoy")


def test_a_source_port_another_workload_takes_over_is_attributed_to_it(node, zone, decoy):
    """The resolver remembers who sent from each source address and port
    (hostagent.fqdn.SenderTable) and answers repeats without parsing them
    (hostagent.dns.hot): a byte-identical query from the same port, now another workload's
    socket, is still judged for that workload."""
    zone.add("api.test", "A", "127.0.0.10")
    node.write_policy("a", fqdn_policy("agent", "/agent", "        - fqdn: api.test", 443))
    node.write_policy("b", fqdn_policy("other", "/other", "        - fqdn: b.test", 443))
    start(node, zone, emitAllowed=False)
    agent, other = node.workload("agent"), node.workload("other")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    same = {"source_port": port, "id": 4242}
    for _ in range(3):
        assert query(agent, "api.test", **same)["rcode"] == "NOERROR"
    assert query(other, "api.test", **same)["rcode"] == "REFUSED"
    e = node.wait_event(kind="dns", verdict="deny", query__name="api.test")
    assert e["workload"]["cgroup_path"] == "/other"
    assert query(agent, "api.test", **same)["ips"] == ["127.0.0.10"]
    # the agent's repeats were answered hot: the check above ran on the hot path's table
    wait_for(lambda: (node.status().get("dns") or {}).get("resolver", {}).get("hot_hits", 0)
             >= 3, 5, "hot hits in status")
    assert zone.count("api.test") == 1 and decoy.hits == 0


def test_a_query_the_kernel_did_not_see_leave_a_workload_is_refused(node, zone):
    zone.add("api.test", "A", "127.0.0.10")
    start(node, zone)
    host, port = wait_for(lambda: (node.status().get("dns") or {}).get("listen"), 5,
                          "status").rsplit(":", 1)
    # the test process is outside the governed root: no skb record names it
    r = dns.query.udp(dns.message.make_query("api.test", "A"), host, port=int(port), timeout=3)
    assert r.rcode() == dns.rcode.REFUSED
    assert zone.count("api.test") == 0
    node.wait_event(kind="dns", reason="unattributed")


def test_addresses_close_when_ttl_and_grace_run_out_but_open_connections_stay(node, zone):
    holder = Holder("127.0.0.10")
    try:
        zone.add("api.test", "A", "127.0.0.10", ttl=1)
        node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: api.test",
                                           holder.port))
        start(node, zone, ttl={"min": 1, "max": 60, "grace": 1})
        w = node.workload("agent")
        assert query(w, "api.test")["ips"] == ["127.0.0.10"]
        w.do("connect_hold", host="127.0.0.10", port=holder.port, name="c")
        assert w.verdict("connect", host="127.0.0.10", port=holder.port) == "ok"
        # closed by the kernel itself once TTL + grace have passed (the sweep only frees memory)
        wait_for(lambda: w.verdict("connect", host="127.0.0.10", port=holder.port) == "EPERM",
                 6, "the allowance to expire")
        w.do("held_send", name="c")
        wait_for(lambda: holder.received >= len(b"still open"), 5, "data on the open connection")
        # answering again opens it again
        assert query(w, "api.test")["ips"] == ["127.0.0.10"]
        assert w.verdict("connect", host="127.0.0.10", port=holder.port) == "ok"
    finally:
        holder.close()


def test_rebinding_answers_are_dropped_unless_the_policy_allows_the_range(node, zone):
    zone.add("inside.test", "A", "10.1.2.3")
    zone.add("meta.test", "A", "169.254.169.254")
    zone.add("lab.test", "A", "192.168.7.7")
    peers = ("        - fqdn: inside.test\n        - fqdn: meta.test\n"
             "        - fqdn: lab.test\n        - cidr: 192.168.7.0/24")
    node.write_policy("p", fqdn_policy("agent", "/agent", peers, 443))
    start(node, zone)
    w = node.workload("agent")
    for name in ("inside.test", "meta.test"):
        r = query(w, name)
        assert r["rcode"] == "NOERROR" and r["ips"] == [], name
        e = node.wait_event(kind="dns", query__name=name, reason="rebinding")
        assert e["dropped"] and e["answers"] == []
    assert query(w, "lab.test")["ips"] == ["192.168.7.7"]   # the policy names that range


def test_every_name_of_a_cname_chain_must_be_allowed(node, zone, ports):
    zone.add("api.test", "A", "127.0.0.10")
    zone.add("alias.test", "CNAME", "api.test")
    zone.add("sneaky.test", "CNAME", "evil.test")
    zone.add("evil.test", "A", "127.0.0.10")
    peers = "        - fqdn: alias.test\n        - fqdn: api.test"
    node.write_policy("p", fqdn_policy("agent", "/agent", peers, ports["good"]))
    node.write_policy("q", fqdn_policy("agent2", "/agent2", "        - fqdn: sneaky.test",
                                       ports["good"]))
    start(node, zone)
    w = node.workload("agent")
    assert query(w, "alias.test")["ips"] == ["127.0.0.10"]
    assert w.verdict("connect", host="127.0.0.10", port=ports["good"]) == "ok"
    other = node.workload("agent2")
    assert query(other, "sneaky.test")["rcode"] == "REFUSED"
    node.wait_event(kind="dns", query__name="sneaky.test", reason="cname_not_allowed")
    assert other.verdict("connect", host="127.0.0.10", port=ports["good"]) == "EPERM"


def test_patterns_match_subdomains_not_the_apex(node, zone):
    for name in ("a.svc.test", "b.c.svc.test", "svc.test", "evilsvc.test"):
        zone.add(name, "A", "127.0.0.10")
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdnPattern: '*.svc.test'",
                                       443))
    start(node, zone)
    w = node.workload("agent")
    assert query(w, "a.svc.test")["rcode"] == "NOERROR"
    assert query(w, "B.C.SVC.TEST.")["rcode"] == "NOERROR"
    assert query(w, "svc.test")["rcode"] == "REFUSED"
    assert query(w, "evilsvc.test")["rcode"] == "REFUSED"


def test_tunnel_shaped_queries_get_nothing_through(node, zone):
    import base64
    import os

    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdnPattern: '*.tun.test'",
                                       443))
    start(node, zone)
    w = node.workload("agent")
    refused = 0
    for i in range(12):   # iodine-style: base32 payload in long labels
        label = base64.b32encode(os.urandom(35)).decode().rstrip("=").lower()
        refused += query(w, f"{label}.{i}.tun.test")["rcode"] == "REFUSED"
    assert refused == 12
    assert zone.count() == 0
    e = node.wait_event(kind="dns", reason="tunnel")
    assert e["workload"]["cgroup_path"] == "/agent"


def test_encrypted_dns_needs_a_rule_naming_it(node, zone):
    ns = node.namespace(["1.1.1.1"])
    server = node.workload(None, ns)
    doh = server.do("listen_tcp", host="1.1.1.1", port=443)["port"]
    dot = server.do("listen_tcp", host="127.0.0.5", port=853)["port"]
    zone.add("dns.quad9.net", "A", "127.0.0.10")
    node.write_policy("p", fqdn_policy("agent", "/agent", """        - cidr: 0.0.0.0/0
        - fqdnPattern: '*.quad9.net'""", 443) + """    - name: dot
      to: [{cidr: 127.0.0.0/8}]
      ports: [{port: 853}]
""")
    start(node, zone)
    w = node.workload("agent", ns)
    assert w.verdict("connect", host="1.1.1.1", port=doh) == "EPERM"
    assert w.verdict("connect", host="127.0.0.5", port=dot) == "EPERM"
    e = node.wait_event(verdict="deny", reason="encrypted_dns", destination__ip="1.1.1.1")
    assert e["workload"]["cgroup_path"] == "/agent"
    assert server.do("counts")["accepted"].get(f"tcp:1.1.1.1:{doh}", 0) == 0
    # named explicitly, both open
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - cidr: 1.1.1.1/32", 443)
                      + """    - name: dot
      to: [{cidr: 127.0.0.5/32}]
      ports: [{port: 853}]
""")
    wait_for(lambda: w.verdict("connect", host="1.1.1.1", port=doh) == "ok", 10, "reload")
    assert w.verdict("connect", host="127.0.0.5", port=dot) == "ok"


def test_encrypted_dns_names_need_the_exact_fqdn(node, zone):
    zone.add("dns.quad9.net", "A", "127.0.0.10")
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdnPattern: '*.quad9.net'",
                                       443))
    start(node, zone)
    w = node.workload("agent")
    assert query(w, "dns.quad9.net")["rcode"] == "REFUSED"
    node.wait_event(kind="dns", query__name="dns.quad9.net", reason="encrypted_dns")
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: dns.quad9.net", 443))
    wait_for(lambda: query(w, "dns.quad9.net")["rcode"] == "NOERROR", 10, "reload")


def test_connection_events_name_what_the_address_was_resolved_from(node, zone, ports):
    zone.add("api.test", "A", "127.0.0.10")
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: api.test",
                                       ports["good"]))
    start(node, zone)
    w = node.workload("agent")
    query(w, "api.test")
    assert w.verdict("connect", host="127.0.0.10", port=ports["other"]) == "EPERM"
    e = node.wait_event(verdict="deny", destination__port=ports["other"])
    assert e["destination"]["name"] == "api.test"


def test_a_policy_edit_closes_what_it_no_longer_allows(node, zone, ports):
    zone.add("api.test", "A", "127.0.0.10")
    zone.add("b.test", "A", "127.0.0.10")
    node.write_policy("p", fqdn_policy("agent", "/agent",
                                       "        - fqdn: api.test", ports["good"]))
    start(node, zone)
    w = node.workload("agent")
    query(w, "api.test")
    assert w.verdict("connect", host="127.0.0.10", port=ports["good"]) == "ok"
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: b.test",
                                       ports["good"]))
    wait_for(lambda: w.verdict("connect", host="127.0.0.10", port=ports["good"]) == "EPERM",
             10, "the reload to close api.test's address")
    assert query(w, "api.test")["rcode"] == "REFUSED"


def test_audit_mode_answers_and_reports_names_it_would_refuse(node, zone):
    zone.add("api.test", "A", "127.0.0.10")
    node.write_policy("p", fqdn_policy("agent", "/agent", "        - fqdn: other.test", 443,
                                       mode="audit"))
    start(node, zone)
    w = node.workload("agent")
    assert query(w, "api.test")["ips"] == ["127.0.0.10"]
    e = node.wait_event(kind="dns", query__name="api.test")
    assert e["verdict"] == "audit" and e["reason"] == "policy_default"


def test_pods_in_their_own_netns_reach_a_link_local_resolver(node):
    """A Kubernetes-shaped node: the agent in the node's namespace listens on 169.254.20.10
    (a dummy interface it creates), a pod's namespace routes to the node over a veth, and the
    pod's queries to any nameserver are redirected there and answered by policy."""
    host, pod = node.namespace([]), node.namespace([])
    subprocess.run(["ip", "-n", host.name, "link", "add", "hv0", "type", "veth", "peer", "name",
                    "pv0", "netns", pod.name], check=True)
    for ns, dev, addr in ((host, "hv0", "10.199.0.1/30"), (pod, "pv0", "10.199.0.2/30")):
        subprocess.run(["ip", "-n", ns.name, "addr", "add", addr, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns.name, "link", "set", dev, "up"], check=True)
    subprocess.run(["ip", "-n", pod.name, "route", "add", "default", "via", "10.199.0.1"],
                   check=True)
    node.write_policy("p", fqdn_policy("pod", "/pod", "        - fqdn: allowed.example", 443))
    # lo: this kernel has no dummy interfaces (a node with them gets dns.interface's dummy)
    node.write_config(dns={"listen": "169.254.20.10:53", "upstreams": ["127.0.0.1:9"],
                           "upstreamTimeout": 0.3, "interface": "lo"})
    w = node.workload("pod", pod)
    node.start_agent(netns=host)
    def shown():
        return subprocess.run(["ip", "-n", host.name, "-o", "addr", "show", "dev", "lo"],
                              capture_output=True, text=True, check=True).stdout
    assert "169.254.20.10/32" in shown()
    # the pod asks a nameserver of its own; the kernel sends it to the node's resolver
    assert query(w, "blocked.example", server="192.0.2.53")["rcode"] == "REFUSED"
    e = node.wait_event(kind="dns", query__name="blocked.example")
    assert e["verdict"] == "deny" and e["workload"]["cgroup_path"] == "/pod"
    assert e["client"]["ip"] == "10.199.0.2"
    # an allowed name reaches the (unreachable) upstream: SERVFAIL, never an open fallback
    assert query(w, "allowed.example", server="192.0.2.53")["rcode"] == "SERVFAIL"
    # uninstall removes the address the agent added
    node.agents[-1].stop()
    out = subprocess.run(["nsenter", f"--net=/run/netns/{host.name}", sys.executable, "-m",
                          "hostagent",
                          "uninstall", "--config", str(node.config_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert "removed 169.254.20.10 from lo" in out.stdout, out.stderr
    assert "169.254.20.10" not in shown() and "127.0.0.1/8" in shown()

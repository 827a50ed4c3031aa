"""A test workload: joins a network namespace and a cgroup, then does what the test asks.

Run as `python workload_child.py CGROUP_DIR|- NETNS|-`; reads one JSON command per line on
stdin and answers one JSON line: {"ok": true, ...} or {"errno": "EPERM"}. Kept free of
hostagent imports: it is the thing being judged, not part of the agent.
"""

import ctypes
import errno
import json
import os
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000
MSG_FASTOPEN = 0x20000000


def setns(name):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)


def join_cgroup(path):
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


class Listeners:
    def __init__(self):
        self.accepted = {}
        self.received = {}
        self.socks = []
        self.held = {}

    def tcp(self, host, port):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(512)
        key = f"tcp:{host}:{s.getsockname()[1]}"
        self.accepted[key] = 0

        def loop():
            while True:
                try:
                    c, _ = s.accept()
                except OSError:
                    return
                self.accepted[key] += 1
                c.close()

        threading.Thread(target=loop, daemon=True).start()
        self.socks.append(s)
        return s.getsockname()[1]

    def udp(self, host, port):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((host, port))
        key = f"udp:{host}:{s.getsockname()[1]}"
        self.received[key] = 0

        def loop():
            while True:
                try:
                    s.recv(2048)
                except OSError:
                    return
                self.received[key] += 1

        threading.Thread(target=loop, daemon=True).start()
        self.socks.append(s)
        return s.getsockname()[1]


def dns_query(cmd):
    """A real stub query with dnspython, which (like glibc) rejects answers whose source is not
    the server it asked: an answer proves the kernel showed the reply as coming from there."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode

    q = dns.message.make_query(cmd["name"], cmd.get("type", "A"))
    if "id" in cmd:
        q.id = cmd["id"]
    server, port = cmd["server"], cmd.get("port", 53)
    source_port = cmd.get("source_port", 0)
    try:
        if cmd.get("tcp"):
            r = dns.query.tcp(q, server, port=port, timeout=cmd.get("timeout", 3))
            tcp = True
        else:
            r, tcp = dns.query.udp_with_fallback(q, server, port=port,
                                                 timeout=cmd.get("timeout", 3),
                                                 source_port=source_port)
    except dns.exception.Timeout:
        return {"ok": False, "errno": "TIMEOUT"}
    ips = [rd.address for rrset in r.answer for rd in rrset if hasattr(rd, "address")]
    ttls = [rrset.ttl for rrset in r.answer]
    return {"rcode": dns.rcode.to_text(r.rcode()), "ips": ips, "ttls": ttls, "tcp": tcp}


def dns_connected_udp(cmd):
    """What glibc does: connect() a UDP socket to the nameserver, send, recvfrom, and compare
    the reply's source; getpeername() must name the nameserver too."""
    import dns.message

    q = dns.message.make_query(cmd["name"], "A")
    s = socket.socket(family(cmd["server"]), socket.SOCK_DGRAM)
    s.settimeout(cmd.get("timeout", 3))
    try:
        s.connect((cmd["server"], cmd.get("port", 53)))
        peer = s.getpeername()
        s.send(q.to_wire())
        data, source = s.recvfrom(65535)
    finally:
        s.close()
    r = dns.message.from_wire(data)
    return {"peer": list(peer[:2]), "source": list(source[:2]), "id_ok": r.id == q.id,
            "ips": [rd.address for rrset in r.answer for rd in rrset if hasattr(rd, "address")]}


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def run(cmd, listeners):
    op = cmd["op"]
    if op == "connect":
        s = socket.socket(family(cmd["host"]), socket.SOCK_STREAM)
        s.settimeout(cmd.get("timeout", 5))
        try:
            s.connect((cmd["host"], cmd["port"]))
        finally:
            s.close()
        return {}
    if op == "connect_many":
        results = {}
        for _ in range(cmd["count"]):
            s = socket.socket(family(cmd["host"]), socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect((cmd["host"], cmd["port"]))
                r = "ok"
            except OSError as e:
                r = errno.errorcode.get(e.errno, str(e.errno))
            finally:
                s.close()
            results[r] = results.get(r, 0) + 1
        return {"results": results}
    if op == "fastopen":
        s = socket.socket(family(cmd["host"]), socket.SOCK_STREAM)
        try:
            s.sendto(b"x", MSG_FASTOPEN, (cmd["host"], cmd["port"]))
        finally:
            s.close()
        return {}
    if op == "udp_sendto":
        s = socket.socket(family(cmd["host"]), socket.SOCK_DGRAM)
        try:
            s.sendto(b"probe", (cmd["host"], cmd["port"]))
        finally:
            s.close()
        return {}
    if op == "udp_connect_send":
        s = socket.socket(family(cmd["host"]), socket.SOCK_DGRAM)
        try:
            s.connect((cmd["host"], cmd["port"]))
            s.send(b"probe")
        finally:
            s.close()
        return {}
    if op == "raw_socket":
        kinds = {"raw_icmp": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                 "raw_tcp": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
                 "raw6_icmp": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
                 "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)}
        s = socket.socket(*kinds[cmd["kind"]])
        s.close()
        return {}
    if op == "raw_send":
        # a hand-made ICMP echo through a raw socket: what a tunnel would do
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            s.sendto(b"\x08\x00\xf7\xff\x00\x00\x00\x00", (cmd["host"], 0))
        finally:
            s.close()
        return {}
    if op == "connect_after_move":
        # socket() here, then move to another cgroup, then connect: the socket keeps its creator's
        s = socket.socket(family(cmd["host"]), socket.SOCK_STREAM)
        try:
            join_cgroup(cmd["cgroup"])
            s.settimeout(cmd.get("timeout", 5))
            s.connect((cmd["host"], cmd["port"]))
        finally:
            s.close()
        return {}
    if op == "udp_send_after_move":
        s = socket.socket(family(cmd["host"]), socket.SOCK_DGRAM)
        try:
            join_cgroup(cmd["cgroup"])
            s.sendto(b"probe", (cmd["host"], cmd["port"]))
        finally:
            s.close()
        return {}
    if op == "recv_fd_listen":
        # accept one unix connection and keep the socket it carries (SCM_RIGHTS)
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        u.bind(cmd["path"])
        u.listen(1)

        def take():
            c, _ = u.accept()
            _, fds, _, _ = socket.recv_fds(c, 16, 1)
            listeners.received_fd = fds[0]
            c.close()
            u.close()

        listeners.fd_thread = threading.Thread(target=take, daemon=True)
        listeners.fd_thread.start()
        return {}
    if op == "send_new_socket":
        s = socket.socket(family(cmd["host"]), socket.SOCK_DGRAM if cmd.get("udp") else socket.SOCK_STREAM)
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            u.connect(cmd["path"])
            socket.send_fds(u, [b"x"], [s.fileno()])
        finally:
            u.close()
            s.close()
        return {}
    if op == "use_received":
        listeners.fd_thread.join(5)
        s = socket.socket(fileno=listeners.received_fd)
        try:
            if s.type == socket.SOCK_DGRAM:
                s.sendto(b"probe", (cmd["host"], cmd["port"]))
            else:
                s.settimeout(cmd.get("timeout", 5))
                s.connect((cmd["host"], cmd["port"]))
        finally:
            s.close()
        return {}
    if op == "mkdir_join":
        os.makedirs(cmd["path"], exist_ok=True)
        join_cgroup(cmd["path"])
        return {}
    if op == "dns":
        return dns_query(cmd)
    if op == "dns_connected_udp":
        return dns_connected_udp(cmd)
    if op == "connect_hold":
        s = socket.socket(family(cmd["host"]), socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect((cmd["host"], cmd["port"]))
        listeners.held[cmd["name"]] = s
        return {}
    if op == "exchange":
        # send, half-close, read the reply to its end: a whole TCP conversation
        s = socket.create_connection((cmd["host"], cmd["port"]), timeout=5)
        s.sendall(b"x" * cmd["send"])
        s.shutdown(socket.SHUT_WR)
        got = 0
        while chunk := s.recv(65536):
            got += len(chunk)
        s.close()
        return {"received": got}
    if op == "held_send":
        listeners.held[cmd["name"]].sendall(b"still open")
        return {}
    if op == "listen_tcp":
        return {"port": listeners.tcp(cmd["host"], cmd.get("port", 0))}
    if op == "listen_udp":
        return {"port": listeners.udp(cmd["host"], cmd.get("port", 0))}
    if op == "counts":
        return {"accepted": listeners.accepted, "received": listeners.received}
    if op == "pid":
        return {"pid": os.getpid()}
    raise ValueError(f"unknown op {op}")


def main():
    cgroup, netns = sys.argv[1], sys.argv[2]
    if netns != "-":
        setns(netns)
    if cgroup != "-":
        join_cgroup(cgroup)
    listeners = Listeners()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = {"ok": True, **run(cmd, listeners)}
        except TimeoutError:
            reply = {"ok": False, "errno": "TIMEOUT"}
        except OSError as e:
            reply = {"ok": False, "errno": errno.errorcode.get(e.errno, str(e.errno))}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()

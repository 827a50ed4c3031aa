"""Workload identity: SPIFFE IDs, process details and the cgroup -> workload resolver.

Nothing is mocked. ProcessCache reads real child processes; the resolver's Kubernetes side is a
real PodWatcher talking HTTP to tests/kubeapi.py. Expected workloads are written out whole, so a
field set where it should not be fails as loudly as one that is missing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import queue
import shutil
import subprocess
import threading
import time
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostagent.identity.kube import PodWatcher, make_api_client
from hostagent.identity.process import (
    MAX_CMDLINE_ARGS,
    MAX_CMDLINE_CHARS,
    ProcessCache,
    ProcessInfo,
    _parse_stat,
    _Stat,
    truncate_cmdline,
)
from hostagent.identity.resolver import IdentityResolver, Workload
from hostagent.identity.spiffe import (
    DEFAULT_CONTAINER_TEMPLATE,
    DEFAULT_UNIT_TEMPLATE,
    MAX_ID_BYTES,
    encode_segment,
    pod_id,
    render,
    validate_template,
    validate_trust_domain,
)
from tests.kubeapi import FakeKubeAPI, wait_for

TD = "cluster.local"
NODE = "node-a"
TOKEN = "t0ken"

UID1 = "5f0e2b4a-8c1d-4e7f-9a3b-6d2c1e0f4a5b"
UID2 = "0b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4"
UID3 = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
UID4 = "11111111-2222-4333-8444-555555555555"   # not in the API until a test adds it
CID1, CID2, CID3, CID4, CID5, CID6 = (hashlib.sha256(n).hexdigest()
                                      for n in (b"app", b"sidecar", b"worker", b"db", b"docker",
                                                b"podman"))


def underscored(uid: str) -> str:
    return uid.replace("-", "_")


# ------------------------------------------------------------------------------------------
# SPIFFE: trust domains


@pytest.mark.parametrize("td", ["cluster.local", "example.org", "a", "prod_eu-1.example.com",
                                "x" * 255])
def test_trust_domain_accepts(td):
    assert validate_trust_domain(td) == td


@pytest.mark.parametrize("td, message", [
    ("", "empty"),
    ("Example.org", "must be lower case ('example.org')"),
    ("spiffe://example.org/", "without the spiffe:// scheme (for example 'example.org')"),
    ("example.org:8443", "found ':'"),
    ("user@example.org", "found '@'"),
    ("exa mple", "found ' '"),
    ("bücher.example", "found 'ü'"),
    ("x" * 256, "at most 255"),
    (None, "must be a string"),
])
def test_trust_domain_rejects_with_a_reason(td, message):
    with pytest.raises(ValueError) as err:
        validate_trust_domain(td)
    assert message in str(err.value)
    assert str(err.value).startswith(repr(td))


# ------------------------------------------------------------------------------------------
# SPIFFE: templates


@pytest.mark.parametrize("template, kind", [
    (DEFAULT_UNIT_TEMPLATE, "unit"),
    (DEFAULT_CONTAINER_TEMPLATE, "container"),
    ("spiffe://{trustDomain}/host/{node}/{slice}/{unit}", "unit"),
    ("spiffe://{trustDomain}/cg/{cgroupPath}", "unit"),
    ("spiffe://{trustDomain}/cg/{cgroupPath}", "container"),
    ("spiffe://{trustDomain}/rt/{runtime}/id-{containerId}.v1", "container"),
    ("spiffe://{trustDomain}/n-{node}/u_{unit}", "unit"),
])
def test_template_accepts(template, kind):
    assert validate_template(template, kind) == template


@pytest.mark.parametrize("template, kind, message", [
    ("spiffe://{trustDomain}/x/{podName}/{unit}", "unit", "unknown placeholder {podName}"),
    ("spiffe://{trustDomain}/x/{containerID}", "container", "did you mean {containerId}?"),
    ("spiffe://{trustDomain}/x/{unit}", "container",
     "placeholder {unit} is not available in a container template"),
    ("spiffe://{trustDomain}/x/{slice}/{containerId}", "container",
     "placeholder {slice} is not available in a container template"),
    ("spiffe://{trustDomain}/x/{containerId}", "unit",
     "placeholder {containerId} is not available in a unit template"),
    ("spiffe://{trustDomain}/x/{runtime}/{unit}", "unit",
     "placeholder {runtime} is not available in a unit template"),
    ("spiffe://example.org/{unit}", "unit", "must start with 'spiffe://{trustDomain}/'"),
    ("https://{trustDomain}/{unit}", "unit", "must start with 'spiffe://{trustDomain}/'"),
    ("{trustDomain}/{unit}", "unit", "must start with"),
    ("spiffe://{trustDomain}/", "unit", "has no path"),
    ("spiffe://{trustDomain}/unit/{unit}/", "unit", "empty path segment"),
    ("spiffe://{trustDomain}//{unit}", "unit", "empty path segment"),
    ("spiffe://{trustDomain}/a@{unit}", "unit", "may not contain: '@'"),
    ("spiffe://{trustDomain}/a%20/{unit}", "unit", "may not contain: '%'"),
    ("spiffe://{trustDomain}/./{unit}", "unit", "dot segment"),
    ("spiffe://{trustDomain}/../{unit}", "unit", "dot segment"),
    ("spiffe://{trustDomain}/{unit", "unit", "unbalanced brace"),
    ("spiffe://{trustDomain}/unit}/{unit}", "unit", "unbalanced brace"),
    ("spiffe://{trustDomain}/x{cgroupPath}", "unit", "must be a whole segment"),
    ("spiffe://{trustDomain}/{node}_{unit}", "unit", "more than one placeholder"),
    ("spiffe://{trustDomain}/{node}{unit}", "unit", "more than one placeholder"),
    ("spiffe://{trustDomain}/node/{node}", "unit", "must use {unit} or {cgroupPath}"),
    ("spiffe://{trustDomain}/node/{node}/{runtime}", "container",
     "must use {containerId} or {cgroupPath}"),
    ("spiffe://{trustDomain}/" + "a" * MAX_ID_BYTES + "/{unit}", "unit", "longer than 2048"),
    (DEFAULT_UNIT_TEMPLATE, "pod", "must be 'unit' or 'container'"),
    (42, "unit", "must be a string"),
    (["spiffe://{trustDomain}/{unit}"], "unit", "must be a string"),
    (DEFAULT_UNIT_TEMPLATE, ["unit"], "must be 'unit' or 'container'"),
])
def test_template_rejects_with_a_reason(template, kind, message):
    with pytest.raises(ValueError) as err:
        validate_template(template, kind)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------
# SPIFFE: encoding and rendering


@pytest.mark.parametrize("value, segment", [
    ("nginx.service", "nginx.service"),
    ("Web_API-v2.1", "Web_API-v2.1"),
    ("getty@tty1.service", "getty%40tty1.service"),
    # systemd's escapes are encoded as spelled (backslash included), never unescaped first
    ("systemd-fsck@dev-disk-by\\x2duuid-1a2b.service",
     "systemd-fsck%40dev-disk-by%5Cx2duuid-1a2b.service"),
    ("a\\x2db.service", "a%5Cx2db.service"),
    ("100%", "100%25"),             # '%' itself is encoded: the encoding stays injective
    ("a~b", "a%7Eb"),               # unreserved in RFC 3986, but not a SPIFFE path character
    ("a b/c:d", "a%20b%2Fc%3Ad"),
    ("é", "%C3%A9"),                # UTF-8 bytes, upper-case hex
    (".", "%2E"),                   # dot segments would be resolved away
    ("..", "%2E%2E"),
    ("...", "..."),
])
def test_encode_segment(value, segment):
    assert encode_segment(value) == segment
    assert urllib.parse.unquote(segment) == value


@given(st.text(min_size=1, max_size=40))
def test_encode_segment_is_a_valid_segment_and_decodes_back(value):
    segment = encode_segment(value)
    assert segment not in (".", "..")
    assert all(c.isascii() and (c.isalnum() or c in "._-%") for c in segment)
    # decodable to the value, so two different values never share a segment
    assert urllib.parse.unquote(segment, errors="strict") == value


def test_render_defaults():
    assert render(DEFAULT_UNIT_TEMPLATE, trustDomain=TD, node=NODE, unit="getty@tty1.service",
                  slice="system-getty.slice", cgroupPath="/x") == \
        "spiffe://cluster.local/node/node-a/unit/getty%40tty1.service"
    assert render(DEFAULT_CONTAINER_TEMPLATE, trustDomain=TD, node=NODE, containerId=CID5,
                  runtime="docker", cgroupPath="/x") == \
        f"spiffe://cluster.local/node/node-a/container/{CID5}"


def test_render_cgroup_path_is_one_segment_per_level():
    template = "spiffe://{trustDomain}/cg/{cgroupPath}"
    assert render(template, trustDomain=TD,
                  cgroupPath="/system.slice/system-getty.slice/getty@tty1.service") == \
        "spiffe://cluster.local/cg/system.slice/system-getty.slice/getty%40tty1.service"
    assert render(template, trustDomain=TD, cgroupPath="/") is None


def test_render_unknown_values_give_no_id():
    template = "spiffe://{trustDomain}/host/{node}/{slice}/{unit}"
    assert render(template, trustDomain=TD, node=NODE, unit="x.service", slice=None) is None
    assert render(template, trustDomain=TD, node=NODE, unit="x.service", slice="") is None
    long_unit = "u" * (MAX_ID_BYTES - 40) + ".service"
    assert render(template, trustDomain=TD, node=NODE, unit=long_unit, slice="s.slice") is None


def test_render_rejects_caller_errors():
    with pytest.raises(ValueError, match=r"no value for \{unit\}"):
        render(DEFAULT_UNIT_TEMPLATE, trustDomain=TD, node=NODE)
    with pytest.raises(ValueError, match="lower case"):
        render(DEFAULT_UNIT_TEMPLATE, trustDomain="Cluster.local", node=NODE, unit="x.service")
    with pytest.raises(ValueError, match=r"no value for \{trustDomain\}"):
        render(DEFAULT_UNIT_TEMPLATE, node=NODE, unit="x.service")


def test_pod_id_is_the_kubernetes_convention():
    assert pod_id(TD, "shop", "web") == "spiffe://cluster.local/ns/shop/sa/web"
    assert pod_id("prod.example.com", "kube-system", "coredns") == \
        "spiffe://prod.example.com/ns/kube-system/sa/coredns"
    assert pod_id(TD, "", "web") is None


# ------------------------------------------------------------------------------------------
# ProcessCache against real processes


@pytest.fixture
def spawn():
    """spawn(*argv, **popen) -> a running child; all are killed and reaped at teardown."""
    children: list[subprocess.Popen] = []

    def _spawn(*argv: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(list(argv), **kw)
        children.append(p)
        # the child is ours from fork; wait until it has exec'd argv[0]. exec names the task
        # (comm) before it sets up the new argument pages: until then cmdline reads empty
        name = os.path.basename(argv[0])[:15]
        wait_for(lambda: _comm(p.pid) == name and _cmdline(p.pid), 5.0, f"{argv[0]} to start")
        return p

    yield _spawn
    for p in children:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdin is not None:
            p.stdin.close()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


SLEEP = os.path.realpath(shutil.which("sleep") or "/bin/sleep")


def test_lookup_reads_a_real_process(spawn):
    p = spawn("sleep", "30")
    cache = ProcessCache()
    before = time.time()
    info = cache.lookup(p.pid, "sleep")
    assert info is not None
    assert (info.pid, info.exe, info.cmdline, info.ppid, info.matches_kernel) == \
        (p.pid, SLEEP, ("sleep", "30"), os.getpid(), True)
    assert info.started is not None and before - 10 < info.started <= time.time() + 1
    assert cache.lookup(p.pid, "sleep") is info          # a hit returns the cached value
    assert cache.lookup(p.pid) is info                   # no comm: nothing to compare
    assert cache.stats == {"hits": 2, "misses": 1, "evictions": 0, "gone": 0, "reused": 0,
                           "mismatched": 0}


def test_comm_mismatch_is_flagged_not_hidden(spawn):
    p = spawn("sleep", "30")
    cache = ProcessCache()
    info = cache.lookup(p.pid, "curl")
    assert info is not None and info.matches_kernel is False
    assert info.exe == SLEEP                             # the details are still given
    # the flag belongs to that lookup, not to the cached entry
    assert cache.lookup(p.pid, "sleep").matches_kernel is True
    # the kernel's comm arrives NUL-padded to 16 bytes
    assert cache.lookup(p.pid, "sleep\x00\x00\x00").matches_kernel is True
    assert cache.stats["mismatched"] == 1


def test_thread_name_is_compared_when_the_tid_is_given():
    libc = ctypes.CDLL(None, use_errno=True)
    named = threading.Event()
    done = threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        libc.prctl(15, b"hostagent-wkr", 0, 0, 0)        # PR_SET_NAME: this thread only
        named.set()
        done.wait(10)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        assert named.wait(5)
        cache = ProcessCache()
        pid = os.getpid()
        assert cache.lookup(pid, "hostagent-wkr", tid=tid[0]).matches_kernel is True
        assert cache.lookup(pid, "hostagent-wkr").matches_kernel is False
        assert cache.lookup(pid, "other", tid=tid[0]).matches_kernel is False
    finally:
        done.set()
        t.join(5)


def test_exec_since_the_lookup_is_noticed(spawn):
    p = spawn("sh", "-c", "read line; exec sleep 30", stdin=subprocess.PIPE)
    cache = ProcessCache()
    shell = cache.lookup(p.pid, "sh")
    assert shell.exe == os.path.realpath(shutil.which("sh"))
    assert shell.cmdline == ("sh", "-c", "read line; exec sleep 30")
    p.stdin.write(b"go\n")
    p.stdin.flush()
    wait_for(lambda: _comm(p.pid) == "sleep" and _cmdline(p.pid).startswith(b"sleep"), 5.0,
             "the exec")
    info = cache.lookup(p.pid, "sleep")                  # within the TTL, yet read again
    assert (info.exe, info.cmdline, info.matches_kernel) == (SLEEP, ("sleep", "30"), True)
    assert info.started == shell.started                 # same process, new program
    # an event from before the exec, looked up after it: flagged
    assert cache.lookup(p.pid, "sh").matches_kernel is False


def test_gone_processes_and_pid_0_give_none(spawn):
    p = spawn("sleep", "30")
    cache = ProcessCache()
    assert cache.lookup(p.pid, "sleep") is not None
    p.kill()
    p.wait()
    assert cache.lookup(p.pid, "sleep") is None          # at once, not after the TTL
    assert len(cache) == 0
    assert cache.stats["gone"] == 1
    assert cache.lookup(0) is None
    assert cache.lookup(-1) is None
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
        beyond = int(f.read()) + 1                       # no process can have this pid
    assert cache.lookup(beyond, "x") is None


def test_zombie_gives_none(spawn):
    p = spawn("sleep", "30")
    cache = ProcessCache()
    p.kill()
    wait_for(lambda: _state(p.pid) == "Z", 5.0, "the child to be a zombie")
    assert cache.lookup(p.pid, "sleep") is None
    p.wait()


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return None


def test_a_reused_pid_never_gets_the_previous_process_details(spawn):
    """Pid reuse cannot be forced: plant an entry whose start time is another process's."""
    p = spawn("sleep", "30")
    cache = ProcessCache()
    info = cache.lookup(p.pid, "sleep")
    entry = cache._entries[p.pid]
    cache._entries[p.pid] = dataclasses.replace(
        entry, start_ticks=entry.start_ticks - 1,
        info=dataclasses.replace(info, exe="/usr/sbin/previous-owner", cmdline=("prev",)))
    again = cache.lookup(p.pid, "sleep")
    assert (again.exe, again.cmdline) == (SLEEP, ("sleep", "30"))
    assert cache.stats["reused"] == 1


def test_details_read_while_the_pid_changed_hands_are_dropped(spawn):
    """The miss path re-checks the start time after psutil's reads."""
    p = spawn("sleep", "30")
    cache = ProcessCache()
    now = cache._stat(p.pid)
    assert now is not None and now.comm == "sleep" and now.state in "SR"
    assert cache._fetch(p.pid, now) is not None
    seen_by_kernel = _Stat(start_ticks=now.start_ticks + 1, comm="sleep", state="S")
    assert cache._fetch(p.pid, seen_by_kernel) is None


def test_stat_parsing_takes_comm_up_to_the_last_paren():
    rest = b" ".join(b"%d" % n for n in range(4, 53))    # fields 4..52: field n holds n
    stat = _parse_stat(b"42 (a) (b) c) S " + rest + b"\n")
    assert stat == _Stat(start_ticks=22, comm="a) (b) c", state="S")
    assert _parse_stat(b"42 (x) S 1 2") is None
    assert _parse_stat(b"garbage") is None


def test_cache_is_bounded(spawn):
    children = [spawn("sleep", "30") for _ in range(5)]
    cache = ProcessCache(max_entries=3)
    for p in children:
        assert cache.lookup(p.pid, "sleep") is not None
    assert len(cache) == 3
    assert cache.stats["evictions"] == 2
    cache.lookup(children[-1].pid, "sleep")              # still cached: a hit
    assert cache.stats["hits"] == 1
    cache.lookup(children[0].pid, "sleep")               # evicted first: read again
    assert cache.stats["misses"] == 6
    assert len(cache) == 3


def test_ttl_bounds_reuse_of_details(spawn):
    p = spawn("sleep", "30")
    clock = [100.0]
    cache = ProcessCache(ttl=10.0, clock=lambda: clock[0])
    first = cache.lookup(p.pid, "sleep")
    clock[0] += 9.9
    assert cache.lookup(p.pid, "sleep") is first
    clock[0] += 0.1
    again = cache.lookup(p.pid, "sleep")
    assert again is not first and again == first
    assert (cache.stats["hits"], cache.stats["misses"]) == (1, 2)


def test_command_lines_are_bounded(spawn):
    p = spawn("sleep", "30", *["0"] * 40)                # GNU sleep sums its arguments
    info = ProcessCache().lookup(p.pid, "sleep")
    assert info.cmdline == ("sleep", "30", *["0"] * (MAX_CMDLINE_ARGS - 2))
    q = spawn("sleep", "0" * 1000 + "30")
    info = ProcessCache().lookup(q.pid, "sleep")
    assert info.cmdline == ("sleep", "0" * (MAX_CMDLINE_CHARS - len("sleep")))
    assert truncate_cmdline(["a" * 300, "b" * 300, "c"]) == ("a" * 300, "b" * 212)
    assert truncate_cmdline([]) == ()


def test_process_cache_rejects_bad_bounds():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            ProcessCache(max_entries=bad)
    for bad in (-1.0, float("nan"), "30"):
        with pytest.raises(ValueError):
            ProcessCache(ttl=bad)


def test_process_info_defaults_to_matching():
    info = ProcessInfo(pid=1, exe=None, cmdline=(), ppid=None, started=None)
    assert info.matches_kernel is True


# ------------------------------------------------------------------------------------------
# IdentityResolver with a real PodWatcher

P1_POD = ("/kubepods.slice/kubepods-burstable.slice/"
          f"kubepods-burstable-pod{underscored(UID1)}.slice")
P1_APP = f"{P1_POD}/cri-containerd-{CID1}.scope"
P1_SIDECAR = f"{P1_POD}/cri-containerd-{CID2}.scope"
P2_WORKER = f"/kubepods/besteffort/pod{UID2}/{CID3}"          # cgroupfs: bare id, no runtime
P3_DB = f"/kubepods/pod{UID3}/crio-{CID4}"                   # cgroupfs guaranteed, CRI-O
P3_CONMON = f"/kubepods/pod{UID3}/crio-conmon-{CID4}"
P4_POD = f"/kubepods.slice/kubepods-pod{underscored(UID4)}.slice"
P4_APP = f"{P4_POD}/cri-containerd-{CID5}.scope"

WEB_LABELS = (("app", "web"), ("tier", "front"))
WEB = dict(namespace="shop", pod="web-0", pod_uid=UID1, service_account="web",
           labels=WEB_LABELS, spiffe_id="spiffe://cluster.local/ns/shop/sa/web")
JOB = dict(namespace="batch", pod="job-1", pod_uid=UID2, service_account="default",
           labels=(("job", "nightly"),), spiffe_id="spiffe://cluster.local/ns/batch/sa/default")
DB = dict(namespace="data", pod="db-0", pod_uid=UID3, service_account="postgres",
          labels=(), spiffe_id="spiffe://cluster.local/ns/data/sa/postgres")


def unit_id(unit: str) -> str:
    return f"spiffe://cluster.local/node/node-a/unit/{unit}"


# (path, cgroup id, expected workload); identified with the watcher knowing pods 1-3
WITH_KUBERNETES = [
    (P1_POD, 10, Workload(10, P1_POD, "pod", **WEB,
                          unit=f"kubepods-burstable-pod{underscored(UID1)}.slice")),
    (P1_APP, 11, Workload(11, P1_APP, "container", **WEB, container="app", container_id=CID1,
                          runtime="containerd", unit=f"cri-containerd-{CID1}.scope")),
    (P1_SIDECAR, 12, Workload(12, P1_SIDECAR, "container", **WEB, container="sidecar",
                              container_id=CID2, runtime="containerd",
                              unit=f"cri-containerd-{CID2}.scope")),
    # nested below a container: the container's identity, its own path and id
    (P1_APP + "/app/worker", 13, Workload(13, P1_APP + "/app/worker", "container", **WEB,
                                          container="app", container_id=CID1,
                                          runtime="containerd",
                                          unit=f"cri-containerd-{CID1}.scope")),
    # the path does not name the runtime: the API's containerID scheme does
    (P2_WORKER, 20, Workload(20, P2_WORKER, "container", **JOB, container="worker",
                             container_id=CID3, runtime="containerd")),
    (P3_DB, 30, Workload(30, P3_DB, "container", **DB, container="db", container_id=CID4,
                         runtime="cri-o")),
    # CRI-O's monitor goes with the container it watches
    (P3_CONMON, 31, Workload(31, P3_CONMON, "container", **DB, container="db",
                             container_id=CID4, runtime="cri-o")),
    # not pods: the watcher plays no part, and nothing is pending
    ("/system.slice/nginx.service", 40,
     Workload(40, "/system.slice/nginx.service", "service", unit="nginx.service",
              spiffe_id=unit_id("nginx.service"))),
    ("/system.slice/system-getty.slice/getty@tty1.service", 41,
     Workload(41, "/system.slice/system-getty.slice/getty@tty1.service", "service",
              unit="getty@tty1.service", spiffe_id=unit_id("getty%40tty1.service"))),
    ("/system.slice/nginx.service/worker", 42,
     Workload(42, "/system.slice/nginx.service/worker", "service", unit="nginx.service",
              spiffe_id=unit_id("nginx.service"))),
    ("/user.slice/user-1000.slice/session-3.scope", 43,
     Workload(43, "/user.slice/user-1000.slice/session-3.scope", "scope",
              unit="session-3.scope", spiffe_id=unit_id("session-3.scope"))),
    ("/user.slice/user-1000.slice/user@1000.service", 44,
     Workload(44, "/user.slice/user-1000.slice/user@1000.service", "service",
              unit="user@1000.service", spiffe_id=unit_id("user%401000.service"))),
    # inside a user manager: the user's names, the user manager's ID
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/sshd.service", 45,
     Workload(45, "/user.slice/user-1000.slice/user@1000.service/app.slice/sshd.service",
              "service", unit="sshd.service", spiffe_id=unit_id("user%401000.service"))),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID6}.scope", 46,
     Workload(46, f"/user.slice/user-1000.slice/user@1000.service/user.slice/"
                  f"libpod-{CID6}.scope", "container", container_id=CID6, runtime="podman",
              unit=f"libpod-{CID6}.scope", spiffe_id=unit_id("user%401000.service"))),
    # containers outside Kubernetes
    (f"/system.slice/docker-{CID5}.scope", 50,
     Workload(50, f"/system.slice/docker-{CID5}.scope", "container", container_id=CID5,
              runtime="docker", unit=f"docker-{CID5}.scope",
              spiffe_id=f"spiffe://cluster.local/node/node-a/container/{CID5}")),
    (f"/docker/{CID5}", 51,
     Workload(51, f"/docker/{CID5}", "container", container_id=CID5, runtime="docker",
              spiffe_id=f"spiffe://cluster.local/node/node-a/container/{CID5}")),
    (f"/machine.slice/libpod-{CID6}.scope/container", 52,
     Workload(52, f"/machine.slice/libpod-{CID6}.scope/container", "container",
              container_id=CID6, runtime="podman", unit=f"libpod-{CID6}.scope",
              spiffe_id=f"spiffe://cluster.local/node/node-a/container/{CID6}")),
    # slices and plain cgroups: no SPIFFE ID
    ("/system.slice", 60, Workload(60, "/system.slice", "slice", unit="system.slice")),
    ("/system.slice/not-a-unit", 61,
     Workload(61, "/system.slice/not-a-unit", "slice", unit="system.slice")),
    ("/kubepods.slice/kubepods-burstable.slice", 62,
     Workload(62, "/kubepods.slice/kubepods-burstable.slice", "slice",
              unit="kubepods-burstable.slice")),
    ("/", 1, Workload(1, "/", "cgroup")),
    ("/kubepods/burstable", 63, Workload(63, "/kubepods/burstable", "cgroup")),
    ("/hostagent-test/app", 64, Workload(64, "/hostagent-test/app", "cgroup")),
]


@pytest.fixture
def api():
    with FakeKubeAPI(token=TOKEN) as server:
        for ns in ("default", "shop", "batch", "data"):
            server.add_namespace(ns)
        server.add_pod("shop", "web-0", node=NODE, uid=UID1, service_account="web",
                       labels={"tier": "front", "app": "web"},
                       containers=[("app", f"containerd://{CID1}"),
                                   ("sidecar", f"containerd://{CID2}")])
        server.add_pod("batch", "job-1", node=NODE, uid=UID2, labels={"job": "nightly"},
                       containers=[("worker", f"containerd://{CID3}")])
        server.add_pod("data", "db-0", node=NODE, uid=UID3, service_account="postgres",
                       containers=[("db", f"cri-o://{CID4}")])
        # another node's pod: never this node's business
        server.add_pod("shop", "web-9", node="node-b",
                       containers=[("app", f"containerd://{CID6}")])
        yield server


@pytest.fixture
def changes():
    """The watcher's on_change, as the agent wires it: uids queued for the main thread."""
    return queue.Queue()


@pytest.fixture
def watcher(api, changes, tmp_path):
    client = make_api_client(api.kubeconfig(tmp_path / "kubeconfig", token=TOKEN))
    w = PodWatcher(client, NODE, changes.put, resync_backoff=(0.05, 0.2),
                   watch_timeout_seconds=1)
    w.start()
    try:
        assert w.wait_synced(5.0), (w.state, w.last_error)
        yield w
    finally:
        w.stop(timeout=2.0)
        client.close()


def resolver(pods=None, **kw) -> IdentityResolver:
    args = dict(node_name=NODE, trust_domain=TD, unit_template=DEFAULT_UNIT_TEMPLATE,
                container_template=DEFAULT_CONTAINER_TEMPLATE, pods=pods)
    args.update(kw)
    return IdentityResolver(**args)


def wait_change(changes: queue.Queue, uid: str, until) -> None:
    """Take on_change calls (the agent's main loop, in short) until one names uid once
    until() holds. The initial list's call may still be queued, naming every pod; the watcher
    updates its cache before calling on_change, so once until() holds the change is visible."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            uids = changes.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no on_change for {uid}") from None
        if uid in uids and until():
            return


def test_identify_real_layouts_with_kubernetes(watcher):
    r = resolver(watcher)
    assert r.kubernetes_state == "synced"
    for path, cgroup_id, expected in WITH_KUBERNETES:
        assert r.identify(path, cgroup_id) == expected, path
    assert r.cached() == len(WITH_KUBERNETES)


def test_identify_without_kubernetes_reads_the_path_only():
    r = resolver()
    assert r.kubernetes_state == "disabled"
    assert r.identify(P1_APP, 11) == Workload(
        11, P1_APP, "container", pod_uid=UID1, container_id=CID1, runtime="containerd",
        unit=f"cri-containerd-{CID1}.scope")
    assert r.identify(P2_WORKER, 20) == Workload(20, P2_WORKER, "container", pod_uid=UID2,
                                                 container_id=CID3)
    # everything that is not a pod is identified exactly as with Kubernetes
    for path, cgroup_id, expected in WITH_KUBERNETES:
        if expected.pod_uid is None:
            assert r.identify(path, cgroup_id) == expected, path


def test_pending_pod_is_filled_in_when_the_pod_arrives(api, watcher, changes):
    r = resolver(watcher)
    nested = P4_APP + "/sub"
    pending = {
        P4_POD: Workload(70, P4_POD, "pod", pod_uid=UID4, pending=True,
                         unit=f"kubepods-pod{underscored(UID4)}.slice"),
        P4_APP: Workload(71, P4_APP, "container", pod_uid=UID4, container_id=CID5,
                         runtime="containerd", unit=f"cri-containerd-{CID5}.scope",
                         pending=True),
        nested: Workload(72, nested, "container", pod_uid=UID4, container_id=CID5,
                         runtime="containerd", unit=f"cri-containerd-{CID5}.scope",
                         pending=True),
    }
    for path, expected in pending.items():
        assert r.identify(path, expected.cgroup_id) == expected
    r.identify(P1_APP, 11)

    # the API server catches up with kubelet: the pod arrives through the watch
    api.add_pod("shop", "web-1", node=NODE, uid=UID4, labels={"app": "api"},
                containers=[("app", f"containerd://{CID5}")])
    wait_change(changes, UID4, lambda: watcher.pod(UID4) is not None)
    assert r.pods_changed({UID4}) == set(pending)
    known = dict(namespace="shop", pod="web-1", service_account="default",
                 labels=(("app", "api"),), spiffe_id="spiffe://cluster.local/ns/shop/sa/default",
                 pending=False)
    for path, before in pending.items():
        after = r.identify(path, before.cgroup_id)
        container = "app" if before.container_id else None
        assert after == dataclasses.replace(before, **known, container=container)

    # deleted: pending again (the cgroups outlive the pod object for a moment)
    api.delete_pod(UID4)
    wait_change(changes, UID4, lambda: watcher.pod(UID4) is None)
    assert r.pods_changed({UID4}) == set(pending)
    assert r.identify(P4_APP, 71) == pending[P4_APP]


def test_label_change_is_seen_after_pods_changed(api, watcher, changes):
    r = resolver(watcher)
    before = r.identify(P1_APP, 11)
    assert before.labels == WEB_LABELS
    r.identify(P1_POD, 10)
    r.identify(P3_DB, 30)
    api.update_pod(UID1, labels={"app": "web", "tier": "back"})
    wait_change(changes, UID1, lambda: dict(watcher.pod(UID1).labels)["tier"] == "back")
    assert r.identify(P1_APP, 11) is before               # cached until told
    assert r.pods_changed({UID1, UID2}) == {P1_APP, P1_POD}   # UID2: no cgroup seen
    after = r.identify(P1_APP, 11)
    assert after == dataclasses.replace(before, labels=(("app", "web"), ("tier", "back")))
    hits = r.stats["hits"]
    r.identify(P3_DB, 30)                                 # another pod: still cached
    assert r.stats["hits"] == hits + 1


def test_cache_follows_cgroup_ids_and_removals():
    r = resolver()
    first = r.identify("/system.slice/nginx.service", 40)
    assert r.identify("/system.slice/nginx.service", 40) is first
    assert r.stats == {"hits": 1, "misses": 1, "evictions": 0}
    # removed and made again: another cgroup, same name
    again = r.identify("/system.slice/nginx.service", 41)
    assert again == dataclasses.replace(first, cgroup_id=41)
    r.identify(P1_APP, 11)
    assert r.cached() == 2
    r.forget(P1_APP)
    r.forget("/never/seen")
    assert r.cached() == 1
    assert r.pods_changed({UID1}) == set()


def test_cache_is_bounded_and_its_pod_index_too():
    r = resolver(max_entries=3)
    r.identify(P1_APP, 11)
    r.identify(P2_WORKER, 20)
    r.identify("/system.slice/a.service", 1)
    r.identify(P2_WORKER, 20)                             # used: moves to the back
    r.identify("/system.slice/b.service", 2)              # evicts P1_APP, the oldest
    assert r.cached() == 3
    assert r.stats["evictions"] == 1
    assert r.pods_changed({UID1}) == set()
    assert r.pods_changed({UID2}) == {P2_WORKER}
    r.identify("/system.slice/c.service", 3)
    r.identify("/system.slice/d.service", 4)
    assert r.cached() == 3
    assert r.pods_changed({UID2}) == set()


def test_custom_templates():
    r = resolver(unit_template="spiffe://{trustDomain}/host/{node}/{slice}/{unit}",
                 container_template="spiffe://{trustDomain}/rt/{runtime}/{containerId}")
    assert r.identify("/system.slice/system-getty.slice/getty@tty1.service", 1).spiffe_id == \
        "spiffe://cluster.local/host/node-a/system-getty.slice/getty%40tty1.service"
    assert r.identify("/init.scope", 2).spiffe_id is None      # no slice above it
    assert r.identify(f"/docker/{CID5}", 3).spiffe_id == \
        f"spiffe://cluster.local/rt/docker/{CID5}"
    by_path = resolver(unit_template="spiffe://{trustDomain}/cg/{cgroupPath}")
    # nested: the anchor's path, not the names the workload made below it
    assert by_path.identify("/system.slice/nginx.service/worker", 4).spiffe_id == \
        "spiffe://cluster.local/cg/system.slice/nginx.service"


def test_as_event_has_every_field():
    w = Workload(11, P1_APP, "container", **WEB, container="app", container_id=CID1,
                 runtime="containerd", unit=f"cri-containerd-{CID1}.scope")
    assert w.as_event() == {
        "kind": "container", "namespace": "shop", "pod": "web-0", "pod_uid": UID1,
        "container": "app", "container_id": CID1, "runtime": "containerd",
        "service_account": "web",
        "labels": {"app": "web", "tier": "front"}, "unit": f"cri-containerd-{CID1}.scope",
        "spiffe_id": "spiffe://cluster.local/ns/shop/sa/web", "cgroup_path": P1_APP,
        "cgroup_id": 11, "pending": False,
    }
    plain = Workload(1, "/", "cgroup").as_event()
    assert plain == {"kind": "cgroup", "namespace": None, "pod": None, "pod_uid": None,
                     "container": None, "container_id": None, "runtime": None,
                     "service_account": None, "pending": False,
                     "labels": {}, "unit": None, "spiffe_id": None, "cgroup_path": "/",
                     "cgroup_id": 1}


@pytest.mark.parametrize("kw, message", [
    ({"trust_domain": "Cluster.local"}, "lower case"),
    ({"unit_template": "spiffe://{trustDomain}/{containerId}"}, "not available in a unit"),
    ({"container_template": DEFAULT_UNIT_TEMPLATE}, "not available in a container"),
    ({"node_name": ""}, "node name"),
    ({"max_entries": 0}, "max_entries"),
])
def test_resolver_rejects_bad_configuration(kw, message):
    with pytest.raises(ValueError, match=message):
        resolver(**kw)

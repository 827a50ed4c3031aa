"""packaging/install.sh on this machine, from a clean state, into a temporary root; then the agent
started exactly as the installed unit's ExecStart= says, under the unit's sandbox as far as it
can be reproduced without systemd, enforcing in a test cgroup.

systemd is not PID 1 on the project's machines, so the unit cannot be started by systemd here.
What is reproduced instead: ExecStartPre= (with full privileges, as its "+" says), ExecStart=
under the unit's CapabilityBoundingSet= and NoNewPrivileges= (setpriv) and its mount sandbox
(ProtectSystem=strict with ReadWritePaths=, ProtectHome=, ProtectKernelTunables=,
ProtectControlGroups=, PrivateDevices=: a private mount namespace, unshare), then
ExecStartPost= with $MAINPID. The agent's config is the test's (tests/harness.py TestNode:
cgroupRoot is the test's cgroup, bpffsDir its own directory), written where the install put the
node config, so nothing attaches at the real cgroup root or touches /sys/fs/bpf/hostagent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

import hostagent
from tests.harness import wait_for
from tests.test_packaging import (IMDS, REPO, doc_lines, env_file, exec_argv, parse_unit,
                                  unit_value, unit_words)

INSTALL_TIMEOUT = 900   # seconds: a virtualenv and its wheels (from the pip cache when warm)

# The first test also pays for the module's install: more than the suite's default timeout.
pytestmark = [pytest.mark.privileged, pytest.mark.timeout(INSTALL_TIMEOUT + 300)]

# Sandbox settings reproduced below; the others need systemd itself (seccomp filters, private
# /tmp, user and clock restrictions) and are checked only by systemd-analyze verify.
EMULATED = {"ProtectSystem", "ReadWritePaths", "ProtectHome", "ProtectKernelTunables",
            "ProtectControlGroups", "PrivateDevices", "CapabilityBoundingSet", "NoNewPrivileges"}


# What install.sh reads from its checkout. The tests run it from a copy taken once, so that edits
# to the working tree while they run cannot change what "the same source" is.
CHECKOUT = ("packaging", "scripts", "hostagent", "bpf", "proto", "policies", "docs",
            "README.md", "pyproject.toml")


def frozen_checkout(dest: Path) -> Path:
    dest.mkdir()
    for name in CHECKOUT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


class Installed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.checkout = frozen_checkout(root / "checkout")
        self.prefix = root / "opt" / "hostagent"
        self.etc = root / "etc" / "hostagent"
        self.unit_dir = root / "etc" / "systemd" / "system"
        self.bin_dir = root / "usr" / "local" / "bin"
        self.state = root / "var" / "lib" / "hostagent"
        self.logs = root / "var" / "log" / "hostagent"
        self.unit = self.unit_dir / "hostagent.service"
        self.output = ""

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "HOSTAGENT_PREFIX": str(self.prefix),
                "HOSTAGENT_ETC_DIR": str(self.etc), "HOSTAGENT_UNIT_DIR": str(self.unit_dir),
                "HOSTAGENT_BIN_DIR": str(self.bin_dir), "HOSTAGENT_STATE_DIR": str(self.state),
                "HOSTAGENT_LOG_DIR": str(self.logs)}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """packaging/install.sh as docs/deploy-vm.md says to run it, paths from the environment."""
        [command] = doc_lines("deploy-vm.md", r"^sudo packaging/install\.sh$")
        argv = shlex.split(command.removeprefix("sudo "))
        r = subprocess.run([str(self.checkout / argv[0]), *argv[1:], *args], env=self.env,
                           cwd=self.checkout, capture_output=True, text=True,
                           timeout=INSTALL_TIMEOUT)
        self.output = r.stdout + r.stderr
        return r


@pytest.fixture(scope="module")
def installed():
    root = Path(tempfile.mkdtemp(prefix="hostagent-install-"))
    inst = Installed(root)
    try:
        r = inst.run()
        assert r.returncode == 0, inst.output[-5000:]
        yield inst
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_install_from_a_clean_state(installed):
    i = installed
    version = hostagent.__version__
    assert "systemd is not running" in i.output and "not enabling or starting" in i.output
    current = i.prefix / "current"
    target = os.readlink(current)
    assert re.fullmatch(rf"versions/{re.escape(version)}-[0-9a-f]{{12}}", target)
    assert os.readlink(i.bin_dir / "hostagent") == str(current / "bin" / "hostagent")
    for rel in ("bin/hostagent", "bin/python", "libexec/hostagent-wait-ready",
                "share/hostagent/bpf/hostagent.c", "share/hostagent/bpf/lib/abi.h",
                "share/doc/hostagent/deploy-vm.md"):
        assert (current / rel).exists(), rel
    r = subprocess.run([str(i.bin_dir / "hostagent"), "--version"], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"hostagent {version}\n")
    r = subprocess.run([str(current / "bin" / "python"), "-c", "import bcc"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (i.etc / "hostagent.yaml").read_text() == (
        i.checkout / "packaging" / "hostagent.yaml").read_text()
    assert (i.etc / "policies" / "default.yaml").read_text() == (
        i.checkout / "policies" / "default.yaml").read_text()
    assert env_file(i.etc / "hostagent.env") == {"HOSTAGENT_ARGS": ""}
    # the unit names the paths it was installed to, and no default one
    unit = i.unit.read_text()
    for path in re.findall(r"(?<![\w/.-])/(?:opt|etc)/hostagent\S*", unit):
        pytest.fail(f"{path} in the installed unit: not rewritten to {i.root}")
    assert f"{i.prefix}/current/bin/hostagent run --config {i.etc}/hostagent.yaml" in unit


def test_installed_unit_passes_systemd_analyze_verify(installed):
    r = subprocess.run(["systemd-analyze", "verify", str(installed.unit)], capture_output=True,
                       text=True, timeout=120)
    about_unit = [line for line in (r.stdout + r.stderr).splitlines()
                  if "hostagent" in line]
    assert (r.returncode, about_unit) == (0, [])


# ---------------------------------------------------------------------------------------------
# the agent, as the unit runs it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sandboxed(unit: dict, argv: list[str], writable: list[str]) -> list[str]:
    """argv under the unit's capability and mount settings (the EMULATED ones)."""
    svc = unit["Service"]
    caps = unit_words(unit, "CapabilityBoundingSet")
    priv = ["setpriv", "--bounding-set=-all," + ",".join(
        "+" + c.lower().removeprefix("cap_") for c in caps), "--inh-caps=-all"]
    if unit_value(unit, "NoNewPrivileges") == "yes":
        priv.append("--no-new-privs")
    rw = unit_words(unit, "ReadWritePaths")
    sh = [f"mount --bind {shlex.quote(p)} {shlex.quote(p)}" for p in writable]
    if svc.get("PrivateDevices") == ["yes"]:   # before / is read-only: mktemp needs /tmp
        sh.append("d=$(mktemp -d) && mount -t tmpfs -o mode=755 tmpfs $d && "
                  "for n in null zero full random urandom tty; do touch $d/$n; "
                  "mount --bind /dev/$n $d/$n; done && mount --move $d /dev")
    if svc.get("ProtectSystem") == ["strict"]:
        sh.append("mount -o remount,bind,ro /")
    if svc.get("ProtectHome") == ["yes"]:
        sh.append("for d in /home /root /run/user; do [ -d $d ] && "
                  "mount -t tmpfs -o mode=000 tmpfs $d; done; true")
    if "yes" in svc.get("ProtectKernelTunables", []) + svc.get("ProtectControlGroups", []):
        # /sys (cgroupfs and bpffs included) and /proc/sys read-only, then ReadWritePaths= back
        sh.append("mount --bind /proc/sys /proc/sys")
        sh.append("for m in $(awk '$5 ~ \"^/sys($|/)\" || $5 == \"/proc/sys\" {print $5}' "
                  "/proc/self/mountinfo); do mount -o remount,bind,ro $m; done")
        sh += [f"mount -o remount,bind,rw {shlex.quote(p)}" for p in rw if p.startswith("/sys")]
    sh.append('exec "$@"')
    return ["unshare", "-m", "--propagation", "slave", "sh", "-ec", "\n".join(sh), "sandbox",
            *priv, "--", *argv]


class UnitProcess:
    """The installed unit's ExecStartPre=, ExecStart= and ExecStartPost=, as systemd runs them."""

    def __init__(self, installed: Installed, node) -> None:
        self.unit = parse_unit(installed.unit)
        sandbox = {k for k in self.unit["Service"] if k.startswith(("Protect", "Private",
                                                                    "ReadWrite"))}
        assert sandbox - EMULATED <= {"PrivateTmp", "ProtectKernelModules",
                                      "ProtectKernelLogs", "ProtectClock", "ProtectHostname"}
        env_path = unit_value(self.unit, "EnvironmentFile").lstrip("-")
        self.env = env_file(Path(env_path))
        self.node = node
        self.writable = [str(node.tmp)]
        self.log_path = node.tmp / "unit.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        _, pre = exec_argv(unit_value(self.unit, "ExecStartPre"), self.env)
        subprocess.run(pre, check=True, timeout=30)          # "+": not sandboxed
        _, argv = exec_argv(unit_value(self.unit, "ExecStart"), self.env)
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(sandboxed(self.unit, argv, self.writable),
                                     env={"PATH": os.environ["PATH"], **self.env},
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _, post = exec_argv(unit_value(self.unit, "ExecStartPost"),
                            {**self.env, "MAINPID": str(self.proc.pid)})
        r = subprocess.run(sandboxed(self.unit, post, self.writable), capture_output=True,
                           text=True, timeout=130)
        assert r.returncode == 0, f"{r.stderr}\nagent log:\n{self.log()[-4000:]}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int:
        """systemctl stop: SIGTERM to the main process (KillMode=mixed), then wait."""
        assert unit_value(self.unit, "KillMode") == "mixed"
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def agent_unit(installed, node):
    """The installed unit, its node config replaced by the test's (scoped to its cgroup)."""
    cfg = json.loads(node.config_path.read_text())
    cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}  # ExecStartPost= polls /readyz
    (installed.etc / "hostagent.yaml").write_text(json.dumps(cfg))
    unit = UnitProcess(installed, node)
    try:
        yield unit
    finally:
        unit.kill()


@pytest.fixture
def imds(node):
    ns = node.namespace([IMDS])
    server = node.workload(None, ns)
    server.do("listen_tcp", host=IMDS, port=80)
    server.ns = ns
    return server


CAP_NUMBERS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19,
               "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def assert_sandboxed(unit: UnitProcess) -> None:
    """The agent really runs under the emulated settings (not a no-op emulation)."""
    pid = unit.proc.pid
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    want = sum(1 << CAP_NUMBERS[c] for c in unit_words(unit.unit, "CapabilityBoundingSet"))
    assert int(status["CapBnd"], 16) == want
    assert int(status["CapEff"], 16) == want
    assert status["NoNewPrivs"].strip() == "1"
    opts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        opts[fields[4]] = fields[5].split(",")[0]
    assert opts["/"] == "ro"
    assert opts["/sys"] == "ro" and opts["/sys/fs/bpf"] == "rw"
    assert all(v == "ro" for k, v in opts.items() if k.startswith("/sys/fs/cgroup"))
    assert opts[str(unit.node.tmp)] == "rw"


def accepted(server) -> int:
    return server.do("counts")["accepted"].get(f"tcp:{IMDS}:80", 0)


def test_the_unit_enforces_survives_a_restart_and_is_taken_over(installed, agent_unit, node,
                                                                 imds):
    w = node.workload("app", imds.ns)
    agent_unit.start()
    assert_sandboxed(agent_unit)
    assert w.verdict("connect", host=IMDS, port=80) == "EPERM"
    assert accepted(imds) == 0
    e = node.wait_event(verdict="deny", reason="metadata_block")
    assert e["workload"]["cgroup_path"] == "/app"
    status = subprocess.run([str(installed.bin_dir / "hostagent"), "status", "--config",
                             str(installed.etc / "hostagent.yaml")], capture_output=True,
                            text=True, timeout=60)
    assert "agent:       running" in status.stdout, status.stdout + status.stderr

    # systemctl stop: the pinned programs keep enforcing
    assert agent_unit.stop() == 0
    assert w.verdict("connect", host=IMDS, port=80) == "EPERM"

    # systemctl start (or the restart of an upgrade): the new agent takes the pins over
    agent_unit.start()
    assert "replaced" in agent_unit.log()
    assert w.verdict("connect", host=IMDS, port=80) == "EPERM"
    assert accepted(imds) == 0
    assert agent_unit.stop() == 0


def test_running_the_install_again_is_an_idempotent_upgrade(installed):
    config = installed.etc / "hostagent.yaml"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    before = os.readlink(installed.prefix / "current")
    r = installed.run()
    assert r.returncode == 0, installed.output[-3000:]
    assert "is already built" in installed.output
    assert os.readlink(installed.prefix / "current") == before
    assert config.read_text().endswith("# edited by the operator\n")   # never overwritten


def test_a_config_the_new_version_rejects_switches_nothing(installed):
    config = installed.etc / "hostagent.yaml"
    good = config.read_text()
    unit_before = installed.unit.read_text()
    config.write_text("noSuchKey: 1\n")
    try:
        r = installed.run()
        assert r.returncode != 0
        assert "noSuchKey" in installed.output and "nothing was switched" in installed.output
        assert installed.unit.read_text() == unit_before
    finally:
        config.write_text(good)


def test_removal_keeps_or_removes_enforcement_as_asked(installed, agent_unit, node, imds):
    w = node.workload("app", imds.ns)
    agent_unit.start()
    assert agent_unit.stop() == 0
    saved = installed.root / "saved-prefix"
    shutil.copytree(installed.prefix, saved, symlinks=True)
    unit_text = installed.unit.read_text()

    r = installed.run("--uninstall", "--keep-enforcement")
    assert r.returncode == 0, installed.output
    assert not installed.prefix.exists() and not installed.unit.exists()
    assert not (installed.bin_dir / "hostagent").exists()
    assert (installed.etc / "hostagent.yaml").exists()
    assert w.verdict("connect", host=IMDS, port=80) == "EPERM"   # still enforced

    # put the same install back (same paths), then remove it for good
    shutil.move(saved, installed.prefix)
    installed.unit.write_text(unit_text)
    r = installed.run("--uninstall", "--purge")
    assert r.returncode == 0, installed.output
    assert "detached sock4_connect" in installed.output
    assert w.verdict("connect", host=IMDS, port=80) == "ok"       # enforcement removed
    wait_for(lambda: accepted(imds) == 1, 5, "the listener to count the connection")
    for path in (installed.prefix, installed.unit, installed.etc, installed.state):
        assert not path.exists(), path

"""Compile, load, attach, take over and remove hostagent's kernel programs.

Start-up order is what keeps a node enforced: compile (bcc reopens the pinned maps), let the
caller fill the maps, then attach. Attaching goes through pinned bpf links: when a previous
agent's link is pinned, its program is swapped atomically (BPF_LINK_UPDATE), so there is no
instant in which the hook runs nothing or runs twice.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hostagent.bpf import syscall
from hostagent.cgroupfs import CgroupRoot
from hostagent.errors import KernelError, SetupError

# bcc rewrites map calls only in its main file, so every file that touches a map is appended
# to one text, in this order, each under a #line marker (see bpf/hostagent.c).
SOURCES = ("hostagent.c", "lib/maps.h", "lib/counters.h", "lib/origin.h", "lib/policy.h",
           "lib/events.h", "lib/dns.h", "sock_addr.c", "sock_create.c", "cgroup_skb.c")
# Optional programs' files, compiled only when asked for (each adds to every start's compile),
# with -D<macro> so that their maps are declared too.
OPTIONAL_SOURCES = {"sock_ops": ("sock_ops.c", "HOSTAGENT_SOCK_OPS")}

# kernel uapi numbers (enum bpf_prog_type / enum bpf_attach_type)
PROG_CGROUP_SKB = 8
PROG_CGROUP_SOCK = 9
PROG_SOCK_OPS = 13
PROG_CGROUP_SOCK_ADDR = 18
ATTACH_INET_EGRESS = 1
ATTACH_INET_SOCK_CREATE = 2
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
ATTACH_UDP4_SENDMSG = 14
ATTACH_UDP6_SENDMSG = 15
ATTACH_UDP4_RECVMSG = 19
ATTACH_UDP6_RECVMSG = 20
ATTACH_INET4_GETPEERNAME = 29
ATTACH_INET6_GETPEERNAME = 30


@dataclass(frozen=True)
class Program:
    name: str          # C function, entry program name
    prog_type: int
    attach_type: int
    optional: bool = False   # loaded and attached only when asked for (Programs(optional=...))


PROGRAMS = (
    Program("sock4_connect", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT),
    Program("sock6_connect", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT),
    Program("sock4_sendmsg", PROG_CGROUP_SOCK_ADDR, ATTACH_UDP4_SENDMSG),
    Program("sock6_sendmsg", PROG_CGROUP_SOCK_ADDR, ATTACH_UDP6_SENDMSG),
    Program("sock4_recvmsg", PROG_CGROUP_SOCK_ADDR, ATTACH_UDP4_RECVMSG),
    Program("sock6_recvmsg", PROG_CGROUP_SOCK_ADDR, ATTACH_UDP6_RECVMSG),
    Program("sock4_getpeername", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_GETPEERNAME),
    Program("sock6_getpeername", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_GETPEERNAME),
    Program("sock_create", PROG_CGROUP_SOCK, ATTACH_INET_SOCK_CREATE),
    Program("skb_egress", PROG_CGROUP_SKB, ATTACH_INET_EGRESS),
    # close events (events.connectionClose): costs every TCP connection a socket storage
    Program("sock_ops", PROG_SOCK_OPS, ATTACH_CGROUP_SOCK_OPS, optional=True),
)

MAP_PINS = ("hostagent_config_v1", "hostagent_bindings_v1", "hostagent_rules_v1",
            "hostagent_portsets_v1", "hostagent_metadata_v1", "hostagent_decisions_v1",
            "hostagent_errors_v1", "hostagent_dns_v1", "hostagent_fqdn_v1",
            "hostagent_dns_clients_v1", "hostagent_dns_senders_gen_v1",
            "hostagent_dns_origins_v1", "hostagent_events_v1", "hostagent_protected_filter_v1",
            "hostagent_allow_counts_v1", "hostagent_flow_origins_v1")
# Pins earlier versions made and this one no longer uses: removed after a takeover and by
# uninstall, so an upgrade leaves nothing behind.
RETIRED_PINS = ("hostagent_origins_v1",)


def link_pin(pin_dir: str, program: Program) -> str:
    return os.path.join(pin_dir, f"hostagent_link_{program.name}")


def bpf_source_dir() -> Path:
    """Where the C sources are: $HOSTAGENT_BPF_DIR, the source tree, or the installed share."""
    candidates = [os.environ.get("HOSTAGENT_BPF_DIR"),
                  Path(__file__).resolve().parents[2] / "bpf",
                  Path(sys.prefix) / "share" / "hostagent" / "bpf"]
    for c in candidates:
        if c and (Path(c) / "hostagent.c").is_file():
            return Path(c)
    raise SetupError("hostagent's BPF sources (bpf/hostagent.c) were not found; set "
                     "HOSTAGENT_BPF_DIR")


def check_kernel_headers() -> None:
    """bcc's own error is a bare 'Unable to find kernel headers': say what to do instead."""
    if os.environ.get("BCC_KERNEL_SOURCE") or os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(os.path.join(build, "include")):
        raise SetupError(f"bcc cannot find kernel headers: {build} is missing. Run "
                         "scripts/setup.sh (links Debian's linux-headers package there) or set "
                         "BCC_KERNEL_SOURCE")


def source_text(src_dir: Path, optional: frozenset[str] = frozenset()) -> str:
    names = SOURCES + tuple(OPTIONAL_SOURCES[p][0] for p in sorted(optional))
    return "\n".join(f'#line 1 "{src_dir / name}"\n{(src_dir / name).read_text()}'
                     for name in names)


@dataclass(frozen=True)
class Limits:
    max_rules: int
    max_cgroups: int
    max_fqdn: int = 65536  # dns.maxAllowances


class Programs:
    """The compiled programs and the bcc module that owns the maps."""

    def __init__(self, pin_dir: str, limits: Limits, optional: frozenset[str] = frozenset()
                 ) -> None:
        """``optional``: the optional programs (Program.optional) to load and attach."""
        from bcc import BPF  # Debian's python3-bpfcc, linked into the venv by setup

        check_kernel_headers()
        src = bpf_source_dir()
        cflags = [f"-I{src}", f'-DHOSTAGENT_PIN_DIR="{pin_dir}"',
                  f"-DMAX_RULES={limits.max_rules}", f"-DMAX_CGROUPS={limits.max_cgroups}",
                  f"-DMAX_FQDN={limits.max_fqdn}"]
        cflags += [f"-D{OPTIONAL_SOURCES[p][1]}" for p in sorted(optional)]
        try:
            self.bpf = BPF(text=source_text(src, optional), cflags=cflags)
        except Exception as err:  # bcc raises bare Exception; keep its words
            raise KernelError(f"compiling {src}/hostagent.c failed: {err}") from err
        self.pin_dir = pin_dir
        self.fds: dict[str, int] = {}
        for program in PROGRAMS:
            if program.optional and program.name not in optional:
                continue
            try:
                fn = self.bpf.load_func(program.name, program.prog_type, None,
                                        program.attach_type)
            except Exception as err:
                raise KernelError(f"the kernel refused program {program.name}: {err}") from err
            self.fds[program.name] = fn.fd

    def __getitem__(self, table: str):
        return self.bpf[table]

    def attach(self, root: CgroupRoot) -> list[str]:
        """Attach every program at root, taking over pinned links, and the optional programs
        asked for; an optional program not asked for is detached if an earlier agent attached
        it. Returns what was done."""
        done = []
        cg_fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for program in PROGRAMS:
                if program.name in self.fds:
                    done.append(self._attach_one(program, cg_fd, root))
                elif _detach(self.pin_dir, program):
                    done.append(f"{program.name}: detached (not asked for)")
        finally:
            os.close(cg_fd)
        for name in RETIRED_PINS:
            path = os.path.join(self.pin_dir, name)
            if os.path.exists(path):
                os.unlink(path)
                done.append(f"unpinned retired {name}")
        return done

    def _attach_one(self, program: Program, cg_fd: int, root: CgroupRoot) -> str:
        pin = link_pin(self.pin_dir, program)
        prog_fd = self.fds[program.name]
        old = syscall.obj_get(pin)
        if old is not None:
            try:
                if syscall.link_info(old).cgroup_id == root.id:
                    syscall.link_update(old, prog_fd)
                    return f"{program.name}: replaced"
                # cgroupRoot changed: attach at the new root first, then let go of the old one
                new = syscall.link_create(prog_fd, cg_fd, program.attach_type)
                syscall.link_detach(old)
                os.unlink(pin)
                syscall.obj_pin(new, pin)
                os.close(new)
                return f"{program.name}: moved"
            finally:
                os.close(old)
        new = syscall.link_create(prog_fd, cg_fd, program.attach_type)
        try:
            syscall.obj_pin(new, pin)
        finally:
            os.close(new)
        return f"{program.name}: attached"

    def close(self) -> None:
        # Dropping bcc's fds does not detach: the pinned links hold the programs.
        self.bpf.cleanup()


def attached(pin_dir: str) -> list[dict]:
    """What is attached according to the pinned links (works without a running agent)."""
    out = []
    for program in PROGRAMS:
        fd = syscall.obj_get(link_pin(pin_dir, program))
        if fd is None:
            out.append({"program": program.name, "attached": False,
                        "optional": program.optional})
            continue
        try:
            info = syscall.link_info(fd)
            entry = {"program": program.name, "attached": True, "optional": program.optional,
                     "link_id": info.id,
                     "prog_id": info.prog_id, "cgroup_id": info.cgroup_id}
            try:
                pfd = syscall.prog_fd_by_id(info.prog_id)
                try:
                    pinfo = syscall.prog_info(pfd)
                    entry.update(run_cnt=pinfo.run_cnt, run_time_ns=pinfo.run_time_ns)
                finally:
                    os.close(pfd)
            except KernelError:
                pass  # run counts are a nicety; the link itself is the fact
            out.append(entry)
        finally:
            os.close(fd)
    return out


def uninstall(pin_dir: str) -> list[str]:
    """Detach every program and remove every pinned object. Idempotent."""
    done = [f"detached {program.name}" for program in PROGRAMS if _detach(pin_dir, program)]
    for name in MAP_PINS + RETIRED_PINS:
        path = os.path.join(pin_dir, name)
        if os.path.exists(path):
            os.unlink(path)
            done.append(f"unpinned {name}")
    if os.path.isdir(pin_dir) and not os.listdir(pin_dir):
        os.rmdir(pin_dir)
    return done


def _detach(pin_dir: str, program: Program) -> bool:
    """Detach a program through its pinned link and remove the pin; False if none was there."""
    pin = link_pin(pin_dir, program)
    fd = syscall.obj_get(pin)
    if fd is None:
        return False
    try:
        syscall.link_detach(fd)
    finally:
        os.close(fd)
    os.unlink(pin)
    return True

"""The bpf filesystem that holds hostagent's pinned maps and links.

It is not mounted at boot on every node (this project's own VMs included): the agent mounts it
at /sys/fs/bpf itself when no bpf filesystem covers the configured directory.
"""

from __future__ import annotations

import ctypes as ct
import os

from hostagent.cgroupfs import mounts_of_type
from hostagent.errors import SetupError

DEFAULT_MOUNT = "/sys/fs/bpf"

_libc = ct.CDLL(None, use_errno=True)


def covering_mount(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    path = os.path.abspath(path)
    found = [m for m in mounts_of_type("bpf", mountinfo)
             if path == m or path.startswith(m.rstrip("/") + "/")]
    return max(found, key=len) if found else None


def ensure_pin_dir(pin_dir: str, mountinfo: str = "/proc/self/mountinfo") -> None:
    """Make sure pin_dir exists on a bpf filesystem, mounting /sys/fs/bpf if needed."""
    if covering_mount(pin_dir, mountinfo) is None:
        if not os.path.abspath(pin_dir).startswith(DEFAULT_MOUNT + "/"):
            raise SetupError(f"bpffsDir {pin_dir!r} is not on a bpf filesystem, and only "
                             f"{DEFAULT_MOUNT} is mounted automatically")
        os.makedirs(DEFAULT_MOUNT, exist_ok=True)
        if _libc.mount(b"bpf", DEFAULT_MOUNT.encode(), b"bpf", 0, None) != 0:
            err = ct.get_errno()
            raise SetupError(f"cannot mount bpffs at {DEFAULT_MOUNT}: {os.strerror(err)}")
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)

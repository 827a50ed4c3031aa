"""The few bpf(2) commands bcc does not wrap: cgroup links, pins and object info.

Programs are attached through bpf links rather than bcc's attach_func: a link pinned in bpffs
keeps its program attached after the agent exits, and BPF_LINK_UPDATE swaps the program of a
live link atomically, which is what lets a new agent take over with no window.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform

from hostagent.errors import KernelError

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())

BPF_MAP_LOOKUP_ELEM = 1
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_GET_FD_BY_ID = 13
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


# The same syscall(2) with its argument types declared, for MapLookup: ctypes then converts
# plain ints without building a byref() per call (~0.4 µs of a ~1.7 µs lookup). A handle of its
# own, so that _libc.syscall keeps taking byref() arguments.
_fast_syscall = ct.CDLL(None, use_errno=True).syscall
_fast_syscall.restype = ct.c_long
_fast_syscall.argtypes = [ct.c_long, ct.c_long, ct.c_void_p, ct.c_long]


class MapElemAttr(ct.Structure):
    """union bpf_attr for BPF_MAP_*_ELEM."""

    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _ObjAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32),
                ("path_fd", ct.c_int32), ("pad", ct.c_uint32)]


class _LinkCreateAttr(ct.Structure):
    _fields_ = [("prog_fd", ct.c_uint32), ("target_fd", ct.c_uint32),
                ("attach_type", ct.c_uint32), ("flags", ct.c_uint32), ("pad", ct.c_uint64 * 6)]


class _LinkUpdateAttr(ct.Structure):
    _fields_ = [("link_fd", ct.c_uint32), ("new_prog_fd", ct.c_uint32), ("flags", ct.c_uint32),
                ("old_prog_fd", ct.c_uint32)]


class _LinkDetachAttr(ct.Structure):
    _fields_ = [("link_fd", ct.c_uint32), ("pad", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _IdAttr(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class LinkInfo(ct.Structure):
    """struct bpf_link_info, cgroup member of the union."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("prog_id", ct.c_uint32),
                ("pad", ct.c_uint32), ("cgroup_id", ct.c_uint64), ("attach_type", ct.c_uint32),
                ("rest", ct.c_uint8 * 36)]


class ProgInfo(ct.Structure):
    """struct bpf_prog_info up to the fields we read (the kernel fills what fits)."""

    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64), ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32), ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64), ("btf_id", ct.c_uint32),
        ("func_info_rec_size", ct.c_uint32), ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32), ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64), ("run_time_ns", ct.c_uint64),
        ("run_cnt", ct.c_uint64),
    ]


def raw(cmd: int, attr: ct.Structure) -> int:
    """bpf(2) itself: its result, or -errno. For callers that poll and expect failures (the
    benchmarks' map lookups); everything else goes through _bpf, which raises."""
    if _SYS_BPF is None:
        raise KernelError(f"bpf(2) syscall number unknown for {platform.machine()}")
    ret = _libc.syscall(_SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    return ret if ret >= 0 else -ct.get_errno()


def _bpf(cmd: int, attr: ct.Structure, what: str) -> int:
    ret = raw(cmd, attr)
    if ret < 0:
        raise KernelError(f"{what}: {os.strerror(-ret)}", errno=-ret)
    return ret


def obj_pin(fd: int, path: str) -> None:
    raw = os.fsencode(path)
    attr = _ObjAttr(pathname=ct.cast(ct.c_char_p(raw), ct.c_void_p).value, bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def obj_get(path: str) -> int | None:
    """Open a pinned object; None when nothing is pinned there."""
    raw = os.fsencode(path)
    attr = _ObjAttr(pathname=ct.cast(ct.c_char_p(raw), ct.c_void_p).value)
    try:
        return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")
    except KernelError as err:
        if err.errno == errno.ENOENT:
            return None
        raise


def link_create(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=cgroup_fd, attach_type=attach_type)
    return _bpf(BPF_LINK_CREATE, attr, "attach program to cgroup")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    _bpf(BPF_LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd),
         "replace program of link")


def link_detach(link_fd: int) -> None:
    _bpf(BPF_LINK_DETACH, _LinkDetachAttr(link_fd=link_fd), "detach link")


def link_info(link_fd: int) -> LinkInfo:
    info = LinkInfo()
    attr = _InfoAttr(bpf_fd=link_fd, info_len=ct.sizeof(info),
                     info=ct.cast(ct.pointer(info), ct.c_void_p).value)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "link info")
    return info


def prog_info(prog_fd: int) -> ProgInfo:
    info = ProgInfo()
    attr = _InfoAttr(bpf_fd=prog_fd, info_len=ct.sizeof(info),
                     info=ct.cast(ct.pointer(info), ct.c_void_p).value)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "program info")
    return info


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id), f"open program {prog_id}")


class MapLookup:
    """Lookups in one map by fd through one preset bpf_attr and key/value buffers: a ctypes
    call and a copy per lookup. For per-packet paths (the resolver attributes every query),
    where bcc's table objects cost several microseconds in ctypes conversions. Not
    thread-safe: one owner thread, or a lock."""

    def __init__(self, map_fd: int, key_size: int, value_size: int) -> None:
        if _SYS_BPF is None:
            raise KernelError(f"bpf(2) syscall number unknown for {platform.machine()}")
        self._key = (ct.c_uint8 * key_size)()
        self._value = (ct.c_uint8 * value_size)()
        self._key_view = memoryview(self._key).cast("B")
        self._value_view = memoryview(self._value).cast("B")
        self._attr = MapElemAttr(map_fd=map_fd, key=ct.addressof(self._key),
                               value=ct.addressof(self._value))
        self._args = (_SYS_BPF, BPF_MAP_LOOKUP_ELEM, ct.addressof(self._attr),
                      ct.sizeof(self._attr))

    def lookup(self, key: bytes) -> bytes | None:
        """The value under ``key`` (exactly key_size bytes), or None when there is none."""
        self._key_view[:] = key
        if _fast_syscall(*self._args) == 0:
            return self._value_view.tobytes()
        err = ct.get_errno()
        if err == errno.ENOENT:
            return None
        raise KernelError(f"map lookup: {os.strerror(err)}", errno=err)

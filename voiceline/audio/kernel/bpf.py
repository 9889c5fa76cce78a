"""The few libbpf calls the kernel path needs, through ctypes (Debian's libbpf1).

Open and load the clang-built object, attach its program as a TC ingress
filter (direct action) at a priority and handle of our own, detach it, and
read and write map elements. Nothing here runs per packet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from pathlib import Path

BPF_TC_INGRESS = 1
BPF_ANY = 0
BPF_F_LOCK = 4  # copy a value holding a bpf_spin_lock under that lock


class BpfError(Exception):
    """A libbpf call failed; the message names the call and the errno, nothing else."""

    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call}: {errno.errorcode.get(code, str(code))}")
        self.code = code


class _TcHook(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


@functools.cache
def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError("libbpf", errno.ENOENT) from exc
    lib.libbpf_set_print.argtypes = [ctypes.c_void_p]
    lib.libbpf_set_print.restype = ctypes.c_void_p
    lib.libbpf_set_print(None)  # its messages would go to stderr; failures come back as errno
    lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.bpf_object__open_file.restype = ctypes.c_void_p
    lib.bpf_object__load.argtypes = [ctypes.c_void_p]
    lib.bpf_object__close.argtypes = [ctypes.c_void_p]
    lib.bpf_object__close.restype = None
    lib.bpf_object__find_program_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.bpf_object__find_program_by_name.restype = ctypes.c_void_p
    lib.bpf_program__fd.argtypes = [ctypes.c_void_p]
    lib.bpf_object__find_map_fd_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.bpf_tc_hook_create.argtypes = [ctypes.POINTER(_TcHook)]
    for call in ("bpf_tc_attach", "bpf_tc_detach"):
        getattr(lib, call).argtypes = [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]
    lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64]
    lib.bpf_map_lookup_elem_flags.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_uint64]
    lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_char_p]
    return lib


@functools.cache
def possible_cpus() -> int:
    """How many values a per-CPU map element holds."""
    return _check("libbpf_num_possible_cpus", _library().libbpf_num_possible_cpus())


def _check(call: str, result: int) -> int:
    """libbpf returns a negative errno (or -1 with errno set)."""
    if result < 0:
        code = -result if result != -1 else ctypes.get_errno()
        raise BpfError(call, code or errno.EINVAL)
    return result


class BpfObject:
    """A loaded object file: its program and maps, by name. `close` releases them."""

    def __init__(self, path: Path) -> None:
        self._lib = _library()
        handle = self._lib.bpf_object__open_file(os.fsencode(path), None)
        if not handle:
            raise BpfError("bpf_object__open_file", ctypes.get_errno() or errno.ENOENT)
        self._object: int | None = handle
        try:
            _check("bpf_object__load", self._lib.bpf_object__load(handle))
        except BpfError:
            self.close()
            raise

    def program_fd(self, name: str) -> int:
        program = self._lib.bpf_object__find_program_by_name(self._object, name.encode())
        if not program:
            raise BpfError("bpf_object__find_program_by_name", errno.ENOENT)
        return _check("bpf_program__fd", self._lib.bpf_program__fd(program))

    def map_fd(self, name: str) -> int:
        return _check("bpf_object__find_map_fd_by_name", self._lib.bpf_object__find_map_fd_by_name(self._object, name.encode()))

    def update(self, map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _check("bpf_map_update_elem", self._lib.bpf_map_update_elem(map_fd, key, value, flags))

    def lookup(self, map_fd: int, key: bytes, size: int, flags: int = 0) -> bytes:
        value = ctypes.create_string_buffer(size)
        _check("bpf_map_lookup_elem", self._lib.bpf_map_lookup_elem_flags(map_fd, key, value, flags))
        return value.raw

    def delete(self, map_fd: int, key: bytes) -> None:
        _check("bpf_map_delete_elem", self._lib.bpf_map_delete_elem(map_fd, key))

    def close(self) -> None:
        if self._object is not None:
            self._lib.bpf_object__close(self._object)
            self._object = None


def _hook(ifindex: int) -> _TcHook:
    return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS)


def attach_ingress(ifindex: int, program_fd: int, priority: int, handle: int) -> None:
    """Our program as a direct-action filter on `ifindex`'s ingress (the clsact qdisc made if missing)."""
    lib = _library()
    hook = _hook(ifindex)
    created = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if created < 0 and created != -errno.EEXIST:
        _check("bpf_tc_hook_create", created)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=program_fd, handle=handle, priority=priority)
    _check("bpf_tc_attach", lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)))


def detach_ingress(ifindex: int, priority: int, handle: int) -> bool:
    """Remove the ingress filter at `priority`/`handle`; False when there was none.

    The clsact qdisc stays: other processes' filters may hang on it, and an
    empty one costs a packet nothing measurable.
    """
    lib = _library()
    hook = _hook(ifindex)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=handle, priority=priority)
    result = lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
    if result in (-errno.ENOENT, -errno.EINVAL):
        return False
    _check("bpf_tc_detach", result)
    return True

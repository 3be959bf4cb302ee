"""Ray object store transfer (the default): the sender `ray.put`s the payload's tensors as numpy
arrays; the ticket is the ObjectRef; the receiver `ray.wait`s on it without blocking and
`ray.get`s it — zero-copy on the same node (numpy arrays are mapped straight from plasma).

`prefault_plasma()` (once per process, at start-up) takes page faults out of both ends: a process's
mapping of the plasma store starts with no page-table entries, so until it has touched every page
once, each `ray.put` page-faults on every 4 KiB it writes (~2 µs each here: ~9 ms of a 16 MiB put)
— wherever the store allocates, and even with Ray's `preallocate_plasma_memory`, which commits the
store's memory but maps it into no other process. Ray's fixed per-transfer costs remain.
"""
from __future__ import annotations

import ctypes
import logging
import os
import warnings

import numpy as np
import ray
import torch

from decoders.kv_payload import KVPayload
from decoders.kv_transfer.base import KVReceiver, KVSender, TransferState


log = logging.getLogger(__name__)
_MADV_POPULATE_WRITE = 23   # Linux >= 5.14: fault a range in (writable) without touching its bytes
_prefaulted: set[tuple] = set()


def _plasma_mappings() -> list[tuple]:
    """This process's shared mappings of the plasma store's file (Ray names it `<dir>/plasmaXXXXXX`;
    it is mapped at connect time, so ray.init() must have run), as (start, end, device, inode): a
    later store (ray.shutdown(), ray.init()) may be mapped at the very same addresses."""
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "s" in parts[1] and os.path.basename(parts[5]).startswith("plasma"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                found.append((lo, hi, parts[3], parts[4]))
    return found


def prefault_plasma(max_bytes: int = 16 << 30) -> int:
    """Map every page of the plasma store into this process now, so no later put/get page-faults.

    Costs ~2 MiB of page tables per GiB of store in this process, and commits the store's memory if
    Ray has not yet (a bounded `object_store_memory` keeps both small). Stores larger than
    `max_bytes` are left alone. Idempotent; returns the bytes newly prefaulted (0 where it can't:
    not Linux, an older kernel, no plasma mapping yet)."""
    if not os.path.exists("/proc/self/maps"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for mapping in _plasma_mappings():
        lo, hi = mapping[:2]
        if mapping in _prefaulted:
            continue
        if hi - lo > max_bytes:
            log.warning("plasma store of %d MiB exceeds the prefault cap of %d MiB: not prefaulted",
                        (hi - lo) >> 20, max_bytes >> 20)
            continue
        if libc.madvise(lo, hi - lo, _MADV_POPULATE_WRITE) != 0:
            log.warning("could not prefault the plasma store: %s", os.strerror(ctypes.get_errno()))
            continue
        _prefaulted.add(mapping)
        done += hi - lo
    return done


_BF16 = "__bf16__"      # numpy has no bfloat16: such tensors travel as their int16 bit patterns


def _to_numpy(obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return {_BF16: t.view(torch.int16).numpy()} if t.dtype == torch.bfloat16 else t.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_numpy(v) for v in obj]
    return obj


def _view(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():        # read-only view of plasma memory: import_kv only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _to_torch(obj):
    if isinstance(obj, np.ndarray):
        return _view(obj)
    if isinstance(obj, dict):
        if set(obj) == {_BF16}:
            return _view(obj[_BF16]).view(torch.bfloat16)
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_torch(v) for v in obj]
    return obj


class ObjectStoreSender(KVSender):
    def start(self) -> list:
        ref = ray.put(_to_numpy(self.payload.to_dict()))
        self.state = TransferState.TRANSFERRING
        return [ref]                       # wrapped: a bare ObjectRef argument would be resolved by Ray

    def _advance(self) -> None:
        pass                               # the object is sealed; SUCCESS comes with ack()


class ObjectStoreReceiver(KVReceiver):
    def _advance(self) -> None:
        (ref,) = self.ticket
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            self.state = TransferState.TRANSFERRING
            return
        self._payload = KVPayload.from_dict(_to_torch(ray.get(ref)))
        self.state = TransferState.SUCCESS

"""Same-node shared-memory transfer: one copy into memory the receiver maps, nothing else.

Life of one transfer: the sender takes a segment from its process's pool (segments are reused, so
their pages are already faulted in — fresh shared memory costs as much in page faults as the copy
itself), copies the KV in, and names the segment in the ticket with the KV's shape and dtype and the
small rest of the payload. The receiver maps the segment and hands out a tensor *viewing* it, so
`import_kv` copies straight from the sender's memory into its own block pool. The segment returns to
the sender's pool once the transfer succeeded — the orchestrator acks only after the decode engine
has imported, so the memory is never reused while being read. A failed or timed-out transfer's
segment is retired (closed and unlinked), never reused: a late receiver may still be reading it, and
a segment whose name is gone (someone cleaned /dev/shm) would otherwise fail every later transfer.
"""
from __future__ import annotations

import _posixshmem                                # what SharedMemory itself opens segments with
import math
import mmap
import os
import threading
from multiprocessing import shared_memory

import torch

from decoders.kv_payload import KVPayload
from decoders.kv_transfer.base import KVReceiver, KVSender, TransferState

_MIB = 2**20


class _SegmentPool:
    """This process's reusable segments, by size; unlinked when the process exits."""

    def __init__(self):
        self.free: list[shared_memory.SharedMemory] = []
        self.lock = threading.Lock()

    def acquire(self, nbytes: int) -> shared_memory.SharedMemory:
        with self.lock:
            fits = [s for s in self.free if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self.free.remove(seg)
                return seg
        size = max(_MIB, 1 << math.ceil(math.log2(max(nbytes, 1))))    # powers of two: reuse is likely
        return shared_memory.SharedMemory(create=True, size=size)

    def release(self, seg: shared_memory.SharedMemory) -> None:
        with self.lock:
            self.free.append(seg)

    @staticmethod
    def retire(seg: shared_memory.SharedMemory) -> None:
        """Drop a segment for good; a receiver's existing mapping stays valid until it unmaps."""
        seg.close()
        try:
            seg.unlink()
        except FileNotFoundError:                 # already gone: that may be why the transfer failed
            from multiprocessing import resource_tracker
            resource_tracker.unregister(seg._name, "shared_memory")   # noqa: SLF001 - or it warns at exit


_POOL = _SegmentPool()
# Receiver side: segments mapped once and kept, by name. A tensor viewing a segment does not keep
# the mapping alive, so it must outlive every view; the sender reuses its segments, so this stays
# as small as the senders' pools, and mapped pages stay warm for the next transfer.
_ATTACHED: dict[str, mmap.mmap] = {}
_ATTACH_LOCK = threading.Lock()


def _attach(name: str) -> mmap.mmap:
    with _ATTACH_LOCK:
        seg = _ATTACHED.get(name)
        if seg is None:
            # mapped by hand: SharedMemory(name=...) would register the sender's segment with this
            # process's resource tracker (unlinked when we exit), and unregistering it again is no
            # better — a multiprocessing child shares its parent's tracker, so that dropped the
            # creator's own registration and every segment outlived its creator in /dev/shm
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
            try:
                seg = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)                  # the mapping stays valid without the descriptor
            _ATTACHED[name] = seg
        return seg


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class ShmSender(KVSender):
    segment: shared_memory.SharedMemory | None = None

    def start(self) -> dict:
        kv = self.payload.kv.contiguous()
        self.segment = _POOL.acquire(kv.numel() * kv.element_size())
        torch.frombuffer(self.segment.buf, dtype=kv.dtype, count=kv.numel()).view(kv.shape).copy_(kv)
        self.state = TransferState.TRANSFERRING
        rest = {k: v for k, v in self.payload.to_dict().items() if k != "kv"}
        return {"segment": self.segment.name, "shape": tuple(kv.shape), "dtype": str(kv.dtype), "rest": rest}

    def _advance(self) -> None:
        pass                                      # the bytes are in place; the verdict comes by ack()

    def poll(self) -> TransferState:
        state = super().poll()
        if state.done and self.segment is not None:   # over: reuse the segment only if it served well
            (_POOL.release if state is TransferState.SUCCESS else _POOL.retire)(self.segment)
            self.segment = None
        return state

    def ack(self, ok: bool, reason: str = "receiver failed") -> None:
        super().ack(ok, reason)
        self.poll()


class ShmReceiver(KVReceiver):
    def _advance(self) -> None:
        t = self.ticket
        seg = _attach(t["segment"])
        n = math.prod(t["shape"])
        kv = torch.frombuffer(seg, dtype=_dtype(t["dtype"]), count=n).view(t["shape"])
        self._payload = KVPayload.from_dict({**t["rest"], "kv": kv})
        self.state = TransferState.SUCCESS

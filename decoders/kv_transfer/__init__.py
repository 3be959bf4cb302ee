"""KV transfer backends, by name: `objectstore` (default), `shm` (same node), `collective`, `fake`."""
from __future__ import annotations

from decoders.kv_transfer.base import KVReceiver, KVSender, TransferError, TransferState

BACKENDS = ("objectstore", "shm", "collective", "fake")


def backend(name: str) -> tuple[type[KVSender], type[KVReceiver]]:
    if name == "objectstore":
        from decoders.kv_transfer.objectstore import ObjectStoreReceiver, ObjectStoreSender
        return ObjectStoreSender, ObjectStoreReceiver
    if name == "shm":
        from decoders.kv_transfer.shm import ShmReceiver, ShmSender
        return ShmSender, ShmReceiver
    if name == "fake":
        from decoders.kv_transfer.fake import FakeReceiver, FakeSender
        return FakeSender, FakeReceiver
    if name == "collective":
        from decoders.kv_transfer.collective import CollectiveReceiver, CollectiveSender
        return CollectiveSender, CollectiveReceiver
    raise ValueError(f"unknown KV transfer backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "KVReceiver", "KVSender", "TransferError", "TransferState", "backend"]

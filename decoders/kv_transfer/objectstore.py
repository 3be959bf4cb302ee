"""Ray object store transfer (the default): the sender `ray.put`s the payload's tensors as numpy
arrays; the ticket is the ObjectRef; the receiver `ray.wait`s on it without blocking and
`ray.get`s it — zero-copy on the same node (numpy arrays are mapped straight from plasma).
"""
from __future__ import annotations

import warnings

import numpy as np
import ray
import torch

from decoders.kv_payload import KVPayload
from decoders.kv_transfer.base import KVReceiver, KVSender, TransferState


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

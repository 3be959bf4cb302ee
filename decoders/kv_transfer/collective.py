"""torch.distributed transfer: the KV tensor goes point-to-point over a two-rank gloo group
(NCCL where both ends hold CUDA tensors); everything else rides in the ticket.

Life of one transfer: the sender opens a TCPStore on a free port and starts a thread that joins a
fresh 2-rank process group as rank 0 and `send`s the KV; the ticket carries the store address, the
KV's shape/dtype and the small rest of the payload; the receiver's thread joins as rank 1 and
`recv`s into a tensor it allocated. `poll()` only looks at the threads, so neither engine blocks.
"""
from __future__ import annotations

import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from decoders.kv_payload import KVPayload
from decoders.kv_transfer.base import KVReceiver, KVSender, TransferState


def _group(store: dist.Store, rank: int, timeout_s: float, device: str):
    timeout = timedelta(seconds=timeout_s)
    if device == "cuda":
        return dist.ProcessGroupNCCL(store, rank, 2, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


class _Worker:
    """One background thread; records its outcome for poll() to read."""

    def __init__(self, fn):
        self.result, self.error, self.done = None, None, threading.Event()
        threading.Thread(target=self._run, args=(fn,), daemon=True).start()

    def _run(self, fn):
        try:
            self.result = fn()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        self.done.set()


class CollectiveSender(KVSender):
    host = "127.0.0.1"    # the address the receiver dials; set to the node IP across machines

    def start(self) -> dict:
        host = self.host
        self.store = dist.TCPStore(host, 0, 2, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=30))
        kv = self.payload.kv.contiguous()
        device = kv.device.type

        def send():
            _group(self.store, 0, 30.0, device).send([kv], 1, 0).wait()

        self.worker = _Worker(send)
        self.state = TransferState.TRANSFERRING
        rest = {k: v for k, v in self.payload.to_dict().items() if k != "kv"}
        return {"host": host, "port": self.store.port, "shape": tuple(kv.shape), "dtype": str(kv.dtype),
                "device": device, "rest": rest}

    def _advance(self) -> None:
        if self.worker.done.is_set() and self.worker.error:
            self.fail(self.worker.error)
        # success still waits for ack(): the receiver may fail to import after the bytes arrived


class CollectiveReceiver(KVReceiver):
    def _advance(self) -> None:
        t = self.ticket
        if not hasattr(self, "worker"):
            def recv():
                store = dist.TCPStore(t["host"], t["port"], 2, is_master=False, timeout=timedelta(seconds=30))
                kv = torch.empty(t["shape"], dtype=getattr(torch, t["dtype"].split(".")[-1]),
                                 device=t["device"])
                _group(store, 1, 30.0, t["device"]).recv([kv], 0, 0).wait()
                return kv
            self.worker = _Worker(recv)
            self.state = TransferState.TRANSFERRING
        if self.worker.done.is_set():
            if self.worker.error:
                self.fail(self.worker.error)
            else:
                self._payload = KVPayload.from_dict({**t["rest"], "kv": self.worker.result.cpu()})
                self.state = TransferState.SUCCESS

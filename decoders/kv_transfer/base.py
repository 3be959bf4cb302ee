"""KV transfer: a sender on the prefill side, a receiver on the decode side, both polled.

Neither side ever blocks the engine loop: each is a small state machine advanced by `poll()`:

    BOOTSTRAPPING → TRANSFERRING → SUCCESS
           └──────────┴──────────→ FAILED

The sender is created with the payload and `start()`s, returning a *ticket* — the small, picklable
handle the orchestrator carries to the decode instance. The receiver is built from that ticket and
polled until it holds the payload. The sender only reaches SUCCESS when told the receiver has the
payload (`ack`), so the prefill engine keeps the sequence's blocks until then (vLLM #21570: a
source that frees blocks still being read corrupts the receiver's KV). A transfer that does not
finish within its timeout ends FAILED and the orchestrator re-prefills elsewhere.
"""
from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod

from decoders.kv_payload import KVPayload


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


class TransferError(RuntimeError):
    pass


class _Polled(ABC):
    def __init__(self, timeout_s: float):
        self.state = TransferState.BOOTSTRAPPING
        self.error: str | None = None
        self.deadline = time.monotonic() + timeout_s

    def fail(self, reason: str) -> None:
        if not self.state.done:
            self.state, self.error = TransferState.FAILED, reason

    def poll(self) -> TransferState:
        if not self.state.done:
            try:
                self._advance()
            except Exception as e:                       # a broken transport is a failed transfer
                self.fail(f"{type(e).__name__}: {e}")
            if not self.state.done and time.monotonic() > self.deadline:
                self.fail("timed out")
        return self.state

    @abstractmethod
    def _advance(self) -> None:
        """Move the state forward if the transport has progressed; never block."""


class KVSender(_Polled):
    def __init__(self, payload: KVPayload, timeout_s: float = 30.0):
        super().__init__(timeout_s)
        self.payload = payload

    @abstractmethod
    def start(self):
        """Begin moving the payload; return the ticket for the receiver."""

    def ack(self, ok: bool, reason: str = "receiver failed") -> None:
        """The receiver's verdict, relayed by the orchestrator."""
        if ok and not self.state.done:
            self.state = TransferState.SUCCESS
        elif not ok:
            self.fail(reason)


class KVReceiver(_Polled):
    def __init__(self, ticket, timeout_s: float = 30.0):
        super().__init__(timeout_s)
        self.ticket = ticket
        self._payload: KVPayload | None = None

    def payload(self) -> KVPayload:
        if self.state is not TransferState.SUCCESS:
            raise TransferError(f"transfer not complete: {self.state.value} {self.error or ''}".strip())
        return self._payload

    def wait(self, poll_interval_s: float = 0.001) -> KVPayload:
        """Convenience for callers that own a thread of their own (never the engine loop)."""
        while not self.poll().done:
            time.sleep(poll_interval_s)
        return self.payload()

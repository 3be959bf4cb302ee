"""In-process transfer for tests and warm-up: the ticket is a key into a module-level mailbox.

`FakeSender(payload, fail=True)` injects a failure: the receiver ends FAILED, as a broken link
would, so the re-prefill path can be tested without breaking anything real.
"""
from __future__ import annotations

import itertools

from decoders.kv_transfer.base import KVReceiver, KVSender, TransferState

_MAILBOX: dict[str, object] = {}
_ids = itertools.count()


class FakeSender(KVSender):
    def __init__(self, payload, timeout_s: float = 30.0, fail: bool = False):
        super().__init__(payload, timeout_s)
        self.inject_failure = fail

    def start(self) -> str:
        ticket = f"fake-{next(_ids)}"
        _MAILBOX[ticket] = "broken" if self.inject_failure else self.payload
        self.state = TransferState.TRANSFERRING
        return ticket

    def _advance(self) -> None:
        pass                                          # waits for ack()


class FakeReceiver(KVReceiver):
    def _advance(self) -> None:
        item = _MAILBOX.pop(self.ticket, None)
        if item is None:
            self.state = TransferState.TRANSFERRING
        elif item == "broken":
            self.fail("injected failure")
        else:
            self._payload, self.state = item, TransferState.SUCCESS

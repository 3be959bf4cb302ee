"""`held(backend)`: the engine thread of a LocalBackend kept busy by the test, so a deadline that
passes meanwhile provably passes while the request waits — however fast this machine decodes.

Life: a command queued on the EngineLoop (the one thread that touches the engine) blocks on an
event; the engine takes no step and applies no command until the block ends. A request started or
streaming meanwhile waits exactly as it would behind a long engine step. On exit the event is set and
the commands queued meanwhile (the aborts of requests whose deadline passed) run in order.
"""
from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def held(backend, timeout_s: float = 60):
    release, holding = threading.Event(), threading.Event()

    def hold(engine):
        holding.set()
        release.wait(timeout_s)           # bounded: a failing test never wedges the engine for good
    backend.loop.call(hold)
    assert holding.wait(10), "the engine thread did not pick up the hold"
    try:
        yield
    finally:
        release.set()

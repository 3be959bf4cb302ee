"""Following a sequence whose decode instance moves it elsewhere (a live role switch).

A decode stream may end with {"moved": ticket, "to": instance, "from": source}: the instance is
switching away from decode and exported the sequence's KV (source = that instance), or it was
asked to decode after its switch began and forwards the prefill's ticket untouched (source None).
`follow_moves` opens the decode stream on the new instance with that ticket and carries on, so
the caller sees one stream: the tokens before the move, then the tokens after it — the new
instance continues from the last token streamed, so none is missing or repeated. Once the new
instance has imported a moved KV, the source is told to free its copy (release ok); if the
transfer fails the source is released too and the failure goes up as any transfer failure does
(the orchestrator re-prefills prompt + tokens so far). Without moves this is the plain stream.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator


class NotInRole(RuntimeError):
    """Work reached an LLM-pool instance that no longer plays that role (it was routed on a view
    taken just before a switch, or Serve fell back from a pin to a replica it is removing): like a
    lost instance, another instance can do it, so the orchestrator re-routes and retries."""


async def follow_moves(stage, rid: str, ticket, pin: str | None, max_moves: int = 8) -> AsyncIterator[dict]:
    source = None                                   # instance holding the moved KV until it is imported
    try:
        for _ in range(max_moves + 1):
            moved = None
            async for item in stage.stream("decode", rid, ticket, pin=pin):
                if "moved" in item:
                    moved = item            # the last item of that stream
                    continue
                if source is not None and (item.get("imported") or "transfer_failed" in item):
                    ok = bool(item.get("imported"))
                    src, source = source, None
                    await stage.call("release", rid, ok, "" if ok else "moved KV not imported", pin=src)
                    if ok:
                        continue                    # the orchestrator already released its prefill
                yield item
            if moved is None:
                return
            ticket, pin = moved["moved"], moved["to"]
            if moved.get("from"):
                source = moved["from"]
        raise RuntimeError(f"request {rid} was moved more than {max_moves} times")
    finally:
        if source is not None:                      # left (cancelled, failed) before the import
            asyncio.ensure_future(stage.call("release", rid, False, "moved KV never imported", pin=source))

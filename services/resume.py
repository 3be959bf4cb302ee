"""Resuming a stream from the request journal after its ingress died (docs/api.md, "Resuming").

Life: every cluster-mode request is journaled in Redis by the ingress that runs it
(services/ingress_redis.py): at open, a fingerprint of what was asked (prompt token ids, image
hashes, sampling, API key) and `max_tokens`; then its tokens, appended *before* the client is sent them —
every delta for a sampled request, every JOURNAL_EVERY tokens for a greedy one (whose tokens a
re-prefill reproduces exactly) — and at the end `finished:<reason>` (kept 60 s) or `failed`. An
entry nobody closes (its ingress died) expires an hour after its last write; nothing grows.

A client whose stream broke re-sends the same request to any ingress with `x-request-id: <id>` and
`x-trisect-resume-from: <tokens received>`. `resume_point` checks the journal has that id and the
same fingerprint, and says where to go on: replay the journaled tokens the client lacks; if the
request had not finished, re-prefill prompt + journaled tokens on a live instance and generate the
rest under a fresh stage id, silently regenerating (greedy only) any tokens the client had beyond
the journal. So the client sees no gap and no repeated token; greedy output is token-exact.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from services.api_wire import RESUME_HEADER
from services.errors import invalid


def fingerprint(token_ids: list[int], image_hashes: list[str], sampling, api_key: str | None) -> str:
    """What a resumed request must ask exactly as the original did — with the same API key, so
    knowing a request id and its prompt is not enough to read someone else's stream."""
    asked = {"key": api_key or "", "tokens": list(token_ids), "images": list(image_hashes), "max_tokens": sampling.max_tokens,
             "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
             "seed": sampling.seed, "stop": list(sampling.stop), "ignore_eos": sampling.ignore_eos}
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


def journal_every(sampling, batched: int) -> int:
    """Tokens between journal appends: greedy tokens can be regenerated, sampled ones cannot."""
    return batched if sampling.greedy else 1


@dataclass(slots=True, frozen=True)
class ResumePoint:
    done: tuple[int, ...]        # tokens the journal holds (generated before the break)
    finish: str | None           # "stop" / "length" when the request had finished
    skip: int                    # tokens the client has beyond the journal: regenerate, do not send

    def stage_id(self, request_id: str) -> str:
        """A fresh id for the stages: the dead ingress's calls may still hold the old one there."""
        return f"{request_id}.r{len(self.done)}"


async def resume_point(journal, request_id: str, resume_from: int, fp: str, sampling) -> ResumePoint:
    entry = await journal.read(request_id)
    if entry is None:
        raise invalid(f"nothing to resume: request {request_id} is unknown or its journal expired; "
                      "send it again without the header", RESUME_HEADER)
    if entry.meta.get("fingerprint") != fp:
        raise invalid(f"request {request_id} was journaled with another prompt, images or sampling; "
                      "a resumed request must be sent exactly as the original", RESUME_HEADER)
    done = tuple(entry.tokens)
    finish = entry.state.partition(":")[2] or None if entry.state.startswith("finished") else None
    skip = max(0, resume_from - len(done))
    if skip and (finish is not None or not sampling.greedy):
        raise invalid(f"{RESUME_HEADER} is {resume_from} but request {request_id} sent only {len(done)} "
                      "tokens", RESUME_HEADER)
    if resume_from > sampling.max_tokens:
        raise invalid(f"{RESUME_HEADER} is {resume_from}, past max_tokens", RESUME_HEADER)
    return ResumePoint(done, finish, skip)

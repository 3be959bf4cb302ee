"""ResponseBuilder: engine tokens → the GenerateDeltas a client sees, for one request.

Shared by every Backend (in-process or cluster) so text, stop strings, finish reasons, usage and
TTFT/TPOT mean the same thing whatever the serving mode. Feed it each batch of new token ids with
the engine's finish reason (None while running); it returns the delta to send, and sets
`stopped_early` when a stop string ended the text before the engine stopped (the caller then
aborts the request upstream).
"""
from __future__ import annotations

import time

from services.api_types import GenerateDelta, Timings, Usage
from services.detokenize import IncrementalDetokenizer


class ResponseBuilder:
    __slots__ = ("request_id", "detok", "prompt_tokens", "completion_tokens", "arrival",
                 "first_token_at", "last_token_at", "finished", "stopped_early")

    def __init__(self, request_id: str, tokenizer, prompt_ids, stop=(), arrival: float | None = None):
        self.request_id = request_id
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop)
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.arrival = arrival if arrival is not None else time.perf_counter()
        self.first_token_at = self.last_token_at = None
        self.finished = self.stopped_early = False

    def add(self, token_ids, engine_finish_reason: str | None) -> GenerateDelta:
        now = time.perf_counter()
        if token_ids:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.completion_tokens += len(token_ids)
        text = self.detok.add(token_ids)
        finish = None
        if self.detok.stopped:                     # a stop string ended the text first
            self.stopped_early = engine_finish_reason is None
            finish = "stop"
        elif engine_finish_reason is not None:
            text += self.detok.flush()
            finish = "length" if engine_finish_reason == "length" else "stop"
        if finish is None:
            return GenerateDelta(self.request_id, tuple(token_ids), text)
        self.finished = True
        return GenerateDelta(self.request_id, tuple(token_ids), text, finish,
                             Usage(self.prompt_tokens, self.completion_tokens), self.timings())

    def timings(self) -> Timings:
        first = self.first_token_at or time.perf_counter()
        gaps = self.completion_tokens - 1
        tpot = (self.last_token_at - first) * 1e3 / gaps if gaps > 0 else 0.0
        return Timings(ttft_ms=(first - self.arrival) * 1e3, tpot_ms=tpot)

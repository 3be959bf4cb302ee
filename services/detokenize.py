"""Incremental detokenization with stop strings, for one streaming request.

Life: a backend makes one `IncrementalDetokenizer(tokenizer, prompt_ids, stop)` per request, calls
`add(new_token_ids)` as tokens arrive and sends the returned text to the client, and calls `flush()`
when the request finishes to release whatever was held back. When a stop string appears, `stopped`
turns True, the text is cut just before the stop string (which is never sent) and the backend must
abort the sequence.

Why not `decode(token)` per token: byte-level BPE splits multi-byte characters across tokens and
SentencePiece drops a token's leading space when it starts the decoded window. So we decode a short
sliding window that starts a few tokens back (seeded with the prompt's tail) and emit only the part
beyond what the window's prefix already produced, waiting while the text ends in U+FFFD (an
incomplete character). Text that could be the beginning of a stop string is held back until it is
either a full match or clearly not one.
"""

from __future__ import annotations

from collections.abc import Sequence

_CONTEXT = 6  # prompt tokens kept as left context for the first completion tokens


class IncrementalDetokenizer:
    __slots__ = ("_tok", "_ids", "_prefix", "_read", "_text", "_sent", "_stop", "_skip", "stopped")

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT:])
        self._prefix = 0               # window start
        self._read = len(self._ids)    # tokens before this are already turned into text
        self._text = ""                # completion text produced so far (may include held text)
        self._sent = 0                 # characters of _text already released
        self._stop = tuple(s for s in stop if s)
        self._skip = skip_special_tokens
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip,
                                clean_up_tokenization_spaces=False)

    def _advance(self, final: bool) -> None:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self._text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; return text that is now safe to send."""
        if self.stopped or not token_ids:
            return ""
        searched_from = max(0, len(self._text) - max((len(s) for s in self._stop), default=0))
        self._ids.extend(token_ids)
        self._advance(final=False)
        return self._release(searched_from, final=False)

    def flush(self) -> str:
        """The request finished: decode any incomplete tail and release held-back text."""
        if self.stopped:
            return ""
        searched_from = max(0, len(self._text) - max((len(s) for s in self._stop), default=0))
        self._advance(final=True)
        return self._release(searched_from, final=True)

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[:self._sent]

    def _release(self, searched_from: int, final: bool) -> str:
        cut = self._find_stop(searched_from)
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True
            end = cut
        elif final:
            end = len(self._text)
        else:
            end = len(self._text) - self._partial_stop_suffix()
        out = self._text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best

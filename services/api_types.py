"""Transport-neutral request and response types of the trisect API.

Life: an ingress (gRPC or HTTP) parses its wire format into a `GenerateRequest`; construction
validates everything that does not need the model (shapes, ranges, roles, image/part counts) and
raises TrisectError(INVALID_ARGUMENT) naming the field. A Backend then checks model-dependent limits
(image decoding, pixel/byte caps, context length), runs the request and yields `GenerateDelta`s; the
last one has `finish_reason`, `usage` and `timings` set. Ingresses translate deltas back to their wire
format. Images are always bytes inside the request, never paths or fetched URLs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from services.errors import invalid

ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length")
MAX_STOP_STRINGS = 16
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass(slots=True, frozen=True)
class ContentPart:
    """Text, or a marker for the next image of GenerateRequest.images (in order of appearance)."""

    type: str  # "text" | "image"
    text: str = ""

    def __post_init__(self):
        if self.type not in ("text", "image"):
            raise invalid(f"content part type must be 'text' or 'image', got {self.type!r}")
        if not isinstance(self.text, str):
            raise invalid(f"text must be a string, got {type(self.text).__name__}", "messages")
        if self.type == "image" and self.text:
            raise invalid("an image content part carries no text")


@dataclass(slots=True, frozen=True)
class ChatMessage:
    role: str
    content: tuple[ContentPart, ...]

    def __post_init__(self):
        if self.role not in ROLES:
            raise invalid(f"message role must be one of {', '.join(ROLES)}, got {self.role!r}",
                          "messages")
        object.__setattr__(self, "content", tuple(self.content))
        if self.role != "user" and any(p.type == "image" for p in self.content):
            raise invalid(f"only user messages may contain images (got one in a {self.role} "
                          "message)", "messages")

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if p.type == "text")

    @property
    def image_count(self) -> int:
        return sum(p.type == "image" for p in self.content)


@dataclass(slots=True)
class GenerateRequest:
    request_id: str
    prompt: str = ""                          # a single user turn (with `images`), or ...
    messages: tuple[ChatMessage, ...] = ()    # ... a conversation; exactly one of the two
    images: tuple[bytes, ...] = ()            # encoded image files, in order of appearance
    max_tokens: int = 64
    temperature: float = 0.0                  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                            # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    model: str = ""                           # "" = the served model
    api_key: str | None = field(default=None, repr=False)  # already checked; kept for quotas
    deadline: float | None = None             # absolute time.time(); None = no deadline
    resume_from: int | None = None            # resume request_id's stream after this many tokens

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not _REQUEST_ID.match(self.request_id):
            raise invalid("request_id must be 1-128 characters of [A-Za-z0-9._:-]", "request_id")
        if not isinstance(self.prompt, str) or not isinstance(self.model, str):
            raise invalid("prompt and model must be strings", "prompt")
        if len(self.model) > 256:
            raise invalid("model names are at most 256 characters", "model")
        self.messages = tuple(self.messages)
        self.images = tuple(bytes(i) for i in self.images)
        self.stop = tuple(self.stop)
        if bool(self.prompt) == bool(self.messages):
            raise invalid("give exactly one of a non-empty `prompt` or `messages`", "messages")
        if self.messages:
            if self.messages[-1].role == "assistant":
                raise invalid("the last message must not be an assistant message", "messages")
            parts = sum(m.image_count for m in self.messages)
            if parts != len(self.images):
                raise invalid(f"{parts} image parts but {len(self.images)} images", "messages")
        if any(not img for img in self.images):
            raise invalid("an image is empty (0 bytes)", "images")
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_float("temperature", self.temperature, lo=0.0, hi=2.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0)
        if self.top_p == 0.0:
            raise invalid("top_p must be in (0, 1]", "top_p")
        _check_int("top_k", self.top_k, lo=0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=2**63 - 1)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise invalid(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        if any(not isinstance(s, str) or not s or len(s) > 256 for s in self.stop):
            raise invalid("stop strings must be non-empty and at most 256 characters", "stop")
        if any(not _utf8_ok(s) for s in self.stop):
            raise invalid("stop strings must be valid Unicode (no lone surrogates)", "stop")
        if not isinstance(self.ignore_eos, bool):
            raise invalid(f"ignore_eos must be a boolean, got {self.ignore_eos!r}", "ignore_eos")
        if self.deadline is not None:
            _check_float("deadline", self.deadline, lo=0.0, hi=math.inf)
        if self.resume_from is not None:
            _check_int("resume_from", self.resume_from, lo=0)

    def chat(self) -> tuple[ChatMessage, ...]:
        """The request as a conversation: a bare prompt is one user turn, images before text."""
        if self.messages:
            return self.messages
        parts = [ContentPart("image")] * len(self.images) + [ContentPart("text", self.prompt)]
        return (ChatMessage("user", tuple(parts)),)


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def __post_init__(self):
        if self.prompt_tokens < 0 or self.completion_tokens < 0:
            raise ValueError("token counts are non-negative")


@dataclass(slots=True, frozen=True)
class Timings:
    ttft_ms: float  # arrival -> first token
    tpot_ms: float  # mean gap between later tokens (0 with fewer than two tokens)

    def __post_init__(self):
        if not (self.ttft_ms >= 0 and self.tpot_ms >= 0):
            raise ValueError("timings are non-negative")


@dataclass(slots=True, frozen=True)
class GenerateDelta:
    """New tokens (and the text they complete) since the previous delta of one request."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finish_reason: str | None = None  # set on the final delta only
    usage: Usage | None = None        # final delta only
    timings: Timings | None = None    # final delta only

    def __post_init__(self):
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        final = self.finish_reason is not None
        if final and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}")
        if final != (self.usage is not None) or final != (self.timings is not None):
            raise ValueError("usage and timings come exactly with the final delta")


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {value!r}", name)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise invalid(f"{name} must be {bound}, got {value}", name)


def _check_float(name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise invalid(f"{name} must be a number, got {value!r}", name)
    if not lo <= value <= hi:
        raise invalid(f"{name} must be in [{lo}, {hi}], got {value}", name)


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

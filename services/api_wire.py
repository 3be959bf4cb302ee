"""Wire formats → GenerateRequest: gRPC protobuf bytes and OpenAI JSON bodies, strictly.

Life: the gRPC ingress receives the raw bytes of a call (its deserializer is the identity) and calls
`parse_proto`; the HTTP ingress reads the body under `limits.max_request_bytes` and calls
`parse_json`. Both then map the message to a GenerateRequest (`request_from_proto`,
`request_from_openai`), whose construction validates values. Everything a client can get wrong —
undecodable protobuf, invalid UTF-8, a field of the wrong type, an unknown field, JSON nested past
`limits.max_json_depth`, NaN — becomes TrisectError(INVALID_ARGUMENT) whose message names the field
and never a Python class or a stack. Unknown fields are refused rather than ignored, so a client's
typo (`max_token`) fails loudly instead of silently generating 64 tokens.
"""
from __future__ import annotations

import json
import math
import time
import uuid

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from cluster.config import Limits
from services.api_inputs import parse_data_url
from services.api_types import ChatMessage, ContentPart, GenerateRequest
from services.errors import invalid
from services.proto import pb

TIMEOUT_HEADER = "x-trisect-timeout"
RESUME_HEADER = "x-trisect-resume-from"   # HTTP header and gRPC metadata (docs/api.md, resuming)
_ROLE_ALIASES = {"developer": "system"}
_UNSUPPORTED = ("tools", "functions", "logprobs", "audio", "prediction")
# OpenAI fields with no effect on greedy/sampled text here: accepted only at their neutral value
_NEUTRAL = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
            "logit_bias": ({}, None), "top_logprobs": (0, None), "tool_choice": ("none", "auto", None),
            "response_format": ({"type": "text"}, None), "modalities": (["text"], None)}
_IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls")
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream", "stream_options", "n", "ignore_eos", "return_token_ids",
          *_UNSUPPORTED, *_NEUTRAL, *_IGNORED}
_MESSAGE_KEYS = {"role", "content", "name"}


# ---- gRPC ---------------------------------------------------------------------------------------
def parse_proto(raw) -> "pb.GenerateRequest":
    """Raw bytes (or an already parsed message) -> GenerateRequest proto with no unknown fields."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            msg = pb.GenerateRequest.FromString(bytes(raw))
        except DecodeError:
            field, why = _wire_fault(bytes(raw), pb.GenerateRequest.DESCRIPTOR) or ("request", "is not a "
                                                                                 "valid protobuf message")
            raise invalid(f"undecodable trisect.v1.GenerateRequest: {field} {why}", field) from None
    else:
        msg = raw
    _refuse_unknown(msg, "")
    return msg


def _refuse_unknown(msg, path: str) -> None:
    for f in UnknownFieldSet(msg):
        known = msg.DESCRIPTOR.fields_by_number.get(f.field_number)
        if known is not None:   # a known number with another wire type: the wrong type was sent
            raise invalid(f"field {path}{known.name} has the wrong type", path + known.name)
        raise invalid(f"unknown field number {f.field_number} in {path or 'the request'}",
                      path.rstrip(".") or None)
    for fd, value in msg.ListFields():
        if fd.message_type is not None:
            for i, sub in enumerate(value if fd.is_repeated else [value]):
                _refuse_unknown(sub, f"{path}{fd.name}[{i}]." if fd.is_repeated else f"{path}{fd.name}.")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise IndexError
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _wire_fault(buf: bytes, desc, path: str = "") -> tuple[str, str] | None:
    """Walk the wire format to say which field made the parser give up (the parser does not)."""
    i = 0
    while i < len(buf):
        try:
            tag, i = _varint(buf, i)
        except IndexError:
            return (path.rstrip(".") or "request"), "holds a corrupt field tag"
        num, wire = tag >> 3, tag & 7
        if num == 0:
            return (path.rstrip(".") or "request"), "holds field number 0 (corrupt bytes)"
        fd = desc.fields_by_number.get(num)
        name = path + (fd.name if fd else f"#{num}")
        try:
            if wire == 0:
                _, i = _varint(buf, i)
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            elif wire == 2:
                size, i = _varint(buf, i)
                chunk, i = buf[i:i + size], i + size
                if i > len(buf):
                    raise IndexError
                if fd is not None and fd.type == fd.TYPE_STRING:
                    chunk.decode("utf-8")
                elif fd is not None and fd.message_type is not None:
                    inner = _wire_fault(chunk, fd.message_type, name + ".")
                    if inner:
                        return inner
            else:
                return name, f"has an unsupported wire type {wire}"
        except UnicodeDecodeError:
            return name, "is not valid UTF-8"
        except IndexError:
            return name, "is truncated"
        if i > len(buf):
            return name, "is truncated"
    return None


def _image_bytes(img, param: str) -> bytes:
    kind = img.WhichOneof("source")
    if kind == "data":
        return img.data
    if kind == "url":
        return parse_data_url(img.url, param)
    raise invalid("an Image has neither data nor url", param)


def request_from_proto(msg, api_key: str | None = None, deadline: float | None = None) -> GenerateRequest:
    """GenerateRequest proto (or its raw bytes) -> validated GenerateRequest (INVALID_ARGUMENT)."""
    msg = parse_proto(msg)
    images = [_image_bytes(img, "images") for img in msg.images]
    messages = []
    for m in msg.messages:
        parts = []
        for p in m.content:
            kind = p.WhichOneof("part")
            if kind == "image":
                images.append(_image_bytes(p.image, "messages"))
                parts.append(ContentPart("image"))
            elif kind == "text":
                parts.append(ContentPart("text", p.text))
        messages.append(ChatMessage(m.role, tuple(parts)))
    if messages and msg.images:
        raise invalid("with `messages`, put images inside the messages, not in `images`", "images")
    opt = {f: getattr(msg, f) for f in ("max_tokens", "temperature", "top_p", "top_k", "seed")
           if msg.HasField(f)}
    return GenerateRequest(request_id=msg.request_id or uuid.uuid4().hex, prompt=msg.prompt,
                           messages=tuple(messages), images=tuple(images), stop=tuple(msg.stop),
                           ignore_eos=msg.ignore_eos, model=msg.model, api_key=api_key,
                           deadline=deadline, **opt)


# ---- HTTP (OpenAI) ------------------------------------------------------------------------------
def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes, limits: Limits):
    """A request body -> its JSON value, refusing bad UTF-8, NaN/Infinity and deep nesting."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:   # nesting past the interpreter's limit: certainly past ours
        raise invalid(f"the JSON body nests deeper than {limits.max_json_depth} levels "
                      "(max_json_depth)") from None
    except (ValueError, UnicodeDecodeError):
        raise invalid("the request body is not valid JSON (UTF-8, no NaN or Infinity)") from None
    stack = [(body, 1)]
    while stack:            # iterative: the depth check itself must not recurse
        value, depth = stack.pop()
        if depth > limits.max_json_depth:
            raise invalid(f"the JSON body nests deeper than {limits.max_json_depth} levels "
                          "(max_json_depth)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return body


def _typed(body: dict, name: str, types, what: str):
    value, types = body.get(name), types if isinstance(types, tuple) else (types,)
    if value is not None and (isinstance(value, bool) and bool not in types or not isinstance(value, types)):
        raise invalid(f"`{name}` must be {what}, got {json.dumps(value)[:40]}", name)
    return value


def _parse_content(content, images: list[bytes]) -> tuple[ContentPart, ...]:
    if content is None:
        return ()
    if isinstance(content, str):
        return (ContentPart("text", content),)
    if not isinstance(content, list):
        raise invalid("message content must be a string or a list of parts", "messages")
    parts = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str) and set(p) <= {"type", "text"}:
            parts.append(ContentPart("text", p["text"]))
        elif kind == "image_url" and set(p) <= {"type", "image_url"}:
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(parse_data_url(url, "messages"))
            parts.append(ContentPart("image"))
        else:
            raise invalid("each content part must be {\"type\": \"text\", \"text\": <string>} or "
                          "{\"type\": \"image_url\", \"image_url\": {\"url\": <data: URL>}}", "messages")
    return tuple(parts)


def request_from_openai(body, request_id: str, api_key: str | None,
                        deadline: float | None) -> tuple[GenerateRequest, dict]:
    """OpenAI chat.completions body -> (GenerateRequest, response options)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise invalid(f"unknown field `{unknown[0][:64]}`", unknown[0][:64])
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("`messages` must be a non-empty list", "messages")
    for name in _UNSUPPORTED:
        if body.get(name):
            raise invalid(f"`{name}` is not supported by this server", name)
    for name, neutral in _NEUTRAL.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            raise invalid(f"`{name}` is not supported by this server (only its default)", name)
    if body.get("n", 1) is not None and (body.get("n", 1) != 1 or isinstance(body.get("n"), bool)):
        raise invalid("only n=1 is supported", "n")
    images: list[bytes] = []
    messages = []
    for m in raw:
        if not isinstance(m, dict):
            raise invalid("each message must be an object", "messages")
        extra = sorted(k for k in set(m) - _MESSAGE_KEYS if m[k] is not None)
        if extra:
            raise invalid(f"message field `{extra[0][:64]}` is not supported", "messages")
        role = m.get("role")
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        messages.append(ChatMessage(role, _parse_content(m.get("content"), images)))
    number = (int, float)
    max_tokens = _typed(body, "max_completion_tokens", int, "an integer")
    params = {"max_tokens": _typed(body, "max_tokens", int, "an integer") if max_tokens is None else max_tokens,
              "temperature": _typed(body, "temperature", number, "a number"),
              "top_p": _typed(body, "top_p", number, "a number"),
              "top_k": _typed(body, "top_k", int, "an integer"), "seed": _typed(body, "seed", int, "an integer")}
    if params["temperature"] is None:
        params["temperature"] = 1.0              # OpenAI's default, not greedy
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise invalid("`stop` must be a string or a list of strings", "stop")
    flags = {n: _typed(body, n, bool, "true or false") for n in ("stream", "ignore_eos", "return_token_ids")}
    stream_options = _typed(body, "stream_options", dict, "an object") or {}
    include_usage = _typed(stream_options, "include_usage", bool, "true or false")
    model = _typed(body, "model", str, "a string")
    req = GenerateRequest(request_id=request_id, messages=tuple(messages), images=tuple(images),
                          stop=tuple(stop), ignore_eos=bool(flags["ignore_eos"]), model=model or "",
                          api_key=api_key, deadline=deadline,
                          **{k: v for k, v in params.items() if v is not None})
    opts = {"stream": bool(flags["stream"]), "include_usage": bool(include_usage),
            "token_ids": bool(flags["return_token_ids"])}
    return req, opts


def deadline_from_header(raw: str | None) -> float | None:
    """`x-trisect-timeout: <seconds>` -> absolute time.time() deadline."""
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise invalid(f"{TIMEOUT_HEADER} must be a number of seconds", TIMEOUT_HEADER) from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise invalid(f"{TIMEOUT_HEADER} must be a positive, finite number of seconds", TIMEOUT_HEADER)
    return time.time() + seconds


def resume_from_header(raw: str | None) -> int | None:
    """`x-trisect-resume-from: <tokens the client already has>` -> GenerateRequest.resume_from."""
    if raw is None:
        return None
    s = raw.strip()
    if not (s.isascii() and s.isdigit()) or len(s) > 9:
        raise invalid(f"{RESUME_HEADER} must be the number of tokens already received (0 or more)",
                      RESUME_HEADER)
    return int(s)

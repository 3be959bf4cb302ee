"""HTTP front door: an OpenAI-compatible subset on FastAPI (the stack Ray Serve already ships).

Life of a chat completion: the bearer key is checked (401), the JSON body is mapped to a
GenerateRequest (`image_url` parts must be `data:` URLs; anything malformed -> 400), an optional
`x-trisect-timeout` header (seconds) becomes the deadline (504 when it passes). Non-streaming
requests collect the Backend's deltas into one `chat.completion`; streaming ones wait for the first
delta — so admission errors (400/429/503) still get a real status — then send SSE
`chat.completion.chunk`s and `data: [DONE]`. An error after the stream started is sent as an SSE
`{"error": ...}` event, which the official client raises. A client that disconnects closes the
stream, and closing the backend stream aborts the request and frees its KV blocks.
`build_http_app(...)` is a pure function so a Ray Serve ingress deployment can mount the same app.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.api_inputs import parse_data_url
from services.api_metrics import CONTENT_TYPE, ApiMetrics
from services.api_types import ChatMessage, ContentPart, GenerateDelta, GenerateRequest
from services.auth import ApiKeys
from services.errors import ErrorCode, TrisectError, invalid

TIMEOUT_HEADER = "x-trisect-timeout"
_DISCONNECT_POLL_S = 0.25
_ROLE_ALIASES = {"developer": "system"}
_UNSUPPORTED = ("tools", "functions", "logprobs", "audio", "prediction")


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
        if kind == "text" and isinstance(p.get("text"), str):
            parts.append(ContentPart("text", p["text"]))
        elif kind == "image_url":
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(parse_data_url(url, "messages"))
            parts.append(ContentPart("image"))
        else:
            raise invalid(f"unsupported content part {kind!r}: use 'text' or 'image_url'",
                          "messages")
    return tuple(parts)


def request_from_openai(body, request_id: str, api_key: str | None,
                        deadline: float | None) -> tuple[GenerateRequest, dict]:
    """OpenAI chat.completions body -> (GenerateRequest, response options)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("`messages` must be a non-empty list", "messages")
    for name in _UNSUPPORTED:
        if body.get(name):
            raise invalid(f"`{name}` is not supported by this server", name)
    if body.get("n", 1) not in (1, None):
        raise invalid("only n=1 is supported", "n")
    images: list[bytes] = []
    messages = []
    for m in raw:
        if not isinstance(m, dict):
            raise invalid("each message must be an object", "messages")
        role = _ROLE_ALIASES.get(m.get("role"), m.get("role"))
        messages.append(ChatMessage(role, _parse_content(m.get("content"), images)))
    params = {"max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
              "temperature": body.get("temperature", 1.0),  # OpenAI's default, not greedy
              "top_p": body.get("top_p"), "top_k": body.get("top_k"), "seed": body.get("seed")}
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)):
        raise invalid("`stop` must be a string or a list of strings", "stop")
    req = GenerateRequest(request_id=request_id, messages=tuple(messages), images=tuple(images),
                          stop=tuple(stop), ignore_eos=bool(body.get("ignore_eos", False)),
                          model=body.get("model") or "", api_key=api_key, deadline=deadline,
                          **{k: v for k, v in params.items() if v is not None})
    opts = {"stream": bool(body.get("stream", False)),
            "include_usage": bool((body.get("stream_options") or {}).get("include_usage")),
            "token_ids": bool(body.get("return_token_ids", False))}
    return req, opts


def _usage(d: GenerateDelta) -> dict:
    u = d.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _error_response(e: TrisectError) -> JSONResponse:
    return JSONResponse(e.openai_body(), status_code=e.http_status)


def build_http_app(backend, auth: ApiKeys | None = None,
                   metrics: ApiMetrics | None = None) -> FastAPI:
    auth = auth or ApiKeys()
    app = FastAPI(title="trisect", docs_url=None, redoc_url=None, openapi_url=None)

    def authenticate(request: Request) -> str | None:
        header = request.headers.get("authorization")
        auth.check(header)
        return header.partition(" ")[2].strip() if header else None

    def fail(e: TrisectError) -> JSONResponse:
        if metrics:
            metrics.failed("http", e.code.value)
        return _error_response(e)

    @app.get("/health")
    async def health():
        backend.stats()  # raises (-> 500) if the backend is broken
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render() if metrics else b"", media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authenticate(request)
        except TrisectError as e:
            return fail(e)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                            "owned_by": "trisect"} for n in backend.model_names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            key = authenticate(request)
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise invalid("the request body is not valid JSON") from None
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            req, opts = request_from_openai(body, rid, key, _deadline(request))
            stream = backend.generate(req)
            first = await _first(stream)
        except TrisectError as e:
            return fail(e)
        created, model = int(time.time()), backend.model_names()[0]
        if opts["stream"]:
            return StreamingResponse(_sse(stream, first, req.request_id, created, model, opts),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            deltas = await _collect_unless_disconnected(request, stream, first)
        except TrisectError as e:
            return fail(e)
        if deltas is None:  # the client left; the request was aborted
            return Response(status_code=499)
        last = deltas[-1]
        if metrics:
            metrics.finished("http", last)
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None,
                  "message": {"role": "assistant", "content": "".join(d.text for d in deltas)}}
        if opts["token_ids"]:
            choice["token_ids"] = [t for d in deltas for t in d.token_ids]
        return {"id": f"chatcmpl-{req.request_id}", "object": "chat.completion",
                "created": created, "model": model, "choices": [choice], "usage": _usage(last),
                "timings": {"ttft_ms": last.timings.ttft_ms, "tpot_ms": last.timings.tpot_ms}}

    async def _sse(stream, first, rid, created, model, opts):
        def chunk(delta: dict, finish=None, extra=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            choice.update(extra or {})
            return "data: " + json.dumps({"id": f"chatcmpl-{rid}", "object":
                                          "chat.completion.chunk", "created": created,
                                          "model": model, "choices": [choice]}) + "\n\n"
        try:
            yield chunk({"role": "assistant", "content": ""})
            d = first
            while True:
                extra = {"token_ids": list(d.token_ids)} if opts["token_ids"] else None
                if d.text or d.finish_reason or (extra and d.token_ids):
                    yield chunk({"content": d.text} if d.text else {}, d.finish_reason, extra)
                if d.finish_reason is not None:
                    break
                d = await anext(stream)
            if metrics:
                metrics.finished("http", d)
            if opts["include_usage"]:
                yield "data: " + json.dumps({"id": f"chatcmpl-{rid}", "object":
                                             "chat.completion.chunk", "created": created,
                                             "model": model, "choices": [],
                                             "usage": _usage(d)}) + "\n\n"
        except TrisectError as e:
            if metrics:
                metrics.failed("http", e.code.value)
            yield "data: " + json.dumps(e.openai_body()) + "\n\n"
        except BaseException:  # the client disconnected (GeneratorExit / cancellation)
            if metrics:
                metrics.failed("http", "CANCELLED")
            raise
        finally:
            await stream.aclose()  # a disconnect lands here too: abort, free KV blocks
        yield "data: [DONE]\n\n"

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return _error_response(TrisectError(ErrorCode.INTERNAL,
                                            f"internal error: {type(exc).__name__}"))

    return app


async def _collect_unless_disconnected(request: Request, stream, first: GenerateDelta):
    """All deltas of a non-streaming request, or None if the client disconnected first (Starlette
    does not cancel a plain handler on disconnect, so we watch for it ourselves)."""
    async def collect():
        deltas = [first]
        if first.finish_reason is None:
            async for d in stream:
                deltas.append(d)
        return deltas

    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # the generator must be idle before it can be closed
        await stream.aclose()


async def _first(stream) -> GenerateDelta:
    try:
        return await anext(stream)
    except BaseException:
        await stream.aclose()
        raise


def _deadline(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise invalid(f"{TIMEOUT_HEADER} must be a number of seconds", TIMEOUT_HEADER) from None
    if not seconds > 0:
        raise invalid(f"{TIMEOUT_HEADER} must be positive", TIMEOUT_HEADER)
    return time.time() + seconds

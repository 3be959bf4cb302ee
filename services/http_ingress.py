"""HTTP front door: an OpenAI-compatible subset on FastAPI (the stack Ray Serve already ships).

Life of a chat completion: the bearer key is checked (401), the JSON body is mapped to a
GenerateRequest (`image_url` parts must be `data:` URLs; anything malformed -> 400), an optional
`x-trisect-timeout` header (seconds) becomes the deadline (504 when it passes). Non-streaming
requests collect the Backend's deltas into one `chat.completion`; streaming ones wait for the first
delta — so admission errors (400/429/503) still get a real status, a 429 with `Retry-After` — then send SSE
`chat.completion.chunk`s and `data: [DONE]`. An error after the stream started is sent as an SSE
`{"error": ...}` event, which the official client raises. A client that disconnects closes the
stream, and closing the backend stream aborts the request and frees its KV blocks.
`build_http_app(...)` is a pure function so a Ray Serve ingress deployment can mount the same app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.config import Limits
from services.api_metrics import CONTENT_TYPE, ApiMetrics
from services.api_types import GenerateDelta
from services.api_wire import (RESUME_HEADER, TIMEOUT_HEADER, deadline_from_header, parse_json, request_from_openai,
                               resume_from_header)
from services import request_log
from services.auth import ApiKeys
from services.errors import ErrorCode, TrisectError

log = logging.getLogger(__name__)
_DISCONNECT_POLL_S = 0.25


def _usage(d: GenerateDelta) -> dict:
    u = d.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _error_response(e: TrisectError) -> JSONResponse:
    return JSONResponse(e.openai_body(), status_code=e.http_status, headers=e.http_headers)


def build_http_app(backend, auth: ApiKeys | None = None,
                   metrics: ApiMetrics | None = None) -> FastAPI:
    auth = auth or ApiKeys()
    limits = getattr(backend, "limits", None) or Limits()
    app = FastAPI(title="trisect", docs_url=None, redoc_url=None, openapi_url=None)

    def authenticate(request: Request) -> str | None:
        header = request.headers.get("authorization")
        auth.check(header)
        return header.partition(" ")[2].strip() if header else None

    def fail(e: TrisectError) -> JSONResponse:
        if metrics:
            metrics.failed("http", e.code.value)
        return _error_response(e.with_message(request_log.with_id(e.message)))

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
            rid = request.state.request_id = request_log.incoming(request.headers.get("x-request-id"))
            try:
                body = parse_json(await _read_body(request, limits.max_request_bytes), limits)
            except _TooLarge as e:
                if metrics:
                    metrics.failed("http", ErrorCode.INVALID_ARGUMENT.value)
                return e.response()
            req, opts = request_from_openai(body, rid, key,
                                            deadline_from_header(request.headers.get(TIMEOUT_HEADER)))
            req.resume_from = resume_from_header(request.headers.get(RESUME_HEADER))
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
            if metrics:
                metrics.failed("http", "CANCELLED")
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
            e = e.with_message(request_log.with_id(e.message, rid))
            yield "data: " + json.dumps(e.openai_body()) + "\n\n"
        except BaseException as e:  # the client disconnected (GeneratorExit / cancellation), or a bug
            if metrics:
                gone = isinstance(e, (GeneratorExit, asyncio.CancelledError))
                metrics.failed("http", "CANCELLED" if gone else ErrorCode.INTERNAL.value)
            raise
        finally:
            await stream.aclose()  # a disconnect lands here too: abort, free KV blocks
        yield "data: [DONE]\n\n"

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "-")
        log.error("request failed: request_id=%s", rid, exc_info=exc)
        if metrics:
            metrics.failed("http", ErrorCode.INTERNAL.value)  # the scrapeable count of our bugs
        return _error_response(TrisectError(ErrorCode.INTERNAL, f"internal error (request_id {rid}); "
                                            "see the server log"))

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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over `limit` — from content-length
    before reading a byte, or while reading a chunked one — so it is never buffered whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLarge(Exception):
    def __init__(self, size: int, limit: int):
        super().__init__(f"the request body is {'over ' if size > limit else ''}{size} bytes; the limit "
                         f"is {limit} (max_request_bytes)")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": "invalid_request_error",
                                       "param": None, "code": "request_too_large"}}, status_code=413)

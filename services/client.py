"""Python SDK for trisect's gRPC API (sync and async, streaming) and the `trisect client` command.

Life: `TrisectClient(target, api_key=...)` opens one channel; `stream(...)` yields GenerateDelta as
tokens arrive and cancels the call if you stop iterating; `generate(...)` collects a Completion.
`AsyncTrisectClient` is the same over grpc.aio. Every failure surfaces as TrisectError with the
server's code and message. Images may be bytes, a local file path (read here, on the client) or a
`data:` URL; chat messages use OpenAI's shape (`{"type": "image_url", "image_url": {"url": ...}}`
or `{"type": "image", "image": <bytes|path>}` parts).

    with TrisectClient("127.0.0.1:50051") as c:
        for d in c.stream("describe this", images=["cat.png"], max_tokens=32):
            print(d.text, end="", flush=True)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api_types import GenerateDelta, Timings, Usage
from services.errors import TrisectError
from services.proto import pb, pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
_OPTIONS = [("grpc.max_receive_message_length", 100 * 2**20),
            ("grpc.max_send_message_length", 100 * 2**20)]


@dataclass(slots=True, frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    timings: Timings


def _image(img) -> "pb.Image":
    if isinstance(img, (bytes, bytearray, memoryview)):
        return pb.Image(data=bytes(img))
    if isinstance(img, str) and img.startswith("data:"):
        return pb.Image(url=img)
    return pb.Image(data=Path(img).read_bytes())  # a client-side file; only bytes travel


def _message(m: dict) -> "pb.ChatMessage":
    content = m.get("content", "")
    if isinstance(content, str):
        return pb.ChatMessage(role=m["role"], content=[pb.ContentPart(text=content)])
    parts = []
    for p in content:
        if p["type"] == "text":
            parts.append(pb.ContentPart(text=p["text"]))
        elif p["type"] == "image_url":
            url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
            parts.append(pb.ContentPart(image=_image(url)))
        elif p["type"] == "image":
            parts.append(pb.ContentPart(image=_image(p["image"])))
        else:
            raise ValueError(f"unknown content part type {p['type']!r}")
    return pb.ChatMessage(role=m["role"], content=parts)


def build_request(prompt: str | None = None, *, images=(), messages=None, model: str = "",
                  request_id: str = "", max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, stop=(),
                  ignore_eos: bool = False) -> "pb.GenerateRequest":
    req = pb.GenerateRequest(model=model, request_id=request_id, prompt=prompt or "",
                             images=[_image(i) for i in images],
                             messages=[_message(m) for m in messages or ()],
                             stop=[stop] if isinstance(stop, str) else list(stop),
                             ignore_eos=ignore_eos)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(req, name, value)
    return req


def delta_from_proto(msg) -> GenerateDelta:
    final = msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return GenerateDelta(
        msg.request_id, tuple(msg.token_ids), msg.text, _FINISH[msg.finish_reason] if final else None,
        Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens) if final else None,
        Timings(msg.timings.ttft_ms, msg.timings.tpot_ms) if final else None)


def _collect(deltas: list[GenerateDelta]) -> Completion:
    last = deltas[-1]
    return Completion(last.request_id, "".join(d.text for d in deltas),
                      tuple(t for d in deltas for t in d.token_ids), last.finish_reason,
                      last.usage, last.timings)


def _error(e: grpc.RpcError) -> TrisectError:
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else ()
    return TrisectError.from_grpc(e.code(), e.details(), trailers)   # keeps `retry-after`


class _Base:
    def __init__(self, target: str | None, api_key: str | None, timeout: float | None):
        self.target = target or os.environ.get("TRISECT_TARGET", DEFAULT_TARGET)
        api_key = api_key if api_key is not None else os.environ.get("TRISECT_API_KEY")
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout  # default per-call deadline in seconds (None = none)

    def _md(self, kw: dict, resume_from: int | None) -> tuple:
        """`resume_from=N` with the broken stream's `request_id`: the rest of that stream, after the
        N tokens already received, from whichever ingress answers (docs/api.md, resuming)."""
        if resume_from is None:
            return self._metadata
        if not kw.get("request_id"):
            raise ValueError("resume_from needs the request_id of the stream to resume")
        return self._metadata + (("x-request-id", kw["request_id"]), ("x-trisect-resume-from", str(resume_from)))


class TrisectClient(_Base):
    def __init__(self, target: str | None = None, *, api_key: str | None = None,
                 timeout: float | None = None, credentials: grpc.ChannelCredentials | None = None):
        super().__init__(target, api_key, timeout)
        self._channel = (grpc.secure_channel(self.target, credentials, _OPTIONS) if credentials
                         else grpc.insecure_channel(self.target, _OPTIONS))
        self._stub = pb_grpc.GenerationStub(self._channel)

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, resume_from: int | None = None,
               **kw) -> Iterator[GenerateDelta]:
        call = self._stub.Generate(build_request(prompt, **kw), metadata=self._md(kw, resume_from),
                                   timeout=timeout if timeout is not None else self.timeout)
        try:
            for msg in call:
                yield delta_from_proto(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()  # no-op when finished; stops the server's work when we quit early

    def generate(self, prompt: str | None = None, **kw) -> Completion:
        return _collect(list(self.stream(prompt, **kw)))

    def list_models(self) -> list[str]:
        try:
            resp = self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata,
                                         timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None
        return [m.id for m in resp.models]

    def health(self, service: str = "") -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncTrisectClient(_Base):
    def __init__(self, target: str | None = None, *, api_key: str | None = None,
                 timeout: float | None = None, credentials: grpc.ChannelCredentials | None = None):
        super().__init__(target, api_key, timeout)
        self._channel = (grpc.aio.secure_channel(self.target, credentials, _OPTIONS) if credentials
                         else grpc.aio.insecure_channel(self.target, _OPTIONS))
        self._stub = pb_grpc.GenerationStub(self._channel)

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     resume_from: int | None = None, **kw) -> AsyncIterator[GenerateDelta]:
        call = self._stub.Generate(build_request(prompt, **kw), metadata=self._md(kw, resume_from),
                                   timeout=timeout if timeout is not None else self.timeout)
        try:
            async for msg in call:
                yield delta_from_proto(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | None = None, **kw) -> Completion:
        return _collect([d async for d in self.stream(prompt, **kw)])

    async def list_models(self) -> list[str]:
        try:
            resp = await self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata,
                                               timeout=self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None
        return [m.id for m in resp.models]

    async def health(self, service: str = "") -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def main(argv: list[str] | None = None) -> int:
    """`trisect client [--image F]... "prompt"`: stream the answer to stdout; 0 ok, 1 error."""
    ap = argparse.ArgumentParser(prog="trisect client", description=main.__doc__)
    ap.add_argument("prompt", nargs="?", help="the user's text (omit with --list-models)")
    ap.add_argument("--image", action="append", default=[], help="image file; repeatable")
    ap.add_argument("--target", default=None, help=f"host:port (env TRISECT_TARGET, default "
                                                   f"{DEFAULT_TARGET})")
    ap.add_argument("--api-key", default=None, help="API key (env TRISECT_API_KEY)")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    ap.add_argument("--list-models", action="store_true")
    ap.add_argument("--usage", action="store_true", help="print usage and timings to stderr")
    args = ap.parse_args(argv)
    if not args.list_models and not args.prompt:
        ap.error("a prompt is required")
    try:
        with TrisectClient(args.target, api_key=args.api_key, timeout=args.timeout) as c:
            if args.list_models:
                print("\n".join(c.list_models()))
                return 0
            final = None
            for d in c.stream(args.prompt, images=args.image, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos):
                sys.stdout.write(d.text)
                sys.stdout.flush()
                final = d
            sys.stdout.write("\n")
            if args.usage and final is not None:
                print(f"[{final.finish_reason}] prompt_tokens={final.usage.prompt_tokens} "
                      f"completion_tokens={final.usage.completion_tokens} "
                      f"ttft_ms={final.timings.ttft_ms:.1f} tpot_ms={final.timings.tpot_ms:.1f}",
                      file=sys.stderr)
            return 0
    except TrisectError as e:
        print(f"error: {e.code.value}: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:  # an unreadable --image file
        print(f"error: {e}", file=sys.stderr)
        return 1

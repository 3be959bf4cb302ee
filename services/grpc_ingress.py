"""gRPC front door: trisect.v1.Generation over grpc.aio, plus Health and reflection.

Life of a call: `Generate` checks `authorization: Bearer <key>` metadata, converts the proto into a
GenerateRequest (validation -> INVALID_ARGUMENT), turns the client's deadline into an absolute one,
and relays the Backend's deltas as GenerateResponse messages; the last carries finish_reason, usage
and timings. A TrisectError ends the call with its status code and message as the detail. When the
client cancels or its deadline passes, grpc.aio cancels this handler: closing the backend stream
aborts the request everywhere and frees its KV blocks. Health ("" and trisect.v1.Generation) and
reflection are unauthenticated so probes and grpcurl work without a key.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.api_inputs import parse_data_url
from services.api_metrics import ApiMetrics
from services.api_types import ChatMessage, ContentPart, GenerateDelta, GenerateRequest
from services.auth import ApiKeys
from services.errors import ErrorCode, TrisectError, invalid
from services.proto import SERVICE_NAME, pb, pb_grpc

log = logging.getLogger(__name__)
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
DEFAULT_MAX_MESSAGE_BYTES = 100 * 2**20  # room for several full-size images in one request


def _image_bytes(img, param: str) -> bytes:
    kind = img.WhichOneof("source")
    if kind == "data":
        return img.data
    if kind == "url":
        return parse_data_url(img.url, param)
    raise invalid("an Image has neither data nor url", param)


def request_from_proto(msg, api_key: str | None = None,
                       deadline: float | None = None) -> GenerateRequest:
    """GenerateRequest proto -> validated GenerateRequest (raises INVALID_ARGUMENT)."""
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


def delta_to_proto(d: GenerateDelta):
    out = pb.GenerateResponse(request_id=d.request_id, token_ids=d.token_ids, text=d.text)
    if d.finish_reason is not None:
        out.finish_reason = _FINISH[d.finish_reason]
        out.usage.prompt_tokens = d.usage.prompt_tokens
        out.usage.completion_tokens = d.usage.completion_tokens
        out.timings.ttft_ms = d.timings.ttft_ms
        out.timings.tpot_ms = d.timings.tpot_ms
    return out


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, backend, auth: ApiKeys | None = None, metrics: ApiMetrics | None = None):
        self.backend = backend
        self.auth = auth or ApiKeys()
        self.metrics = metrics

    def _authenticate(self, context) -> str | None:
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        header = md.get("authorization")
        self.auth.check(header)
        return header.partition(" ")[2].strip() if header else None

    async def Generate(self, request, context):
        code = "CANCELLED"  # what we record if the client goes away mid-stream
        try:
            key = self._authenticate(context)
            remaining = context.time_remaining()
            deadline = time.time() + remaining if remaining is not None else None
            req = request_from_proto(request, key, deadline)
            stream = self.backend.generate(req)
            try:
                async for delta in stream:
                    yield delta_to_proto(delta)
                    if delta.finish_reason is not None:
                        code = "OK"
                        if self.metrics:
                            self.metrics.finished("grpc", delta)
            finally:
                await stream.aclose()  # on cancel/deadline: abort the request, free its blocks
        except TrisectError as e:
            code = e.code.value
            await context.abort(e.grpc_status, e.message)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            code = ErrorCode.INTERNAL.value
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
        finally:
            if self.metrics and code != "OK":
                self.metrics.failed("grpc", code)

    async def ListModels(self, request, context):
        try:
            self._authenticate(context)
        except TrisectError as e:
            await context.abort(e.grpc_status, e.message)
        return pb.ListModelsResponse(models=[pb.Model(id=n) for n in self.backend.model_names()])


@dataclass(slots=True)
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while we drain
        await self.server.stop(grace)


async def start_grpc_server(backend, address: str = "127.0.0.1:0", auth: ApiKeys | None = None,
                            metrics: ApiMetrics | None = None,
                            max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> GrpcServer:
    """Start serving on `address` (port 0 = any free port) in the running event loop."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)])
    pb_grpc.add_GenerationServicer_to_server(GenerationService(backend, auth, metrics), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise TrisectError(ErrorCode.UNAVAILABLE, f"could not bind gRPC address {address}")
    await server.start()
    return GrpcServer(server, port, health)

"""gRPC front door: trisect.v1.Generation over grpc.aio, plus Health and reflection.

Life of a call: `Generate` checks `authorization: Bearer <key>` metadata, converts the proto into a
GenerateRequest (validation -> INVALID_ARGUMENT), turns the client's deadline into an absolute one,
and relays the Backend's deltas as GenerateResponse messages; the last carries finish_reason, usage
and timings. A TrisectError ends the call with its status code and message as the detail (and, when
refused under load, `retry-after` trailing metadata). When the
client cancels or its deadline passes, grpc.aio cancels this handler: closing the backend stream
aborts the request everywhere and frees its KV blocks. Health ("" and trisect.v1.Generation) and
reflection are unauthenticated so probes and grpcurl work without a key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from cluster.config import Limits
from services.api_metrics import ApiMetrics
from services.api_types import GenerateDelta
from services.api_wire import RESUME_HEADER, request_from_proto, resume_from_header
from services import request_log
from services.auth import ApiKeys
from services.errors import ErrorCode, TrisectError
from services.proto import SERVICE_NAME, pb, pb_grpc

log = logging.getLogger(__name__)
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


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
        """`request` is the call's raw bytes: api_wire parses them, so undecodable protobuf,
        bad UTF-8 and unknown fields get INVALID_ARGUMENT naming the field, not grpc's UNKNOWN."""
        code = "CANCELLED"  # what we record if the client goes away mid-stream
        req = None
        try:
            key = self._authenticate(context)
            remaining = context.time_remaining()
            deadline = time.time() + remaining if remaining is not None else None
            req = request_log.adopt(request_from_proto(request, key, deadline), context.invocation_metadata())
            md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
            req.resume_from = resume_from_header(md.get(RESUME_HEADER))
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
            await context.abort(e.grpc_status, request_log.with_id(e.message, req and req.request_id),
                                e.grpc_trailers)          # RESOURCE_EXHAUSTED: `retry-after` seconds
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = ErrorCode.INTERNAL.value
            rid = req.request_id if req is not None else "-"
            log.exception("Generate failed: request_id=%s", rid)   # counted below as INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request_id {rid}); "
                                "see the server log")
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
                            max_message_bytes: int | None = None) -> GrpcServer:
    """Start serving on `address` (port 0 = any free port; loopback unless told otherwise) in the
    running event loop. Messages over `max_message_bytes` (default: the backend's
    limits.max_request_bytes) are refused by gRPC itself, RESOURCE_EXHAUSTED, before parsing."""
    if max_message_bytes is None:
        max_message_bytes = getattr(getattr(backend, "limits", None), "max_request_bytes", Limits().max_request_bytes)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)])
    service = GenerationService(backend, auth, metrics)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
        # no request deserializer: Generate parses the bytes itself (see its docstring)
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, response_serializer=pb.GenerateResponse.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString)}),))
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

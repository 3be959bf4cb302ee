"""The one error type a client can cause or see, and how each front door spells it.

Life: anything below the ingresses (input validation, admission, the engine loop, the orchestrator)
raises `TrisectError(code, message)` with a message written for the person who sent the request.
The gRPC ingress turns it into a status (`grpc_status`), the HTTP ingress into an HTTP status plus
OpenAI's error body (`http_status`, `openai_body`), and the client SDK turns a status it receives
back into the same TrisectError (`from_grpc`) so callers handle one type whatever the transport.
A refusal under load (RESOURCE_EXHAUSTED) carries `retry_after_s`: HTTP sends it as `Retry-After`
(whole seconds, rounded up), gRPC as `retry-after` trailing metadata (seconds, decimal).
"""

from __future__ import annotations

import enum
import math

import grpc

RETRY_AFTER_MD = "retry-after"   # gRPC trailing metadata key of retry_after_s (docs/api.md)


class ErrorCode(str, enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"      # the request itself is wrong; retrying won't help
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # queue full / rate limited; retry later
    UNAVAILABLE = "UNAVAILABLE"                # no instance can serve a stage; retry later
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"    # the client's deadline passed before completion
    UNAUTHENTICATED = "UNAUTHENTICATED"        # missing or wrong API key
    INTERNAL = "INTERNAL"                      # a bug on our side; never caused by the client


_GRPC = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
_FROM_GRPC = {v: k for k, v in _GRPC.items()}
# CANCELLED reaches a client only when it cancelled itself; surface it as a deadline-like stop.
_FROM_GRPC[grpc.StatusCode.CANCELLED] = ErrorCode.DEADLINE_EXCEEDED

_HTTP = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}

# OpenAI's `error.type` vocabulary, so SDKs that branch on it behave.
_OPENAI_TYPE = {
    ErrorCode.INVALID_ARGUMENT: "invalid_request_error",
    ErrorCode.UNAUTHENTICATED: "authentication_error",
    ErrorCode.RESOURCE_EXHAUSTED: "rate_limit_error",
    ErrorCode.UNAVAILABLE: "service_unavailable_error",
    ErrorCode.DEADLINE_EXCEEDED: "timeout_error",
    ErrorCode.INTERNAL: "server_error",
}


class TrisectError(Exception):
    """An error with a transport-neutral code and a human-readable message."""

    __slots__ = ("code", "message", "param", "retry_after_s")

    def __init__(self, code: ErrorCode | str, message: str, param: str | None = None,
                 retry_after_s: float | None = None):
        code = ErrorCode(code)
        if not message:
            raise ValueError("TrisectError needs a human-readable message")
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.param = param  # the offending request field, when there is one (OpenAI's `param`)
        self.retry_after_s = retry_after_s  # when a retry may succeed (overload refusals), seconds

    def with_message(self, message: str) -> "TrisectError":
        """The same error (code, field, retry-after) told with another message."""
        return TrisectError(self.code, message, self.param, self.retry_after_s)

    @property
    def http_headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}  # RFC 9110: whole seconds

    @property
    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return ((RETRY_AFTER_MD, f"{max(0.001, self.retry_after_s):.3f}"),)

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return _GRPC[self.code]

    @property
    def http_status(self) -> int:
        return _HTTP[self.code]

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": _OPENAI_TYPE[self.code],
                          "param": self.param, "code": self.code.value.lower()}}

    @classmethod
    def from_grpc(cls, status: grpc.StatusCode, details: str | None, trailing_metadata=()) -> "TrisectError":
        code = _FROM_GRPC.get(status, ErrorCode.INTERNAL)
        retry = None
        for key, value in trailing_metadata or ():
            if key == RETRY_AFTER_MD:
                try:
                    retry = float(value)
                except ValueError:
                    pass
        return cls(code, details or status.name.lower(), retry_after_s=retry)

    def __reduce__(self):
        # Survives pickling across Ray actor boundaries with its code intact.
        return (type(self), (self.code.value, self.message, self.param, self.retry_after_s))


def invalid(message: str, param: str | None = None) -> TrisectError:
    return TrisectError(ErrorCode.INVALID_ARGUMENT, message, param)

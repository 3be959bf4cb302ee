"""Logs that follow a request: one id, from the client or made here, on every stage's log lines.

Life of an id: the ingress takes the client's `x-request-id` (HTTP header or gRPC metadata; else the
id Ray Serve's proxy already gave the HTTP request; else a fresh uuid) with `incoming(...)`, which
also `bind`s it: the id goes into this task's context and into Ray Serve's request context, which
every DeploymentHandle call carries to the stage replicas — so each stage's Serve access line
(`CALL prefill OK 31.2ms`), each exception Serve logs, and each line trisect's own loggers write
while serving it carry the same id. The ingress also returns it with every error (`with_id`).

`setup()` (each replica's constructor, `trisect serve --mode local`) routes the loggers of trisect's
packages: inside a Serve replica to Serve's own handlers (the replica's log file, text or JSON per
the deployment's `logging_config`, request id included); elsewhere to stderr through
`RequestIdFilter`, as text or — with `TRISECT_LOG_JSON=1` — one JSON object per line.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import uuid

PACKAGES = ("services", "cluster", "decoders", "encoders")
_ID = contextvars.ContextVar("trisect_request_id", default="")
_MAX_LEN = 128


def _serve_context():
    serve_context = sys.modules.get("ray.serve.context")
    if serve_context is None:
        return None
    try:
        return serve_context._get_serve_request_context()
    except Exception:
        return None


def valid(rid: str | None) -> bool:
    return bool(rid) and len(rid) <= _MAX_LEN and rid.isprintable() and not any(c.isspace() for c in rid)


def incoming(client_id: str | None) -> str:
    """The id of a new request (a client's malformed id is replaced, not trusted into logs), bound."""
    rid = client_id if valid(client_id) else ""
    if not rid:
        ctx = _serve_context()                       # Serve's proxy names every HTTP request
        rid = ctx.request_id if ctx is not None and valid(ctx.request_id) else uuid.uuid4().hex
    bind(rid)
    return rid


def bind(rid: str) -> None:
    """This task (and tasks it starts) now serve `rid`; so do the Serve calls it makes."""
    _ID.set(rid)
    serve_context = sys.modules.get("ray.serve.context")
    if serve_context is not None and _serve_context() is not None:
        try:
            serve_context._set_request_context(request_id=rid)
        except Exception:                            # private Serve API: degrade to our own context
            pass


def current() -> str:
    rid = _ID.get()
    if not rid:
        ctx = _serve_context()
        rid = ctx.request_id if ctx is not None else ""
    return rid


def with_id(message: str, rid: str | None = None) -> str:
    """An error message as the client receives it: naming the request, so logs can be searched."""
    rid = rid or current()
    return f"{message} (request id {rid})" if rid and rid not in message else message


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _serve_handlers() -> list[logging.Handler]:
    if "ray.serve" not in sys.modules:
        return []
    try:
        from ray import serve
        serve.get_replica_context()                  # raises outside a replica
    except Exception:
        return []
    return list(logging.getLogger("ray.serve").handlers)


def setup(json_logs: bool | None = None, level: int = logging.INFO) -> None:
    """Idempotent: route trisect's package loggers as the module docstring says."""
    handlers = _serve_handlers()
    if not handlers:
        if json_logs is None:
            json_logs = os.environ.get("TRISECT_LOG_JSON", "") not in ("", "0", "false")
        h = logging.StreamHandler()
        h.addFilter(RequestIdFilter())
        h.setFormatter(JsonFormatter() if json_logs else logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
        handlers = [h]
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers = list(handlers)
        logger.setLevel(level)
        logger.propagate = False


def adopt(req, metadata):
    """A gRPC request takes the id in its `x-request-id` metadata when there is one (over the
    message's `request_id` or the generated one), bound."""
    md = {k.lower(): v for k, v in (metadata or ())}
    rid = md.get("x-request-id")
    if valid(rid) and rid != req.request_id:
        from dataclasses import replace
        req = replace(req, request_id=rid)
    bind(req.request_id)
    return req

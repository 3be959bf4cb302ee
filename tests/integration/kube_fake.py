"""A loopback fake of the Kubernetes API server, for the cluster/k8s.py tests.

Life of the fake: `FakeKube()` starts a real HTTP server on 127.0.0.1 (a free port) in a thread;
`seed(obj)` stores a RayService (validated first) as a `kubectl apply` would, with `uid`,
`generation` and a `resourceVersion` from one store-wide counter. The real kubernetes client,
pointed at `url`, then reads and patches it:

- GET    /apis/ray.io/v1/namespaces/NS/rayservices/NAME → the object (404 Status if absent);
- PATCH  same path → only `application/json-patch+json` (415 otherwise: the fake implements no
  merge patch, so a client that forgot the content type is caught); the RFC 6902 operations are
  applied to a copy (a failed `test`, a missing path → 422, as the API server does); then, as the
  API server does, optimistic concurrency — a `metadata.resourceVersion` in the patched object that
  is not the stored one is 409 Conflict; then the whole object is validated against the official
  KubeRay CRD schema (tests/chart/crd_schema.py, strict: unknown keys are errors) plus the
  `format: int32` ranges of its integer fields (KubeRay's Go int32s; an out-of-range count could
  never be decoded by the operator) → 422 Invalid with one cause per violation; else stored with a
  new resourceVersion (and generation, when the spec changed) and returned.

`status` is a subresource in the CRD, so a write through the main resource keeps the stored status.
`before_patch` (a callable, or None) runs inside each PATCH before it is applied: the tests use it
to play a concurrent writer (the operator, another client) that writes the object in between.
Every request is recorded in `requests` as (method, path, content type, parsed body).
"""
from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.chart.crd_schema import errors as crd_errors, validator

PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)/(?P<name>[^/?]+)")
INT32 = (-2**31, 2**31 - 1)


class PatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"path {path!r} does not start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc, path: str):
    parts = _pointer(path)
    if not parts:
        raise PatchError("the fake does not patch the whole document")
    node = doc
    for p in parts[:-1]:
        try:
            node = node[int(p)] if isinstance(node, list) else node[p]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PatchError(f"path {path!r}: no {p!r}") from None
    return node, parts[-1]


def apply_patch(doc, ops: list[dict]):
    """RFC 6902 add / remove / replace / test on a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        node, key = _parent(doc, path)
        if isinstance(node, list):
            idx = len(node) if key == "-" and kind == "add" else int(key) if key.isdigit() else -1
            if not 0 <= idx < len(node) + (kind == "add"):
                raise PatchError(f"{kind} {path!r}: index out of range")
        elif not isinstance(node, dict):
            raise PatchError(f"{kind} {path!r}: parent is not a container")
        elif kind != "add" and key not in node:
            raise PatchError(f"{kind} operation does not apply: doc is missing path {path!r}")
        if kind == "add":
            node.insert(idx, op["value"]) if isinstance(node, list) else node.__setitem__(key, op["value"])
        elif kind == "replace":
            node[idx if isinstance(node, list) else key] = op["value"]
        elif kind == "remove":
            del node[idx if isinstance(node, list) else key]
        elif kind == "test":
            if node[idx if isinstance(node, list) else key] != op.get("value"):
                raise PatchError(f"test operation failed at {path!r}")
        else:
            raise PatchError(f"unsupported operation {kind!r}")
    return doc


def _int32_errors(node, schema, path=()) -> list[str]:
    """Integers outside int32 where the schema says `format: int32` (jsonschema does not check it)."""
    out = []
    if schema.get("format") == "int32" and isinstance(node, int) and not INT32[0] <= node <= INT32[1]:
        out.append(f"{'/'.join(map(str, path))}: {node} is out of range for int32")
    if isinstance(node, dict):
        for k, v in node.items():
            if k in schema.get("properties", {}):
                out += _int32_errors(v, schema["properties"][k], path + (k,))
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(node):
            out += _int32_errors(v, schema["items"], path + (i,))
    return out


def validate(obj: dict) -> list[str]:
    errs = crd_errors(obj)
    if not errs:
        schema = validator(obj["kind"], obj["apiVersion"].split("/", 1)[1]).schema
        errs = _int32_errors(obj, schema)
    return errs


def status(code: int, reason: str, message: str, causes: list[str] = ()) -> dict:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if causes:
        body["details"] = {"causes": [{"reason": "FieldValueInvalid", "field": c.partition(": ")[0],
                                       "message": c.partition(": ")[2]} for c in causes]}
    return body


class FakeKube:
    def __init__(self):
        self.objects: dict[tuple, dict] = {}
        self.requests: list[tuple] = []
        self.before_patch = None
        self._rv = itertools.count(1000)
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake._serve(self, "GET")

            def do_PATCH(self):
                fake._serve(self, "PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def key(self, obj: dict) -> tuple:
        return (obj["apiVersion"], obj["metadata"].get("namespace", "default"), obj["kind"].lower() + "s",
                obj["metadata"]["name"])

    def seed(self, obj: dict) -> dict:
        errs = validate(obj)
        assert not errs, errs
        obj = copy.deepcopy(obj)
        obj["metadata"].update(uid=str(uuid.uuid4()), generation=1, resourceVersion=str(next(self._rv)))
        self.objects[self.key(obj)] = obj
        return obj

    def write(self, key: tuple, obj: dict) -> dict:
        """Store `obj` as the new version of `key` (the fake's own writes, as a concurrent client's)."""
        old = self.objects[key]
        obj = copy.deepcopy(obj)
        obj["status"] = copy.deepcopy(old.get("status"))
        if obj.get("status") is None:
            obj.pop("status")
        meta = obj["metadata"]
        meta["generation"] = old["metadata"]["generation"] + (obj.get("spec") != old.get("spec"))
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[key] = obj
        return obj

    def get(self, namespace: str, name: str) -> dict:
        return copy.deepcopy(self.objects[("ray.io/v1", namespace, "rayservices", name)])

    def _serve(self, h: BaseHTTPRequestHandler, method: str):
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip()
        body = json.loads(raw) if raw else None
        self.requests.append((method, h.path, ctype, body))
        with self._lock:
            code, out = self._answer(method, h.path, ctype, body)
        data = json.dumps(out).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _answer(self, method, path, ctype, body) -> tuple[int, dict]:
        m = PATH.match(path)
        if not m:
            return 404, status(404, "NotFound", f"the fake serves no {path}")
        key = (f"{m['group']}/{m['version']}", m["ns"], m["plural"], m["name"])
        what = f'{m["plural"]}.{m["group"]} "{m["name"]}"'
        if key not in self.objects:
            return 404, status(404, "NotFound", f"{what} not found")
        if method == "GET":
            return 200, self.objects[key]
        if ctype != "application/json-patch+json":
            return 415, status(415, "UnsupportedMediaType", f"the fake accepts only JSON Patch, got {ctype!r}")
        if not isinstance(body, list):
            return 400, status(400, "BadRequest", "a JSON Patch is a list of operations")
        if self.before_patch:
            self.before_patch(self, key)
        stored = self.objects[key]
        try:
            new = apply_patch(stored, body)
        except (PatchError, KeyError, TypeError) as e:
            return 422, status(422, "Invalid", f"{what} is invalid: {e}")
        if new["metadata"].get("resourceVersion") != stored["metadata"]["resourceVersion"]:
            return 409, status(409, "Conflict", f"Operation cannot be fulfilled on {what}: the object has been "
                                                "modified; please apply your changes to the latest version and try again")
        errs = validate(new)
        if errs:
            return 422, status(422, "Invalid", f"{new['kind']}.{m['group']} \"{m['name']}\" is invalid: "
                                               + "; ".join(errs), errs)
        return HTTPStatus.OK, self.write(key, new)


"""The trisect v1 protobuf messages and gRPC stubs, compiled from the .proto at import time.

Life: the first `import services.proto` runs grpcio-tools' in-process protoc over
`services/proto/trisect/v1/generation.proto` (tens of milliseconds) and registers the generated
modules `services.proto.trisect.v1.generation_pb2` / `..._pb2_grpc` plus the descriptors in the
default pool, which is what server reflection serves. Nothing is written to disk, so stubs can never
be stale and never disagree with the protobuf runtime that is installed (committed gencode pins a
minimum runtime version). grpcio-tools is therefore a runtime dependency.

    from services.proto import pb, pb_grpc
    pb.GenerateRequest(prompt="hi");  pb_grpc.GenerationStub(channel)
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

# The proto is named relative to the directory that holds the `services` package, so the generated
# modules land under `services.proto...` and descriptor file names are stable across machines.
_ROOT = Path(__file__).resolve().parents[2]
PROTO_FILE = "services/proto/trisect/v1/generation.proto"
SERVICE_NAME = "trisect.v1.Generation"


def _load():
    # protoc resolves includes through sys.path; make sure our root is on it just for this call
    # (an editable install may import `services` through a finder instead of a path entry).
    added = str(_ROOT) not in sys.path
    if added:
        sys.path.insert(0, str(_ROOT))
    try:
        return grpc.protos_and_services(PROTO_FILE)
    finally:
        if added:
            sys.path.remove(str(_ROOT))


pb, pb_grpc = _load()

# Import paths Ray Serve's gRPC proxy (grpc_servicer_functions) can name.
add_GenerationServicer_to_server = pb_grpc.add_GenerationServicer_to_server
GenerationServicer = pb_grpc.GenerationServicer
GenerationStub = pb_grpc.GenerationStub

__all__ = ["pb", "pb_grpc", "PROTO_FILE", "SERVICE_NAME", "GenerationServicer", "GenerationStub",
           "add_GenerationServicer_to_server"]

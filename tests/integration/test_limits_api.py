"""Limits over real servers: the HTTP body cap (413, before parsing) and the gRPC message cap, a
prompt far over its byte limit refused over both transports without touching the tokenizer, and a
non-streaming HTTP client that disconnects getting its engine request aborted (KV blocks back)."""
import dataclasses
import json
import socket
import time

import grpc
import pytest

from decoders.config import EngineConfig
from services.api_inputs import Limits
from services.grpc_ingress import start_grpc_server
from services.http_ingress import build_http_app
from services.local_backend import LocalBackend
from services.proto import pb
from tests.integration.test_api_grpc import LoopThread, wait_idle
from tests.integration.test_api_http import Server
from tests.integration.test_fuzz_api import post
from tests.unit.test_limits import Counting

LIMITS = Limits(max_request_bytes=64 * 1024, max_prompt_bytes=2000, max_tokens=200)


@pytest.fixture(scope="module")
def stack(tiny_llava):
    counted = dataclasses.replace(tiny_llava, tokenizer=Counting(tiny_llava.tokenizer),
                                  processor=Counting(tiny_llava.processor))
    loop = LoopThread()
    backend = LocalBackend(counted, EngineConfig(num_kv_blocks=64, max_model_len=256), LIMITS)
    server = loop.run(start_grpc_server(backend))
    http = Server(build_http_app(backend))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                    options=[("grpc.max_send_message_length", 2**24)])
    yield {"backend": backend, "counted": counted, "port": http.port, "channel": channel}
    channel.close()
    http.stop()
    loop.run(server.stop(0))
    backend.close()
    loop.close()


def generate(stack, msg, timeout=30):
    rpc = stack["channel"].unary_stream("/trisect.v1.Generation/Generate",
                                        request_serializer=pb.GenerateRequest.SerializeToString,
                                        response_deserializer=pb.GenerateResponse.FromString)
    return list(rpc(msg, timeout=timeout))


def uses(loaded) -> int:
    return loaded.tokenizer.uses + loaded.processor.uses


def test_body_over_the_cap_is_413_before_parsing(stack):
    big = b"[" + b"1," * 40_000 + b"1]"                     # 80 KB of valid JSON, not a request
    status, body = post(stack["port"], "/v1/chat/completions", big)
    assert status == 413 and "max_request_bytes" in json.loads(body)["error"]["message"]
    # chunked, no content-length: refused while reading, the body is never buffered whole
    with socket.create_connection(("127.0.0.1", stack["port"])) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                  b"content-type: application/json\r\n\r\n")
        chunk = b"x" * 30_000
        for _ in range(3):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        s.sendall(b"0\r\n\r\n")
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413")


def test_grpc_message_over_the_cap_is_refused_by_grpc(stack):
    with pytest.raises(grpc.RpcError) as e:
        generate(stack, pb.GenerateRequest(prompt="x", images=[pb.Image(data=b"\0" * 100_000)]))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_prompt_far_over_the_limit_is_refused_without_tokenizing(stack):
    counted = stack["counted"]
    generate(stack, pb.GenerateRequest(prompt="a small one", max_tokens=2))
    assert uses(counted) > 0                                 # the counter sees real requests
    before = uses(counted)
    far = "token " * 10_000                                  # 60 KB: 30x the byte limit, under the body cap
    with pytest.raises(grpc.RpcError) as e:
        generate(stack, pb.GenerateRequest(prompt=far))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_bytes" in e.value.details()
    status, body = post(stack["port"], "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": far}]}).encode())
    err = json.loads(body)["error"]
    assert status == 400 and "max_prompt_bytes" in err["message"] and err["param"] == "messages"
    assert uses(counted) == before                           # never reached the tokenizer
    wait_idle(stack["backend"])


def test_non_streaming_client_that_disconnects_frees_its_kv_blocks(stack):
    backend = stack["backend"]
    aborted, real_abort = [], backend.engine.abort
    backend.engine.abort = lambda rid: aborted.append((rid, real_abort(rid))) or aborted[-1][1]
    body = json.dumps({"messages": [{"role": "user", "content": "a long story"}], "max_tokens": 190,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", stack["port"])) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"x-request-id: gone-1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        end = time.monotonic() + 10
        while backend.stats().kv_blocks_used == 0 and time.monotonic() < end:
            time.sleep(0.01)
        assert backend.stats().kv_blocks_used > 0           # it is decoding
    try:
        wait_idle(backend, timeout=10)                       # blocks are back ...
    finally:
        del backend.engine.abort
    assert ("gone-1", True) in aborted                       # ... because the close aborted it mid-decode

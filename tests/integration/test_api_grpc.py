"""gRPC API over a real loopback channel: token-exactness, every error status, cancellation and
deadlines leaving nothing behind, 32 concurrent streams, health, reflection, auth, the CLI."""
import asyncio
import io
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from decoders.config import EngineConfig
from services.api_inputs import Limits
from services.auth import ApiKeys
from services.client import AsyncTrisectClient, TrisectClient, main
from services.errors import ErrorCode, TrisectError
from services.grpc_ingress import start_grpc_server
from services.local_backend import LocalBackend
from tests.integration.engine_hold import held
from tests.reference import hf_generate, hf_greedy

KEY = "test-key-1"
LIMITS = Limits(max_images=2, max_image_bytes=300_000, max_image_pixels=1024 * 1024,
                max_tokens=200, max_in_flight=48)


def png(image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


class LoopThread:
    """An event loop in a thread, hosting servers the way `trisect serve` does."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def stack(tiny_llava):
    loop = LoopThread()
    backend = LocalBackend(tiny_llava, EngineConfig(num_kv_blocks=96, max_model_len=256), LIMITS)
    small = LocalBackend(tiny_llava, EngineConfig(num_kv_blocks=32, max_model_len=256),
                         Limits(max_in_flight=1))
    servers = [loop.run(start_grpc_server(b, auth=ApiKeys([KEY, "other"]))) for b in (backend, small)]
    yield {"backend": backend, "small": small, "target": f"127.0.0.1:{servers[0].port}",
           "small_target": f"127.0.0.1:{servers[1].port}"}
    for s in servers:
        loop.run(s.stop(0))
    backend.close()
    small.close()
    loop.close()


@pytest.fixture(scope="module")
def client(stack):
    with TrisectClient(stack["target"], api_key=KEY) as c:
        yield c


@pytest.fixture(scope="module")
def valid(tiny_llava):
    """A small text-only request and its HF reference, used to prove the server still serves."""
    ref = hf_greedy(tiny_llava, "list three animals", [], 6)

    def check(c):
        out = c.generate("list three animals", max_tokens=6, ignore_eos=True)
        assert list(out.token_ids) == ref and out.finish_reason == "length"
    return check


def wait_idle(backend, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not backend.stats().idle and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = backend.stats()
    assert stats.idle, stats
    assert not backend.engine.seqs


def test_text_image_token_exact_sync_and_async(stack, client, tiny_llava, make_image):
    image = make_image(7)
    ref = hf_greedy(tiny_llava, "describe the picture", [image], 12)
    assert len(set(ref)) >= 4
    deltas = list(client.stream("describe the picture", images=[png(image)], max_tokens=12,
                                ignore_eos=True))
    assert [t for d in deltas for t in d.token_ids] == ref
    final = deltas[-1]
    assert final.finish_reason == "length" and final.usage.completion_tokens == 12
    assert final.usage.prompt_tokens > 16 and final.timings.ttft_ms > 0
    text = "".join(d.text for d in deltas)
    assert text == tiny_llava.tokenizer.decode(ref, skip_special_tokens=True)

    async def via_async():
        async with AsyncTrisectClient(stack["target"], api_key=KEY) as ac:
            msgs = [{"role": "user", "content": [{"type": "image", "image": png(image)},
                                                 {"type": "text", "text": "describe the picture"}]}]
            return await ac.generate(messages=msgs, max_tokens=12, ignore_eos=True)
    assert list(asyncio.run(via_async()).token_ids) == ref


def _bomb() -> bytes:
    from PIL import Image
    return png(Image.new("RGB", (3000, 3000)), optimize=True)  # 9 Mpx in a few KB


@pytest.mark.parametrize("kwargs, code, words", [
    (dict(prompt="x", images=[b"not an image at all"]), "INVALID_ARGUMENT", "not a recognised"),
    (dict(prompt="x", images=[b"\x89PNG" + b"0" * 400_000]), "INVALID_ARGUMENT", "bytes"),
    (dict(prompt="x", images=["BOMB"]), "INVALID_ARGUMENT", "pixels"),
    (dict(prompt="x", images=["IMG"] * 3), "INVALID_ARGUMENT", "at most 2"),
    (dict(prompt="x", images=["data:text/plain;base64,aGk="]), "INVALID_ARGUMENT", "image/*"),
    (dict(prompt="cat " * 300), "INVALID_ARGUMENT", "context length"),
    (dict(prompt="x", max_tokens=1000), "INVALID_ARGUMENT", "max_tokens"),
    (dict(prompt="x", temperature=7.0), "INVALID_ARGUMENT", "temperature"),
    (dict(prompt="x", top_p=0.0), "INVALID_ARGUMENT", "top_p"),
    (dict(prompt="x", model="gpt-nope"), "INVALID_ARGUMENT", "not served"),
    (dict(), "INVALID_ARGUMENT", "exactly one"),
])
def test_invalid_requests_then_serves(client, valid, stack, make_image, kwargs, code, words):
    images = kwargs.get("images")
    if images:
        subst = {"BOMB": _bomb(), "IMG": png(make_image(1))}
        kwargs = dict(kwargs, images=[subst.get(i, i) if isinstance(i, str) else i
                                      for i in images])
    with pytest.raises(TrisectError) as e:
        client.generate(**kwargs)
    assert e.value.code.value == code and words in e.value.message, e.value
    valid(client)
    wait_idle(stack["backend"])


def test_auth_rejects_missing_and_wrong_key(stack, valid):
    for key in (None, "", "wrong"):
        with TrisectClient(stack["target"], api_key=key) as c:
            with pytest.raises(TrisectError) as e:
                c.generate("hi", max_tokens=2)
            assert e.value.code is ErrorCode.UNAUTHENTICATED
            with pytest.raises(TrisectError):
                c.list_models()
    with TrisectClient(stack["target"], api_key="other") as c:  # any configured key works
        valid(c)


def test_queue_full_is_resource_exhausted(stack, valid):
    with TrisectClient(stack["small_target"], api_key=KEY) as c:
        hog = c.stream("keep going", max_tokens=150, ignore_eos=True)
        next(hog)
        with pytest.raises(TrisectError) as e:
            c.generate("hi", max_tokens=2)
        assert e.value.code is ErrorCode.RESOURCE_EXHAUSTED and "busy" in e.value.message
        hog.close()
        wait_idle(stack["small"])
        valid(c)


def test_draining_is_unavailable(stack, client, valid):
    stack["backend"].drain()
    try:
        with pytest.raises(TrisectError) as e:
            client.generate("hi", max_tokens=2)
        assert e.value.code is ErrorCode.UNAVAILABLE
    finally:
        stack["backend"].resume()
    valid(client)


def test_cancelled_stream_frees_kv_blocks(stack, client, valid):
    stream = client.stream("tell me a long story", max_tokens=150, ignore_eos=True)
    for _ in range(3):
        next(stream)
    assert stack["backend"].stats().kv_blocks_used > 0
    stream.close()  # cancels the RPC
    wait_idle(stack["backend"])
    valid(client)


def test_expired_deadline_frees_kv_blocks(stack, client, valid):
    backend = stack["backend"]
    # the engine is held, so the request provably cannot finish before its deadline on any machine
    with held(backend), pytest.raises(TrisectError) as e:
        client.generate("tell me a long story", max_tokens=190, ignore_eos=True, timeout=0.4)
    assert e.value.code is ErrorCode.DEADLINE_EXCEEDED
    wait_idle(backend)
    # mid-stream: the deadline passes while the request holds KV blocks and the engine is held; once
    # the engine runs again the abort its deadline queued frees them (4 s: room for the first token)
    stream = client.stream("tell me a long story", max_tokens=190, ignore_eos=True, timeout=4)
    next(stream)
    with held(backend):
        assert backend.stats().kv_blocks_used > 0
        with pytest.raises(TrisectError) as e:
            for _ in stream:
                pass
    assert e.value.code is ErrorCode.DEADLINE_EXCEEDED
    wait_idle(backend)
    valid(client)


def test_32_concurrent_streams(stack):
    async def run():
        async with AsyncTrisectClient(stack["target"], api_key=KEY) as c:
            return await asyncio.gather(*[c.generate(f"story number {i}", max_tokens=8,
                                                     ignore_eos=True) for i in range(32)])
    results = asyncio.run(run())
    assert len(results) == 32
    assert all(r.finish_reason == "length" and len(r.token_ids) == 8 for r in results)
    assert len({r.request_id for r in results}) == 32
    wait_idle(stack["backend"])


def test_health_reflection_and_models(stack, client):
    assert client.health() and client.health("trisect.v1.Generation")
    assert not client.health("no.such.Service")
    assert client.list_models() == stack["backend"].model_names()
    with grpc.insecure_channel(stack["target"]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="trisect.v1.Generation")]
        answers = list(stub.ServerReflectionInfo(iter(reqs), timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"trisect.v1.Generation", "grpc.health.v1.Health"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto
    assert health_pb2.HealthCheckResponse.SERVING == 1


def test_cli_streams_to_stdout(stack, tiny_llava, make_image, tmp_path, capsys):
    path = tmp_path / "cat.png"
    path.write_bytes(png(make_image(3)))
    ref = hf_greedy(tiny_llava, "describe this", [make_image(3)], 6)
    rc = main(["--target", stack["target"], "--api-key", KEY, "--image", str(path),
               "--max-tokens", "6", "--ignore-eos", "--usage", "describe this"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == tiny_llava.tokenizer.decode(ref, skip_special_tokens=True) + "\n"
    assert "completion_tokens=6" in err
    assert main(["--target", stack["target"], "--api-key", "bad", "hi"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_multi_turn_interleaved_messages_token_exact(client, tiny_llava, make_image):
    image = make_image(4)
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "look:"},
                                         {"type": "image", "image": png(image)},
                                         {"type": "text", "text": "what is it?"}]},
            {"role": "assistant", "content": "a cat"},
            {"role": "user", "content": "and its colour?"}]
    hf_msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]
                if isinstance(m["content"], str) else
                [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
               for m in msgs]
    proc = tiny_llava.processor
    inputs = proc(text=[proc.apply_chat_template(hf_msgs, add_generation_prompt=True,
                                                 tokenize=False)], images=[image],
                  return_tensors="pt")
    ref = hf_generate(tiny_llava, inputs, 8)
    assert list(client.generate(messages=msgs, max_tokens=8, ignore_eos=True).token_ids) == ref

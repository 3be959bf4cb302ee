"""OpenAI-compatible HTTP API through a real uvicorn server and the official `openai` client:
token-exactness (streaming and not), every error status, disconnect/deadline cleanup, 32 concurrent
streams, auth, /health, /metrics, /v1/models."""
import asyncio
import base64
import copy
import io
import threading
import time
import urllib.request

import openai
import pytest
import uvicorn

from decoders.config import EngineConfig
from services.api_inputs import Limits
from services.api_metrics import ApiMetrics
from services.auth import ApiKeys
from services.http_ingress import build_http_app
from services.local_backend import LocalBackend
from tests.integration.engine_hold import held
from tests.reference import hf_greedy

KEY = "http-key"


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text, *urls):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}
                                         for u in urls] + [{"type": "text", "text": text}]}]


class Server:
    """uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tiny_llava):
    backend = LocalBackend(tiny_llava, EngineConfig(num_kv_blocks=96, max_model_len=256),
                           Limits(max_images=2, max_tokens=200, max_in_flight=48))
    small = LocalBackend(tiny_llava, EngineConfig(num_kv_blocks=32, max_model_len=256),
                         Limits(max_in_flight=1))
    servers = [Server(build_http_app(b, ApiKeys([KEY]), ApiMetrics(b))) for b in (backend, small)]
    yield {"backend": backend, "small": small, "url": servers[0].url, "small_url": servers[1].url}
    for s in servers:
        s.stop()
    backend.close()
    small.close()


def make_client(url, key=KEY):
    return openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(stack):
    return make_client(stack["url"])


@pytest.fixture(scope="module")
def valid(tiny_llava):
    ref = hf_greedy(tiny_llava, "list three animals", [], 6)

    def check(c):
        r = c.chat.completions.create(model="", messages=user("list three animals"), max_tokens=6,
                                      temperature=0, extra_body={"ignore_eos": True,
                                                                 "return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == ref
    return check


def wait_idle(backend, timeout=5.0):
    end = time.monotonic() + timeout
    while not backend.stats().idle and time.monotonic() < end:
        time.sleep(0.02)
    assert backend.stats().idle, backend.stats()


def test_token_exact_streaming_and_not(client, tiny_llava, make_image):
    image = make_image(11)
    ref = hf_greedy(tiny_llava, "what is in the image", [image], 10)
    ref_text = tiny_llava.tokenizer.decode(ref, skip_special_tokens=True)
    msgs = user("what is in the image", data_url(image))
    extra = {"ignore_eos": True, "return_token_ids": True}
    r = client.chat.completions.create(model="", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body=extra)
    assert r.choices[0].model_extra["token_ids"] == ref
    assert r.choices[0].message.content == ref_text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.total_tokens > 10
    chunks = list(client.chat.completions.create(
        model="", messages=msgs, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra))
    tokens = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids", [])]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert tokens == ref and text == ref_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def _bomb_url():
    from PIL import Image
    return data_url(Image.new("RGB", (5000, 5000)))


@pytest.mark.parametrize("body, words", [
    (dict(messages=user("x", "data:image/png;base64,AAAA")), "not a recognised"),
    (dict(messages=user("x", "https://example.com/cat.png")), "data: URLs"),
    (dict(messages=user("x", "BOMB")), "pixels"),
    (dict(messages=user("x", "IMG", "IMG", "IMG")), "at most 2"),
    (dict(messages=user("cat " * 300)), "context length"),
    (dict(messages=user("x"), max_tokens=0), "max_tokens"),
    (dict(messages=user("x"), temperature=9), "temperature"),
    (dict(messages=user("x"), n=2), "n=1"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "role"),
    (dict(messages=[]), "messages"),
])
def test_bad_requests_are_400_then_serves(client, stack, valid, make_image, body, words):
    body = copy.deepcopy(body)
    subst = {"BOMB": _bomb_url, "IMG": lambda: data_url(make_image(2))}
    for m in body["messages"]:
        for p in m["content"] if isinstance(m["content"], list) else ():
            if p["type"] == "image_url" and p["image_url"]["url"] in subst:
                p["image_url"]["url"] = subst[p["image_url"]["url"]]()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="", **body)
    assert words in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    valid(client)
    wait_idle(stack["backend"])


def test_auth_401(stack, valid):
    for key in ("wrong", "x" * 40):
        with pytest.raises(openai.AuthenticationError):
            make_client(stack["url"], key).models.list()
    req = urllib.request.Request(stack["url"] + "/v1/models")  # no header at all
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 401
    valid(make_client(stack["url"]))


def test_queue_full_429_and_draining_503(stack, valid):
    c = make_client(stack["small_url"])
    hog = c.chat.completions.create(model="", messages=user("go on"), max_tokens=150, stream=True,
                                    extra_body={"ignore_eos": True})
    it = iter(hog)
    next(it), next(it)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="", messages=user("hi"), max_tokens=2)
    hog.close()
    wait_idle(stack["small"])
    valid(c)
    stack["small"].drain()
    try:
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="", messages=user("hi"), max_tokens=2)
        assert e.value.status_code == 503
    finally:
        stack["small"].resume()
    valid(c)


def test_deadline_504_and_disconnect_free_everything(client, stack, valid):
    backend = stack["backend"]
    # the engine is held, so the request provably cannot finish before its deadline on any machine
    with held(backend), pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="", messages=user("long story"), max_tokens=190,
                                       extra_body={"ignore_eos": True},
                                       extra_headers={"x-trisect-timeout": "0.4"})
    assert e.value.status_code == 504
    wait_idle(backend)
    # mid-stream: the deadline passes while the request holds KV blocks and the engine is held; the
    # stream ends with the error event, and the abort frees them once the engine runs (4 s: room for
    # the first token)
    stream = client.chat.completions.create(model="", messages=user("long story"), max_tokens=190,
                                            stream=True, extra_body={"ignore_eos": True},
                                            extra_headers={"x-trisect-timeout": "4"})
    it = iter(stream)
    next(it)
    with held(backend):
        assert backend.stats().kv_blocks_used > 0
        with pytest.raises(openai.APIError) as e:
            for _ in it:
                pass
    assert "deadline" in str(e.value), e.value
    wait_idle(backend)
    stream = client.chat.completions.create(model="", messages=user("long story"), max_tokens=190,
                                            stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert stack["backend"].stats().kv_blocks_used > 0
    stream.close()  # drops the connection
    wait_idle(stack["backend"])
    valid(client)


def test_32_concurrent_streams(stack):
    async def run():
        c = openai.AsyncOpenAI(api_key=KEY, base_url=stack["url"] + "/v1", max_retries=0)

        async def one(i):
            s = await c.chat.completions.create(model="", messages=user(f"story {i}"),
                                                max_tokens=8, stream=True, temperature=0,
                                                extra_body={"ignore_eos": True})
            return [ch async for ch in s]
        try:
            return await asyncio.gather(*[one(i) for i in range(32)])
        finally:
            await c.close()
    results = asyncio.run(run())
    assert all(r[-1].choices[0].finish_reason == "length" for r in results)
    wait_idle(stack["backend"])


def test_models_health_metrics(client, stack):
    assert [m.id for m in client.models.list()] == stack["backend"].model_names()
    with urllib.request.urlopen(stack["url"] + "/health") as r:
        assert r.status == 200
    with urllib.request.urlopen(stack["url"] + "/metrics") as r:
        text = r.read().decode()
    assert 'trisect_requests_total{code="OK",transport="http"}' in text
    assert "trisect_backend_kv_blocks_used 0.0" in text
    assert "trisect_time_to_first_token_seconds_bucket" in text

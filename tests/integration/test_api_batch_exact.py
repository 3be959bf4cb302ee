"""40 concurrent requests over the real HTTP front door (uvicorn + the official `openai` client +
LocalBackend), one at temperature 1e-45, all token-exact against the independent reference.

The engine thread is held until every request has been parsed, prepared (images decoded and
encoded) and handed to the engine loop, so the 40 meet in one batch as they would under load and
the decode steps run 32–40 rows — the SkinnyLinear range. Llava runs here, Qwen2-VL gets the same
batch in-process (tests/engine/test_engine_batch_exact.py). Half the requests stream, half do not.
"""
import asyncio
import threading

import openai

from decoders.config import EngineConfig
from decoders.skinny_linear import SKINNY_ROWS
from services.api_inputs import Limits
from services.api_metrics import ApiMetrics
from services.auth import ApiKeys
from services.http_ingress import build_http_app
from services.local_backend import LocalBackend
from tests.integration.test_api_http import KEY, Server, data_url, wait_idle
from tests.reference import hf_greedy, mixed_batch

N, NEW_TOKENS = 40, 6
COLD = "b05"                                  # temperature 1e-45: greedy, never a division by it


def message(text, images):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
             + [{"type": "text", "text": text}]}]


def test_forty_concurrent_http_requests_are_token_exact(tiny_llava, make_image):
    backend = LocalBackend(tiny_llava, EngineConfig(block_size=16, num_kv_blocks=400, max_num_seqs=48,
                                                    max_num_batched_tokens=4096),
                           Limits(max_images=2, max_in_flight=48))
    decode_rows = []
    run = backend.engine.runner.run
    backend.engine.runner.run = lambda batch: decode_rows.append(sum(n == 1 for _, n in batch)) or run(batch)
    server = Server(build_http_app(backend, ApiKeys([KEY]), ApiMetrics(backend)))
    cases = mixed_batch(N, make_image)
    gate = threading.Event()

    async def one(client, i, rid, text, images):
        kw = dict(model="", messages=message(text, images), max_tokens=NEW_TOKENS,
                  temperature=1e-45 if rid == COLD else 0, extra_body={"ignore_eos": True, "return_token_ids": True})
        if i % 2:
            r = await client.chat.completions.create(**kw)
            return r.choices[0].model_extra["token_ids"], r.choices[0].finish_reason
        chunks = [c async for c in await client.chat.completions.create(stream=True, **kw)]
        tokens = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids", [])]
        return tokens, [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    async def release_when_all_queued():
        # a stream is registered in the same breath as its start command is queued to the engine thread
        while len(backend.loop._streams) < N:
            await asyncio.sleep(0.01)
        gate.set()

    async def run_all():
        client = openai.AsyncOpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0, timeout=300)
        try:
            jobs = [one(client, i, rid, *case) for i, (rid, case) in enumerate(cases.items())]
            results = await asyncio.gather(asyncio.wait_for(release_when_all_queued(), 240), *jobs)
            return dict(zip(cases, results[1:]))
        finally:
            await client.close()

    try:
        backend.loop.call(lambda engine: gate.wait(300))   # hold the engine thread
        results = asyncio.run(run_all())
        wait_idle(backend)
    finally:
        gate.set()
        server.stop()
        backend.close()

    wide = [r for r in decode_rows if r in SKINNY_ROWS and r >= 32]
    assert len(wide) >= NEW_TOKENS - 2 and max(decode_rows) <= 48, decode_rows
    assert all(reason == "length" for _, reason in results.values()), results
    wrong = {rid: (results[rid][0], ref) for rid, (text, images) in cases.items()
             if results[rid][0] != (ref := hf_greedy(tiny_llava, text, images, NEW_TOKENS))}
    assert not wrong, f"{len(wrong)}/{N} requests differ from HF generate: {wrong}"

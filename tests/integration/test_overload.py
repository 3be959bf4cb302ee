"""Overload over the real front doors: a burst at 10× capacity against a LocalBackend admitting 4.

The excess gets 429 + Retry-After at once — all of it answered while the engine thread is held, so
no refusal waited on admitted work — and the admitted requests complete token-exact against the
independent reference. Unheld bursts then run the engine for real: every answer is 200 or 429 with
Retry-After, admission, engine queues and KV never exceed the bound, and the process's RSS stays
flat. gRPC refuses with RESOURCE_EXHAUSTED and `retry-after` trailing metadata, which the client SDK
hands back; the Redis rate limiter (real redis-server) refuses the same way on both transports.
"""
import asyncio
import os
import threading
import time

import aiohttp
import pytest

from decoders.config import EngineConfig
from services.api_inputs import Limits
from services.api_metrics import ApiMetrics
from services.client import AsyncTrisectClient
from services.errors import ErrorCode, TrisectError
from services.grpc_ingress import start_grpc_server
from services.http_ingress import build_http_app
from services.local_backend import LocalBackend
from tests.integration.test_api_grpc import LoopThread
from tests.integration.test_api_http import Server, wait_idle
from tests.reference import hf_greedy

CAP, BURST, NEW_TOKENS, RETRY_S = 4, 40, 8, 2
PROMPTS = [f"overload {i}: the small red fox looks at the tall green tree" for i in range(8)]


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def body(i: int) -> dict:
    return {"model": "", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def refs(tiny_llava):
    return [hf_greedy(tiny_llava, p, [], NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def stack(tiny_llava):
    backend = LocalBackend(tiny_llava, EngineConfig(num_kv_blocks=64, max_model_len=256),
                           Limits(max_in_flight=CAP, overload_retry_after_s=RETRY_S))
    loop = LoopThread()
    grpc_server = loop.run(start_grpc_server(backend))
    http = Server(build_http_app(backend, metrics=ApiMetrics(backend)))
    yield {"backend": backend, "url": http.url, "target": f"127.0.0.1:{grpc_server.port}"}
    http.stop()
    loop.run(grpc_server.stop(0))
    loop.close()
    backend.close()


async def post(session, url, i):
    sent = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body(i)) as r:
        payload = await r.json()
        return {"i": i, "status": r.status, "retry_after": r.headers.get("Retry-After"), "body": payload,
                "seconds": time.perf_counter() - sent}


def check_answers(answers, refs):
    """Every answer is admitted and token-exact, or refused 429 with Retry-After and its error body."""
    for a in answers:
        if a["status"] == 200:
            assert a["body"]["choices"][0]["token_ids"] == refs[a["i"] % len(refs)], a
        else:
            assert a["status"] == 429 and a["retry_after"] == str(RETRY_S), a
            assert a["body"]["error"]["code"] == "resource_exhausted", a


def test_a_burst_at_ten_times_capacity_is_refused_fast_and_the_admitted_are_exact(stack, refs):
    backend = stack["backend"]
    gate = threading.Event()

    async def held_burst():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            tasks = [asyncio.create_task(post(s, stack["url"], i)) for i in range(BURST)]

            async def refusals_in():
                while sum(t.done() for t in tasks) < BURST - CAP:
                    await asyncio.sleep(0.01)
            await asyncio.wait_for(refusals_in(), 120)           # a hang guard, not a timing assertion
            refused = [t.result() for t in tasks if t.done()]
            pending = sum(not t.done() for t in tasks)
            in_flight = backend.stats().in_flight
            gate.set()                                           # now let the engine run the admitted
            return refused, pending, in_flight, await asyncio.gather(*tasks)

    backend.loop.call(lambda engine: gate.wait(180))             # hold the engine thread
    try:
        refused, pending, in_flight, answers = asyncio.run(held_burst())
    finally:
        gate.set()
    # every refusal came back while the admitted requests could not have finished: none waited on them
    assert pending == CAP and in_flight == CAP
    assert len(refused) == BURST - CAP and all(a["status"] == 429 for a in refused), refused
    admitted = [a for a in answers if a["status"] == 200]
    assert len(admitted) == CAP
    check_answers(answers, refs)
    slowest_refusal = max(a["seconds"] for a in refused)
    fastest_admitted = min(a["seconds"] for a in admitted)
    print(f"held burst: {BURST - CAP} refusals, slowest {slowest_refusal * 1e3:.1f} ms; "
          f"{CAP} admitted, fastest {fastest_admitted * 1e3:.1f} ms")
    wait_idle(backend)


def test_bursts_on_a_running_engine_stay_within_the_bound(stack, refs):
    backend = stack["backend"]
    seen = {"in_flight": 0, "engine": 0, "kv": 0}

    async def bursts(n):
        done = asyncio.Event()

        async def sample():
            while not done.is_set():
                s = backend.stats()
                seen["in_flight"] = max(seen["in_flight"], s.in_flight)
                seen["engine"] = max(seen["engine"], s.waiting + s.running)
                seen["kv"] = max(seen["kv"], s.kv_blocks_used)
                await asyncio.sleep(0.002)
        sampler = asyncio.create_task(sample())
        answers = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            for _ in range(n):
                answers += await asyncio.gather(*(post(s, stack["url"], i) for i in range(BURST)))
        done.set()
        await sampler
        return answers

    asyncio.run(bursts(1))                                        # warm-up: sockets, buffers, allocator
    before = rss_bytes()
    answers = asyncio.run(bursts(4))
    wait_idle(backend)
    after = rss_bytes()
    check_answers(answers, refs)
    ok = sum(a["status"] == 200 for a in answers)
    assert 0 < ok < len(answers), ok                              # some admitted, some refused, per burst
    assert backend._in_flight.peak <= CAP and seen["in_flight"] <= CAP and seen["engine"] <= CAP, seen
    ms = lambda status: sorted(a["seconds"] * 1e3 for a in answers if a["status"] == status)
    print(f"4 running bursts of {BURST}: {ok} admitted (median {ms(200)[ok // 2]:.0f} ms), {len(answers) - ok} "
          f"refused (median {ms(429)[(len(answers) - ok) // 2]:.1f} ms, slowest {ms(429)[-1]:.1f} ms); peaks "
          f"{seen}; RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert after - before < 0.10 * before, (before, after)        # loose: memory does not follow the burst


def test_grpc_refusal_carries_retry_after_to_the_client_sdk(stack, refs):
    backend = stack["backend"]
    gate = threading.Event()

    async def run():
        async with AsyncTrisectClient(stack["target"], timeout=120) as client:
            admitted = [asyncio.create_task(client.generate(PROMPTS[i], max_tokens=NEW_TOKENS, temperature=0.0,
                                                            ignore_eos=True)) for i in range(CAP)]
            while backend.stats().in_flight < CAP:
                await asyncio.sleep(0.01)
            with pytest.raises(TrisectError) as e:
                await client.generate(PROMPTS[0], max_tokens=NEW_TOKENS)
            gate.set()
            return e.value, await asyncio.gather(*admitted)

    backend.loop.call(lambda engine: gate.wait(180))
    try:
        refusal, done = asyncio.run(run())
    finally:
        gate.set()
    assert refusal.code is ErrorCode.RESOURCE_EXHAUSTED and refusal.retry_after_s == RETRY_S
    assert [list(c.token_ids) for c in done] == refs[:CAP]
    wait_idle(backend)


def test_the_redis_rate_limiter_refuses_with_retry_after_on_both_transports(make_store, trisect_cache,
                                                                            tiny_llava, refs):
    """ClusterBackend as the ingress runs it (orchestrator over an in-process aggregated stage) with
    the real RateLimiter on a real redis-server: a bucket of 2 refilling one token per 50 s (slow
    enough that no request here, on any machine, lasts until a refill)."""
    from services.cluster_backend import ClusterBackend
    from services.deployments import LLMServer
    from services.ingress_redis import RateLimiter
    from services.orchestrator import Orchestrator, StageClient, Stages
    stage = LLMServer("tiny-llava", "aggregated", {"num_kv_blocks": 64, "max_model_len": 256}, transfer="fake",
                      cache_dir=str(trisect_cache))
    orch = Orchestrator("aggregated", Stages(aggregated=StageClient(stage, is_handle=False)))
    backend = ClusterBackend(tiny_llava, orch, "tiny-llava", rate_limiter=RateLimiter(make_store(), 0.02, 2))
    loop = LoopThread()
    grpc_server = loop.run(start_grpc_server(backend))
    http = Server(build_http_app(backend))

    async def run():
        async with aiohttp.ClientSession() as s:
            allowed = [await post(s, http.url, i) for i in range(2)]
            refused = await post(s, http.url, 2)
        async with AsyncTrisectClient(f"127.0.0.1:{grpc_server.port}", timeout=60) as client:
            with pytest.raises(TrisectError) as e:
                await client.generate(PROMPTS[0], max_tokens=NEW_TOKENS)
        return allowed, refused, e.value

    try:
        allowed, refused, grpc_refusal = asyncio.run(run())
    finally:
        http.stop()
        loop.run(grpc_server.stop(0))
        loop.close()
        stage.loop.close()
    assert [a["body"]["choices"][0]["token_ids"] for a in allowed] == refs[:2]
    assert refused["status"] == 429 and 1 <= int(refused["retry_after"]) <= 50, refused   # one token: 50 s
    assert "rate limit" in refused["body"]["error"]["message"]
    assert grpc_refusal.code is ErrorCode.RESOURCE_EXHAUSTED and 0 < grpc_refusal.retry_after_s <= 50.0

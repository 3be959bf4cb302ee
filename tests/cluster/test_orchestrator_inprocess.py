"""The orchestrator over in-process stage servers (no Ray): transfer failures re-prefill to the
same tokens, and after many requests no KV block is held on either side."""
import asyncio
import hashlib
import itertools

import pytest
from ray.exceptions import ActorDiedError, OwnerDiedError

from decoders.kv_transfer.fake import FakeSender
from decoders.model import prepare_prompt
from decoders.sampling import SamplingParams
from services.deployments import EncodeServer, LLMServer
from services.orchestrator import Orchestrator, StageClient, Stages, TransferFailed
from tests.reference import hf_greedy

ENGINE = {"block_size": 8, "kv_cache_memory": 16 * 2**20}


class FlakySender(FakeSender):
    """Fails the first `failures` transfers it is asked to make, as a broken link would."""
    failures = itertools.count()
    budget = 0

    def __init__(self, payload, timeout_s: float = 30.0):
        super().__init__(payload, timeout_s, fail=next(FlakySender.failures) < FlakySender.budget)


@pytest.fixture(scope="module")
def servers(trisect_cache):
    prefill = LLMServer("tiny-llava", "prefill", ENGINE, transfer="fake", cache_dir=str(trisect_cache))
    decode = LLMServer("tiny-llava", "decode", ENGINE, transfer="fake", cache_dir=str(trisect_cache))
    yield prefill, decode
    prefill.loop.close()
    decode.loop.close()


def orchestrator(prefill, decode, retries=2):
    return Orchestrator("pd", Stages(prefill=StageClient(prefill, is_handle=False),
                                     decode=StageClient(decode, is_handle=False)), max_retries=retries)


async def collect(orch, rid, loaded, text, images, n):
    prepared = prepare_prompt(loaded, text, images)
    pixels = [(hashlib.sha256(i.tobytes()).hexdigest(), p) for i, p in zip(images, prepared.pixel_inputs)]
    tokens = []
    async for item in orch.run(rid, prepared.token_ids, SamplingParams(max_tokens=n, ignore_eos=True), pixels):
        tokens += item["tokens"]
    return tokens


async def assert_nothing_held(*servers):
    for s in servers:
        st = await s.stats()
        assert st["free_blocks"] == st["total_blocks"], st
        assert st["handovers"] == 0 and st["senders"] == 0 and st["running"] == 0 and st["waiting"] == 0, st


def test_failed_transfer_reprefills_to_identical_tokens(servers, tiny_llava, make_image):
    prefill, decode = servers
    prefill.sender_cls = FlakySender
    FlakySender.failures, FlakySender.budget = itertools.count(), 1
    orch = orchestrator(prefill, decode)
    image = make_image(21)
    tokens = asyncio.run(collect(orch, "flaky", tiny_llava, "what is this", [image], 12))
    assert orch.transfer_failures == 1
    assert tokens == hf_greedy(tiny_llava, "what is this", [image], 12)
    asyncio.run(assert_nothing_held(prefill, decode))


def test_transfer_that_always_fails_ends_in_an_error_and_frees(servers, tiny_llava):
    prefill, decode = servers
    prefill.sender_cls = FlakySender
    FlakySender.failures, FlakySender.budget = itertools.count(), 99
    orch = orchestrator(prefill, decode, retries=1)
    with pytest.raises(TransferFailed):
        asyncio.run(collect(orch, "doomed", tiny_llava, "hello", [], 8))
    assert orch.transfer_failures == 2
    asyncio.run(assert_nothing_held(prefill, decode))


def test_fifty_requests_leave_no_block_held(servers, tiny_llava, make_image):
    prefill, decode = servers
    prefill.sender_cls = FakeSender
    orch = orchestrator(prefill, decode)
    images = [make_image(30 + i) for i in range(3)]

    async def main():
        jobs = [collect(orch, f"r{i}", tiny_llava, f"request number {i}", images[: i % 3], 6) for i in range(50)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert all(len(t) == 6 for t in results)
    assert results[4] == hf_greedy(tiny_llava, "request number 4", images[:1], 6)
    asyncio.run(assert_nothing_held(prefill, decode))


def test_client_leaving_after_the_first_token_frees_prefill_blocks(servers, tiny_llava):
    prefill, decode = servers
    prefill.sender_cls = FakeSender
    orch = orchestrator(prefill, decode)

    async def first_token_then_leave():
        prepared = prepare_prompt(tiny_llava, "leave early", [])
        stream = orch.run("leaver", prepared.token_ids, SamplingParams(max_tokens=50, ignore_eos=True), [])
        first = await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.2)                  # the release runs as a task
        return first

    assert len(asyncio.run(first_token_then_leave())["tokens"]) == 1
    asyncio.run(assert_nothing_held(prefill, decode))


class DyingDecode:
    """A decode stage whose first stream dies after `after` token messages, like a replica lost
    mid-stream; later streams are served normally by the real server behind it."""

    def __init__(self, server, after: int):
        self.server, self.after, self.deaths = server, after, 0

    async def decode(self, rid, ticket):
        sent = 0
        async for item in self.server.decode(rid, ticket):
            yield item
            sent += "tokens" in item
            if self.deaths == 0 and sent == self.after:
                self.deaths += 1
                raise RuntimeError("decode replica died")

    async def stats(self):
        return await self.server.stats()


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen2_vl"])
def test_decode_dying_mid_stream_migrates_to_identical_tokens(family, request, trisect_cache, make_image):
    model = request.getfixturevalue(family)
    preset = {"tiny_llava": "tiny-llava", "tiny_qwen2_vl": "tiny-qwen2-vl"}[family]
    prefill = LLMServer(preset, "prefill", ENGINE, transfer="fake", cache_dir=str(trisect_cache))
    decode = LLMServer(preset, "decode", ENGINE, transfer="fake", cache_dir=str(trisect_cache))
    dying = DyingDecode(decode, after=5)
    orch = Orchestrator("pd", Stages(prefill=StageClient(prefill, is_handle=False),
                                     decode=StageClient(dying, is_handle=False)))
    try:
        image = make_image(61)
        tokens = asyncio.run(collect(orch, "migrant", model, "what happens next", [image], 16))
        assert dying.deaths == 1 and orch.migrations == 1
        assert tokens == hf_greedy(model, "what happens next", [image], 16)
        asyncio.run(assert_nothing_held(prefill, decode))
    finally:
        prefill.loop.close()
        decode.loop.close()


class FailingPrefill:
    """A prefill stage whose first `times` calls fail with `error`, then the real server serves."""

    def __init__(self, server, error: BaseException, times: int = 1):
        self.server, self.error, self.left, self.calls = server, error, times, 0

    async def prefill(self, *args):
        self.calls += 1
        if self.left:
            self.left -= 1
            raise self.error
        return await self.server.prefill(*args)

    async def release(self, *args):
        return await self.server.release(*args)


class CountingEncode:
    def __init__(self, server):
        self.server, self.calls = server, 0

    async def encode(self, items):
        self.calls += 1
        return await self.server.encode(items)


@pytest.mark.parametrize("error, reencodes", [
    (ActorDiedError(), 0),                                        # the prefill replica died
    (OwnerDiedError("ab" * 28, None, ""), 1)])                    # the encoder holding its embeddings died
def test_lost_prefill_instance_is_retried_to_identical_tokens(servers, trisect_cache, tiny_llava, make_image,
                                                              error, reencodes):
    prefill, decode = servers
    prefill.sender_cls = FakeSender
    flaky = FailingPrefill(prefill, error)
    encode = CountingEncode(EncodeServer("tiny-llava", cache_dir=str(trisect_cache)))
    orch = Orchestrator("epd", Stages(encode=StageClient(encode, is_handle=False),
                                      prefill=StageClient(flaky, is_handle=False),
                                      decode=StageClient(decode, is_handle=False)))
    image = make_image(71)
    tokens = asyncio.run(collect(orch, f"lost-{reencodes}", tiny_llava, "and then", [image], 10))
    assert tokens == hf_greedy(tiny_llava, "and then", [image], 10)
    assert orch.prefill_failures == 1 and flaky.calls == 2 and encode.calls == 1 + reencodes
    asyncio.run(assert_nothing_held(prefill, decode))


def test_a_request_error_in_prefill_is_not_retried(servers, tiny_llava):
    prefill, decode = servers
    flaky = FailingPrefill(prefill, ValueError("2 image placeholder tokens but 1 image embedding rows"))
    with pytest.raises(ValueError, match="placeholder"):
        asyncio.run(collect(orchestrator(flaky, decode), "bad", tiny_llava, "hi", [], 4))
    assert flaky.calls == 1
    asyncio.run(assert_nothing_held(prefill, decode))

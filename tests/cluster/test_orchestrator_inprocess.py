"""The orchestrator over in-process stage servers (no Ray): a KV transfer broken on the real shm
backend re-prefills to the same tokens, errors a stage raises — wrapped by Ray exactly as a Serve
replica's are — reach the client as themselves and are retried only when an instance was lost, the
reaper frees a transfer nobody acks, and after many requests no KV block is held on either side."""
import asyncio
import hashlib
import os
import time

import _posixshmem
import pytest
from ray.exceptions import ActorDiedError, OwnerDiedError, RayTaskError

from decoders.kv_transfer import shm
from decoders.kv_transfer.fake import FakeReceiver, FakeSender
from decoders.model import prepare_prompt
from decoders.sampling import SamplingParams
from services.api_types import GenerateRequest
from services.cluster_backend import ClusterBackend
from services.deployments import EncodeServer, LLMServer
from services.errors import ErrorCode, TrisectError, invalid
from services.orchestrator import Orchestrator, StageClient, Stages, TransferFailed
from tests.reference import hf_greedy

ENGINE = {"block_size": 8, "kv_cache_memory": 16 * 2**20}


class VanishingShmSender(shm.ShmSender):
    """The real shm sender, whose next `budget` segments are unlinked from /dev/shm right after the
    KV is written — as a cleanup of /dev/shm would — so the receiver cannot map them."""
    budget = 0

    def start(self) -> dict:
        ticket = super().start()
        if VanishingShmSender.budget:
            VanishingShmSender.budget -= 1
            _posixshmem.shm_unlink("/" + ticket["segment"])      # behind the sender's back
            # sender and receiver share this process: forget a mapping a previous transfer of this
            # pooled segment left, as a decode process that never received through it would have none
            shm._ATTACHED.pop(ticket["segment"], None)
        return ticket


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
    await orch.released()                           # prefill's release runs as a task
    return tokens


async def assert_nothing_held(*servers):
    for s in servers:
        st = await s.stats()
        assert st["free_blocks"] == st["total_blocks"], st
        assert st["handovers"] == 0 and st["senders"] == 0 and st["running"] == 0 and st["waiting"] == 0, st


def test_broken_shm_transfer_reprefills_to_identical_tokens(servers, tiny_llava, make_image):
    prefill, decode = servers
    prefill.sender_cls, decode.receiver_cls = VanishingShmSender, shm.ShmReceiver
    VanishingShmSender.budget = 1
    orch = orchestrator(prefill, decode)
    image = make_image(21)
    tokens = asyncio.run(collect(orch, "flaky", tiny_llava, "what is this", [image], 12))
    assert orch.transfer_failures == 1 and VanishingShmSender.budget == 0
    assert tokens == hf_greedy(tiny_llava, "what is this", [image], 12)
    asyncio.run(assert_nothing_held(prefill, decode))
    # the broken segment was retired, not pooled: the next transfer works at the first try
    assert asyncio.run(collect(orch, "after", tiny_llava, "what is this", [image], 12)) == tokens
    assert orch.transfer_failures == 1


def test_transfer_that_always_fails_ends_in_an_error_and_frees(servers, tiny_llava):
    prefill, decode = servers
    prefill.sender_cls, decode.receiver_cls = VanishingShmSender, shm.ShmReceiver
    VanishingShmSender.budget = 99
    orch = orchestrator(prefill, decode, retries=1)

    async def main():
        with pytest.raises(TransferFailed, match="No such file"):
            await collect(orch, "doomed", tiny_llava, "hello", [], 8)
        await orch.released()                       # the last release runs as a task

    asyncio.run(main())
    assert orch.transfer_failures == 2
    asyncio.run(assert_nothing_held(prefill, decode))


def test_fifty_requests_leave_no_block_held(servers, tiny_llava, make_image):
    prefill, decode = servers
    prefill.sender_cls, decode.receiver_cls = FakeSender, FakeReceiver
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
    prefill.sender_cls, decode.receiver_cls = FakeSender, FakeReceiver
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


def ray_wrapped(cause: BaseException, where: str = "LLMServer.decode") -> BaseException:
    """The exception a Serve handle raises when the replica raised `cause`: Ray's own
    RayTaskError(cause type), carrying the remote traceback, process id and address."""
    tb = "Traceback (most recent call last):\n  File \"/srv/services/deployments.py\", line 1\n" + repr(cause)
    return RayTaskError(where, tb, cause, pid=4242, ip="10.1.2.3").as_instanceof_cause()


class DyingDecode:
    """A decode stage whose first stream ends after `after` token messages with `error` — by default
    the ActorDiedError Ray raises when the replica process is gone (the real kill is in
    tests/cluster/test_redis_serving.py); later streams are served by the real server behind it."""

    def __init__(self, server, after: int, error: BaseException | None = None):
        self.server, self.after, self.deaths = server, after, 0
        self.error = error or ActorDiedError()

    async def decode(self, rid, ticket):
        sent = 0
        async for item in self.server.decode(rid, ticket):
            yield item
            sent += "tokens" in item
            if self.deaths == 0 and sent == self.after:
                self.deaths += 1
                raise self.error

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
    prefill.sender_cls, decode.receiver_cls = FakeSender, FakeReceiver
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


LEAKS = ("pid", "10.1.2.3", "Traceback", "RayTaskError", "deployments.py")


@pytest.mark.parametrize("stage, cause, code, says", [
    ("prefill", ValueError("a 3000-token sequence needs more KV blocks than this engine has"),
     ErrorCode.INVALID_ARGUMENT, "a 3000-token sequence needs more KV blocks than this engine has"),
    ("prefill", invalid("image 0 is not a picture", "images"), ErrorCode.INVALID_ARGUMENT,
     "image 0 is not a picture"),
    ("decode", ValueError("payload KV shape (1, 2) does not fit this model"), ErrorCode.INVALID_ARGUMENT,
     "payload KV shape (1, 2) does not fit this model"),
    ("decode", RuntimeError("CUDA error: an illegal memory access"), ErrorCode.INTERNAL,
     "internal error while serving request err-"),
])
def test_a_stage_error_fails_once_as_itself(servers, tiny_llava, stage, cause, code, says):
    """Only a lost instance is retried: a request error or a bug in a stage replica fails the request
    once, with its own status and message (an unknown error: INTERNAL, generic) and no Ray internals."""
    prefill, decode = servers
    prefill.sender_cls, decode.receiver_cls = FakeSender, FakeReceiver
    counted = FailingPrefill(prefill, ray_wrapped(cause, "LLMServer.prefill"), times=int(stage == "prefill"))
    dying = DyingDecode(decode, after=2, error=ray_wrapped(cause))
    if stage == "prefill":
        dying.deaths = 1                                # decode serves normally
    orch = Orchestrator("pd", Stages(prefill=StageClient(counted, is_handle=False),
                                     decode=StageClient(dying, is_handle=False)))
    backend = ClusterBackend(tiny_llava, orch, "tiny-llava")
    rid = f"err-{stage}-{type(cause).__name__}"

    async def run():
        got = []
        async for delta in backend.generate(GenerateRequest(rid, prompt="tell me more", max_tokens=12,
                                                            ignore_eos=True)):
            got += delta.token_ids
        return got

    with pytest.raises(TrisectError) as e:
        asyncio.run(run())
    assert e.value.code is code and says in e.value.message, e.value.message
    assert not any(leak in e.value.message for leak in LEAKS), e.value.message
    assert counted.calls == 1 and orch.migrations == 0 and orch.prefill_failures == 0
    time.sleep(0.1)                                     # the prefill release runs as a task
    asyncio.run(assert_nothing_held(prefill, decode))


def test_reaper_frees_blocks_of_a_transfer_nobody_acks(trisect_cache, tiny_llava):
    """The orchestrator vanished after prefill: no decode, no release ever comes. The sender times
    out and the reaper gives the prompt's blocks back to the prefill engine."""
    server = LLMServer("tiny-llava", "prefill", ENGINE, transfer="shm", cache_dir=str(trisect_cache),
                       transfer_timeout_s=0.3)
    prepared = prepare_prompt(tiny_llava, "nobody will ever ack this transfer", [])

    async def main():
        first = await server.prefill("orphan", prepared.token_ids, SamplingParams(max_tokens=8, ignore_eos=True))
        held = await server.stats()
        end = time.monotonic() + 10
        while (await server.stats())["senders"] and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return first, held, await server.stats()

    try:
        first, held, after = asyncio.run(main())
        assert first["ticket"] is not None
        assert held["senders"] == 1 and held["handovers"] == 1 and held["free_blocks"] < held["total_blocks"], held
        assert after["senders"] == 0 and after["handovers"] == 0, after
        assert after["free_blocks"] == after["total_blocks"], after
        assert not os.path.exists(f"/dev/shm/{first['ticket']['segment']}"), "a timed-out segment is retired"
    finally:
        server.loop.close()


class StuckRelease:
    """A prefill stage whose `release` calls hang until `unstick` — as a call to a dead replica waits
    in Serve's handle for its replacement — then reach the real server."""

    def __init__(self, server):
        self.server, self.gate, self.waiting = server, None, 0

    async def prefill(self, *args):
        return await self.server.prefill(*args)

    async def release(self, *args):
        self.gate = self.gate or asyncio.Event()
        self.waiting += 1
        await self.gate.wait()
        return await self.server.release(*args)


def test_a_release_that_never_answers_does_not_hold_the_stream(servers, tiny_llava):
    prefill, decode = servers
    prefill.sender_cls, decode.receiver_cls = FakeSender, FakeReceiver
    stuck = StuckRelease(prefill)
    orch = Orchestrator("pd", Stages(prefill=StageClient(stuck, is_handle=False), decode=StageClient(decode, is_handle=False)))

    async def main():
        prepared = prepare_prompt(tiny_llava, "release me later", [])
        tokens = [t async for item in orch.run("stuck", prepared.token_ids, SamplingParams(max_tokens=12, ignore_eos=True),
                                              []) for t in item["tokens"]]
        assert stuck.waiting == 1 and orch.releases     # the stream ended while its release still hangs
        stuck.gate.set()
        await orch.released()
        return tokens

    assert asyncio.run(main()) == hf_greedy(tiny_llava, "release me later", [], 12)
    asyncio.run(assert_nothing_held(prefill, decode))


class DyingEncode(CountingEncode):
    """An encoder whose first call fails as a killed replica's does."""

    async def encode(self, items):
        self.calls += 1
        if self.calls == 1:
            raise ActorDiedError()
        return await self.server.encode(items)


def test_a_lost_encoder_is_retried_to_identical_tokens(servers, trisect_cache, tiny_llava, make_image):
    prefill, decode = servers
    prefill.sender_cls, decode.receiver_cls = FakeSender, FakeReceiver
    encode = DyingEncode(EncodeServer("tiny-llava", cache_dir=str(trisect_cache)))
    orch = Orchestrator("epd", Stages(encode=StageClient(encode, is_handle=False),
                                      prefill=StageClient(prefill, is_handle=False),
                                      decode=StageClient(decode, is_handle=False)))
    image = make_image(81)
    tokens = asyncio.run(collect(orch, "lost-encoder", tiny_llava, "look again", [image], 8))
    assert tokens == hf_greedy(tiny_llava, "look again", [image], 8)
    assert orch.encode_failures == 1 and encode.calls == 2
    asyncio.run(assert_nothing_held(prefill, decode))

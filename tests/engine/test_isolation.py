"""One request never reads or fails another's work; a genuine engine fault fails only what is in
flight, and the engine loop serves on, token-exact against the independent reference."""
import asyncio

from decoders.config import EngineConfig
from decoders.engine import Engine
from decoders.sampling import SamplingParams
from services.engine_loop import EngineLoop
from tests.reference import engine_inputs, greedy, hf_greedy, run_to_completion


def test_a_new_sequence_where_a_finished_one_lived_reads_only_its_own_kv(tiny_llava):
    """Decode staging keeps a steady batch's K/V between steps and must know its rows by a key no
    new sequence can share. Keyed by id(), a request admitted right after another finished (CPython
    reuses the freed object's address) whose prompt is exactly as long as the finished one's
    context read the finished request's K/V instead of its own."""
    engine = Engine(tiny_llava, EngineConfig(block_size=16))
    first, second = "the first request of two", "a longer second request that comes right after it"
    first_ids, _ = engine_inputs(tiny_llava, first, [])
    second_ids, _ = engine_inputs(tiny_llava, second, [])
    n_first = len(second_ids) - len(first_ids) + 1     # its last decode ends where the second's prompt does
    assert n_first >= 2
    engine.add_request("first", first_ids, greedy(n_first))
    run_to_completion(engine)
    engine.add_request("second", second_ids, greedy(6))
    assert run_to_completion(engine)["second"] == hf_greedy(tiny_llava, second, [], 6)


def test_a_forward_fault_fails_the_requests_in_flight_and_the_loop_serves_on(tiny_llava):
    """The fault is real and sits at the engine's own boundary with the model: the paged KV pool
    is swapped, between two steps, for a view one element short in head_dim — as a corrupted or
    mis-sized pool would be — so the next forward's first attention layer raises torch's own shape
    error inside the model. Nothing is mocked: the exception leaves `engine.step()` as a real
    forward failure would. Every request in that batch must fail with a RuntimeError (and free its
    blocks); once the pool is whole again the same loop must serve new requests token-exact."""
    model = tiny_llava
    engine = Engine(model, EngineConfig(block_size=16, num_kv_blocks=128))
    loop = EngineLoop(engine)
    pool = engine.runner.pool
    whole = pool.data
    prompts = {f"in-flight-{i}": f"a story that goes on and on, number {i}" for i in range(3)}
    after = {"after-0": prompts["in-flight-0"], "after-1": "list three animals", "after-cold": "hi"}

    async def stream(rid, text, params, first_token: asyncio.Event | None = None):
        ids, _ = engine_inputs(model, text, [])
        tokens = []
        try:
            async for out in loop.stream(rid, lambda e: e.add_request(rid, ids, params)):
                tokens += out.new_token_ids
                if first_token is not None:
                    first_token.set()
        except RuntimeError as e:
            return tokens, e
        return tokens, None

    async def scenario():
        firsts = {rid: asyncio.Event() for rid in prompts}
        running = [asyncio.create_task(stream(rid, text, greedy(400), firsts[rid]))
                   for rid, text in prompts.items()]
        await asyncio.gather(*(f.wait() for f in firsts.values()))
        assert await loop.run(lambda e: set(e.seqs)) == set(prompts)      # all three mid-decode
        await loop.run(lambda e: setattr(e.runner.pool, "data", whole[..., :-1]))
        failed = await asyncio.gather(*running)
        await loop.run(lambda e: setattr(e.runner.pool, "data", whole))
        free = await loop.run(lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_usable_blocks,
                                         len(e.seqs)))
        cold = SamplingParams(max_tokens=8, temperature=1e-40, ignore_eos=True)
        served = await asyncio.gather(*(stream(rid, text, cold if rid == "after-cold" else greedy(8))
                                        for rid, text in after.items()))
        return failed, free, dict(zip(after, served))

    try:
        failed, free, served = asyncio.run(scenario())
    finally:
        loop.close()
    for tokens, error in failed:
        # told as an engine failure, without torch's message (internals stay in the server log)
        assert isinstance(error, RuntimeError) and "engine" in str(error) and "index_copy" not in str(error), error
        assert 1 <= len(tokens) < 400
    assert free[0] == free[1] and free[2] == 0, free
    for rid, text in after.items():
        tokens, error = served[rid]
        assert error is None and tokens == hf_greedy(model, text, [], 8), rid
    assert pool.data is whole

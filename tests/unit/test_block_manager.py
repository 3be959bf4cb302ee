"""Block manager and scheduler invariants, without a model."""
from types import SimpleNamespace

import pytest
import torch

from decoders.block_manager import BlockManager
from decoders.config import EngineConfig
from decoders.sampling import SamplingParams, make_generator, sample_row
from decoders.scheduler import Scheduler
from decoders.sequence import Sequence


def seq(rid, tokens, **kw):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=8), **kw)


def test_allocate_free_returns_every_block():
    bm = BlockManager(num_blocks=9, block_size=4)
    a, b = seq("a", range(10)), seq("b", range(100, 105))
    for s in (a, b):
        assert bm.can_allocate(s)
        bm.allocate(s)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert 0 not in a.block_table + b.block_table, "block 0 is the null block"
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_prefix_hit_only_after_commit_and_needs_equal_tokens():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq("a", range(13))
    bm.allocate(a)
    b = seq("b", range(13))
    assert bm._cached_prefix(b) == [], "nothing is computed yet, so nothing may be hit"
    a.num_computed_tokens = 13
    bm.commit(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    assert bm.prefix_hits == 3
    # a prompt that is exactly the cached blocks still computes its last token
    c = seq("c", range(12))
    bm.allocate(c)
    assert c.num_cached_tokens == 8
    # differing token in block 2 → only 2 blocks shared
    d = seq("d", list(range(9)) + [99, 10, 11, 12])
    bm.allocate(d)
    assert d.num_cached_tokens == 8
    for s in (a, b, c, d):
        bm.free(s)
    assert bm.num_free_blocks == 15
    # freed blocks keep their hash until reused
    e = seq("e", range(13))
    bm.allocate(e)
    assert e.num_cached_tokens == 12


def test_image_content_hash_is_part_of_the_block_hash():
    bm = BlockManager(num_blocks=16, block_size=4)
    img = lambda h: SimpleNamespace(embeds=torch.zeros(4, 2), grid_thw=None, content_hash=h)
    pos = torch.arange(2, 6)
    a = seq("a", [1, 2, 7, 7, 7, 7, 3, 4, 5], images=[img("cat")], image_positions=pos)
    bm.allocate(a)
    a.num_computed_tokens = 9
    bm.commit(a)
    same = seq("b", a.token_ids, images=[img("cat")], image_positions=pos)
    other = seq("c", a.token_ids, images=[img("dog")], image_positions=pos)
    assert len(bm._cached_prefix(same)) == 2
    assert bm._cached_prefix(other) == [], "same placeholder ids, different picture: no hit"


def test_scheduler_chunks_prefill_and_keeps_decodes_running():
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=6)
    bm = BlockManager(64, 4)
    sch = Scheduler(cfg, bm)
    d = seq("d", range(3))
    sch.add(d)
    assert sch.schedule() == [(d, 3)]
    d.num_computed_tokens = 3
    d.token_ids.append(5)                                  # first output token sampled
    long = seq("long", range(20))
    sch.add(long)
    batch = sch.schedule()
    assert batch == [(d, 1), (long, 5)], "the decode goes first, the prompt gets what is left"


def test_scheduler_preempts_newest_when_blocks_run_out():
    cfg = EngineConfig(block_size=4, num_kv_blocks=4, max_num_batched_tokens=64)
    bm = BlockManager(4, 4)
    sch = Scheduler(cfg, bm)
    a, b = seq("a", range(4)), seq("b", range(10, 14))
    sch.add(a); sch.add(b)
    assert sch.schedule() == [(a, 4), (b, 4)]
    for s in (a, b):
        s.num_computed_tokens = 4
        s.token_ids.append(1)
    batch = sch.schedule()                                # a needs a 2nd block: only 1 free → fine
    assert batch[0] == (a, 1)
    a.num_computed_tokens += 1
    assert sch.num_preemptions == 1 and list(sch.waiting) == [b] and b.num_computed_tokens == 0


def test_seeded_sampling_reproduces_and_greedy_is_argmax():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=0.9, top_p=0.8, top_k=20, seed=7)
    first = [sample_row(row, p, make_generator(7)) for row in logits]
    again = [sample_row(row, p, make_generator(7)) for row in logits]
    assert first == again
    assert SamplingParams().greedy and SamplingParams(temperature=1e-45).greedy


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1)])
def test_sampling_params_validate(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)

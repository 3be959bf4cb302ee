"""encoders.shard: contiguous balanced split of N images over up to K replicas, reassembled in order."""
import itertools
import random

import pytest
import torch

from encoders.shard import estimate_cost, plan_shards, reassemble, split


def sizes(ranges):
    return [len(r) for r in ranges]


@pytest.mark.parametrize("n", range(0, 10))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_uniform_costs_split_evenly_and_round_trip(n, k):
    ranges = plan_shards([1] * n, k)
    assert len(ranges) == min(n, k)
    if n:  # like np.array_split: sizes differ by at most one, the larger ones first
        assert sizes(ranges) == sorted(sizes(ranges), reverse=True)
        assert max(sizes(ranges)) - min(sizes(ranges)) <= 1 and min(sizes(ranges)) >= 1
    items = [f"img{i}" for i in range(n)]
    parts = split(items, ranges)
    assert [x for p in parts for x in p] == items
    # each replica answers for its own slice; reassembly restores the request's order
    answers = [[s.upper() for s in p] for p in parts]
    assert reassemble(answers, ranges) == [s.upper() for s in items]


def brute_force_max(costs, k):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), min(k, n) - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_weighted_costs_minimise_the_slowest_replica():
    assert plan_shards([10, 1, 1, 1, 1, 10], 2) == [range(0, 3), range(3, 6)]
    assert plan_shards([30, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    rng = random.Random(0)
    for _ in range(200):
        costs = [rng.randint(1, 50) for _ in range(rng.randint(1, 8))]
        k = rng.randint(1, 4)
        ranges = plan_shards(costs, k)
        assert max(sum(costs[r.start:r.stop]) for r in ranges) == brute_force_max(costs, k)
        assert [i for r in ranges for i in r] == list(range(len(costs)))


def test_cost_estimate_follows_pixel_count():
    small = {"pixel_values": torch.zeros(16, 1176), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    large = {"pixel_values": torch.zeros(64, 1176), "image_grid_thw": torch.tensor([[1, 8, 8]])}
    assert estimate_cost(large) == 4 * estimate_cost(small)
    assert estimate_cost({"pixel_values": torch.zeros(1, 3, 32, 32)}) == 3 * 32 * 32


def test_bad_plans_and_answers_are_refused():
    with pytest.raises(ValueError):
        plan_shards([1, 2], 0)
    with pytest.raises(ValueError):
        plan_shards([-1], 1)
    ranges = plan_shards([1] * 5, 2)
    with pytest.raises(ValueError, match="shard 1 returned 1 results for 2"):
        reassemble([[0, 1, 2], [3]], ranges)
    with pytest.raises(ValueError, match="2 result lists for 1"):
        reassemble([[0], [1]], [range(0, 2)])
    with pytest.raises(ValueError, match="contiguous"):
        split(list("abc"), [range(1, 3), range(0, 1)])
    with pytest.raises(ValueError, match="cover 2 items, expected 3"):
        split(list("abc"), [range(0, 2)])

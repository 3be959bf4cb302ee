"""Split one request's images over several encoder replicas, and put the results back in order.

Life of a request with N images (intra-request parallel encoding, DESIGN §3 step 3):
1. ``estimate_cost`` gives each image a cheap cost from its pixel inputs (the number of pixel values:
   proportional to patches, hence to vision-tower tokens, for LLaVA and Qwen2-VL alike).
2. ``plan_shards(costs, k)`` cuts the sequence into at most ``k`` contiguous, non-empty chunks whose
   largest cost is as small as possible (the request waits for its slowest replica) and, among
   those, with the most even spread (sum of squared chunk costs minimal). Chunks stay contiguous so
   a replica gets a slice, and reassembly is concatenation.
3. ``split(items, ranges)`` hands each replica its slice; ``reassemble(parts, ranges)`` checks every
   replica returned one result per item and concatenates them back into the original order.
Pure functions: no model, no Ray. N is small (images per request are capped), so the exact
O(k·N²) dynamic programme is cheaper than a heuristic is worth.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def estimate_cost(pixel_inputs: Mapping) -> int:
    return int(pixel_inputs["pixel_values"].numel())


def plan_shards(costs: Sequence[float], max_replicas: int) -> list[range]:
    """Contiguous index ranges, at most ``max_replicas`` of them, all non-empty, covering 0..N."""
    n = len(costs)
    if max_replicas < 1:
        raise ValueError(f"max_replicas must be >= 1, got {max_replicas}")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    if n == 0:
        return []
    k = min(max_replicas, n)  # one more replica never makes the slowest chunk slower
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def seg(s: int, e: int) -> float:
        return prefix[e] - prefix[s]

    # pass 1: the smallest achievable largest-chunk cost with exactly k chunks
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for e in range(j, n + 1):
            best[j][e] = min(max(best[j - 1][s], seg(s, e)) for s in range(j - 1, e))
    limit = best[k][n]
    # pass 2: among partitions within that limit, the most even (min sum of squares); keep the cuts
    sq = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    sq[0][0] = 0.0
    for j in range(1, k + 1):
        for e in range(j, n + 1):
            for s in range(j - 1, e):
                c = seg(s, e)
                # <=: on ties the later cut wins, so earlier chunks take the extra item (as np.array_split)
                if c <= limit and sq[j - 1][s] < inf and sq[j - 1][s] + c * c <= sq[j][e]:
                    sq[j][e], cut[j][e] = sq[j - 1][s] + c * c, s
    ranges, e = [], n
    for j in range(k, 0, -1):
        ranges.append(range(cut[j][e], e))
        e = cut[j][e]
    return ranges[::-1]


def split(items: Sequence[T], ranges: Sequence[range]) -> list[list[T]]:
    _check(ranges, len(items))
    return [list(items[r.start:r.stop]) for r in ranges]


def reassemble(parts: Sequence[Sequence[T]], ranges: Sequence[range]) -> list[T]:
    """Concatenate per-replica results back into request order, refusing short or long answers."""
    if len(parts) != len(ranges):
        raise ValueError(f"{len(parts)} result lists for {len(ranges)} shards")
    out: list[T] = []
    for i, (part, r) in enumerate(zip(parts, ranges)):
        if len(part) != len(r):
            raise ValueError(f"shard {i} returned {len(part)} results for {len(r)} images")
        out.extend(part)
    _check(ranges, len(out))
    return out


def _check(ranges: Sequence[range], n: int) -> None:
    # the ranges must tile 0..n in order, or reassembly would silently reorder images
    pos = 0
    for r in ranges:
        if r.start != pos or r.stop <= r.start or r.step != 1:
            raise ValueError(f"shard ranges must be contiguous, non-empty and in order; got {list(ranges)}")
        pos = r.stop
    if pos != n:
        raise ValueError(f"shard ranges cover {pos} items, expected {n}")

"""`trisect bench router`: routing decision latency and Redis round trips per decision.

Life of a run: start a private redis-server (or use --redis-url), register N instances (default 64:
1/4 encode, 1/4 prefill, 1/2 decode) with seeded random loads, publish an image-embedding index and
shared prompt-prefix chains the way instances do, then time `Router.route` on a seeded synthetic
workload (0-4 images per request, half of them already cached; prompts that share one of a few
system-prompt prefixes). Round trips are counted at the socket by the store (a pipeline or a script
call is one), so NOSCRIPT reloads or reconnects would show. Heartbeats are not running during the
timed loop: in production they come from other processes and would only add server-side load.
Prints p50/p99 latency, the pure `decide()` share of it, round trips per decision, and checks the
targets (p50 <= 1 ms, <= 3 round trips). `--json FILE` writes the same figures.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid

from cluster.redis_server import RedisServer
from cluster.redis_store import RedisStore, StoreConfig
from cluster.registry import InstanceInfo, Load, Registry
from cluster.router import RouteRequest, Router, decide
from services.bench import percentile

TARGET_P50_MS, TARGET_ROUND_TRIPS = 1.0, 3.0


def _populate(store: RedisStore, n: int, rng: random.Random, n_images: int, n_prefixes: int, blocks: int):
    reg = Registry(store, ttl_s=600.0)       # long TTL: nothing expires mid-run without heartbeats
    roles = ["encode"] * (n // 4) + ["prefill"] * (n // 4)
    roles += ["decode"] * (n - len(roles))
    agents = []
    for i, role in enumerate(roles):
        total = 2048
        load = Load(waiting=rng.randint(0, 6), running=rng.randint(0, 16), total_kv_blocks=total,
                    free_kv_blocks=rng.randint(0, total), encode_queue=rng.randint(0, 4) if role == "encode" else 0)
        agents.append(reg.register(InstanceInfo(f"{role[:3]}-{i:03d}", role, pool=role, node=f"node{i % 8}",
                                                capacity=16), load))
    encoders = [a for a in agents if a.record.info.role.value == "encode"]
    prefills = [a for a in agents if a.record.info.role.value == "prefill"]
    images = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(n_images)]
    for h in images:
        rng.choice(encoders).publish("mm", [h])
    prefixes = [[uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(blocks)] for _ in range(n_prefixes)]
    for chain in prefixes:
        for a in rng.sample(prefills, 2):
            a.publish("px", chain)
    return images, prefixes


def _workload(rng: random.Random, n: int, images: list[str], prefixes: list[list[str]], blocks: int):
    out = []
    for _ in range(n):
        imgs = [rng.choice(images) if rng.random() < 0.5 else uuid.UUID(int=rng.getrandbits(128)).hex
                for _ in range(rng.randint(0, 4))]
        chain = list(rng.choice(prefixes)) + [uuid.UUID(int=rng.getrandbits(128)).hex
                                              for _ in range(rng.randint(0, blocks))]
        out.append(RouteRequest(imgs, chain, n_encoders_wanted=2))
    return out


def run(url: str, instances: int, decisions: int, seed: int) -> dict:
    rng = random.Random(seed)
    ns = "bench" + uuid.uuid4().hex[:8]
    setup, store = RedisStore(StoreConfig(url=url, namespace=ns)), RedisStore(StoreConfig(url=url, namespace=ns))
    try:
        images, prefixes = _populate(setup, instances, rng, n_images=1000, n_prefixes=20, blocks=32)
        reqs = _workload(rng, decisions + 100, images, prefixes, blocks=32)
        router = Router(store, seed=seed)
        for r in reqs[:100]:                  # warm-up: connection, script loads, parse cache
            router.route(r)
        lat, rts, logic, hits, stale = [], [], [], 0, 0
        for r in reqs[100:]:
            rt0, t0 = store.round_trips, time.perf_counter()
            d = router.route(r)
            lat.append((time.perf_counter() - t0) * 1e3)
            rts.append(store.round_trips - rt0)
            hits += d.cached_images
            stale += d.stale
        for r in reqs[100:600]:               # the pure decision alone, on the last fetched view
            view, _ = router.fetch(r)
            t0 = time.perf_counter()
            decide(view, r, router.config, router.rng)
            logic.append((time.perf_counter() - t0) * 1e3)
    finally:
        setup.clear()
        setup.close()
        store.close()
    res = {"instances": instances, "decisions": decisions, "seed": seed,
           "p50_ms": percentile(lat, 0.50), "p99_ms": percentile(lat, 0.99), "mean_ms": statistics.fmean(lat),
           "decide_p50_ms": percentile(logic, 0.50), "round_trips_per_decision": statistics.fmean(rts),
           "round_trips_max": max(rts), "decisions_per_s": 1e3 / statistics.fmean(lat),
           "cached_images_routed": hits, "stale_decisions": stale}
    res["pass"] = res["p50_ms"] <= TARGET_P50_MS and res["round_trips_per_decision"] <= TARGET_ROUND_TRIPS
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trisect bench router", description=__doc__.split("\n")[0])
    ap.add_argument("--redis-url", default=None, help="existing Redis (default: start a private one)")
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--decisions", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", default=None)
    args = ap.parse_args(argv)
    if args.instances < 4 or args.decisions < 1:
        ap.error("need --instances >= 4 and --decisions >= 1")
    if args.redis_url:
        res = run(args.redis_url, args.instances, args.decisions, args.seed)
    else:
        with RedisServer() as srv:
            res = run(srv.url, args.instances, args.decisions, args.seed)
    print(f"router bench: {res['instances']} instances, {res['decisions']} decisions")
    print(f"  decision latency  p50 {res['p50_ms']:.3f} ms   p99 {res['p99_ms']:.3f} ms   "
          f"mean {res['mean_ms']:.3f} ms   ({res['decisions_per_s']:.0f}/s, one thread)")
    print(f"  pure decide()     p50 {res['decide_p50_ms']:.3f} ms")
    print(f"  redis round trips {res['round_trips_per_decision']:.2f} per decision (max {res['round_trips_max']})")
    print(f"  targets: p50 <= {TARGET_P50_MS} ms, <= {TARGET_ROUND_TRIPS:.0f} round trips -> "
          f"{'PASS' if res['pass'] else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

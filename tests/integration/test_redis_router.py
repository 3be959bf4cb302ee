"""Router over a real redis-server: affinity with balance thresholds, two ingresses, round trips."""
import pytest

from cluster.registry import InstanceInfo, Load, Registry
from cluster.router import NoRoutableInstance, RouteRequest, Router, RouterConfig


@pytest.fixture
def cluster(store):
    """3 encoders, 3 prefill, 2 decode; capacity 4 each, idle."""
    reg = Registry(store, ttl_s=30.0)
    agents = {}
    for role, n in (("encode", 3), ("prefill", 3), ("decode", 2)):
        for i in range(n):
            iid = f"{role[0]}{i}"
            idle = Load(total_kv_blocks=100, free_kv_blocks=100)
            agents[iid] = reg.register(InstanceInfo(iid, role, capacity=4), idle)
    return reg, agents


def _set_waiting(agent, waiting):
    agent.update_load(Load(waiting=waiting, total_kv_blocks=100, free_kv_blocks=100), flush=True)


def test_encoder_cache_affinity_until_overloaded(store, cluster):
    _, agents = cluster
    agents["e2"].publish("mm", ["imgA"])
    router = Router(store, RouterConfig(encoder_threshold=1.0, commit=False), seed=0)
    for _ in range(10):
        d = router.route(RouteRequest(["imgA"]))
        assert d.encoders == ["e2"] and d.cached_images == 1
    _set_waiting(agents["e2"], 4)                 # score 1.0 = floor 0 + threshold: still preferred
    assert router.route(RouteRequest(["imgA"])).encoders == ["e2"]
    _set_waiting(agents["e2"], 5)                 # past the threshold: balance wins
    for _ in range(10):
        d = router.route(RouteRequest(["imgA"]))
        assert d.encoders != ["e2"] and d.cached_images == 0


def test_prefix_affinity_prefers_longest_until_overloaded(store, cluster):
    _, agents = cluster
    agents["p0"].publish("px", ["b0"])
    agents["p1"].publish("px", ["b0", "b1", "b2"])  # chained: holds the deeper prefix
    router = Router(store, RouterConfig(prefix_threshold=1.0, commit=False), seed=0)
    req = RouteRequest(prefix_block_hashes=["b0", "b1", "b2", "b3"])
    d = router.route(req)
    assert (d.prefill, d.prefix_blocks) == ("p1", 3)
    _set_waiting(agents["p1"], 8)                  # overloaded: next best holder within threshold
    d = router.route(req)
    assert (d.prefill, d.prefix_blocks) == ("p0", 1)
    _set_waiting(agents["p0"], 8)
    d = router.route(req)
    assert (d.prefill, d.prefix_blocks) == ("p2", 0)


def test_prefix_depth_from_a_sparse_publication(store, cluster):
    # Chained block hashes: publishing only every 4th block (and the last) is enough.
    _, agents = cluster
    agents["p2"].publish("px", ["b3", "b7"])
    router = Router(store, RouterConfig(commit=False), seed=0)
    d = router.route(RouteRequest(prefix_block_hashes=[f"b{i}" for i in range(10)]))
    assert (d.prefill, d.prefix_blocks) == ("p2", 8)
    agents["p2"].unpublish("px", ["b7"])
    assert router.route(RouteRequest(prefix_block_hashes=[f"b{i}" for i in range(10)])).prefix_blocks == 4


def test_two_ingress_routers_make_consistent_choices(store, cluster):
    _, agents = cluster
    agents["e1"].publish("mm", ["img"])
    agents["p2"].publish("px", ["b0", "b1"])
    a = Router(store, RouterConfig(commit=False), seed=7)
    b = Router(store, RouterConfig(commit=False), seed=7)
    for i in range(20):
        req = RouteRequest(["img", f"new{i}"], ["b0", "b1"], n_encoders_wanted=2)
        assert a.route(req) == b.route(req)       # same Redis state + same seed -> same decision


def test_assignments_are_visible_to_other_ingress(store, cluster):
    # Idle decode pair: ingress A's assignment counts as load for ingress B before any heartbeat.
    a, b = Router(store, seed=1), Router(store, seed=2)
    first = a.route(RouteRequest()).decode
    second = b.route(RouteRequest()).decode
    assert {first, second} == {"d0", "d1"}
    cluster[1][first].heartbeat()                  # heartbeat: load now reported by the instance
    assert sum(store.route_snapshot().pending.values()) > 0    # the second one's is still pending


def test_decision_round_trips(store, cluster):
    router = Router(store, seed=0)
    req = RouteRequest(["i1", "i2"], ["b0", "b1"], n_encoders_wanted=2)
    router.route(req)                               # warm: scripts loaded, connection open
    before = store.round_trips
    for _ in range(50):
        router.route(req)
    assert (store.round_trips - before) / 50 <= 3


def test_aggregated_mode_and_no_instances(store):
    reg = Registry(store, ttl_s=30.0)
    router = Router(store, seed=0)
    with pytest.raises(NoRoutableInstance):
        router.route(RouteRequest())
    reg.register(InstanceInfo("a0", "aggregated", capacity=2))
    reg.register(InstanceInfo("a1", "aggregated", capacity=2), Load(waiting=5))
    d = router.route(RouteRequest(["img"]))
    assert d.aggregated and d.prefill == d.decode == "a0" and d.encoders == ["a0"]


def test_concurrent_routing_from_threads(store, cluster):
    import asyncio
    _, agents = cluster
    router = Router(store, seed=0)

    async def many():
        reqs = [router.aroute(RouteRequest([f"i{k}"], ["b0"])) for k in range(100)]
        beats = [asyncio.to_thread(a.heartbeat) for a in agents.values()]
        return await asyncio.gather(*reqs, *beats)

    out = asyncio.run(many())
    assert all(d.prefill.startswith("p") and d.decode.startswith("d") for d in out[:100])

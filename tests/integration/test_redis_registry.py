"""Registry against a real redis-server: registration, expiry, role/load updates, indexes."""
import time

import pytest

from cluster.registry import InstanceInfo, Load, Registry
from cluster.roles import Role, RoleState


def _ids(records):
    return [r.id for r in records]


def test_register_list_by_role_and_deregister(store):
    reg = Registry(store, ttl_s=3.0)
    e = reg.register(InstanceInfo("e0", "encode", pool="enc", node="n1", capacity=4))
    reg.register(InstanceInfo("p0", Role.PREFILL), Load(waiting=2, running=1, free_kv_blocks=5, total_kv_blocks=8))
    reg.register(InstanceInfo("d0", "decode"))
    assert _ids(reg.live()) == ["d0", "e0", "p0"]
    assert _ids(reg.live("encode")) == ["e0"]
    [p] = reg.live(Role.PREFILL)
    assert (p.load.waiting, p.load.free_kv_blocks, p.info.capacity) == (2, 5, 1)
    [enc] = reg.live("encode")
    assert (enc.info.pool, enc.info.node, enc.info.capacity) == ("enc", "n1", 4)
    e.deregister()
    assert _ids(reg.live()) == ["d0", "p0"]


def test_dead_instance_disappears_within_ttl(store):
    reg = Registry(store, ttl_s=0.4)
    alive = reg.register(InstanceInfo("alive", "decode"), heartbeat_s=0.1, start=True)
    reg.register(InstanceInfo("dead", "decode"))          # registers once, never heartbeats
    try:
        assert _ids(reg.live()) == ["alive", "dead"]
        t0 = time.monotonic()
        while "dead" in _ids(reg.live()):
            time.sleep(0.02)
        assert time.monotonic() - t0 <= 0.45
        time.sleep(0.5)                                    # > TTL: heartbeats keep "alive" alive
        assert _ids(reg.live()) == ["alive"]
    finally:
        alive.stop()


def test_load_and_role_updates(store):
    reg = Registry(store, ttl_s=3.0)
    a = reg.register(InstanceInfo("x", "decode"))
    a.update_load(Load(waiting=7, total_kv_blocks=10, free_kv_blocks=1))   # rides the next heartbeat
    assert reg.live()[0].load.waiting == 0
    a.heartbeat()
    assert reg.live()[0].load.waiting == 7
    a.update_load(Load(waiting=3), flush=True)
    assert reg.live()[0].load.waiting == 3
    a.set_role("decode", RoleState.DRAINING, target="prefill")
    rec = reg.live()[0]
    assert (rec.state, rec.target, rec.routable) == (RoleState.DRAINING, Role.PREFILL, False)
    a.set_role("prefill")
    assert _ids(reg.live("prefill")) == ["x"] and reg.live("decode") == []
    assert reg.live()[0].routable


def test_desired_role_reaches_instance_on_heartbeat(store):
    reg = Registry(store, ttl_s=3.0)
    a = reg.register(InstanceInfo("y", "decode"))
    assert a.desired_role is None
    reg.request_role("y", "prefill")
    a.heartbeat()
    assert a.desired_role is Role.PREFILL
    reg.request_role("y", None)
    a.heartbeat()
    assert a.desired_role is None


def test_reregisters_and_republishes_when_record_lost(store):
    reg = Registry(store, ttl_s=3.0)
    a = reg.register(InstanceInfo("e1", "encode"))
    a.publish("mm", ["h1", "h2"])
    seen = []
    a.on_reregister.append(lambda agent: seen.append(agent.id))
    store.clear()                                          # what a Redis restart without AOF does
    assert reg.live() == []
    a.heartbeat()
    assert seen == ["e1"] and a.registrations == 2
    assert store.route_snapshot(["h1", "h2"], []).mm_holders == [["e1"], ["e1"]]


def test_indexes_are_bounded_and_expire(make_store):
    store = make_store(index_cap=5, index_holders_cap=2, index_ttl_s=0.3)
    store.index_add("mm", "e0", [f"h{i}" for i in range(8)])
    assert store.index_size("mm") == 5                     # oldest 3 evicted
    assert store.route_snapshot(["h0", "h7"], []).mm_holders == [[], ["e0"]]
    for e in ("e1", "e2", "e3"):
        store.index_add("px", e, ["b"])
    assert store.route_snapshot([], ["b"]).prefix_depth == {"e2": 1, "e3": 1}   # holders per hash capped
    store.index_remove("px", "e3", ["b"])
    assert store.route_snapshot([], ["b"]).prefix_depth == {"e2": 1}
    time.sleep(0.35)
    snap = store.route_snapshot(["h7"], ["b"])
    assert snap.mm_holders == [[]] and snap.prefix_depth == {}


def test_info_validation():
    with pytest.raises(ValueError):
        InstanceInfo("a b", "decode")
    with pytest.raises(ValueError):
        InstanceInfo("a", "planner")
    with pytest.raises(ValueError):
        Load(free_kv_blocks=3, total_kv_blocks=2)

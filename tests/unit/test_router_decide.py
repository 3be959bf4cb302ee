"""Pure routing decisions (no Redis): load balance, affinity, thresholds, determinism, modes."""
import random
from collections import Counter

import pytest

from cluster.registry import InstanceInfo, InstanceRecord, Load
from cluster.roles import RoleState
from cluster.router import (ClusterView, NoRoutableInstance, RouteRequest, RouterConfig, decide,
                            load_score)


def rec(iid, role, waiting=0, capacity=4, state=RoleState.ACTIVE, free=0, total=0):
    return InstanceRecord(InstanceInfo(iid, role, capacity=capacity), Load(waiting=waiting, free_kv_blocks=free,
                                                                          total_kv_blocks=total), state)


def base(**waiting):
    ids = {"e0": "encode", "e1": "encode", "e2": "encode", "p0": "prefill", "p1": "prefill", "p2": "prefill",
           "d0": "decode", "d1": "decode", "d2": "decode"}
    return [rec(i, r, waiting.get(i, 0)) for i, r in ids.items()]


def route(records, req=None, cfg=None, seed=0, mm=(), px=None, pending=None):
    view = ClusterView(records, pending or {}, list(mm), px or {})
    return decide(view, req or RouteRequest(), cfg or RouterConfig(), random.Random(seed))


def test_load_score_units():
    assert load_score(rec("a", "decode", waiting=2, capacity=4)) == 0.5
    assert load_score(rec("a", "decode", capacity=4), pending=4) == 1.0
    assert load_score(rec("a", "decode", free=25, total=100)) == 0.75


def test_power_of_two_avoids_the_loaded_instance():
    recs = base(d0=100, d1=100)
    picks = Counter(route(recs, seed=s).decode for s in range(200))
    # d2 is idle; it loses only when the two samples are d0 and d1 (1 in 3).
    assert picks["d2"] > 120 and picks["d2"] < 200


def test_deterministic_for_a_seed():
    recs = base(d0=3, p1=2)
    req = RouteRequest(["a", "b", "c"], ["x"], n_encoders_wanted=2)
    assert [route(recs, req, seed=5) for _ in range(3)] == [route(list(reversed(recs)), req, seed=5)] * 3


def test_encoder_affinity_and_threshold():
    req = RouteRequest(["img"])
    assert route(base(), req, mm=[["e1"]]).encoders == ["e1"]
    assert route(base(e1=4), req, mm=[["e1"]], cfg=RouterConfig(encoder_threshold=1.0)).encoders == ["e1"]
    d = route(base(e1=5), req, mm=[["e1"]], cfg=RouterConfig(encoder_threshold=1.0))
    assert d.encoders != ["e1"] and d.cached_images == 0
    # Among holders the less loaded one wins; holders outside the encode pool are ignored.
    assert route(base(e0=2), req, mm=[["e0", "e2", "p0"]]).encoders == ["e2"]


def test_images_spread_over_wanted_encoders_and_twins_stay_together():
    req = RouteRequest(["a", "b", "c", "d"], n_encoders_wanted=2)
    d = route(base(), req)
    assert len(set(d.encoders)) == 2 and len(d.encoders) == 4
    twins = route(base(), RouteRequest(["a", "b", "a"], n_encoders_wanted=3))
    assert twins.encoders[0] == twins.encoders[2] != twins.encoders[1]
    # Several cached images on one encoder: affinity stops once it is a threshold busier.
    hot = route(base(), RouteRequest(["x", "y", "z", "w", "v"]), mm=[["e0"]] * 5,
                cfg=RouterConfig(encoder_threshold=0.5))
    assert hot.encoders.count("e0") == 3 and hot.cached_images == 3


def test_prefix_affinity_longest_then_threshold():
    px = {"p0": 1, "p1": 3, "e0": 4}                # p1 holds 3 blocks, p0 one; e0 is no prefill
    req = RouteRequest(prefix_block_hashes=["b0", "b1", "b2", "b3"])
    d = route(base(), req, px=px)
    assert (d.prefill, d.prefix_blocks) == ("p1", 3)
    d = route(base(p1=8), req, px=px, cfg=RouterConfig(prefix_threshold=1.0))
    assert (d.prefill, d.prefix_blocks) == ("p0", 1)
    d = route(base(p1=8, p0=8), req, px=px, cfg=RouterConfig(prefix_threshold=1.0), seed=1)
    assert d.prefix_blocks == 0
    # Equal depth: the less loaded holder.
    assert route(base(p0=1), req, px={"p0": 2, "p2": 2}).prefill == "p2"


def test_pending_assignments_count_as_load():
    recs = [rec("p0", "prefill"), rec("d0", "decode"), rec("d1", "decode")]
    assert route(recs, pending={"d0": 1}).decode == "d1"
    assert route(recs, pending={"d1": 1}).decode == "d0"


def test_only_active_instances_are_routed():
    recs = [rec("p0", "prefill"), rec("d0", "decode", state=RoleState.DRAINING), rec("d1", "decode", waiting=50)]
    assert all(route(recs, seed=s).decode == "d1" for s in range(10))
    with pytest.raises(NoRoutableInstance):
        route([rec("p0", "prefill"), rec("d0", "decode", state=RoleState.SWITCHING)])


def test_modes():
    agg = [rec("a0", "aggregated"), rec("a1", "aggregated", waiting=9)]
    d = route(agg, RouteRequest(["img"]))
    assert d.aggregated and d.prefill == d.decode == "a0" and d.encoders == ["a0"]
    both = agg + [rec("p0", "prefill"), rec("d0", "decode")]
    assert not route(both).aggregated                                  # auto prefers disaggregated
    assert route(both, cfg=RouterConfig(mode="aggregated")).aggregated
    with pytest.raises(NoRoutableInstance):
        route(agg, cfg=RouterConfig(mode="disaggregated"))
    with pytest.raises(NoRoutableInstance):
        route([])
    with pytest.raises(ValueError):
        RouterConfig(mode="magic")
    with pytest.raises(ValueError):
        RouteRequest(n_encoders_wanted=0)

"""Redis crashes and comes back (same port, empty) while requests are being routed.

No decision may fail during the outage (the router answers from its last-known registry), and
within 5 s of the restart instances have re-registered, the cache index is rebuilt, and routing
reflects fresh state again.
"""
import time

from cluster.redis_server import RedisServer
from cluster.redis_store import RedisStore, StoreConfig
from cluster.registry import InstanceInfo, Load, Registry
from cluster.router import RouteRequest, Router


def test_routing_survives_redis_restart():
    with RedisServer() as srv:
        cfg = dict(url=srv.url, namespace="outage")
        inst_store, router_store = RedisStore(StoreConfig(**cfg)), RedisStore(StoreConfig(**cfg))
        reg = Registry(inst_store, ttl_s=1.0)
        agents = {iid: reg.register(InstanceInfo(iid, role, capacity=4), heartbeat_s=0.2, start=True)
                  for iid, role in (("e0", "encode"), ("e1", "encode"), ("p0", "prefill"),
                                    ("d0", "decode"), ("d1", "decode"))}
        agents["e1"].publish("mm", ["img"])
        router = Router(router_store, seed=3)
        req = RouteRequest(["img"], n_encoders_wanted=1)
        try:
            decisions, t0 = [], time.monotonic()
            restarted_at = killed_at = None
            while time.monotonic() - t0 < 12:
                el = time.monotonic() - t0
                if el > 0.5 and srv.running and restarted_at is None:
                    srv.kill()
                    killed_at = time.monotonic()
                if el > 1.5 and not srv.running:
                    srv.start()
                    assert srv.port == int(cfg["url"].rsplit(":", 1)[1].split("/")[0])
                    restarted_at = time.monotonic()
                    # Fresh state only knowable from Redis: d0 now reports heavy load.
                    agents["d0"].update_load(Load(waiting=40))
                d = router.route(req)                 # must never raise
                decisions.append((time.monotonic(), d))
                if restarted_at and not d.stale and d.cached_images == 1 and d.decode == "d1":
                    if all(a.registrations >= 2 for a in agents.values()):
                        break
                time.sleep(0.005)
            assert restarted_at is not None
            stale = [d for _, d in decisions if d.stale]
            assert stale, "outage not observed"
            # routing really went on while Redis was down: decisions made inside the outage window,
            # every one of them from the last-known registry
            during = [d for t, d in decisions if killed_at < t < restarted_at]
            assert len(during) >= 10 and all(d.stale for d in during), len(during)
            assert all(d.prefill == "p0" and d.decode in ("d0", "d1") and len(d.encoders) == 1
                       for _, d in decisions)
            recovered = decisions[-1][0] - restarted_at
            print(f"{len(decisions)} decisions, {len(stale)} stale, fresh {recovered:.2f}s after restart")
            assert not decisions[-1][1].stale and recovered < 5.0, f"not fresh {recovered:.2f}s after restart"
            assert decisions[-1][1].cached_images == 1     # index rebuilt by re-registration
            assert all(a.registrations >= 2 for a in agents.values())
        finally:
            for a in agents.values():
                a.stop()

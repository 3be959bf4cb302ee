"""One role controller acts at a time across ingresses: a lease in a real redis-server, taken over
within its TTL when the holder dies (a real process, SIGKILLed)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.lease import Lease
from cluster.registry import InstanceInfo, Load, Registry
from cluster.role_policy import SwitchPolicy
from cluster.role_switcher import RoleSwitcher
from cluster.roles import Role

HOLDER = """
import sys, time
from cluster.redis_store import RedisStore, StoreConfig
from cluster.lease import Lease
lease = Lease(RedisStore(StoreConfig(url=sys.argv[1], namespace=sys.argv[2])), "roles:llm_pool", "doomed", 1.0)
while True:
    if lease.hold():
        print("held", flush=True)
    time.sleep(0.2)
"""


def test_lease_is_exclusive_renewable_and_released_only_by_its_holder(store):
    a, b = Lease(store, "x", "a", ttl_s=0.6), Lease(store, "x", "b", ttl_s=0.6)
    assert a.hold() and not b.hold()
    for _ in range(5):                        # a keeps renewing past the TTL: b never gets in
        time.sleep(0.2)
        assert a.hold() and not b.hold()
    assert store.lease_holder("x")[0] == "a"
    assert not store.lease_release("x", "b"), "b cannot release a's lease"
    a.release()
    assert store.lease_holder("x") == (None, 0.0)
    assert b.hold() and not a.hold()
    time.sleep(0.8)                           # b stops renewing: it expires on its own
    assert a.hold()


def test_killing_the_controller_that_holds_the_lease_hands_control_over(store, redis_server):
    ns = store.config.namespace
    registry = Registry(store, ttl_s=30)
    agents = [registry.register(InstanceInfo(f"p{i}", "prefill", pool="llm_pool", capacity=8), Load())
              for i in range(3)]              # nobody decodes: the next acting controller must fix that
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, redis_server.url, ns], stdout=subprocess.PIPE,
                            text=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "held"
        ctl = RoleSwitcher(store, "survivor", SwitchPolicy(patience=1, cooldown_s=0), interval_s=0.2,
                           lease_ttl_s=1.0)
        for _ in range(3):
            assert ctl.tick() is None and not ctl.lease.held, "the live holder keeps control"
            time.sleep(0.2)
        assert registry.desired_roles(["p0", "p1", "p2"]) == {}
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        decision = None
        while decision is None and time.monotonic() - killed < 3:
            decision = ctl.tick()
            time.sleep(0.05)
        took = time.monotonic() - killed
        assert decision is not None and ctl.lease.held
        assert took <= 1.0 + 0.3, f"took over after {took:.2f}s; the lease TTL is 1 s"
        assert decision.to_role is Role.DECODE and "no active decode" in decision.reason
        assert registry.desired_roles(["p0", "p1", "p2"]) == {decision.instance: Role.DECODE}
        ctl.stop()
        assert store.lease_holder("roles:llm_pool")[0] is None, "a clean stop releases the lease"
    finally:
        proc.kill()
        proc.wait()
        for a in agents:
            a.deregister()


def test_switcher_validates_its_timing(store):
    with pytest.raises(ValueError):
        RoleSwitcher(store, "x", interval_s=3, lease_ttl_s=5)


def test_roles_cli_lists_instances_and_records_a_desired_role(store, redis_server, capsys):
    from services.roles_cli import main
    registry = Registry(store, ttl_s=30)
    agents = [registry.register(InstanceInfo("p0", "prefill", pool="llm_pool", capacity=8), Load(2, 1, 90, 100)),
              registry.register(InstanceInfo("d0", "decode", pool="llm_pool", capacity=8), Load(0, 5, 40, 100))]
    try:
        agents[1].set_role("decode", "draining", "prefill")
        common = ["--redis-url", redis_server.url, "--namespace", store.config.namespace]
        assert main(common) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[:3] == ["ID", "ROLE", "STATE"]
        assert lines[1].split()[:6] == ["d0", "decode", "draining", "->", "prefill", "0/5,"]
        assert lines[2].split()[:4] == ["p0", "prefill", "active", "2/1,"] and "s ago" in lines[2]
        assert main(["set", "p0", "decode", *common]) == 0
        assert capsys.readouterr().out.startswith("asked p0 (prefill, active) to become decode")
        assert registry.desired_roles(["p0", "d0"]) == {"p0": Role.DECODE}
        assert agents[0].heartbeat() and agents[0].desired_role is Role.DECODE, "the instance sees the request"
        main(common)
        assert capsys.readouterr().out.splitlines()[2].split()[-1] == "decode"
        assert main(["set", "nobody", "decode", *common]) == 1
        with pytest.raises(SystemExit):
            main(["set", "p0", "vision", *common])
        assert "ROLE: unknown role 'vision'" in capsys.readouterr().err
    finally:
        for a in agents:
            a.deregister()

"""Scale-down of the shared LLM pool: a replica Serve removes drains before it goes.

Life: when Serve stops an LLMPool replica (the autoscaler lowers the replica count, or a redeploy
with fewer), the replica is taken out of Serve's own routing at once, but the Redis router would
still pick it from the registry — and Serve's drain waits only for the calls in flight, so
running decode streams would hold it until they finish or the shutdown timeout kills them. So
each switchable replica's watcher asks Serve's controller about once a second whether it is
STOPPING (`serve_is_stopping`); if so, `leave` marks it DRAINING in the registry (no router picks
it any more), waits for a role switch in progress to end, and — in the decode role — moves every
running sequence to another decode instance by KV export, exactly as a decode → prefill switch
does (services/switchable.py), so each stream goes on elsewhere and Serve's drain finds nothing
in flight. A prefill replica has nothing to move: its in-flight prefills are the calls Serve waits
for. Then Serve calls `__del__`, which leaves the registry.
"""
from __future__ import annotations

import logging
import time

from cluster.roles import Role, RoleState

log = logging.getLogger(__name__)


def serve_is_stopping(instance_id: str) -> bool:
    """True when Serve's controller lists this replica as STOPPING (False outside a replica)."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    try:
        ctx = serve.get_replica_context()
    except Exception:
        return False
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ray.get(controller.get_deployment_details.remote(ctx.app_name, ctx.deployment), timeout=10)
    return any(r.replica_id == instance_id and str(getattr(r.state, "value", r.state)) == "STOPPING"
               for r in details.replicas)


def leave(server, timeout_s: float = 60.0) -> None:
    """Drain `server` (a SwitchableLLMServer) for good; runs on its own thread."""
    end = time.monotonic() + timeout_s
    while server._switch_thread is not None and time.monotonic() < end:
        time.sleep(0.05)                          # a switch in progress ends first (or fails back)
    role = server.machine.role
    server.agent.set_role(role, RoleState.DRAINING, role)
    log.info("%s: Serve is removing this replica; draining its %s work", server.instance_id, role.value)
    while time.monotonic() < end:
        if role is Role.DECODE and server.loop.call(lambda e: bool(e.seqs)).result(timeout=30):
            targets = server._decode_targets()
            if targets:                           # none: they finish here, Serve's drain waits for them
                server.loop.call(lambda e: server._move_all(e, targets)).result(timeout=60)
        elif not any(server.inflight.values()):
            break
        time.sleep(0.05)
    log.info("%s: drained for removal (%d sequences moved out in all)", server.instance_id,
             server.counts["moved_out"])

"""SwitchableLLMServer: an LLM replica of the shared pool whose role (prefill or decode) is data.

Life: with `role_switching` on, every LLM replica is one of these, in one Serve deployment on the
`llm_pool` resource. At start it picks its first role under a short Redis lease (`rolepick`):
the role furthest below the configured split (prefill/decode replica counts), and registers in
it as SWITCHING — unroutable — until the model is loaded, then ACTIVE. A watcher thread
heartbeats its load and reads the role the control plane asks for (`desired_role`, set by the
controller or `trisect roles set`); a different one starts a switch, in its own thread:

  ACTIVE --drain--> DRAINING --(drained)--> SWITCHING --(engine role flipped)--> ACTIVE (new role)
    prefill -> decode: no new prefills are routed here; in-flight ones finish and their KV senders
        reach SUCCESS/FAILED (acked by the orchestrator, or reaped); then the same engine — weights
        and KV pool — serves decode.
    decode -> prefill: every sequence running here is exported (its KV copied out, its blocks
        freed) to a sender, and its stream ends with {"moved": ticket, "to": <an ACTIVE decode
        instance>, "from": us}; the orchestrator follows it there (services/follow.py), where the
        KV is imported — nothing is recomputed, the client's stream goes on with the next token.
  A drain is cancelled when the request is withdrawn (or changed); a failure leaves the instance
  ACTIVE in its old role. Every switch's duration and outcome is kept (`stats()["switches"]`) and
  counted in `trisect_role_switches_total` and observed in `trisect_role_switch_seconds`.
When Serve removes the replica (scale-down) the watcher sees it STOPPING and drains it the same
way, for good (services/scale_down.py); `__del__` then leaves the registry.
Work that reaches an instance no longer in the role (routed just before the switch began):
a decode call is forwarded unimported ({"moved", "from": None}); a prefill is served only while
the engine still prefills (the drain waits a grace period for such late arrivals).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter

from cluster.lease import Lease
from cluster.redis_store import RedisStore
from cluster.registry import InstanceInfo, Load, Registry
from cluster.role_switcher import LLM_POOL
from cluster.roles import Role, RoleMachine, RoleState
from decoders.config import EngineConfig
from decoders.engine import StepOutput
from services import scale_down, stage_metrics
from services.deployments import LLMServer, _replica_id
from services.follow import NotInRole

log = logging.getLogger(__name__)
_ROLES = (Role.PREFILL, Role.DECODE)


def first_role(registry: Registry, split: dict[str, int]) -> Role:
    """The role furthest below its share of the split among the pool's live instances."""
    have = Counter((r.target or r.info.role) for r in registry.live() if r.info.pool == LLM_POOL)
    return min(_ROLES, key=lambda r: (have[r] / split[r.value] if split.get(r.value) else float("inf"),
                                      _ROLES.index(r)))


class _Publisher:
    """What LLMServer expects of `presence`: cache publication through our registry agent."""

    def __init__(self, agent):
        self.agent = agent

    def publish(self, kind, hashes):
        if hashes:
            self.agent.publish(kind, hashes)

    def unpublish(self, kind, hashes):
        if hashes:
            self.agent.unpublish(kind, hashes)


class SwitchableLLMServer(LLMServer):
    def __init__(self, model: str, split: dict[str, int], engine: dict | None = None, transfer: str = "objectstore",
                 threads: int | None = None, cache_dir: str | None = None, redis_url: str | None = None,
                 prefault_object_store: bool = False, grace_s: float = 0.5, drain_timeout_s: float = 60.0,
                 interval_s: float = 0.25):
        if not redis_url:
            raise ValueError("role switching needs redis_url: roles live in the Redis registry")
        iid = _replica_id()
        self.registry = Registry(RedisStore(redis_url))
        capacity = EngineConfig(**(engine or {})).max_num_seqs
        pick = Lease(self.registry.store, f"rolepick:{LLM_POOL}", iid, ttl_s=10)
        while not pick.hold():                   # replicas starting together pick one at a time
            time.sleep(0.05)
        try:
            role = first_role(self.registry, split)
            # heartbeating from now on: loading the model can outlast the record's TTL, and a
            # record that expired meanwhile would let the next replica pick the same role
            self.agent = self.registry.register(InstanceInfo(iid, role, pool=LLM_POOL, capacity=capacity),
                                                Load(), state=RoleState.SWITCHING, target=role, start=True)
        finally:
            pick.release()
        super().__init__(model, role.value, engine, transfer, threads, cache_dir, None, prefault_object_store)
        self.instance_id = iid
        self.presence = _Publisher(self.agent)
        self.machine = RoleMachine(role)
        self.grace_s, self.drain_timeout_s, self.interval_s = grace_s, drain_timeout_s, interval_s
        self.inflight = {Role.PREFILL: 0, Role.DECODE: 0}
        self.moves: dict[str, tuple] = {}        # rid -> (ticket, target id) of a sequence moved out
        self.counts = Counter()                  # prefills, kv_imports, recomputed, moved_out, forwarded
        self.switches: list[dict] = []
        self._switch_thread: threading.Thread | None = None
        stage_metrics.role_switching()
        self.agent.set_role(role, RoleState.ACTIVE)
        self.leaving = False                     # Serve is removing this replica (services/scale_down.py)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"roles-{iid}", daemon=True)
        self._watcher.start()

    def __del__(self):
        """Serve calls this once the replica's ongoing requests are done (graceful shutdown, e.g.
        a scale-down): leave the registry now, so no router picks us until the record's TTL."""
        stop = getattr(self, "_stop", None)
        if stop is None:                          # the constructor never finished
            return
        stop.set()
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=2)         # its next beat would register us again
        self.agent.deregister()

    # ---- serving ---------------------------------------------------------------------------------
    def _takes(self, role: Role) -> bool:
        return self.machine.role is role and self.machine.state is RoleState.ACTIVE and not self.leaving

    async def prefill(self, rid, token_ids, sampling, images=None, pixels=None) -> dict:
        if self.engine.config.role != "prefill":    # routed on a stale view: the orchestrator re-routes
            raise NotInRole(f"instance {self.instance_id} serves {self.machine.role.value} now, not prefill")
        self.counts["prefills"] += 1
        self.inflight[Role.PREFILL] += 1
        try:
            return await super().prefill(rid, token_ids, sampling, images, pixels)
        finally:
            self.inflight[Role.PREFILL] -= 1

    async def decode(self, rid: str, ticket):
        if not self._takes(Role.DECODE):
            to = self._decode_targets()
            if to:                                # routed here just before a switch: forward, unimported
                self.counts["forwarded"] += 1
                yield {"moved": ticket, "to": to[0].id, "from": None}
                return
            if self.engine.config.role == "prefill":
                yield {"transfer_failed": f"no active decode instance (instance {self.instance_id} prefills)"}
                return
        if self._reaper is None:                  # frees moved-out KV nobody acks (orchestrator gone)
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        self.inflight[Role.DECODE] += 1
        try:
            payload, failed = await self.receive(ticket)
            if failed:
                yield {"transfer_failed": failed}
                return
            imported = False
            async for out in self.loop.stream(rid, lambda e: self._import(e, payload)):
                if not imported:                  # the engine has copied the KV: the source may free it
                    imported = True
                    self.imports += 1
                    yield {"imported": True, "decode_instance": self.instance_id}
                if out.finish_reason == "moved":
                    ticket, to = self.moves.pop(rid)
                    yield {"moved": ticket, "to": to, "from": self.instance_id}
                    return
                yield {"tokens": out.new_token_ids, "finish_reason": out.finish_reason}
        finally:
            self.inflight[Role.DECODE] -= 1

    def _import(self, e, payload) -> None:
        e.import_kv(payload)
        seq = e.seqs.get(payload.request_id)
        # import_kv falls back to recompute (the waiting queue) when the blocks do not fit
        self.counts["kv_imports" if seq is not None and seq in e.scheduler.running else "recomputed"] += 1

    async def stats(self) -> dict:
        out = await super().stats()
        out.update(role=self.machine.role.value, state=self.machine.state.value, switches=list(self.switches),
                   inflight={r.value: n for r, n in self.inflight.items()}, **self.counts)
        return out

    # ---- switching -------------------------------------------------------------------------------
    def _decode_targets(self):
        live = [r for r in self.registry.live(Role.DECODE) if r.routable and r.id != self.instance_id
                and r.info.pool == LLM_POOL]
        return sorted(live, key=lambda r: ((r.load.waiting + r.load.running) / r.info.capacity, r.id))

    def _watch(self) -> None:
        ticks = 0
        while not self._stop.wait(self.interval_s):
            ticks += 1
            try:
                if self.leaving:
                    continue
                self.agent.update_load(self._load(), flush=True)
                if ticks % 4 == 0 and scale_down.serve_is_stopping(self.instance_id):
                    self.leaving = True
                    threading.Thread(target=scale_down.leave, args=(self,), daemon=True).start()
                    continue
                want = self.agent.desired_role
                if want is None or self._switch_thread is not None or self.machine.state is not RoleState.ACTIVE:
                    continue
                if want is self.machine.role or want not in _ROLES:
                    self.agent.clear_desired_role()
                    continue
                self._switch_thread = threading.Thread(target=self._switch, args=(want,), daemon=True)
                self._switch_thread.start()
            except Exception:                     # reporting must never take the replica down
                log.exception("role watcher of %s failed", self.instance_id)

    def _publish(self) -> None:
        m = self.machine
        self.agent.set_role(m.role, m.state, m.target)

    def _switch(self, target: Role) -> None:
        t0, old, outcome = time.monotonic(), self.machine.role, "switched"
        try:
            self.machine.begin_drain(target)
            self._publish()
            log.info("%s: draining %s -> %s", self.instance_id, old.value, target.value)
            drained = self._drain_prefill(target) if old is Role.PREFILL else self._drain_decode(target)
            if not drained:
                self.machine.cancel_drain()
                outcome = "cancelled"
                return
            self.machine.begin_switch()
            self._publish()
            self.loop.call(lambda e: setattr(e.config, "role", target.value)).result(timeout=30)
            self.role = target.value
            self.machine.finish_switch()
        except Exception as e:
            outcome = f"failed: {e}"
            log.exception("%s: switch %s -> %s failed; staying %s", self.instance_id, old.value, target.value,
                          old.value)
            self._restore(old)
        finally:
            took = time.monotonic() - t0
            self._publish()
            self.switches.append({"from": old.value, "to": target.value, "outcome": outcome, "seconds": took})
            stage_metrics.role_switching(False, outcome.split(":")[0], took)
            log.info("%s: switch %s -> %s %s in %.3fs", self.instance_id, old.value, target.value, outcome, took)
            self.agent.clear_desired_role()
            self._switch_thread = None

    def _restore(self, old: Role) -> None:
        try:
            self.loop.call(lambda e: setattr(e.config, "role", old.value)).result(timeout=30)
        finally:
            self.role = old.value
            self.machine = RoleMachine(old)

    def _cancelled(self, target: Role) -> bool:
        return self.agent.desired_role is not target

    def _drain_prefill(self, target: Role) -> bool:
        """In-flight prefills finish and their KV senders end (acked or reaped): then nothing is held."""
        start = time.monotonic()
        while True:
            if self._cancelled(target):
                return False
            idle = (not self.inflight[Role.PREFILL] and not self.senders
                    and self.loop.call(lambda e: not e.seqs and not e.handovers).result(timeout=30))
            if idle and time.monotonic() - start >= self.grace_s:
                return True
            if time.monotonic() - start > self.drain_timeout_s:
                raise TimeoutError(f"prefills still in flight after {self.drain_timeout_s:g}s")
            time.sleep(0.02)

    def _drain_decode(self, target: Role) -> bool:
        """Move every running sequence out by KV export until no decode is in flight here."""
        start = time.monotonic()
        while True:
            if self._cancelled(target):
                return False
            if self.loop.call(lambda e: bool(e.seqs)).result(timeout=30):
                targets = self._decode_targets()
                if not targets:
                    raise RuntimeError("no other active decode instance to move the running sequences to")
                self.loop.call(lambda e: self._move_all(e, targets)).result(timeout=60)
            elif not self.inflight[Role.DECODE] and time.monotonic() - start >= self.grace_s:
                return True
            if time.monotonic() - start > self.drain_timeout_s:
                raise TimeoutError(f"decodes still in flight after {self.drain_timeout_s:g}s")
            time.sleep(0.02)

    def _move_all(self, e, targets) -> int:
        """On the engine thread, between steps: export each sequence, free it here, end its stream
        with the ticket. Spread over the targets by load (each move adds 1/capacity)."""
        score = {t.id: (t.load.waiting + t.load.running) / t.info.capacity for t in targets}
        cap = {t.id: t.info.capacity for t in targets}
        for rid, seq in list(e.seqs.items()):
            sender = self.sender_cls(e.export_kv(seq), timeout_s=self.transfer_timeout_s)
            e.abort(rid)                          # the payload is a copy: the blocks are free now
            to = min(score, key=lambda i: (score[i], i))
            score[to] += 1 / cap[to]
            self.senders[rid] = sender            # freed by the orchestrator's release once imported
            self.moves[rid] = (sender.start(), to)
            self.counts["moved_out"] += 1
            # ends this sequence's stream here; decode() turns it into {"moved": ...}
            self.loop._push(rid, StepOutput(rid, [], True, "moved"))
        return len(self.moves)


"""The role controller's brain: registry signals in, at most one switch decision out — pure.

Life of a tick (`SwitchPlanner.tick(signals)`, called about once a second by the controller that
holds the lease, see role_switcher.py): from the ACTIVE prefill and decode instances of the shared
LLM pool compute each role's *pressure*

    prefill = mean (waiting + running) / capacity                 + SLO term of recent TTFT
    decode  = mean (waiting + running) / capacity + KV occupancy + SLO term of recent TPOT
    SLO term = max(0, observed / slo - 1)   (0 while the SLO holds)

and their gap (decode − prefill). Anti-flapping, in three layers:
  * hysteresis — a streak toward one side grows only while the gap is past `enter_gap`, and
    resets once it falls back under `exit_gap`: noise inside the band neither builds nor breaks it;
  * patience + cooldown — act only after `patience` ticks in a row, and never within `cooldown_s`
    of the previous switch;
  * projection — act only if, with one instance moved, the gap would not land past `exit_gap` on
    the other side (a switch that merely moves the imbalance is not made).
Floors hold always: a role never goes below `min_per_role` ACTIVE instances, and a needed role with
none ACTIVE gets one at once (reason "no active ..."). Only one switch is in flight at a time. A
drain whose reason has reversed for `patience` ticks is cancelled. Every decision carries a
human-readable reason; `last_hold` says why a tick decided nothing (for logs and `trisect roles`).
No Redis, no clocks: `now` comes in with the signals, so tests drive it with synthetic load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.registry import InstanceRecord
from cluster.roles import Role, RoleState

SWITCHABLE = (Role.PREFILL, Role.DECODE)


@dataclass(slots=True)
class SwitchPolicy:
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    enter_gap: float = 0.75      # pressure gap that counts toward a switch
    exit_gap: float = 0.25       # gap under which the streak resets (the hysteresis band)
    patience: int = 3            # consecutive ticks past enter_gap before acting
    cooldown_s: float = 20.0     # no switch within this long of the previous one
    min_per_role: int = 1        # ACTIVE instances kept in each of prefill and decode

    def __post_init__(self):
        if self.slo_ttft_s <= 0 or self.slo_tpot_s <= 0:
            raise ValueError("slo_ttft_s and slo_tpot_s must be > 0")
        if not 0 <= self.exit_gap < self.enter_gap:
            raise ValueError("need 0 <= exit_gap < enter_gap (the hysteresis band)")
        if self.patience < 1 or self.cooldown_s < 0 or self.min_per_role < 1:
            raise ValueError("patience >= 1, cooldown_s >= 0, min_per_role >= 1")


@dataclass(slots=True)
class Signals:
    instances: list[InstanceRecord]      # the pool's live records (any state)
    now: float                           # seconds, any monotonic origin
    ttft_s: float | None = None          # recent TTFT (e.g. p90 of the last window), if measured
    tpot_s: float | None = None

    def __post_init__(self):
        if (self.ttft_s is not None and self.ttft_s < 0) or (self.tpot_s is not None and self.tpot_s < 0):
            raise ValueError("ttft_s and tpot_s must be >= 0")


@dataclass(slots=True)
class Decision:
    action: str                # "switch": ask `instance` to become `to_role`; "cancel": withdraw that
    instance: str
    from_role: Role
    to_role: Role
    reason: str

    def __post_init__(self):
        if self.action not in ("switch", "cancel"):
            raise ValueError(f"action must be 'switch' or 'cancel', got {self.action!r}")
        if self.from_role is self.to_role:
            raise ValueError("a switch changes the role")


@dataclass(slots=True)
class Pressure:
    prefill: float
    decode: float
    n_prefill: int
    n_decode: int

    @property
    def gap(self) -> float:
        return self.decode - self.prefill

    def describe(self) -> str:
        return (f"pressure prefill {self.prefill:.2f} x{self.n_prefill}, "
                f"decode {self.decode:.2f} x{self.n_decode}")


def _queue(rec: InstanceRecord) -> float:
    return (rec.load.waiting + rec.load.running) / rec.info.capacity


def _kv_used(rec: InstanceRecord) -> float:
    ld = rec.load
    return 1.0 - ld.free_kv_blocks / ld.total_kv_blocks if ld.total_kv_blocks else 0.0


def _over(observed: float | None, slo: float) -> float:
    return 0.0 if observed is None else max(0.0, observed / slo - 1.0)


def pressure(sig: Signals, policy: SwitchPolicy) -> Pressure:
    act = {r: [i for i in sig.instances if i.info.role is r and i.state is RoleState.ACTIVE] for r in SWITCHABLE}
    pre, dec = act[Role.PREFILL], act[Role.DECODE]
    p = sum(map(_queue, pre)) / len(pre) if pre else 0.0
    d = sum(_queue(i) + _kv_used(i) for i in dec) / len(dec) if dec else 0.0
    return Pressure(p + _over(sig.ttft_s, policy.slo_ttft_s), d + _over(sig.tpot_s, policy.slo_tpot_s),
                    len(pre), len(dec))


@dataclass(slots=True)
class SwitchPlanner:
    policy: SwitchPolicy = field(default_factory=SwitchPolicy)
    streak: int = 0                    # > 0: ticks pushing toward decode; < 0: toward prefill
    last_switch: float | None = None   # `now` of the last switch decision
    last_hold: str = ""                # why the last tick decided nothing
    pending: tuple[str, Role, float] | None = None   # asked, not yet seen to start: (id, old role, when)
    pending_timeout_s: float = 10.0

    def tick(self, sig: Signals) -> Decision | None:
        pol, pr = self.policy, pressure(sig, self.policy)
        self._update_streak(pr.gap)
        busy = [i for i in sig.instances if i.state is not RoleState.ACTIVE and i.info.role in SWITCHABLE]
        if busy:
            self.pending = None
            return self._maybe_cancel(busy[0], pr)
        if self._still_pending(sig):
            return self._hold(f"waiting for {self.pending[0]} to start its switch; {pr.describe()}")
        need = self._floor(sig, pr)
        if need is not None:
            return self._switch(sig, need, f"no active {need.value} instance; {pr.describe()}")
        if self.streak == 0:
            return self._hold(f"balanced: {pr.describe()}")
        to = Role.DECODE if self.streak > 0 else Role.PREFILL
        if abs(self.streak) < pol.patience:
            return self._hold(f"{to.value} pressure for {abs(self.streak)}/{pol.patience} ticks; {pr.describe()}")
        if self.last_switch is not None and sig.now - self.last_switch < pol.cooldown_s:
            return self._hold(f"cooldown: {sig.now - self.last_switch:.1f}s since the last switch "
                              f"(< {pol.cooldown_s:g}s); {pr.describe()}")
        n_from = pr.n_prefill if to is Role.DECODE else pr.n_decode
        if n_from <= pol.min_per_role:
            return self._hold(f"{to.value} needs help but only {n_from} {_other(to).value} instance(s) left "
                              f"(min {pol.min_per_role}); {pr.describe()}")
        projected = self._projected_gap(pr, to)
        if (projected < -pol.exit_gap) if to is Role.DECODE else (projected > pol.exit_gap):
            return self._hold(f"moving one instance to {to.value} would reverse the imbalance "
                              f"(gap {pr.gap:+.2f} -> {projected:+.2f}); {pr.describe()}")
        why = "TPOT over SLO" if to is Role.DECODE and _over(sig.tpot_s, pol.slo_tpot_s) else \
              "TTFT over SLO" if to is Role.PREFILL and _over(sig.ttft_s, pol.slo_ttft_s) else "queues"
        return self._switch(sig, to, f"{to.value} under pressure ({why}) for {abs(self.streak)} ticks: "
                                     f"gap {pr.gap:+.2f} past {pol.enter_gap:g}, projected {projected:+.2f}; "
                                     f"{pr.describe()}")

    def _still_pending(self, sig: Signals) -> bool:
        """A switch was asked for but its instance still shows ACTIVE in the old role: it picks the
        request up at its next heartbeat. Until then (or a timeout: it died, or refused) wait."""
        if self.pending is None:
            return False
        iid, old, since = self.pending
        rec = next((i for i in sig.instances if i.id == iid), None)
        if rec is None or rec.info.role is not old or sig.now - since > self.pending_timeout_s:
            self.pending = None
            return False
        return True

    def _update_streak(self, gap: float) -> None:
        pol, sign = self.policy, (1 if self.streak > 0 else -1 if self.streak < 0 else 0)
        if gap > pol.enter_gap:
            self.streak = self.streak + 1 if sign >= 0 else 1
        elif gap < -pol.enter_gap:
            self.streak = self.streak - 1 if sign <= 0 else -1
        elif abs(gap) < pol.exit_gap or (sign > 0 and gap < 0) or (sign < 0 and gap > 0):
            self.streak = 0
        # inside the band on the streak's own side: the streak is kept, not grown

    def _projected_gap(self, pr: Pressure, to: Role) -> float:
        # the load a role carries stays; it spreads over one instance more (or fewer)
        if to is Role.DECODE:
            return pr.decode * pr.n_decode / (pr.n_decode + 1) - pr.prefill * pr.n_prefill / (pr.n_prefill - 1)
        return pr.decode * pr.n_decode / (pr.n_decode - 1) - pr.prefill * pr.n_prefill / (pr.n_prefill + 1)

    def _floor(self, sig: Signals, pr: Pressure) -> Role | None:
        for role, n, other in ((Role.DECODE, pr.n_decode, pr.n_prefill), (Role.PREFILL, pr.n_prefill, pr.n_decode)):
            if n == 0 and other > self.policy.min_per_role:
                return role
        return None

    def _maybe_cancel(self, rec: InstanceRecord, pr: Pressure) -> Decision | None:
        if rec.state is RoleState.DRAINING and rec.target is not None and abs(self.streak) >= self.policy.patience:
            toward = Role.DECODE if self.streak > 0 else Role.PREFILL
            if rec.target is not toward and rec.info.role is toward:
                self.streak = 0
                return Decision("cancel", rec.id, rec.info.role, rec.target,
                                f"load reversed while {rec.id} drained toward {rec.target.value}: "
                                f"gap {pr.gap:+.2f}; {pr.describe()}")
        return self._hold(f"{rec.id} is {rec.state.value} ({rec.info.role.value} -> "
                          f"{rec.target.value if rec.target else '?'}): one switch at a time")

    def _switch(self, sig: Signals, to: Role, reason: str) -> Decision | None:
        donors = [i for i in sig.instances if i.info.role is _other(to) and i.state is RoleState.ACTIVE]
        if not donors:
            return self._hold(f"no active {_other(to).value} instance to move; {reason}")
        # the least busy donor: fewest sequences to drain or move
        rec = min(donors, key=lambda i: (i.load.waiting + i.load.running, i.id))
        self.streak, self.last_switch, self.last_hold = 0, sig.now, ""
        self.pending = (rec.id, rec.info.role, sig.now)
        return Decision("switch", rec.id, rec.info.role, to, reason)

    def _hold(self, reason: str) -> None:
        self.last_hold = reason
        return None


def _other(role: Role) -> Role:
    return Role.PREFILL if role is Role.DECODE else Role.DECODE

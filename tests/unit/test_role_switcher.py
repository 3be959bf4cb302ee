"""The role controller's planner on synthetic registry signals: it switches when one role stays
under pressure, names its reason, never flaps, and holds the cooldown and the per-role floor."""
import pytest

from cluster.registry import InstanceInfo, InstanceRecord, Load
from cluster.role_policy import Signals, SwitchPlanner, SwitchPolicy, pressure
from cluster.roles import Role, RoleState


def rec(iid, role, busy=0, free=100, state="active", target=None, cap=8):
    return InstanceRecord(InstanceInfo(iid, role, pool="llm_pool", capacity=cap),
                          Load(waiting=0, running=busy, free_kv_blocks=free, total_kv_blocks=100), state, target)


def pool(pre_busy, dec_busy, n_pre=2, n_dec=2, dec_free=100):
    return ([rec(f"p{i}", "prefill", pre_busy) for i in range(n_pre)]
            + [rec(f"d{i}", "decode", dec_busy, dec_free) for i in range(n_dec)])


def run(planner, frames, t0=0.0, dt=1.0, **sig):
    """Feed one Signals per frame (a list of records), one second apart; the decisions made."""
    out = []
    for k, records in enumerate(frames):
        d = planner.tick(Signals(records, t0 + k * dt, **sig))
        if d is not None:
            out.append((t0 + k * dt, d))
    return out


def test_sustained_decode_pressure_moves_the_least_busy_prefill_instance_and_says_why():
    planner = SwitchPlanner(SwitchPolicy(patience=3, cooldown_s=10))
    frames = [[rec("p0", "prefill", 1), rec("p1", "prefill", 0), rec("p2", "prefill", 2),
               rec("d0", "decode", 16, free=20)]] * 3
    made = run(planner, frames)
    assert len(made) == 1 and made[0][0] == 2.0, "acts on the 3rd tick of pressure, not before"
    d = made[0][1]
    assert (d.action, d.instance, d.from_role, d.to_role) == ("switch", "p1", Role.PREFILL, Role.DECODE)
    assert "decode under pressure (queues) for 3 ticks" in d.reason and "pressure prefill" in d.reason


def test_oscillating_load_never_switches():
    planner = SwitchPlanner(SwitchPolicy(patience=3, cooldown_s=0))
    decode_heavy, prefill_heavy = pool(0, 16, dec_free=20), pool(16, 0)
    assert pressure(Signals(decode_heavy, 0), planner.policy).gap > 1 > -1 > pressure(
        Signals(prefill_heavy, 0), planner.policy).gap
    # the load flips every tick, then every two ticks: never long enough to build a streak
    frames = [decode_heavy if k % 2 else prefill_heavy for k in range(200)]
    frames += [decode_heavy if (k // 2) % 2 else prefill_heavy for k in range(200)]
    assert run(planner, frames) == []
    assert "ticks" in planner.last_hold


def test_noise_inside_the_hysteresis_band_neither_builds_nor_breaks_a_streak():
    pol = SwitchPolicy(enter_gap=1.0, exit_gap=0.4, patience=3, cooldown_s=0)
    planner = SwitchPlanner(pol)
    high, band, low = pool(0, 10, n_pre=3), pool(0, 6, n_pre=3), pool(0, 2, n_pre=3)
    gaps = [pressure(Signals(f, 0), pol).gap for f in (high, band, low)]
    assert gaps[0] > 1.0 > gaps[1] > 0.4 > gaps[2]
    assert run(planner, [high, band, high, band]) == [], "2 ticks past enter_gap: not yet"
    assert planner.streak == 2
    assert run(planner, [low, high, high]) == [] and planner.streak == 2, "under exit_gap resets the streak"
    assert len(run(planner, [band, high])) == 1


def test_cooldown_spaces_switches_even_when_pressure_persists():
    planner = SwitchPlanner(SwitchPolicy(patience=2, cooldown_s=30))
    frames = [pool(0, 24, n_pre=6, n_dec=1, dec_free=0)] * 120     # decode stays swamped for 2 minutes
    made = run(planner, frames)
    times = [t for t, _ in made]
    assert len(made) >= 3
    assert all(b - a >= 30 for a, b in zip(times, times[1:])), times
    assert "cooldown" in planner.last_hold or "waiting for" in planner.last_hold


def test_slow_oscillation_switches_at_most_once_per_cooldown_and_never_reverses_at_once():
    planner = SwitchPlanner(SwitchPolicy(patience=3, cooldown_s=20))
    a, b = pool(0, 24, n_pre=3, n_dec=3, dec_free=0), pool(24, 0, n_pre=3, n_dec=3)
    frames = [a if (k // 8) % 2 else b for k in range(160)]        # 8 s one way, 8 s the other
    times = [t for t, _ in run(planner, frames)]
    assert all(y - x >= 20 for x, y in zip(times, times[1:])), times
    assert len(times) <= 160 / 20 + 1


def test_the_last_instance_of_a_role_is_never_taken():
    planner = SwitchPlanner(SwitchPolicy(patience=1, cooldown_s=0, min_per_role=1))
    frames = [[rec("p0", "prefill", 0), rec("d0", "decode", 30, 0), rec("d1", "decode", 30, 0)]] * 10
    assert run(planner, frames) == []
    assert "only 1 prefill instance(s) left (min 1)" in planner.last_hold
    two = SwitchPlanner(SwitchPolicy(patience=1, cooldown_s=0, min_per_role=2))
    assert run(two, [pool(0, 30, n_pre=2, n_dec=1, dec_free=0)] * 5) == []


def test_a_needed_role_with_no_active_instance_gets_one_at_once():
    planner = SwitchPlanner(SwitchPolicy(patience=5, cooldown_s=100))
    planner.last_switch = 0.0                                      # even inside the cooldown
    made = run(planner, [[rec("p0", "prefill", 3), rec("p1", "prefill", 0), rec("p2", "prefill", 1)]], t0=1)
    assert len(made) == 1
    d = made[0][1]
    assert (d.instance, d.to_role) == ("p1", Role.DECODE) and d.reason.startswith("no active decode instance")


def test_one_switch_at_a_time_and_an_asked_instance_is_waited_for():
    planner = SwitchPlanner(SwitchPolicy(patience=1, cooldown_s=0))
    frames = [pool(0, 24, n_pre=4, n_dec=1, dec_free=0)]
    assert len(run(planner, frames)) == 1                        # p0 asked to become decode
    assert run(planner, frames * 3, t0=1) == [], "p0 has not picked the request up yet"
    assert "waiting for p0" in planner.last_hold
    draining = [rec("p0", "prefill", 0, state="draining", target="decode")] + frames[0][1:]
    assert run(planner, [draining] * 3, t0=5) == []
    assert "one switch at a time" in planner.last_hold
    # p0 finished its switch: the next one may go (cooldown 0)
    done = [rec("p0", "decode", 6, 50)] + frames[0][1:]
    assert len(run(planner, [done], t0=9)) == 1


def test_a_drain_is_cancelled_when_the_load_reverses():
    planner = SwitchPlanner(SwitchPolicy(patience=2, cooldown_s=0))
    draining = [rec("p0", "prefill", 0, state="draining", target="decode"), rec("p1", "prefill", 30),
                rec("p2", "prefill", 30), rec("d0", "decode", 0), rec("d1", "decode", 0)]
    made = run(planner, [draining] * 2)
    assert len(made) == 1
    d = made[0][1]
    assert (d.action, d.instance, d.from_role, d.to_role) == ("cancel", "p0", Role.PREFILL, Role.DECODE)
    assert "load reversed" in d.reason


def test_a_move_that_would_only_reverse_the_imbalance_is_not_made():
    planner = SwitchPlanner(SwitchPolicy(patience=1, cooldown_s=0, enter_gap=0.5, exit_gap=0.25))
    # 2 + 2 instances, decode a bit busier: one more decode would leave prefill the busier side
    frames = [pool(8, 14, n_pre=2, n_dec=2)] * 3
    assert run(planner, frames) == []
    assert "would reverse the imbalance" in planner.last_hold


def test_tpot_over_slo_is_pressure_on_decode():
    planner = SwitchPlanner(SwitchPolicy(patience=2, cooldown_s=0, slo_tpot_s=0.1))
    frames = [pool(1, 1, n_pre=3, n_dec=2)] * 2
    assert run(planner, frames, tpot_s=0.05) == []
    made = run(planner, frames, t0=10, tpot_s=0.25)                # 2.5x the SLO
    assert len(made) == 1 and "TPOT over SLO" in made[0][1].reason


def test_draining_and_switching_instances_carry_no_routable_load():
    p = pressure(Signals([rec("p0", "prefill", 8, state="switching", target="decode"), rec("p1", "prefill", 0),
                          rec("d0", "decode", 0)], 0), SwitchPolicy())
    assert (p.n_prefill, p.n_decode, p.prefill) == (1, 1, 0.0)


@pytest.mark.parametrize("bad", [dict(enter_gap=0.2, exit_gap=0.5), dict(patience=0), dict(cooldown_s=-1),
                                 dict(min_per_role=0), dict(slo_ttft_s=0)])
def test_policy_validation(bad):
    with pytest.raises(ValueError):
        SwitchPolicy(**bad)

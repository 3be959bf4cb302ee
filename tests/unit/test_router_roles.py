"""Role state machine: ACTIVE -> DRAINING -> SWITCHING -> ACTIVE, nothing else."""
import pytest

from cluster.roles import InvalidTransition, Role, RoleMachine, RoleState


def test_full_switch():
    m = RoleMachine(Role.DECODE)
    assert m.routable
    m.begin_drain("prefill")
    assert (m.state, m.target, m.routable) == (RoleState.DRAINING, Role.PREFILL, False)
    m.begin_switch()
    assert m.state is RoleState.SWITCHING and not m.routable
    m.finish_switch()
    assert (m.role, m.state, m.target, m.routable) == (Role.PREFILL, RoleState.ACTIVE, None, True)


def test_cancel_drain_keeps_old_role():
    m = RoleMachine("encode")
    m.begin_drain(Role.DECODE)
    m.cancel_drain()
    assert (m.role, m.state, m.target) == (Role.ENCODE, RoleState.ACTIVE, None)


@pytest.mark.parametrize("steps", [
    ["begin_switch"],                      # ACTIVE -> SWITCHING skips the drain
    ["finish_switch"],
    ["cancel_drain"],
    [("begin_drain", "prefill"), "finish_switch"],     # DRAINING -> ACTIVE only as a cancel
    [("begin_drain", "prefill"), "begin_switch", "cancel_drain"],   # a switch cannot be undone
    [("begin_drain", "prefill"), ("begin_drain", "encode")],
    [("begin_drain", "decode")],           # already decode
])
def test_illegal_transitions(steps):
    m = RoleMachine(Role.DECODE)
    with pytest.raises(InvalidTransition):
        for step in steps:
            name, *args = (step,) if isinstance(step, str) else step
            getattr(m, name)(*args)


def test_validation():
    with pytest.raises(ValueError):
        Role.parse("vision")
    with pytest.raises(ValueError):
        RoleMachine(Role.DECODE, RoleState.DRAINING)         # draining needs a target
    with pytest.raises(ValueError):
        RoleMachine(Role.DECODE, target=Role.PREFILL)        # active has none


def test_a_failed_switch_returns_to_the_old_role():
    m = RoleMachine(Role.PREFILL)
    m.begin_drain("decode")
    m.begin_switch()
    m.fail_switch()
    assert (m.role, m.state, m.target, m.routable) == (Role.PREFILL, RoleState.ACTIVE, None, True)
    with pytest.raises(InvalidTransition):
        m.fail_switch()

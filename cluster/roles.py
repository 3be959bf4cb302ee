"""Roles an instance can play, and the only legal way to change one.

An instance is born ACTIVE in some role (encode, prefill, decode, or aggregated = prefill+decode in
one engine). To take another role it must first stop accepting new work and finish (or migrate) what
it holds — DRAINING — then reload/reconfigure — SWITCHING — and only then come back ACTIVE in the new
role. Routers consider ACTIVE instances only, so a switch never receives work half-way and never
drops or duplicates a request. A drain may be cancelled (back to ACTIVE in the old role); a switch,
once started, either finishes or fails back to ACTIVE in the old role. This module is pure: no Redis, no Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    ENCODE = "encode"
    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"   # prefill and decode in one engine (no KV transfer)

    @classmethod
    def parse(cls, value: "Role | str") -> "Role":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown role {value!r}; expected one of "
                             f"{[r.value for r in cls]}") from None


class RoleState(str, Enum):
    ACTIVE = "active"
    DRAINING = "draining"
    SWITCHING = "switching"

    @classmethod
    def parse(cls, value: "RoleState | str") -> "RoleState":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown role state {value!r}") from None


# The whole state machine. Anything not listed is a bug in the caller.
TRANSITIONS: dict[RoleState, frozenset[RoleState]] = {
    RoleState.ACTIVE: frozenset({RoleState.DRAINING}),
    RoleState.DRAINING: frozenset({RoleState.SWITCHING, RoleState.ACTIVE}),
    RoleState.SWITCHING: frozenset({RoleState.ACTIVE}),
}


class InvalidTransition(ValueError):
    pass


@dataclass(slots=True)
class RoleMachine:
    """One instance's role and where it is in a switch."""
    role: Role
    state: RoleState = RoleState.ACTIVE
    target: Role | None = None       # the role being switched to, while DRAINING/SWITCHING

    def __post_init__(self):
        self.role = Role.parse(self.role)
        self.state = RoleState.parse(self.state)
        if self.target is not None:
            self.target = Role.parse(self.target)
        if (self.state is RoleState.ACTIVE) != (self.target is None):
            raise ValueError("target is set exactly while a switch is in progress")

    @property
    def routable(self) -> bool:
        return self.state is RoleState.ACTIVE

    def _go(self, new: RoleState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.state.value} -> {new.value} is not allowed")
        self.state = new

    def begin_drain(self, target: Role | str) -> None:
        """Stop taking new work; the caller drains or migrates running sequences."""
        target = Role.parse(target)
        if target is self.role:
            raise InvalidTransition(f"already {target.value}")
        self._go(RoleState.DRAINING)
        self.target = target

    def cancel_drain(self) -> None:
        """Drain abandoned (e.g. load changed back): resume in the old role."""
        if self.state is not RoleState.DRAINING:
            raise InvalidTransition(f"cannot cancel a drain from {self.state.value}")
        self._go(RoleState.ACTIVE)
        self.target = None

    def begin_switch(self) -> None:
        """Drained: reconfigure for the target role."""
        self._go(RoleState.SWITCHING)

    def finish_switch(self) -> None:
        # DRAINING -> ACTIVE is legal only as a cancel; finishing needs SWITCHING.
        if self.state is not RoleState.SWITCHING:
            raise InvalidTransition(f"cannot finish a switch from {self.state.value}")
        self._go(RoleState.ACTIVE)
        assert self.target is not None
        self.role, self.target = self.target, None

    def fail_switch(self) -> None:
        """The reconfiguration failed: back to ACTIVE in the old role (the instance still serves it)."""
        if self.state is not RoleState.SWITCHING:
            raise InvalidTransition(f"cannot fail a switch from {self.state.value}")
        self._go(RoleState.ACTIVE)
        self.target = None

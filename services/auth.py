"""API-key authentication shared by the gRPC and HTTP ingresses.

Life: built once per ingress from config (`ApiKeys(keys)`) or the environment (`ApiKeys.from_env()`,
TRISECT_API_KEYS=comma,separated). With no keys configured, auth is off: that is the loopback
default of `trisect serve`. With keys, every Generate/ListModels call and every /v1/* HTTP request
must carry `authorization: Bearer <key>`; `check(header)` raises TrisectError(UNAUTHENTICATED)
otherwise. Health, reflection, /health and /metrics stay open so probes and scrapers need no secret.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

from services.errors import ErrorCode, TrisectError

ENV_VAR = "TRISECT_API_KEYS"


class ApiKeys:
    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str] = ()):
        cleaned = tuple(k.strip() for k in keys if k and k.strip())
        for k in cleaned:
            if any(c.isspace() for c in k):
                raise ValueError("API keys must not contain whitespace")
        # Stored as bytes: compare_digest on str only accepts ASCII.
        self._keys = tuple(k.encode() for k in cleaned)

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "ApiKeys":
        raw = (environ if environ is not None else os.environ).get(ENV_VAR, "")
        return cls(raw.split(","))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Accept `Bearer <key>` (scheme case-insensitive); raise UNAUTHENTICATED otherwise."""
        if not self._keys:
            return
        if not authorization:
            raise TrisectError(ErrorCode.UNAUTHENTICATED,
                               "missing API key: send 'authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TrisectError(ErrorCode.UNAUTHENTICATED,
                               "malformed authorization header: expected 'Bearer <key>'")
        candidate = token.strip().encode()
        # Compare against every key without short-circuiting, so timing reveals neither which key
        # matched nor how much of a key was right.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(candidate, key)
        if not ok:
            raise TrisectError(ErrorCode.UNAUTHENTICATED, "invalid API key")

    def __repr__(self) -> str:  # never print the keys themselves
        return f"ApiKeys(enabled={self.enabled}, count={len(self._keys)})"

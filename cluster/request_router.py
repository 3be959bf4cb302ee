"""A Ray Serve request router that honours the trisect router's choice of replica.

The Redis router (cluster/router.py) picks instance ids; each instance registers with its Ray Serve
replica id (`current_replica_id()`), so a decision names replicas. Serve's handle would otherwise
re-route by its own power-of-two choice, so deployments that must receive a specific request (the
decode instance the KV cache was sent to, the encoder that holds an embedding) use this router:

    @serve.deployment(request_router_config=pinned_router_config())
    class DecodeServer: ...

A caller pins a request in either of two ways (Ray 2.60 exposes both to `choose_replicas` through
`PendingRequest`):
    pinned(handle, replica_id).generate.remote(req)       # metadata: handle.options(session_id="pin:<id>")
    handle.generate.remote(req, pinned_replica=replica_id) # kwargs: the method must accept the kwarg

Life of a request here: `choose_replicas` is called once per routing attempt with all running
replicas. If the pinned replica is among them it is the only candidate — Serve probes its queue and,
if full, backs off and retries the same replica (a pin is a correctness requirement, not a hint).
If it is unknown or gone (died, scaled down), the request falls back to power-of-two choices, with
node locality, like Serve's default router; the orchestrator's retry/migration deals with the rest.
This router deliberately does not mix in FIFOMixin: FIFO hands a chosen replica to the *oldest*
pending request, which would give one request's pinned replica to another.

It also matches a chosen replica to its request by identity, not by Serve's internal request id:
sub-requests a replica makes while serving one request (the orchestrator's concurrent encode
calls) inherit that request's internal id, and Ray 2.60's id index then keeps only the first of
them — a replica picked for the second went to the first, and the second waited forever.
"""
from __future__ import annotations

import logging
import random
from typing import List, Optional

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RayServeException
from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

log = logging.getLogger(__name__)

PIN_KWARG = "pinned_replica"
PIN_SESSION_PREFIX = "pin:"


def pin_session(replica_id: str) -> str:
    return PIN_SESSION_PREFIX + replica_id


def pinned(handle, replica_id: str):
    """A handle whose calls go to `replica_id` (falls back to any replica if it is gone)."""
    return handle.options(session_id=pin_session(replica_id))


def pinned_replica_of(pending_request: Optional[PendingRequest]) -> Optional[str]:
    if pending_request is None:
        return None
    pin = (pending_request.kwargs or {}).get(PIN_KWARG)
    if pin:
        return str(pin)
    sid = getattr(pending_request.metadata, "session_id", "") or ""
    return sid[len(PIN_SESSION_PREFIX):] if sid.startswith(PIN_SESSION_PREFIX) else None


def current_replica_id() -> Optional[str]:
    """This replica's id (what callers pin to); None outside a Serve replica."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


class PinnedReplicaRouter(LocalityMixin, RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        pin = pinned_replica_of(pending_request)
        if pin is not None:
            for r in candidate_replicas:
                if r.replica_id.unique_id == pin or r.replica_id.to_full_id_str() == pin:
                    return [[r]]
            log.info("pinned replica %s is gone; falling back to power-of-two choices", pin)
        # Default behaviour: two random replicas (same node first if configured); Serve probes both
        # queues and sends to the shorter.
        ids = list(self.apply_locality_routing(pending_request))
        if not ids:
            return []
        chosen = ids if len(ids) <= 2 else random.sample(ids, 2)
        return [[self._replicas[i] for i in chosen if i in self._replicas]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None):
        # `request_metadata` is the routing task's own request's metadata object: find that request
        for pr in self._pending_requests_to_fulfill:
            if pr.metadata is request_metadata and not pr.future.done():
                self._cancel_routing_task_for_pending_request(pr)
                self._record_queue_wait_time(pr)
                pr.future.set_result(replica)
                self._remove_pending_request_from_indices(pr)
                return
        super()._fulfill_next_pending_request(replica, request_metadata)


def pinned_router_config(**kwargs) -> RequestRouterConfig:
    """RequestRouterConfig for `@serve.deployment(request_router_config=...)`."""
    return RequestRouterConfig(request_router_class=PinnedReplicaRouter, **kwargs)

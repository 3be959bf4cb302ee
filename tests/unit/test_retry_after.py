"""Retry-after on overload refusals, without a server: how each transport spells it, that it
survives a trip across Ray (pickling) and back through the client SDK, admission's refusal, and a
Serve stage queue over its bound becoming RESOURCE_EXHAUSTED rather than INTERNAL."""
import pickle

import grpc
import pytest
from ray.serve.exceptions import BackPressureError

from services.backend import InFlight
from services.cluster_backend import client_error
from services.errors import ErrorCode, TrisectError


def test_each_transport_spells_retry_after():
    e = TrisectError(ErrorCode.RESOURCE_EXHAUSTED, "busy", retry_after_s=0.25)
    assert e.http_status == 429 and e.http_headers == {"Retry-After": "1"}   # whole seconds, rounded up
    assert e.grpc_trailers == (("retry-after", "0.250"),)
    assert TrisectError(ErrorCode.RESOURCE_EXHAUSTED, "busy", retry_after_s=2.0).http_headers == {"Retry-After": "2"}
    plain = TrisectError(ErrorCode.INVALID_ARGUMENT, "bad")
    assert plain.http_headers == {} and plain.grpc_trailers == ()
    again = pickle.loads(pickle.dumps(e))
    assert (again.code, again.message, again.retry_after_s) == (e.code, e.message, 0.25)
    assert e.with_message("busy (request_id r1)").retry_after_s == 0.25
    back = TrisectError.from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after", "0.250"),))
    assert back.code is ErrorCode.RESOURCE_EXHAUSTED and back.retry_after_s == 0.25
    assert TrisectError.from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", (("retry-after", "soon"),)).retry_after_s is None


def test_admission_refuses_past_the_limit_with_retry_after():
    admitted = InFlight(2, retry_after_s=3)
    admitted.admit("a")
    admitted.admit("b")
    for rid in ("c", "d"):
        with pytest.raises(TrisectError) as e:
            admitted.admit(rid)
        assert e.value.code is ErrorCode.RESOURCE_EXHAUSTED and e.value.retry_after_s == 3
    admitted.release("a")
    admitted.admit("c")
    assert (len(admitted), admitted.peak, admitted.refused) == (2, 2, 2)


def test_a_full_stage_queue_is_resource_exhausted_not_internal():
    e = client_error(BackPressureError(num_queued_requests=256, max_queued_requests=256, status_code=429,
                                       retry_after_s=2.0), "r1")
    assert e.code is ErrorCode.RESOURCE_EXHAUSTED and e.retry_after_s == 2.0
    assert "queue is full" in e.message and "BackPressure" not in e.message

"""API types, error mapping and auth: validation names the field, every code maps consistently."""
import pickle

import grpc
import pytest

from services.api_types import ChatMessage, ContentPart, GenerateDelta, GenerateRequest, Timings, Usage
from services.auth import ApiKeys
from services.backend import Backend, BackendStats
from services.errors import ErrorCode, TrisectError


def req(**kw):
    return GenerateRequest(**{"request_id": "r1", "prompt": "hi", **kw})


@pytest.mark.parametrize("kw, param", [
    (dict(request_id=""), "request_id"),
    (dict(request_id="has space"), "request_id"),
    (dict(prompt=""), "messages"),
    (dict(messages=(ChatMessage("user", (ContentPart("text", "x"),)),)), "messages"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(stop=("",)), "stop"),
    (dict(stop=tuple("abcdefghijklmnopq")), "stop"),
    (dict(images=(b"",)), "images"),
])
def test_request_validation_names_the_field(kw, param):
    with pytest.raises(TrisectError) as e:
        req(**kw)
    assert e.value.code is ErrorCode.INVALID_ARGUMENT and e.value.param == param


def test_messages_must_match_images_and_roles():
    img = ChatMessage("user", (ContentPart("image"), ContentPart("text", "what")))
    ok = GenerateRequest("r", messages=[img], images=[b"x"])
    assert ok.messages == (img,) and ok.images == (b"x",)
    with pytest.raises(TrisectError, match="1 image parts but 0 images"):
        GenerateRequest("r", messages=[img])
    with pytest.raises(TrisectError, match="role"):
        ChatMessage("tool", ())
    with pytest.raises(TrisectError, match="only user messages"):
        ChatMessage("assistant", (ContentPart("image"),))
    with pytest.raises(TrisectError, match="last message"):
        GenerateRequest("r", messages=[ChatMessage("assistant", (ContentPart("text", "x"),))])


def test_prompt_becomes_one_user_turn_images_first():
    (m,) = req(images=[b"a", b"b"]).chat()
    assert m.role == "user" and [p.type for p in m.content] == ["image", "image", "text"]
    assert m.text == "hi" and m.image_count == 2


def test_api_key_is_not_in_repr():
    assert "sekrit" not in repr(req(api_key="sekrit"))


def test_delta_final_fields_come_together():
    GenerateDelta("r", (1,), "a")
    GenerateDelta("r", (), "", "stop", Usage(3, 1), Timings(1.0, 0.0))
    with pytest.raises(ValueError):
        GenerateDelta("r", (), "", "stop")
    with pytest.raises(ValueError):
        GenerateDelta("r", (), "", None, Usage(1, 1), Timings(1, 1))
    with pytest.raises(ValueError):
        GenerateDelta("r", (), "", "eos", Usage(1, 1), Timings(1, 1))


@pytest.mark.parametrize("code, grpc_code, http", [
    ("INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT, 400),
    ("UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED, 401),
    ("RESOURCE_EXHAUSTED", grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    ("UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, 503),
    ("DEADLINE_EXCEEDED", grpc.StatusCode.DEADLINE_EXCEEDED, 504),
])
def test_error_mappings_round_trip(code, grpc_code, http):
    e = TrisectError(code, "why it failed", "field")
    assert e.grpc_status is grpc_code and e.http_status == http
    body = e.openai_body()["error"]
    assert body["message"] == "why it failed" and body["param"] == "field" and body["type"]
    back = TrisectError.from_grpc(grpc_code, "why it failed")
    assert back.code is e.code and back.message == e.message
    clone = pickle.loads(pickle.dumps(e))
    assert (clone.code, clone.message, clone.param) == (e.code, e.message, e.param)
    with pytest.raises(ValueError):
        TrisectError(code, "")


def test_auth_off_without_keys_and_strict_with_them():
    ApiKeys().check(None)
    assert not ApiKeys.from_env({"TRISECT_API_KEYS": " , "}).enabled
    keys = ApiKeys.from_env({"TRISECT_API_KEYS": "alpha, beta"})
    assert keys.enabled and "alpha" not in repr(keys)
    keys.check("Bearer alpha")
    keys.check("bearer beta")
    for bad, words in [(None, "missing"), ("", "missing"), ("alpha", "malformed"),
                       ("Basic alpha", "malformed"), ("Bearer ", "malformed"),
                       ("Bearer alph", "invalid"), ("Bearer alphaa", "invalid"),
                       ("Bearer gamma", "invalid")]:
        with pytest.raises(TrisectError, match=words) as e:
            keys.check(bad)
        assert e.value.code is ErrorCode.UNAUTHENTICATED


def test_backend_stats_and_protocol():
    s = BackendStats(0, 0, 0, 0, 10, 4)
    assert s.idle and s.as_dict()["kv_blocks_total"] == 10
    assert not BackendStats(0, 0, 0, 1, 10, 4).idle
    with pytest.raises(ValueError):
        BackendStats(-1, 0, 0, 0, 10, 4)
    from services.local_backend import LocalBackend
    assert all(hasattr(LocalBackend, m) for m in ("generate", "abort", "model_names", "stats"))
    assert isinstance(object.__new__(LocalBackend), Backend)

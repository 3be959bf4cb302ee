"""Limits enforced before work, and strict wire parsing: each limit has a default, a config key and
an error naming the field; a prompt far over its byte limit never reaches the tokenizer."""
import dataclasses
import inspect
import json

import pytest

from cluster.config import ClusterConfig, Limits
from services.api_inputs import prepare
from services.api_types import ChatMessage, ContentPart, GenerateRequest
from services.api_wire import deadline_from_header, parse_json, parse_proto, request_from_openai
from services.errors import ErrorCode, TrisectError
from services.proto import pb


def refused(fn, *args, words: str, param: str | None = "unset"):
    with pytest.raises(TrisectError) as e:
        fn(*args)
    assert e.value.code is ErrorCode.INVALID_ARGUMENT and words in e.value.message, e.value.message
    if param != "unset":
        assert e.value.param == param
    return e.value


# ---- config -------------------------------------------------------------------------------------
def test_every_limit_is_a_config_key_with_a_default(tmp_path):
    cfg = ClusterConfig()
    assert cfg.limits == Limits() and cfg.bind_host == "127.0.0.1"
    path = tmp_path / "c.yaml"
    path.write_text("limits: {max_prompt_bytes: 1000, max_request_bytes: 5000}\nbind_host: 0.0.0.0\n")
    cfg = ClusterConfig.from_yaml(str(path))
    assert cfg.limits.max_prompt_bytes == 1000 and cfg.limits.max_request_bytes == 5000
    assert cfg.limits.max_tokens == Limits().max_tokens and cfg.bind_host == "0.0.0.0"
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown limits"):
        ClusterConfig(limits={"max_prompt": 1})
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_images"):
            Limits(max_images=bad)


def test_listening_ports_default_to_loopback():
    from services.grpc_ingress import start_grpc_server
    from services.serve import build_config, parse_args
    assert inspect.signature(start_grpc_server).parameters["address"].default.startswith("127.0.0.1:")
    assert build_config(parse_args([])).bind_host == "127.0.0.1"
    assert build_config(parse_args(["--host", "0.0.0.0"])).bind_host == "0.0.0.0"


# ---- before work: the tokenizer is never invoked --------------------------------------------------
class Counting:
    """Delegates to a tokenizer/processor and counts every use of it."""

    def __init__(self, inner):
        self.__dict__.update(inner=inner, uses=0)

    def __getattr__(self, name):
        self.__dict__["uses"] += 1
        return getattr(self.__dict__["inner"], name)

    def __call__(self, *a, **kw):
        self.__dict__["uses"] += 1
        return self.__dict__["inner"](*a, **kw)


@pytest.fixture
def counted(tiny_llava):
    return dataclasses.replace(tiny_llava, tokenizer=Counting(tiny_llava.tokenizer),
                               processor=Counting(tiny_llava.processor))


def uses(loaded) -> int:
    return loaded.tokenizer.uses + loaded.processor.uses


LIMITS = Limits(max_prompt_bytes=10_000, max_images=2, max_image_bytes=1000, max_tokens=100)


def test_a_prompt_far_over_the_limit_never_reaches_the_tokenizer(counted):
    prepared = prepare(counted, GenerateRequest("ok", prompt="hello there"), LIMITS, 256)
    assert prepared.token_ids and uses(counted) > 0          # the counter sees real tokenization
    before = uses(counted)
    huge = "word " * 2_000_000                               # 10 MB, 1000x the limit
    e = refused(prepare, counted, GenerateRequest("big", prompt=huge), LIMITS, 256,
                words="max_prompt_bytes", param="prompt")
    assert "before tokenizing" in e.message
    chat = GenerateRequest("big2", messages=(ChatMessage("user", (ContentPart("text", "é" * 6000),)),))
    refused(prepare, counted, chat, LIMITS, 256, words="12000 bytes (UTF-8); the limit is 10000",
            param="messages")
    refused(prepare, counted, GenerateRequest("s", prompt="a\ud800b"), LIMITS, 256, words="lone surrogate")
    assert uses(counted) == before


def test_counts_and_sizes_are_refused_before_any_image_is_decoded(counted):
    junk = b"not an image"
    refused(prepare, counted, GenerateRequest("i", prompt="x", images=(junk,) * 3), LIMITS, 256,
            words="3 images; at most 2", param="images")
    refused(prepare, counted, GenerateRequest("b", prompt="x", images=(b"\x89PNG" + b"0" * 2000,)), LIMITS,
            256, words="2004 bytes; the limit is 1000", param="images")
    refused(prepare, counted, GenerateRequest("t", prompt="x", max_tokens=101, images=(junk,)), LIMITS, 256,
            words="max_tokens is 101; the limit is 100", param="max_tokens")
    assert uses(counted) == 0


# ---- gRPC bytes ---------------------------------------------------------------------------------
def test_undecodable_protobuf_names_the_field():
    ok = pb.GenerateRequest(prompt="hi", max_tokens=3).SerializeToString()
    assert parse_proto(ok).max_tokens == 3
    refused(parse_proto, b"\x1a\x02\xff\xfe", words="prompt is not valid UTF-8", param="prompt")
    nested = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="ab")])])
    raw = nested.SerializeToString().replace(b"ab", b"\xc3\x28")
    refused(parse_proto, raw, words="messages.content.text is not valid UTF-8")
    refused(parse_proto, pb.GenerateRequest(model="m").SerializeToString() + b"\x1a\x05ab",
            words="prompt is truncated", param="prompt")
    for garbage in (b"\xff\xff\xff", b"\x00", b"\x0f" * 5):
        e = refused(parse_proto, garbage, words="undecodable trisect.v1.GenerateRequest")
        assert "DecodeError" not in e.message and "Error parsing" not in e.message


def test_unknown_fields_and_wrong_wire_types_are_refused():
    ok = pb.GenerateRequest(prompt="hi").SerializeToString()
    refused(parse_proto, ok + b"\xf8\x06\x01", words="unknown field number 111")
    refused(parse_proto, ok + b"\x32\x01\x41", words="field max_tokens has the wrong type", param="max_tokens")
    inner = pb.ChatMessage(role="user").SerializeToString() + b"\xa0\x06\x01"   # field 100 inside
    raw = b"\x2a" + bytes([len(inner)]) + inner
    refused(parse_proto, raw, words="in messages[0]", param="messages[0]")


# ---- HTTP JSON ----------------------------------------------------------------------------------
def test_json_depth_nan_and_bad_utf8():
    limits = Limits(max_json_depth=4)
    assert parse_json(b'{"a": [[[1]]]}', limits) == {"a": [[[1]]]}    # 4 levels
    refused(parse_json, b'{"a": [[[[1]]]]}', limits, words="deeper than 4 levels (max_json_depth)")
    refused(parse_json, b"[" * 100_000 + b"]" * 100_000, limits, words="max_json_depth")
    for raw in (b'{"temperature": NaN}', b'{"x": Infinity}', b'{"x": "\xff"}', b"{", b""):
        refused(parse_json, raw, limits, words="not valid JSON")


BODY = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra, words, param", [
    ({"max_token": 5}, "unknown field `max_token`", "max_token"),
    ({"max_tokens": "5"}, "`max_tokens` must be an integer", "max_tokens"),
    ({"max_tokens": 5.0}, "`max_tokens` must be an integer", "max_tokens"),
    ({"max_completion_tokens": 0}, "max_tokens must be >= 1", "max_tokens"),
    ({"temperature": "0"}, "`temperature` must be a number", "temperature"),
    ({"temperature": True}, "`temperature` must be a number", "temperature"),
    ({"stream": "yes"}, "`stream` must be true or false", "stream"),
    ({"ignore_eos": "false"}, "`ignore_eos` must be true or false", "ignore_eos"),
    ({"stream_options": []}, "`stream_options` must be an object", "stream_options"),
    ({"model": 7}, "`model` must be a string", "model"),
    ({"stop": [1]}, "`stop` must be a string or a list of strings", "stop"),
    ({"n": True}, "only n=1", "n"),
    ({"frequency_penalty": 0.5}, "`frequency_penalty` is not supported", "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{}]}]}, "`tool_calls`", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "content part", "messages"),
    ({"messages": [{"role": 5, "content": "x"}]}, "role must be one of", "messages"),
])
def test_openai_wrong_types_and_unknown_fields_name_the_field(extra, words, param):
    refused(request_from_openai, {**BODY, **extra}, "r", None, None, words=words, param=param)


def test_openai_neutral_fields_and_sdk_echoes_are_accepted():
    body = {**BODY, "frequency_penalty": 0, "presence_penalty": 0.0, "user": "u", "logit_bias": {},
            "response_format": {"type": "text"}, "stream": False, "n": 1, "seed": None,
            "messages": [{"role": "user", "content": "a"},
                         {"role": "assistant", "content": "b", "refusal": None, "tool_calls": None},
                         {"role": "user", "content": "c"}]}
    req, opts = request_from_openai(json.loads(json.dumps(body)), "r", None, None)
    assert len(req.messages) == 3 and opts["stream"] is False and req.temperature == 1.0


def test_timeout_header_must_be_positive_and_finite():
    assert deadline_from_header(None) is None and deadline_from_header("2.5") > 0
    for raw in ("inf", "nan", "-1", "0", "soon"):
        refused(deadline_from_header, raw, words="x-trisect-timeout", param="x-trisect-timeout")

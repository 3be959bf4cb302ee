"""Input limits, data URLs, the proto (compiled at import) and the incremental detokenizer."""
import base64
import io

import pytest
from PIL import Image

from services.api_inputs import Limits, decode_image, parse_data_url
from services.api_types import GenerateRequest
from services.detokenize import IncrementalDetokenizer
from services.errors import ErrorCode, TrisectError


def png(img, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_data_urls():
    raw = png(Image.new("RGB", (4, 4)))
    assert parse_data_url("data:image/png;base64," + base64.b64encode(raw).decode()) == raw
    for bad, words in [("http://x/y.png", "data: URLs"), ("/etc/passwd", "data: URLs"),
                       ("data:image/png,abc", "base64"), ("data:text/plain;base64,aGk=", "image/*"),
                       ("data:image/png;base64,@@@", "not valid base64"), (None, "data: URLs")]:
        with pytest.raises(TrisectError, match=words) as e:
            parse_data_url(bad)
        assert e.value.code is ErrorCode.INVALID_ARGUMENT


def test_image_limits():
    limits = Limits(max_image_bytes=50_000, max_image_pixels=100 * 100)
    img = decode_image(png(Image.new("L", (10, 20))), 0, limits)
    assert img.mode == "RGB" and img.size == (10, 20)
    assert decode_image(png(Image.new("RGB", (8, 8)), "JPEG"), 0, limits).size == (8, 8)
    cases = [(b"garbage", "not a recognised"), (png(Image.new("RGB", (101, 100))), "pixels"),
             (b"\x89PNG" + b"0" * 60_000, "bytes"), (png(Image.new("RGB", (50, 50)))[:60], "decoded"),
             (png(Image.new("RGB", (4, 4)), "TIFF"), "unsupported format")]
    for data, words in cases:
        with pytest.raises(TrisectError, match=words):
            decode_image(data, 0, limits)
    with pytest.raises(ValueError):
        Limits(max_images=0)


def test_decompression_bomb_refused_from_header():
    bomb = png(Image.new("1", (8_000, 8_000)))  # 64 Mpx in a few KB
    assert len(bomb) < 20_000
    with pytest.raises(TrisectError, match="pixels"):
        decode_image(bomb, 3, Limits())


def test_proto_compiled_at_import_and_round_trips():
    from services.grpc_ingress import request_from_proto
    from services.proto import SERVICE_NAME, pb, pb_grpc
    from google.protobuf import descriptor_pool

    service = descriptor_pool.Default().FindServiceByName(SERVICE_NAME)
    assert set(service.methods_by_name) == {"Generate", "ListModels"}
    assert hasattr(pb_grpc, "GenerationStub")
    raw = png(Image.new("RGB", (4, 4)))
    msg = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=[
        pb.ContentPart(image=pb.Image(data=raw)), pb.ContentPart(text="hi")])], max_tokens=5,
        seed=3, stop=["."])
    msg = pb.GenerateRequest.FromString(msg.SerializeToString())
    req = request_from_proto(msg, "k", 123.0)
    assert isinstance(req, GenerateRequest) and req.images == (raw,) and req.max_tokens == 5
    assert req.seed == 3 and req.temperature == 0.0 and req.deadline == 123.0 and req.request_id
    with pytest.raises(TrisectError, match="inside the messages"):
        request_from_proto(pb.GenerateRequest(messages=msg.messages, images=[pb.Image(data=raw)]))


@pytest.fixture(scope="module")
def tok(trisect_cache):
    from transformers import AutoTokenizer

    from decoders.model import ensure_preset
    return AutoTokenizer.from_pretrained(ensure_preset("tiny-llava", trisect_cache))


def stream(tok, ids, prompt=(), stop=()):
    d = IncrementalDetokenizer(tok, list(prompt), stop)
    pieces = [d.add([t]) for t in ids]
    if not d.stopped:
        pieces.append(d.flush())
    return "".join(pieces), d


@pytest.mark.parametrize("text", ["the cat is on the mat.", "héllo wörld — 世界 🐱 ok",
                                  "  spaces   and\nnewlines\t"])
def test_streamed_text_equals_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("describe this", add_special_tokens=False)
    out, d = stream(tok, ids, prompt)
    assert out == tok.decode(ids, skip_special_tokens=True) == d.text


def test_stop_strings_cut_and_hold_back(tok):
    ids = tok.encode("the red cat sat on the mat", add_special_tokens=False)
    out, d = stream(tok, ids, stop=["cat sat"])
    assert d.stopped and out == "the red "
    d = IncrementalDetokenizer(tok, [], ["mat!"])
    emitted = "".join(d.add([t]) for t in ids)
    assert not emitted.endswith("ma") and emitted + d.flush() == "the red cat sat on the mat"
    out, d = stream(tok, ids, stop=["dog"])
    assert not d.stopped and out == "the red cat sat on the mat"


def test_docs_show_the_current_proto():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs/api.md").read_text()
    block = doc.split("```proto\n", 1)[1].split("```", 1)[0]
    assert block == (root / "services/proto/trisect/v1/generation.proto").read_text(), \
        "docs/api.md embeds a stale copy of generation.proto"

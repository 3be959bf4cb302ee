"""Resume request parsing without a server: the header, the request field, the fingerprint."""
import pytest

from decoders.sampling import SamplingParams
from services.api_types import GenerateRequest
from services.api_wire import resume_from_header
from services.errors import TrisectError
from services.resume import fingerprint, journal_every


def test_resume_header_is_a_plain_count():
    assert resume_from_header(None) is None and resume_from_header(" 17 ") == 17 and resume_from_header("0") == 0
    for bad in ("-1", "1.5", "", "²", "9" * 10, "x"):
        with pytest.raises(TrisectError) as e:
            resume_from_header(bad)
        assert e.value.param == "x-trisect-resume-from"
    with pytest.raises(TrisectError):
        GenerateRequest("r", prompt="p", resume_from=-1)


def test_fingerprint_binds_prompt_images_sampling_and_key():
    s = SamplingParams(max_tokens=8)
    base = fingerprint([1, 2], ["h"], s, "k")
    assert base == fingerprint([1, 2], ["h"], SamplingParams(max_tokens=8), "k")
    assert len({base, fingerprint([1, 3], ["h"], s, "k"), fingerprint([1, 2], [], s, "k"),
                fingerprint([1, 2], ["h"], SamplingParams(max_tokens=9), "k"),
                fingerprint([1, 2], ["h"], s, "other")}) == 5
    assert journal_every(s, 16) == 16 and journal_every(SamplingParams(temperature=0.8), 16) == 1

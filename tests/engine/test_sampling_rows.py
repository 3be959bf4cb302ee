"""Sampling is contained per row: near-zero temperature is greedy, an unsamplable row raises its own
SamplingError (a ValueError) instead of a torch error that would fail the whole batch."""
import pytest
import torch

from decoders.sampling import MIN_TEMPERATURE, SamplingError, SamplingParams, sample_row


@pytest.mark.parametrize("t", [1e-45, 1e-40, MIN_TEMPERATURE / 2])
def test_near_zero_temperature_is_greedy(t):
    assert SamplingParams(temperature=t).greedy and not SamplingParams(temperature=MIN_TEMPERATURE).greedy


def test_unsamplable_row_raises_sampling_error():
    logits = torch.tensor([float("inf"), float("inf"), 0.0])
    with pytest.raises(SamplingError, match="temperature"):
        sample_row(logits, SamplingParams(temperature=1.0), None)
    assert issubclass(SamplingError, ValueError)
    tiny_top_p = SamplingParams(temperature=0.7, top_p=1e-30)      # the top token always survives
    assert sample_row(torch.tensor([0.0, 5.0, 1.0]), tiny_top_p, None) == 1

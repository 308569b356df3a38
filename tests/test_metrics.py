"""The running average behind tier read speeds and the prefill speed."""

from __future__ import annotations

import pytest

from lmcache_ext.metrics import RunningAverage


def test_the_first_observation_is_taken_as_is_then_each_new_one_weighs_its_share():
    average = RunningAverage(0.25)
    assert average.value is None
    average.observe(100.0)
    assert average.value == 100.0
    average.observe(200.0)
    assert average.value == pytest.approx(0.75 * 100.0 + 0.25 * 200.0)


@pytest.mark.parametrize("weight", [0.0, -0.1, 1.5])
def test_a_weight_outside_zero_to_one_is_an_error(weight):
    with pytest.raises(ValueError, match="weight"):
        RunningAverage(weight)

"""The progress line's ETA accounts for later progressive stages costing more per step."""

import pytest

from effnetv2_jax import reporting


def test_eta_scales_remaining_steps_by_image_area():
  clock = reporting.EtaClock()
  clock.add_train(seconds=1.0, steps=10, image_size=16)
  # Ten more steps at twice the side cost four times as long.
  assert clock.eta([(10, 32)]) == pytest.approx(4.0)
  clock.add_compile(3.0)
  assert clock.eta([(0, 16), (10, 16)], remaining_stages=1) == pytest.approx(1.0 + 3.0)


def test_eta_unknown_before_any_step():
  assert reporting.EtaClock().eta([(5, 16)]) != reporting.EtaClock().eta([(5, 16)])  # NaN

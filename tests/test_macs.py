"""Multiply-add counts: within 1% of the official figures, and equal to an independent formula."""

import pytest

from effnetv2_jax.models import count_macs, create_model
from effnetv2_jax.models.macs import macs_by_top_module

# Official multiply-adds at the eval size (reference notes, section 1).
OFFICIAL_MACS = {
  ("efficientnetv2-b0", 224): 0.72e9,
  ("efficientnetv2-b1", 240): 1.20e9,
  ("efficientnetv2-b2", 260): 1.70e9,
  ("efficientnetv2-b3", 300): 3.02e9,
  ("efficientnetv2-s", 384): 8.38e9,
  ("efficientnetv2-m", 480): 24.6e9,
  ("efficientnetv2-l", 480): 56.1e9,
  ("efficientnetv2-xl", 512): 93.4e9,
}


@pytest.mark.parametrize("name,size", sorted(OFFICIAL_MACS))
def test_macs_within_one_percent_of_official(name, size):
  macs = count_macs(name, size)
  assert abs(macs / OFFICIAL_MACS[(name, size)] - 1) < 0.01


def _formula_macs(model, size):
  """Independent analytic walk over the block table (no tracing): convs, SE and classifier."""
  stem, specs, head = model.architecture()
  out = lambda n, s: -(-n // s)
  h = out(size, 2)
  total = h * h * 9 * 3 * stem
  for b in specs:
    hidden = b.in_filters * b.expand_ratio
    h_out = out(h, b.stride)
    if b.fused:
      if b.expand_ratio != 1:
        total += h_out**2 * b.kernel_size**2 * b.in_filters * hidden
        total += h_out**2 * hidden * b.out_filters
      else:
        total += h_out**2 * b.kernel_size**2 * b.in_filters * b.out_filters
    else:
      if b.expand_ratio != 1:
        total += h * h * b.in_filters * hidden
      total += h_out**2 * b.kernel_size**2 * hidden
      total += h_out**2 * hidden * b.out_filters
    if b.se_filters:
      total += 2 * hidden * b.se_filters
    h = h_out
  return total + h * h * specs[-1].out_filters * head + head * model.num_classes


@pytest.mark.parametrize(
  "name,size",
  [
    ("efficientnetv2-s", 384),
    ("efficientnetv2-b3", 300),
    ("efficientnet-b0", 224),
    ("efficientnetv2-s", 97),
  ],
)
def test_traced_count_equals_the_block_table_formula(name, size):
  assert count_macs(name, size) == _formula_macs(create_model(name), size)


def test_counts_follow_overrides_and_include_se_and_classifier():
  parts = macs_by_top_module(create_model("efficientnetv2-b0"), 224)
  assert parts["classifier"] == 1280 * 1000
  assert count_macs("efficientnetv2-b0", 224, num_classes=10) == (
    count_macs("efficientnetv2-b0", 224) - 1280 * 990
  )
  assert (
    count_macs("efficientnetv2-s", 384, width_mult=0.5) < count_macs("efficientnetv2-s", 384) / 3
  )
  # ResNet-50 at 224: the well-known ~4.1 G multiply-adds.
  assert abs(count_macs("resnet50", 224) / 4.09e9 - 1) < 0.01

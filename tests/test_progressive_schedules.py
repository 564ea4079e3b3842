"""Stage lengths as fractions of training and the 'hold_then_ramp' size curve (progressive.py);
the presets' tables themselves are pinned in test_progressive.py."""

import pytest

from configs import imagenet
from effnetv2_jax import config_validation as cv
from effnetv2_jax import plan
from effnetv2_jax import progressive


def _config(arg="variant=s,preset=paper", steps=1000, **progressive_fields):
  c = imagenet.get_config(arg)
  c.num_train_steps = steps
  for k, v in progressive_fields.items():
    c.progressive[k] = v
  return c


def _bounds(table):
  return [(s.first_step, s.last_step) for s in table]


def _tiles(table, steps):
  assert table[0].first_step == 0 and table[-1].last_step == steps
  assert all(a.last_step == b.first_step for a, b in zip(table, table[1:]))
  assert all(isinstance(s.first_step, int) and s.num_steps > 0 for s in table)


def test_default_fields_leave_every_preset_table_unchanged():
  for preset in progressive.PRESETS:
    c = _config(f"variant=s,preset={preset}")
    assert c.progressive.stage_fractions == () and c.progressive.size_curve == "linear"
    n = 1 if preset == "none" else 4
    assert _bounds(progressive.stages(c)) == [
      (int(i / n * 1000), int((i + 1) / n * 1000)) for i in range(n)
    ]


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_stage_fractions_set_the_boundaries_and_keep_the_presets_values(preset):
  c = _config(f"variant=s,preset={preset}", steps=1001, num_stages=3)
  equal = progressive.stages(c)
  c.progressive.stage_fractions = (0.25, 0.25, 0.5)
  t = progressive.stages(c)
  assert _bounds(t) == [(0, 250), (250, 500), (500, 1001)]  # 0.5 * 1001 floors to 500
  _tiles(t, 1001)
  # Only lengths change: each stage's size and regularization are the preset's by index.
  strip = lambda s: (s.image_size, s.randaug_magnitude, s.mixup_alpha, s.dropout_rate)
  assert [strip(s) for s in t] == [strip(s) for s in equal]


@pytest.mark.parametrize(
  "fractions,steps",
  [((0.1, 0.2, 0.3, 0.4), 10), ((0.7, 0.1, 0.1, 0.1), 997), ((0.3, 0.3, 0.3, 0.1), 7)],
)
def test_fraction_boundaries_are_integers_without_gaps(fractions, steps):
  c = _config(steps=steps, stage_fractions=fractions)
  t = progressive.stages(c)
  _tiles(t, steps)
  c_sum = 0.0
  for s, f in zip(t[:-1], fractions):
    c_sum += f
    assert s.last_step == int(c_sum * steps + 1e-9)


def test_hold_then_ramp_sizes_lengths_and_regularization():
  c = _config(size_curve="hold_then_ramp", hold_fraction=0.3, tail_fraction=0.2)
  t = progressive.stages(c)
  # Equal size steps (Algorithm 1's sizes); hold 30%, two ramp stages of 25%, tail 20%.
  assert [s.image_size for s in t] == [128, 185, 242, 300]
  assert _bounds(t) == [(0, 300), (300, 550), (550, 800), (800, 1000)]
  p = c.progressive
  for s in t:
    # t = (size - min) / (max - min), before rounding: i / (M - 1).
    frac = s.index / 3
    assert s.randaug_magnitude == pytest.approx(
      p.min_randaug + (p.max_randaug - p.min_randaug) * frac
    )
    assert s.dropout_rate == pytest.approx(p.min_dropout + (p.max_dropout - p.min_dropout) * frac)
    t_size = (s.image_size - p.min_image_size) / (p.max_image_size - p.min_image_size)
    assert frac == pytest.approx(t_size, abs=0.01)  # the rounded size is within a pixel


def test_hold_then_ramp_with_more_ramp_stages_and_the_official_dropout():
  c = _config(
    "variant=s,preset=official",
    steps=1000,
    num_stages=6,
    size_curve="hold_then_ramp",
    hold_fraction=0.2,
    tail_fraction=0.2,
  )
  t = progressive.stages(c)
  assert t[0].image_size == 128 and t[-1].image_size == 300  # the hold starts at min
  assert [s.num_steps for s in t] == [200, 150, 150, 150, 150, 200]
  assert {s.dropout_rate for s in t} == {c.progressive.max_dropout}  # official keeps dropout
  assert t[0].randaug_magnitude == c.progressive.min_randaug
  assert t[-1].randaug_magnitude == c.progressive.max_randaug


def test_hold_then_ramp_without_hold_or_tail_is_the_paper_table():
  c = _config(size_curve="hold_then_ramp")
  t = progressive.stages(c)
  c.progressive.size_curve = "linear"
  assert t == progressive.stages(c)
  # Without a tail the last ramp stage is the one at max size.
  c = _config(size_curve="hold_then_ramp", hold_fraction=0.4, num_stages=3)
  t = progressive.stages(c)
  assert [s.image_size for s in t] == [128, 214, 300]
  assert [s.num_steps for s in t] == [400, 300, 300]


def test_plan_mode_shows_the_lengths():
  c = _config(size_curve="hold_then_ramp", hold_fraction=0.3, tail_fraction=0.2)
  run = plan.resolve(c, num_train=100_000, num_classes=1000)
  text = plan.format_plan(c, run)
  assert "size curve hold_then_ramp: hold 0.3 at 128px, tail 0.2 at 300px" in text
  assert "stage lengths 30.0%, 25.0%, 25.0%, 20.0% of the steps" in text
  assert "| 0 | 128 |" in text and "| 0-300 |" in text
  # The line itself, without counting MACs again.
  c = _config(stage_fractions=(0.5, 0.2, 0.2, 0.1))
  line = plan.schedule_shape(c, plan.resolve(c, num_train=100_000, num_classes=1000))
  assert (
    line
    == "stage fractions (0.5, 0.2, 0.2, 0.1); stage lengths 50.0%, 20.0%, 20.0%, 10.0% of the steps"
  )
  assert (
    plan.schedule_shape(_config(), plan.resolve(_config(), num_train=1000, num_classes=10)) == ""
  )


@pytest.mark.parametrize(
  "fields,field",
  [
    ({"stage_fractions": (0.5, 0.5)}, "progressive.stage_fractions"),  # 2 entries for 4 stages
    ({"stage_fractions": (0.5, 0.3, 0.3, 0.1)}, "progressive.stage_fractions"),  # sums to 1.2
    ({"stage_fractions": (0.5, 0.5, 0.0, 0.0)}, "progressive.stage_fractions"),  # empty stages
    ({"stage_fractions": (0.9, 0.0001, 0.0499, 0.05)}, "progressive.stage_fractions"),  # 0 steps
    ({"size_curve": "cosine"}, "progressive.size_curve"),
    ({"hold_fraction": 0.2}, "progressive.hold_fraction"),  # only with hold_then_ramp
    ({"size_curve": "hold_then_ramp", "tail_fraction": 1.0}, "progressive.tail_fraction"),
    (
      {"size_curve": "hold_then_ramp", "hold_fraction": 0.6, "tail_fraction": 0.4},
      "progressive.hold_fraction",
    ),
    (
      {"size_curve": "hold_then_ramp", "hold_fraction": 0.3, "tail_fraction": 0.3, "num_stages": 2},
      "progressive.num_stages",
    ),
    (
      {"size_curve": "hold_then_ramp", "stage_fractions": (0.25, 0.25, 0.25, 0.25)},
      "progressive.stage_fractions",
    ),
  ],
)
def test_bad_schedule_fields_are_named(fields, field):
  with pytest.raises(cv.ConfigError) as e:
    cv.validate_config(_config(**fields), num_devices=1, check_dataset=False)
  assert e.value.field == field, str(e.value)
  assert str(e.value).startswith(field + ":") and "\n" not in str(e.value)


def test_bad_schedule_fields_with_the_none_preset_are_named():
  for fields, field in (
    ({"stage_fractions": (1.0,)}, "progressive.stage_fractions"),
    ({"size_curve": "hold_then_ramp"}, "progressive.size_curve"),
  ):
    with pytest.raises(cv.ConfigError) as e:
      cv.validate_config(
        _config("variant=s,preset=none", **fields), num_devices=1, check_dataset=False
      )
    assert e.value.field == field


def test_good_schedules_validate():
  for fields in (
    {"stage_fractions": (0.1, 0.2, 0.3, 0.4)},
    {"size_curve": "hold_then_ramp", "hold_fraction": 0.25, "tail_fraction": 0.25},
  ):
    cv.validate_config(_config(**fields), num_devices=1, check_dataset=False)

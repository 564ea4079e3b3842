"""The stage table: the paper's Algorithm 1, the released code's schedule, and the baseline."""

import pytest

from configs import default, imagenet
from effnetv2_jax import progressive

STEPS = 1000


def table(arg):
  c = imagenet.get_config(arg)
  c.num_train_steps = STEPS
  return progressive.stages(c)


def test_paper_preset_for_s_matches_table_6():
  t = table("variant=s,preset=paper")
  assert [s.image_size for s in t] == [128, 185, 242, 300]
  assert [s.randaug_magnitude for s in t] == pytest.approx([5, 25 / 3, 35 / 3, 15])
  assert [s.dropout_rate for s in t] == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.1 + 0.4 / 3, 0.3])
  assert all(s.mixup_alpha == 0 and s.cutmix_alpha == 0 for s in t)


def test_paper_preset_for_l_schedules_mixup_and_dropout():
  t = table("variant=l,preset=paper")
  assert (t[0].image_size, t[-1].image_size) == (128, 380)
  assert (t[0].randaug_magnitude, t[-1].randaug_magnitude) == (5, 25)
  assert (t[0].mixup_alpha, t[-1].mixup_alpha) == (0, pytest.approx(0.4))
  assert (t[0].dropout_rate, t[-1].dropout_rate) == (pytest.approx(0.1), pytest.approx(0.5))


def test_official_preset_sizes_and_constant_dropout():
  s = table("variant=s,preset=official")
  assert [x.image_size for x in s] == [171, 214, 257, 300]
  assert [x.randaug_magnitude for x in s] == pytest.approx([5, 5 + 5 / 3, 5 + 10 / 3, 10])
  assert {x.dropout_rate for x in s} == {0.2}
  m = table("variant=m,preset=official")
  assert [x.image_size for x in m] == [192, 256, 320, 384]
  # Mixup and CutMix share the alpha in the code: linspace(0, 0.2, 4).
  assert [x.mixup_alpha for x in m] == pytest.approx([0, 0.2 / 3, 0.4 / 3, 0.2])
  assert [x.cutmix_alpha for x in m] == [x.mixup_alpha for x in m]


def test_none_preset_is_one_stage_at_the_final_values():
  (only,) = table("variant=m,preset=none")
  assert (only.image_size, only.randaug_magnitude, only.dropout_rate) == (384, 15, 0.3)
  assert (only.first_step, only.last_step) == (0, STEPS)


@pytest.mark.parametrize("steps,num_stages", [(1000, 4), (10, 3), (7, 7), (350, 1)])
def test_stages_tile_the_run_without_gaps(steps, num_stages):
  c = imagenet.get_config("variant=s")
  c.num_train_steps = steps
  c.progressive.num_stages = num_stages
  t = progressive.stages(c)
  assert t[0].first_step == 0 and t[-1].last_step == steps
  assert all(a.last_step == b.first_step for a, b in zip(t, t[1:]))
  assert all(s.num_steps > 0 for s in t)
  # stage_at finds the stage that trains each step.
  for s in t:
    assert progressive.stage_at(t, s.first_step) == s
    assert progressive.stage_at(t, s.last_step - 1) == s


def test_official_stage_boundaries_follow_int_ratio_times_total():
  c = imagenet.get_config("variant=s")
  c.num_train_steps = 1001
  assert [s.last_step for s in progressive.stages(c)] == [250, 500, 750, 1001]


def test_size_multiple_rounds_sizes():
  c = imagenet.get_config("variant=s,preset=paper")
  c.num_train_steps = STEPS
  c.progressive.size_multiple = 32
  assert [s.image_size for s in progressive.stages(c)] == [128, 192, 256, 288]


def test_steps_from_epochs_use_the_train_split_size():
  c = default.get_config()
  c.num_epochs, c.batch_size = 2.4, 100
  assert progressive.total_steps(c, num_train_examples=1000) == 24


def test_official_s_plan_has_the_released_codes_step_counts(capsys):
  """The official preset trains on train minus minival (1,256,144 images): int(350 * 1256144 /
  4096) = 107,336 steps, as main.py totals them, and plan mode prints exactly that table."""
  from effnetv2_jax import main as main_lib
  from effnetv2_jax import plan

  c = imagenet.get_config("variant=s,preset=official")
  run = plan.resolve(c)
  assert (run.num_train, run.total_steps) == (1_256_144, 107_336)
  assert [(s.first_step, s.last_step) for s in run.stages] == [
    (0, 26834),
    (26834, 53668),
    (53668, 80502),
    (80502, 107336),
  ]
  assert main_lib.run(c, None, "plan") == 0
  out = capsys.readouterr().out
  assert "107336 steps at batch 4096 (1256144 examples in 'train[:1256144]'" in out
  assert "| 3 | 300 | 10 | 0 | 0 | 0.2 | 80502-107336 |" in out

"""progressive.batch_rule='fit' (effnetv2_jax/batch_fit.py): per stage, the largest batch whose
compiled step fits the memory budget, from two measured peaks; validation and plan mode; and the
trainer: a tiny run under a budget between two measured peaks stays within it at every stage, and
a resumed run takes the recorded batches (measuring nothing) and ends bitwise equal.

The loop runs use tests/_train_fixtures.py's tiny two-stage config (16px then 24px, batch_size 8)
with batch_multiple 8 and max_batch_size 64; the budget lies between the 24px step's peaks at 16
and 24 images, so the last stage fits 16 and the 16px stage more (40 on this CPU).
"""

import jax
import pytest

from configs import imagenet
from effnetv2_jax import batch_fit, memory_fit, plan, sharding
from effnetv2_jax import config_validation as cv

import _train_fixtures as fx

ONE = jax.devices()[:1]


def _s_fit(**fields):
  c = imagenet.get_config("variant=s,preset=paper")  # 128, 185, 242, 300 px; batch 4096
  c.num_train_steps = 1000
  c.progressive.batch_rule = "fit"
  for k, v in fields.items():
    if k in c.progressive:
      c.progressive[k] = v
    else:
      c[k] = v
  return c


class _Pixels:
  """A fake measure: a fixed cost plus `per_pixel` bytes per pixel of the global batch, counting
  its calls per stage; `bump` adds a tent that peaks halfway to `top`, above the chord."""

  def __init__(self, fixed, per_pixel, bump=0, top=0):
    self.fixed, self.per_pixel, self.bump, self.top = fixed, per_pixel, bump, top
    self.calls = {}

  def peak(self, size, batch):
    tent = self.bump * min(batch, self.top - batch) if self.bump else 0
    return self.fixed + self.per_pixel * batch * size * size + tent

  def __call__(self, stage, batch):
    self.calls.setdefault(stage.index, []).append(batch)
    return self.peak(stage.image_size, batch)


def _provisional(c):
  run = plan.resolve(c, num_train=1_024_000, num_classes=1000)
  assert run.batches_provisional and run.constant_batch
  return run


def test_fit_takes_the_largest_multiple_under_the_budget_and_small_stages_get_more():
  c = _s_fit()
  run = _provisional(c)
  multiple, cap = batch_fit.limits(c, 1)
  assert (multiple, cap) == (64, 16 * 4096)  # batch_multiple 64; max_batch_size 0: 16 x 4096
  fake, budget = _Pixels(fixed=3 * 2**30, per_pixel=40), 16 * 2**30
  fit = batch_fit.fit_batches(fake, budget, run.stages, multiple=64, max_batch=cap, num_devices=1)
  for stage, batch in zip(run.stages, fit.batches):
    fits = [b for b in range(64, cap + 1, 64) if fake.peak(stage.image_size, b) <= budget]
    assert batch == max(fits), stage  # the largest multiple of 64 that fits
    assert fit.peak(stage.index) == fake.peak(stage.image_size, batch) <= budget
    assert len(fake.calls[stage.index]) == 3  # two probes for the line, one check of the choice
  assert list(fit.batches) == sorted(fit.batches, reverse=True) and len(set(fit.batches)) == 4
  assert fit.batches[0] > 4096 > fit.batches[-1]  # 300px fits fewer than the reference here
  # A cap below what fits: every stage at the cap (one compile each: the cap is measured first).
  small = _Pixels(fixed=0, per_pixel=1)
  capped = batch_fit.fit_batches(
    small, budget, run.stages, multiple=64, max_batch=8192, num_devices=1
  )
  assert capped.batches == (8192,) * 4 and all(len(v) == 1 for v in small.calls.values())
  # The recorded form round-trips (checkpoint metadata and results.json are JSON).
  assert batch_fit.BatchFit.from_dict(fit.to_dict()) == fit


def test_an_optimistic_line_is_walked_down_until_the_batch_fits():
  c = _s_fit()
  stage = _provisional(c).stages[-1]  # 300px
  cap = 16 * 4096
  fake = _Pixels(fixed=2**30, per_pixel=40, bump=2**18, top=cap)  # above the chord in between
  budget = 24 * 2**30
  measure = lambda b: fake(stage, b)
  batch, measured = batch_fit.fit_stage_batch(
    measure, budget, multiple=64, max_batch=cap, stage=stage, num_devices=1
  )
  line = memory_fit.PeakLine.through((64, fake.peak(300, 64)), (cap, fake.peak(300, cap)))
  assert line.largest_fitting(budget, 64, cap) > batch  # the line alone would not have fitted
  assert fake.peak(300, batch) <= budget and measured[batch] == fake.peak(300, batch)
  assert len(measured) > 3


def test_a_stage_without_room_for_one_multiple_is_one_clear_error():
  c = _s_fit()
  run = _provisional(c)
  fake = _Pixels(fixed=2**30, per_pixel=40)
  budget = int(fake.peak(242, 64))  # 128..242 px fit 64 images, 300 px does not
  with pytest.raises(memory_fit.DoesNotFitError) as e:
    batch_fit.fit_batches(fake, budget, run.stages, multiple=64, max_batch=65536, num_devices=8)
  msg = str(e.value)
  assert "\n" not in msg
  for needle in ("stage 3 (300px)", "'fit'", "64 images (8 per device)", f"({budget} bytes)"):
    assert needle in msg, (needle, msg)
  assert f"({int(fake.peak(300, 64))} bytes) per device" in msg


class _Checkpoints:
  def __init__(self, metas):
    self.metas = metas  # step -> meta dict, or None for one that does not read

  def all_steps(self):
    return sorted(self.metas)

  def read_meta(self, step):
    if self.metas[step] is None:
      raise OSError("truncated")
    return self.metas[step]


def test_recorded_batches_come_from_the_newest_readable_checkpoint():
  fit = batch_fit.BatchFit((32, 16), 1000, 8, 64, (16, 24), ({8: 1, 32: 2}, {16: 3}))
  rec = {"batch_fit": fit.to_dict()}
  assert batch_fit.recorded(_Checkpoints({})) is None
  assert batch_fit.recorded(_Checkpoints({3: rec, 6: None})) == fit
  # The newest readable one decides: trained without 'fit', nothing is taken from older ones.
  assert batch_fit.recorded(_Checkpoints({3: rec, 6: {"stages": {}}})) is None


# --- validation and plan mode -------------------------------------------------------------------


def test_fit_is_accepted_and_its_conflicts_name_the_field():
  cv.validate_config(_s_fit(), num_devices=8, check_dataset=False)
  cv.validate_config(_s_fit(max_batch_size=8192), num_devices=8, check_dataset=False)
  bad = [
    (dict(batch_sizes=(4096,) * 4), "progressive.batch_sizes", "(not 'fit')"),
    (dict(grad_accum_steps=0), "grad_accum_steps", "they are alternatives"),
    (dict(grad_accum_steps=2), "grad_accum_steps", "must be 1 with progressive.batch_rule 'fit'"),
    (
      dict(batch_multiple=8192, max_batch_size=4096),
      "progressive.max_batch_size",
      "multiples of 8192",
    ),
    (dict(batch_multiple=131072), "progressive.batch_multiple", "16 x batch_size"),
  ]
  for fields, field, needle in bad:
    with pytest.raises(cv.ConfigError) as e:
      cv.validate_config(_s_fit(**fields), num_devices=8, check_dataset=False)
    assert e.value.field == field and needle in str(e.value), (fields, str(e.value))


def test_plan_mode_says_the_batches_are_chosen_at_run_start():
  c = _s_fit(max_batch_size=8192, model_name="efficientnetv2-b0")  # counts MACs: a small model
  run = _provisional(c)
  text = plan.format_plan(c, run)
  assert "batch_rule fit, the largest multiple of 64 (for 1 device(s)), at most 8192" in text
  assert "chosen when the run starts" in text and "provisional" in text
  assert "| 0 | 128 | 5 | 0 | 0 | 0.1 | 0-250 | 4096 |" in text  # the constant table
  # Once measured, the table is the fitted one and the line no longer says provisional.
  fitted = plan.with_stage_batches(c, run, (8192, 8192, 6144, 4096))
  assert [s.batch_size for s in fitted.stages] == [8192, 8192, 6144, 4096]
  assert fitted.stages[-1].last_step == fitted.total_steps and not fitted.batches_provisional
  text = plan.format_plan(c, fitted)
  assert (
    "provisional" not in text and "| 0 | 128 | 5 | 0 | 0 | 0.1 | 0-125 | 8192 | 0.512 |" in text
  )


# --- the training loop --------------------------------------------------------------------------


def fit_config(data, cache, budget=0):
  c = fx.tiny_config(data, steps=16, cache=cache)
  c.progressive.batch_rule = "fit"
  c.progressive.batch_multiple = 8
  c.progressive.max_batch_size = 64
  c.device_memory_bytes = int(budget)
  c.eval_every_stage = False
  return c


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
  """The budget from two measured peaks of the 24px stage, and the uninterrupted run under it."""
  from effnetv2_jax import train

  base = tmp_path_factory.mktemp("batch_fit_loop")
  data = fx.make_folder_dataset(str(base / "data"))
  with fx.restored_compilation_cache(), fx.unoptimized_xla():
    cfg = fit_config(data, fx.CACHE_DIR)
    train.setup_compilation_cache(cfg)
    mesh = sharding.make_mesh(ONE)
    provisional = plan.resolve(cfg, num_devices=1)
    measure = train.fit_measure(cfg, provisional, mesh)
    last = provisional.stages[-1]
    p16, p24 = measure(last, 16), measure(last, 24)
    assert p16 < p24
    budget = (p16 + p24) // 2
    ref_wd = str(base / "reference")
    ref = train.train_and_evaluate(fit_config(data, fx.CACHE_DIR, budget), ref_wd, devices=ONE)
    yield {
      "base": base,
      "data": data,
      "budget": budget,
      "ref": ref,
      "train": train,
      "measure": measure,
      "stages": provisional.stages,
    }


def test_every_stage_trains_within_the_budget(loop):
  ref, budget = loop["ref"], loop["budget"]
  assert ref["status"] == "completed"
  batches = [s["batch_size"] for s in ref["stages"]]
  assert batches[1] == 16 and batches[0] > 16 and batches[0] % 8 == 0
  for s in ref["stages"]:
    assert 0 < s["peak_bytes"] <= budget == s["memory_budget_bytes"], s
    assert s["grad_accum_steps"] == 1
  fit = ref["batch_fit"]
  assert fit["batches"] == batches and fit["budget_bytes"] == budget and fit["seconds"] > 0
  # The larger batch the 16px stage did not take is over the budget (unless it is the cap).
  if batches[0] < 64:
    assert loop["measure"](loop["stages"][0], batches[0] + 8) > budget
  # The table is the fitted one: the run's 128 reference images in steps of each stage's batch.
  assert ref["stages"][0]["first_example"] == 0
  assert ref["stages"][1]["first_example"] == ref["stages"][0]["steps"] * batches[0]
  assert abs(ref["stages"][1]["first_example"] + ref["stages"][1]["steps"] * 16 - 128) <= 8


def test_resumed_fit_run_reuses_the_recorded_batches_and_ends_bitwise_equal(loop, monkeypatch):
  """Stopped mid stage 0 and mid stage 1, then finished: nothing is measured after the first
  start, even with another budget in the config (a resume keeps the table it trained on), and
  the params are the uninterrupted run's."""
  train, data, ref, budget = loop["train"], loop["data"], loop["ref"], loop["budget"]
  wd = str(loop["base"] / "interrupted")
  fits = []
  real = batch_fit.fit_batches
  monkeypatch.setattr(batch_fit, "fit_batches", lambda *a, **k: fits.append(1) or real(*a, **k))
  cfg = fit_config(data, fx.CACHE_DIR, budget)
  first = ref["stages"][0]["steps"]
  assert train.train_and_evaluate(cfg, wd, stop_at_step=1, devices=ONE)["step"] == 1
  assert fits == [1]
  other = fit_config(data, fx.CACHE_DIR, budget // 4)  # would fit other batches, or none
  assert train.train_and_evaluate(other, wd, stop_at_step=first + 1, devices=ONE)["step"] == (
    first + 1
  )
  final = train.train_and_evaluate(cfg, wd, devices=ONE)
  assert fits == [1]
  assert final["status"] == "completed" and final["step"] == ref["step"]
  assert final["batch_fit"]["batches"] == ref["batch_fit"]["batches"]
  assert [s["batch_size"] for s in final["stages"]] == [s["batch_size"] for s in ref["stages"]]
  assert final["params_checksum"] == ref["params_checksum"]
  assert final["final_eval"] == ref["final_eval"]

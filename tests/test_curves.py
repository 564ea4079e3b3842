"""Time to accuracy (effnetv2_jax/curves.py): the curve's format, when evals are due, time_to,
and the plot. Pure host code: no model, no data."""

import json

import pytest

from configs import default
from effnetv2_jax import curves


def _synthetic():
  """Evals after 100 s of training each, each eval costing 10 s: wall_s counts earlier evals."""
  c = curves.Curve(every_steps=100)
  tops = [0.2, 0.5, 0.6, 0.8]
  for i, top1 in enumerate(tops):
    c.add(
      step=100 * (i + 1),
      wall_s=100.0 * (i + 1) + 10.0 * i,
      images_seen=100 * (i + 1) * 64,
      top1=top1,
      top5=min(1.0, top1 + 0.1),
      eval_s=10.0,
      stage=i // 2,
      image_size=24,
      num_examples=16,
    )
  return c


def test_time_to_interpolates_linearly_between_points():
  c = _synthetic()  # (100 s, 0.2), (210 s, 0.5), (320 s, 0.6), (430 s, 0.8)
  results = {"curve": c.to_dict()}
  assert curves.time_to(results, 0.5) == pytest.approx(210.0)  # exactly a point
  assert curves.time_to(results, 0.7) == pytest.approx(375.0)  # halfway 320 -> 430
  assert curves.time_to(results, 0.35) == pytest.approx(155.0)
  assert curves.time_to(results, 0.1) == pytest.approx(100.0)  # the first point already
  assert curves.time_to(results, 0.81) is None  # never reached
  # Without the evals' cost: the times become 100, 200, 300, 400.
  assert curves.time_to(results, 0.7, exclude_eval=True) == pytest.approx(350.0)
  assert curves.time_to(results, 0.8, exclude_eval=True) == pytest.approx(400.0)
  # The other accepted inputs give the same answer.
  assert curves.time_to(c, 0.7) == curves.time_to(c.to_dict(), 0.7) == curves.time_to(c.points, 0.7)
  assert curves.time_to({}, 0.5) is None


def test_time_to_takes_the_first_crossing():
  c = curves.Curve(every_steps=1)
  for step, (wall, top1) in enumerate([(10, 0.1), (20, 0.6), (30, 0.4), (40, 0.9)], start=1):
    c.add(step, wall, step, top1, top1, 0.0, 0, 16)
  assert curves.time_to(c, 0.5) == pytest.approx(18.0)  # 10 + (0.4 / 0.5) * 10


def test_curve_round_trips_through_json_and_checkpoint_meta():
  c = _synthetic()
  d = json.loads(json.dumps(c.to_dict()))  # what results.json and the checkpoint meta hold
  assert set(d) == {
    "eval_every_steps",
    "eval_every_seconds",
    "eval_subset",
    "eval_s_total",
    "points",
  }
  assert d["eval_s_total"] == 40.0
  assert set(d["points"][0]) == set(curves.POINT_FIELDS)
  back = curves.Curve.from_dict(d)
  assert back.to_dict() == c.to_dict()
  # Resumed from the checkpoint at step 250: points after it are dropped, and re-recorded.
  resumed = curves.Curve.from_dict(d, upto_step=250)
  assert [p["step"] for p in resumed.points] == [100, 200]
  # from_config: the config's settings, the saved points.
  cfg = default.get_config()
  cfg.eval_every_steps, cfg.eval_every_seconds, cfg.eval_subset = 50, 30.0, 8
  restored = curves.Curve.from_config(cfg, d, upto_step=300)
  assert (restored.every_steps, restored.every_seconds, restored.subset) == (50, 30.0, 8)
  assert [p["step"] for p in restored.points] == [100, 200, 300]
  assert not curves.Curve.from_config(default.get_config()).enabled  # defaults: off


def test_points_must_come_in_step_order():
  c = _synthetic()
  with pytest.raises(ValueError, match="step 400"):
    c.add(400, 999.0, 0, 0.9, 0.9, 1.0, 1, 24)


def test_train_curve_round_trip():
  t = curves.TrainCurve()
  t.add(10, 5.0, 2.3)
  t.add(20, 9.5, 1.9)
  d = json.loads(json.dumps(t.to_list()))
  assert d == [{"step": 10, "wall_s": 5.0, "loss": 2.3}, {"step": 20, "wall_s": 9.5, "loss": 1.9}]
  assert curves.TrainCurve.from_list(d).to_list() == d
  assert curves.TrainCurve.from_list(d, upto_step=15).to_list() == d[:1]
  assert curves.TrainCurve.from_list(None).to_list() == []


def test_due_by_steps():
  c = curves.Curve(every_steps=100)
  assert not c.due(0, 0.0)
  assert [s for s in range(1, 401) if c.due(s, 0.0)] == [100, 200, 300, 400]
  c.add(200, 50.0, 0, 0.5, 0.5, 1.0, 0, 24)
  assert not c.due(200, 60.0)  # never twice for one step
  assert c.due(300, 60.0)
  assert not curves.Curve().due(100, 1e9)  # both off


def test_due_by_seconds_counts_from_the_end_of_the_last_eval():
  c = curves.Curve(every_seconds=60.0)
  assert not c.due(5, 59.9)
  assert c.due(5, 60.0)  # 60 s since the run started
  c.add(5, 60.0, 0, 0.3, 0.3, 15.0, 0, 24)  # eval ran 60 -> 75 s
  assert not c.due(6, 134.0)
  assert c.due(7, 135.0)


def test_due_by_steps_or_seconds():
  c = curves.Curve(every_steps=1000, every_seconds=30.0)
  assert c.due(1000, 1.0)  # the step, though only 1 s passed
  assert c.due(17, 31.0)  # the clock, though not a multiple of 1000
  assert not c.due(18, 20.0)


def test_resumed_curve_is_due_when_overdue():
  c = curves.Curve.from_dict(_synthetic().to_dict(), upto_step=200)  # last eval ended at 220 s
  c.every_seconds = 100.0
  assert c.due(201, 320.0) and not c.due(201, 319.0)


def test_measure_times_the_eval_apart_from_the_clock():
  clock = iter([123.0])
  calls = []

  def evaluator(variables, *, max_examples=None):
    calls.append((variables, max_examples))
    return {"top1": 0.25, "top5": 0.75, "loss": 1.0, "num_examples": 8}

  c = curves.Curve(every_steps=10, subset=8)
  p = c.measure(
    evaluator,
    {"params": {}},
    wall_clock=lambda: next(clock),
    step=10,
    images_seen=640,
    stage=1,
    image_size=24,
    max_examples=8,
  )
  assert calls == [({"params": {}}, 8)]
  assert (p["step"], p["wall_s"], p["images_seen"], p["top1"], p["top5"]) == (
    10,
    123.0,
    640,
    0.25,
    0.75,
  )
  assert (p["stage"], p["image_size"], p["num_examples"]) == (1, 24, 8)
  assert 0.0 <= p["eval_s"] < 5.0


def _results():
  c = _synthetic()
  return {
    "curve": c.to_dict(),
    "train_curve": [
      {"step": s, "wall_s": s * 1.05, "loss": 2.0 / (1 + s / 100)} for s in range(10, 401, 10)
    ],
    "stages": [
      {"index": 0, "image_size": 16, "first_step": 0, "last_step": 200},
      {"index": 1, "image_size": 24, "first_step": 200, "last_step": 400},
    ],
    "config": {"model_name": "efficientnetv2-b0"},
  }


def test_stage_starts_on_the_wall_clock():
  starts = curves.stage_starts(_results())
  assert [(i, size) for _, i, size in starts] == [(0, 16), (1, 24)]
  assert starts[0][0] == 0.0
  assert starts[1][0] == pytest.approx(210.0)  # train curve has step 200 at 210 s
  r = _results()
  r["stages"][1]["start_wall_s"] = 205.0  # the trainer's own record wins
  assert curves.stage_starts(r)[1][0] == 205.0


def test_plot_writes_a_png(tmp_path):
  out = str(tmp_path / curves.CURVES_PNG)
  assert curves.plot_curves(_results(), out) == out
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Only a train curve (evals off), or only eval points: still a plot.
  only_train = {k: v for k, v in _results().items() if k != "curve"}
  assert curves.plot_curves(only_train, str(tmp_path / "train.png"))
  only_curve = {k: v for k, v in _results().items() if k != "train_curve"}
  assert curves.plot_curves(only_curve, str(tmp_path / "eval.png"))
  # Nothing recorded: nothing written.
  assert curves.plot_curves({"stages": []}, str(tmp_path / "none.png")) is None
  assert not (tmp_path / "none.png").exists()

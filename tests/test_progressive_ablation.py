"""The ablation script's arms and its summary: constant-reg pins regularization, times and reach."""

from configs import demo
from effnetv2_jax import plan, sweep

from experiments import progressive_vs_baseline as ab


def _staged(overrides):
  c = demo.get_config()
  for k, v in overrides.items():
    sweep.apply_override(c, k, v)
  return list(plan.resolve(c).stages)


def test_arms_differ_only_in_the_schedule():
  config = demo.get_config()
  arms = ab.arms(config)
  assert set(arms) == {
    "fixed",
    "progressive, constant reg",
    "progressive, adaptive",
    "official, adaptive",
  }
  fixed = _staged(arms["fixed"])
  const = _staged(arms["progressive, constant reg"])
  adaptive = _staged(arms["progressive, adaptive"])
  assert len(fixed) == 1 and fixed[0].image_size == config.progressive.max_image_size
  # Constant reg: sizes grow exactly as in the adaptive arm, regularization is the final one throughout.
  assert [s.image_size for s in const] == [s.image_size for s in adaptive]
  assert len({(s.randaug_magnitude, s.mixup_alpha, s.dropout_rate) for s in const}) == 1
  assert const[0].randaug_magnitude == adaptive[-1].randaug_magnitude
  assert const[0].dropout_rate == adaptive[-1].dropout_rate
  assert adaptive[0].randaug_magnitude < adaptive[-1].randaug_magnitude


def _result(top1s, walls, final):
  stages = [
    {"image_size": 16 + 4 * i, "wall_s": w, "compile_s": 1.0, "eval_top1": t, "steps": 10}
    for i, (t, w) in enumerate(zip(top1s, walls))
  ]
  return {
    "stages": stages,
    "final_eval": {"top1": final},
    "total_wall_s": sum(walls),
    "step": 10,
    "config": {"batch_size": 49},
  }


def test_summary_speedup_and_time_to_reach_the_baseline():
  results = {
    ("fixed", 0): _result([0.90], [400.0], 0.90),
    ("progressive, adaptive", 0): _result([0.5, 0.8, 0.91, 0.92], [50.0, 50.0, 60.0, 40.0], 0.92),
    ("progressive, constant reg", 0): _result([0.5, 0.7, 0.8, 0.85], [50.0] * 4, 0.85),
    ("official, adaptive", 0): None,
  }
  rows, curves = ab.summarize("v2", results)
  by_arm = {r[1]: r for r in rows}
  adaptive = by_arm["progressive, adaptive"]
  assert adaptive[4] == "+2.00" and adaptive[5] == "200" and adaptive[7] == "2.00x"
  assert adaptive[8] == "160"  # the third stage end (50 + 50 + 60 s) is the first at >= 0.90
  assert by_arm["progressive, constant reg"][8] == "not reached"
  # Per-stage speed excludes compiling: 10 steps x 49 images in (wall - 1) s.
  assert adaptive[9] == "10/10/8/13" and by_arm["fixed"][9] == "1"
  assert by_arm["official, adaptive"][3].startswith("missing")
  assert curves["v2 progressive, adaptive (seed 0)"] == (
    [50.0, 100.0, 160.0, 200.0],
    [0.5, 0.8, 0.91, 0.92],
  )

"""Gradient accumulation (steps.make_train_step(grad_accum_steps=k)) and fitting a stage into
device memory (effnetv2_jax/memory_fit.py): k micro-batches are one batch, BN statistics move per
micro-batch, 1 and 8 devices agree with no images moved between them, the linear fit picks the
batch, and a stage that cannot fit says so in one line."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_net import TinyNet

from configs import default, imagenet
from effnetv2_jax import compile_ahead, memory_fit, optim, plan, sharding, steps, train
from effnetv2_jax import config_validation as cv
from effnetv2_jax import state as state_lib

K = 10
B = 16


@functools.lru_cache(maxsize=None)
def _tx():
  c = default.get_config()
  c.batch_size, c.warmup_epochs, c.lr_schedule = B, 0.0, "constant"
  return optim.make_optimizer(c, 10.0, 100)


def _step(model, k, **kw):
  return jax.jit(
    steps.make_train_step(
      model,
      _tx(),
      num_classes=K,
      label_smoothing=0.1,
      weight_decay=1e-5,
      ema_decay=0.9,
      grad_accum_steps=k,
      **kw,
    )
  )


def _batch(seed, n=B, size=8):
  r = np.random.default_rng(seed)
  return {
    "image": jnp.asarray(r.normal(size=(n, size, size, 3)), jnp.float32),
    "label": jnp.asarray(r.integers(0, K, size=n), jnp.int32),
  }


def _interleave(batch, k):
  """The batch whose micro-batch j (rows j, j + k, ...) is chunk j of `batch` (rows j*B/k, ...)."""
  return jax.tree.map(
    lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape), batch
  )


def _close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5), a, b)


@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_update_like_one_full_batch(k):
  # BN over groups of 4 images: with the batch interleaved so that micro-batch j is chunk j of the
  # full batch, every BN group of the micro-batches is a BN group of the full batch, so each
  # image's loss is the same and the mean-loss gradient must be too (no dropout, no mixing).
  model = TinyNet(num_classes=K, bn_group_size=4)
  s0 = state_lib.create_train_state(jax.random.key(0), model, _tx(), 8)
  full, accum = _step(model, 1), _step(model, k)
  a, b = s0, s0
  for t in range(3):
    batch = _batch(t)
    a, ma = full(a, batch, jax.random.key(1))
    b, mb = accum(b, _interleave(batch, k), jax.random.key(1))
    for key in ("loss", "ce_loss", "accuracy", "grad_norm"):
      np.testing.assert_allclose(ma[key], mb[key], rtol=1e-5, atol=1e-6)
  for field in ("params", "opt_state", "ema_params"):
    _close(getattr(a, field), getattr(b, field), atol=1e-6)
  assert not np.allclose(a.params["Dense_0"]["kernel"], s0.params["Dense_0"]["kernel"])
  # The same batch NOT interleaved puts other images in each group: a different update, so the
  # agreement above depends on which rows form micro-batch j (rows j, j + k, ...).
  c, _ = accum(s0, _batch(0), jax.random.key(1))
  a1, _ = full(s0, _batch(0), jax.random.key(1))
  assert not np.allclose(c.params["Dense_0"]["kernel"], a1.params["Dense_0"]["kernel"], atol=1e-6)


def test_bn_running_statistics_move_once_per_micro_batch_in_sequence():
  # Whole-micro-batch BatchNorm, k = 4: the step's running statistics are those of applying the
  # model at the step's params to micro-batch 0, then 1, 2, 3, each from the last one's result;
  # the loss is the mean of the four micro-batches' losses.
  k = 4
  model = TinyNet(num_classes=K)
  s0 = state_lib.create_train_state(jax.random.key(0), model, _tx(), 8)
  batch = _batch(5)
  s1, m = _step(model, k)(s0, batch, jax.random.key(1))
  stats, ces = s0.batch_stats, []
  for j in range(k):
    x, y = batch["image"][j::k], batch["label"][j::k]
    logits, new = model.apply(
      {"params": s0.params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    stats = new["batch_stats"]
    targets = steps.smooth_labels(jax.nn.one_hot(y, K), 0.1)
    ces.append(jnp.mean(optax.softmax_cross_entropy(logits, targets)))
  _close(s1.batch_stats, stats, atol=1e-6)
  np.testing.assert_allclose(m["ce_loss"], np.mean(ces), rtol=1e-6)
  # One update from the whole batch lands elsewhere: the sequence is what was checked.
  full, _ = _step(model, 1)(s0, batch, jax.random.key(1))
  mean = lambda s: np.asarray(s["BatchNorm_0"]["mean"])
  assert np.abs(mean(full.batch_stats) - mean(s1.batch_stats)).max() > 1e-3


def test_mixing_pairs_within_each_micro_batch(monkeypatch):
  # With k = 2 the step mixes each micro-batch of B / 2 on its own (the official code mixes within
  # a replica's batch), with its own key: mix sees micro-batches, never the whole batch.
  from effnetv2_jax import mixing

  seen = []
  real = mixing.mix

  def spy(rng, images, onehot, **kw):
    seen.append(images.shape[0])
    return real(rng, images, onehot, **kw)

  monkeypatch.setattr(mixing, "mix", spy)
  model = TinyNet(num_classes=K)
  s0 = state_lib.create_train_state(jax.random.key(0), model, _tx(), 8)
  step = steps.make_train_step(
    model,
    _tx(),
    num_classes=K,
    label_smoothing=0.0,
    weight_decay=0.0,
    ema_decay=0.0,
    mixup_alpha=0.2,
    grad_accum_steps=2,
  )
  jax.eval_shape(step, s0, _batch(0), jax.random.key(0))  # traces, compiles nothing
  assert seen == [B // 2]


def test_grad_accum_steps_must_split_the_batch():
  model = TinyNet(num_classes=K)
  s0 = state_lib.create_train_state(jax.random.key(0), model, _tx(), 8)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="grad_accum_steps must be an integer >= 1"):
      steps.make_train_step(
        model, _tx(), num_classes=K, label_smoothing=0, weight_decay=0, ema_decay=0,
        grad_accum_steps=bad,
      )  # fmt: skip
  step = steps.make_train_step(
    model, _tx(), num_classes=K, label_smoothing=0, weight_decay=0, ema_decay=0, grad_accum_steps=3
  )
  with pytest.raises(ValueError, match="grad_accum_steps=3 does not divide the batch of 16"):
    jax.eval_shape(step, s0, _batch(0), jax.random.key(0))


# --- devices -------------------------------------------------------------------------------------


def test_one_and_eight_devices_agree_with_micro_batches_and_no_image_moves():
  from test_sharding import train_tiny  # dropout on: keys per micro-batch are device-independent

  assert jax.device_count() == 8, "tests/conftest.py must force 8 CPU devices"
  m1, s1, _, _ = train_tiny(jax.devices()[:1], num_steps=2, grad_accum_steps=2)
  m8, s8, step8, mesh8 = train_tiny(jax.devices(), num_steps=2, grad_accum_steps=2)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  for field in ("params", "batch_stats", "ema_params", "ema_batch_stats", "opt_state"):
    _close(getattr(s1, field), getattr(s8, field), atol=1e-5)
  # BN over 8 images per micro-batch, not 16: k really reached the step.
  plain, _, _, _ = train_tiny(jax.devices()[:1], num_steps=1)
  assert abs(float(plain[0]["loss"]) - float(m1[0]["loss"])) > 1e-4
  # 2 images per device, k = 2: each micro-batch is one image on every device. The compiled
  # program moves no image between devices (an interleave that ignored the blocks would need an
  # all-to-all or all-gather of the batch); BN and the gradient still all-reduce.
  rep = sharding.replicated(mesh8)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), s8)
  batch = train.batch_spec(mesh8, 16, 8)
  hlo = step8.lower(state, batch, jax.random.key(0)).compile().as_text()
  for collective in ("all-to-all", "all-gather", "collective-permute"):
    assert collective not in hlo, collective
  assert "all-reduce" in hlo


# --- memory_fit ------------------------------------------------------------------------------


class _Linear:
  """A fake measure: peak = fixed + per_image * batch, counting its calls."""

  def __init__(self, fixed, per_image):
    self.fixed, self.per_image, self.calls = fixed, per_image, []

  def __call__(self, batch):
    self.calls.append(batch)
    return self.fixed + self.per_image * batch


def test_fit_batch_takes_the_largest_multiple_under_the_line_from_two_measures():
  m = _Linear(1000, 10)
  # (1500 - 1000) / 10 = 50 images fit; multiples of 8: 48.
  assert memory_fit.fit_batch(m, 1500, multiple=8, max_batch=1024) == 48
  assert sorted(m.calls) == [8, 1024]
  m = _Linear(1000, 10)
  assert memory_fit.fit_batch(m, 10**6, multiple=8, max_batch=100) == 96  # all fits: one measure
  assert m.calls == [96]
  assert memory_fit.fit_batch(_Linear(1000, 10), 1050, multiple=8, max_batch=64) == 0
  line = memory_fit.PeakLine.through((8, 1080), (64, 1640))
  assert (line.intercept, line.slope) == (1000.0, 10.0) and line.at(50) == 1500


def test_plan_stage_picks_the_fewest_micro_batches_that_fit():
  # Global batch 64 on 8 devices: k in (1, 2, 4, 8), micro-batches 64, 32, 16, 8.
  m = _Linear(100, 10)
  kw = dict(batch_size=64, num_devices=8, stage_index=2, image_size=24)
  assert memory_fit.plan_stage(m, 10**6, memory_fit.FitTarget(**kw)) == (64, 1) and m.calls == [64]
  m = _Linear(100, 10)
  assert memory_fit.plan_stage(m, 400, memory_fit.FitTarget(**kw)) == (
    16,
    4,
  )  # 100 + 10 * 16 = 260; 32 -> 420
  assert m.calls == [64, 8, 32]  # the full batch, the smallest, the largest accumulated
  m = _Linear(100, 10)
  assert memory_fit.plan_stage(m, 200, memory_fit.FitTarget(**kw)) == (8, 8)
  # A floor under the line (the update after the scan; convex, as measured): the chord through
  # the two accumulated probes lies above the curve, so what it picks fits.
  floored = lambda mb: max(300, 100 + 10 * mb)
  for budget in (320, 350, 420, 500):
    mb, k = memory_fit.plan_stage(floored, budget, memory_fit.FitTarget(**kw))
    assert floored(mb) <= budget and k in (2, 4, 8)
  # BN groups of 16 must lie inside micro-batches: 8 images are not allowed, 16 are.
  assert memory_fit.accum_candidates(64, 8, 16) == [1, 2, 4]
  assert memory_fit.plan_stage(
    _Linear(100, 10), 300, memory_fit.FitTarget(group_size=16, **kw)
  ) == (16, 4)


def test_a_stage_that_cannot_fit_one_image_per_device_is_one_clear_error():
  kw = dict(batch_size=64, num_devices=8, stage_index=2, image_size=24)
  with pytest.raises(memory_fit.DoesNotFitError) as e:
    memory_fit.plan_stage(_Linear(100, 10), 150, memory_fit.FitTarget(**kw))
  msg = str(e.value)
  assert isinstance(e.value, ValueError) and "\n" not in msg
  for needle in ("stage 2 (24px)", "1 per device", "8 accumulation steps", "(180 bytes)"):
    assert needle in msg, (needle, msg)
  assert "(150 bytes)" in msg and "config.device_memory_bytes" in msg
  # The background compiler hands it on as itself (it names the stage already), and main
  # makes it exit 2 like any other bad input.
  compiler = compile_ahead.BackgroundCompiler(enabled=False)
  with pytest.raises(memory_fit.DoesNotFitError):
    compiler.get(
      "stage 3/4 (24px)",
      lambda: memory_fit.plan_stage(_Linear(100, 10), 150, memory_fit.FitTarget(**kw)),
    )


def test_budget_is_the_configured_bytes_or_the_device_less_its_margin():
  c = default.get_config()
  c.device_memory_bytes = 12345
  assert memory_fit.budget_bytes(c, jax.devices()[0]) == 12345  # as given, no margin

  class Gpu:
    platform = "gpu"

    def memory_stats(self):
      return {"bytes_limit": 1000, "bytes_in_use": 10}

  assert memory_fit.device_memory_bytes(Gpu(), 0.1) == 900
  c.device_memory_bytes, c.device_memory_margin = 0, 0.25
  assert memory_fit.budget_bytes(c, Gpu()) == 750
  # CPU devices report no limit: they share the host's RAM (8 emulated devices here).
  cpu = jax.devices()[0]
  want = int(memory_fit.host_memory_bytes() // jax.local_device_count() * 0.9)
  assert want > 0 and memory_fit.device_memory_bytes(cpu, 0.1) == want


def _tiny_stage_config(**changes):
  import _train_fixtures as fx

  c = default.get_config()
  c.model_name = "efficientnetv2-b0"
  c.model_overrides.blocks = fx.TINY_BLOCKS
  c.model_overrides.stem_filters = 8
  c.model_overrides.head_filters = 16
  c.batch_size, c.num_train_steps, c.num_classes = 8, 4, 2
  c.progressive.preset, c.progressive.max_image_size = "none", 16
  c.ema_decay = 0.0
  for key, value in changes.items():
    c[key] = value
  return c


def test_fit_stage_compiles_the_trainers_step_and_the_choice_fits():
  # The trainer's compile with grad_accum_steps=0 on one CPU device: the budget lies between
  # what 2 and what 1 micro-batch need (both measured from real compiles of the stage's step),
  # so it must choose 2; the chosen program's own peak is within the budget.
  import _train_fixtures as fx

  with fx.unoptimized_xla():
    c = _tiny_stage_config()
    run = plan.resolve(c, num_train=32, num_classes=2)
    stage = run.stages[0]
    tx = optim.make_optimizer(c, run.steps_per_epoch, run.total_steps)
    lr_fn = optim.lr_schedule(c, run.steps_per_epoch, run.total_steps)
    mesh = sharding.make_mesh(jax.devices()[:1])
    model = train.build_model(c, run.num_classes, stage.dropout_rate)
    spec = train.abstract_state(c, model, tx, stage.image_size, mesh)
    rng = jax.device_put(jax.random.key(0), sharding.replicated(mesh))
    args = (run, stage, tx, lr_fn, mesh, spec, rng)
    peak = {}
    for k in (1, 2):
      c.grad_accum_steps = k
      s = train.compile_stage_step(c, *args)
      assert s.grad_accum_steps == k and s.peak_bytes > 0
      peak[k] = s.peak_bytes
    assert peak[2] < peak[1]
    c.grad_accum_steps, c.device_memory_bytes = 0, (peak[1] + peak[2]) // 2
    fit = train.compile_stage_step(c, *args)
  assert fit.grad_accum_steps == 2 and fit.peak_bytes == peak[2]
  assert fit.peak_bytes <= fit.budget_bytes == c.device_memory_bytes
  assert fit.record(8) == {
    "grad_accum_steps": 2,
    "micro_batch": 4,
    "peak_bytes": peak[2],
    "memory_budget_bytes": c.device_memory_bytes,
  }


def test_linear_fit_predicts_a_real_steps_peak():
  # TinyNet on 32 px images, one CPU device: peaks measured at batches 8 and 64 predict the
  # peak at 32 within 10%, and fit_batch's choice for a budget measured at 40 fits it.
  model = TinyNet(num_classes=K)
  s0 = state_lib.create_train_state(jax.random.key(0), model, _tx(), 32)
  step = _step(model, 1)
  spec = lambda n: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(0, n, 32))

  @functools.lru_cache(maxsize=None)
  def measure(n):
    return memory_fit.peak_bytes(step.lower(s0, spec(n), jax.random.key(0)).compile())

  line = memory_fit.PeakLine.through((8, measure(8)), (64, measure(64)))
  assert line.slope > 0
  assert abs(line.at(32) - measure(32)) <= 0.1 * measure(32)
  budget = measure(40)
  batch = memory_fit.fit_batch(measure, budget, multiple=8, max_batch=64)
  assert 32 <= batch <= 48 and measure(batch) <= budget * 1.05


# --- config ----------------------------------------------------------------------------------


def _config(**changes):
  c = imagenet.get_config("variant=s")  # batch 4096, bn_group_size 1024
  c.num_train_steps = 100
  for key, value in changes.items():
    c[key] = value
  return c


def test_validation_names_the_fields():
  for k in (0, 1, 2, 4):  # 512 images per device on 8; micro-batches of >= 1024 images
    cv.validate_config(_config(grad_accum_steps=k), num_devices=8, check_dataset=False)
  bad = [
    (dict(grad_accum_steps=-1), "grad_accum_steps", "integer >= 0"),
    (dict(grad_accum_steps=3), "grad_accum_steps", "does not divide the 512 images per device"),
    (dict(grad_accum_steps=8), "grad_accum_steps", "not tiled by bn_group_size 1024"),
    (dict(device_memory_bytes=-5), "device_memory_bytes", "integer >= 0"),
    (dict(device_memory_margin=1.0), "device_memory_margin", "fraction in [0, 1)"),
  ]
  for changes, field, needle in bad:
    with pytest.raises(cv.ConfigError) as e:
      cv.validate_config(_config(**changes), num_devices=8, check_dataset=False)
    assert e.value.field == field and needle in str(e.value), (changes, str(e.value))
  c = _config(bn_group_size=0)
  c.grad_accum_steps = 8
  cv.validate_config(c, num_devices=8, check_dataset=False)


def test_plan_mode_shows_the_accumulation():
  c = _config(grad_accum_steps=4, model_name="efficientnetv2-b0")  # counts MACs: a small model
  c.progressive.preset = "none"
  run = plan.resolve(c, num_train=100_000, num_classes=1000)
  assert "gradient accumulation: 4 micro-batches of 1024 per step" in plan.format_plan(c, run)
  c.grad_accum_steps = 0
  assert "chosen per stage" in plan.format_plan(c, run)
  c.grad_accum_steps = 1
  assert "accumulation" not in plan.format_plan(c, run)

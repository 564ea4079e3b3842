"""Performance options keep the numbers: the shift depthwise conv (value and gradient) equals XLA's
grouped convolution at strides 1/2 on odd/even sizes, and block remat changes no value or gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax.models.layers import depthwise_conv

import _train_fixtures as fx

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("h,w", [(7, 7), (8, 8), (9, 6)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_shift_depthwise_matches_xla(h, w, stride, k):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(h * 31 + w * 7 + stride + k), 3)
  x = jax.random.normal(kx, (2, h, w, 5))
  kern = jax.random.normal(kw, (k, k, 1, 5))
  g = jax.random.normal(kg, depthwise_conv(x, kern, stride, "xla").shape)
  loss = lambda impl: lambda x, kern: jnp.sum(depthwise_conv(x, kern, stride, impl) * g)
  np.testing.assert_allclose(
    depthwise_conv(x, kern, stride, "shift"),
    depthwise_conv(x, kern, stride, "xla"),
    atol=1e-5,
    rtol=1e-5,
  )
  got = jax.grad(loss("shift"), (0, 1))(x, kern)
  want = jax.grad(loss("xla"), (0, 1))(x, kern)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=1e-5)


@pytest.fixture
def unoptimized():
  with fx.unoptimized_xla():
    yield


# Both sides run unoptimized: its time is compiling each of ~1300 ops for eager execution.
@pytest.mark.usefixtures("unoptimized")
def test_remat_override_keeps_names_values_and_gradients():
  from effnetv2_jax.models import create_model

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  # One block per stage: every block type and the head are wrapped, at a third of the op-by-op
  # dispatches of B0's 21 blocks (eager on purpose: plain and remat run the same ops, so their
  # numbers agree to the last bits; compiled, the two programs fuse differently and batch-2
  # BatchNorm at 1x1 amplifies the difference).
  plain, remat = (
    create_model("efficientnetv2-b0", num_classes=10, remat=r, stage_repeats=(1,) * 6)
    for r in (False, True)
  )
  v = plain.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(v) == jax.tree.structure(remat.init(jax.random.PRNGKey(1), x))

  def loss_and_grad(model):
    def f(p):
      y, upd = model.apply(
        {"params": p, "batch_stats": v["batch_stats"]},
        x,
        train=True,
        rngs={"dropout": jax.random.PRNGKey(2)},
        mutable=["batch_stats"],
      )
      return jnp.sum(y**2), upd

    return jax.value_and_grad(f, has_aux=True)(v["params"])

  (la, ua), ga = loss_and_grad(plain)
  (lb, ub), gb = loss_and_grad(remat)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5), ga, gb)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6), ua, ub)


def test_shift_depthwise_saves_only_its_input_and_kernel_for_the_backward_pass(capsys):
  # Left to autodiff, the forward pass kept its k*k shifted copies of the input alive for the
  # kernel gradient (9 extra activations per 3x3 conv). The hand-written VJP keeps x and kernel.
  from jax.ad_checkpoint import print_saved_residuals

  x = jnp.ones((2, 8, 8, 4))
  kern = jnp.ones((3, 3, 1, 4))
  for stride in (1, 2):
    capsys.readouterr()
    print_saved_residuals(lambda x, k: depthwise_conv(x, k, stride, "shift"), x, kern)
    saved = sorted(capsys.readouterr().out.strip().splitlines())
    assert [line.split()[0] for line in saved] == ["f32[2,8,8,4]", "f32[3,3,1,4]"], saved


def test_shift_depthwise_bf16_gradients_are_bf16_and_close_to_float32():
  kx, kw = jax.random.split(jax.random.PRNGKey(3))
  x = jax.random.normal(kx, (4, 9, 9, 8))
  kern = jax.random.normal(kw, (3, 3, 1, 8))
  loss = lambda x, kern: jnp.sum(depthwise_conv(x, kern, 2, "shift").astype(jnp.float32) ** 2)
  g32 = jax.grad(loss, (0, 1))(x, kern)
  g16 = jax.grad(loss, (0, 1))(x.astype(jnp.bfloat16), kern.astype(jnp.bfloat16))
  for a, b in zip(g16, g32):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      a.astype(jnp.float32), b, rtol=0.05, atol=0.05 * float(jnp.abs(b).max())
    )


@pytest.mark.parametrize("impl", ["dot", "conv"])
def test_pointwise_conv_equals_flax_conv_with_the_same_parameter(impl):
  from flax import linen as nn
  from effnetv2_jax.models.layers import PointwiseConv

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 6))
  ours = PointwiseConv(7, impl=impl)
  params = ours.init(jax.random.PRNGKey(1), x)
  flax_conv = nn.Conv(7, (1, 1), use_bias=False)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, flax_conv.init(jax.random.PRNGKey(1), x)
  )
  np.testing.assert_allclose(
    ours.apply(params, x), flax_conv.apply(params, x), rtol=1e-5, atol=1e-5
  )
  gx = lambda m: jax.grad(lambda x: jnp.sum(jnp.sin(m.apply(params, x))))(x)
  np.testing.assert_allclose(gx(ours), gx(flax_conv), rtol=1e-5, atol=1e-5)


def test_pointwise_conv_rejects_an_unknown_impl():
  from effnetv2_jax.models.layers import PointwiseConv

  with pytest.raises(ValueError, match="'dot' or 'conv'"):
    PointwiseConv(3, impl="matmul").init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 4)))


def test_cpu_xla_defaults_respect_the_user_and_accelerators(monkeypatch):
  from effnetv2_jax import xla_defaults

  monkeypatch.setattr(xla_defaults, "_backend_started", lambda: False)
  flag = xla_defaults.CPU_FLAGS[0]
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_defaults.apply(env) == xla_defaults.CPU_FLAGS
  assert env["XLA_FLAGS"] == " ".join(
    ("--xla_force_host_platform_device_count=2",) + xla_defaults.CPU_FLAGS
  )
  assert xla_defaults.apply(env) == ()  # idempotent
  user = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flag.replace("false", "true")}
  assert (
    flag not in xla_defaults.apply(user) and "true" in user["XLA_FLAGS"]
  )  # the user's value wins
  assert xla_defaults.apply({"JAX_PLATFORMS": "cuda"}) == ()  # accelerators untouched
  off = {"JAX_PLATFORMS": "cpu", xla_defaults.SWITCH: "0"}
  assert xla_defaults.apply(off) == () and "XLA_FLAGS" not in off
  monkeypatch.setattr(xla_defaults, "_backend_started", lambda: True)
  assert xla_defaults.apply({"JAX_PLATFORMS": "cpu"}) == ()  # too late to matter


def test_cpu_xla_defaults_skip_a_flag_this_xla_does_not_know(monkeypatch):
  # XLA aborts the process on an unknown XLA_FLAGS entry, so a default it lacks must be left out.
  from effnetv2_jax import xla_defaults

  monkeypatch.setattr(xla_defaults, "_backend_started", lambda: False)
  known = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  unknown = "--xla_cpu_no_such_flag_effnetv2=1"
  real_flags = xla_defaults.CPU_FLAGS
  monkeypatch.setattr(xla_defaults, "CPU_FLAGS", (unknown, known))
  assert xla_defaults.apply({"JAX_PLATFORMS": "cpu"}) == (known,)  # the known one is kept
  monkeypatch.setattr(xla_defaults, "CPU_FLAGS", real_flags + (unknown,))
  env = {"JAX_PLATFORMS": "cpu"}
  assert unknown not in xla_defaults.apply(env) and "no_such_flag" not in env["XLA_FLAGS"]


def test_importing_the_package_adds_the_cpu_flags_to_the_environment():
  import os
  from effnetv2_jax import xla_defaults

  if jax.default_backend() != "cpu" or os.environ.get(xla_defaults.SWITCH) == "0":
    pytest.skip("the defaults apply to CPU-only runs that did not switch them off")
  for flag in xla_defaults.CPU_FLAGS:
    assert flag.split("=")[0] in os.environ["XLA_FLAGS"]

"""Layers shared by the model families: initializers, TF-SAME depthwise conv, Conv-BN-Act, SE, DropPath.

Parameter names produced here (weight converters are table lookups over them):
  ConvBNAct      -> `conv/kernel` [kh, kw, in, out] (or depthwise [k, k, 1, C]), `bn/{scale,bias}`,
                    batch_stats `bn/{mean,var}`
  SqueezeExcite  -> `reduce/{kernel,bias}`, `expand/{kernel,bias}` (1x1 convs, kernel [1, 1, in, out])

Precision: parameters and BN statistics are float32 whatever the compute dtype; BatchNorm normalizes in
float32 and casts back, so bf16 training does not drift the running statistics.

BatchNorm groups (`bn_group_size`, `config.bn_group_size`): 0 normalizes over the whole (global)
batch with Flax's `nn.BatchNorm`, as always; G > 0 computes each statistic over groups of G
consecutive images (`GroupedBatchNorm`), the official TPU BatchNorm's groups of per-replica batch
x min(8, replicas) images (reference section 10, item 9) without depending on the device count.
Either way the variables are the same (`bn/{scale,bias}`, batch_stats `bn/{mean,var}`) and eval
mode is the same `nn.BatchNorm` over the running statistics.
"""

from functools import partial
from typing import Any, Callable, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

Dtype = Any
DEPTHWISE_IMPLS = ("auto", "xla", "shift")


def conv_kernel_init(depthwise: bool = False) -> Callable:
  """normal(0, sqrt(2 / fan_out)) with fan_out = kh * kw * out_channels, as the official EfficientNet code.

  For a depthwise kernel the official code's fan_out counts the channel multiplier (1), not the
  channels, so its scale is sqrt(2 / (kh * kw)); Flax's variance_scaling would use k*k*C instead.
  """

  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    fan_out = kh * kw * (1 if depthwise else out)
    return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / fan_out)

  return init


def dense_kernel_init(key, shape, dtype=jnp.float32):
  """uniform(-1/sqrt(num_classes), 1/sqrt(num_classes)): the official head initializer (out, not in)."""
  limit = 1.0 / np.sqrt(shape[1])
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def same_padding(size: int, kernel: int, stride: int) -> Tuple[Tuple[int, int], int]:
  """TF 'SAME' padding (extra pixel at the end when odd) and the output size for one spatial dim."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2), out


def resolve_depthwise_impl(impl: str) -> str:
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
  if impl == "auto":
    # XLA:CPU lowers grouped convolutions to a slow generic loop; on GPU/TPU the native op wins.
    return "shift" if jax.default_backend() == "cpu" else "xla"
  return impl


def _depthwise_xla(x, kernel, stride):
  return lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


def _tap(xp, i: int, j: int, out_h: int, out_w: int, stride: int):
  """xp[:, i + stride*h, j + stride*w, :] for every output pixel (h, w): one kernel tap's inputs."""
  b, _, _, c = xp.shape
  return lax.slice(
    xp,
    (0, i, j, 0),
    (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
    (1, stride, stride, 1),
  )


def _sum_of_taps(xp, kernel, out_h: int, out_w: int, stride: int):
  """sum over (i, j) of xp[:, i + stride*h, j + stride*w, :] * kernel[i, j, 0]: one fused XLA loop."""
  kh, kw = kernel.shape[:2]
  out = None
  for i in range(kh):
    for j in range(kw):
      term = _tap(xp, i, j, out_h, out_w, stride) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _shift_geometry(x_shape, kernel_shape, stride):
  (_, h, w, _), (kh, kw) = x_shape, kernel_shape[:2]
  (pad_h, out_h), (pad_w, out_w) = same_padding(h, kh, stride), same_padding(w, kw, stride)
  return pad_h, pad_w, out_h, out_w


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shift(x, kernel, stride):
  """Depthwise conv as k*k shifted multiply-adds over the padded input (strides by strided slicing).

  Every op is elementwise or a pad/slice, which XLA:CPU fuses into one vectorized loop. The
  gradient is written by hand (below): left to autodiff, JAX saves the k*k shifted copies of the
  input as residuals for the kernel gradient; this VJP saves x and the kernel and recomputes the
  taps. Measured on the whole train step, XLA:CPU's peak memory and speed came out the same
  either way (experiments/results/bench_memory.md); what it changes is the residual set that
  remat policies and host offloading see, 2 arrays instead of k*k + 1.
  """
  pad_h, pad_w, out_h, out_w = _shift_geometry(x.shape, kernel.shape, stride)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  return _sum_of_taps(xp, kernel, out_h, out_w, stride)


def _depthwise_shift_fwd(x, kernel, stride):
  return _depthwise_shift(x, kernel, stride), (x, kernel)


def _depthwise_shift_bwd(stride, residuals, g):
  x, kernel = residuals
  _, h, w, _ = x.shape
  kh, kw = kernel.shape[:2]
  pad_h, pad_w, out_h, out_w = _shift_geometry(x.shape, kernel.shape, stride)

  # d/dx: the same shifted multiply-adds over the cotangent, dilated by the stride (interior
  # padding) and edge-padded so that tap (i, j) of the flipped kernel lines up with input pixels.
  def cotangent_padding(pad, size, k, out):
    lo = k - 1 - pad[0]
    return lo, size + k - 1 - lo - ((out - 1) * stride + 1), stride - 1

  gp = lax.pad(
    g,
    jnp.zeros((), g.dtype),
    (
      (0, 0, 0),
      cotangent_padding(pad_h, h, kh, out_h),
      cotangent_padding(pad_w, w, kw, out_w),
      (0, 0, 0),
    ),
  )
  dx = _sum_of_taps(gp, kernel[::-1, ::-1], h, w, 1)

  # d/dkernel: per tap, the shifted input times the cotangent, summed over batch and space
  # (accumulated in float32 when computing in bf16).
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  taps = [
    jnp.sum(_tap(xp, i, j, out_h, out_w, stride) * g, axis=(0, 1, 2), dtype=jnp.float32)
    for i in range(kh)
    for j in range(kw)
  ]
  dk = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dk


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def depthwise_conv(x, kernel, stride: int = 1, impl: str = "auto"):
  """Depthwise 2D conv, NHWC input, kernel [k, k, 1, C] (Flax grouped-conv layout), TF-SAME padding."""
  impl = resolve_depthwise_impl(impl)
  return (_depthwise_shift if impl == "shift" else _depthwise_xla)(x, kernel, stride)


class DepthwiseConv(nn.Module):
  """Depthwise conv with a `kernel` [k, k, 1, C] parameter and a choice of implementation."""

  kernel_size: int
  strides: int = 1
  impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param(
      "kernel", conv_kernel_init(depthwise=True), (k, k, 1, x.shape[-1]), self.param_dtype
    )
    return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.impl)


class PointwiseConv(nn.Module):
  """1x1 conv without bias; the `kernel` parameter keeps `nn.Conv`'s [1, 1, in, out] shape.

  impl 'dot' computes it as a channel matmul: XLA then sees a dot, whose kernel gradient is one
  matmul over batch x space, where the convolution form made XLA:CPU transpose activations to a
  channels-first layout first (about 0.1 s of the 1 s B0 train step at batch 32 here). 'conv' is
  the plain convolution, which GPUs hand to cuDNN. 'auto' takes 'dot' on the CPU, where it was
  measured to help, and 'conv' elsewhere. Both give the same numbers.
  """

  features: int
  dtype: Dtype = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel", conv_kernel_init(), (1, 1, x.shape[-1], self.features), jnp.float32
    )
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    impl = (
      self.impl if self.impl != "auto" else ("dot" if jax.default_backend() == "cpu" else "conv")
    )
    if impl == "dot":
      return lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    if impl == "conv":
      return lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    raise ValueError(f"PointwiseConv impl must be 'auto', 'dot' or 'conv', got {self.impl!r}")


class GroupedBatchNorm(nn.Module):
  """Train-mode BatchNorm with statistics per group of `group_size` consecutive images.

  [B, H, W, C] is viewed as [B / G, G, H, W, C]; each group is normalized with its own mean and
  (biased) variance over (G, H, W), computed as Flax does (float32, E[x^2] - E[x]^2 clipped at
  0), then scale and bias. The running statistics move towards the MEAN over groups of the group
  means and variances: `ra = momentum * ra + (1 - momentum) * mean_g(stat_g)`. The official
  TpuBatchNormalization keeps one set of running statistics per replica (each from its own
  group) and checkpoints replica 0's; averaging over the groups is the device-independent
  equivalent (the same expectation, lower variance) and leaves one set of statistics to save.

  Sharding: the batch axis is split over the mesh's 'data' axis in contiguous blocks, so when G
  divides the per-device batch every group lives on one device and the normalization needs no
  communication (only the C-sized running-statistics mean is reduced); larger G spans devices and
  XLA reduces within each group. Variables are created exactly as `nn.BatchNorm` creates them, so
  the two are interchangeable under one name (`bn_module` picks one per call).
  """

  group_size: int
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Union[Dtype, None] = None
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    g = int(self.group_size)
    batch, features = x.shape[0], x.shape[-1]
    if g <= 0 or batch % g:
      raise ValueError(
        f"bn_group_size={g} must be positive and divide the batch of {batch} images "
        "(config.bn_group_size: 0 = the whole batch)"
      )
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)

    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xg = x.astype(stat_dtype).reshape((batch // g, g) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))  # within a group: its images and their pixels
    mean = jnp.mean(xg, axes, keepdims=True)
    mean2 = jnp.mean(jnp.square(xg), axes, keepdims=True)
    var = jnp.maximum(0.0, mean2 - jnp.square(mean))
    y = xg - mean
    y = y * (lax.rsqrt(var + self.epsilon) * scale.astype(stat_dtype))
    y = y + bias.astype(stat_dtype)
    if not self.is_initializing():
      flat = (-1, features)
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * jnp.mean(
        mean.reshape(flat), axis=0
      )
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * jnp.mean(
        var.reshape(flat), axis=0
      )
    out_dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, scale.dtype)
    return y.reshape(x.shape).astype(out_dtype)


def bn_module(train: bool, group_size: int = 0, **kwargs) -> nn.Module:
  """The BatchNorm for one call: `GroupedBatchNorm` in training with group_size > 0, else
  `nn.BatchNorm` (whole-batch statistics in training, running statistics in eval). `kwargs`:
  momentum, epsilon, dtype, param_dtype, scale_init, name. Call the result with `(x)`."""
  if train and group_size:
    return GroupedBatchNorm(int(group_size), **kwargs)
  return nn.BatchNorm(use_running_average=not train, **kwargs)


def norm_options(model) -> dict:
  """The BatchNorm and dtype settings a network passes to each of its ConvBNAct layers."""
  return dict(
    bn_momentum=model.bn_momentum,
    bn_epsilon=model.bn_epsilon,
    bn_group_size=model.bn_group_size,
    dtype=model.dtype,
  )


class ConvBNAct(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional activation. Children are named `conv` and `bn`."""

  features: int
  kernel_size: int = 1
  strides: int = 1
  act: Union[Callable, None] = nn.swish
  depthwise: bool = False
  padding: Union[str, Sequence[Tuple[int, int]]] = "SAME"  # TF-SAME; ResNet passes explicit pads
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  bn_scale_init: Callable = nn.initializers.ones
  depthwise_impl: str = "auto"
  bn_group_size: int = 0  # images per BN statistic in training; 0 = the whole batch
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    k, s = self.kernel_size, self.strides
    if self.depthwise:
      x = DepthwiseConv(k, s, self.depthwise_impl, self.dtype, name="conv")(x)
    elif k == 1 and s == 1 and (self.padding == "SAME" or not np.any(self.padding)):
      x = PointwiseConv(self.features, self.dtype, name="conv")(x)
    else:
      x = nn.Conv(
        self.features,
        (k, k),
        (s, s),
        self.padding,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init(),
        name="conv",
      )(x)
    # Normalize in float32 (statistics and affine), then cast back to the compute dtype.
    x = bn_module(
      train,
      self.bn_group_size,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      scale_init=self.bn_scale_init,
      name="bn",
    )(x.astype(jnp.float32))
    x = x.astype(self.dtype)
    return self.act(x) if self.act is not None else x


class SqueezeExcite(nn.Module):
  """Spatial mean -> 1x1 conv to `reduced_features` -> act -> 1x1 conv back -> sigmoid gate."""

  reduced_features: int
  act: Callable = nn.swish
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    # Mean in float32: a bf16 sum over a large feature map loses too many bits.
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    conv = lambda f, name: nn.Conv(
      f,
      (1, 1),
      use_bias=True,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_kernel_init(),
      name=name,
    )
    s = self.act(conv(self.reduced_features, "reduce")(s))
    s = nn.sigmoid(conv(x.shape[-1], "expand")(s))
    return x * s


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample with probability `rate`.

  The mask has shape [B, 1, 1, 1] (not elementwise), kept samples are scaled by 1/survival, and at
  eval it is the identity. It draws from the 'dropout' rng stream, like the head dropout.
  """

  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate <= 0.0:
      return x
    survival = 1.0 - self.rate
    u = jax.random.uniform(self.make_rng("dropout"), (x.shape[0],) + (1,) * (x.ndim - 1))
    mask = jnp.floor(survival + u)  # 1 with probability `survival`, as in the official code
    return x * (mask / survival).astype(x.dtype)

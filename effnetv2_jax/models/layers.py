"""Layers shared by the model families: initializers, TF-SAME depthwise conv, Conv-BN-Act, SE, DropPath.

Parameter names produced here (weight converters are table lookups over them):
  ConvBNAct      -> `conv/kernel` [kh, kw, in, out] (or depthwise [k, k, 1, C]), `bn/{scale,bias}`,
                    batch_stats `bn/{mean,var}`
  SqueezeExcite  -> `reduce/{kernel,bias}`, `expand/{kernel,bias}` (1x1 convs, kernel [1, 1, in, out])

Precision: parameters and BN statistics are float32 whatever the compute dtype; BatchNorm normalizes in
float32 and casts back, so bf16 training does not drift the running statistics.
"""
import functools
from typing import Any, Callable, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

Dtype = Any
DEPTHWISE_IMPLS = ('auto', 'xla', 'shift')


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
        raise ValueError(f'depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
    if impl == 'auto':
        # XLA:CPU lowers grouped convolutions to a slow generic loop; on GPU/TPU the native op wins.
        return 'shift' if jax.default_backend() == 'cpu' else 'xla'
    return impl


def _depthwise_xla(x, kernel, stride):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1])


def _shift_taps(xp, kh, kw, out_h, out_w, stride):
    """(i, j, xp[:, i + stride*oh, j + stride*ow, :]) for every kernel tap."""
    b, _, _, c = xp.shape
    for i in range(kh):
        for j in range(kw):
            yield i, j, lax.slice(xp, (0, i, j, 0),
                                  (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                                  (1, stride, stride, 1))


def _depthwise_shift_fwd_only(x, kernel, stride):
    b, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    pad_h, out_h = same_padding(h, kh, stride)
    pad_w, out_w = same_padding(w, kw, stride)
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    out = None
    for i, j, tap in _shift_taps(xp, kh, kw, out_h, out_w, stride):
        term = tap * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shift(x, kernel, stride):
    """Depthwise conv as k*k shifted multiply-adds over the padded input (strides by strided slicing).

    Forward: one elementwise fusion over the output. The backward is written by hand because
    autodiff transposes each of the k*k strided slices into its own full-size (interior-)pad of the
    output gradient and adds them up, k*k passes over input-sized buffers; here the input gradient
    is the same shifted multiply-add over ONE padded (and, for stride 2, zero-upsampled) copy of the
    output gradient with the kernel flipped: one fusion, like the forward. The kernel gradient stays
    k*k reductions of tap * gradient (a single reduction over the stacked taps measured 2x slower on
    XLA:CPU: the stack gets materialized).
    """
    return _depthwise_shift_fwd_only(x, kernel, stride)


def _depthwise_shift_fwd(x, kernel, stride):
    return _depthwise_shift_fwd_only(x, kernel, stride), (x, kernel)


def _depthwise_shift_bwd(stride, res, g):
    x, kernel = res
    b, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    (pt, pb), out_h = same_padding(h, kh, stride)
    (pl, pr), out_w = same_padding(w, kw, stride)
    # Kernel gradient: dk[i, j] = sum over (b, oh, ow) of xp[b, i + s*oh, j + s*ow] * g[b, oh, ow].
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    acc = jnp.promote_types(g.dtype, jnp.float32)
    dk = jnp.stack([jnp.sum(tap.astype(acc) * g.astype(acc), (0, 1, 2))
                    for _, _, tap in _shift_taps(xp, kh, kw, out_h, out_w, stride)])
    dk = dk.reshape(kh, kw, 1, c).astype(kernel.dtype)
    # Input gradient: dx[y] = sum_i gu[y + pt - i] * k[i] per axis, with gu the output gradient
    # spread out by the stride (zeros between) and zero outside it: one padded copy, k*k slices.
    lo_h, lo_w = kh - 1 - pt, kw - 1 - pl
    up_h, up_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
    gp = lax.pad(g, jnp.zeros((), g.dtype),
                 ((0, 0, 0), (lo_h, h + kh - 1 - lo_h - up_h, stride - 1),
                  (lo_w, w + kw - 1 - lo_w - up_w, stride - 1), (0, 0, 0)))
    dx = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(gp, (0, kh - 1 - i, kw - 1 - j, 0), (b, kh - 1 - i + h, kw - 1 - j + w, c))
            term = tap * kernel[i, j, 0].astype(g.dtype)
            dx = term if dx is None else dx + term
    return dx.astype(x.dtype), dk


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def depthwise_conv(x, kernel, stride: int = 1, impl: str = 'auto'):
    """Depthwise 2D conv, NHWC input, kernel [k, k, 1, C] (Flax grouped-conv layout), TF-SAME padding."""
    impl = resolve_depthwise_impl(impl)
    return (_depthwise_shift if impl == 'shift' else _depthwise_xla)(x, kernel, stride)


class DepthwiseConv(nn.Module):
    """Depthwise conv with a `kernel` [k, k, 1, C] parameter and a choice of implementation."""
    kernel_size: int
    strides: int = 1
    impl: str = 'auto'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param('kernel', conv_kernel_init(depthwise=True), (k, k, 1, x.shape[-1]),
                            self.param_dtype)
        return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.impl)


def _bn_train_fwd_only(x, scale, bias, epsilon):
    # flax.linen.BatchNorm's arithmetic (use_fast_variance): one pass for E[x] and E[x^2].
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.maximum(0.0, jnp.mean(lax.square(x), axes) - lax.square(mean))
    y = (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias
    return y, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
    """Training-mode BatchNorm over all axes but the last: -> (y, batch mean, batch variance).

    Same numbers as flax.linen.BatchNorm. The backward is the closed form (two per-channel sums in
    one pass over x and dy, then one elementwise pass) instead of autodiff's chain through mean,
    E[x^2], the clip and rsqrt, which XLA:CPU ran as several more passes over the activation.
    """
    return _bn_train_fwd_only(x, scale, bias, epsilon)


def _bn_train_fwd(x, scale, bias, epsilon):
    y, mean, var = _bn_train_fwd_only(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)


def _bn_train_bwd(epsilon, res, cts):
    x, scale, mean, var = res
    dy, dmean, dvar = cts          # dmean/dvar: zero unless someone differentiates the statistics
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    inv = lax.rsqrt(var + epsilon)
    xc = x - mean
    dbias = jnp.sum(dy, axes)
    dyxc = jnp.sum(dy * xc, axes)  # = dscale / inv
    a = scale * inv
    # d var / dx = 2 (x - mean) / n where the clip is inactive (var > 0), else 0.
    dvar_total = jnp.where(var > 0, dvar - 0.5 * a * inv * inv * dyxc, 0.0)
    dx = a * dy + (dmean - a * dbias) / n + (2.0 / n) * dvar_total * xc
    return dx, dyxc * inv, dbias


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class BatchNorm(nn.Module):
    """flax.linen.BatchNorm's variables and arithmetic (feature axis last, float32) with a fused
    training-mode backward (`batch_norm_train`). Params `scale`, `bias`; batch_stats `mean`, `var`;
    running update `m * running + (1 - m) * batch`, skipped while initializing."""
    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-5
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', self.scale_init, (c,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
        x = x.astype(jnp.float32)
        if self.use_running_average:
            return (x - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
            ra_var.value = m * ra_var.value + (1.0 - m) * var
        return y


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional activation. Children are named `conv` and `bn`."""
    features: int
    kernel_size: int = 1
    strides: int = 1
    act: Union[Callable, None] = nn.swish
    depthwise: bool = False
    padding: Union[str, Sequence[Tuple[int, int]]] = 'SAME'  # TF-SAME; ResNet passes explicit pads
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-3
    bn_scale_init: Callable = nn.initializers.ones
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        k, s = self.kernel_size, self.strides
        if self.depthwise:
            x = DepthwiseConv(k, s, self.depthwise_impl, self.dtype, name='conv')(x)
        else:
            x = nn.Conv(self.features, (k, k), (s, s), self.padding, use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32, kernel_init=conv_kernel_init(), name='conv')(x)
        # Normalize in float32 (statistics and affine), then cast back to the compute dtype.
        x = BatchNorm(not train, self.bn_momentum, self.bn_epsilon, self.bn_scale_init,
                      name='bn')(x)
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
        conv = lambda f, name: nn.Conv(f, (1, 1), use_bias=True, dtype=self.dtype,
                                       param_dtype=jnp.float32, kernel_init=conv_kernel_init(),
                                       name=name)
        s = self.act(conv(self.reduced_features, 'reduce')(s))
        s = nn.sigmoid(conv(x.shape[-1], 'expand')(s))
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
        u = jax.random.uniform(self.make_rng('dropout'), (x.shape[0],) + (1,) * (x.ndim - 1))
        mask = jnp.floor(survival + u)  # 1 with probability `survival`, as in the official code
        return x * (mask / survival).astype(x.dtype)

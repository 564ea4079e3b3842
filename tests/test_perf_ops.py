"""The hand-written backward passes (depthwise conv, BatchNorm) equal the reference ops'.

`_depthwise_shift` and `batch_norm_train` carry custom VJPs for speed on XLA:CPU; their values and
gradients must be those of XLA's grouped convolution and of flax.linen.BatchNorm.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from effnetv2_jax.models.layers import BatchNorm, batch_norm_train, depthwise_conv

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.mark.parametrize('h,w', [(7, 7), (8, 8), (9, 6)])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('k', [3, 5])
def test_depthwise_custom_vjp_matches_xla(h, w, stride, k):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(h * 31 + w * 7 + stride + k), 3)
    x = jax.random.normal(kx, (2, h, w, 5))
    kern = jax.random.normal(kw, (k, k, 1, 5))
    g = jax.random.normal(kg, depthwise_conv(x, kern, stride, 'xla').shape)
    loss = lambda impl: (lambda x, kern: jnp.sum(depthwise_conv(x, kern, stride, impl) * g))
    np.testing.assert_allclose(depthwise_conv(x, kern, stride, 'shift'),
                               depthwise_conv(x, kern, stride, 'xla'), atol=1e-5, rtol=1e-5)
    got = jax.grad(loss('shift'), (0, 1))(x, kern)
    want = jax.grad(loss('xla'), (0, 1))(x, kern)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=1e-5)


def _flax_bn(x, scale, bias, eps):
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=eps, dtype=jnp.float32)
    variables = {'params': {'scale': scale, 'bias': bias},
                 'batch_stats': {'mean': jnp.zeros_like(scale), 'var': jnp.ones_like(scale)}}
    y, upd = bn.apply(variables, x, mutable=['batch_stats'])
    return y, upd['batch_stats']


@pytest.mark.parametrize('shape', [(4, 5, 6, 7), (3, 8, 8, 16), (5, 3)])
def test_batch_norm_train_matches_flax_in_value_and_gradient(shape):
    kx, ks, kb, kg = jax.random.split(jax.random.PRNGKey(len(shape) + shape[-1]), 4)
    x = 2.0 * jax.random.normal(kx, shape) + 0.5
    scale = jax.random.normal(ks, shape[-1:])
    bias = jax.random.normal(kb, shape[-1:])
    g = jax.random.normal(kg, shape)
    y, mean, var = batch_norm_train(x, scale, bias, 1e-3)
    y_ref, _ = _flax_bn(x, scale, bias, 1e-3)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mean, jnp.mean(x, tuple(range(len(shape) - 1))), atol=1e-5)
    np.testing.assert_allclose(var, jnp.var(x, tuple(range(len(shape) - 1))), atol=1e-4, rtol=1e-5)
    # The statistics' cotangents count too (nobody differentiates them in training, but the VJP
    # must still be right if someone does).
    ours = lambda x, s, b: (jnp.sum(batch_norm_train(x, s, b, 1e-3)[0] * g)
                            + jnp.sum(batch_norm_train(x, s, b, 1e-3)[1] ** 2)
                            + 0.3 * jnp.sum(batch_norm_train(x, s, b, 1e-3)[2]))
    axes = tuple(range(len(shape) - 1))
    ref = lambda x, s, b: (jnp.sum(_flax_bn(x, s, b, 1e-3)[0] * g)
                           + jnp.sum(jnp.mean(x, axes) ** 2)
                           + 0.3 * jnp.sum(jnp.maximum(0.0, jnp.mean(x * x, axes) - jnp.mean(x, axes) ** 2)))
    for a, b in zip(jax.grad(ours, (0, 1, 2))(x, scale, bias), jax.grad(ref, (0, 1, 2))(x, scale, bias)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_batch_norm_module_matches_flax_variables_and_running_update():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 6)) * 3 + 1
    ours = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3, dtype=jnp.float32)
    v = ref.init(jax.random.PRNGKey(1), x)
    v_ours = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_ours)
    y, upd = ours.apply(v, x, mutable=['batch_stats'])
    y_ref, upd_ref = ref.apply(v, x, mutable=['batch_stats'])
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), upd, upd_ref)
    evals = [m.clone(use_running_average=True).apply({'params': v['params'], **upd}, x)
             for m in (ours, ref)]
    np.testing.assert_allclose(evals[0], evals[1], atol=1e-5)


def test_remat_override_keeps_names_values_and_gradients():
    from effnetv2_jax.models import create_model
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    plain, remat = (create_model('efficientnetv2-b0', num_classes=10, remat=r) for r in (False, True))
    v = plain.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(v) == jax.tree.structure(remat.init(jax.random.PRNGKey(1), x))

    def loss_and_grad(model):
        def f(p):
            y, upd = model.apply({'params': p, 'batch_stats': v['batch_stats']}, x, train=True,
                                 rngs={'dropout': jax.random.PRNGKey(2)}, mutable=['batch_stats'])
            return jnp.sum(y ** 2), upd
        return jax.value_and_grad(f, has_aux=True)(v['params'])

    (la, ua), ga = loss_and_grad(plain)
    (lb, ub), gb = loss_and_grad(remat)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5), ga, gb)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6), ua, ub)

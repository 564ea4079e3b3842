"""Performance options keep the numbers: the shift depthwise conv (value and gradient) equals XLA's
grouped convolution at strides 1/2 on odd/even sizes, and block remat changes no value or gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnetv2_jax.models.layers import depthwise_conv

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.mark.parametrize('h,w', [(7, 7), (8, 8), (9, 6)])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('k', [3, 5])
def test_shift_depthwise_matches_xla(h, w, stride, k):
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

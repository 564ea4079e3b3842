"""EfficientNetV2 (Tan & Le, 2021) and progressive learning in JAX/Flax."""

from effnetv2_jax import xla_defaults as _xla_defaults

_xla_defaults.apply()  # before any computation: XLA reads XLA_FLAGS once (see xla_defaults.py)

__version__ = "0.1.0"

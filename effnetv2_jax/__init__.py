"""EfficientNetV2 (Tan & Le, 2021) and progressive learning in JAX/Flax."""
__version__ = "0.1.0"

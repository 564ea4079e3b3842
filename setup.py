"""effnetv2_jax: EfficientNetV2 and progressive learning in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name="effnetv2_jax",
  version="0.1.0",
  description="EfficientNetV2 (Tan & Le, 2021) with progressive learning in JAX/Flax",
  packages=find_packages(include=["effnetv2_jax", "effnetv2_jax.*"]),
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.10,<0.12",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "clu>=0.0.12",
    "tensorboard",
    "ml-collections>=1.1",
    "tensorflow-cpu>=2.21",
    "tensorflow-datasets>=4.9.10",
    "numpy",
    "pillow",
    "matplotlib",  # WORKDIR/curves.png (effnetv2_jax/curves.py) and experiments/*.py plots
  ],
  extras_require={
    "test": ["pytest", "ruff==0.17.5"],
    "bench": ["timm", "torch"],
  },
)

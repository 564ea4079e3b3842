"""Cloud TPU VM launcher: `python -m experiments.tpu.launch` (see launch.py)."""

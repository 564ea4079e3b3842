"""Test-wide setup. Forces 8 host (CPU) devices so data-parallel tests run anywhere.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax;
pytest loads this file before collecting any test module.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

# Random bits must not depend on how an array is sharded, so 1 and 8 devices draw the same
# dropout masks (the default in recent JAX; set explicitly because the tests rely on it).
jax.config.update("jax_threefry_partitionable", True)

"""The demo-network probes name real networks and real config fields, and the demo uses `v2`."""

from configs import demo
from effnetv2_jax import config_validation, sweep

from experiments import demo_networks


def test_every_probe_is_a_valid_demo_config():
  for name, (network, overrides) in demo_networks.PROBES.items():
    c = demo.get_config(f"model={network}")
    for key, value in overrides.items():
      sweep.apply_override(c, key, value)  # raises for a field the config lacks
    sweep.apply_override(c, "progressive.preset", "none")
    config_validation.validate_config(c, check_dataset=False, num_devices=1)
    assert dict(c.model_overrides)["blocks"] == demo.NETWORKS[network]["blocks"], name


def test_the_demo_trains_the_v2_network_with_a_full_resolution_stem():
  c = demo.get_config()
  overrides = dict(c.model_overrides)
  assert overrides["blocks"] == demo.NETWORKS["v2"]["blocks"] and overrides["stem_stride"] == 1
  assert demo.get_config("model=v2-stem2").model_overrides.stem_stride == 2

"""EfficientNet B0-B7 (Tan & Le, 2019): the EfficientNetV2 paper's baseline.

Built by the shared `EfficientNet` module (effnetv2.py), so parameter names are the same scheme:
stem, blocks_<k>/{expand,dw,se,project}, head, classifier. Differences from V2, all from the official
efficientnet code: only MBConv blocks (3x3 and 5x5 depthwise), the filter rounding adds 8 back when
rounding lost more than 10%, and the head dropout grows with the variant.
"""

from typing import NamedTuple

from effnetv2_jax.models.effnetv2 import EfficientNet

# Official efficientnet_builder.py block strings (strides written 's11'/'s22' there; we accept both).
V1_BLOCKS = (
  "r1_k3_s1_e1_i32_o16_se0.25",
  "r2_k3_s2_e6_i16_o24_se0.25",
  "r2_k5_s2_e6_i24_o40_se0.25",
  "r3_k3_s2_e6_i40_o80_se0.25",
  "r3_k5_s1_e6_i80_o112_se0.25",
  "r4_k5_s2_e6_i112_o192_se0.25",
  "r1_k3_s1_e6_i192_o320_se0.25",
)


# Official efficientnet_params(), by name.
class V1Variant(NamedTuple):
  width_mult: float
  depth_mult: float
  resolution: int  # V1 trains and evaluates at one size
  dropout_rate: float


V1_VARIANTS = {
  "efficientnet-b0": V1Variant(1.0, 1.0, 224, 0.2),
  "efficientnet-b1": V1Variant(1.0, 1.1, 240, 0.2),
  "efficientnet-b2": V1Variant(1.1, 1.2, 260, 0.3),
  "efficientnet-b3": V1Variant(1.2, 1.4, 300, 0.3),
  "efficientnet-b4": V1Variant(1.4, 1.8, 380, 0.4),
  "efficientnet-b5": V1Variant(1.6, 2.2, 456, 0.4),
  "efficientnet-b6": V1Variant(1.8, 2.6, 528, 0.5),
  "efficientnet-b7": V1Variant(2.0, 3.1, 600, 0.5),
}
V1_DROP_CONNECT_RATE = 0.2


def efficientnet_v1(name: str, **kwargs) -> EfficientNet:
  v = V1_VARIANTS[name]
  kwargs.setdefault("blocks", V1_BLOCKS)
  kwargs.setdefault("width_mult", v.width_mult)
  kwargs.setdefault("depth_mult", v.depth_mult)
  kwargs.setdefault("dropout_rate", v.dropout_rate)
  kwargs.setdefault("drop_path_rate", V1_DROP_CONNECT_RATE)
  return EfficientNet(round_down_guard=True, **kwargs)

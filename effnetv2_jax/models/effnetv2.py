"""EfficientNetV2 (Tan & Le, 2021): block tables for B0-B3/S/M/L/XL and the network.

The same `EfficientNet` module also builds EfficientNet (V1, effnetv1.py): the families differ only in
their block strings, the filter-rounding rule and defaults.

Block strings, one per stage (as the official effnetv2_configs.py):
  r<repeats>_k<kernel>_s<stride>_e<expand>_i<in>_o<out>[_se<ratio>][_c1]     c1 = Fused-MBConv
Widths are scaled by `width_mult` and rounded to multiples of 8; repeats by ceil(depth_mult * r).
Only the first block of a stage strides and changes width.

Parameter names (stable: weight converters are table lookups over them):
  stem/conv/kernel, stem/bn/{scale,bias}
  blocks_<k>/...   k = 0..N-1 over all blocks, flat like the official checkpoints' `blocks_k`;
                   inside: expand, dw, se/{reduce,expand}, project (see blocks.py)
  head/conv/kernel, head/bn/{scale,bias}, classifier/{kernel,bias}
  batch_stats mirror every `bn` as {mean, var}.
"""

import math
import re
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import jax.numpy as jnp
from flax import linen as nn

from effnetv2_jax.models.blocks import FusedMBConv, MBConv
from effnetv2_jax.models.layers import ConvBNAct, dense_kernel_init, norm_options

Dtype = Any

# ----------------------------------------------------------------------------------------------
# Architecture tables (official effnetv2_configs.py). S/M/L/XL strings are already scaled.
V2_BASE_BLOCKS = (
  "r1_k3_s1_e1_i32_o16_c1",
  "r2_k3_s2_e4_i16_o32_c1",
  "r2_k3_s2_e4_i32_o48_c1",
  "r3_k3_s2_e4_i48_o96_se0.25",
  "r5_k3_s1_e6_i96_o112_se0.25",
  "r8_k3_s2_e6_i112_o192_se0.25",
)
V2_S_BLOCKS = (
  "r2_k3_s1_e1_i24_o24_c1",
  "r4_k3_s2_e4_i24_o48_c1",
  "r4_k3_s2_e4_i48_o64_c1",
  "r6_k3_s2_e4_i64_o128_se0.25",
  "r9_k3_s1_e6_i128_o160_se0.25",
  "r15_k3_s2_e6_i160_o256_se0.25",
)
V2_M_BLOCKS = (
  "r3_k3_s1_e1_i24_o24_c1",
  "r5_k3_s2_e4_i24_o48_c1",
  "r5_k3_s2_e4_i48_o80_c1",
  "r7_k3_s2_e4_i80_o160_se0.25",
  "r14_k3_s1_e6_i160_o176_se0.25",
  "r18_k3_s2_e6_i176_o304_se0.25",
  "r5_k3_s1_e6_i304_o512_se0.25",
)
V2_L_BLOCKS = (
  "r4_k3_s1_e1_i32_o32_c1",
  "r7_k3_s2_e4_i32_o64_c1",
  "r7_k3_s2_e4_i64_o96_c1",
  "r10_k3_s2_e4_i96_o192_se0.25",
  "r19_k3_s1_e6_i192_o224_se0.25",
  "r25_k3_s2_e6_i224_o384_se0.25",
  "r7_k3_s1_e6_i384_o640_se0.25",
)
V2_XL_BLOCKS = (
  "r4_k3_s1_e1_i32_o32_c1",
  "r8_k3_s2_e4_i32_o64_c1",
  "r8_k3_s2_e4_i64_o96_c1",
  "r16_k3_s2_e4_i96_o192_se0.25",
  "r24_k3_s1_e6_i192_o256_se0.25",
  "r32_k3_s2_e6_i256_o512_se0.25",
  "r8_k3_s1_e6_i512_o640_se0.25",
)


class V2Variant(NamedTuple):
  """One EfficientNetV2 variant: its architecture and the released code's train/eval sizes and
  dropout (the paper's progressive schedule ends at the train size, evaluation is larger)."""

  blocks: tuple
  width_mult: float
  depth_mult: float
  dropout_rate: float
  train_size: int
  eval_size: int


# The one per-variant table: configs and benchmarks read it through models.model_defaults(name).
V2_VARIANTS = {
  "efficientnetv2-b0": V2Variant(V2_BASE_BLOCKS, 1.0, 1.0, 0.2, 192, 224),
  "efficientnetv2-b1": V2Variant(V2_BASE_BLOCKS, 1.0, 1.1, 0.2, 192, 240),
  "efficientnetv2-b2": V2Variant(V2_BASE_BLOCKS, 1.1, 1.2, 0.3, 208, 260),
  "efficientnetv2-b3": V2Variant(V2_BASE_BLOCKS, 1.2, 1.4, 0.3, 240, 300),
  "efficientnetv2-s": V2Variant(V2_S_BLOCKS, 1.0, 1.0, 0.2, 300, 384),
  "efficientnetv2-m": V2Variant(V2_M_BLOCKS, 1.0, 1.0, 0.3, 384, 480),
  "efficientnetv2-l": V2Variant(V2_L_BLOCKS, 1.0, 1.0, 0.4, 384, 480),
  "efficientnetv2-xl": V2Variant(V2_XL_BLOCKS, 1.0, 1.0, 0.4, 384, 512),
}
HEAD_FILTERS = 1280  # before width scaling, both families
DROP_PATH_RATE = 0.2  # official survival_prob 0.8 for the last block, linear in block index


# ----------------------------------------------------------------------------------------------
class BlockArgs(NamedTuple):
  """One stage of a block string, before width/depth scaling."""

  repeats: int
  kernel_size: int
  stride: int
  expand_ratio: int
  in_filters: int
  out_filters: int
  se_ratio: float = 0.0
  fused: bool = False


_TOKEN = re.compile(r"^(r|k|s|e|i|o|se|c)(\d+(?:\.\d+)?)$")


def parse_block_string(text: str) -> BlockArgs:
  """'r2_k3_s1_e1_i24_o24_c1' -> BlockArgs. Strides may be written 's2' or 's22' (V1 style)."""
  fields = {}
  for token in text.strip().split("_"):
    m = _TOKEN.match(token)
    if not m:
      raise ValueError(
        f"bad token {token!r} in block string {text!r}; expected "
        "r<int>_k<int>_s<int>_e<int>_i<int>_o<int>[_se<float>][_c0|_c1]"
      )
    fields[m.group(1)] = m.group(2)
  missing = [k for k in "rkseio" if k not in fields]
  if missing:
    raise ValueError(f"block string {text!r} lacks field(s) {missing}")
  stride = fields["s"]
  if len(stride) == 2 and stride[0] == stride[1]:
    stride = stride[0]
  return BlockArgs(
    int(fields["r"]),
    int(fields["k"]),
    int(stride),
    int(fields["e"]),
    int(fields["i"]),
    int(fields["o"]),
    float(fields.get("se", 0.0)),
    fields.get("c", "0") == "1",
  )


def round_filters(
  filters: float,
  width_mult: float,
  divisor: int = 8,
  min_depth: int = 8,
  round_down_guard: bool = False,
) -> int:
  """Scale and round to a multiple of `divisor`.

  V2 (official effnetv2_model.py) has no guard; V1 adds `divisor` when rounding lost more than 10%.
  """
  scaled = filters * width_mult
  new = max(min_depth, int(scaled + divisor / 2) // divisor * divisor)
  if round_down_guard and new < 0.9 * scaled:
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth_mult: float) -> int:
  return int(math.ceil(depth_mult * repeats))


class BlockSpec(NamedTuple):
  """One concrete block after scaling: what the module builds and what count_macs walks."""

  stage: int
  index_in_stage: int
  in_filters: int
  out_filters: int
  kernel_size: int
  stride: int
  expand_ratio: int
  se_filters: int
  fused: bool


def build_block_specs(
  blocks: Sequence[str],
  width_mult: float = 1.0,
  depth_mult: float = 1.0,
  stage_repeats: Optional[Sequence[int]] = None,
  stem_filters: Optional[int] = None,
  round_down_guard: bool = False,
) -> Tuple[int, List[BlockSpec]]:
  """-> (stem width, flat list of blocks). `stage_repeats[i]` is the exact block count of stage i."""
  args = [parse_block_string(b) for b in blocks]
  if stage_repeats is not None and len(stage_repeats) != len(args):
    raise ValueError(f"stage_repeats has {len(stage_repeats)} entries for {len(args)} stages")
  rf = lambda f: round_filters(f, width_mult, round_down_guard=round_down_guard)
  stem = int(stem_filters) if stem_filters else rf(args[0].in_filters)
  specs, prev = [], stem
  for s, a in enumerate(args):
    if s > 0 and rf(a.in_filters) != prev:
      raise ValueError(
        f"stage {s} ({blocks[s]!r}) takes i{a.in_filters} but the previous stage "
        f"outputs o{args[s - 1].out_filters}"
      )
    repeats = (
      round_repeats(a.repeats, depth_mult) if stage_repeats is None else int(stage_repeats[s])
    )
    if repeats < 1:
      raise ValueError(f"stage {s} must have at least one block, got {repeats}")
    out = rf(a.out_filters)
    for j in range(repeats):
      # The official code sizes SE from the (rounded) block input width, not the expanded one.
      in_f = prev if j == 0 else out
      se = max(1, int(in_f * a.se_ratio)) if 0 < a.se_ratio <= 1 else 0
      specs.append(
        BlockSpec(
          s, j, in_f, out, a.kernel_size, a.stride if j == 0 else 1, a.expand_ratio, se, a.fused
        )
      )
    prev = out
  return stem, specs


# ----------------------------------------------------------------------------------------------
class EfficientNet(nn.Module):
  """EfficientNet V1/V2 built from block strings. `__call__(images_nhwc, train)` -> float32 logits."""

  blocks: Tuple[str, ...] = V2_S_BLOCKS
  width_mult: float = 1.0
  depth_mult: float = 1.0
  stage_repeats: Optional[Tuple[int, ...]] = None
  stem_filters: Optional[int] = None
  stem_stride: int = 2  # 1 keeps full resolution for tiny images (28-32 px)
  head_filters: Optional[int] = None  # None: round_filters(1280)
  round_down_guard: bool = False  # True for V1's filter rounding
  num_classes: int = 1000
  dropout_rate: float = 0.2
  drop_path_rate: float = DROP_PATH_RATE
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  depthwise_impl: str = "auto"
  remat: bool = False  # recompute each block's activations in the backward
  # Images per BatchNorm statistic in training (layers.GroupedBatchNorm); 0 = the whole batch.
  bn_group_size: int = 0
  dtype: Dtype = jnp.float32

  def architecture(self) -> Tuple[int, List[BlockSpec], int]:
    stem, specs = build_block_specs(
      self.blocks,
      self.width_mult,
      self.depth_mult,
      self.stage_repeats,
      self.stem_filters,
      self.round_down_guard,
    )
    head = (
      int(self.head_filters)
      if self.head_filters
      else round_filters(HEAD_FILTERS, self.width_mult, round_down_guard=self.round_down_guard)
    )
    return stem, specs, head

  @nn.compact
  def __call__(self, images, train: bool = False):
    stem, specs, head = self.architecture()
    norm = norm_options(self)
    x = images.astype(self.dtype)
    x = ConvBNAct(stem, 3, self.stem_stride, name="stem", **norm)(x, train)
    for k, spec in enumerate(specs):
      block = FusedMBConv if spec.fused else MBConv
      if self.remat:
        # Keep only block inputs for the backward; `train` (arg 2 after self) is static.
        block = nn.remat(block, static_argnums=(2,))
      x = block(
        spec.in_filters,
        spec.out_filters,
        spec.kernel_size,
        spec.stride,
        spec.expand_ratio,
        spec.se_filters,
        drop_path_rate=self.drop_path_rate * k / len(specs),
        depthwise_impl=self.depthwise_impl,
        name=f"blocks_{k}",
        **norm,
      )(x, train)
    x = ConvBNAct(head, 1, 1, name="head", **norm)(x, train)
    # Pool and classify in float32: the logits contract is float32 whatever the compute dtype.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(
      self.num_classes, dtype=jnp.float32, kernel_init=dense_kernel_init, name="classifier"
    )(x)

r"""EfficientNetV2 on ImageNet-1k: every variant with the paper's or the released code's settings.

Launch (one host or all workers of a TPU slice):

  python -m effnetv2_jax.main --config=configs/imagenet.py:variant=s,preset=official \
      --workdir=gs://BUCKET/effnetv2-s --config.data_dir=gs://BUCKET/tensorflow_datasets

Arguments: variant=b0|b1|b2|b3|s|m|l|xl; preset=official|paper|none (see effnetv2_jax/progressive.py
and section 9 of the reference: BN decay, dropout schedule, RandAugment and mixup ranges differ);
runlocal (a few steps at toy sizes on a CPU, for tests and smoke runs).

Released-code behaviour per preset (reference sections 9 and 10; README "Paper vs released code"):
'official' and 'none' (the official end points without progression) take the code's behaviour,
'paper' the intended one where the two differ:
  splits        all presets: train on ImageNet's training set minus the 25,021-image minival
                (datasets.IMAGENET_TRAIN_MINUS_MINIVAL, 1,256,144 images: 107,336 steps for S),
                evaluate on the 50,000-image validation split; minival (datasets.IMAGENET_MINIVAL)
                stays free for model selection. The paper's numbers come from this code, and one
                training set keeps the presets' comparison about the recipe alone. Set
                train_split="train" for all 1,281,167 images.
  RandAugment   official/none: the code's ops (randaug_solarize="official": the threshold wraps
                at magnitude >= 10; randaug_enhance="official": Contrast's pixel-count "mean",
                Sharpness truncation); paper: the ops as RandAugment defines them ("unwrapped",
                "corrected"). B0-B3's TF1 bicubic resize after decode_and_crop_jpeg and the
                centre-crop offsets are the official ones in all presets.
  cutmix_label  official/none 'batch_mean' (one label weight per (half-)batch); paper
                'per_example' (the paper preset schedules no CutMix, so it only matters there if
                CutMix is switched on).
  bn_group_size official/none 1024; paper 0 (BatchNorm over the whole batch of 4096). The
                official TPU BatchNorm computes statistics over min(8, replicas) replicas, i.e.
                per-replica batch x min(8, replicas) images, which depends on the slice: 1024 at
                batch 4096 on 32 replicas (a v3-32 slice, 128 images per replica), 512 on 64
                replicas, 128 on 256. We fix the 32-replica value, 1024, whatever hardware runs
                it (see BN_GROUP_SIZE below).
  dtype         'auto' for every preset: bfloat16 compute on TPU/GPU (the official
                mixed_precision=True), float32 on CPU; resolved at run time, in results.json.
  EMA warmup, warmup rounding: the official formulas in every preset (no option).
"""

from configs import common, default
from effnetv2_jax import models
from effnetv2_jax.data import datasets

# (RandAugment max, mixup/CutMix max) of the released code (reference section 3). Train size, eval
# size and dropout per variant come from the model registry's one table (models.model_defaults).
OFFICIAL = {
  "b0": (0.0, 0.0),
  "b1": (0.0, 0.0),
  "b2": (0.0, 0.0),
  "b3": (0.0, 0.0),
  "s": (10.0, 0.0),
  "m": (15.0, 0.2),
  "l": (20.0, 0.5),
  "xl": (20.0, 0.5),
}
# The paper's Table 6 (max size, RandAugment 5 -> max, mixup 0 -> max, dropout 0.1 -> max). The
# paper gives no ranges for B0-B3 or XL: B0-B3 keep the code's end points under Algorithm 1, XL
# takes L's ranges at its own train size.
PAPER = {
  "s": (300, 15.0, 0.0, 0.3),
  "m": (380, 20.0, 0.2, 0.4),
  "l": (380, 25.0, 0.4, 0.5),
  "xl": (384, 25.0, 0.4, 0.5),
}
MIN_IMAGE_SIZE = 128
MIN_RANDAUG = 5.0
# Official TpuBatchNormalization groups, per-replica batch x min(8, replicas), taken at batch 4096
# on 32 replicas (v3-32): 128 x 8 = 1024 images per BN statistic, on any number of devices.
BN_GROUP_SIZE = 1024


def get_config(arg=None):
  args = common.parse_arg(arg, variant="s", preset="official", runlocal=False)
  variant, preset = args["variant"], args["preset"]
  if variant not in OFFICIAL:
    raise ValueError(f"variant must be one of {', '.join(OFFICIAL)}, got {variant!r}")
  sizes = models.model_defaults(f"efficientnetv2-{variant}")
  train_size, eval_size, dropout = sizes["train_size"], sizes["eval_size"], sizes["dropout_rate"]
  ra_max, mix_max = OFFICIAL[variant]
  base_family = variant.startswith("b")

  c = default.get_config()
  c.model_name = f"efficientnetv2-{variant}"
  c.dtype = "auto"  # bfloat16 compute on TPU/GPU as the official mixed_precision, fp32 on CPU
  c.dataset = "imagenet2012"
  c.train_split = datasets.IMAGENET_TRAIN_MINUS_MINIVAL
  c.eval_split = datasets.IMAGENET_VALIDATION
  c.batch_size = 4096
  c.num_epochs = 350.0
  c.eval_image_size = eval_size
  c.autoaugment = base_family  # B0-B3 train with AutoAugment v0 in the released code
  c.bn_group_size = BN_GROUP_SIZE
  p = c.progressive
  p.preset = preset
  p.min_image_size, p.max_image_size = MIN_IMAGE_SIZE, train_size
  p.min_randaug, p.max_randaug = (0.0, 0.0) if base_family else (MIN_RANDAUG, ra_max)
  p.min_mixup = p.min_cutmix = 0.0
  p.max_mixup = p.max_cutmix = mix_max  # the code uses mixup and CutMix with the same alpha
  p.min_dropout = p.max_dropout = dropout
  if preset == "paper":
    c.model_overrides.bn_momentum = 0.99  # paper: BN decay 0.99; code: 0.9
    c.randaug_solarize, c.randaug_enhance = "unwrapped", "corrected"  # RandAugment's ops as defined
    c.cutmix_label = "per_example"  # labels match each example's pasted pixels
    c.bn_group_size = 0  # BatchNorm over the whole batch: the paper states no grouping
    p.min_dropout = 0.1
    if not base_family:
      p.max_image_size, p.max_randaug, p.max_mixup, p.max_dropout = PAPER[variant]
      p.max_cutmix = 0.0  # the paper schedules mixup only
  if args["runlocal"]:
    common.shrink_for_local_run(c)
  return c

r"""The embedded demo: progressive learning with adaptive regularization on Fashion-MNIST, on a CPU.

  bash scripts/demo.sh                      # installs, prepares the data offline, runs this config
  python -m effnetv2_jax.main --config=configs/demo.py --workdir=workdirs/demo

A small EfficientNetV2-family network (Fused-MBConv early, MBConv + SE later, defined here by block
strings: no code change) trains in 4 stages with the paper's Algorithm 1: image size 20 -> 32 px
while RandAugment magnitude, mixup and dropout grow with it. The target is at least 91% top-1 on the
10,000 test images within 15 minutes on a 2-core CPU; the recorded run (experiments/results/demo.md)
reached 88.9%, so the target is not met yet. `runlocal` shrinks it to a few steps (tests).
"""
from configs import common, default

# Stem 24 -> Fused-MBConv (e1, e4) -> MBConv + SE: the S/M/L layout at toy width and depth.
DEMO_BLOCKS = (
    "r1_k3_s1_e1_i24_o24_c1",
    "r2_k3_s2_e4_i24_o40_c1",
    "r2_k3_s1_e4_i40_o64_se0.25",
    "r3_k3_s2_e4_i64_o96_se0.25",
)


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  c = default.get_config()
  c.model_name = "efficientnetv2-b0"
  c.model_overrides.blocks = DEMO_BLOCKS
  c.model_overrides.head_filters = 512
  c.model_overrides.drop_path_rate = 0.1

  c.dataset = "fashion_mnist"
  c.preprocess_family = "small"  # whole 28-px image, no ImageNet crop; size-scaled RandAugment
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 5.0
  c.eval_image_size = 32
  c.shuffle_buffer = 60000

  p = c.progressive
  p.preset = "paper"
  p.num_stages = 4
  # 20 -> 32 px (the 28-px images upsampled in the last stage), evaluated at 32: a 5-epoch prototype
  # before this codebase reached 92.1% at a fixed 32 px but 90.1% with a 16 -> 32 px schedule, and
  # a first cut of this config at 16 -> 28 px ended at 88.1%.
  p.min_image_size, p.max_image_size = 20, 32
  # RandAugment starts at 5 as in the paper: under the official op semantics a magnitude below 5
  # is not "weaker" (Brightness/Contrast/Color factors (L/10)*1.8+0.1 fall below 1, Posterize keeps
  # int(L/10*4) bits, so L=1 turns images nearly black). A first cut at 1 -> 5 capped train
  # accuracy near 70% in stage 0 and ended ~6 points short.
  p.min_randaug, p.max_randaug = 5.0, 10.0
  c.randaug_layers = 1  # one op per image: a 5-epoch run of a tiny model underfits with two
  p.min_mixup, p.max_mixup = 0.0, 0.1
  p.min_cutmix = p.max_cutmix = 0.0
  p.min_dropout, p.max_dropout = 0.05, 0.2

  # The official recipe, shortened: TF RMSProp at the code's 0.016 per 256 images, cosine decay
  # (a 5-epoch run never reaches the staircase's slow tail) and an EMA short enough for ~2,300 steps.
  c.lr_per_256 = 0.016
  c.lr_schedule = "cosine"
  c.warmup_epochs = 0.3
  c.ema_decay = 0.999
  c.label_smoothing = 0.1
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  if args["runlocal"]:
    common.shrink_for_local_run(c, image_size=16)
  return c

r"""Fine-tuning an ImageNet-21k checkpoint: 21k -> 1k, and transfer to CIFAR-10/100, Flowers, Cars.

Launch (after configs/imagenet21k.py has trained into gs://BUCKET/effnetv2-s-21k):

  python -m effnetv2_jax.main \
      --config=configs/finetune.py:dataset=cifar10,variant=s,preset=paper \
      --workdir=gs://BUCKET/ft/s-cifar10 --config.data_dir=gs://BUCKET/tensorflow_datasets \
      --config.init_from=gs://BUCKET/effnetv2-s-21k

Arguments: dataset=imagenet2012|cifar10|cifar100|oxford_flowers102|cars196; variant=s|m|l|xl;
preset=paper|official (reference sections 3 and 9, item 6); runlocal (a few toy steps on a CPU).

`init_from` (empty here, set it on the command line): a workdir, its `checkpoints/` dir or one step
dir of a run of this package. Every array whose name and shape match is loaded (EMA weights when the
checkpoint has them); the classifier, whose class count differs, is freshly initialised and logged.
Without init_from this trains from scratch with the fine-tuning recipe (useful only for smoke tests).

The recipe, both presets: batch 512, lr 0.001 at 512 (0.0005 per 256), 1 warmup epoch, 15 epochs but
at least 10,000 steps (the small transfer sets would otherwise see a few hundred steps), EMA 0.9996,
one stage at the variant's eval size (progressive preset 'none'), label smoothing 0.1 as in the 1k
recipe. Presets: 'paper' = cosine decay, no weight decay, BN decay 0.99; 'official' = constant
learning rate, weight decay 1e-5, BN decay 0.9.

Preprocessing: the 'small' family, which is the reference's fine-tuning preprocessing: the whole image
resized without a crop, random flip, (x/255 - 0.5)/0.5, eval = the whole image resized. RandAugment is
off (magnitude 0). Not reproduced: the released code also applies cutout when fine-tuning; the
pipeline has no standalone cutout (it is one of RandAugment's ops), so there is none here.
"""

from configs import common, default
from effnetv2_jax.data import datasets  # the registry itself imports no TensorFlow

DATASETS = ("imagenet2012", "cifar10", "cifar100", "oxford_flowers102", "cars196")
# variant -> (fine-tune size = the 1k eval size, dropout), released code (reference section 3).
VARIANTS = {"s": (384, 0.2), "m": (480, 0.3), "l": (480, 0.4), "xl": (512, 0.4)}
BATCH_SIZE = 512
LR_PER_256 = 0.0005  # 0.001 at batch 512
WARMUP_EPOCHS = 1.0
NUM_EPOCHS = 15
MIN_STEPS = 10_000
EMA_DECAY = 0.9996
PRESETS = {  # preset -> (lr schedule, weight decay, BN decay)
  "paper": ("cosine", 0.0, 0.99),
  "official": ("constant", 1e-5, 0.9),
}


def finetune_steps(num_train: int, batch_size: int = BATCH_SIZE) -> int:
  """15 epochs, but never fewer than 10,000 steps."""
  return max(MIN_STEPS, int(NUM_EPOCHS * num_train / batch_size))


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="imagenet2012", variant="s", preset="paper", runlocal=False)
  dataset, variant, preset = args["dataset"], args["variant"], args["preset"]
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
  size, dropout = VARIANTS[variant]
  schedule, weight_decay, bn_decay = PRESETS[preset]

  c = default.get_config()
  c.model_name = f"efficientnetv2-{variant}"
  c.dtype = "auto"  # bfloat16 compute on TPU/GPU as the official mixed_precision, fp32 on CPU
  c.model_overrides.bn_momentum = bn_decay
  c.dataset = dataset
  c.preprocess_family = "small"
  c.batch_size = BATCH_SIZE
  c.eval_batch_size = BATCH_SIZE
  # Steps, not epochs, so the 10,000-step floor holds; epochs are derived from the registry size.
  c.num_train_steps = finetune_steps(datasets.get_dataset_info(dataset).num_train)
  c.eval_image_size = size
  c.lr_per_256 = LR_PER_256
  c.lr_schedule = schedule
  c.warmup_epochs = WARMUP_EPOCHS
  c.weight_decay = weight_decay
  c.ema_decay = EMA_DECAY
  c.init_from = ""  # set on the command line: --config.init_from=<21k workdir>

  p = c.progressive
  p.preset = "none"  # trains at the eval size from the first step
  p.min_image_size = p.max_image_size = size
  p.min_randaug = p.max_randaug = 0.0
  p.min_mixup = p.max_mixup = 0.0
  p.min_cutmix = p.max_cutmix = 0.0
  p.min_dropout = p.max_dropout = dropout
  if args["runlocal"]:
    common.shrink_for_local_run(c)
  return c

r"""EfficientNetV2 pretraining on ImageNet-21k (reference section 3), the start of the 21k -> 1k runs.

Launch (one host or all workers of a TPU slice; the dataset must be built first, see below):

  python -m effnetv2_jax.main --config=configs/imagenet21k.py:variant=l \
      --workdir=gs://BUCKET/effnetv2-l-21k --config.data_dir=gs://BUCKET/tensorflow_datasets

then fine-tune with configs/finetune.py and `--config.init_from=gs://BUCKET/effnetv2-l-21k`.

Arguments: variant=s|m|l|xl (the paper pretrains these on 21k); runlocal (a few steps at toy
sizes on a CPU). The recipe: 60 epochs at batch 4096, lr 0.008 per 256 images (0.128 at 4096),
cosine decay after 1 warmup epoch, no label smoothing, no RandAugment/mixup/CutMix, one stage at
224 px (progressive preset 'none'), evaluated at 224 px. Dropout: the paper says "~0"; we use 0.0
(head dropout off; stochastic depth keeps the architecture's default). Everything else (TF RMSProp,
weight decay 1e-5, EMA 0.9999, BN decay 0.9) is the 1k recipe.

What this does NOT reproduce: the paper trains on multi-hot labels (an image may carry several
21k synsets) normalised to sum to one before the softmax cross-entropy. This codebase's input
pipeline and loss take a single integer label per image, so this config trains ordinary single-label
softmax on whatever label the dataset gives. TFDS has no ImageNet-21k builder: the registry's
`imagenet21k` entry is a dataset you build yourself (`tfds new imagenet21k`, one int label per
image, splits train/validation); an unprepared data_dir fails with that recipe in the message.
"""

from configs import common, default

VARIANTS = ("s", "m", "l", "xl")
NUM_EPOCHS = 60.0
BATCH_SIZE = 4096
LR_PER_256 = 0.008  # 0.128 at batch 4096
WARMUP_EPOCHS = 1.0
IMAGE_SIZE = 224
DROPOUT = 0.0  # the paper's "dropout ~0"


def get_config(arg=None):
  args = common.parse_arg(arg, variant="s", runlocal=False)
  variant = args["variant"]
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")

  c = default.get_config()
  c.model_name = f"efficientnetv2-{variant}"
  c.dtype = "auto"  # bfloat16 compute on TPU/GPU as the official mixed_precision, fp32 on CPU
  c.dataset = "imagenet21k"  # num_classes (21,843, the code's count) comes from the registry
  c.batch_size = BATCH_SIZE
  c.num_epochs = NUM_EPOCHS
  c.eval_image_size = IMAGE_SIZE
  c.lr_per_256 = LR_PER_256
  c.lr_schedule = "cosine"
  c.warmup_epochs = WARMUP_EPOCHS
  c.label_smoothing = 0.0

  p = c.progressive
  p.preset = "none"  # one stage at max_image_size with the max_* regularization
  p.min_image_size = p.max_image_size = IMAGE_SIZE
  p.min_randaug = p.max_randaug = 0.0  # 0 magnitude skips RandAugment (crop + flip remain)
  p.min_mixup = p.max_mixup = 0.0
  p.min_cutmix = p.max_cutmix = 0.0
  p.min_dropout = p.max_dropout = DROPOUT
  if args["runlocal"]:
    common.shrink_for_local_run(c)
  return c

"""The base config every experiment config starts from: every field the trainer reads lives here.

Experiment configs (`configs/imagenet.py`, `configs/demo.py`, ...) call `get_config()` below and
change fields; they never add fields the trainer does not know (validation rejects unknown ones when
overridden from the command line, since ConfigDicts are locked after construction).

Usage from a config file:  `from configs import default; config = default.get_config()`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model: any name from `effnetv2_jax.models.list_models()`; `model_overrides` are keyword
  # arguments to `create_model` (drop_path_rate, bn_momentum, blocks, width_mult, ...), so a new
  # variant is a config change, not a code change. The per-stage dropout comes from the stage table.
  c.model_name = "efficientnetv2-s"
  c.model_overrides = ml_collections.ConfigDict()
  # Images each BatchNorm statistic is computed over in training: 0 = the whole global batch;
  # G > 0 = groups of G consecutive images of the global batch (the official TPU BatchNorm uses
  # per-replica batch x min(8, replicas)). Independent of the device count; must divide the batch
  # (of every stage). Passed to create_model as the `bn_group_size` override, so set it here, not
  # in model_overrides. Eval always uses the running statistics. See models/layers.py.
  c.bn_group_size = 0
  # Compute dtype: 'float32' | 'bfloat16' | 'auto' (bfloat16 on TPU and GPU, float32 on CPU,
  # resolved at run time by effnetv2_jax.precision.resolve_dtype; the official runs compute in
  # bfloat16 on TPU). Params, BN statistics, loss and optimizer state stay float32 either way.
  c.dtype = "float32"

  # Data: a registered dataset name (effnetv2_jax.data.datasets) or 'folder:/path'.
  c.dataset = "imagenet2012"
  c.data_dir = ml_collections.config_dict.placeholder(str)  # None = TFDS default
  c.train_split = ml_collections.config_dict.placeholder(str)  # None = the registry's
  c.eval_split = ml_collections.config_dict.placeholder(str)
  c.num_classes = ml_collections.config_dict.placeholder(int)  # None = the registry's
  c.preprocess_family = "auto"  # 'v2' | 'v2-base' | 'auto' (from the model name)
  c.autoaugment = False  # AutoAugment v0 instead of RandAugment (B0-B3 in the official code)
  c.randaug_layers = 2
  c.randaug_ops = ""  # comma-separated subset of data.randaug.OPS; "" = all 16 (official)
  # Official-vs-corrected RandAugment/AutoAugment ops (effnetv2_jax/data/augment.py; reference
  # section 10, items 1 and 8). "official" reproduces the released code, bugs included.
  # Solarize threshold int(magnitude / 10 * 256): "official" casts it to uint8, so it wraps (magnitude
  # 10 -> 0 inverts every pixel, 15 -> 128) | "unwrapped" (from magnitude 10 on: no change).
  c.randaug_solarize = "official"
  # Contrast and Sharpness: "official" (Contrast blends towards pixel count / 256, Sharpness
  # truncates its smoothed image) | "corrected" (the grey mean, rounded smoothing: as PIL).
  c.randaug_enhance = "official"
  c.shuffle_buffer = 16384
  # CutMix label weight of the pasted partner: 'batch_mean' (official datasets.py: one weight
  # per (half-)batch, the mean pasted-area fraction, given to every example although each has its
  # own box) | 'per_example' (each example's own pasted fraction, as timm). effnetv2_jax/mixing.py.
  c.cutmix_label = "batch_mean"
  c.cache_dataset = False
  # Share of skipped records (unreadable: a TFRecord checksum error, a truncated or missing shard;
  # or undecodable) above which the run stops with one line naming the worst shard, counted over
  # max(records read, one epoch) per iterator (effnetv2_jax/data/input_pipeline.py). A skipped
  # train record's slot trains on a neighbouring record; an eval one is left out.
  c.max_skipped_fraction = 0.001

  # Schedule length: epochs (converted with the dataset's train size), or steps when > 0.
  c.batch_size = 4096  # global batch, over all processes and devices
  c.eval_batch_size = 1024
  # Gradient accumulation (effnetv2_jax/steps.py): each step trains its global batch as k
  # micro-batches of batch_size / k inside the one compiled step (a scan: gradients averaged, BN
  # running statistics updated per micro-batch in sequence, dropout and mixup keys and mixing
  # pairs per micro-batch, the optimizer and EMA once per step), so activations of one
  # micro-batch at a time need memory. 1 = off; k > 1 = k micro-batches at every stage (must
  # divide the batch per device, and batch_size / k must be tiled by bn_group_size); 0 = chosen
  # per stage: the fewest micro-batches whose compiled step fits the memory budget below
  # (effnetv2_jax/memory_fit.py; results.json records k per stage).
  c.grad_accum_steps = 1
  # Per-device memory budget for grad_accum_steps = 0 and progressive.batch_rule 'fit'
  # (effnetv2_jax/memory_fit.py), in bytes:
  # 0 = what the device reports (GPU/TPU: the allocator's bytes_limit; CPU: host RAM / CPU
  # devices) less `device_memory_margin` of it, kept for what XLA's analysis of the step does not
  # count (the next batch on the device, fragmentation, the eval step); > 0 = exactly this many.
  c.device_memory_bytes = 0
  c.device_memory_margin = 0.1
  c.num_epochs = 350.0
  c.num_train_steps = -1
  c.eval_image_size = 384

  # Progressive learning (effnetv2_jax.progressive): `preset` picks the interpolation rule
  # ('paper' = Algorithm 1, 'official' = the released code, 'none' = one stage at the final
  # size and regularization); the min/max fields are the end points it interpolates between.
  c.progressive = ml_collections.ConfigDict()
  p = c.progressive
  p.preset = "official"
  p.num_stages = 4
  p.min_image_size = 128
  p.max_image_size = 300
  p.min_randaug = 5.0
  p.max_randaug = 10.0
  p.min_mixup = 0.0
  p.max_mixup = 0.0
  p.min_cutmix = 0.0
  p.max_cutmix = 0.0
  p.min_dropout = 0.2
  p.max_dropout = 0.2
  p.size_multiple = 1  # round stage image sizes down to a multiple of this (e.g. 8 or 32)
  # Stage lengths as fractions of training, one per stage, summing to 1, e.g. (0.25, 0.25, 0.5);
  # () = equal stages. Sizes and regularization still follow the preset, by stage index.
  p.stage_fractions = ()
  # 'linear' (the preset's size rule) | 'hold_then_ramp': the first stage holds min_image_size
  # for `hold_fraction` of training, the last keeps max_image_size for `tail_fraction`, the
  # stages between ramp in equal size steps over equal lengths; regularization follows the size
  # as in Algorithm 1. Not with preset 'none' or stage_fractions. See effnetv2_jax/progressive.py.
  p.size_curve = "linear"
  p.hold_fraction = 0.0  # hold_then_ramp only; 0 = no hold stage
  p.tail_fraction = 0.0  # hold_then_ramp only; 0 = no full-size tail stage
  # Per-stage global batch (effnetv2_jax/progressive.py). 'constant': every stage at batch_size
  # (the released code and the paper; every preset's default) | 'pixels': B_i = batch_size *
  # (S_last / S_i)^2, as many pixels per batch as the last stage's, rounded down to a multiple of
  # lcm(device count, batch_multiple, bn_group_size), at most max_batch_size; the last stage keeps
  # batch_size | 'fit': the largest batch whose compiled step (no accumulation: grad_accum_steps
  # must be 1) fits the memory budget (device_memory_bytes above), a multiple of the same lcm, at
  # most max_batch_size (0: 16 x batch_size), measured from compiles when the run starts and kept
  # in the checkpoints for a resume (effnetv2_jax/batch_fit.py). batch_size stays the reference
  # batch B_ref: each stage's LR is lr_per_256 * B_i / 256, the schedule (warmup, decay) runs on
  # images seen, and the EMA per ema_horizon below.
  p.batch_rule = "constant"
  # One global batch per stage, e.g. (8192, 6144, 4096, 4096); () = from batch_rule. Only with
  # batch_rule 'constant'; each must be a multiple of the device count.
  p.batch_sizes = ()
  # 'pixels' and 'fit' round stage batches to a multiple of this (and of the device count): 64
  # keeps the table the same on 1, 2, 4, ..., 64 devices (a resume on another device count must
  # see the same batches) and the per-device batch a multiple of 8 on 8 devices.
  p.batch_multiple = 64
  # 'pixels' and 'fit' cap on a stage's batch (0 = none; 'fit' then caps at 16 x batch_size: its
  # upper probe). Uncapped, the S preset's first stage (171px of 300) trains at 12544 images from
  # 4096 under 'pixels'; the linear LR scaling rule is known to hold to about 8k images, so e.g.
  # 8192 keeps the early stages within it.
  p.max_batch_size = 0

  # Optimizer and learning rate (official recipe: TF RMSProp, 0.016 per 256 images, 5 warmup
  # epochs, staircase decay 0.97 every 2.4 epochs).
  c.optimizer = "rmsprop"  # 'rmsprop' (TF1 semantics) | 'sgd' | 'adamw'
  c.lr_per_256 = 0.016
  c.lr_schedule = "exponential"  # 'exponential' | 'cosine' | 'constant'
  c.warmup_epochs = 5.0
  c.lr_decay_epochs = 2.4
  c.lr_decay_rate = 0.97
  c.min_lr = 0.0  # floor for cosine
  c.momentum = 0.9
  c.rmsprop_decay = 0.9
  c.rmsprop_eps = 1e-3
  c.weight_decay = 1e-5  # L2 in the loss, (wd/2)*||w||^2, kernels only
  c.label_smoothing = 0.1
  c.ema_decay = 0.9999  # 0 disables; warmup min(decay, (1+n)/(10+n)), n = step + 1 as in TF
  # When stages train at different batches (progressive.batch_rule): 'images' keeps the EMA's
  # horizon in images, per-step decay min(decay, warmup) ** (B_stage / batch_size), the warmup's
  # n counted in images / batch_size | 'steps': the plain per-step decay above at every batch.
  # Identical at a constant batch. effnetv2_jax/state.py ema_decay_fn.
  c.ema_horizon = "images"
  c.grad_clip_norm = 0.0  # 0 disables

  # Loop, logging, checkpoints.
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_stage = True
  # Time to accuracy (effnetv2_jax/curves.py): evaluate during training (EMA weights, at
  # eval_image_size) and record a curve of (step, wall seconds, images seen, top-1) in
  # results.json and curves.png, each eval's own seconds recorded apart so they can be
  # subtracted. After every `eval_every_steps`-th step (0 = off) and/or when `eval_every_seconds`
  # of wall clock passed since the last curve eval (0 = off).
  c.eval_every_steps = 0
  c.eval_every_seconds = 0.0
  c.eval_subset = 0  # curve evals on the eval split's first N images (a fixed subset); 0 = all
  # --mode=eval: before evaluating at each size, recompute the BN statistics at that size from
  # this many train-split images (eval preprocessing, no augmentation; whole batches of
  # eval_batch_size, so N rounds down to a multiple of it), FixRes-style; 0 = use the
  # checkpoint's statistics. effnetv2_jax/recalibrate.py.
  c.recalibrate_bn = 0
  c.max_bad_steps = 10  # consecutive non-finite steps before the run stops
  c.compilation_cache_dir = "~/.cache/effnetv2_jax/xla"  # '' disables
  # Compile the next stage's train step (and the eval step) on a background thread while this
  # stage trains, so a stage switch waits only for what is left (effnetv2_jax/compile_ahead.py).
  c.compile_ahead = True
  c.init_from = ""  # an orbax checkpoint dir of this package to start from (fine-tuning)
  c.freeze_bn_stats = False  # fine-tuning: keep BN running statistics at their loaded values
  c.runlocal = False
  return c

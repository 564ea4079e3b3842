"""Train input pipeline throughput: images/s per host core vs image size and RandAugment magnitude.

  python -m experiments.bench_input_pipeline [--sizes=128,192,256,300] [--magnitudes=0,5,10,15]
      [--seconds=4] [--num_images=256] [--out=experiments/results/bench_input_pipeline.md]

Data: a temporary image folder of synthetic ~224-px JPEGs (sizes 180-300 px, smooth gradients plus
noise so JPEG decoding costs about what photos cost), read through the real `train_iterator`
(decode, 'v2' crop, resize, flip, RandAugment, normalise, batch). Each configuration runs
`--seconds` after a warm-up batch; the first batch includes graph tracing and shuffle-buffer fill,
so it is excluded. If timm is installed, its PIL RandAugment pipeline (RandomResizedCrop, flip,
rand-m{M}-n2, ToTensor, Normalize) is timed on the same files in one process and the ratio is printed.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from experiments import common

MODULE = "experiments.bench_input_pipeline"


def make_folder(root: str, num_images: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    h, w = rng.integers(180, 301, size=2)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (h + w))], -1)
    img = np.clip(base + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    d = os.path.join(root, "train", f"class{i % 4}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(img).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)
  return root


def bench_tf(root, image_size, magnitude, seconds, batch, cores):
  from effnetv2_jax.data import input_pipeline
  from effnetv2_jax.data.augment import Augment

  it = input_pipeline.train_iterator(
    dataset=f"folder:{root}",
    data_dir=None,
    split=None,
    global_batch_size=batch,
    image_size=image_size,
    family="v2",
    augment=Augment(magnitude=magnitude),
    seed=0,
    tuning=input_pipeline.Tuning(private_threadpool_size=cores),
  )
  next(it)  # tracing + shuffle buffer fill
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    n += next(it)["image"].shape[0]
  ips = n / (time.perf_counter() - start)
  del it  # stop its prefetch threads before the next configuration is timed
  gc.collect()
  return ips


def bench_timm(root, image_size, magnitude, seconds):
  """images/s of timm's PIL pipeline in this single process (one core)."""
  from timm.data.auto_augment import rand_augment_transform  # pylint: disable=import-error
  from torchvision import transforms  # pylint: disable=import-error

  mean = (0.485, 0.456, 0.406)
  tfm = transforms.Compose(
    [
      transforms.RandomResizedCrop(image_size, scale=(0.05, 1.0)),
      transforms.RandomHorizontalFlip(),
      rand_augment_transform(
        f"rand-m{int(magnitude)}-n2", dict(img_mean=tuple(int(255 * m) for m in mean))
      ),
      transforms.ToTensor(),
      transforms.Normalize(mean, (0.229, 0.224, 0.225)),
    ]
  )
  files = sorted(
    os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if f.endswith(".jpg")
  )
  n, start, i = 0, time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    with Image.open(files[i % len(files)]) as im:
      tfm(im.convert("RGB"))
    n, i = n + 1, i + 1
  return n / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="128,192,256,300")
  parser.add_argument("--magnitudes", default="0,5,10,15")
  parser.add_argument("--seconds", type=float, default=4.0)
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "bench_input_pipeline.md"))
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  mags = [float(m) for m in args.magnitudes.split(",")]
  cores = os.cpu_count() or 1

  try:
    import timm  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel

    have_timm = True
  except ImportError:
    have_timm = False
    print("timm not installed: skipping the PIL RandAugment comparison")

  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  root = make_folder(tempfile.mkdtemp(prefix="bench_input_"), args.num_images)
  rows = []
  try:
    for size in sizes:
      for mag in mags:
        ips = bench_tf(root, size, mag, args.seconds, args.batch, cores)
        row = [size, mag, ips, ips / cores]
        if have_timm and mag > 0:
          pil = bench_timm(root, size, mag, args.seconds)
          row += [pil, (ips / cores) / pil]
        rows.append(row)
        print(
          f"size {size:3d}  RA magnitude {mag:4.1f}: {ips:7.1f} img/s = {ips / cores:6.1f} "
          f"img/s/core"
          + (f"; timm PIL {row[4]:.1f} img/s/core, ratio {row[5]:.2f}" if len(row) > 4 else ""),
          flush=True,
        )
  finally:
    shutil.rmtree(root, ignore_errors=True)

  lines = [
    "# Input pipeline throughput (train, family v2)",
    "",
    f"Command: `{common.command(MODULE)}`",
    "",
    f"Host: {cores} cores ({platform.processor() or platform.machine()}), TensorFlow {tf.__version__}, "
    f"batch {args.batch}, {args.num_images} synthetic JPEGs of 180-300 px, {args.seconds:g} s per row "
    "after one warm-up batch. Per-core = total / host cores (tf.data used all of them). Magnitude 0 "
    "= RandAugment off (decode, crop, resize, flip, normalise only). Each row is one short window "
    "in which RandAugment draws a random mix of ops of very different cost (AutoContrast/Equalize "
    "table lookups and the projective transforms dominate), on a host other jobs may share: "
    "expect +-25% between runs, and read magnitude trends only across several runs.",
    "",
  ]
  header = "| image size | RA magnitude | images/s | images/s/core |"
  sep = "|---|---|---|---|"
  if have_timm:
    header += " timm PIL images/s/core | ratio (ours / timm) |"
    sep += "---|---|"
  lines += [header, sep]
  for r in rows:
    cells = [f"{r[0]}", f"{r[1]:g}", f"{r[2]:.1f}", f"{r[3]:.1f}"]
    if have_timm:
      cells += [f"{r[4]:.1f}", f"{r[5]:.2f}"] if len(r) > 4 else ["-", "-"]
    lines.append("| " + " | ".join(cells) + " |")
  if not have_timm:
    lines += [
      "",
      "timm not installed: the PIL RandAugment comparison was skipped "
      "(`pip install -e .[bench]` to add it).",
    ]
  path = common.write_result(os.path.abspath(args.out), "\n".join(lines) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()

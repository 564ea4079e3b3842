"""One process of `python -m experiments.bench_train_step --compile-report`: compiles the train
step of every stage of configs/demo.py with a persistent compilation cache in `--cache`, and
reports per stage the image size, compile, trace and total seconds (a `common.say` line).

  python -m experiments.compile_report_worker --cache DIR

The stages are the demo's own (`plan.resolve`: the registry knows fashion_mnist's train size, so
no data is read), and each step is the trainer's for that stage (common.compile_stage: the stage's
dropout, mixing and image size, the demo's model, classes and batch) on synthetic data. The
report runs it twice on one cache: cold, then warm.
"""

from __future__ import annotations

import argparse
import time

from experiments import common


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cache", required=True, help="persistent XLA compilation cache folder")
  args = ap.parse_args(argv)
  from configs import demo
  from effnetv2_jax import plan, train

  config = demo.get_config()
  config.compilation_cache_dir = args.cache
  train.setup_compilation_cache(config)
  run = plan.resolve(config)
  out = []
  for stage in run.stages:
    t0 = time.perf_counter()
    *_, times = common.compile_stage(config, run, stage)
    out.append(dict(size=stage.image_size, total_s=time.perf_counter() - t0, **times))
  common.say(out)


if __name__ == "__main__":
  main()

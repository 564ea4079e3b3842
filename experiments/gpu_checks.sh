#!/usr/bin/env bash
# The whole GPU session as one prepared script, for a short lease on one H100/H200 (the `device` tool):
#
#   run: bash experiments/gpu_checks.sh        (results land in $OUT, default /tmp/gpu_out)
#        with the device tool: carry ["gpu_wheels"] (git-ignored, so it travels only when carried)
#
# The GPU image has jax (CUDA), flax, optax, orbax, torch and timm but no ml_collections, which
# configs/default.py needs. Put its wheels (and absl-py, PyYAML for that Python) in gpu_wheels/
# beforehand (`pip download --no-deps -d gpu_wheels ml_collections absl-py`, plus PyYAML for the
# image's Python); they are unpacked only when the module is missing. Phases, each time-boxed:
#   1. bench_gpu.py: EfficientNetV2-S at 300 and 384 px, bf16, this codebase vs timm (issue 8).
#   2. if time is left: this codebase alone at 128/192/256 px, i.e. the train-step speed at the
#      small progressive stages, which is where progressive learning saves its time.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

SITE=${TMPDIR:-/tmp}/gpu_site
for pair in ml_collections:ml_collections absl:absl_py yaml:pyyaml; do
  mod=${pair%%:*}; whl=${pair##*:}
  if ! python -c "import $mod" 2>/dev/null; then
    for w in gpu_wheels/${whl}-*.whl; do
      [ -e "$w" ] && python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$SITE"
    done
  fi
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import jax, flax, optax, torch, timm, ml_collections; print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$OUT/env.txt"

timeout 360 python experiments/bench_gpu.py --probe-batch 256 --max-batch 256 --budget-s 330 \
  2>&1 | tee "$OUT/bench_gpu_main.log"
echo "phase 1 done at $(elapsed)s" | tee -a "$OUT/bench_gpu_main.log"

LEFT=$(( ${GPU_CHECKS_BUDGET_S:-480} - $(elapsed) ))
if [ "$LEFT" -gt 120 ]; then
  timeout "$LEFT" python experiments/bench_gpu.py --skip-timm --sizes 128,192,256 \
    --probe-batch 256 --max-batch 256 --budget-s $(( LEFT - 15 )) 2>&1 | tee "$OUT/bench_gpu_sizes.log"
fi
cp experiments/results/bench_gpu.md "$OUT/" 2>/dev/null
echo "all done at $(elapsed)s" | tee -a "$OUT/env.txt"

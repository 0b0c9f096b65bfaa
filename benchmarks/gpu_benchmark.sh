#!/usr/bin/env bash
# The GPU checks of the training step, in one call on a bare GPU machine (one GPU; torch,
# transformers, peft, PyYAML and Pillow installed; no Ray, DeepSpeed or MLflow needed):
#
#   make gpu-wheels                                  # here, once: pydantic's wheels for Python 3.12 into .whl/
#   bash benchmarks/gpu_benchmark.sh [OUT_DIR]       # there, from the repository root, with .whl/ carried along
#
# 1. benchmarks/varlen_check.py: torch's variable-length FlashAttention kernel (train.attention=varlen)
#    against the per-segment SDPA calls (segments), outputs and gradients in bf16;
# 2. `benchmarks/run.py train` for the stage-2 (1B LM) and LLaVA-1.5-7B stage-1 presets, with
#    --attention varlen and segments, most wanted first. Each run's last line is its JSON figures.
#    The whole script keeps within BUDGET_S seconds (default 540): a run that would start with
#    under a minute left is skipped and says so.
# Everything goes to OUT_DIR (default: $OUT, else ./gpu_benchmark_out). Where pydantic is missing,
# the wheels in .whl/ are installed into a temporary folder first. Record the figures, with the
# commit and date, in benchmarks/README.md.
set -uo pipefail
out=${1:-${OUT:-gpu_benchmark_out}}
budget=${BUDGET_S:-540}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import pydantic" 2>/dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || {
    echo "pydantic is missing and .whl/ holds no wheels for it: run 'make gpu-wheels' and carry .whl/"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.csv"
"$python" benchmarks/varlen_check.py 2>&1 | tee "$out/varlen_check.txt"
for run in stage2-1b:varlen stage2-1b:segments llava-7b-stage1:varlen llava-7b-stage1:segments; do
  preset=${run%:*} attention=${run#*:}
  left=$((budget - SECONDS))
  if ((left < 60)); then
    echo "== $preset, --attention $attention: skipped, ${left}s of the ${budget}s budget left"
    continue
  fi
  log="$out/train-$preset-$attention.log"
  timeout $((left < 180 ? left : 180)) "$python" benchmarks/run.py train \
    --preset "$preset" --device cuda --attention "$attention" --steps 3 --warmup 1 > "$log" 2>&1
  echo "== $preset, --attention $attention: exit $?"
  grep -E '^\((a|b)\)|^ratio' "$log" || tail -5 "$log"
done

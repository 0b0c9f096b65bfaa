#!/usr/bin/env bash
# The GPU checks of the training step, in one call on a bare GPU machine (one GPU; torch,
# transformers, peft, PyYAML and Pillow installed; no Ray, DeepSpeed or MLflow needed):
#
#   make gpu-wheels                               # here, once: pydantic's wheels for Python 3.12 into .whl/
#   bash cluster/gpu_benchmark.sh [OUT_DIR]       # there, from the repository root, with .whl/ carried along
#
# 1. varlen check: torch's variable-length FlashAttention kernel (LLAVA_RAY_VARLEN_ATTENTION=1)
#    against the per-segment SDPA calls, outputs and gradients in bf16;
# 2. `jobs/benchmark.py train` for the stage-2 (1B LM) and LLaVA-1.5-7B stage-1 presets, with the
#    varlen kernel and with the per-segment calls, most wanted first. Each run's last line is its
#    JSON figures. The whole script keeps within BUDGET_S seconds (default 540): a run that would
#    start with under a minute left is skipped and says so.
# Everything goes to OUT_DIR (default: $OUT, else ./gpu_benchmark_out). Where pydantic is missing,
# the wheels in .whl/ are installed into a temporary folder first.
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.csv"
"$python" - <<'PY' 2>&1 | tee "$out/varlen_check.txt"
import os

import torch
import transformers

from llava_ray.training import packing

print(f"torch {torch.__version__}, transformers {transformers.__version__}, varlen_attn: {packing.varlen_attn is not None}")
torch.manual_seed(0)
lengths = [600, 37, 1200, 5, 250, 2000]
rows, width = 2, sum(lengths) // 2
position_ids = torch.cat([torch.arange(n) for n in lengths]).view(rows, width).cuda()
q, k, v = (torch.randn(rows, 16, width, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
module = torch.nn.Module()
outputs, grads = [], []
for varlen in ("0", "1"):
    os.environ[packing.VARLEN_ENV] = varlen
    assert packing.varlen_applies(q, 0.0, None) == (varlen == "1" and packing.varlen_attn is not None)
    out, _ = packing.segment_attention_forward(module, q, k, v, None, position_ids=position_ids)
    out.float().pow(2).sum().backward()
    outputs.append(out.detach().float())
    grads.append([t.grad.float().clone() for t in (q, k, v)])
    for t in (q, k, v):
        t.grad = None
print(f"max |out varlen - out per-segment| = {(outputs[0] - outputs[1]).abs().max().item():.4g}")
for name, a, b in zip("qkv", grads[0], grads[1]):
    scale = a.abs().max().item()
    print(f"max |d{name} varlen - d{name} per-segment| = {(a - b).abs().max().item():.4g} (of max {scale:.4g})")
PY
for run in stage2-1b:1 stage2-1b:0 llava-7b-stage1:1 llava-7b-stage1:0; do
  preset=${run%:*} varlen=${run#*:}
  left=$((budget - SECONDS))
  if ((left < 60)); then
    echo "== $preset, LLAVA_RAY_VARLEN_ATTENTION=$varlen: skipped, ${left}s of the ${budget}s budget left"
    continue
  fi
  log="$out/train-$preset-varlen$varlen.log"
  LLAVA_RAY_VARLEN_ATTENTION=$varlen timeout $((left < 180 ? left : 180)) "$python" jobs/benchmark.py train \
    --preset "$preset" --device cuda --steps 3 --warmup 1 > "$log" 2>&1
  echo "== $preset, LLAVA_RAY_VARLEN_ATTENTION=$varlen: exit $?"
  grep -E '^\((a|b)\)|^ratio' "$log" || tail -5 "$log"
done

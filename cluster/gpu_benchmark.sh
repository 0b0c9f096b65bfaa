#!/usr/bin/env bash
# The GPU checks of the training step, in one call on a bare GPU machine (one GPU; torch,
# transformers, peft, pydantic, PyYAML and Pillow installed; no Ray, DeepSpeed or MLflow needed):
#
#   bash cluster/gpu_benchmark.sh [OUT_DIR]       # from the repository root; at most about 10 minutes, mostly building the 7B models
#
# 1. varlen check: torch's variable-length FlashAttention kernel (LLAVA_RAY_VARLEN_ATTENTION=1)
#    against the per-segment SDPA calls, outputs and gradients in bf16;
# 2. `jobs/benchmark.py train` for the stage-2 (1B LM) and LLaVA-1.5-7B stage-1 presets, with the
#    per-segment calls and with the varlen kernel. Each run's last line is its JSON figures.
# Everything goes to OUT_DIR (default: $OUT, else ./gpu_benchmark_out).
set -uo pipefail
out=${1:-${OUT:-gpu_benchmark_out}}
mkdir -p "$out"
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.csv"
python - <<'PY' 2>&1 | tee "$out/varlen_check.txt"
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
for preset in stage2-1b llava-7b-stage1; do
  for varlen in 0 1; do
    log="$out/train-$preset-varlen$varlen.log"
    LLAVA_RAY_VARLEN_ATTENTION=$varlen timeout 150 python jobs/benchmark.py train --preset "$preset" \
      --device cuda --steps 3 --warmup 1 > "$log" 2>&1
    echo "== $preset, LLAVA_RAY_VARLEN_ATTENTION=$varlen: exit $?"
    grep -E '^\((a|b)\)|^ratio' "$log"
  done
done

"""GPU check of ``train.attention=varlen``: torch's variable-length FlashAttention kernel against the
per-segment SDPA calls (``segments``), outputs and gradients in bf16 on packed rows.

    PYTHONPATH=platform python benchmarks/varlen_check.py      # on a CUDA machine (gpu_benchmark.sh runs it)

Prints the versions, whether the kernel exists, and the largest differences; exits 1 where the
kernel cannot run (no CUDA, torch < 2.10).
"""

from __future__ import annotations

import sys

import torch
import transformers

from llava_ray.training import packing
from llava_ray.utils.compat import varlen_attn

SEGMENT_LENGTHS = (600, 37, 1200, 5, 250, 2000)  # two rows of 2046 positions, samples of mixed sizes


def main() -> int:
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"varlen_attn: {varlen_attn is not None}, cuda: {torch.cuda.is_available()}"
    )
    if not torch.cuda.is_available() or varlen_attn is None:
        print("the varlen kernel cannot run here (it needs CUDA and torch >= 2.10)")
        return 1
    torch.manual_seed(0)
    rows, width = 2, sum(SEGMENT_LENGTHS) // 2
    position_ids = torch.cat([torch.arange(n) for n in SEGMENT_LENGTHS]).view(rows, width).cuda()
    q, k, v = (
        torch.randn(rows, 16, width, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    assert packing.varlen_applies(q, 0.0, None), "bf16 on CUDA with head size 64 should take the kernel"
    module = torch.nn.Module()
    outputs, grads = [], []
    for varlen in (False, True):
        out, _ = packing.segment_attention_forward(
            module, q, k, v, None, position_ids=position_ids, varlen=varlen
        )
        out.float().pow(2).sum().backward()
        outputs.append(out.detach().float())
        grads.append([t.grad.float().clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    print(f"max |out varlen - out per-segment| = {(outputs[0] - outputs[1]).abs().max().item():.4g}")
    for name, a, b in zip("qkv", grads[0], grads[1], strict=True):
        scale = a.abs().max().item()
        print(
            f"max |d{name} varlen - d{name} per-segment| = {(a - b).abs().max().item():.4g} (of max {scale:.4g})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

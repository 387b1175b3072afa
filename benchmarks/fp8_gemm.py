"""wan-opt's fp8 GEMM (torch._scaled_mm, one scale per token and per output channel) at A14B's linear shapes, with
the tensor cores' fast accumulation off and on: sustained TFLOP/s with NVML's clock and power meanwhile, and each
result's relative L2 against fp32 arithmetic on the same fp8 operands (the accumulation's error alone; rounding
the operands to e4m3 is the same for both).

The shapes are one 720p x 81 forward's (75,600 tokens): the attention projections (5,120 -> 5,120), the
feed-forward's first layer (5,120 -> 13,824) and its second (13,824 -> 5,120).

    python benchmarks/fp8_gemm.py --tokens 75600 --seconds 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pynvml
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attention_power import sustained  # noqa: E402  (this folder)
from gpu_report import gpu_file_name, gpu_report, write_report  # noqa: E402  (this folder)

from wan_opt.optim.fp8 import quantize_rows  # noqa: E402

SHAPES = {"attention_projection": (5120, 5120), "feed_forward_in": (5120, 13824), "feed_forward_out": (13824, 5120)}
CHECKED_ROWS = 4096  # the fp32 reference is computed for these tokens only


def run(tokens: int, in_features: int, out_features: int, seconds: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.01
    (q, q_scale), (w, w_scale) = quantize_rows(x), quantize_rows(weight)
    rows = slice(0, CHECKED_ROWS)
    exact = (q[rows].float() * q_scale[rows]) @ (w.float() * w_scale).t() + bias.float()
    runs = []
    for fast in (False, True):
        def gemm():
            return torch._scaled_mm(q, w.t(), scale_a=q_scale, scale_b=w_scale.t(), bias=bias,
                                    out_dtype=torch.bfloat16, use_fast_accum=fast)

        error = (gemm()[rows].float() - exact).norm() / exact.norm()
        runs.append({"tokens": tokens, "in_features": in_features, "out_features": out_features,
                     "fast_accum": fast, "rel_l2_vs_fp32": round(error.item(), 6),
                     **sustained(gemm, seconds, 2 * tokens * in_features * out_features)})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=75_600)
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each GEMM runs")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    pynvml.nvmlInit()
    record = gpu_report(runs=[])
    for name, (in_features, out_features) in SHAPES.items():
        for result in run(args.tokens, in_features, out_features, args.seconds):
            record["runs"].append({"layer": name, **result})
            print(json.dumps(record["runs"][-1]), flush=True)
    pynvml.nvmlShutdown()
    write_report(record, Path(args.out) / gpu_file_name("fp8_gemm", record))


if __name__ == "__main__":
    main()

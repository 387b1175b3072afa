"""Q and K's RMSNorm over all heads and rotary embedding at Wan's sizes on one GPU: diffusers' arithmetic (eager,
and compiled as the profiles run it) against wan-opt's kernel (wan_opt/kernels/qk_norm_rope.py), in one process.

A14B at 720p x 81 is 75,600 tokens of 40 heads of 128; at 480p x 81, 32,760. Reports milliseconds per call (Q and
K together), the bandwidth the kernel reaches (it reads and writes each of Q and K once) and each result's
relative L2 against the same arithmetic in fp32.

    python benchmarks/qk_norm_rope.py
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attention_kernels import milliseconds  # noqa: E402  (this folder)
from gpu_report import gpu_report, write_report  # noqa: E402  (this folder)

from wan_opt.optim.attention import norm_and_rotate_as_diffusers  # noqa: E402

LATENTS = {75600: (21, 90, 160), 32760: (21, 60, 104)}  # 720p and 480p x 81 frames, before the 1x2x2 patches


def run(tokens: int, heads: int, head_dim: int, repeat: int) -> dict:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from wan_opt.kernels.qk_norm_rope import qk_norm_rope_op

    width = heads * head_dim
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024).cuda()
    cos, sin = rope(torch.zeros(1, 16, *LATENTS[tokens], device="cuda"))
    norms = [torch.nn.RMSNorm(width, eps=1e-6).cuda() for _ in range(2)]
    for norm in norms:
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    query, key = (torch.randn(1, tokens, width, device="cuda") for _ in range(2))

    attn = types.SimpleNamespace(heads=heads, norm_q=norms[0], norm_k=norms[1])

    def diffusers_arithmetic(q, k):
        return norm_and_rotate_as_diffusers(attn, q, k, (cos, sin))

    def kernel(q, k):
        out = qk_norm_rope_op(q, k, norms[0].weight, norms[1].weight, cos, sin, 1e-6, heads)
        return tuple(t.unflatten(2, (heads, -1)) for t in out)

    with torch.no_grad():
        exact = diffusers_arithmetic(query, key)  # in fp32
        for norm in norms:
            norm.bfloat16()
        query, key = query.bfloat16(), key.bfloat16()
        compiled = torch.compile(diffusers_arithmetic)
        report = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "rotary_dtype": str(cos.dtype).split(".")[-1]}
        for name, fn in (("eager", diffusers_arithmetic), ("compiled", compiled), ("kernel", kernel)):
            ms = milliseconds(lambda: fn(query, key), repeat)
            out = fn(query, key)
            err = max(((o.float() - e).norm() / e.norm()).item() for o, e in zip(out, exact))
            report[name] = {"ms": round(ms, 3), "rel_l2_vs_fp32": float(f"{err:.3g}")}
        moved = 4 * query.numel() * query.element_size()  # Q and K, each read and written once
        report["kernel"]["tb_per_s"] = round(moved / report["kernel"]["ms"] / 1e9, 2)
        report["speedup_over_compiled"] = round(report["compiled"]["ms"] / report["kernel"]["ms"], 2)
    print(json.dumps(report), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(LATENTS), choices=list(LATENTS))
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/qk_norm_rope.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("qk_norm_rope.py times GPU kernels: run it on a machine with a CUDA GPU.", file=sys.stderr)
        return 2
    runs = [run(tokens, args.heads, args.head_dim, args.repeat) for tokens in args.tokens]
    write_report(gpu_report(runs=runs), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

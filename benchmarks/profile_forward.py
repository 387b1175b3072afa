"""Where one denoiser forward spends its GPU time: the kernels of a full-size A14B expert (random weights), as
diffusers runs it and under a wan-opt speed policy, from PyTorch's profiler.

Prints and writes the kernels that took the most time, grouped into matmul, attention, and the rest
(norms, modulation, rotary, activations, copies), so that a gap between a step's time and its FLOP floor
has names.

    python benchmarks/profile_forward.py --size 832*480 --frames 81
    python benchmarks/profile_forward.py --size 1280*720 --speed compile=regional attention=fp8
    python benchmarks/profile_forward.py --size 1280*720 --fp8-weights --speed compile=regional attention=fp8 fp8_matmul=true

--fp8-weights stores the blocks' linear layers in e4m3 before the wan-opt run, as mode=fast does (fp8_matmul
acts on those layers only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_report import gpu_file_name, gpu_report, write_report  # noqa: E402  (this folder)
from wan_opt.loading.arch import DIT_CONFIGS, build_random_expert  # noqa: E402
from wan_opt.optim.fp8 import quantize_linears  # noqa: E402
from wan_opt.request import parse_size  # noqa: E402
from wan_opt.optim.speed import SpeedPolicy  # noqa: E402

MATMUL = ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "cublas", "_scaled_mm", "triton_tem")
ATTENTION = ("fmha", "flash", "attention", "cudnn", "sdpa", "fp8_attention_kernel")


def kind(name: str) -> str:
    low = name.lower()
    if any(word in low for word in ATTENTION):
        return "attention"
    if any(word in low for word in MATMUL):
        return "matmul"
    return "other"


def profile(expert, inputs, label: str, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.inference_mode():
        for _ in range(2):  # compile, autotune, warm caches
            expert(*inputs, return_dict=False)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            expert(*inputs, return_dict=False)
            torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda k: -k[1])
    by_kind: dict[str, float] = {}
    for name, ms, _ in kernels:
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + ms
    record = {"run": label, "gpu_ms": round(sum(ms for _, ms, _ in kernels), 1),
              "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items())},
              "top_kernels": [{"name": n[:160], "ms": round(ms, 2), "calls": c, "kind": kind(n)} for n, ms, c in kernels[:top]]}
    print(json.dumps({k: v for k, v in record.items() if k != "top_kernels"}), flush=True)
    for k in record["top_kernels"]:
        print(f"  {k['ms']:9.2f} ms {k['calls']:5d}x {k['kind']:9s} {k['name'][:110]}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="832*480")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--speed", nargs="*", default=["compile=regional"],
                        help="SpeedPolicy fields for the wan-opt run, e.g. compile=regional attention=fp8")
    parser.add_argument("--fp8-weights", action="store_true", help="the blocks' linears in e4m3, as mode=fast stores them")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    device = torch.device("cuda")
    width, height = parse_size(args.size)
    latent_frames = (args.frames - 1) // 4 + 1
    torch.manual_seed(0)
    expert = build_random_expert("t2v_a14b", torch.bfloat16, device)
    gen = torch.Generator(device="cuda").manual_seed(1)
    inputs = (torch.randn(1, 16, latent_frames, height // 8, width // 8, device=device, generator=gen, dtype=torch.bfloat16),
              torch.full((1,), 900.0, device=device),
              torch.randn(1, 512, DIT_CONFIGS["t2v_a14b"]["text_dim"], device=device, generator=gen, dtype=torch.bfloat16))
    record = gpu_report(size=args.size, frames=args.frames,
                        runs=[profile(expert, inputs, "diffusers (eager, SDPA)", args.top)])
    fields = dict(item.split("=", 1) for item in args.speed)
    if args.fp8_weights:
        for block in expert.blocks:
            quantize_linears(block, work_device=device)
    SpeedPolicy(**fields).apply([expert], device)
    label = "wan-opt " + " ".join(args.speed) + (" (fp8 weights)" if args.fp8_weights else "")
    record["runs"].append(profile(expert, inputs, label, args.top))
    size = f"_{args.size.replace('*', 'x')}x{args.frames}"
    write_report(record, Path(args.out) / gpu_file_name("profile_forward", record, size))


if __name__ == "__main__":
    main()

"""Self-attention kernels at Wan's sizes on one GPU: PyTorch's bf16 SDPA (cuDNN on Hopper) against wan-opt's fp8 kernels,
wan-opt's exact Hopper kernel (attention=hopper) and, where flash-attn-4 is installed, FlashAttention-4.

A14B's self-attention at 720p x 81 is 75,600 tokens, 40 heads of 128; at 480p x 81, 32,760 tokens. Reports
TFLOP/s (4 N^2 d per head), milliseconds, and relative L2 against bf16 SDPA: for the fp8 attention as wan-opt
runs it (on Hopper the warp-specialised kernel) alone and with the quantisation of Q, K and V before it, and for
the Triton kernel (the one Ada and other head dimensions get); with --tiles, also each tile shape the Triton
kernel's autotuner chooses from, timed one by one; with --against COMMIT, also the fp8 attention as it was at
that commit (its files read from git into a package of their own), for the speed of a change in one process; with
--schedules, also both Hopper kernels in each order their consumers can issue MMAs in (attention_hopper.SCHEDULES),
in turn.

    python benchmarks/attention_kernels.py --tokens 75600 32760 --tiles
    python benchmarks/attention_kernels.py --tokens 75600 32760 --schedules
    python benchmarks/attention_kernels.py --tokens 75600 32760 --against e5e10d2
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_report import gpu_file_name, gpu_report, write_report  # noqa: E402  (this folder)
from wan_opt.optim.attention import exact_attention_hopper, flash4_attention, flash4_available  # noqa: E402
from wan_opt.kernels.e4m3 import qk_scale  # noqa: E402
from wan_opt.optim.fp8_attention import (HOPPER_HEAD_DIM, _quantize_qkv, fp8_attention,  # noqa: E402
                                         hopper_kernel_available, padded_length, quantize_qkv)


REPO = Path(__file__).resolve().parent.parent
# The fp8 attention's files, each under the paths it had (newest first): module name -> paths
PREVIOUS = {"fp8_attention": ("wan_opt/optim/fp8_attention.py",), "fp8_qkv": ("wan_opt/kernels/fp8_qkv.py",),
            "fp8_attention_triton": ("wan_opt/kernels/fp8_attention_triton.py",),
            "attention_hopper": ("wan_opt/kernels/attention_hopper.py", "wan_opt/kernels/fp8_attention_hopper.py")}


def _git_show(commit: str, paths: tuple[str, ...]) -> str:
    for path in paths:
        shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout
    raise FileNotFoundError(f"none of {paths} at {commit}")


@functools.cache
def previous_fp8_attention(commit: str):
    """fp8_attention as it was at `commit`, beside today's: its files from git into a package of their own, their
    imports of each other and their custom ops' namespace renamed."""
    package = Path(tempfile.mkdtemp()) / "previous_attention"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, paths in PREVIOUS.items():
        source = _git_show(commit, paths)
        for other, other_paths in PREVIOUS.items():
            for other_path in other_paths:
                source = source.replace(other_path.removesuffix(".py").replace("/", "."), f"previous_attention.{other}")
        (package / f"{name}.py").write_text(source.replace('"wan_opt::', '"wan_opt_previous::'))
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("previous_attention.fp8_attention").fp8_attention


def tile_runs(q, k, v, flop: float, repeat: int) -> list[dict]:
    """The kernel under each of its autotuner's tile shapes, on operands quantised once."""
    from wan_opt.kernels.fp8_attention_triton import fp8_attention_kernel

    b, n, h, d = q.shape
    q16, k16, vt8, v_scale, v_mean, padded = quantize_qkv(q, k, v)
    out = torch.empty_like(q)
    runs = []
    for config in fp8_attention_kernel.configs:
        block_m = config.kwargs["BLOCK_M"]
        launch = lambda: fp8_attention_kernel.fn[(-(-padded // block_m), b * h)](  # noqa: E731
            q16, k16, vt8, v_scale, v_mean, out, n, h, padded, out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=d, QK_SCALE=qk_scale(d), num_warps=config.num_warps, num_stages=config.num_stages,
            **config.kwargs)
        ms = milliseconds(launch, repeat)
        runs.append({**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages,
                     "ms": round(ms, 2), "tflops": round(flop / ms / 1e9, 1)})
        print(json.dumps({"tokens": n, **runs[-1]}), flush=True)
    return runs


def cudnn_attention(q, k, v):
    """SDPA held to cuDNN's kernel, as a function of nothing for milliseconds()."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    return run


def milliseconds(fn, repeat: int) -> float:
    fn()  # compile, autotune, warm caches
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def schedule_runs(kernels: dict, reference, flop: float, repeat: int, rounds: int = 3) -> dict:
    """Each Hopper kernel, named by P V's type, in each of its schedules (attention_hopper.SCHEDULES) in turn,
    `rounds` times (the clock drifts at the power limit): the better time of each, its ratio to "overlap"'s, and how
    far its output is from "overlap"'s."""
    from wan_opt.kernels import attention_hopper

    default, found = dict(attention_hopper.SCHEDULE), {}
    try:
        for (name, pv_type), fn in kernels.items():
            schedules = attention_hopper.SCHEDULES[pv_type]
            times = {schedule: [] for schedule in schedules}
            for _ in range(rounds):
                for schedule in schedules:
                    attention_hopper.SCHEDULE[pv_type] = schedule
                    times[schedule].append(milliseconds(fn, repeat))
            outs = {}
            for schedule in schedules:
                attention_hopper.SCHEDULE[pv_type] = schedule
                outs[schedule] = fn().float()
            for schedule in schedules:
                label = f"{name}_{schedule.replace('+', '_')}"
                ms = min(times[schedule])
                found[f"{label}_ms"] = ms
                found[f"{label}_tflops"] = round(flop / ms / 1e9, 1)
                found[f"{label}_ms_all"] = [round(t, 3) for t in times[schedule]]
                found[f"{label}_speedup_vs_overlap"] = round(min(times["overlap"]) / ms, 4)
                found[f"{label}_rel_l2_vs_sdpa"] = float((outs[schedule] - reference).norm() / reference.norm())
                found[f"{label}_max_abs_vs_overlap"] = float((outs[schedule] - outs["overlap"]).abs().max())
    finally:
        attention_hopper.SCHEDULE.update(default)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[75_600, 32_760])
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--tiles", action="store_true", help="also time each tile shape of the fp8 kernel")
    parser.add_argument("--against", metavar="COMMIT", help="also time the fp8 attention as it was at COMMIT")
    parser.add_argument("--schedules", "--pingpong", action="store_true",
                        help="also time the Hopper kernels in each of their schedules, in turn (--pingpong: the "
                             "earlier name)")
    parser.add_argument("--suffix", default="", help="appended to the result file's name")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    previous = previous_fp8_attention(args.against) if args.against else None
    record = gpu_report(runs=[], against=args.against)
    for n in args.tokens:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, n, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        flop = 4 * n * n * args.head_dim * args.heads
        sdpa = lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))  # noqa: E731
        reference = sdpa().transpose(1, 2).float()
        hopper = args.head_dim == HOPPER_HEAD_DIM and hopper_kernel_available(q.device)
        try:
            out = fp8_attention(q, k, v, hopper=hopper).float()
        except Exception as error:  # noqa: BLE001  the Hopper kernel not compiling here: recorded, Triton timed
            if not hopper:
                raise
            record["hopper_error"] = f"{type(error).__name__}: {str(error)[-2000:]}"
            print(f"the Hopper kernel failed, timing the Triton one: {record['hopper_error']}", flush=True)
            hopper = False
            out = fp8_attention(q, k, v, hopper=False).float()
        run = {"tokens": n, "heads": args.heads, "head_dim": args.head_dim, "fp8_kernel": "hopper" if hopper else "triton",
               "sdpa_bf16_ms": milliseconds(sdpa, args.repeat),
               "fp8_with_quantisation_ms": milliseconds(lambda: fp8_attention(q, k, v, hopper=hopper), args.repeat),
               "quantisation_ms": milliseconds(lambda: quantize_qkv(q, k, v, hopper), args.repeat),
               # the same arithmetic in eager PyTorch (what a CPU runs; on a GPU, Triton kernels do it)
               "quantisation_pytorch_ms": milliseconds(
                   lambda: _quantize_qkv(q, k, v, padded_length(n), hopper), args.repeat),
               "fp8_rel_l2_vs_sdpa": float((out - reference).norm() / reference.norm())}
        run["fp8_kernel_ms"] = run["fp8_with_quantisation_ms"] - run["quantisation_ms"]
        names = ["sdpa_bf16", "fp8_with_quantisation", "fp8_kernel"]
        try:  # cuDNN's bf16 attention by name (SDPA's own choice above may differ by GPU and release)
            run["cudnn_bf16_ms"] = milliseconds(cudnn_attention(q, k, v), args.repeat)
            names.append("cudnn_bf16")
        except RuntimeError as error:
            run["cudnn_bf16_error"] = str(error)[-500:]
        if hopper:  # the Triton kernel on the same inputs, for comparison
            triton_kernel = lambda: fp8_attention(q, k, v, hopper=False)  # noqa: E731
            run["fp8_triton_kernel_ms"] = (milliseconds(triton_kernel, args.repeat)
                                           - milliseconds(lambda: quantize_qkv(q, k, v), args.repeat))
            run["fp8_triton_rel_l2_vs_sdpa"] = float((triton_kernel().float() - reference).norm() / reference.norm())
            names.append("fp8_triton_kernel")
        if hopper:  # wan-opt's exact bf16 kernel, the same warp-specialised design
            exact = lambda: exact_attention_hopper(q, k, v)  # noqa: E731
            try:
                run["hopper_bf16_ms"] = milliseconds(exact, args.repeat)
                run["hopper_bf16_rel_l2_vs_sdpa"] = float((exact().float() - reference).norm() / reference.norm())
                names.append("hopper_bf16")
            except Exception as error:  # noqa: BLE001  recorded; the other kernels' timings stand
                run["hopper_bf16_error"] = f"{type(error).__name__}: {str(error)[-2000:]}"
        if flash4_available():  # exact bf16 attention, when flash-attn-4 is installed
            flash4 = lambda: flash4_attention(q, k, v)  # noqa: E731
            run["flash4_bf16_ms"] = milliseconds(flash4, args.repeat)
            run["flash4_rel_l2_vs_sdpa"] = float((flash4().float() - reference).norm() / reference.norm())
            names.append("flash4_bf16")
        if previous:  # with its quantisation, as fp8_with_quantisation
            run["previous_fp8_with_quantisation_ms"] = milliseconds(lambda: previous(q, k, v), args.repeat)
            error = previous(q, k, v).float() - reference
            run["previous_fp8_rel_l2_vs_sdpa"] = float(error.norm() / reference.norm())
            names.append("previous_fp8_with_quantisation")
        for name in names:
            run[f"{name}_tflops"] = round(flop / run[f"{name}_ms"] / 1e9, 1)
        if args.schedules and hopper:
            run.update(schedule_runs({("hopper_bf16", "bf16"): lambda: exact_attention_hopper(q, k, v),
                                   ("fp8_with_quantisation", "int8"): lambda: fp8_attention(q, k, v, hopper=True)},
                                  reference, flop, args.repeat))
        if args.tiles:
            run["fp8_kernel_by_tile"] = tile_runs(q, k, v, flop, args.repeat)
        record["runs"].append(run)
        print(json.dumps(run), flush=True)
    write_report(record, Path(args.out) / gpu_file_name("attention_kernels", record, args.suffix))


if __name__ == "__main__":
    main()

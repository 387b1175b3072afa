"""One profile's CFG step with the Hopper kernel in each of several schedules, in one process on the same modules:
a schedule's speed inside the whole model, where attention_kernels.py --schedules times the kernel alone. Runs in
separate processes differ by a few percent, more than the schedules do, so the schedules take turns here (ABAB...)
after one untimed warm-up step, each turn a 1-step request (both experts' forwards, no decode).

    python benchmarks/schedule_step.py --profile h100 --schedules turns turns+overlap --rounds 2
    python benchmarks/schedule_step.py --profile h100,mode=fast --schedules overlap turns
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_report import gpu_file_name, gpu_report, write_report  # noqa: E402  (this folder)
from wan_opt.errors import WanOptError  # noqa: E402
from wan_opt.hardware import device_capability  # noqa: E402
from wan_opt.bench.measure import benched_policies, build, guidance_of, run_config, run_request  # noqa: E402
from wan_opt.kernels import attention_hopper  # noqa: E402
from wan_opt.optim.speed import attention_backend, installed_attention  # noqa: E402


def pv_type(cfg, capability: tuple[int, int], installed: set[str]) -> str:
    """The P V type of the Hopper kernel the profile's self-attention runs on this GPU, resolved as a run resolves
    it: int8 in fp8 attention (mode=fast), bf16 in the exact kernel. Refused where the run would not reach the
    Hopper kernel (auto picking FlashAttention-4, a named kernel, no Gluon): its schedules would change nothing."""
    choice = cfg.hardware.speed.attention
    backend = attention_backend(choice, capability, installed)
    if backend not in ("fp8", "hopper") or "hopper" not in installed:
        raise WanOptError(f"attention={choice} runs {backend or 'PyTorch SDPA'} here, not wan-opt's Hopper kernel, "
                          "so its schedules change nothing: use hardware.speed.attention=hopper or mode=fast on a "
                          "Hopper GPU.")
    return "int8" if backend == "fp8" else "bf16"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="h100", help="a profile with its overrides, as --profiles takes them")
    parser.add_argument("--schedules", nargs="+", default=["turns", "turns+overlap"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default="1280*720")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    profile, *own = args.profile.split(",")
    bench = argparse.Namespace(model="wan22_t2v_a14b", tiny=False, size=args.size, frames=args.frames, steps=1,
                               decode=False, picture=None, picture_path=None, two_experts=True, override=[])
    try:  # the checks a run makes before loading, and the schedules': one sentence, no traceback
        cfg = run_config(bench, own, profile)
        device = torch.device("cuda")
        kind = pv_type(cfg, device_capability(device), installed_attention(device))
        for schedule in args.schedules:
            attention_hopper.check_schedule(kind, schedule)
    except WanOptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from wan_opt.pipeline import WanOptPipeline

    torch.manual_seed(0)
    pipe, _ = build(bench, device, run_config(bench, [], baseline=True).model)
    memory, speed = benched_policies(cfg)
    ours = WanOptPipeline.from_diffusers(pipe, memory=memory, speed=speed)
    guidance = guidance_of(cfg)
    attention_hopper.SCHEDULE[kind] = args.schedules[0]
    run_request(ours, bench, device, guidance)  # compile and autotune, untimed
    seconds = {s: [] for s in args.schedules}
    for _ in range(args.rounds):
        for schedule in args.schedules:
            attention_hopper.SCHEDULE[kind] = schedule
            seconds[schedule].append(round(run_request(ours, bench, device, guidance)["seconds"], 3))
            print(f"{schedule}: {seconds[schedule][-1]} s", flush=True)
    best = {s: min(t) for s, t in seconds.items()}
    first = args.schedules[0]
    report = gpu_report(profile=args.profile, pv_type=kind, size=args.size, frames=args.frames,
                        request="one CFG step (both experts' forwards, text encoding included), no decode",
                        seconds=seconds, best_seconds=best,
                        speedup_vs_first={s: round(best[first] / b, 4) for s, b in best.items()})
    write_report(report, Path(args.out) / gpu_file_name("schedule_step", report, args.suffix))
    return 0


if __name__ == "__main__":
    sys.exit(main())

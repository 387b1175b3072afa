"""First-call time of a regionally compiled A14B expert, cold and warm, in two fresh processes.

The first process starts from an empty compile cache folder; the second uses the folder the first filled,
as a user's second run with the same shapes does. Each process builds one full-size expert (random
weights, bf16, on the GPU) under a hardware profile's speed knobs and times its first and second forward
on fixed inputs. The cold process also times the same forward uncompiled, and the deviation between them
(its seconds_to_first_forward_ready therefore includes two uncompiled forwards).

    python benchmarks/compile_cache.py --profile h100 --size 832*480 --frames 81
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def forward_inputs(size: str, frames: int, device):
    import torch

    from wan_opt.request import parse_size

    width, height = parse_size(size)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=gen)
    ctx = torch.randn(1, 512, 4096, generator=gen)
    return x.to(device, torch.bfloat16), torch.full((1,), 900.0, device=device), ctx.to(device, torch.bfloat16)


def one_process(args) -> dict:
    """Runs in a fresh interpreter: import, build, (eager forwards), compile, first and second forward."""
    import torch
    from hydra.utils import instantiate

    from wan_opt.app import compose_config
    from wan_opt.loading.arch import build_random_expert

    started = time.perf_counter()
    device = torch.device("cuda")
    cfg = compose_config([f"hardware.speed.compile_cache_dir={args.cache_dir}"], hardware=args.profile)
    speed = instantiate(cfg.hardware.speed)
    expert = build_random_expert("t2v_a14b", torch.bfloat16, device)
    inputs = forward_inputs(args.size, args.frames, device)

    def forward():
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = expert(*inputs, return_dict=False)[0]
        torch.cuda.synchronize()
        return out, time.perf_counter() - start

    record: dict = {}
    if args.eager:
        forward()  # cuDNN plans and allocator warm-up, as the compiled path gets below
        eager_out, record["eager_forward_seconds"] = forward()
    speed.apply([expert], device)
    ready = time.perf_counter()
    out, record["first_compiled_forward_seconds"] = forward()
    _, record["second_compiled_forward_seconds"] = forward()
    record["seconds_to_first_forward_ready"] = round(ready - started + record["first_compiled_forward_seconds"], 2)
    if args.eager:
        diff = (out.float() - eager_out.float()).norm() / eager_out.float().norm()
        record["compiled_vs_eager_rel_l2"] = float(diff)
        record["compile_speedup_per_forward"] = record["eager_forward_seconds"] / record["second_compiled_forward_seconds"]
    record["cache_files"] = sum(len(f) for _, _, f in os.walk(args.cache_dir))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="h100")
    parser.add_argument("--size", default="832*480")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args)))
        return

    from gpu_report import gpu_report, write_report  # (this folder)

    record = gpu_report(profile=args.profile, size=args.size, frames=args.frames)
    with tempfile.TemporaryDirectory(prefix="wan-opt-inductor-") as cache:
        base = [sys.executable, __file__, "--child", "--cache-dir", cache, "--profile", args.profile,
                "--size", args.size, "--frames", str(args.frames)]
        # Inductor's own default folder is per user in /tmp: keep it out so only our folder can be warm.
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        for name, extra in (("cold", ["--eager"]), ("warm", [])):
            done = subprocess.run(base + extra, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {name} process failed:\n{done.stderr[-4000:]}")
            record[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(name, record[name], flush=True)
    write_report(record, Path(args.out) / f"compile_cache_{args.profile}_{args.size.replace('*', 'x')}x{args.frames}.json")


if __name__ == "__main__":
    main()

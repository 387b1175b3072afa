"""End to end: the full-size Wan 2.2 architectures with random weights through WanOptPipeline, on one GPU or
several under torchrun.

Builds every module at full size (both A14B experts, UMT5-XXL, the Wan VAE) under a hardware profile, runs a
few denoising steps plus the decode at each size, and records seconds per stage, peak GPU memory and whether
the frames are finite. `--cap-gb` caps the process's GPU memory to emulate a smaller card. An image-to-video
model starts from a generated picture of each size (its VAE encode timed and its peak recorded too).

    python benchmarks/full_size_e2e.py --profile h100 --sizes 832*480 1280*720 --frames 81 --steps 2
    python benchmarks/full_size_e2e.py --profile rtx4090 --cap-gb 24 --model wan22_i2v_a14b --sizes 1280*720
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      torchrun --nproc-per-node 8 benchmarks/full_size_e2e.py --profile h100x8 --sizes 1280*720 --steps 2

Under torchrun every rank builds and runs; rank 0 records (its peak memory is one GPU's), in a file named by the
split (e.g. `_4gpus_cfg2_ulysses2`), and prints the whole record so a log alone keeps it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wan_opt import image as images  # noqa: E402
from wan_opt import parallel  # noqa: E402
from wan_opt.app import leave_process_group, library_versions  # noqa: E402
from wan_opt.pipeline import WanOptPipeline  # noqa: E402
from wan_opt.prepare import compose_config, plan_for, prepare  # noqa: E402
from wan_opt.request import parse_size  # noqa: E402

GIB = 2**30
OUTPUT_TYPE = "np"  # the Python API's default frames, float32: the most host memory a decoded video takes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="h100")
    parser.add_argument("--model", default="wan22_t2v_a14b")
    parser.add_argument("--sizes", nargs="+", default=["832*480", "1280*720"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cap-gb", type=float, default=None, help="cap GPU memory (GiB, as NVML reports a card) to emulate a smaller card")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides, e.g. hardware.speed.compile=none")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()

    total = torch.cuda.get_device_properties(0).total_memory
    largest = max(args.sizes, key=lambda size: np.prod(parse_size(size)))
    overrides = [f"model={args.model}", "model.random_weights=true", f"size={largest}", f"frames={args.frames}",
                 *args.override]
    # As `run.py` would: the profile's knobs where they fit, else the planner's; checked the same way.
    prepared = prepare(compose_config(overrides, hardware=args.profile), overrides, prompt_required=False)
    cfg, plan, decided = prepared.cfg, prepared.plan, prepared.decided
    in_use = [f"hardware.memory.{knob}={value}" for knob, value in plan.mechanisms.items()]
    print(f"plan for {largest}: {plan.mechanisms}, predicted peak {plan.predicted_peak_gpu_gb} GiB", flush=True)
    start = time.perf_counter()
    pipe = WanOptPipeline.from_prepared(prepared)
    torch.cuda.synchronize()
    # The cap comes after building: random weights are initialised on the GPU before moving to their place,
    # which a real checkpoint load does not need. Everything the run allocates is under the cap.
    if args.cap_gb:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * GIB / total))
    record = {
        "command": " ".join([launcher(), *sys.argv]), "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(total / GIB, 1), "cap_gb": args.cap_gb, "profile": args.profile,
        "model": args.model, "overrides": args.override, "versions": library_versions(),
        "plan": {"mechanisms": plan.mechanisms, "decided_by": decided, "vram_budget_gb": plan.vram_budget_gb,
                 "vae_dtype": str(cfg.hardware.memory.vae_dtype)},
        "gpus": parallel.world_size(), "parallel": pipe.parallel and vars(pipe.parallel.layout),
        "build_seconds": round(time.perf_counter() - start, 2),
        "weights_on_gpu_gib": round(torch.cuda.memory_allocated() / GIB, 2), "runs": [],
    }
    print(f"built in {record['build_seconds']} s, {record['weights_on_gpu_gib']} GiB on the GPU", flush=True)
    takes_image = images.image_use(cfg.model.family) is not None
    encode_peak = watch_vae_encode(pipe) if takes_image else {}
    for size in args.sizes:
        width, height = parse_size(size)
        at_size = [*overrides, *in_use, f"size={size}"]  # this size under the knobs in use
        picture = images.sample_picture(width, height) if takes_image else None  # its own size: nothing to fit
        predicted = plan_for(compose_config(at_size, hardware=args.profile), at_size)[0]
        torch.cuda.reset_peak_memory_stats()
        out = pipe("a red fox running through fresh snow", height=height, width=width, num_frames=args.frames,
                   num_inference_steps=args.steps, guidance_scale=cfg.model.guidance,
                   guidance_scale_2=cfg.model.guidance_2, generator=torch.Generator().manual_seed(0),
                   image=picture, output_type=OUTPUT_TYPE)
        frames = np.asarray(out.frames)
        run = {"size": size, "frames": args.frames, "steps": args.steps, "output_type": OUTPUT_TYPE,
               "stage_seconds": {k: round(v, 2) for k, v in out.stage_seconds.items()},
               "step_seconds": [round(s, 2) for s in out.step_seconds],
               "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
               "predicted_peak_gpu_gib": predicted.predicted_peak_gpu_gb, "predicted_stages_gib": predicted.stages,
               "output_shape": list(frames.shape), "finite": bool(np.isfinite(frames).all()),
               "pixel_std": round(float(frames.std()), 4)}
        if takes_image:  # the peak up to the end of the VAE encode (the text encoding's included)
            run["peak_through_vae_encode_gib"] = encode_peak.get("gib")
        record["runs"].append(run)
        print(json.dumps(run), flush=True)
    leave_process_group()
    if not parallel.is_main_process():
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (f"e2e_{args.model}_{args.profile}" + (f"_cap{args.cap_gb:g}" if args.cap_gb else "")
            + (f"_{parallel.world_size()}gpus_{layout_name(pipe.parallel.layout)}" if pipe.parallel else "") + ".json")
    (out_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir / name}: {json.dumps(record)}")


def watch_vae_encode(pipe) -> dict:
    """{"gib": peak GPU memory when the VAE's encode returns}, filled at every encode from now on."""
    seen, encode = {}, pipe.vae.encode

    def watched(*args, **kwargs):
        result = encode(*args, **kwargs)
        torch.cuda.synchronize()
        seen["gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        return result

    pipe.vae.encode = watched
    return seen


def launcher() -> str:
    return f"torchrun --nproc-per-node {parallel.world_size()}" if parallel.world_size() > 1 else "python"


def layout_name(layout: parallel.Layout) -> str:
    """e.g. cfg2_ulysses2, ring2_fsdp: the degrees above one, so runs of one GPU count do not collide."""
    degrees = [f"{kind}{degree}" for kind, degree in
               (("cfg", layout.cfg), ("ulysses", layout.ulysses), ("ring", layout.ring)) if degree > 1]
    return "_".join(degrees + ["fsdp"] * layout.shard)


if __name__ == "__main__":
    main()

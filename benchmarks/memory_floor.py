"""The memory floor on a big GPU: a model from checkpoint files under a VRAM cap, with the host RAM the process
takes measured (and capped, where a control group can be made), beside the resident 80 GB plan. Two models:

- `a14b`: Wan2.2-T2V-A14B at 1280*720 x 81 with 24 GB of VRAM and 32 GB of host RAM (rtx4090) and with 16 GB and
  32 GB (rtx_16gb).
- `ti2v5b`: Wan2.2-TI2V-5B at 1280*704 x 121 with 12 GB of VRAM and 16 GB of host RAM (rtx_12gb).

`write` puts a full-size model with random weights on disk in the Diffusers layout. A14B: one bf16 expert's shards
(26.6 GiB) serve both expert folders as hard links (one copy on disk; the files the Wan team releases hold each
expert in float32, twice these bytes), UMT5-XXL in bf16 (10.6 GiB), the Wan 2.1 VAE: 38 GiB. TI2V-5B: its one
DiT in bf16 (9.3 GiB; 30 layers of width 3072, 48 latent channels), the same UMT5-XXL, the Wan 2.2 VAE (z_dim 48)
in float32 (2.6 GiB): 22.5 GiB. Both with a character tokenizer (token ids only: random weights make noise).
`run` plans one profile under a VRAM cap for a host RAM size, loads from those files, runs two steps (for A14B the
boundary at 0.95 so that both experts run) and the decode, and writes a record
benchmarks/results/e2e_<model>_<profile>_cap<N>_host<M>_files.json beside the other end-to-end ones
(tests/test_plan.py checks every prediction in them within 10%). Each run samples its own resident set (VmRSS) and
the machine's MemAvailable every 20 ms from before torch is imported: the host peak is the larger of the two, so
pinned memory counts however the driver maps it. `suite` runs `write` if needed and then each run in a process of
its own, under `systemd-run -p MemoryMax=` where that works (else measured only, which the record says), and
`summary` (which `suite` ends with) writes memory_floor_summary.json from every e2e_*_files.json record in the
folder: the seconds per step of each plan against the same model's resident one.

Disk: the two checkpoints (38 and 22.5 GiB) do not both fit a 64 GiB disk. Before it writes one, `suite` removes
checkpoints this script wrote for the other model where the disk is short, and a suite of several models removes
each checkpoint once its runs are done (`--keep` keeps them). Only folders carrying this script's marker file
(memory_floor.json) are ever removed.

    python benchmarks/memory_floor.py write --model a14b                        # ~1.5 min, 38 GiB
    python benchmarks/memory_floor.py run --model a14b --profile rtx4090 --cap-gb 24 --host-gb 32
    python benchmarks/memory_floor.py suite --models a14b                       # ~6 min
    python benchmarks/memory_floor.py suite --models ti2v5b                     # ~5 min (estimated), 22.5 GiB
    python benchmarks/memory_floor.py summary --out benchmarks/results          # the summary of every record there
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
ROOT = Path(__file__).resolve().parent.parent
# The Python API's default frames, float32: the most host memory a decoded video takes (the planner counts it)
OUTPUT_TYPE = "np"
MARKER = "memory_floor.json"  # in every checkpoint this script writes: what `suite` may remove


@dataclass(frozen=True)
class Model:
    name: str  # conf/model preset
    family: str
    ckpt: Path  # where `write` puts it by default
    size: str
    frames: int
    disk_gib: float  # what `write` puts on the disk
    # (profile, VRAM cap GiB, host RAM GB): the floors the issue asks for, then the resident plan they are timed
    # against (the `h100` profile under an 80 GiB cap)
    suite: tuple[tuple[str, float, float], ...]
    knobs: tuple[str, ...] = ()  # overrides of every run
    layout: str = ""


MODELS = {
    "a14b": Model("wan22_t2v_a14b", "t2v_a14b", Path("/tmp/wan-a14b-random"), "1280*720", 81, 38.0,
                  (("rtx4090", 24, 32), ("rtx_16gb", 16, 32), ("h100", 80, 32)), ("model.boundary=0.95",),
                  "diffusers, bf16 experts (one copy)"),
    "ti2v5b": Model("wan22_ti2v_5b", "ti2v_5b", Path("/tmp/wan-ti2v5b-random"), "1280*704", 121, 22.5,
                    (("rtx_12gb", 12, 16), ("h100", 80, 32)), (), "diffusers, bf16 DiT"),
}
RESIDENT = "h100"


def record_name(model: Model, profile: str, cap: float, host: float) -> str:
    return f"e2e_{model.name}_{profile}_cap{cap:g}_host{host:g}_files.json"


def _kib(path: str, key: str) -> int:
    with open(path) as file:
        return next(int(line.split()[1]) for line in file if line.startswith(key + ":"))


class HostMonitor(threading.Thread):
    """The process's resident set and the machine's MemAvailable, sampled every 20 ms, peak per stage (GiB).
    Started before torch is imported, so that the drop in MemAvailable is this process's whole footprint."""

    def __init__(self):
        super().__init__(daemon=True)
        self.available_at_start = _kib("/proc/meminfo", "MemAvailable")
        self.stage, self.peaks, self.running = "start", {}, True
        self.on_stage = None  # called with the stage that ends (the GPU's peaks are taken there)

    def sample(self) -> tuple[float, float]:
        rss = _kib("/proc/self/status", "VmRSS") / 2**20
        drop = (self.available_at_start - _kib("/proc/meminfo", "MemAvailable")) / 2**20
        return rss, drop

    def run(self):
        while self.running:
            rss, drop = self.sample()
            old = self.peaks.get(self.stage, (0.0, 0.0))
            self.peaks[self.stage] = (max(old[0], rss), max(old[1], drop))
            time.sleep(0.02)

    def enter(self, stage: str) -> None:
        if stage != self.stage:
            if self.on_stage:
                self.on_stage(self.stage)
            self.stage = stage

    def stop(self) -> dict:
        self.enter("end")
        self.running = False
        self.join()
        return {stage: {"rss_gib": round(rss, 2), "available_drop_gib": round(drop, 2),
                        "peak_gib": round(max(rss, drop), 2)} for stage, (rss, drop) in self.peaks.items()}


# -- write ------------------------------------------------------------------------------------------------------


def write_checkpoint(folder: Path, model: Model, device: str = "cuda", shapes: dict | None = None) -> None:
    """A random `model` in the Diffusers layout (see the module's docstring), written to `folder`. `shapes`
    (dit, text_encoder, vae configs) replaces the full-size ones: the tests write a tiny one on the CPU."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    sys.path.insert(0, str(ROOT))
    from wan_opt.convert import write_scheduler_and_index
    from wan_opt.loading.arch import DIT_CONFIGS, UMT5_XXL, VAE_CONFIGS, _building
    from wan_opt.loading.modules import cast_module
    from wan_opt.loading.tiny import tiny_tokenizer

    shapes = shapes or {"dit": DIT_CONFIGS[model.family], "text_encoder": UMT5_XXL, "vae": VAE_CONFIGS[model.family]}
    where = torch.device(device)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    with _building(where, torch.bfloat16):
        dit = cast_module(WanTransformer3DModel(**shapes["dit"]), torch.bfloat16).eval().requires_grad_(False)
    dit.save_pretrained(partial / "transformer", max_shard_size="5GB")
    del dit
    if model.family != "ti2v_5b":  # the same bytes under the second expert's name
        (partial / "transformer_2").mkdir()
        for file in (partial / "transformer").iterdir():
            os.link(file, partial / "transformer_2" / file.name)
    with _building(where, torch.bfloat16):
        encoder = UMT5EncoderModel(UMT5Config(**shapes["text_encoder"]))
    encoder.save_pretrained(partial / "text_encoder", max_shard_size="5GB")
    del encoder
    if where.type == "cuda":
        torch.cuda.empty_cache()
    with _building(where, torch.float32):
        AutoencoderKLWan(**shapes["vae"]).save_pretrained(partial / "vae")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(partial / "tokenizer")
    write_scheduler_and_index(partial, model.family, type(tokenizer))
    (partial / MARKER).write_text(json.dumps({"written_by": "benchmarks/memory_floor.py", "model": model.name,
                                              "weights": "random"}) + "\n")
    os.replace(partial, folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "transformer_2" not in f.parts)
    print(f"wrote {folder}: {size / GIB:.1f} GiB on disk in {time.perf_counter() - start:.0f} s", flush=True)


def written_here(folder: Path) -> bool:
    """Whether `folder` is a checkpoint this script wrote (random weights), which `suite` may remove."""
    return (folder / MARKER).is_file()


def remove_checkpoint(folder: Path) -> None:
    if written_here(folder):
        print(f"removing {folder} (random weights written by this script)", flush=True)
        shutil.rmtree(folder)


def make_room(folder: Path, model: Model, others: list[Path]) -> None:
    """Before `model` is written to `folder`: if the disk is short, remove the checkpoints of `others` this script
    wrote; if it is still short, stop with a sentence."""
    parent = next(p for p in (folder, *folder.parents) if p.exists())
    need = model.disk_gib + 2.0  # the partial folder's files and some slack
    for other in others:
        if shutil.disk_usage(parent).free / GIB >= need:
            return
        if other != folder:
            remove_checkpoint(other)
    free = shutil.disk_usage(parent).free / GIB
    if free < need:
        sys.exit(f"{parent} has {free:.1f} GiB free and {model.name}'s random checkpoint needs {need:.1f}: remove "
                 f"another checkpoint (e.g. {', '.join(map(str, others)) or 'an older one'}) first.")


# -- run --------------------------------------------------------------------------------------------------------


def instrument(pipe, monitor: HostMonitor, reads: list, cold: bool) -> None:
    """Label the stages as the pipeline reaches them, and time each read from the checkpoint's files."""
    memory, source = pipe.memory, pipe.weight_source
    activate, encode, decode = memory.activate_expert, pipe.encode_prompts, pipe.decode

    def activate_expert(pipe_, expert):
        stage = "denoise_high_noise" if expert is pipe.transformer else "denoise_low_noise"
        if monitor.stage.startswith("denoise") and monitor.stage != stage:
            monitor.enter("switch")  # the next expert's read, where there is one
        elif not monitor.stage.startswith("denoise"):
            monitor.enter(stage)  # the first expert's read belongs to its first step
        activate(pipe_, expert)
        monitor.enter(stage)

    def encode_prompts(*args, **kwargs):
        monitor.enter("encode")
        return encode(*args, **kwargs)

    def decode_(*args, **kwargs):
        monitor.enter("decode")
        return decode(*args, **kwargs)

    memory.activate_expert, pipe.encode_prompts, pipe.decode = activate_expert, encode_prompts, decode_
    if source is None:
        return
    read = source.read

    def timed_read(role, *args):
        files = source.files(role)
        if cold:  # evict the files from the page cache first: the read comes from the disk
            for file in files:
                with open(file, "rb") as handle:
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        read(role, *args)
        reads.append({"role": role, "stage": monitor.stage, "seconds": round(time.perf_counter() - start, 2),
                      "gib": round(sum(f.stat().st_size for f in files) / GIB, 2)})

    source.read = timed_read


def run(args) -> Path:
    model = MODELS[args.model]
    monitor = HostMonitor()
    monitor.start()
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from wan_opt.app import library_versions
    from wan_opt.memory.budget import cgroup_memory_limit
    from wan_opt.pipeline import WanOptPipeline
    from wan_opt.prepare import compose_config, prepare
    from wan_opt.request import parse_size

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * GIB / total))  # before the first allocation
    gpu_stages, reserved = {}, {}

    def gpu_peak(stage: str) -> None:
        gpu_stages[stage] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        reserved[stage] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        torch.cuda.reset_peak_memory_stats()

    monitor.on_stage = gpu_peak
    knobs = [f"hardware.memory.host_ram_gb={args.host_gb:g}", "hardware.speed.compile=none", *model.knobs,
             *args.override]
    size, frames = args.size or model.size, args.frames or model.frames
    overrides = [f"model={model.name}", f"model.ckpt_dir={args.ckpt}", f"size={size}", f"frames={frames}", *knobs]
    base_gib = monitor.sample()[0]
    prepared = prepare(compose_config(overrides, hardware=args.profile), overrides, prompt_required=False)
    plan = prepared.plan
    print(f"{args.profile} under {args.cap_gb} GiB, planned for {args.host_gb:g} GB of host RAM: {plan.mechanisms}; "
          f"GPU {plan.predicted_peak_gpu_gb} GiB, host {plan.predicted_host_gb} GiB predicted", flush=True)
    monitor.enter("load")
    start = time.perf_counter()
    pipe = WanOptPipeline.from_prepared(prepared)
    load_seconds = time.perf_counter() - start
    reads: list = []
    instrument(pipe, monitor, reads, args.cold)
    width, height = parse_size(size)
    cfg = prepared.cfg
    out = pipe("a red fox running through fresh snow", negative_prompt=cfg.model.negative_prompt, height=height,
               width=width, num_frames=frames, num_inference_steps=args.steps, guidance_scale=cfg.model.guidance,
               guidance_scale_2=cfg.model.guidance_2, generator=torch.Generator().manual_seed(0),
               max_sequence_length=cfg.model.text_len, output_type=OUTPUT_TYPE)
    video = np.asarray(out.frames)
    host = monitor.stop()
    hwm = _kib("/proc/self/status", "VmHWM") / 2**20
    limit = cgroup_memory_limit()
    run_record = {
        "size": size, "frames": frames, "steps": args.steps, "output_type": OUTPUT_TYPE,
        "stage_seconds": {k: round(v, 2) for k, v in out.stage_seconds.items()},
        "step_seconds": [round(s, 2) for s in out.step_seconds], "reads": reads,
        "peak_gpu_gib": max(gpu_stages.values()), "peak_reserved_gib": max(reserved.values()),
        "gpu_stages_gib": gpu_stages, "reserved_stages_gib": reserved,
        "predicted_peak_gpu_gib": plan.predicted_peak_gpu_gb, "predicted_stages_gib": plan.stages,
        "peak_host_gib": max(stage["peak_gib"] for stage in host.values()), "vm_hwm_gib": round(hwm, 2),
        "host_stages_gib": host, "predicted_host_gib": plan.predicted_host_gb,
        "predicted_host_stages_gib": plan.host_stages, "host_base_before_loading_gib": round(base_gib, 2),
        "output_shape": list(video.shape), "finite": bool(np.isfinite(video).all()),
    }
    record = {
        "command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(total / GIB, 1), "cap_gb": args.cap_gb, "profile": args.profile,
        "model": model.name, "ckpt_dir": str(args.ckpt), "ckpt_layout": model.layout,
        "overrides": knobs, "versions": library_versions(),
        "host_ram": (f"capped by the control group at {limit / GIB:.1f} GiB" if limit else
                     "measured, not capped: the plan is for the host RAM above"),
        "cold_reads": args.cold,
        "plan": {"mechanisms": plan.mechanisms, "decided_by": prepared.decided, "vram_budget_gb": plan.vram_budget_gb,
                 "host_ram_gb": plan.host_ram_gb, "read_gb_per_request": plan.read_gb_per_request,
                 "vae_dtype": str(prepared.cfg.hardware.memory.vae_dtype)},
        "load_seconds": round(load_seconds, 2), "gpus": 1, "runs": [run_record],
    }
    path = Path(args.out) / record_name(model, args.profile, args.cap_gb, args.host_gb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(run_record), flush=True)
    print(f"wrote {path}", flush=True)
    return path


# -- suite ------------------------------------------------------------------------------------------------------


def host_cap_prefix(gb: float) -> list[str]:
    """`systemd-run ... -p MemoryMax=` where this machine can make such a scope; else nothing (measured only)."""
    for scope in (["systemd-run", "--scope", "--quiet"], ["systemd-run", "--user", "--scope", "--quiet"]):
        if shutil.which("systemd-run") and subprocess.run([*scope, "true"], capture_output=True).returncode == 0:
            return [*scope, "-p", f"MemoryMax={gb:g}G", "--"]
    return []


def suite(args) -> None:
    keys = [key.strip() for key in args.models.split(",") if key.strip()]
    if unknown := [key for key in keys if key not in MODELS]:
        sys.exit(f"--models takes {', '.join(MODELS)}, not {', '.join(unknown)}")
    if args.ckpt is not None and len(keys) > 1:
        sys.exit("--ckpt names one checkpoint: with several --models each goes to its own default folder")
    folders = {key: args.ckpt if args.ckpt is not None else MODELS[key].ckpt for key in keys}
    everyone = [m.ckpt for m in MODELS.values()] + [f for f in folders.values() if f not in
                                                     [m.ckpt for m in MODELS.values()]]
    for index, key in enumerate(keys):
        model, folder = MODELS[key], folders[key]
        if not (folder / "model_index.json").is_file():
            make_room(folder, model, [f for f in everyone if f != folder])
            write_checkpoint(folder, model)
        for profile, cap, host in model.suite:
            if args.profiles and profile not in args.profiles.split(","):
                continue
            command = [*host_cap_prefix(host), sys.executable, __file__, "run", "--model", key, "--ckpt", str(folder),
                       "--profile", profile, "--cap-gb", f"{cap:g}", "--host-gb", f"{host:g}", "--out", args.out,
                       *(["--cold"] * args.cold)]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
        if len(keys) > 1 and not args.keep and index < len(keys) - 1:
            remove_checkpoint(folder)  # the next model's checkpoint needs the disk
    summarize(Path(args.out), " ".join(["python", *sys.argv]))


def summarize(out: Path, command: str) -> Path:
    """memory_floor_summary.json from every record of this benchmark in `out`: per model and profile the plan, the
    seconds of each step against the same model's resident plan (`h100`), the reads inside the steps, and the GPU
    and host peaks beside their predictions."""
    records = [json.loads(path.read_text()) for path in sorted(out.glob("e2e_*_files.json"))]
    summary: dict = {}
    for r in records:
        one = r["runs"][0]
        resident = next((x["runs"][0]["step_seconds"] for x in records
                         if x["model"] == r["model"] and x["profile"] == RESIDENT), None)
        roles = sorted({x["role"] for x in one["reads"] if x["role"] != "text_encoder"})
        summary.setdefault(r["model"], {})[r["profile"]] = {
            "cap_gb": r["cap_gb"], "host_ram_gb": r["plan"]["host_ram_gb"], "size": one["size"],
            "frames": one["frames"], "mechanisms": r["plan"]["mechanisms"], "step_seconds": one["step_seconds"],
            "stage_seconds": one["stage_seconds"], "load_seconds": r["load_seconds"],
            "read_seconds_in_steps": {role: round(sum(x["seconds"] for x in one["reads"] if x["role"] == role
                                                      and x["stage"].startswith(("denoise", "switch"))), 2)
                                      for role in roles},
            "step_ratio_to_resident": ([round(s / b, 3) for s, b in zip(one["step_seconds"], resident)]
                                       if resident else None),
            "peak_gpu_gib": one["peak_gpu_gib"], "predicted_peak_gpu_gib": one["predicted_peak_gpu_gib"],
            "peak_reserved_gib": one["peak_reserved_gib"], "peak_host_gib": one["peak_host_gib"],
            "predicted_host_gib": one["predicted_host_gib"], "host_ram": r["host_ram"], "finite": one["finite"],
        }
    path = out / "memory_floor_summary.json"
    path.write_text(json.dumps({"command": command, "runs": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("write", "run", "suite", "summary"):
        each = sub.add_parser(name)
        each.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
        if name == "summary":
            continue
        each.add_argument("--ckpt", type=Path, default=None, help="the checkpoint's folder (default: the model's)")
        each.add_argument("--cold", action="store_true", help="evict each file from the page cache before it is read")
        if name == "suite":
            each.add_argument("--models", default="a14b", help=f"comma-separated: {', '.join(MODELS)}")
            each.add_argument("--profiles", default="", help="comma-separated: only these of each model's runs")
            each.add_argument("--keep", action="store_true",
                              help="with several models, keep each checkpoint after its runs")
        else:
            each.add_argument("--model", choices=sorted(MODELS), default="a14b")
        if name == "run":
            each.add_argument("--profile", required=True)
            each.add_argument("--cap-gb", type=float, required=True, help="VRAM cap (GiB) emulating a smaller card")
            each.add_argument("--host-gb", type=float, default=32, help="host RAM the plan is made for (GB)")
            each.add_argument("--size", default=None, help="W*H (default: the model's, 1280*720 or 1280*704)")
            each.add_argument("--frames", type=int, default=None, help="default: the model's, 81 or 121")
            each.add_argument("--steps", type=int, default=2)
            each.add_argument("--override", nargs="*", default=[])
    args = parser.parse_args()
    if args.command in ("write", "run") and args.ckpt is None:
        args.ckpt = MODELS[args.model].ckpt
    if args.command == "write":
        write_checkpoint(args.ckpt, MODELS[args.model])
    elif args.command == "run":
        run(args)
    elif args.command == "suite":
        suite(args)
    else:
        summarize(Path(args.out), " ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()

"""The memory floor on a big GPU: A14B at 1280*720 x 81 from checkpoint files, under a VRAM cap, with the host
RAM the process takes measured (and capped, where a control group can be made), beside the resident 80 GB plan.

`write` puts a full-size T2V-A14B with random weights on disk in the Diffusers layout: one bf16 expert's shards
(26.6 GiB) serve both expert folders as hard links (one copy on disk; the files the Wan team releases hold each
expert in float32, twice these bytes), UMT5-XXL in bf16 (10.6 GiB), the Wan 2.1 VAE, a character tokenizer (token
ids only: random weights make noise). `run` plans one profile under a VRAM cap for a host RAM size, loads from those
files, runs two steps (the boundary at 0.95 so that both experts run) and the decode, and writes a record
benchmarks/results/e2e_*.json beside the other end-to-end ones (tests/test_plan.py checks every prediction in
them within 10%). Each run samples its own resident set (VmRSS) and the machine's MemAvailable every 20 ms from
before torch is imported: the host peak is the larger of the two, so pinned memory counts however the driver maps
it. `suite` runs `write` if needed and then each run in a process of its own, under `systemd-run -p MemoryMax=`
where that works (else measured only, which the record says), and writes the seconds per step of each plan
against the resident one.

    python benchmarks/memory_floor.py write --ckpt /tmp/wan-a14b-random                    # ~1.5 min, 38 GiB
    python benchmarks/memory_floor.py run --ckpt /tmp/wan-a14b-random --profile rtx4090 --cap-gb 24 --host-gb 32
    python benchmarks/memory_floor.py suite --ckpt /tmp/wan-a14b-random                    # all of it, ~8 min
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
from pathlib import Path

GIB = 2**30
ROOT = Path(__file__).resolve().parent.parent
# (profile, VRAM cap GiB, host RAM GB): the two floors the issue asks for, and the resident plan they are timed against
SUITE = (("rtx4090", 24, 32), ("rtx_16gb", 16, 32), ("h100", 80, 32))


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


def write_checkpoint(folder: Path) -> None:
    """A full-size random T2V-A14B in the Diffusers layout (see the module's docstring), written to `folder`."""
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    sys.path.insert(0, str(ROOT))
    from wan_opt.convert import write_model_index
    from wan_opt.loading.arch import UMT5_XXL, _building, build_random_expert
    from wan_opt.loading.modules import scheduler_for
    from wan_opt.loading.tiny import tiny_tokenizer

    cuda = torch.device("cuda")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    expert = build_random_expert("t2v_a14b", torch.bfloat16, cuda)
    expert.save_pretrained(partial / "transformer", max_shard_size="5GB")
    del expert
    (partial / "transformer_2").mkdir()
    for file in (partial / "transformer").iterdir():  # the same bytes under the second expert's name
        os.link(file, partial / "transformer_2" / file.name)
    with _building(cuda, torch.bfloat16):
        encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    encoder.save_pretrained(partial / "text_encoder", max_shard_size="5GB")
    del encoder
    torch.cuda.empty_cache()
    with _building(cuda, torch.float32):
        AutoencoderKLWan().save_pretrained(partial / "vae")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(partial / "tokenizer")
    scheduler_for(12.0).save_pretrained(partial / "scheduler")
    write_model_index(partial, "t2v_a14b", type(tokenizer))
    os.replace(partial, folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "transformer_2" not in f.parts)
    print(f"wrote {folder}: {size / GIB:.1f} GiB on disk in {time.perf_counter() - start:.0f} s", flush=True)


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
    knobs = [f"hardware.memory.host_ram_gb={args.host_gb:g}", "hardware.speed.compile=none", "model.boundary=0.95",
             *args.override]
    overrides = ["model=wan22_t2v_a14b", f"model.ckpt_dir={args.ckpt}", f"size={args.size}", f"frames={args.frames}",
                 *knobs]
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
    width, height = parse_size(args.size)
    cfg = prepared.cfg
    out = pipe("a red fox running through fresh snow", negative_prompt=cfg.model.negative_prompt, height=height,
               width=width, num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=cfg.model.guidance,
               guidance_scale_2=cfg.model.guidance_2, generator=torch.Generator().manual_seed(0),
               max_sequence_length=cfg.model.text_len)
    frames = np.asarray(out.frames)
    host = monitor.stop()
    hwm = _kib("/proc/self/status", "VmHWM") / 2**20
    limit = cgroup_memory_limit()
    run_record = {
        "size": args.size, "frames": args.frames, "steps": args.steps,
        "stage_seconds": {k: round(v, 2) for k, v in out.stage_seconds.items()},
        "step_seconds": [round(s, 2) for s in out.step_seconds], "reads": reads,
        "peak_gpu_gib": max(gpu_stages.values()), "peak_reserved_gib": max(reserved.values()),
        "gpu_stages_gib": gpu_stages, "reserved_stages_gib": reserved,
        "predicted_peak_gpu_gib": plan.predicted_peak_gpu_gb, "predicted_stages_gib": plan.stages,
        "peak_host_gib": max(stage["peak_gib"] for stage in host.values()), "vm_hwm_gib": round(hwm, 2),
        "host_stages_gib": host, "predicted_host_gib": plan.predicted_host_gb,
        "predicted_host_stages_gib": plan.host_stages, "host_base_before_loading_gib": round(base_gib, 2),
        "output_shape": list(frames.shape), "finite": bool(np.isfinite(frames).all()),
    }
    record = {
        "command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(total / GIB, 1), "cap_gb": args.cap_gb, "profile": args.profile,
        "model": "wan22_t2v_a14b", "ckpt_dir": str(args.ckpt), "ckpt_layout": "diffusers, bf16 experts (one copy)",
        "overrides": knobs, "versions": library_versions(),
        "host_ram": (f"capped by the control group at {limit / GIB:.1f} GiB" if limit else
                     "measured, not capped: the plan is for the host RAM above"),
        "cold_reads": args.cold,
        "plan": {"mechanisms": plan.mechanisms, "decided_by": prepared.decided, "vram_budget_gb": plan.vram_budget_gb,
                 "host_ram_gb": plan.host_ram_gb, "read_gb_per_request": plan.read_gb_per_request},
        "load_seconds": round(load_seconds, 2), "gpus": 1, "runs": [run_record],
    }
    name = f"e2e_wan22_t2v_a14b_{args.profile}_cap{args.cap_gb:g}_host{args.host_gb:g}_files.json"
    path = Path(args.out) / name
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
    if not (Path(args.ckpt) / "model_index.json").is_file():
        write_checkpoint(Path(args.ckpt))
    records = {}
    for profile, cap, host in SUITE:
        command = [*host_cap_prefix(host), sys.executable, __file__, "run", "--ckpt", str(args.ckpt), "--profile",
                   profile, "--cap-gb", str(cap), "--host-gb", str(host), "--out", args.out, *(["--cold"] * args.cold)]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
        name = f"e2e_wan22_t2v_a14b_{profile}_cap{cap:g}_host{host:g}_files.json"
        records[profile] = json.loads((Path(args.out) / name).read_text())
    resident = records["h100"]["runs"][0]["step_seconds"]
    summary = {profile: {"cap_gb": r["cap_gb"], "mechanisms": r["plan"]["mechanisms"],
                         "step_seconds": r["runs"][0]["step_seconds"],
                         "read_seconds_in_steps": [sum(x["seconds"] for x in r["runs"][0]["reads"]
                                                       if x["stage"].startswith(("denoise", "switch"))
                                                       and x["role"] == role)
                                                   for role in ("transformer", "transformer_2")],
                         "step_ratio_to_resident": [round(s / b, 3) for s, b in zip(r["runs"][0]["step_seconds"],
                                                                                      resident)],
                         "peak_gpu_gib": r["runs"][0]["peak_gpu_gib"], "peak_host_gib": r["runs"][0]["peak_host_gib"],
                         "host_ram": r["host_ram"]} for profile, r in records.items()}
    path = Path(args.out) / "memory_floor_summary.json"
    path.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "runs": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("write", "run", "suite"):
        each = sub.add_parser(name)
        each.add_argument("--ckpt", type=Path, default=Path("/tmp/wan-a14b-random"))
        each.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
        each.add_argument("--cold", action="store_true", help="evict each file from the page cache before it is read")
        if name == "run":
            each.add_argument("--profile", required=True)
            each.add_argument("--cap-gb", type=float, required=True, help="VRAM cap (GiB) emulating a smaller card")
            each.add_argument("--host-gb", type=float, default=32, help="host RAM the plan is made for (GB)")
            each.add_argument("--size", default="1280*720")
            each.add_argument("--frames", type=int, default=81)
            each.add_argument("--steps", type=int, default=2)
            each.add_argument("--override", nargs="*", default=[])
    args = parser.parse_args()
    if args.command == "write":
        write_checkpoint(args.ckpt)
    elif args.command == "run":
        run(args)
    else:
        suite(args)


if __name__ == "__main__":
    main()

"""The command line's job: a prepared run -> the pipeline -> the video and its sidecar; batches and sweeps.

wan_opt.cli adds the detected profile to the command line and hands Hydra's config to `run`.
"""
from __future__ import annotations

import importlib.metadata
import logging
import platform
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from wan_opt import batch, console, hardware, interrupts, video
from wan_opt.checks import is_multirun
from wan_opt.config import AUTO_PROFILE
from wan_opt.errors import WanOptError
from wan_opt.prepare import HARDWARE_OVERRIDE, Prepared, detection_record, leaner, prepare, resolve_hardware
from wan_opt.request import text_as_data

log = logging.getLogger(__name__)

_REMOTE_LAUNCHER = re.compile(r"^hydra/launcher=(?!basic$)")


def with_detected_hardware(argv: Sequence[str]) -> tuple[list[str], dict | None]:
    """Add `hardware=<detected>` unless the user gave one, so Hydra records the choice like any other; returns
    the new argv and the detection behind it (None when the user chose, or the job runs elsewhere).

    Jobs that a launcher runs on other machines get `hardware=auto`, resolved on the machine that runs them.
    """
    argv = list(argv)
    if any(HARDWARE_OVERRIDE.match(arg) for arg in argv[1:]):
        return argv, None
    remote = any(_REMOTE_LAUNCHER.match(arg) for arg in argv[1:])
    detected = None if remote else detection_record()
    profile = AUTO_PROFILE if remote else detected["profile"]
    # argparse takes the overrides as one run of positionals: join the user's run, or lead if there is none.
    at = next((i for i, arg in enumerate(argv[1:], 1) if "=" in arg and not arg.startswith("-")), 1)
    return argv[:at] + [f"hardware={profile}"] + argv[at:], detected


def output_folder(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs")


def library_versions() -> dict[str, str]:
    import diffusers
    import hydra
    import torch
    import transformers

    import wan_opt

    versions = {"wan_opt": wan_opt.__version__, "python": platform.python_version(), "torch": torch.__version__,
                "cuda": str(torch.version.cuda), "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "hydra": hydra.__version__}
    for package in ("flash-attn-4", "flash_attn_3", "sageattention"):  # attention kernels used where installed
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def peak_resident_gib() -> float:
    """This process's peak resident set so far (the kernel's high-water mark), beside the plan's host prediction."""
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, 2)


def gpu_record(device) -> dict | None:
    import torch

    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def task_overrides() -> list[str]:
    """The overrides this job was given on the command line (none outside Hydra's run)."""
    if not HydraConfig.initialized():
        return []
    return OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)  # as typed: `${` is text


def generate(prepared: Prepared):
    """Load and generate; on running out of GPU memory, drop to the next plan down and try again, loudly.

    Returns (pipeline, output, {load seconds, whether the model was reused}, the prepared run that ran, the
    fallbacks).
    """
    import torch  # torch and the model code load only once the run has passed its checks

    from wan_opt import reuse
    from wan_opt.pipeline import WanOptPipeline

    request, fallbacks = prepared.request, []
    while True:
        pipe = None
        try:
            start = time.perf_counter()
            pipe, reused = reuse.cached_pipeline(prepared.cfg, lambda _: WanOptPipeline.from_prepared(prepared))
            load_seconds = time.perf_counter() - start
            generator = torch.Generator("cpu").manual_seed(request.seed)
            with console.denoise_progress(request.steps) as on_step:
                out = pipe(request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                           width=request.width, num_frames=request.frames, num_inference_steps=request.steps,
                           guidance_scale=request.guidance, guidance_scale_2=request.guidance_2,
                           generator=generator, output_type="uint8", max_sequence_length=prepared.cfg.model.text_len,
                           on_step=on_step, **(prepared.images.call_kwargs() if prepared.images else {}))
            return pipe, out, {"load": load_seconds, "reused": reused}, prepared, fallbacks
        except torch.OutOfMemoryError as exc:
            del pipe
            reuse.release()
            failed, prepared = prepared.plan, leaner(prepared)
            plan = prepared.plan
            fallbacks.append({"from": failed.mechanisms, "to": plan.mechanisms, "error": str(exc).split("\n")[0]})
            console.console.print(f"[bold red]Out of GPU memory[/bold red] under {failed.mechanisms} (predicted "
                                  f"{failed.predicted_peak_gpu_gb} GB); retrying under {plan.mechanisms} "
                                  f"(predicted {plan.predicted_peak_gpu_gb} GB).")


def run_job(cfg: DictConfig, detected: dict | None = None) -> Path:
    """Generate one video for `cfg` and write it with its sidecar; returns the video's path."""
    # 1. Check the request, the checkpoint and the output folder, and plan the memory, before loading anything.
    prepared = prepare(cfg, task_overrides(), detected=detected)
    cfg, request = prepared.cfg, prepared.request
    folder = output_folder(cfg)
    video.check_writable(folder)
    console.console.print(console.settings_table(cfg, request, prepared.hardware_reason))
    console.console.print(console.plan_table(prepared.plan, prepared.decided))
    if cfg.plan:
        video.write_json({**prepared.plan.to_dict(), "decided_by": prepared.decided, "profile": cfg.hardware.name,
                          "model": cfg.model.name, "request": asdict(request)}, folder / "plan.json")
        console.console.print(f"[green]Saved[/green] {escape(str(folder / 'plan.json'))}")
        return folder / "plan.json"

    # 2. Load as the memory plan says, apply the speed policy, and generate (falling back on OOM).
    pipe, out, loading, prepared, fallbacks = generate(prepared)

    # 3. Write the video and its sidecar under the first free name, both complete or neither (one writer per group).
    if not hardware.is_main_process():
        return folder
    sidecar = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "seed": request.seed, "request": asdict(request),
        **(prepared.images.record if prepared.images else {}),  # image-to-video: each frame given, and its fitting
        "hardware": {"profile": cfg.hardware.name, "why": prepared.hardware_reason, "gpu": gpu_record(pipe.device),
                     "detected": prepared.detected},
        "memory_plan": {**prepared.plan.to_dict(), "decided_by": prepared.decided, "fallbacks": fallbacks,
                        "measured_peak_host_gib": peak_resident_gib()},
        "model_reused": loading["reused"],
        "parallel": asdict(pipe.parallel.layout) if pipe.parallel else None,
        "seconds": {"load": round(loading["load"], 3), **{k: round(v, 3) for k, v in out.stage_seconds.items()}},
        "step_seconds": [round(s, 4) for s in out.step_seconds],
        "versions": library_versions(), "command": sys.argv,
        "config": OmegaConf.to_container(prepared.cfg, resolve=True),
    }
    stem = video.safe_stem(f"{request.seed}-{request.prompt}")
    path = video.save(out.frames[0], folder, stem, request.fps, sidecar)
    console.console.print(f"[green]Saved[/green] {escape(str(path))}")  # a folder's [brackets] as written
    return path


def leave_process_group() -> None:
    """Under torchrun, leave the process group the run joined (NCCL warns of leaked resources otherwise)."""
    distributed = sys.modules.get("torch.distributed")  # not imported: bad input stopped the run before torch
    if distributed is not None and distributed.is_initialized():
        distributed.destroy_process_group()


def run(cfg: DictConfig, detected: dict | None = None) -> int:
    """The command line's job: one video, or one per line of a prompt file; returns the exit status.

    In a multirun a failure is recorded and the sweep goes on; the sweep's summary decides the exit status.
    An interrupt (Ctrl-C, SIGTERM) goes on up to the command once the batch or sweep has recorded what ran.
    """
    cfg = text_as_data(cfg)  # a prompt is text as typed: `${...}` in it is never resolved
    if not cfg.prompts and not is_multirun():
        try:
            run_job(cfg, detected)
        except WanOptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            leave_process_group()
        return 0
    job = str(HydraConfig.get().job.num) if is_multirun() else ""
    results: list[batch.ItemResult] = []
    unusable = False  # the prompt file itself: bad input, exit status 2
    try:
        cfg, auto = resolve_hardware(cfg, task_overrides())  # once for the whole batch
        batch.run_items(cfg, lambda item: run_job(item, auto or detected), job=job, results=results)
    except WanOptError as exc:  # the prompt file itself is unusable
        results, unusable = [batch.ItemResult(str(cfg.prompts), "", "failed", 0.0, error=str(exc), job=job)], True
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the finished videos stay, the summary says so
        with interrupts.deferred(raise_pending=False):  # a second Ctrl-C does not cut the records short
            interrupt.kept = write_records(cfg, results, interrupted=True)
        raise
    write_records(cfg, results)
    if is_multirun():
        return 0
    return 2 if unusable else 0 if all(r.status == "ok" for r in results) else 1


def record_folder(cfg: DictConfig) -> Path:
    """Where a batch's results.json and summary.json go: its own Hydra run (or job) folder, which no other
    process shares even when they share output_dir; else the output folder."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return output_folder(cfg)


def write_records(cfg: DictConfig, results: list[batch.ItemResult], interrupted: bool = False) -> str:
    """results.json, then the summary table and summary.json: the batch's, or an interrupted sweep's so far (a
    sweep that runs to its end is summarised by batch.SweepSummary). Returns what was kept, in words."""
    if not hardware.is_main_process():
        return "the first process keeps the records"
    folder = record_folder(cfg)
    batch.write_results(folder, results)
    summary, title = folder / "summary.json", f"prompts {cfg.prompts}"
    if is_multirun():
        if not interrupted:
            return ""
        sweep = Path(HydraConfig.get().sweep.dir)
        results, summary, title = batch.gather(sweep), sweep / "summary.json", f"sweep {sweep} (interrupted)"
    batch.summarize(results, summary, title)
    finished = sum(r.status == "ok" for r in results)
    return f"kept {finished} finished video{'' if finished == 1 else 's'}; {summary} lists what ran"

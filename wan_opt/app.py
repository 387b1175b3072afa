"""The run, as one plain function: config -> hardware -> load -> pipeline -> video.

run.py only adds the detected profile to the command line and hands Hydra's config to `run_job`.
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
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from wan_opt.checks import check_request, is_multirun
from wan_opt.config import AUTO_PROFILE, CONF_DIR
from wan_opt.errors import WanOptError
from wan_opt.request import GenerationRequest

log = logging.getLogger(__name__)

_HARDWARE_OVERRIDE = re.compile(r"^[+~]{0,2}hardware=")
# The profile run.py added to the command line, and why; None when the user chose one.
AUTO_HARDWARE: dict | None = None


_REMOTE_LAUNCHER = re.compile(r"^hydra/launcher=(?!basic$)")


def _record_detection() -> str:
    global AUTO_HARDWARE
    from wan_opt.hardware import detect

    choice = detect()
    AUTO_HARDWARE = {"profile": choice.profile, "reason": choice.reason,
                     "gpu": asdict(choice.gpu) if choice.gpu else None}
    return choice.profile


def with_detected_hardware(argv: Sequence[str]) -> list[str]:
    """Add `hardware=<detected>` unless the user gave one, so Hydra records the choice like any other.

    Jobs that a launcher runs on other machines get `hardware=auto`, resolved on the machine that runs them.
    """
    argv = list(argv)
    if any(_HARDWARE_OVERRIDE.match(arg) for arg in argv[1:]):
        return argv
    remote = any(_REMOTE_LAUNCHER.match(arg) for arg in argv[1:])
    profile = AUTO_PROFILE if remote else _record_detection()
    # argparse takes the overrides as one run of positionals: join the user's run, or lead if there is none.
    at = next((i for i, arg in enumerate(argv[1:], 1) if "=" in arg and not arg.startswith("-")), 1)
    return argv[:at] + [f"hardware={profile}"] + argv[at:]


def resolve_auto_hardware(cfg: DictConfig) -> None:
    """Replace the `auto` placeholder with the profile detected here, keeping `hardware.*` set by hand."""
    if cfg.hardware.name != AUTO_PROFILE:
        return
    profile = OmegaConf.load(CONF_DIR / "hardware" / f"{_record_detection()}.yaml")
    hand_set = [o for o in task_overrides() if o.lstrip("+~").startswith("hardware.")]
    cfg.hardware = OmegaConf.merge(cfg.hardware, profile, OmegaConf.from_dotlist(hand_set).get("hardware", {}))


def hardware_reason(cfg: DictConfig) -> str:
    if AUTO_HARDWARE and AUTO_HARDWARE["profile"] == cfg.hardware.name:
        return f"auto-detected: {AUTO_HARDWARE['reason']}"
    return f"chosen with hardware={cfg.hardware.name}"


def compose_config(overrides: Sequence[str] = (), hardware: str | None = None) -> DictConfig:
    """The config the CLI would build for these overrides (for the Python API and tests)."""
    from hydra import compose, initialize_config_dir

    overrides = list(overrides)
    if hardware is not None:
        overrides.append(f"hardware={hardware}")
    elif not any(_HARDWARE_OVERRIDE.match(o) for o in overrides):
        from wan_opt.hardware import detect

        overrides.append(f"hardware={detect().profile}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def pipeline_from_config(cfg: DictConfig):
    """Instantiate the memory policy, the speed policy and then the pipeline that uses both; under torchrun,
    split it across the process group."""
    from wan_opt import parallel
    from wan_opt.plan import parallel_layout

    memory = instantiate(cfg.hardware.memory)
    speed = instantiate(cfg.hardware.speed)
    layout = parallel_layout(cfg)
    device = parallel.init(cfg.hardware.device) if layout else cfg.hardware.device
    try:
        pipe = instantiate(cfg.pipeline, model=cfg.model, memory=memory, speed=speed, device=str(device),
                           _convert_="object")
        if layout:
            parallel.apply(pipe, layout, parallel.build_mesh(layout, device))
        return pipe
    except InstantiationException as exc:
        if isinstance(exc.__cause__, WanOptError):  # a user's mistake found while loading: say it plainly
            raise exc.__cause__ from None
        raise


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


def gpu_record(device) -> dict | None:
    import torch

    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def apply_plan(cfg: DictConfig):
    """Plan the memory for this request and write the plan's knobs into cfg.hardware.memory."""
    from wan_opt.plan import plan_for_config

    plan, decided = plan_for_config(cfg, task_overrides())
    for knob, value in plan.mechanisms.items():
        cfg.hardware.memory[knob] = value
    return plan, decided


def generate(cfg: DictConfig, request: GenerationRequest, plan):
    """Load and generate; on running out of GPU memory, drop to the next plan down and try again, loudly.

    Returns (pipeline, output, {load seconds, whether the model was reused}, the plan that ran, the fallbacks).
    """
    import torch

    from wan_opt import console, reuse
    from wan_opt.plan import next_plan_down

    fallbacks = []
    while True:
        pipe = None
        try:
            start = time.perf_counter()
            pipe, reused = reuse.cached_pipeline(cfg, pipeline_from_config)
            load_seconds = time.perf_counter() - start
            generator = torch.Generator("cpu").manual_seed(request.seed)
            with console.denoise_progress(request.steps) as on_step:
                out = pipe(request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                           width=request.width, num_frames=request.frames, num_inference_steps=request.steps,
                           guidance_scale=request.guidance, guidance_scale_2=request.guidance_2,
                           generator=generator, output_type="np", max_sequence_length=cfg.model.text_len,
                           on_step=on_step)
            return pipe, out, {"load": load_seconds, "reused": reused}, plan, fallbacks
        except torch.OutOfMemoryError as exc:
            del pipe
            reuse.release()
            failed, plan = plan, next_plan_down(cfg, plan, task_overrides())
            for knob, value in plan.mechanisms.items():
                cfg.hardware.memory[knob] = value
            fallbacks.append({"from": failed.mechanisms, "to": plan.mechanisms, "error": str(exc).split("\n")[0]})
            console.console.print(f"[bold red]Out of GPU memory[/bold red] under {failed.mechanisms} (predicted "
                                  f"{failed.predicted_peak_gpu_gb} GB); retrying under {plan.mechanisms} "
                                  f"(predicted {plan.predicted_peak_gpu_gb} GB).")


def run_job(cfg: DictConfig) -> Path:
    """Generate one video for `cfg` and write it with its sidecar; returns the video's path."""
    from wan_opt import console, parallel, video

    # 1. Check the request, the checkpoint and the output folder, and plan the memory, before loading anything.
    request = check_request(cfg)
    folder = output_folder(cfg)
    video.check_writable(folder)
    reason = hardware_reason(cfg)
    plan, decided = apply_plan(cfg)
    console.console.print(console.settings_table(cfg, request, reason))
    console.console.print(console.plan_table(plan, decided))
    if cfg.plan:
        video.write_json({**plan.to_dict(), "decided_by": decided, "profile": cfg.hardware.name,
                          "model": cfg.model.name, "request": asdict(request)}, folder / "plan.json")
        console.console.print(f"[green]Saved[/green] {folder / 'plan.json'}")
        return folder / "plan.json"

    # 2. Load as the memory plan says, apply the speed policy, and generate (falling back on OOM).
    pipe, out, loading, plan, fallbacks = generate(cfg, request, plan)

    # 3. Write the video, then its sidecar, each under its final name only once complete (one writer per group).
    if not parallel.is_main_process():
        return folder
    stem = video.safe_stem(f"{request.seed}-{request.prompt}")
    path = video.write_video(out.frames[0], video.unique_path(folder, stem, ".mp4"), request.fps)
    sidecar = {
        "video": path.name, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "seed": request.seed, "request": asdict(request),
        "hardware": {"profile": cfg.hardware.name, "why": reason, "gpu": gpu_record(pipe.device),
                     "detected": AUTO_HARDWARE},
        "memory_plan": {**plan.to_dict(), "decided_by": decided, "fallbacks": fallbacks},
        "model_reused": loading["reused"],
        "parallel": asdict(pipe.parallel.layout) if pipe.parallel else None,
        "seconds": {"load": round(loading["load"], 3), **{k: round(v, 3) for k, v in out.stage_seconds.items()}},
        "step_seconds": [round(s, 4) for s in out.step_seconds],
        "versions": library_versions(), "command": sys.argv,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    video.write_json(sidecar, path.with_suffix(".json"))
    console.console.print(f"[green]Saved[/green] {path}")
    return path


def leave_process_group() -> None:
    """Under torchrun, leave the process group the run joined (NCCL warns of leaked resources otherwise)."""
    distributed = sys.modules.get("torch.distributed")  # not imported: bad input stopped the run before torch
    if distributed is not None and distributed.is_initialized():
        distributed.destroy_process_group()


def run(cfg: DictConfig) -> int:
    """The command line's job: one video, or one per line of a prompt file; returns the exit status.

    In a multirun a failure is recorded and the sweep goes on; the sweep's summary decides the exit status.
    """
    from wan_opt import batch

    resolve_auto_hardware(cfg)
    if not cfg.prompts and not is_multirun():
        try:
            run_job(cfg)
        except WanOptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            leave_process_group()
        return 0
    job = str(HydraConfig.get().job.num) if is_multirun() else ""
    try:
        results = batch.run_items(cfg, run_job, job=job)
    except WanOptError as exc:  # the prompt file itself is unusable
        results = [batch.ItemResult(str(cfg.prompts), "", "failed", 0.0, error=str(exc), job=job)]
        print(f"error: {exc}", file=sys.stderr)
    folder = output_folder(cfg)
    batch.write_results(folder, results)
    if is_multirun():
        return 0
    return 0 if batch.summarize(results, folder / "summary.json", f"prompts {cfg.prompts}") else 1

"""What the user sees: the settings table at the start and the denoising progress bar."""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from wan_opt.request import GenerationRequest

# Under torchrun every rank runs the same job; rank 0 speaks for the group.
console = Console(stderr=True, quiet=int(os.environ.get("RANK", 0)) > 0)
# Someone else following the steps of the run in this thread (`wan-opt serve` shows them in its queue).
step_watcher: ContextVar[Callable[[int, int, str, float], None] | None] = ContextVar("step_watcher", default=None)


def settings_table(cfg: DictConfig, request: GenerationRequest, hardware_reason: str) -> Table:
    hw, mem, speed = cfg.hardware, cfg.hardware.memory, cfg.hardware.speed
    table = Table(title=f"wan-opt: {cfg.model.name} on profile {hw.name}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    rows = [
        ("profile", f"{hw.name}: {hw.description}"),
        ("why", hardware_reason),
        ("request", f"{request.width}*{request.height}, {request.frames} frames at {request.fps} fps, "
                    f"{request.steps} steps, seed {request.seed}"),
        ("guidance", f"{request.guidance}" + ("" if request.guidance_2 is None else f" / {request.guidance_2}")),
        ("experts", f"{mem.experts}, stored as {mem.weight_dtype}, computed in {mem.compute_dtype}"),
        ("text encoder", mem.text_encoder),
        ("VAE", f"{mem.vae_dtype}" + (", tiled" if mem.vae_tiling else "")
                + (", on the GPU for its calls only" if mem.vae_release else "")),
        ("kernels", f"attention {speed.attention}, compile {speed.compile}, TF32 {'on' if speed.tf32 else 'off'}, "
                    f"CFG {speed.cfg}"),
    ]
    if request.image:  # image-to-video: the frame(s) the video starts (and ends) on
        rows.insert(3, ("image", request.image + (f" ... {request.last_image}" if request.last_image else "")
                        + f", fitted to {request.width}*{request.height}"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def plan_table(plan, decided: dict[str, str]) -> Table:
    """The memory plan: each stage's predicted GPU peak against the budget, and who set each knob."""
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    table = Table(title=f"memory plan: {verdict}, predicted peak {plan.predicted_peak_gpu_gb:.1f} GB of "
                        f"{plan.vram_budget_gb:g} GB VRAM; host {plan.predicted_host_gb:.1f} of "
                        f"{plan.host_ram_gb:.0f} GB (VRAM budget from the {plan.budget_source})",
                  title_justify="left")
    table.add_column("stage / knob", style="bold cyan")
    table.add_column("predicted GPU GB / value", justify="right")
    table.add_column("host GB", justify="right")  # the stage's predicted peak resident set
    table.add_column("set by")
    host = plan.host_stages
    for stage, gb in plan.stages.items():
        table.add_row(stage, f"{gb:.1f}", f"{host[stage]:.1f}" if stage in host else "", "")
    for knob, value in plan.mechanisms.items():
        table.add_row(knob, str(value), "", decided.get(knob, ""))
    if plan.read_gb_per_request:
        table.add_row("read again per request", f"{plan.read_gb_per_request:.0f} GB from the checkpoint", "", "")
    return table


@contextmanager
def denoise_progress(total: int) -> Iterator:
    """A progress bar over the denoising steps; yields the pipeline's `on_step` callback."""
    columns = (TextColumn("[bold]{task.fields[expert]:<10}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("denoise", total=total, expert="encoding", rate="")

        watcher = step_watcher.get()

        def on_step(index: int, steps: int, expert: str, seconds: float) -> None:
            progress.update(task, advance=1, expert=expert.replace("_", "-"), rate=f"{seconds:.2f} s/step")
            if watcher is not None:
                watcher(index, steps, expert, seconds)

        yield on_step

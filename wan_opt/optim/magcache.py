"""MagCache for Wan 2.2's experts: diffusers' hook, with the calibrated ratios of each expert kept in a file.

MagCache skips the blocks of a step (reusing the last computed residual of the blocks) while the residual's
predicted change stays under a threshold. The prediction is a per-step ratio of residual magnitudes, which
belongs to the checkpoint: a run whose ratios file does not exist yet computes every step, measures the
ratios of each expert and writes them; later runs with the same file skip steps. The ratios are measured on
the conditional branch and serve both, as diffusers' hook does; a file keeps one list per expert, over the
steps that expert ran, and is stretched to another request's step count by diffusers.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import torch

from wan_opt.errors import WanOptError
from wan_opt.hardware import is_main_process

LEADER_HOOK = "mag_cache_leader_block_hook"  # the hook diffusers puts on the first block; it holds the state
BLOCK_HOOK = "mag_cache_block_hook"  # the hook on every other block
CONTEXTS = ("cond", "cond_uncond", "uncond")  # whichever branch the calibrating run computed, the first found
log = logging.getLogger(__name__)


def expert_labels(boundary: float | None) -> tuple[str, ...]:
    """The pipeline's names for the experts of a model (see WanOptPipeline.expert_for_timestep)."""
    return ("high_noise", "low_noise") if boundary is not None else ("denoise",)


def config(threshold: float, interval: int):
    """The hook's config for one expert; the steps and ratios of each request are filled in by `begin`."""
    from diffusers.hooks import MagCacheConfig

    # At most interval - 1 steps skipped in a row: a full forward at least every `interval` steps.
    return MagCacheConfig(threshold=threshold, max_skip_steps=interval - 1, calibrate=True, num_inference_steps=1)


def load(path: str | Path, labels: tuple[str, ...]) -> dict[str, list[float]]:
    """The ratios of a file, checked: one list of positive numbers per expert label."""
    try:
        data = json.loads(Path(path).read_text())
        ratios = {label: [float(r) for r in data["ratios"][label]] for label in labels}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WanOptError(f"{path} is not a MagCache ratios file with a list for each of {', '.join(labels)} "
                          f"({type(err).__name__}: {err}): delete it to calibrate again, or pass another "
                          f"hardware.speed.step_cache_ratios.") from None
    if not all(values and all(math.isfinite(r) and r > 0 for r in values) for values in ratios.values()):
        raise WanOptError(f"{path} has an empty list or a ratio that is not a positive number: delete it to "
                          f"calibrate again, or pass another hardware.speed.step_cache_ratios.")
    return ratios


def check(path: str, boundary: float | None) -> None:
    """Before anything loads: a ratios file to use, or a place to write one."""
    if not path:
        raise WanOptError("hardware.speed.step_cache=magcache needs hardware.speed.step_cache_ratios=<file.json>: "
                          "a run whose file does not exist yet computes every step and writes the ratios there; "
                          "later runs with that file skip steps.")
    file = Path(path).expanduser()
    if file.exists():
        load(file, expert_labels(boundary))
    elif not file.parent.is_dir():
        raise WanOptError(f"hardware.speed.step_cache_ratios={path}: the folder {file.parent} does not exist, so "
                          f"the calibrated ratios could not be written there.")


def compile_blocks(expert: torch.nn.Module, mode: str | None) -> None:
    """Regional compilation under the hooks. diffusers keeps each block's MagCache hook out of compiled graphs,
    and with it the block it wraps: compiling the blocks from outside would run them eagerly. So each block's
    own forward, the one its hook calls on a computed step, is compiled instead (one graph for all blocks)."""
    for block in expert.blocks:
        block._compiled_call_impl = None  # a whole-block compile from before the hooks would run them in its graph
        registry = block._diffusers_hook
        hook = registry.get_hook(LEADER_HOOK) or registry.get_hook(BLOCK_HOOK)
        hook.fn_ref.original_forward = torch.compile(hook.fn_ref.original_forward, dynamic=False, mode=mode)


def _leader(expert: torch.nn.Module):
    """The expert's MagCache hook on its first block: it holds the config and the state of every branch."""
    return expert.blocks[0]._diffusers_hook.get_hook(LEADER_HOOK)


def begin(path: str, plan: list[tuple[torch.nn.Module, float, str]]) -> None:
    """Set each expert's hook for this request (`plan`: expert, guidance, label per step): to measure the
    ratios if the file does not exist yet, else to skip steps by its ratios."""
    from diffusers.hooks import MagCacheConfig

    steps = Counter(label for _, _, label in plan)
    experts = {label: expert for expert, _, label in plan}
    file = Path(path).expanduser()
    ratios = load(file, tuple(experts)) if file.exists() else None
    for label, expert in experts.items():
        settings = _leader(expert).config
        settings.calibrate = ratios is None
        if settings.calibrate:
            # diffusers drops its measurements once the step count is reached: one more keeps them to be read.
            settings.num_inference_steps = steps[label] + 1
        else:
            settings.num_inference_steps = steps[label]
            settings.mag_ratios = MagCacheConfig(mag_ratios=ratios[label], num_inference_steps=steps[label]).mag_ratios


def measured(expert: torch.nn.Module) -> list[float]:
    """The ratios the expert's hook measured in the request that just ran."""
    states = _leader(expert).state_manager._state_cache
    return next((list(states[name].calibration_ratios) for name in CONTEXTS if name in states), [])


def end(path: str, plan: list[tuple[torch.nn.Module, float, str]]) -> None:
    """After a calibrating request: write the ratios, unless an expert ran fewer than 2 steps (no ratio then)."""
    experts = {label: expert for expert, _, label in plan}
    if not is_main_process() or not all(_leader(expert).config.calibrate for expert in experts.values()):
        return  # one process writes; the skipping decisions use the ratios alone, so every rank makes the same
    ratios = {label: measured(expert) for label, expert in experts.items()}
    if any(len(values) < 2 for values in ratios.values()):
        return
    file = Path(path).expanduser()
    partial = file.with_name(file.name + ".partial")
    partial.write_text(json.dumps({"ratios": ratios, "steps": {k: len(v) for k, v in ratios.items()}}, indent=1))
    partial.replace(file)
    log.info("MagCache: ratios of %s measured and written to %s; runs with this file skip steps.",
             ", ".join(ratios), file)

"""What to generate: the run's knobs merged over the model's defaults, checked before anything slow starts."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from wan_opt.errors import WanOptError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    guidance_2: float | None
    width: int
    height: int
    frames: int
    fps: int


def parse_size(size: str) -> tuple[int, int]:
    """'1280*720' (the Wan team's W*H spelling; 'x' also accepted) -> (1280, 720)."""
    parts = str(size).lower().replace("x", "*").split("*")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise WanOptError(f"size={size!r} is not W*H: write it like size=1280*720.")
    return int(parts[0]), int(parts[1])


def nearest_valid_frames(frames: int) -> tuple[int, int]:
    """The 4n+1 frame counts on either side of `frames` (the VAE compresses time 4x after the first frame)."""
    below = max(1, (frames - 1) // 4 * 4 + 1)
    return below, below + 4


def run_guidance(cfg: DictConfig) -> tuple[float, float | None]:
    """The guidance of each expert: the run's knobs over the model's defaults (guidance_2 None: one expert,
    or the low-noise expert guides as the high-noise one does)."""
    model = cfg.model
    return (model.guidance if cfg.guidance is None else cfg.guidance,
            model.guidance_2 if cfg.guidance_2 is None else cfg.guidance_2)


def resolve_request(cfg: DictConfig, prompt_required: bool = True) -> GenerationRequest:
    """Merge the run's knobs over the model's defaults and reject what the model cannot do.

    prompt_required: False for a memory plan, and for loading through the Python API (prompts come per call)."""
    model = cfg.model
    prompt = (cfg.prompt or "").strip()
    if not prompt and prompt_required:
        raise WanOptError('The prompt is empty: pass one, e.g. prompt="a red fox running through snow".')
    steps = model.steps if cfg.steps is None else cfg.steps
    if steps < 1:
        raise WanOptError(f"steps={steps} is below 1: pass steps=1 or more (the model's default is {model.steps}).")
    guidance, guidance_2 = run_guidance(cfg)
    for name, value in (("guidance", guidance), ("guidance_2", guidance_2)):
        if value is not None and value < 0:
            raise WanOptError(f"{name}={value} is negative: pass 0 or more (1 turns classifier-free guidance off).")
    if guidance_2 is not None and model.boundary is None:
        raise WanOptError(f"guidance_2 applies to the low-noise expert, and {model.name} has only one expert: drop it.")
    frames = model.frames if cfg.frames is None else cfg.frames
    if frames < 1 or (frames - 1) % 4:
        below, above = nearest_valid_frames(max(frames, 1))
        raise WanOptError(f"frames={frames} is not of the form 4n+1: use frames={below} or frames={above}.")
    width, height = parse_size(cfg.size or model.sizes[0])
    grid = model.pixel_grid
    if width % grid or height % grid or width <= 0 or height <= 0:
        raise WanOptError(
            f"size={width}*{height} is off {model.name}'s {grid}-pixel grid: use multiples of {grid}, "
            f"e.g. size={max(grid, round(width / grid) * grid)}*{max(grid, round(height / grid) * grid)}."
        )
    if f"{width}*{height}" not in model.sizes:
        log.warning("size=%d*%d is not one of %s's official sizes (%s); it runs, but quality is not assured.",
                    width, height, model.name, ", ".join(model.sizes))
    fps = model.fps if cfg.fps is None else cfg.fps
    if fps < 1:
        raise WanOptError(f"fps={fps} is below 1: pass fps=1 or more (the model's default is {model.fps}).")
    negative = model.negative_prompt if cfg.negative_prompt is None else cfg.negative_prompt
    return GenerationRequest(prompt, negative, int(cfg.seed), int(steps), float(guidance),
                             None if guidance_2 is None else float(guidance_2), width, height, int(frames), int(fps))


def check_lora_config(model) -> None:
    """Before anything loads: a preset built around LoRAs has both files, and every named file exists."""
    cfg = model.lora
    if cfg.required and not (cfg.high_noise and cfg.low_noise):
        raise WanOptError(f"model={model.name} runs with a step-distilled LoRA per expert: pass "
                          f"model.lora.high_noise=PATH and model.lora.low_noise=PATH.")
    for key in ("high_noise", "low_noise"):
        path = cfg[key]
        if path and not Path(path).expanduser().is_file():
            raise WanOptError(f"model.lora.{key}={path} is not a file: point it at the LoRA's .safetensors.")

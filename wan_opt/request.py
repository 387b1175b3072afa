"""What to generate: the run's knobs merged over the model's defaults, checked before anything slow starts."""
from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from wan_opt.errors import WanOptError

log = logging.getLogger(__name__)

# The run's text: taken as written, never read as an OmegaConf interpolation (`${...}`).
TEXT_KEYS = ("prompt", "negative_prompt", "model.negative_prompt")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range; a negative seed would only alias a positive one
MAX_STEPS = 1000  # the schedulers' 1000 training timesteps: more steps only repeat them
# Wan 2.2's rotary position tables (rope_max_seq_len) hold 1024 positions per latent axis, and its VAEs put
# 4 frames in each latent frame after the first: the longest video and the widest side the models can place.
ROPE_POSITIONS = 1024
MAX_FRAMES = 4 * (ROPE_POSITIONS - 1) + 1


# The knobs one request sets over the model's defaults: a prompt-file line may set these, and nothing else.
REQUEST_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_2", "size", "frames", "fps",
                "image", "last_image")


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
    image: str | None = None  # image-to-video: the first frame as given (wan_opt.image fits the size to it)
    last_image: str | None = None


def literal(text: str) -> str:
    """`text` as an OmegaConf string that reads back as exactly `text`: every `${` escaped (with the
    backslashes written before it doubled), so nothing in it is ever resolved."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def raw_value(cfg: DictConfig, key: str):
    """The value of dotted `key` as written in the config, without resolving it."""
    node = cfg
    for part in key.split("."):
        node = node._get_node(part) if isinstance(node, DictConfig) else None
    return None if node is None else node._value()


def text_as_data(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` whose prompt and negative prompts read back as written: `${oc.env:HOME}` or `${5}` in a
    prompt is text, not an interpolation. Applied once where text comes in (the command line's job, composed
    overrides); a prompt file's values are set literally by wan_opt.batch."""
    data = copy.deepcopy(cfg)
    readonly = OmegaConf.is_readonly(data)
    OmegaConf.set_readonly(data, False)
    for key in TEXT_KEYS:
        value = raw_value(data, key)
        if isinstance(value, str):
            OmegaConf.update(data, key, literal(value), merge=False)
    OmegaConf.set_readonly(data, readonly)
    return data


def control_characters(text: str) -> str:
    """The first control character of `text` other than tab and newline (they would drive the terminal the
    table is printed on), as JSON writes it; "" when there is none."""
    bad = next((c for c in text if (ord(c) < 32 and c not in "\t\n") or 0x7f <= ord(c) <= 0x9f), "")
    return json.dumps(bad) if bad else ""


def parse_size(size: str) -> tuple[int, int]:
    """'1280*720' (the Wan team's W*H spelling; 'x' also accepted) -> (1280, 720)."""
    parts = str(size).lower().replace("x", "*").split("*")
    # ASCII digits only, and few enough of them for int(): "²" and a thousand-digit width are not sizes
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() and len(p.strip()) <= 9
                                  for p in parts):
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
    negative = model.negative_prompt if cfg.negative_prompt is None else cfg.negative_prompt
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if bad := control_characters(text or ""):
            raise WanOptError(f"The {name.replace('_', ' ')} holds the control character {bad}: remove it "
                              f"(newlines and tabs are fine).")
    check_seed(cfg.seed)
    steps = model.steps if cfg.steps is None else cfg.steps
    if not 1 <= steps <= MAX_STEPS:
        raise WanOptError(f"steps={steps} is {'below 1' if steps < 1 else f'above {MAX_STEPS}'}: pass 1 to "
                          f"{MAX_STEPS}, the scheduler's timesteps (the model's default is {model.steps}).")
    guidance, guidance_2 = run_guidance(cfg)
    for name, value in (("guidance", guidance), ("guidance_2", guidance_2)):
        if value is not None and value < 0:
            raise WanOptError(f"{name}={value} is negative: pass 0 or more (1 turns classifier-free guidance off).")
    if guidance_2 is not None and model.boundary is None:
        raise WanOptError(f"guidance_2 applies to the low-noise expert, and {model.name} has only one expert: drop it.")
    frames = model.frames if cfg.frames is None else cfg.frames
    check_frames(frames)
    width, height = check_size(cfg.size or model.sizes[0], model)
    fps = model.fps if cfg.fps is None else cfg.fps
    if fps < 1:
        raise WanOptError(f"fps={fps} is below 1: pass fps=1 or more (the model's default is {model.fps}).")
    return GenerationRequest(prompt, negative, int(cfg.seed), int(steps), float(guidance),
                             None if guidance_2 is None else float(guidance_2), width, height, int(frames), int(fps))


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise WanOptError(f"seed={seed} is outside the generator's range: pass a whole number from 0 to "
                          f"{MAX_SEED} (2**64-1).")


def check_frames(frames: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        below, above = nearest_valid_frames(max(frames, 1))
        raise WanOptError(f"frames={frames} is not of the form 4n+1: use frames={below} or frames={above}.")
    if frames > MAX_FRAMES:
        raise WanOptError(f"frames={frames} is above {MAX_FRAMES}, the most Wan 2.2 can place in time "
                          f"({ROPE_POSITIONS} latent frames of 4): ask for fewer frames.")


def check_size(size: str, model) -> tuple[int, int]:
    """(width, height) of a size on the model's pixel grid and within its position tables."""
    width, height = parse_size(size)
    grid = model.pixel_grid
    if width % grid or height % grid or width <= 0 or height <= 0:
        raise WanOptError(
            f"size={width}*{height} is off {model.name}'s {grid}-pixel grid: use multiples of {grid}, "
            f"e.g. size={max(grid, round(width / grid) * grid)}*{max(grid, round(height / grid) * grid)}."
        )
    if max(width, height) > ROPE_POSITIONS * grid:
        raise WanOptError(f"size={width}*{height} is wider than {ROPE_POSITIONS * grid} pixels, the most "
                          f"{model.name} can place ({ROPE_POSITIONS} positions of {grid} pixels a side): "
                          f"ask for a smaller size.")
    if f"{width}*{height}" not in model.sizes:
        log.warning("size=%d*%d is not one of %s's official sizes (%s); it runs, but quality is not assured.",
                    width, height, model.name, ", ".join(model.sizes))
    return width, height


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

"""One path from a composed config to what a run needs: the request, the memory plan and the settings.

The command line, `WanOptPipeline.from_pretrained` and the benchmark all call `prepare`, so each gets the same
checks, the same plan and the same one-sentence errors. It returns new values and never changes the config
it is given:

    cfg = compose_config(["model=tiny", "prompt=a red fox"], hardware="cpu")
    prepared = prepare(cfg)            # checked and planned; nothing loaded yet
    prepared.plan.mechanisms           # {'experts': 'resident', 'weight_dtype': 'float32', ...}
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from wan_opt import checks, hardware
from wan_opt.config import AUTO_PROFILE, CONF_DIR
from wan_opt.errors import WanOptError, config_error_sentence
from wan_opt.image import ConditionImages, condition_request, image_use
from wan_opt.memory import budget
from wan_opt.memory.plan import (Layout, Mechanisms, ModelSizes, Plan, Request, host_plan, host_refusal,
                                 next_plan_down, no_plan_fits, plan_layout, plan_memory, predict, tokens)
from wan_opt.request import REQUEST_KEYS, GenerationRequest, raw_value, resolve_request, text_as_data

HARDWARE_OVERRIDE = re.compile(r"^[+~]{0,2}hardware=")


@dataclass(frozen=True)
class Prepared:
    """Everything decided before loading. `cfg` is the config as the run will use it: the detected profile in
    place of `auto`, the plan's memory knobs written in (a copy; read-only)."""

    cfg: DictConfig
    request: GenerationRequest
    plan: Plan
    decided: dict[str, str]  # memory knob -> who decided it: profile, planner or user
    hardware_reason: str
    detected: dict | None = None  # the detection behind an auto-chosen profile, for the sidecar
    layout: Layout | None = None  # how a torchrun group splits the request; None in one process
    user_memory: dict = field(default_factory=dict)  # memory knobs the user set by hand
    sizes: ModelSizes | None = None  # the checkpoint's own module sizes, where it was read; else the family's
    images: ConditionImages | None = None  # image-to-video: the fitted first (and last) frame

    def with_plan(self, plan: Plan) -> "Prepared":
        """The same run under another plan (after running out of GPU memory)."""
        return replace(self, cfg=with_mechanisms(self.cfg, plan), plan=plan,
                       decided={k: "user" if k in self.user_memory else "planner" for k in plan.mechanisms})


# -- composing ---------------------------------------------------------------------------------------------


def compose_config(overrides: Sequence[str] = (), hardware: str | None = None) -> DictConfig:
    """The config the command line would build for these overrides (the Python API, the benchmark, tests).

    With no profile given, the one detected here; a config Hydra cannot compose is one WanOptError sentence.
    """
    overrides = list(overrides)
    if hardware is not None:
        overrides.append(f"hardware={hardware}")
    elif not any(HARDWARE_OVERRIDE.match(o) for o in overrides):
        overrides.append(f"hardware={detected_profile()}")
    return _compose(overrides)


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    try:
        if GlobalHydra.instance().is_initialized():  # inside the command line's job: its search path, --config-dir too
            return text_as_data(compose(config_name="config", overrides=overrides))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return text_as_data(compose(config_name="config", overrides=overrides))
    except HydraException as error:
        raise WanOptError(config_error_sentence(error)) from None


def detected_profile() -> str:
    return hardware.detect().profile


def detection_record() -> dict:
    choice = hardware.detect()
    return {"profile": choice.profile, "reason": choice.reason, "gpu": asdict(choice.gpu) if choice.gpu else None}


def resolve_hardware(cfg: DictConfig, overrides: Sequence[str]) -> tuple[DictConfig, dict | None]:
    """`hardware=auto` (jobs a launcher runs elsewhere) composed again with the profile detected here, under the
    same overrides, so that it is exactly what `hardware=<that profile>` gives: the mode and every knob set by
    hand land over the detected profile, not under it."""
    if cfg.hardware.name != AUTO_PROFILE:
        return cfg, None
    detected = detection_record()
    kept = [o for o in overrides if not HARDWARE_OVERRIDE.match(o)]
    resolved = _compose([*kept, f"hardware={detected['profile']}"])
    # Values a batch line set on this job's config (prompt, seed, ...) are not overrides: carry them over.
    for key in REQUEST_KEYS:
        resolved[key] = raw_value(cfg, key)  # as written: a prompt's `${` stays text
    return resolved, detected


# -- preparing ---------------------------------------------------------------------------------------------


def prepare(cfg: DictConfig, overrides: Sequence[str] = (), *, detected: dict | None = None,
            prompt_required: bool = True, loads: bool = True) -> Prepared:
    """Check `cfg`, build its request and plan its memory: every WanOptError a run can raise before loading.

    overrides: the user's own overrides (the command line's, or from_pretrained's); the memory knobs among them
    win over the planner. detected: how the command line chose the profile, when it chose it by detection.
    prompt_required: False where prompts come later (the Python API). loads: False where the caller builds
    the modules itself (the benchmark): no device, checkpoint or LoRA checks.
    """
    checks.check_overrides(overrides)
    cfg, auto = resolve_hardware(cfg, overrides)
    detected = auto or detected
    checks.check_knobs(cfg)
    request = resolve_request(cfg, prompt_required=prompt_required and not cfg.plan)
    request, images = condition_request(cfg, request, required=prompt_required and not cfg.plan)
    layout = parallel_layout(cfg, request)
    sizes = None
    if loads and not cfg.plan:  # a plan needs neither a GPU nor a checkpoint
        sizes = checks.check_for_loading(cfg, layout)
    user_memory = user_memory_knobs(overrides)
    plan, decided = plan_for_config(cfg, request, layout, user_memory, sizes)
    if detected and detected["profile"] == cfg.hardware.name:
        reason = f"auto-detected: {detected['reason']}"
    else:
        reason = f"chosen with hardware={cfg.hardware.name}"
    return Prepared(with_mechanisms(cfg, plan), request, plan, decided, reason, detected, layout, user_memory, sizes,
                    images)


def plan_for(cfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[Plan, dict[str, str]]:
    """The memory plan a run of `cfg` would get, and who decided each knob (the prompt and the device aside)."""
    prepared = prepare(cfg, overrides, prompt_required=False, loads=False)
    return prepared.plan, prepared.decided


def with_mechanisms(cfg: DictConfig, plan: Plan) -> DictConfig:
    """A copy of `cfg` with the plan's memory knobs in `hardware.memory`."""
    planned = copy.deepcopy(cfg)
    OmegaConf.set_readonly(planned, False)
    for knob, value in plan.mechanisms.items():
        planned.hardware.memory[knob] = value
    OmegaConf.set_readonly(planned, True)
    return planned


def user_memory_knobs(overrides: Sequence[str]) -> dict:
    """The memory knobs the user set by hand: those win over the planner."""
    knobs = {}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        name = key.removeprefix("hardware.memory.")
        if key.startswith("hardware.memory.") and name in Mechanisms.__dataclass_fields__:
            knobs[name] = value.lower() == "true" if isinstance(getattr(Mechanisms(), name), bool) else value
    return knobs


def planner_request(cfg: DictConfig, request: GenerationRequest, layout: Layout | None = None) -> Request:
    """The request as the planner sees it: size, frames, CFG batching, guidance, the image's VAE encode and the
    torchrun split."""
    use = image_use(cfg.model.family)
    encoded = 0
    if use is not None and (request.image is not None or use.needs == "required"):
        encoded = request.frames if use.whole_video else 1
    req = Request(request.width, request.height, request.frames, cfg.hardware.speed.cfg == "batched",
                  request.guidance > 1.0, image_frames=encoded)
    if layout is not None:
        req = replace(req, sequence_parallel=layout.sequence, weight_shards=layout.world if layout.shard else 1)
    return req


def model_sizes(family: str):
    # Counted from the real classes: torch and diffusers load only once the request has passed its checks.
    from wan_opt.loading.arch import model_sizes as count

    return count(family)


def parallel_layout(cfg: DictConfig, request: GenerationRequest) -> Layout | None:
    """How this torchrun group splits the request (None in a single process); a split the model cannot take
    is an error here, before anything loads."""
    if hardware.world_size() == 1:
        return None
    sizes = model_sizes(cfg.model.family)
    guided = any(g is not None and g > 1.0 for g in (request.guidance, request.guidance_2))
    return plan_layout(hardware.world_size(), cfg.hardware.parallel, sizes.attention_heads,
                       tokens(sizes, planner_request(cfg, request)), guided, cfg.model.name)


def allow_fp8(cfg: DictConfig) -> bool:
    """Whether the planner may store weights in fp8: the device's fp8 tensor cores when this machine has the GPU
    the profile is for; the profile's card when planning for another machine; or fp8 asked for by name."""
    if cfg.hardware.memory.weight_dtype.startswith("float8"):
        return True
    capability = hardware.device_capability() if cfg.hardware.device == "cuda" else None
    if capability is None:
        capability = hardware.capability_tuple(cfg.hardware.gpu.capability)
    return hardware.has_fp8(capability)


def plan_for_config(cfg: DictConfig, request: GenerationRequest, layout: Layout | None,
                    fixed: dict, sizes: ModelSizes | None = None) -> tuple[Plan, dict[str, str]]:
    """The plan for a checked config, and which of profile / planner / user decided each knob.

    The profile's own mechanisms stand when they fit; otherwise the planner picks the fastest plan that fits,
    keeping every knob the user set by hand (and warning if those then do not fit).
    """
    mem = cfg.hardware.memory
    sizes, req = sizes or model_sizes(cfg.model.family), planner_request(cfg, request, layout)
    profile = Mechanisms(**{knob: mem[knob] for knob in Mechanisms.__dataclass_fields__})
    host = mem.host_ram_gb or budget.host_ram_gb()
    kept = kept_knobs(cfg, layout, fixed)

    def decided_by(plan: Plan) -> dict[str, str]:
        return {k: "user" if k in fixed else ("planner" if plan.mechanisms[k] != v else "profile")
                for k, v in asdict(profile).items()}

    if cfg.hardware.device == "cpu":  # everything in host memory: what it cannot hold is refused here
        plan = host_plan(sizes, req, replace(profile, **kept), mem.compute_dtype, mem.vae_dtype, host)
        if not plan.fits:
            raise host_refusal(sizes, req, plan, mem.compute_dtype, mem.vae_dtype, cfg.model.name)
        return plan, decided_by(plan)
    vram, source = budget.vram_budget(mem, cfg.hardware.device)
    own = predict(sizes, req, replace(profile, **kept), mem.compute_dtype, mem.vae_dtype, vram, host)
    own.budget_source = source
    if own.fits:
        return own, decided_by(own)
    plan = plan_memory(sizes, req, vram, host, mem.compute_dtype, mem.vae_dtype, allow_fp8(cfg), kept)
    plan.budget_source = source
    if not plan.fits and fixed:
        budget.log.warning("The memory knobs set by hand (%s) do not fit %s GB; running them anyway.",
                           ", ".join(f"{k}={v}" for k, v in fixed.items()), vram)
    elif not plan.fits:
        raise no_plan_fits(sizes, req, plan, mem.compute_dtype, mem.vae_dtype, allow_fp8(cfg), kept)
    return plan, decided_by(plan)


def checkpoint_reads_refused(cfg: DictConfig, layout: Layout | None) -> str | None:
    """Why idle weights cannot wait in checkpoint files here, if they cannot: random and tiny weights have no
    files, a torchrun group loads whole, and fused QKV is built from whole weights after loading."""
    if layout is not None:
        return "under torchrun"
    if cfg.model.random_weights or cfg.model.family.startswith("tiny"):
        return f"for model={cfg.model.name}, which has no checkpoint files"
    if cfg.hardware.speed.fuse_qkv:
        return "beside hardware.speed.fuse_qkv=true, which joins whole weights after loading"
    return None


def kept_knobs(cfg: DictConfig, layout: Layout | None, fixed: dict) -> dict:
    """The knobs a plan must keep: the user's, and idle_weights=host where no checkpoint files can be read again."""
    refused = checkpoint_reads_refused(cfg, layout)
    if refused is None:
        return fixed
    if fixed.get("idle_weights") == "checkpoint":
        raise WanOptError(f"hardware.memory.idle_weights=checkpoint reads weights from model.ckpt_dir as they are "
                          f"needed, which it cannot do {refused}: pass hardware.memory.idle_weights=host.")
    return {**fixed, "idle_weights": "host"}


def leaner(prepared: Prepared) -> Prepared:
    """After an out-of-memory error: the same run under the fastest plan predicted to need clearly less."""
    cfg, mem = prepared.cfg, prepared.cfg.hardware.memory
    plan = next_plan_down(prepared.sizes or model_sizes(cfg.model.family),
                          planner_request(cfg, prepared.request, prepared.layout),
                          prepared.plan, mem.compute_dtype, mem.vae_dtype, prepared.plan.vram_budget_gb,
                          prepared.plan.host_ram_gb, allow_fp8(cfg),
                          kept_knobs(cfg, prepared.layout, prepared.user_memory))
    plan.budget_source = prepared.plan.budget_source
    return prepared.with_plan(plan)

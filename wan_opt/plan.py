"""The memory planner: a request and a budget in, the fastest set of mechanisms that fits out.

Pure arithmetic over the architecture's sizes and the activation and decode costs measured on an H100
(BASELINE: a 720p x 81 forward needs ~7.3 GiB beyond the weights at batch 1, a 480p one ~3.5 GiB; the 720p
decode +20.2 GiB in fp32, +10.1 in bf16, +3.9 / +2.0 tiled). No GPU, no weights, no checkpoint needed.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
from dataclasses import asdict, dataclass, field, replace

from wan_opt.errors import WanOptError

log = logging.getLogger(__name__)

GIB = 2**30
SAFETY = 0.92  # plan to 92% of the budget: allocator fragmentation and the CUDA context live in the rest
ACT_GIB_PER_TOKEN = 1.0e-4  # per latent token and batch element (7.6 GiB at 75,600 tokens)
ACT_FIXED_GIB = 0.5
DECODE_720P_GIB = {"float32": 20.2, "bfloat16": 10.1, "float16": 10.1}  # untiled, 1280*720*81
DECODE_TILED_GIB = {"float32": 3.9, "bfloat16": 2.0, "float16": 2.0}
PIXELS_720P_81 = 1280 * 720 * 81
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
# Seconds a mechanism adds, from the H100 measurements; used only to rank plans, never reported as a result.
COST = {"offload_per_step_fraction": 0.08, "swap_seconds": 2.0, "te_release_seconds": 0.5,
        "te_cpu_seconds": 4.6, "tiling_seconds": 6.0}


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts (billions) of the modules a family is made of."""

    expert_params_b: float
    experts: int
    text_encoder_params_b: float
    vae_params_b: float
    latent_channels: int
    spatial_compression: int  # pixels per latent token side (VAE stride x DiT patch)
    temporal_compression: int = 4
    expert_block_linear_params_b: float = 0.0  # the part fp8 storage quantizes; the rest stays in compute dtype
    attention_heads: int = 0


@functools.cache
def model_sizes(family: str) -> ModelSizes:
    """Counted from the real classes built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from wan_opt import arch, tiny

    dit, vae, te = {
        "t2v_a14b": (arch.A14B_EXPERT, arch.WAN21_VAE, arch.UMT5_XXL),
        "ti2v_5b": (arch.TI2V_5B_DIT, arch.WAN22_VAE, arch.UMT5_XXL),
        "tiny": (tiny.TINY_TRANSFORMER, tiny.TINY_VAE, tiny.TINY_TEXT_ENCODER),
    }[family]
    with torch.device("meta"):
        count = lambda m: sum(p.numel() for p in m.parameters()) / 1e9  # noqa: E731
        dit_module = WanTransformer3DModel(**dit)
        dit_b = count(dit_module)
        block_linear_b = sum(count(m) for m in dit_module.blocks.modules() if type(m) is torch.nn.Linear)
        vae_module = AutoencoderKLWan(**vae)
        te_b = count(UMT5EncoderModel(UMT5Config(**te)))
    spatial = vae_module.config.scale_factor_spatial * dit["patch_size"][1]
    return ModelSizes(dit_b, 1 if family == "ti2v_5b" else 2, te_b, count(vae_module), dit["in_channels"], spatial,
                      expert_block_linear_params_b=block_linear_b, attention_heads=dit["num_attention_heads"])


@dataclass(frozen=True)
class Request:
    width: int
    height: int
    frames: int
    batched_cfg: bool = False
    guided: bool = True
    sequence_parallel: int = 1  # GPUs each forward's tokens are split across (torchrun)
    weight_shards: int = 1  # GPUs each expert and the text encoder are sharded across (FSDP2)


@dataclass(frozen=True)
class Mechanisms:
    """The memory knobs a plan sets (the fields of a profile's `memory:` block that the planner owns)."""

    experts: str = "resident"  # resident | swap | offload
    weight_dtype: str = "bfloat16"
    text_encoder: str = "gpu"  # gpu | gpu_release | cpu
    vae_tiling: bool = False


@dataclass
class Plan:
    fits: bool
    predicted_peak_gpu_gb: float
    vram_budget_gb: float
    host_ram_gb: float
    predicted_host_gb: float
    mechanisms: dict
    stages: dict[str, float] = field(default_factory=dict)  # predicted GPU peak of each stage, GiB
    est_extra_seconds: float = 0.0
    budget_source: str = "profile"  # where vram_budget_gb came from

    def to_dict(self) -> dict:
        return asdict(self)


def tokens(sizes: ModelSizes, req: Request) -> int:
    frames = (req.frames - 1) // sizes.temporal_compression + 1
    return frames * (req.height // sizes.spatial_compression) * (req.width // sizes.spatial_compression)


def predict(sizes: ModelSizes, req: Request, mech: Mechanisms, compute_dtype: str, vae_dtype: str,
            vram_budget_gb: float, host_ram_gb: float, steps: int = 40) -> Plan:
    """Predicted peak GPU memory of each stage (GiB) and host memory, for one set of mechanisms."""
    quantized = sizes.expert_block_linear_params_b
    expert = (quantized * BYTES[mech.weight_dtype] + (sizes.expert_params_b - quantized) * BYTES[compute_dtype]) * 1e9 / GIB
    te = sizes.text_encoder_params_b * 1e9 * BYTES[compute_dtype] / GIB
    # Per GPU under torchrun: FSDP2 keeps 1/N of the experts (plus one gathered block, in the 0.5 GiB margin
    # of the activations) and of a text encoder that stays on the GPUs; one that is released or runs on the
    # CPU is not sharded (wan_opt.parallel.apply), so it comes whole. A sequence split keeps 1/N of the
    # tokens' activations.
    expert = expert / req.weight_shards
    if mech.text_encoder == "gpu":
        te = te / req.weight_shards
    vae = sizes.vae_params_b * 1e9 * BYTES[vae_dtype] / GIB
    batch = 2 if (req.batched_cfg and req.guided) else 1
    act = ACT_FIXED_GIB + ACT_GIB_PER_TOKEN * tokens(sizes, req) * batch / req.sequence_parallel
    # Offloaded experts stream block by block: a few blocks in flight plus the non-block weights.
    expert_on_gpu = {"resident": expert, "swap": expert, "offload": expert * 0.06}[mech.experts]
    resident_experts = expert * sizes.experts if mech.experts == "resident" else 0.0
    te_gpu = te if mech.text_encoder == "gpu" else 0.0
    pixels = req.width * req.height * req.frames / PIXELS_720P_81
    decode = DECODE_TILED_GIB[vae_dtype] if mech.vae_tiling else DECODE_720P_GIB[vae_dtype] * pixels
    stages = {
        "encode": resident_experts + te + vae + 0.3 if mech.text_encoder != "cpu" else resident_experts + vae,
        "denoise_high_noise": max(resident_experts, expert_on_gpu) + te_gpu + vae + act,
        "decode": resident_experts + te_gpu + vae + decode,
    }
    if sizes.experts == 2:
        stages["denoise_low_noise"] = stages["denoise_high_noise"]
        stages["switch"] = resident_experts + te_gpu + vae + (expert if mech.experts == "swap" else 0.0)
    host = sizes.experts * expert * (mech.experts != "resident") + te * (mech.text_encoder != "gpu")
    peak = max(stages.values())
    extra = (COST["offload_per_step_fraction"] * steps * 10.0 * (mech.experts == "offload")
             + COST["swap_seconds"] * (mech.experts == "swap")
             + COST["te_release_seconds"] * (mech.text_encoder == "gpu_release")
             + COST["te_cpu_seconds"] * (mech.text_encoder == "cpu")
             + COST["tiling_seconds"] * mech.vae_tiling)
    fits = peak <= vram_budget_gb * SAFETY and host <= host_ram_gb * SAFETY
    return Plan(fits, round(peak, 2), vram_budget_gb, host_ram_gb, round(host, 2), asdict(mech),
                {k: round(v, 2) for k, v in stages.items()}, round(extra, 1))


def candidates(allow_fp8: bool) -> list[Mechanisms]:
    """Every combination, lossless (bf16 storage) before fp8 storage."""
    dtypes = ["bfloat16", "float8_e4m3fn"] if allow_fp8 else ["bfloat16"]
    return [Mechanisms(e, d, t, v) for d, e, t, v in itertools.product(
        dtypes, ("resident", "swap", "offload"), ("gpu", "gpu_release", "cpu"), (False, True))]


def plan_memory(family: str, req: Request, vram_budget_gb: float, host_ram_gb: float, compute_dtype: str = "bfloat16",
                vae_dtype: str = "float32", allow_fp8: bool = True, fixed: dict | None = None) -> Plan:
    """The fastest plan that fits; knobs in `fixed` (set by hand) are kept as given, fitting or not."""
    sizes = model_sizes(family)
    fixed = fixed or {}
    plans = []
    for mech in candidates(allow_fp8):
        mech = replace(mech, **{k: v for k, v in fixed.items() if k in Mechanisms.__dataclass_fields__})
        plans.append(predict(sizes, req, mech, compute_dtype, vae_dtype, vram_budget_gb, host_ram_gb))
    fitting = [p for p in plans if p.fits]
    if fitting:
        lossless = [p for p in fitting if p.mechanisms["weight_dtype"] != "float8_e4m3fn"]
        return min(lossless or fitting, key=lambda p: p.est_extra_seconds)
    return min(plans, key=lambda p: p.predicted_peak_gpu_gb)


def no_plan_fits(family: str, req: Request, plan: Plan, compute_dtype: str, vae_dtype: str,
                 allow_fp8: bool) -> WanOptError:
    """One sentence: the smallest VRAM (and its host RAM) that would run this, and the nearest request that fits."""
    sizes = model_sizes(family)
    smallest = min((predict(sizes, req, m, compute_dtype, vae_dtype, 1e9, 1e9) for m in candidates(allow_fp8)),
                   key=lambda p: (p.predicted_peak_gpu_gb, p.predicted_host_gb))
    nearest = "none at this size"
    smaller = [replace(req, frames=f) for f in range(req.frames - 4, 0, -4)]
    smaller += [replace(req, width=w, height=h) for w, h in ((832, 480), (480, 832)) if w * h < req.width * req.height]
    for candidate in smaller:
        if plan_memory(family, candidate, plan.vram_budget_gb, plan.host_ram_gb, compute_dtype, vae_dtype,
                       allow_fp8).fits:
            nearest = f"size={candidate.width}*{candidate.height} frames={candidate.frames}"
            break
    return WanOptError(
        f"No memory plan fits {req.width}*{req.height} x {req.frames} frames in {plan.vram_budget_gb:g} GB of VRAM "
        f"and {plan.host_ram_gb:.0f} GB of host RAM: the leanest plan needs {smallest.predicted_peak_gpu_gb / SAFETY:.1f} "
        f"GB of VRAM with {smallest.predicted_host_gb / SAFETY:.1f} GB of host RAM; the nearest request that fits "
        f"here: {nearest}."
    )


def host_ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def user_memory_knobs(task_overrides: list[str]) -> dict:
    """The memory knobs the user set on the command line: those win over the planner."""
    knobs = {}
    for override in task_overrides:
        key, _, value = override.lstrip("+~").partition("=")
        name = key.removeprefix("hardware.memory.")
        if key.startswith("hardware.memory.") and name in Mechanisms.__dataclass_fields__:
            knobs[name] = value.lower() == "true" if name == "vae_tiling" else value
    return knobs


def _inputs(cfg) -> tuple[ModelSizes, Request, Mechanisms, float, float, str]:
    """The planner's view of a composed run config: sizes, request, the profile's mechanisms, budgets, and
    where the VRAM budget came from."""
    mem, model = cfg.hardware.memory, cfg.model
    req = _request(cfg)
    if (layout := parallel_layout(cfg)) is not None:
        req = replace(req, sequence_parallel=layout.sequence, weight_shards=layout.world if layout.shard else 1)
    profile = Mechanisms(mem.experts, mem.weight_dtype, mem.text_encoder, mem.vae_tiling)
    budget, source = vram_budget(cfg)
    return model_sizes(model.family), req, profile, budget, mem.host_ram_gb or host_ram_gb(), source


def _request(cfg) -> Request:
    """A composed run config's request as the planner sees it: size, frames, CFG batching and whether the
    high-noise expert runs both guidance branches."""
    from wan_opt.request import parse_size, run_guidance

    model = cfg.model
    width, height = parse_size(cfg.size or model.sizes[0])
    guided = run_guidance(cfg)[0] > 1.0
    return Request(width, height, cfg.frames or model.frames, cfg.hardware.speed.cfg == "batched", guided)


def parallel_layout(cfg):
    """How this torchrun group splits the request (None in a single process); a split the model cannot take
    is an error here, before anything loads."""
    from wan_opt import parallel
    from wan_opt.request import run_guidance

    if parallel.world_size() == 1:
        return None
    model = cfg.model
    sizes = model_sizes(model.family)
    count = tokens(sizes, _request(cfg))
    return parallel.plan_layout(parallel.world_size(), cfg.hardware.parallel, sizes.attention_heads, count,
                                any(g is not None and g > 1.0 for g in run_guidance(cfg)), model.name)


CUDA_CONTEXT_GIB = 0.5  # what this process's CUDA context will take of the free memory


def _free_gib_now() -> tuple[float | None, str]:
    """Free memory of this process's GPU, what this process holds itself counted as free, and its name."""
    import torch

    from wan_opt.hardware import process_gpu

    gpu = process_gpu()
    if gpu is None or gpu.free_gib is None:
        return None, ""
    # A model kept from an earlier job of this sweep is this process's to reuse or free.
    own = torch.cuda.memory_reserved() / GIB if torch.cuda.is_initialized() else 0.0
    return gpu.free_gib + own, gpu.name


def vram_budget(cfg) -> tuple[float, str]:
    """The GPU memory a plan may use, and where that number came from.

    `vram_budget_source=free` lowers the profile's budget to what the GPU has free when the run starts, for a
    card shared with other processes; it never raises it.
    """
    mem = cfg.hardware.memory
    if mem.vram_budget_source != "free" or cfg.hardware.device == "cpu":
        return mem.vram_budget_gb, "profile"
    free, name = _free_gib_now()
    if free is None:
        log.warning("vram_budget_source=free, but the GPU's free memory cannot be read; planning to the "
                    "profile's %g GB.", mem.vram_budget_gb)
        return mem.vram_budget_gb, "profile"
    usable = round(free - CUDA_CONTEXT_GIB, 2)
    if usable < mem.vram_budget_gb:
        return usable, f"free: {free:.1f} GiB free on {name}"
    return mem.vram_budget_gb, f"profile: below the {free:.1f} GiB free on {name}"


def _allow_fp8(cfg) -> bool:
    return cfg.hardware.gpu.capability >= 8.9 or cfg.hardware.memory.weight_dtype.startswith("float8")


def plan_for_config(cfg, task_overrides: list[str]) -> tuple[Plan, dict[str, str]]:
    """The plan for a composed run config, and which of profile / planner / user decided each knob.

    The profile's own mechanisms stand when they fit; otherwise the planner picks the fastest plan that fits,
    keeping every knob the user set by hand (and warning if those then do not fit).
    """
    mem, model = cfg.hardware.memory, cfg.model
    sizes, req, profile, budget, host, source = _inputs(cfg)
    fixed = user_memory_knobs(task_overrides)
    if cfg.hardware.device == "cpu":
        plan = predict(sizes, req, profile, mem.compute_dtype, mem.vae_dtype, float("inf"), host)
        plan.vram_budget_gb = 0.0
        return plan, {k: "profile" for k in asdict(profile)}
    own = predict(sizes, req, replace(profile, **fixed), mem.compute_dtype, mem.vae_dtype, budget, host)
    own.budget_source = source
    if own.fits:
        return own, {k: "user" if k in fixed else "profile" for k in asdict(profile)}
    plan = plan_memory(model.family, req, budget, host, mem.compute_dtype, mem.vae_dtype, _allow_fp8(cfg), fixed)
    plan.budget_source = source
    if not plan.fits and fixed:
        log.warning("The memory knobs set by hand (%s) do not fit %s GB; running them anyway.",
                    ", ".join(f"{k}={v}" for k, v in fixed.items()), budget)
    elif not plan.fits:
        raise no_plan_fits(model.family, req, plan, mem.compute_dtype, mem.vae_dtype, _allow_fp8(cfg))
    decided = {k: "user" if k in fixed else ("planner" if plan.mechanisms[k] != v else "profile")
               for k, v in asdict(profile).items()}
    return plan, decided


def next_plan_down(cfg, failed: Plan, task_overrides: list[str]) -> Plan:
    """After an out-of-memory error: the fastest plan predicted to need clearly less GPU memory than `failed`."""
    mem = cfg.hardware.memory
    sizes, req, _, budget, host, _ = _inputs(cfg)
    fixed = user_memory_knobs(task_overrides)
    leaner = []
    for mech in candidates(_allow_fp8(cfg)):
        plan = predict(sizes, req, replace(mech, **fixed), mem.compute_dtype, mem.vae_dtype, budget, host)
        if plan.predicted_peak_gpu_gb <= 0.85 * failed.predicted_peak_gpu_gb and plan.predicted_host_gb <= host:
            leaner.append(plan)
    if not leaner:
        raise WanOptError(f"Out of GPU memory even with the leanest plan ({failed.mechanisms}): "
                          f"free the GPU of other processes, or ask for fewer frames or a smaller size.")
    lossless = [p for p in leaner if p.mechanisms["weight_dtype"] != "float8_e4m3fn"]
    return min(lossless or leaner, key=lambda p: p.est_extra_seconds)

"""The memory planner: a request and a budget in, the fastest set of mechanisms that fits out.

Pure arithmetic over the architecture's sizes (wan_opt.loading.arch.model_sizes) and the activation and decode
costs measured on an H100 (docs/measured.md, "Memory"). No GPU, no weights, no checkpoint, no config needed.
"""
from __future__ import annotations

import itertools
import logging
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


def plan_memory(sizes: ModelSizes, req: Request, vram_budget_gb: float, host_ram_gb: float, compute_dtype: str = "bfloat16",
                vae_dtype: str = "float32", allow_fp8: bool = True, fixed: dict | None = None) -> Plan:
    """The fastest plan that fits; knobs in `fixed` (set by hand) are kept as given, fitting or not."""
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


def no_plan_fits(sizes: ModelSizes, req: Request, plan: Plan, compute_dtype: str, vae_dtype: str,
                 allow_fp8: bool) -> WanOptError:
    """One sentence: the smallest VRAM (and its host RAM) that would run this, and the nearest request that fits."""
    smallest = min((predict(sizes, req, m, compute_dtype, vae_dtype, 1e9, 1e9) for m in candidates(allow_fp8)),
                   key=lambda p: (p.predicted_peak_gpu_gb, p.predicted_host_gb))
    nearest = "none at this size"
    smaller = [replace(req, frames=f) for f in range(req.frames - 4, 0, -4)]
    smaller += [replace(req, width=w, height=h) for w, h in ((832, 480), (480, 832)) if w * h < req.width * req.height]
    for candidate in smaller:
        if plan_memory(sizes, candidate, plan.vram_budget_gb, plan.host_ram_gb, compute_dtype, vae_dtype,
                       allow_fp8).fits:
            nearest = f"size={candidate.width}*{candidate.height} frames={candidate.frames}"
            break
    return WanOptError(
        f"No memory plan fits {req.width}*{req.height} x {req.frames} frames in {plan.vram_budget_gb:g} GB of VRAM "
        f"and {plan.host_ram_gb:.0f} GB of host RAM: the leanest plan needs {smallest.predicted_peak_gpu_gb / SAFETY:.1f} "
        f"GB of VRAM with {smallest.predicted_host_gb / SAFETY:.1f} GB of host RAM; the nearest request that fits "
        f"here: {nearest}."
    )


def next_plan_down(sizes: ModelSizes, req: Request, failed: Plan, compute_dtype: str, vae_dtype: str,
                   vram_budget_gb: float, host_ram_gb: float, allow_fp8: bool, fixed: dict) -> Plan:
    """After an out-of-memory error: the fastest plan predicted to need clearly less GPU memory than `failed`."""
    leaner = []
    for mech in candidates(allow_fp8):
        plan = predict(sizes, req, replace(mech, **fixed), compute_dtype, vae_dtype, vram_budget_gb, host_ram_gb)
        if plan.predicted_peak_gpu_gb <= 0.85 * failed.predicted_peak_gpu_gb and plan.predicted_host_gb <= host_ram_gb:
            leaner.append(plan)
    if not leaner:
        raise WanOptError(f"Out of GPU memory even with the leanest plan ({failed.mechanisms}): "
                          f"free the GPU of other processes, or ask for fewer frames or a smaller size.")
    lossless = [p for p in leaner if p.mechanisms["weight_dtype"] != "float8_e4m3fn"]
    return min(lossless or leaner, key=lambda p: p.est_extra_seconds)


# -- several GPUs: how a torchrun group splits one request ---------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How `world` GPUs split one request."""

    world: int
    cfg: int  # 2: the guidance branches on two halves; 1: every GPU runs both branches
    ring: int
    ulysses: int
    shard: bool

    @property
    def sequence(self) -> int:
        return self.ring * self.ulysses


def plan_layout(world: int, parallel, heads: int, tokens: int, guided: bool, model_name: str) -> Layout:
    """The degrees for `world` GPUs from a profile's `parallel:` block; a split the model cannot take is an error."""
    cfg = 2 if parallel.cfg_parallel and guided and world % 2 == 0 else 1
    sequence = world // cfg
    ulysses, ring = (sequence, 1) if parallel.sequence == "ulysses" else (1, sequence)
    if heads % ulysses:
        fits = [d for d in range(2, world + 1) if heads % d == 0 and d <= 8]
        raise WanOptError(
            f"Ulysses attention splits {model_name}'s {heads} attention heads across {ulysses} GPUs per guidance "
            f"branch, and {heads} is not divisible by {ulysses}: use {', '.join(map(str, fits)) or 'a divisor'} GPUs "
            f"per branch, or pass hardware.parallel.sequence=ring.")
    if tokens % sequence:
        raise WanOptError(f"The request's {tokens} latent tokens do not split evenly across {sequence} GPUs: "
                          f"choose another size or number of frames, or fewer GPUs.")
    return Layout(world, cfg, ring, ulysses, bool(parallel.shard))

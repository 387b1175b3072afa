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
ACT_GIB_PER_TOKEN = 1.0e-4  # per latent token and batch element of an A14B expert (7.6 GiB at 75,600 tokens)
MEASURED_WIDTH = 5120  # an A14B expert's hidden size: narrower DiTs scale the per-token activations by their width
ACT_FIXED_GIB = 0.5
DECODE_720P_GIB = {"float32": 20.2, "bfloat16": 10.1, "float16": 10.1}  # untiled, 1280*720*81
DECODE_TILED_GIB = {"float32": 3.9, "bfloat16": 2.0, "float16": 2.0}
PIXELS_720P_81 = 1280 * 720 * 81
# Image-to-video's VAE encode of the conditioning video works 4 frames at a time (the first alone), at full size:
# the untiled working set of a 1280*720 chunk, estimated at 0.7 of the decode's (the encoder's and the decoder's
# peaks on the CPU at 320*176 x 9: 0.94 and 1.36 GiB; docs/image-to-video.md), until a GPU measures it; tiled,
# one 256-pixel tile's.
ENCODE_720P_GIB = {"float32": 14.0, "bfloat16": 7.0, "float16": 7.0}
ENCODE_TILED_GIB = {"float32": 1.0, "bfloat16": 0.5, "float16": 0.5}
PIXELS_720P = 1280 * 720
# The VAE the decode figures above were measured on: the Wan 2.1 VAE (billions of parameters).
MEASURED_VAE_PARAMS_B = 0.127
# The decoded video in host memory, once (wan_opt.pipeline.host_frames): float32 for the Python API's default
# output_type="np", the most the pipeline hands back; run.py's 8-bit pixels take a quarter of it.
FRAME_BYTES = 4
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}
# Seconds a mechanism adds, from the H100 measurements; used only to rank plans, never reported as a result.
COST = {"offload_per_step_fraction": 0.08, "swap_seconds": 2.0, "te_release_seconds": 0.5,
        "te_cpu_seconds": 4.6, "tiling_seconds": 6.0, "read_gb_per_second": 2.0, "vae_release_seconds": 0.3}
# Host memory (docs/memory-floor.md). The process beside its weights: Python, torch and the libraries, the CUDA
# context's host side (a 24 GiB-capped run peaked at 65.4 GiB with 63.8 GiB of weights in host memory; the VAE's
# convolutions load cuDNN's kernels later).
HOST_BASE_GIB = 2.0
PINNED_CHUNK_GIB = 1.0  # pinned copies are packed into 1 GiB chunks (wan_opt.memory.policy): the last is part used
READ_TRANSIENT_GIB = 0.3  # one tensor in flight while an expert is read from its files (the largest: 0.26 GiB fp32)
TE_READ_TRANSIENT_GIB = 2.0  # the same for UMT5-XXL: its token embedding, 1.96 GiB in bf16
# Bytes per parameter of the files as the Wan team releases them (experts in float32, UMT5 in bfloat16): what a
# plan that reads from the checkpoint again reads per request (ranking only, like COST).
FILE_BYTES = {"expert": 4, "text_encoder": 2}


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
    width: int = 0  # the DiT's hidden size
    per_token_timesteps: bool = False  # a time embedding per latent token (TI2V-5B), not one per sample
    text_encoder_embedding_params_b: float = 0.0  # its token embedding: read from a mapped file only where looked up
    vae_decode_scale: float = 1.0  # the VAE's decode working set against the Wan 2.1 VAE's measured one


@dataclass(frozen=True)
class Request:
    width: int
    height: int
    frames: int
    batched_cfg: bool = False
    guided: bool = True
    sequence_parallel: int = 1  # GPUs each forward's tokens are split across (torchrun)
    weight_shards: int = 1  # GPUs each expert and the text encoder are sharded across (FSDP2)
    image_frames: int = 0  # image-to-video: frames of the conditioning video the VAE encodes (0: none)


@dataclass(frozen=True)
class Mechanisms:
    """The memory knobs a plan sets (the fields of a profile's `memory:` block that the planner owns)."""

    experts: str = "resident"  # resident | swap | offload
    weight_dtype: str = "bfloat16"
    text_encoder: str = "gpu"  # gpu | gpu_release | cpu
    vae_tiling: bool = False
    idle_weights: str = "host"  # host | checkpoint: where an idle expert or text encoder waits
    vae_release: bool = False  # the VAE waits in pinned host memory outside its encode and decode


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
    host_stages: dict[str, float] = field(default_factory=dict)  # predicted peak resident set of each stage, GiB
    read_gb_per_request: float = 0.0  # what each request reads from the checkpoint's files again, GB

    def to_dict(self) -> dict:
        return asdict(self)


def tokens(sizes: ModelSizes, req: Request) -> int:
    frames = (req.frames - 1) // sizes.temporal_compression + 1
    return frames * (req.height // sizes.spatial_compression) * (req.width // sizes.spatial_compression)


def expert_gib(sizes: ModelSizes, weight_dtype: str, compute_dtype: str) -> float:
    """One expert's weights: its block linears in the storage dtype, the rest in the compute dtype."""
    quantized = sizes.expert_block_linear_params_b
    return (quantized * BYTES[weight_dtype] + (sizes.expert_params_b - quantized) * BYTES[compute_dtype]) * 1e9 / GIB


def predict(sizes: ModelSizes, req: Request, mech: Mechanisms, compute_dtype: str, vae_dtype: str,
            vram_budget_gb: float, host_ram_gb: float, steps: int = 40) -> Plan:
    """Predicted peak GPU memory of each stage (GiB) and host memory, for one set of mechanisms."""
    expert = expert_gib(sizes, mech.weight_dtype, compute_dtype)
    te = sizes.text_encoder_params_b * 1e9 * BYTES[compute_dtype] / GIB
    # Per GPU under torchrun: FSDP2 keeps 1/N of the experts (plus one gathered block, in the 0.5 GiB margin
    # of the activations) and of a text encoder that stays on the GPUs; one that is released or runs on the
    # CPU is not sharded (wan_opt.parallel.apply), so it comes whole. A sequence split keeps 1/N of the
    # tokens' activations.
    expert = expert / req.weight_shards
    if mech.text_encoder == "gpu":
        te = te / req.weight_shards
    vae = sizes.vae_params_b * 1e9 * BYTES[vae_dtype] / GIB
    vae_idle = 0.0 if mech.vae_release else vae  # on the GPU outside the VAE's own stages
    batch = 2 if (req.batched_cfg and req.guided) else 1
    act = activations_gib(sizes, req, batch) / req.sequence_parallel + ACT_FIXED_GIB
    # Offloaded experts stream block by block: a few blocks in flight plus the non-block weights.
    expert_on_gpu = {"resident": expert, "swap": expert, "offload": expert * 0.06}[mech.experts]
    resident_experts = expert * sizes.experts if mech.experts == "resident" else 0.0
    te_gpu = te if mech.text_encoder == "gpu" else 0.0
    decode = decode_gib(sizes, req, mech, vae_dtype)
    stages = {
        "encode": resident_experts + vae_idle + (te + 0.3 if mech.text_encoder != "cpu" else 0.0),
        "denoise_high_noise": max(resident_experts, expert_on_gpu) + te_gpu + vae_idle + act,
        "decode": resident_experts + te_gpu + vae + decode,
    }
    if req.image_frames:  # between the text encode and the first step
        encoded = resident_experts + te_gpu + vae + vae_encode_gib(req, mech, vae_dtype)
        stages = {"encode": stages.pop("encode"), "vae_encode": encoded, **stages}
    if sizes.experts == 2:
        stages["denoise_low_noise"] = stages["denoise_high_noise"]
        stages["switch"] = resident_experts + te_gpu + vae_idle + (expert if mech.experts == "swap" else 0.0)
    mapped = mech.idle_weights == "checkpoint"
    # Loading: read from the files, every tensor goes to its place in its final dtype; loaded by the libraries,
    # an fp8-stored expert is whole in the compute dtype before it is quantized.
    loaded = expert if mapped else expert_gib(sizes, compute_dtype if mech.weight_dtype.startswith("float8")
                                              else mech.weight_dtype, compute_dtype) / req.weight_shards
    stages = {"load": (loaded * sizes.experts if mech.experts == "resident" else 0.0) + te_gpu + vae_idle + (
        READ_TRANSIENT_GIB if mapped else 0.0), **stages}
    hosts = host_stages(sizes, req, mech, compute_dtype, expert, loaded, te, stages,
                        pinned_gib(vae) if mech.vae_release else 0.0)
    host = max(hosts.values())
    peak = max(stages.values())
    extra = (COST["offload_per_step_fraction"] * steps * 10.0 * (mech.experts == "offload")
             + COST["swap_seconds"] * (mech.experts == "swap")
             + COST["te_release_seconds"] * (mech.text_encoder == "gpu_release")
             + COST["te_cpu_seconds"] * (mech.text_encoder == "cpu")
             + COST["tiling_seconds"] * mech.vae_tiling
             + COST["vae_release_seconds"] * mech.vae_release)
    reads = reread_gb(sizes, mech)
    extra += reads / COST["read_gb_per_second"]
    fits = peak <= vram_budget_gb * SAFETY and host <= host_ram_gb * SAFETY
    return Plan(fits, round(peak, 2), vram_budget_gb, host_ram_gb, round(host, 2), asdict(mech),
                {k: round(v, 2) for k, v in stages.items()}, round(extra, 1),
                host_stages={k: round(v, 2) for k, v in hosts.items()}, read_gb_per_request=round(reads, 1))


def activations_gib(sizes: ModelSizes, req: Request, batch: int) -> float:
    """A forward's working set beyond ACT_FIXED_GIB, scaled by the DiT's width. With a timestep per token,
    diffusers' WanTransformer3DModel also keeps a time embedding per token: its 6 modulation vectors and the
    output's in bf16 for the whole forward, and each block adds the 6 to its table in float32 (38 bytes per
    token and channel; 3.0 GiB at TI2V-5B's 27,280 tokens, where 3.0 is what the measured peak leaves)."""
    width = sizes.width or MEASURED_WIDTH
    per_token = ACT_GIB_PER_TOKEN * width / MEASURED_WIDTH + (
        (7 * 2 + 6 * 4) * width / GIB if sizes.per_token_timesteps else 0.0)
    return per_token * tokens(sizes, req) * batch


def decode_gib(sizes: ModelSizes, req: Request, mech: Mechanisms, vae_dtype: str) -> float:
    """The VAE decode's working set: fixed when tiled, by the pixels untiled, and by the VAE against the Wan 2.1
    VAE it was measured on."""
    pixels = req.width * req.height * req.frames / PIXELS_720P_81
    return (DECODE_TILED_GIB[vae_dtype] if mech.vae_tiling else DECODE_720P_GIB[vae_dtype] * pixels
            ) * sizes.vae_decode_scale


def frames_gib(req: Request) -> float:
    """The decoded video in host memory: RGB, FRAME_BYTES a value (no VAE makes it smaller)."""
    return req.width * req.height * req.frames * 3 * FRAME_BYTES / GIB


def vae_encode_gib(req: Request, mech: Mechanisms, vae_dtype: str) -> float:
    """The VAE encode of image-to-video beyond the resident weights: the conditioning video (built in float32,
    then in the VAE's dtype) and the encoder's working set on one chunk of up to 4 frames."""
    pixels = req.width * req.height
    video = req.image_frames * pixels * 3 * (4 + BYTES[vae_dtype]) / GIB
    chunk = min(req.image_frames, 4) / 4
    work = ENCODE_TILED_GIB[vae_dtype] if mech.vae_tiling else ENCODE_720P_GIB[vae_dtype] * pixels / PIXELS_720P
    return video + work * chunk


def pinned_gib(gib: float) -> float:
    """Host memory a pinned copy of `gib` takes: whole chunks."""
    return -(-gib // PINNED_CHUNK_GIB) * PINNED_CHUNK_GIB


def host_stages(sizes: ModelSizes, req: Request, mech: Mechanisms, compute_dtype: str, expert: float,
                loaded: float, te: float, stages: dict, vae_pinned: float = 0.0) -> dict[str, float]:
    """Predicted peak resident set (GiB) of each stage, beside the GPU's: the process, the weights waiting in host
    memory, and what the stage adds (a module read from the files, the decoded frames).

    idle_weights=host keeps every expert that is not resident pinned, and the text encoder (pinned when it is
    released to the GPU, plain on the CPU); loaded by the libraries, those experts come whole in the compute
    dtype first. idle_weights=checkpoint holds one pinned expert (offload; none with swap, which reads straight
    to the GPU) and the text encoder only while it encodes. An offloaded expert's weights outside its blocks move
    to plain host memory once it has run (diffusers' group offloading copies them back each forward). A released
    VAE waits pinned in every stage.
    """
    mapped = mech.idle_weights == "checkpoint"
    outside = (sizes.expert_params_b - sizes.expert_block_linear_params_b) * BYTES[compute_dtype] * 1e9 / GIB
    # pinned expert copies: none resident, nor swapped from the files (read straight to the GPU); one arena
    # when offloaded from the files; every expert otherwise
    none = mech.experts == "resident" or (mapped and mech.experts == "swap")
    copies = 0 if none else (1 if mapped else sizes.experts)
    outside_blocks = sizes.experts * outside if mech.experts == "offload" else 0.0
    waiting = copies * pinned_gib(expert) + outside_blocks
    kept_te = 0.0 if mapped else {"gpu": 0.0, "gpu_release": pinned_gib(te), "cpu": te}[mech.text_encoder]
    # a text encoder that runs on the CPU from its mapped file: only the embedding's rows it looks up are read
    embedding = sizes.text_encoder_embedding_params_b * BYTES[compute_dtype] * 1e9 / GIB
    encoding_te = kept_te if not mapped else {"gpu": 0.0, "gpu_release": TE_READ_TRANSIENT_GIB,
                                               "cpu": te - embedding}[mech.text_encoder]
    transient = READ_TRANSIENT_GIB if mapped else 0.0
    if mapped:  # the arena is allocated after the modules that never wait were read (a kept encoder: its embedding)
        load = waiting - outside_blocks + transient
        load = max(load, TE_READ_TRANSIENT_GIB if mech.text_encoder == "gpu" else 0.0)
    else:
        # transformers maps the encoder's file while it copies it into host memory: both count in the resident
        # set until the load returns (the resident 80 GB plan's record: 22.4 GiB at load, 12.5 GiB after)
        on_host = 0.0 if mech.experts == "resident" else sizes.experts * loaded
        load = on_host + (2 * te if mech.text_encoder != "gpu" else 0.0)
    frames = frames_gib(req)
    hosts = {"load": load, "encode": waiting + encoding_te}
    for stage in stages:
        if stage.startswith("denoise") or stage == "vae_encode":
            hosts[stage] = waiting + kept_te
    if "switch" in stages:
        hosts["switch"] = waiting + kept_te + transient
    hosts["decode"] = waiting + kept_te + frames
    return {stage: HOST_BASE_GIB + vae_pinned + gib for stage, gib in hosts.items()}


def reread_gb(sizes: ModelSizes, mech: Mechanisms) -> float:
    """GB a request reads from the checkpoint's files beyond the first load: with idle_weights=checkpoint, both
    experts of a two-expert model unless they stay resident, and the text encoder unless it stays on the GPU."""
    if mech.idle_weights != "checkpoint":
        return 0.0
    experts = sizes.experts * sizes.expert_params_b * FILE_BYTES["expert"] if (
        mech.experts != "resident" and sizes.experts > 1) else 0.0
    te = sizes.text_encoder_params_b * FILE_BYTES["text_encoder"] if mech.text_encoder != "gpu" else 0.0
    return experts + te


def candidates(allow_fp8: bool) -> list[Mechanisms]:
    """Every combination, lossless (bf16 storage) before fp8 storage."""
    dtypes = ["bfloat16", "float8_e4m3fn"] if allow_fp8 else ["bfloat16"]
    return [Mechanisms(e, d, t, v, i, r) for d, e, t, v, i, r in itertools.product(
        dtypes, ("resident", "swap", "offload"), ("gpu", "gpu_release", "cpu"), (False, True), ("host", "checkpoint"),
        (False, True))]


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
                 allow_fp8: bool, fixed: dict | None = None) -> WanOptError:
    """One sentence: the smallest VRAM (and its host RAM) that would run this, the host RAM it needs with this
    VRAM and the VRAM with this host RAM, and the nearest request that fits."""
    every = [predict(sizes, req, replace(m, **(fixed or {})), compute_dtype, vae_dtype, 1e9, 1e9)
             for m in candidates(allow_fp8)]
    smallest = min(every, key=lambda p: (p.predicted_peak_gpu_gb, p.predicted_host_gb))
    vram, host = plan.vram_budget_gb, plan.host_ram_gb
    with_vram = [p.predicted_host_gb for p in every if p.predicted_peak_gpu_gb <= vram * SAFETY]
    with_host = [p.predicted_peak_gpu_gb for p in every if p.predicted_host_gb <= host * SAFETY]
    needs = (f"; with {vram:g} GB of VRAM it needs {min(with_vram) / SAFETY:.1f} GB of host RAM" if with_vram
             else f"; no plan runs in {vram:g} GB of VRAM")
    needs += (f", with {host:.0f} GB of host RAM {min(with_host) / SAFETY:.1f} GB of VRAM" if with_host
              else f", and none in {host:.0f} GB of host RAM")
    nearest = "none at this size"
    smaller = [replace(req, frames=f) for f in range(req.frames - 4, 0, -4)]
    smaller += [replace(req, width=w, height=h) for w, h in ((832, 480), (480, 832)) if w * h < req.width * req.height]
    for candidate in smaller:
        if plan_memory(sizes, candidate, vram, host, compute_dtype, vae_dtype, allow_fp8, fixed).fits:
            nearest = f"size={candidate.width}*{candidate.height} frames={candidate.frames}"
            break
    return WanOptError(
        f"No memory plan fits {req.width}*{req.height} x {req.frames} frames in {vram:g} GB of VRAM "
        f"and {host:.0f} GB of host RAM: the leanest plan needs {smallest.predicted_peak_gpu_gb / SAFETY:.1f} "
        f"GB of VRAM with {smallest.predicted_host_gb / SAFETY:.1f} GB of host RAM{needs}; the nearest request "
        f"that fits here: {nearest}."
    )


def host_plan(sizes: ModelSizes, req: Request, mech: Mechanisms, compute_dtype: str, vae_dtype: str,
              host_ram_gb: float) -> Plan:
    """The plan of a run on the CPU. Every module stays in host memory and the largest working set comes on
    top: a forward's activations or the VAE decode, as measured for the full-size modules (above) and scaled
    down for smaller ones (activations with the DiT's width; the decode with the VAE's parameters), plus the
    decoded frames themselves, which no VAE makes smaller."""
    plan = predict(sizes, req, mech, compute_dtype, vae_dtype, float("inf"), host_ram_gb)  # stages, for the table
    weights = (sizes.experts * expert_gib(sizes, mech.weight_dtype, compute_dtype)
               + (sizes.text_encoder_params_b * BYTES[compute_dtype] + sizes.vae_params_b * BYTES[vae_dtype])
               * 1e9 / GIB)
    batch = 2 if (req.batched_cfg and req.guided) else 1
    act = ACT_FIXED_GIB + activations_gib(sizes, req, batch)
    decode = decode_gib(sizes, req, mech, vae_dtype) * min(1.0, sizes.vae_params_b / MEASURED_VAE_PARAMS_B)
    decode += frames_gib(req)
    plan.vram_budget_gb = 0.0
    plan.host_stages = {}  # one total on the CPU (below), not the stages of a GPU run
    plan.predicted_host_gb = round(weights + max(act, decode), 2)
    plan.fits = plan.predicted_host_gb <= host_ram_gb * SAFETY
    return plan


def host_refusal(sizes: ModelSizes, req: Request, plan: Plan, compute_dtype: str, vae_dtype: str,
                 model_name: str) -> WanOptError:
    """One sentence for a CPU run that host memory cannot hold: what it needs, and whether a smaller request
    would do or the model alone is too large."""
    mech = Mechanisms(**plan.mechanisms)
    smallest = host_plan(sizes, replace(req, frames=1, width=sizes.spatial_compression,
                                        height=sizes.spatial_compression), mech, compute_dtype, vae_dtype, 1e9)
    fix = (f"the model alone needs {smallest.predicted_host_gb / SAFETY:.0f} GB, so run it on a GPU profile"
           if smallest.predicted_host_gb > plan.host_ram_gb * SAFETY else "ask for fewer frames or a smaller size")
    return WanOptError(f"On the CPU, {model_name} at {req.width}*{req.height} x {req.frames} frames needs about "
                       f"{plan.predicted_host_gb / SAFETY:.0f} GB of host memory and {plan.host_ram_gb:.0f} GB "
                       f"are here: {fix}.")


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

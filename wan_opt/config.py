"""Structured-config schemas of every config group, registered with Hydra's ConfigStore: the one owner of
every knob, its type, its default and the words it accepts.

The YAML files under conf/ are merged onto these dataclasses, so a misspelt key, a value of the wrong type
or a word a knob does not take is an error when Hydra composes the config, not a silent no-op. The runtime
policies subclass these schemas (wan_opt.memory.policy, wan_opt.optim.speed) rather than repeating them;
rules across knobs are wan_opt.checks.check_knobs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# An installed package carries the tree as wan_opt/conf; a checkout keeps it at the top, as conf/.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parent.parent / "conf"
AUTO_PROFILE = "auto"  # hardware/auto.yaml: a placeholder resolved on the machine that runs the job, not a card

# The Wan team's default negative prompt (Wan2.2 shared_config.sample_neg_prompt), used when none is given.
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class Choice(str, Enum):
    """A knob's fixed words. Members are their own strings ("swap" == Experts.swap), print as the word, and
    Hydra refuses any other word when it composes, listing the ones accepted."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:  # plans and messages print {'experts': 'swap'}, as they would with plain words
        return repr(self.value)


def _choice(name: str, *words: str) -> type[Choice]:
    return Choice(name, [(w, w) for w in words], module=__name__, qualname=name)


Mode = _choice("Mode", "lossless", "fast")
Device = _choice("Device", "cuda", "cpu")
Experts = _choice("Experts", "resident", "swap", "offload")
BudgetSource = _choice("BudgetSource", "profile", "free")  # free: no more than the GPU has free at the start
OffloadGranularity = _choice("OffloadGranularity", "block", "leaf")
TextEncoderPlacement = _choice("TextEncoderPlacement", "gpu", "gpu_release", "cpu")
# Where weights wait while their module is idle: host (pinned host memory, loaded once) or checkpoint (the
# checkpoint's own files, memory-mapped, read again when the module is next needed: wan_opt.loading.mapped).
IdleWeights = _choice("IdleWeights", "host", "checkpoint")
WeightDtype = _choice("WeightDtype", "bfloat16", "float16", "float32", "float8_e4m3fn")
ComputeDtype = _choice("ComputeDtype", "bfloat16", "float16", "float32")
# fp8: wan-opt's kernel, within 3% of exact attention; hopper: wan-opt's exact bf16 kernel for Hopper;
# flash4/flash3/sage: separately installed libraries (sage: SageAttention, only when named; its 8-bit Q K^T is
# not held to that bound)
Attention = _choice("Attention", "auto", "cudnn", "flash", "efficient", "math", "flash4", "flash3", "sage", "fp8",
                    "hopper")
Compile = _choice("Compile", "none", "regional", "full")
CfgBatching = _choice("CfgBatching", "sequential", "batched")
StepCache = _choice("StepCache", "none", "first_block", "taylorseer", "magcache")
SequenceSplit = _choice("SequenceSplit", "ulysses", "ring")
# i2v_a14b: T2V-A14B's experts on 36 input channels (the image's latents and mask join the noise); tiny, tiny_i2v
# and tiny_ti2v: the tiny counterparts of T2V-A14B, I2V-A14B and TI2V-5B (wan_opt.loading.layouts.TINY_SHAPES).
# What each family does with an image: wan_opt.image.IMAGE_USE.
Family = _choice("Family", "t2v_a14b", "i2v_a14b", "ti2v_5b", "tiny", "tiny_i2v", "tiny_ti2v")
Solver = _choice("Solver", "unipc")


@dataclass
class GPUMatch:
    """How auto-detection recognises the card a profile is written for."""

    names: list[str] = field(default_factory=list)  # fragments of the normalized NVML name, e.g. "h100"
    memory_gb: float = 0.0  # the card's memory as sold (80 for an H100)
    capability: float = 0.0  # CUDA compute capability, major.minor


@dataclass
class MemoryConfig:
    """Where the weights live and in what precision: the memory policy of a profile."""

    _target_: str = "wan_opt.memory.policy.MemoryPolicy"
    vram_budget_gb: float = 0.0
    vram_budget_source: BudgetSource = BudgetSource.profile
    host_ram_gb: Optional[float] = None  # host memory the plan may use; null: this machine's total
    experts: Experts = Experts.resident
    swap_overlap: bool = False  # swap: copy the next expert block by block while its first blocks already run
    offload_granularity: OffloadGranularity = OffloadGranularity.block  # used when experts=offload
    offload_blocks_per_group: int = 1
    offload_use_stream: bool = True
    text_encoder: TextEncoderPlacement = TextEncoderPlacement.gpu
    weight_dtype: WeightDtype = WeightDtype.bfloat16  # storage dtype of the experts
    compute_dtype: ComputeDtype = ComputeDtype.bfloat16
    vae_dtype: ComputeDtype = ComputeDtype.float32
    vae_tiling: bool = False
    # the VAE waits in pinned host memory and comes to the GPU only for its encode and decode (a Wan 2.2 VAE's
    # 1.3 GiB in bf16 left out of the denoising steps' peak)
    vae_release: bool = False
    # checkpoint: the text encoder is read for each encode and dropped (its output kept), one expert is held at a
    # time (the next read at the boundary), each read tensor by tensor from the memory-mapped files
    idle_weights: IdleWeights = IdleWeights.host
    expandable_segments: bool = True  # PyTorch's allocator grows segments instead of leaving freed gaps


@dataclass
class SpeedConfig:
    """Kernel and scheduling choices that change speed, not what is kept in memory."""

    _target_: str = "wan_opt.optim.speed.SpeedPolicy"
    attention: Attention = Attention.auto
    compile: Compile = Compile.none
    compile_mode: Optional[str] = None  # torch.compile mode; null is torch's default
    compile_cache_dir: str = "~/.cache/wan-opt/inductor"  # kept across processes: later runs skip most compiling
    tf32: bool = False
    cfg: CfgBatching = CfgBatching.sequential
    fuse_qkv: bool = False  # one GEMM for Q, K and V (K and V in cross-attention): same math, fewer launches
    fp8_matmul: bool = False  # fp8 tensor-core GEMMs on fp8-stored weights (Ada, Hopper); changes the result a little
    # the feed-forward's GELU in its first matmul's epilogue (cuBLASLt, on a GPU): one pass fewer over the widest
    # activations, one rounding fewer (wan_opt.optim.ffn)
    fuse_gelu: bool = False
    # the VAE's norm and SiLU as one kernel, its convolutions padded in place: the same arithmetic, fewer passes
    # over its activations (wan_opt.optim.vae.fuse_vae)
    fuse_vae: bool = False
    # Fewer forwards (each changes the result a little; the benchmark reports by how much):
    cfg_truncation: float = 0.0  # fraction of the last steps that skip the unconditional pass (low-noise expert only)
    step_cache: StepCache = StepCache.none  # diffusers' cache hooks reuse work across steps
    step_cache_threshold: float = 0.05  # first_block, magcache: recompute when the predicted change is above this
    step_cache_interval: int = 4  # taylorseer, magcache: a full forward at least every this many steps
    step_cache_ratios: str = ""  # magcache: JSON of calibrated ratios; a run without the file yet writes it


@dataclass
class ParallelConfig:
    """How a run under torchrun splits across its GPUs; a single process ignores it."""

    gpus: int = 1  # the GPU count this profile is written for: detection matches it to torchrun's world size
    sequence: SequenceSplit = SequenceSplit.ulysses  # how each forward's tokens are split across GPUs
    cfg_parallel: bool = True  # with guidance and an even GPU count, the two branches run on two halves at once
    shard: bool = False  # FSDP2: every GPU holds 1/N of each expert and of the text encoder


@dataclass
class HardwareConfig:
    name: str = MISSING
    description: str = ""
    device: Device = Device.cuda
    gpu: GPUMatch = field(default_factory=GPUMatch)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class LoraConfig:
    """A LoRA file and strength per expert, fused into the weights at load time (no per-step cost)."""

    high_noise: Optional[str] = None  # LoRA of the high-noise expert (diffusers' `transformer`)
    high_noise_strength: float = 1.0
    low_noise: Optional[str] = None  # LoRA of the low-noise expert (`transformer_2`)
    low_noise_strength: float = 1.0
    required: bool = False  # presets built around a LoRA (step-distilled ones) need both files


@dataclass
class ModelConfig:
    """A model's architecture family, where its weights are, and its official sampling defaults."""

    name: str = MISSING
    family: Family = MISSING
    ckpt_dir: Optional[str] = None
    random_weights: bool = False  # full-size architecture with random weights (benchmarks; output is noise)
    steps: int = MISSING
    solver: Solver = Solver.unipc
    shift: float = MISSING
    guidance: float = MISSING
    guidance_2: Optional[float] = None  # low-noise expert's guidance; null for one-expert models
    boundary: Optional[float] = None  # fraction of the 1000 training timesteps where the experts switch
    frames: int = MISSING
    fps: int = MISSING
    sizes: list[str] = field(default_factory=list)  # official sizes, "W*H"
    pixel_grid: int = 16  # VAE spatial stride x patch size: sizes must be multiples of it
    negative_prompt: str = OFFICIAL_NEGATIVE_PROMPT
    text_len: int = 512
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RunConfig:
    hardware: HardwareConfig = MISSING
    model: ModelConfig = MISSING
    pipeline: Any = field(default_factory=lambda: {"_target_": "wan_opt.pipeline.WanOptPipeline.from_config"})
    prompt: str = ""
    negative_prompt: Optional[str] = None
    seed: int = 0
    steps: Optional[int] = None
    guidance: Optional[float] = None
    guidance_2: Optional[float] = None
    size: Optional[str] = None
    frames: Optional[int] = None
    fps: Optional[int] = None
    output_dir: Optional[str] = None
    plan: bool = False  # print and save the memory plan (plan.json), load nothing
    prompts: Optional[str] = None  # a .txt (one prompt per line) or .jsonl file: one video per line
    image: Optional[str] = None  # the first frame (PNG, JPEG, WebP) of an image-to-video model
    last_image: Optional[str] = None  # the last frame, where the model takes one (wan_opt.image)
    mode: Mode = Mode.lossless  # set by the `mode` group: lossless (the profile as written) | fast (fp8)



def register_configs() -> None:
    """Register the schema that conf/config.yaml names first in its defaults list, and the `pid` resolver."""
    ConfigStore.instance().store(name="wan_opt_schema", node=RunConfig)
    if not OmegaConf.has_resolver("pid"):
        # Run folders carry the process id: two runs started in the same second never share a folder.
        OmegaConf.register_new_resolver("pid", os.getpid)


register_configs()

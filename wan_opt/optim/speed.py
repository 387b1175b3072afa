"""The speed policy: kernels and compilation applied to loaded modules, from a profile's `speed:` block."""
from __future__ import annotations

import logging
import math

import torch
import torch._inductor.config
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from diffusers.utils import is_flash_attn_3_available, is_sageattention_available, is_sageattention_version

from wan_opt.config import SpeedConfig
from wan_opt.hardware import device_capability, is_hopper, world_size
from wan_opt.optim import magcache
from wan_opt.optim.attention import (Flash4SelfAttnProcessor, HopperSelfAttnProcessor, flash4_available,
                                     hopper_kernel_available, use_self_attention)
from wan_opt.optim.fp8_attention import Fp8SelfAttnProcessor
from wan_opt.optim.ffn import fuse_gelu
from wan_opt.optim.fp8 import use_fp8_matmul
from wan_opt.optim.vae import fuse_vae, use_channels_last

log = logging.getLogger(__name__)

# Our names for attention kernels -> diffusers' attention-dispatch backends: PyTorch's SDPA kernels, and two
# from libraries that install separately (FlashAttention-3's flash_attn_3 package, SageAttention). "flash4"
# (FlashAttention-4), "fp8" and "hopper" (wan-opt's kernels) run through wan-opt's own processors
# (WAN_OPT_PROCESSORS). "sage" is an explicit choice only: its quantised attention is not held to the fast mode's
# 3% bound.
ATTENTION_BACKENDS = {
    "cudnn": "_native_cudnn",
    "flash": "_native_flash",
    "efficient": "_native_efficient",
    "math": "_native_math",
    "flash3": "_flash_3",
    "sage": "sage",
}
WAN_OPT_PROCESSORS = {"fp8": Fp8SelfAttnProcessor, "flash4": Flash4SelfAttnProcessor, "hopper": HopperSelfAttnProcessor}
# choice -> (the kernel's name, what to install for it)
OPTIONAL_ATTENTION = {"flash4": ("FlashAttention-4", "the flash-attn-4 package, wan-opt's hopper extra"),
                      "flash3": ("FlashAttention-3", "the flash_attn_3 package"),
                      "sage": ("SageAttention", "sageattention >= 2.1.1")}


def installed_attention(device: torch.device | str | None = None) -> set[str]:
    """The optional attention kernels that can run here: the libraries installed (in the versions diffusers'
    dispatcher accepts), and "hopper" where wan-opt's Gluon kernel runs on `device` (this process's GPU when None)."""

    found = {"flash4"} if flash4_available() else set()
    if is_flash_attn_3_available():
        found.add("flash3")
    if is_sageattention_available() and is_sageattention_version(">=", "2.1.1"):
        found.add("sage")
    if hopper_kernel_available(device):
        found.add("hopper")
    return found


def attention_backend(choice: str, capability: tuple[int, int], installed: set[str], processes: int = 1) -> str | None:
    """diffusers' backend for an attention choice on a GPU of this compute capability; None keeps diffusers'
    default (PyTorch's SDPA, which picks cuDNN on Hopper); "flash4", "fp8" and "hopper" are wan-opt's processors.

    auto, on Hopper, the fastest exact kernel that can run: FlashAttention-4 where it is installed, else wan-opt's
    own kernel ("hopper", PyTorch's Triton is all it needs), else FlashAttention-3 where installed, in one process
    only (diffusers has no context-parallel path for it), else SDPA. Both of the first two beat cuDNN inside a
    whole forward (docs/measured.md, 'Speed at 1280*720' and 'Speed with the exact Hopper kernel'). Other GPUs
    keep SDPA.
    fp8 (mode=fast's choice): wan-opt's kernel, always: it is the one held within 3% of exact attention
    (benchmarks/attention_accuracy.py). SageAttention quantises Q K^T to 8 bits, which that sweep's emulation puts
    past 3% on peaky attention, and is not measured against the bound: it runs only when named (sage).
    """
    if choice == "auto":
        if not is_hopper(capability):
            return None
        for kernel in ("flash4", "hopper"):
            if kernel in installed:
                return kernel
        return "_flash_3" if "flash3" in installed and processes == 1 else None
    return ATTENTION_BACKENDS.get(choice, choice)


class SpeedPolicy(SpeedConfig):
    """A profile's `speed:` block (wan_opt.config.SpeedConfig, the knobs' one definition) put to work."""

    @property
    def batched_cfg(self) -> bool:
        return self.cfg == "batched"

    def guidance_at(self, step: int, steps: int, guidance: float, label: str) -> float:
        """The guidance scale of `step`: 1 (no unconditional pass) in the truncated tail of the low-noise steps.

        Late steps refine detail that the prompt no longer steers much, so the unconditional branch's
        contribution there is small; the high-noise expert, which lays out the scene, always keeps it.
        """
        if label == "high_noise" or self.cfg_truncation <= 0.0:
            return guidance
        return 1.0 if step >= math.ceil((1.0 - self.cfg_truncation) * steps) else guidance

    def cache_config(self):
        """diffusers' cache-hook config for `step_cache`, one per expert (each keeps its own state)."""
        if self.step_cache == "first_block":
            return FirstBlockCacheConfig(threshold=self.step_cache_threshold)
        if self.step_cache == "magcache":
            return magcache.config(self.step_cache_threshold, self.step_cache_interval)
        if self.step_cache == "taylorseer":
            # The lite variant: on predicted steps every block is skipped and only the output projection's
            # result is extrapolated. Extrapolating each block's attention and feed-forward instead keeps two
            # Taylor factors of a full activation per module, more than an 80 GB card holds at 480p.
            return TaylorSeerCacheConfig(cache_interval=self.step_cache_interval, use_lite_mode=True)
        return None

    def begin_request(self, plan) -> None:
        """Per-request settings of the step cache: MagCache's steps and ratios for each expert (`plan`: the
        expert, guidance and label of each step)."""
        if self.step_cache == "magcache":
            magcache.begin(self.step_cache_ratios, plan)

    def end_request(self, plan) -> None:
        """After a request: a calibrating MagCache run writes the ratios it measured."""
        if self.step_cache == "magcache":
            magcache.end(self.step_cache_ratios, plan)

    def fuse(self, experts) -> None:
        """Rewrite the weights before the memory policy takes them over (fp8 storage quantizes the fused ones)."""
        if self.fuse_qkv:
            for expert in experts:
                fuse_attention_projections(expert)

    def apply_to_vae(self, vae, memory) -> None:
        """The VAE's kernels (wan_opt.optim.vae), before the memory policy takes its weights over: `fuse_vae`, and
        channels-last convolutions for a VAE on the GPU that decodes whole frames. A tiled decode and a VAE kept
        in pinned host memory (`vae_release`) keep diffusers' layout: their memory was measured in it."""
        if self.fuse_vae:
            fuse_vae(vae)
        if next(vae.parameters()).is_cuda and not memory.vae_tiling and not memory.vae_release:
            use_channels_last(vae)

    def apply(self, experts, device: torch.device) -> None:
        """Set the kernels of these denoisers for this run; called once after loading."""
        if device.type == "cuda":
            # TF32 only reaches fp32 matmuls and convolutions (VAE, scheduler); bf16 experts are unaffected.
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
        if device.type == "cuda" and self.compile != "none":
            self._use_compile_cache()
        backend = None
        if device.type == "cuda":
            backend = attention_backend(self.attention, device_capability(device), installed_attention(device),
                                        world_size())
        for expert in experts:
            if self.fp8_matmul:
                use_fp8_matmul(expert)  # the fp8-stored layers multiply in fp8 instead of dequantising first
            if self.step_cache != "none" and not expert.is_cache_enabled:
                # Hooks go on before compiling, so that the compiled blocks are the hooked ones.
                expert.enable_cache(self.cache_config())
            if device.type != "cuda":
                continue  # the kernel choices below are CUDA's; on a CPU PyTorch's defaults stand
            if self.fuse_gelu:
                fuse_gelu(expert)  # after use_fp8_matmul, which moves an fp8 feed-forward's GELU elsewhere
            if backend in WAN_OPT_PROCESSORS:
                use_self_attention(expert, WAN_OPT_PROCESSORS[backend])
            elif backend is not None:
                expert.set_attention_backend(backend)
            # The cache hooks decide in Python whether to run a block, and a block's pre-hooks (the overlapped
            # swap's stream waits) run outside the graph: both break it there. So may SageAttention, which
            # diffusers calls as a plain Python function (FlashAttention-3 it wraps as an op the graph keeps).
            fullgraph = (self.step_cache == "none" and backend != "sage"
                         and not any(block._forward_pre_hooks for block in expert.blocks))
            if self.compile == "regional" and self.step_cache == "magcache":
                magcache.compile_blocks(expert, self.compile_mode)
            elif self.compile == "regional":
                # One compiled graph per block class, reused by all 40 blocks and both experts.
                expert.compile_repeated_blocks(fullgraph=fullgraph, dynamic=False, mode=self.compile_mode)
            elif self.compile == "full":
                expert.compile(fullgraph=fullgraph, dynamic=False, mode=self.compile_mode)

    def _use_compile_cache(self) -> None:
        """Inductor's compiled graphs and kernels go to one stable folder, shared by every later process."""
        import os
        from pathlib import Path

        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        folder = Path(self.compile_cache_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        # Importing inductor fills in its /tmp default; a folder the user set themselves is kept.
        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
            os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
        torch._inductor.config.fx_graph_cache = True


def fuse_attention_projections(expert: torch.nn.Module) -> int:
    """Q, K and V of each self-attention in one linear layer, K and V of each cross-attention in one; returns
    how many attention layers were fused.

    diffusers' `fuse_projections` keeps the separate layers beside the fused one (6 GB more per A14B expert);
    the fused layer is all the forward uses, so the separate ones go.
    """
    from diffusers.models.transformers.transformer_wan import WanAttention

    fused = 0
    for attn in expert.modules():
        if not isinstance(attn, WanAttention) or getattr(attn, "fused_projections", False):
            continue
        if any(type(getattr(attn, n)) is not torch.nn.Linear for n in ("to_k", "to_v")):
            raise ValueError("fuse QKV before fp8 storage: the fused weight is built from the bf16 ones")
        attn.fuse_projections()
        for name in ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v"):
            delattr(attn, name)
        fused += 1
    return fused

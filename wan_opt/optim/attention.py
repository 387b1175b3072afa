"""Self-attention on kernels diffusers' dispatcher does not have: wan-opt's own (its exact Hopper kernel here, its
fp8 kernels in wan_opt.optim.fp8_attention) and FlashAttention-4.

Each is a processor for diffusers' Wan attention that computes the projections, norms and rotary embedding as
diffusers does and hands Q, K and V, (B, N, H, D), to its kernel; on a GPU the norms and the rotary embedding
of Q and K run as one Triton kernel (norm_and_rotate). Cross-attention (512 text tokens, ~1% of the FLOPs),
image conditioning and context parallelism (whose split attention these kernels do not do) go to diffusers'
processor unchanged.

FlashAttention-4 (the flash-attn-4 package: CuTe DSL kernels, Hopper and Blackwell) is exact bf16 attention,
faster than cuDNN's at Wan's shapes (docs/measured.md, 'Attention kernels'). wan-opt's exact Hopper kernel
(`attention=hopper`, auto's choice on Hopper without FlashAttention-4, also faster than cuDNN inside a forward) is
the same arithmetic in the Gluon kernel that runs mode=fast's attention on Hopper
(wan_opt/kernels/attention_hopper.py), with P V in bf16, and needs no package beyond PyTorch's Triton.
torch.compile cannot trace either's Python launcher, so each runs as a custom op whose output is shaped like Q.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from wan_opt.hardware import describe, device_capability, is_hopper

# The one switch for the Gluon kernels: off, mode=fast on Hopper runs the Triton kernel as every other GPU does and
# attention=hopper is refused, with nothing else to change (the tests and benchmarks that run a Gluon kernel then
# skip it). WAN_OPT_HOPPER_KERNEL=0 turns it off for one process (benchmarks/gpu_attention_check.sh, after a
# Gluon kernel that did not run).
HOPPER_KERNEL = os.environ.get("WAN_OPT_HOPPER_KERNEL", "1") != "0"
HOPPER_HEAD_DIM = 128  # the one head dimension the Gluon kernels are built and tested for (A14B's and TI2V-5B's)
# Gluon's API moves between releases: the kernels compile for sm_90 on Triton 3.6 (PyTorch 2.11's) and 3.8
GLUON_TRITON = (3, 6)


def hopper_kernel_missing(device: torch.device | str | None = None) -> str | None:
    """Why the warp-specialised Gluon kernels do not run on `device` (this process's GPU when None), or None where
    they do: they need HOPPER_KERNEL on, a Hopper GPU (sm_90) and a Triton with Gluon's Hopper ops."""
    if not HOPPER_KERNEL:
        return "WAN_OPT_HOPPER_KERNEL=0 turns it off"
    capability = device_capability(device)
    if not is_hopper(capability):
        return f"it is built for Hopper (compute capability 9.0) and {describe(capability)}"
    try:
        import triton
        from triton.experimental.gluon.language.nvidia import hopper
    except ImportError:
        return f"it needs Triton {'.'.join(map(str, GLUON_TRITON))} or later, with Gluon, and this one has none"
    release = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if release < GLUON_TRITON or not hasattr(hopper, "warpgroup_mma"):
        return f"it needs Triton {'.'.join(map(str, GLUON_TRITON))} or later, with Gluon, not {triton.__version__}"
    return None


def hopper_kernel_available(device: torch.device | str | None = None) -> bool:
    return hopper_kernel_missing(device) is None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs, as diffusers' WanAttnProcessor applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def norm_and_rotate(attn, query: torch.Tensor, key: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's RMSNorm of Q and K over all heads, then the rotary embedding of each head: (B, N, H * D) ->
    (B, N, H, D). On a GPU one Triton kernel does both (wan_opt/kernels/qk_norm_rope.py); elsewhere, and for norms or
    angles it does not take, diffusers' own modules and arithmetic (norm_and_rotate_as_diffusers)."""
    norm_q, norm_k = attn.norm_q, attn.norm_k
    if (query.is_cuda and rotary_emb is not None and query.shape[-1] % attn.heads == 0 and norm_q.eps == norm_k.eps
            and all(type(n) is torch.nn.RMSNorm and n.weight is not None for n in (norm_q, norm_k))):
        from wan_opt.kernels.qk_norm_rope import qk_norm_rope_op

        eps = norm_q.eps if norm_q.eps is not None else torch.finfo(query.dtype).eps
        query, key = qk_norm_rope_op(query, key, norm_q.weight, norm_k.weight, *rotary_emb, eps, attn.heads)
        return query.unflatten(2, (attn.heads, -1)), key.unflatten(2, (attn.heads, -1))
    return norm_and_rotate_as_diffusers(attn, query, key, rotary_emb)


def norm_and_rotate_as_diffusers(attn, query: torch.Tensor, key: torch.Tensor,
                                 rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_and_rotate in diffusers' modules and arithmetic, on any device."""
    query, key = (norm(t).unflatten(2, (attn.heads, -1)) for norm, t in zip((attn.norm_q, attn.norm_k), (query, key)))
    if rotary_emb is not None:
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
    return query, key


class SelfAttnProcessor(WanAttnProcessor):
    """diffusers' Wan attention processor with the self-attention on `attend`."""

    head_dims: tuple[int, ...] | None = None  # the head dimensions the kernel takes; None: any

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        head_dim = hidden_states.shape[-1] // attn.heads
        if (encoder_hidden_states is not None or attention_mask is not None or self._parallel_config is not None
                or attn.add_k_proj is not None or (self.head_dims is not None and head_dim not in self.head_dims)):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = norm_and_rotate(attn, query, key, rotary_emb)
        out = self.attend(query, key, value.unflatten(2, (attn.heads, -1))).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def use_self_attention(expert: torch.nn.Module, processor: type[SelfAttnProcessor]) -> int:
    """Give each block's self-attention `processor`; returns how many."""
    for block in expert.blocks:
        block.attn1.set_processor(processor())
    return len(expert.blocks)


@torch.library.custom_op("wan_opt::exact_attention_hopper", mutates_args=())
def exact_attention_hopper(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, N, H, D) bf16 tensors (D = HOPPER_HEAD_DIM) on wan-opt's Hopper kernel, in bf16,
    returned as (B, N, H, D)."""
    from wan_opt.kernels.attention_hopper import exact_attention_hopper as kernel

    return kernel(query, key, value, torch.empty(query.shape, dtype=query.dtype, device=query.device))


@exact_attention_hopper.register_fake
def _(query, key, value):
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


class HopperSelfAttnProcessor(SelfAttnProcessor):
    head_dims = (HOPPER_HEAD_DIM,)

    def attend(self, query, key, value):
        return exact_attention_hopper(query, key, value)


def flash4_available() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # a flash_attn without the cute kernels
        return False


@torch.library.custom_op("wan_opt::flash4_attention", mutates_args=())
def flash4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, N, H, D) tensors on FlashAttention-4, returned as (B, N, H, D)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(query, key, value)
    return (out[0] if isinstance(out, tuple) else out).contiguous()  # (out, lse) in some releases


@flash4_attention.register_fake
def _(query, key, value):
    return torch.empty_like(query)


class Flash4SelfAttnProcessor(SelfAttnProcessor):
    head_dims = (64, 96, 128, 192, 256)  # within FlashAttention-4's range on Hopper, multiples of its alignment

    def attend(self, query, key, value):
        return flash4_attention(query, key, value)

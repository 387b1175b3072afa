"""Self-attention on low-precision tensor cores, in the spirit of SageAttention: Q K^T in bf16, P V in int8.

Before the kernel (in two Triton kernels on a GPU, wan_opt/kernels/fp8_qkv.py; in PyTorch elsewhere), Q and K
stay bf16 (their products are exact in fp32) and are laid out by head; V is smoothed by its mean over the tokens,
so that the mean does not set its scale, rounded to int8 per channel and transposed so that each block of keys
is contiguous along the reduction, as the 8-bit MMA wants its second operand. The mean comes back in the output,
less what the rounding took on average (near-uniform attention averages V, and would keep that bias). The
kernel is a flash-attention forward whose blocks arrive by Hopper's TMA copies, with an online softmax in fp32:
each block's P, scaled so that its own row max is 127, is rounded to int8 for an exact integer P V, then brought
to the running max by one factor a row. Only the last block of keys, partly padding, is masked.

This is the cheapest pair within 3% of exact attention on peaky as well as near-uniform attention
(benchmarks/attention_accuracy.py, emulated): with 8-bit Q and K a logit spread of 16 costs 5% (int8, scales per
token) to 17% (e4m3, the previous kernels), and e4m3 P and V cost 2.6-3.7% even after an exact Q K^T.

Two kernels compute this: on Hopper (sm_90) with head dimension 128, a warp-specialised one in Gluon
(wan_opt/kernels/attention_hopper.py, which also holds the lossless attention=hopper's exact kernel), run as a
custom op since torch.compile cannot trace a Gluon launch; elsewhere (Ada, other head dimensions, Triton's CPU
interpreter) the Triton one (wan_opt/kernels/fp8_attention_triton.py); wan_opt.optim.attention.HOPPER_KERNEL is
the one switch between them. Design and accuracy: docs/kernels.md, 'fp8 attention'.

Only the self-attention of each block (75,600 tokens at 720p, ~63% of the FLOPs) runs here; the
cross-attention over 512 text tokens stays on PyTorch's attention.
"""
from __future__ import annotations

import importlib.util
import math

import torch

from wan_opt.optim.attention import HOPPER_HEAD_DIM, SelfAttnProcessor, hopper_kernel_available
from wan_opt.kernels.e4m3 import INT8_MAX, qk_scale, scale_for

PAD = 128  # sequences are padded to the largest tile, so that every tile shape the kernel tries divides them
HEAD_DIMS = (64, 128)  # A14B and TI2V-5B use 128; the kernel's tile shapes need a power of two >= 16


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def padded_length(tokens: int) -> int:
    """The sequence length the kernels run on: `tokens` rounded up to a multiple of PAD."""
    return math.ceil(tokens / PAD) * PAD


def mma_key_order(x: torch.Tensor) -> torch.Tensor:
    """The last dimension (keys) in the order the Hopper kernel's P V MMA reads them: within every 32 keys,
    key 16h + 8a + 2t + b goes to 16h + 4t + 2a + b (the kernel relabels P's registers this way instead of
    moving them; see attention_hopper._as_mma_operand)."""
    return x.unflatten(-1, (-1, 2, 2, 4, 2)).transpose(-3, -2).flatten(-5)


def quantize_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, hopper: bool = False):
    """Queries, keys and values as diffusers passes them, (B, N, H, D), to the kernels' operands: Q and K in bf16,
    (B, H, padded, D); V^T in int8, (B, H, D, padded), smoothed by V's mean over the tokens and scaled per
    channel; V's channel scales and the means added back to the output, (B, H, D) each; the padded length.
    hopper: V^T's keys in mma_key_order, as the Hopper kernel reads them. On a GPU, Triton kernels
    (wan_opt/kernels/fp8_qkv.py) compute what _quantize_qkv computes here."""
    padded = padded_length(query.shape[1])
    if query.is_cuda:
        from wan_opt.kernels.fp8_qkv import quantize_qkv_op

        return (*quantize_qkv_op(query, key, value, padded, hopper), padded)
    return (*_quantize_qkv(query, key, value, padded, hopper), padded)


def _quantize_qkv(query, key, value, padded: int, hopper: bool):
    """In PyTorch: Q and K rounded to bf16 but held in float32 (Triton's CPU interpreter multiplies no bf16), V^T
    in int8 (rounded to nearest, ties to even), V's scales and means."""
    n = query.shape[1]
    mean = value.float().mean(dim=1)  # (B, H, D)
    smooth = value.float() - mean[:, None]
    scale = scale_for(smooth.abs().amax(dim=1), INT8_MAX)
    v = smooth * (1.0 / scale)[:, None]  # the kernel multiplies by the reciprocal too
    rounded = torch.round(v)
    # The mean added back is V's less its rounded values' (a bias that diffuse attention would not average out)
    mean = mean + scale * (v - rounded).mean(dim=1)
    q, k, v = (torch.nn.functional.pad(t.transpose(1, 2), (0, 0, 0, padded - n))  # padded tokens: zero
               for t in (query.bfloat16().float(), key.bfloat16().float(), rounded))
    vt = mma_key_order(v.transpose(2, 3)) if hopper else v.transpose(2, 3)
    return q.contiguous(), k.contiguous(), vt.to(torch.int8).contiguous(), scale, mean


@torch.library.custom_op("wan_opt::fp8_attention_hopper", mutates_args=())
def _hopper(q: torch.Tensor, k: torch.Tensor, vt8: torch.Tensor, v_scale: torch.Tensor, v_mean: torch.Tensor,
            query: torch.Tensor) -> torch.Tensor:
    from wan_opt.kernels.attention_hopper import fp8_attention_hopper

    return fp8_attention_hopper(q, k, vt8, v_scale, v_mean, query.new_empty(query.shape), query.shape[1])


@_hopper.register_fake
def _(q, k, vt8, v_scale, v_mean, query):
    return query.new_empty(query.shape)


def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  hopper: bool | None = None) -> torch.Tensor:
    """Softmax attention of (B, N, H, D) tensors (no mask, no dropout), returned as (B, N, H, D).
    hopper: the warp-specialised kernel (sm_90) or the Triton one; None: the first where it runs. Other head
    dimensions than HOPPER_HEAD_DIM always take the Triton kernel."""
    import triton

    from wan_opt.kernels.fp8_attention_triton import fp8_attention_kernel

    b, n, h, d = query.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"the fp8 attention kernel takes head dimensions {HEAD_DIMS}, not {d}")
    if hopper is None:
        hopper = hopper_kernel_available(query.device)
    hopper = hopper and d == HOPPER_HEAD_DIM
    q, k, vt8, v_scale, v_mean, padded = quantize_qkv(query, key, value, hopper)
    if hopper:
        return _hopper(q, k, vt8, v_scale, v_mean, query)
    out = query.new_empty(query.shape)  # contiguous: the kernels write channels at unit stride, whatever query's
    grid = lambda meta: (triton.cdiv(padded, meta["BLOCK_M"]), b * h)  # noqa: E731  the tile is autotuned
    fp8_attention_kernel[grid](q, k, vt8, v_scale, v_mean, out, n, h, padded, out.stride(0), out.stride(1),
                               out.stride(2), HEAD_DIM=d, QK_SCALE=qk_scale(d))
    return out


class Fp8SelfAttnProcessor(SelfAttnProcessor):
    """The self-attention on the fp8 kernel; which kernel is settled here, once, for compiled graphs to keep."""

    head_dims = HEAD_DIMS

    def __init__(self):
        super().__init__()
        self.hopper = torch.cuda.is_available() and hopper_kernel_available(torch.device("cuda"))

    def attend(self, query, key, value):
        return fp8_attention(query, key, value, self.hopper)

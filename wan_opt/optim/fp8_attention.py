"""Self-attention on fp8 tensor cores: a Triton kernel with per-block scales, in the spirit of SageAttention.

Before the kernel (in two Triton kernels on a GPU, wan_opt/kernels/fp8_qkv.py; in PyTorch elsewhere):
- K is smoothed: its mean over the tokens is subtracted, per head. Every query's scores then shift by one
  constant, which softmax ignores, and the outliers that the mean carries no longer set K's fp8 scale.
- Q is quantised to e4m3 per block of 64 tokens, the smoothed K per head (one scale each: without its
  outliers K is narrow). The two scales, 1/sqrt(d) and log2(e) make one factor per query block.
- V is quantised per channel (one scale per head dimension), transposed so that each block of keys is
  contiguous along the reduction, as Hopper's fp8 MMA wants its second operand.
The kernel is a flash-attention forward whose blocks of Q, K and V^T arrive by Hopper's TMA copies (tensor
descriptors, so the loop does no address arithmetic): S = Q K^T in fp8 with fp32 accumulation; an online
softmax in fp32 whose exp2 takes the scores' factor and the max in one FMA and yields P * 2^8.8 (P is in
[0, 1]; 2^8.8 = 446 is just under e4m3's largest value, and the factor cancels against the row sums); P V in
fp8, accumulated in fp32 inside the MMA; the output rescaled by V's channel scales, in bf16. Only the last
block of keys, partly padding, is masked.

Two kernels compute this: on Hopper (sm_90) with head dimension 128, a warp-specialised one in Gluon
(wan_opt/kernels/fp8_attention_hopper.py), run as a custom op since torch.compile cannot trace a Gluon launch;
elsewhere (Ada, other head dimensions, Triton's CPU interpreter) the Triton one
(wan_opt/kernels/fp8_attention_triton.py). Design: docs/kernels.md, 'fp8 attention'; speed and error against
exact attention: docs/measured.md, 'Attention kernels'.

Only the self-attention of each block (75,600 tokens at 720p, ~63% of the FLOPs) runs here; the
cross-attention over 512 text tokens stays on PyTorch's attention.
"""
from __future__ import annotations

import importlib.util
import math

import torch

from wan_opt.hardware import device_capability, is_hopper
from wan_opt.optim.attention import SelfAttnProcessor
from wan_opt.optim.fp8 import quantize_rows

SCALE_BLOCK = 64  # query tokens per scale (the kernel's SCALE_BLOCK)
PAD = 128  # sequences are padded to the largest tile, so that every tile shape the kernel tries divides them
LOG2E = math.log2(math.e)  # the kernel's softmax runs on exp2
HEAD_DIMS = (64, 128)  # A14B and TI2V-5B use 128; the kernel's tile shapes need a power of two >= 16
HOPPER_HEAD_DIM = 128  # the one head dimension the Hopper kernel is built and tested for


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _block_scales(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) with N a multiple of `block` -> e4m3 values and one float32 scale per block of tokens."""
    b, h, n, d = x.shape
    q, scale = quantize_rows(x.contiguous().view(-1, block * d))  # a block of tokens is one row
    return q.view(b, h, n, d), scale.view(b, h, n // block)


def padded_length(tokens: int) -> int:
    """The sequence length the kernels run on: `tokens` rounded up to a multiple of PAD."""
    return math.ceil(tokens / PAD) * PAD


def mma_key_order(x: torch.Tensor) -> torch.Tensor:
    """The last dimension (keys) in the order the Hopper kernel's P V MMA reads them: within every 32 keys,
    key 16h + 8a + 2t + b goes to 16h + 4t + 2a + b (the kernel relabels P's registers this way instead of
    moving them; see fp8_attention_hopper._as_mma_operand)."""
    return x.unflatten(-1, (-1, 2, 2, 4, 2)).transpose(-3, -2).flatten(-5)


def quantize_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, hopper: bool = False):
    """Queries, keys and values as diffusers passes them, (B, N, H, D), to the kernel's fp8 operands:
    Q, K, V^T in e4m3, the factor from fp8 scores to log2-domain logits per query block, V's channel scales.
    hopper: V^T's keys in mma_key_order, as the Hopper kernel reads them. On a GPU, Triton kernels
    (wan_opt/kernels/fp8_qkv.py) compute what _quantize_qkv computes here."""
    n, d = query.shape[1], query.shape[-1]
    padded = padded_length(n)
    if query.is_cuda:
        from wan_opt.kernels.fp8_qkv import quantize_qkv_op

        q8, k8, vt8, q_scale, k_scale, v_scale = quantize_qkv_op(query, key, value, padded, hopper)
    else:
        q8, k8, vt8, q_scale, k_scale, v_scale = _quantize_qkv(query, key, value, padded, hopper)
    return q8, k8, vt8, q_scale * k_scale * (LOG2E / math.sqrt(d)), v_scale, padded


def _quantize_qkv(query, key, value, padded: int, hopper: bool):
    """In PyTorch: Q, K, V^T in e4m3 and the scales of Q's blocks (B, H, padded / 64), of K (B, H, 1) and of
    V's channels (B, H, D)."""
    n, d = query.shape[1], query.shape[-1]
    key = key - key.mean(dim=1, keepdim=True)  # smoothing, before the padding (padded keys are masked)
    q, k, v = (torch.nn.functional.pad(t.transpose(1, 2), (0, 0, 0, padded - n)) for t in (query, key, value))
    q8, q_scale = _block_scales(q, SCALE_BLOCK)
    k8, k_scale = _block_scales(k, padded)  # the whole sequence is one block: one scale per head
    # A channel of V is one row; the kernel reads the operands as contiguous.
    vt = mma_key_order(v.transpose(2, 3)) if hopper else v.transpose(2, 3)
    vt8, v_scale = quantize_rows(vt.contiguous().view(-1, padded))
    b, h = v.shape[:2]
    return q8, k8, vt8.view(b, h, d, padded), q_scale, k_scale, v_scale.view(b, h, d)


GLUON_TRITON = (3, 6)  # Gluon's API moves between releases: the kernel is built and run on 3.6, compiled on 3.9


def hopper_kernel_available(device: torch.device) -> bool:
    """Whether the warp-specialised kernel runs here: a Hopper GPU (sm_90) and a Triton with Gluon's Hopper ops."""
    if not is_hopper(device_capability(device)):
        return False
    try:
        import triton
        from triton.experimental.gluon.language.nvidia import hopper
    except ImportError:
        return False
    release = tuple(int(part) for part in triton.__version__.split(".")[:2])
    return release >= GLUON_TRITON and hasattr(hopper, "warpgroup_mma")


@torch.library.custom_op("wan_opt::fp8_attention_hopper", mutates_args=())
def _hopper(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, qk_scale: torch.Tensor, v_scale: torch.Tensor,
            query: torch.Tensor) -> torch.Tensor:
    from wan_opt.kernels.fp8_attention_hopper import fp8_attention_hopper

    return fp8_attention_hopper(q8, k8, vt8, qk_scale, v_scale, torch.empty_like(query), query.shape[1])


@_hopper.register_fake
def _(q8, k8, vt8, qk_scale, v_scale, query):
    return torch.empty_like(query)


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
    q8, k8, vt8, qk_scale, v_scale, padded = quantize_qkv(query, key, value, hopper)
    if hopper:
        return _hopper(q8, k8, vt8, qk_scale, v_scale, query)
    out = torch.empty_like(query)
    grid = lambda meta: (triton.cdiv(padded, meta["BLOCK_M"]), b * h)  # noqa: E731  the tile is autotuned
    fp8_attention_kernel[grid](q8, k8, vt8, qk_scale, v_scale, out, n, h, padded,
                               out.stride(0), out.stride(1), out.stride(2), HEAD_DIM=d)
    return out


class Fp8SelfAttnProcessor(SelfAttnProcessor):
    """The self-attention on the fp8 kernel; which kernel is settled here, once, for compiled graphs to keep."""

    head_dims = HEAD_DIMS

    def __init__(self):
        super().__init__()
        self.hopper = torch.cuda.is_available() and hopper_kernel_available(torch.device("cuda"))

    def attend(self, query, key, value):
        return fp8_attention(query, key, value, self.hopper)

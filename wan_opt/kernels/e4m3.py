"""e4m3, the fp8 format of wan-opt's weights and activations: its range, the scale that puts a largest magnitude
at its top (or at int8's, for the attention's V), and the per-row quantisation in PyTorch that every fp8 kernel
matches."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row or channel must not divide by zero
WIDEST_KERNEL_ROW = 16384  # the quantisation kernel holds a row in registers: Wan's widest is 14,336 (TI2V-5B)
INT8_MAX = 127  # the attention's V and P are int8, symmetric: -127..127
LOG2_P_TOP = math.log2(INT8_MAX)  # the attention's P leaves exp2 as 127 P: a block's largest is int8's top
LOG2E = math.log2(math.e)  # the attention kernels' softmax runs on exp2


def qk_scale(head_dim: int) -> float:
    """What the attention kernels multiply Q K^T by: softmax's 1 / sqrt(d), in log2 units for exp2."""
    return LOG2E / math.sqrt(head_dim)
# Rounding to int8 without the conversion unit (the kernels' exponentials use its quarter rate): for |x| < 2^22,
# x + 1.5 * 2^23 is an fp32 whose unit is one, so round(x) (ties to even) is its bits less ROUND_MAGIC_BITS, and
# an int32 i becomes the float i by the reverse; ROUND_MAGIC_BITS' low byte is zero, so the low byte alone is an
# int8 already.
ROUND_MAGIC = 12582912.0  # 1.5 * 2^23
ROUND_MAGIC_BITS = 0x4B400000  # its bit pattern


def scale_for(amax: torch.Tensor, top: float = FP8_MAX) -> torch.Tensor:
    """The float32 scale that puts a largest magnitude `amax` at `top` (e4m3's largest value unless told)."""
    return (amax.float() / top).clamp(min=MIN_SCALE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor in e4m3, and the float32 scale that restores it (x ~= q * scale)."""
    scale = scale_for(x.abs().amax(dim=1, keepdim=True))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh-approximated GELU of diffusers' FeedForward (`gelu-approximate`), which Wan's blocks use."""
    return F.gelu(x, approximate="tanh")

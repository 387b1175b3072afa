"""e4m3, the fp8 format of wan-opt's weights, activations and attention: its range, the scale that puts a
largest magnitude at its top, and the per-row quantisation in PyTorch that every fp8 kernel matches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row or channel must not divide by zero
WIDEST_KERNEL_ROW = 16384  # the quantisation kernel holds a row in registers: Wan's widest is 14,336 (TI2V-5B)


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    """The float32 scale that puts a largest magnitude `amax` at e4m3's largest value."""
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor in e4m3, and the float32 scale that restores it (x ~= q * scale)."""
    scale = scale_for(x.abs().amax(dim=1, keepdim=True))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh-approximated GELU of diffusers' FeedForward (`gelu-approximate`), which Wan's blocks use."""
    return F.gelu(x, approximate="tanh")

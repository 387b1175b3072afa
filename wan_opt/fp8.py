"""fp8 (e4m3) weights with one scale per output channel, multiplied in bf16 or on fp8 tensor cores.

A plain cast to e4m3 loses the small weights: its normal range starts at 2^-6, and a DiT's weights are
mostly smaller than that. Scaling each output channel so that its largest weight lands on e4m3's largest
value (448) keeps about three significant bits for every channel, at one float32 per channel.

Two ways to multiply, chosen per layer at run time:
- `fp8_matmul=False` (fp8 storage): the weight is dequantised to the activation dtype and multiplied in
  bf16; half the bytes of bf16 weights, the same kernels.
- `fp8_matmul=True` (Hopper, Ada): activations are quantised per row (token) on the fly and
  `torch._scaled_mm` multiplies in fp8 with both scales, accumulating in fp32 and writing bf16. On a CPU
  (the tests) the same quantised operands are multiplied in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row or channel must not divide by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor in e4m3, and the float32 scale that restores it (x ~= q * scale)."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(torch.nn.Module):
    """A `torch.nn.Linear` whose weight is stored in e4m3 with one scale per output channel."""

    def __init__(self, linear: torch.nn.Linear, fp8_matmul: bool = False, work_device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        home = linear.weight.device
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight.to(work_device or home))
        self.weight = torch.nn.Parameter(weight.to(home), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.to(home), requires_grad=False)  # (out, 1), float32
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.fp8_matmul = fp8_matmul

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        # cuBLASLt's fp8 GEMM wants both weight dimensions in multiples of 16 (every Wan layer's are); a
        # handful of rows is not worth quantising.
        unaligned = x.is_cuda and (self.in_features % 16 or self.out_features % 16)
        if not self.fp8_matmul or rows.shape[0] < 16 or unaligned:
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        q, scale = quantize_rows(rows)
        if x.is_cuda:
            out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale.t(),
                                   bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype)
        else:  # CPU _scaled_mm takes one scale per tensor in most PyTorch releases: the same rounding, in fp32
            bias = None if self.bias is None else self.bias.float()
            out = F.linear(q.float() * scale, self.dequantized_weight(torch.float32), bias).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_matmul={self.fp8_matmul}"


def quantize_linears(module: torch.nn.Module, work_device: torch.device | None = None) -> int:
    """Replace every `nn.Linear` under `module` by an `Fp8Linear`, one layer at a time (no second full copy).

    Each layer keeps its device; `work_device` (a GPU) does the arithmetic for layers that wait in host memory.
    Returns the number of layers replaced. LoRAs must be fused before this: the weights become fp8.
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, Fp8Linear(child, work_device=work_device))
                count += 1
    return count


def use_fp8_matmul(module: torch.nn.Module, enabled: bool = True) -> int:
    """Switch the `Fp8Linear` layers under `module` to fp8 tensor-core matmuls; returns how many."""
    layers = [m for m in module.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.fp8_matmul = enabled
    return len(layers)


def has_fp8_matmul(capability: tuple[int, int]) -> bool:
    """fp8 tensor cores arrived with Ada (8.9) and Hopper (9.0); Ampere (8.0, 8.6) has none."""
    return capability >= (8, 9)

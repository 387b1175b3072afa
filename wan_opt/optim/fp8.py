"""fp8 (e4m3) weights with one scale per output channel, multiplied in bf16 or on fp8 tensor cores.

A plain cast to e4m3 loses the small weights: its normal range starts at 2^-6, and a DiT's weights are
mostly smaller than that. Scaling each output channel so that its largest weight lands on e4m3's largest
value (448) keeps about three significant bits for every channel, at one float32 per channel.

Two ways to multiply, chosen per layer at run time:
- `fp8_matmul=False` (fp8 storage): the weight is dequantised to the activation dtype and multiplied in
  bf16; half the bytes of bf16 weights, the same kernels.
- `fp8_matmul=True` (Hopper, Ada): activations are quantised per row (token) on the fly and
  `torch._scaled_mm` multiplies in fp8 with both scales and writes bf16. On a GPU a Triton kernel quantises
  (wan_opt/kernels/fp8_rows.py); on a CPU (the tests) PyTorch does, and the same quantised operands are multiplied in
  fp32. The GEMM accumulates in the tensor cores' own precision (`use_fast_accum`) rather than moving partial
  sums to fp32 registers every few steps: faster at the power limit, for an error a small fraction of what the
  rounding to e4m3 itself costs (docs/kernels.md, 'fp8 GEMMs'; measured in docs/measured.md, 'fp8 GEMMs').

With fp8 multiplies the feed-forward's GELU moves into its output layer (`input_gelu`), where the kernel
applies it on the way to e4m3: one pass over the widest activations (13,824 values a token in A14B) instead
of writing them in bf16 and reading them back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from wan_opt.kernels.e4m3 import FP8, FP8_MAX, MIN_SCALE, WIDEST_KERNEL_ROW, gelu, quantize_rows, scale_for  # noqa: F401
from wan_opt.optim.ffn import tanh_gelu_feed_forwards

def quantize_activations(rows: torch.Tensor, input_gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows of `rows` (or of their GELU): on a GPU in one Triton kernel, elsewhere in PyTorch."""
    if rows.is_cuda and rows.shape[1] <= WIDEST_KERNEL_ROW:
        from wan_opt.kernels.fp8_rows import quantize_rows_op  # Triton: imported where it runs

        return quantize_rows_op(rows, input_gelu)
    return quantize_rows(gelu(rows) if input_gelu else rows)


class Fp8Linear(torch.nn.Module):
    """A `torch.nn.Linear` whose weight is stored in e4m3 with one scale per output channel.

    input_gelu: the layer applies GELU to its input first (set by `use_fp8_matmul`, which moves the feed-forward's
    activation here)."""

    def __init__(self, linear: torch.nn.Linear, fp8_matmul: bool = False, work_device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        home = linear.weight.device
        # A layer built without weights (to be read from a checkpoint) stays so: meta in, meta out.
        work_device = home if home.type == "meta" else work_device or home
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight.to(work_device))
        self.weight = torch.nn.Parameter(weight.to(home), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.to(home), requires_grad=False)  # (out, 1), float32
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.fp8_matmul = fp8_matmul
        self.input_gelu = False

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        # cuBLASLt's fp8 GEMM wants both weight dimensions in multiples of 16 (every Wan layer's are); a
        # handful of rows is not worth quantising.
        unaligned = x.is_cuda and (self.in_features % 16 or self.out_features % 16)
        if not self.fp8_matmul or rows.shape[0] < 16 or unaligned:
            return F.linear(gelu(x) if self.input_gelu else x, self.dequantized_weight(x.dtype), self.bias)
        q, scale = quantize_activations(rows, self.input_gelu)
        if x.is_cuda:
            out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale.t(),
                                   bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype,
                                   use_fast_accum=True)
        else:  # CPU _scaled_mm takes one scale per tensor in most PyTorch releases: the same rounding, in fp32
            bias = None if self.bias is None else self.bias.float()
            out = F.linear(q.float() * scale, self.dequantized_weight(torch.float32), bias).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, fp8_matmul={self.fp8_matmul}"
        return text + (", input_gelu=True" if self.input_gelu else "")


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
    """Switch the `Fp8Linear` layers under `module` to fp8 tensor-core matmuls; returns how many.

    Switching on also moves each feed-forward's GELU into its output layer (see `fold_gelu`)."""
    layers = [m for m in module.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.fp8_matmul = enabled
    if enabled:
        fold_gelu(module)
    return len(layers)


def fold_gelu(module: torch.nn.Module) -> int:
    """In each diffusers FeedForward under `module` whose layers are fp8, GELU(proj(x)) becomes proj(x) and the
    output layer applies the GELU to its input; returns how many feed-forwards changed. The arithmetic is the
    same (the dropout between them is the identity at inference)."""
    folded = 0
    for ff in tanh_gelu_feed_forwards(module):
        output = ff.net[2]
        if isinstance(ff.net[0].proj, Fp8Linear) and isinstance(output, Fp8Linear):
            ff.net[0] = ff.net[0].proj
            output.input_gelu = True
            folded += 1
    return folded


"""The feed-forward's GELU inside its first matmul (`fuse_gelu`): cuBLASLt applies it to the accumulator on the way
out (its GELU epilogue), so the widest activation of a block (13,824 values a token in A14B, 2 GB a forward at
720p) is written once, already activated, instead of written by the matmul, read by a GELU kernel and written
again.

diffusers' Wan feed-forward is a linear layer then GELU with the tanh approximation, the one the epilogue
computes; the epilogue applies it to the fp32 accumulator before rounding, one bf16 rounding fewer than two
kernels. torch.compile keeps `torch._addmm_activation` a call to ATen (inductor has no lowering for it), so the
fusion survives regional compilation. On a CPU ATen's GELU of that op is the exact one, not the tanh one, so
there the module runs diffusers' arithmetic. With fp8 matmuls the GELU has moved into the output layer's
quantisation instead (wan_opt.optim.fp8.fold_gelu), and those feed-forwards are left alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class GeluMatmul(torch.nn.Module):
    """diffusers' `GELU` (tanh) feed-forward input layer, its `proj` kept as it is (same weights, same name)."""

    def __init__(self, proj: torch.nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        # The epilogue needs the layer's weights where the input is; a layer still waiting elsewhere for an
        # offloading hook of its own takes diffusers' path, which calls it.
        if not x.is_cuda or weight.device != x.device or x.dtype != weight.dtype:
            return F.gelu(self.proj(x), approximate="tanh")
        out = torch._addmm_activation(self.proj.bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def tanh_gelu_feed_forwards(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The diffusers FeedForwards under `module` whose input layer is diffusers' GELU with the tanh approximation
    (Wan's): the ones whose GELU can move, here or into fp8 quantisation (wan_opt.optim.fp8.fold_gelu)."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    return [ff for ff in module.modules()
            if isinstance(ff, FeedForward) and isinstance(ff.net[0], GELU) and ff.net[0].approximate == "tanh"]


def fuse_gelu(module: torch.nn.Module) -> int:
    """Give each of `module`'s tanh-GELU feed-forwards whose input layer is a plain linear layer with a bias the
    fused input layer; returns how many changed. Layers with hooks of their own (leaf offloading) and other layer
    types (fp8, LoRA) keep diffusers' module."""
    fused = 0
    for ff in tanh_gelu_feed_forwards(module):
        proj = ff.net[0].proj
        hooked = bool(proj._forward_pre_hooks or proj._forward_hooks) or "forward" in vars(proj)
        if type(proj) is torch.nn.Linear and proj.bias is not None and not hooked:
            ff.net[0] = GeluMatmul(proj)
            fused += 1
    return fused

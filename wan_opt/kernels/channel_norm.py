"""The Triton kernel behind wan_opt.optim.vae.fuse_vae on a GPU (imported only there, or by its tests).

The Wan VAE normalises every activation over its channels (WanRMS_norm: x / ||x|| * sqrt(C) * gamma + bias) and
then, almost always, applies SiLU. diffusers computes it as eight passes over the activation, one of them writing
it in float32; with the decoder's other passes outside its convolutions they move about ten times the bytes the
convolutions read and write (docs/measured.md, 'Bytes outside the convolutions'). One program here takes a block
of positions with all their channels: each element is read once, normalised and activated in fp32, and written
once, rounded once.

Positions are rows of a (positions, channels) matrix that holds any layout with uniform strides: channels last
(each position's channels contiguous, as wan-opt's Hopper profiles keep the VAE) or channels first (diffusers'
layout, positions contiguous).
"""
import math

import torch
import triton
import triton.language as tl

@triton.jit
def norm_silu_kernel(X, GAMMA, BIAS, Y, n_rows, rows_per_batch, channels, stride_b, stride_r, stride_c, scale, eps,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < channels)[None, :]
    position = (rows // rows_per_batch) * stride_b + (rows % rows_per_batch) * stride_r
    offsets = position[:, None] + cols[None, :] * stride_c
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    y = x * (scale / tl.maximum(norm, eps))[:, None]
    y = y * tl.load(GAMMA + cols, mask=cols < channels, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(BIAS + cols, mask=cols < channels, other=0.0).to(tl.float32)[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


def row_strides(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(positions a batch, batch stride, position stride, channel stride) of an (N, C, *positions) tensor laid out
    channels first or channels last, contiguous; None for any other layout."""
    positions = math.prod(x.shape[2:])
    if x.is_contiguous():
        return positions, x.shape[1] * positions, 1, positions
    channels_last = {5: torch.channels_last_3d, 4: torch.channels_last}.get(x.dim())
    if channels_last is not None and x.is_contiguous(memory_format=channels_last):
        return positions, x.shape[1] * positions, x.shape[1], 1
    return None


def norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float, eps: float,
              silu: bool = True) -> torch.Tensor:
    """x / max(||x||, eps) over dim 1, times scale and gamma, plus bias, then SiLU if asked: (N, C, *positions) ->
    the same shape and dtype; the same memory layout where it is channels first or last and contiguous
    (row_strides), else channels first. gamma and bias hold C values; wan_opt.optim.vae.norm_silu_reference is
    the same arithmetic in PyTorch."""
    layout = row_strides(x)
    if layout is None:
        x = x.contiguous()
        layout = row_strides(x)
    rows_per_batch, stride_b, stride_r, stride_c = layout
    channels = x.shape[1]
    out = torch.empty_like(x)  # the same memory layout
    if not x.numel():
        return out
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, 8192 // block_c)
    n_rows = x.shape[0] * rows_per_batch
    norm_silu_kernel[(triton.cdiv(n_rows, block_r),)](
        x, gamma.reshape(-1), bias.reshape(-1) if bias is not None else gamma, out, n_rows, rows_per_batch,
        channels, stride_b, stride_r, stride_c, float(scale), float(eps), HAS_BIAS=bias is not None, SILU=silu,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_r * block_c >= 8192 else 4)
    return out

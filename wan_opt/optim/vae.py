"""The VAE's speed: channels-last convolutions, fewer passes over its activations, and float16 kept from
overflowing.

Channels-last memory is the layout cuDNN's 3-D convolutions compute in; stored channels first (as diffusers keeps
the VAE) every convolution transposes its input and output. The same arithmetic, about 10% faster and a few GiB
lighter at 720p (docs/measured.md, "VAE decode").

Between its convolutions diffusers' decoder passes over each activation about a dozen times: eight for a norm and
its SiLU (one writing it in float32), a copy to pad it for the next convolution, a float32 round trip to upsample
it. `fuse_vae` makes a norm and its SiLU one kernel (wan_opt/kernels/channel_norm.py), lets each convolution pad
in place, and upsamples in the activation's own dtype (nearest-neighbour, exact in any): the same arithmetic, with
fewer roundings (docs/kernels.md, 'VAE norms').

float16 runs as fast as bf16 with three more bits of mantissa: the decode stays within the float32 decode's own
rounding, where bf16's is an order of magnitude further (same page). Its range is 65,504: a VAE whose activations
pass it gives inf, then NaN, never a silent error. `in_range` watches for that and runs the call again in bf16,
which has float32's range, at the same memory.
"""
from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
T = TypeVar("T")


def use_channels_last(vae: torch.nn.Module) -> None:
    """Store the VAE's convolution weights channels last (3-D ones for the causal convolutions, 2-D ones for the
    spatial upsampling): cuDNN then keeps every activation channels last from the first convolution on."""
    for param in vae.parameters():
        if param.dim() == 5:
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        elif param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)


class NormSiLU(torch.nn.Module):
    """diffusers' WanRMS_norm (over channels, dim 1) and the SiLU after it, as one kernel on a GPU; elsewhere the
    kernel's arithmetic in PyTorch. Holds the norm's own parameters, so the VAE's weights, dtype and state dict
    keys stay as they were."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.gamma = norm.gamma
        self.bias = norm.bias if isinstance(norm.bias, torch.nn.Parameter) else None
        self.scale = norm.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from wan_opt.kernels.channel_norm import norm_silu

            return norm_silu(x, self.gamma, self.bias, self.scale, NORM_EPS)
        return norm_silu_reference(x, self.gamma, self.bias, self.scale)


NORM_EPS = 1e-12  # F.normalize's, as diffusers' WanRMS_norm uses it: a position whose channels are all zero stays 0


def norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, scale: float,
                        silu: bool = True) -> torch.Tensor:
    """NormSiLU's arithmetic in PyTorch, what its kernel computes: fp32 throughout, one rounding to x's dtype at
    the end."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(NORM_EPS) * scale * gamma.float().reshape(shape)
    if bias is not None:
        y = y + bias.float().reshape(shape)
    return (F.silu(y) if silu else y).to(x.dtype)


def _convolve_padding_in_place(conv, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """WanCausalConv3d.forward, its height and width padded by the convolution itself (conv.padding) instead of
    by a padded copy of its input; time is padded as before, by the cached frames, then by zeros."""
    time = conv._padding[4]
    if cache_x is not None and time > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        time -= cache_x.shape[2]
    if time > 0:
        x = F.pad(x, (0, 0, 0, 0, time, 0))
    return conv._conv_forward(x, conv.weight, conv.bias)


def _upsample_in_dtype(upsample, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.Upsample.forward(upsample, x)


def fuse_vae(vae: torch.nn.Module) -> dict[str, int]:
    """Rewrite the VAE's modules for fewer passes over its activations, the same arithmetic: each norm followed by
    SiLU becomes one NormSiLU (and the block's SiLU an identity), each causal convolution pads height and width in
    place, nearest-neighbour upsampling stays in the activation's dtype. Returns how many of each were changed."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (WanCausalConv3d, WanDecoder3d, WanEncoder3d,
                                                                   WanResidualBlock, WanRMS_norm, WanUpsample)

    fused = {"norms": 0, "convolutions": 0, "upsamplings": 0}
    norms_of = {WanResidualBlock: ("norm1", "norm2"), WanEncoder3d: ("norm_out",), WanDecoder3d: ("norm_out",)}
    for module in vae.modules():
        names = norms_of.get(type(module), ())
        # Only where every use of the block's activation follows one of these norms (diffusers' blocks as read)
        if names and isinstance(module.nonlinearity, torch.nn.SiLU):
            for name in names:
                norm = getattr(module, name)
                if isinstance(norm, WanRMS_norm) and norm.channel_first:
                    setattr(module, name, NormSiLU(norm))
                    fused["norms"] += 1
            module.nonlinearity = torch.nn.Identity()
        elif isinstance(module, WanCausalConv3d) and "forward" not in module.__dict__:
            module.padding = (0, module._padding[2], module._padding[0])
            module.forward = types.MethodType(_convolve_padding_in_place, module)
            fused["convolutions"] += 1
        elif (isinstance(module, WanUpsample) and module.mode in ("nearest", "nearest-exact")
              and "forward" not in module.__dict__):
            module.forward = types.MethodType(_upsample_in_dtype, module)
            fused["upsamplings"] += 1
    return fused


@contextlib.contextmanager
def _overflow_watch(vae: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yields a list that, after the block, holds one flag per encoder or decoder call: whether its output had a
    value that is not finite (checked on the GPU; read once, after the block)."""
    flags: list[torch.Tensor] = []

    def watch(_module, _args, output):
        flags.append(~torch.isfinite(output).all())

    handles = [part.register_forward_hook(watch) for part in (vae.encoder, vae.decoder)]
    try:
        yield flags
    finally:
        for handle in handles:
            handle.remove()


def in_range(vae: torch.nn.Module, call: Callable[[], T], what: str) -> T:
    """`call()` (an encode or decode of `vae`, which reads the VAE's dtype when it runs); a float16 VAE whose
    activations overflowed runs it again in bf16, with a warning."""
    if vae.dtype != torch.float16:
        return call()
    with _overflow_watch(vae) as flags:
        result = call()
    if isinstance(result, torch.Tensor):  # what follows the encoder or decoder (quant_conv) may overflow too
        flags.append(~torch.isfinite(result).all())
    if not flags or not torch.stack(flags).any().item():
        return result
    log.warning("The VAE's float16 %s overflowed; it ran again in bfloat16. hardware.memory.vae_dtype=bfloat16 "
                "skips the first try for this model.", what)
    del result
    # torch's own `to` keeps each weight's memory layout; diffusers' would warn about modules to keep in float32,
    # which the Wan VAE has none of.
    torch.nn.Module.to(vae, torch.bfloat16)
    try:
        return call()
    finally:
        torch.nn.Module.to(vae, torch.float16)

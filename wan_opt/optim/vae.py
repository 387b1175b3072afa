"""The VAE's speed: channels-last convolutions, and float16 kept from overflowing.

Channels-last memory is the layout cuDNN's 3-D convolutions compute in; stored channels first (as diffusers keeps
the VAE) every convolution transposes its input and output. The same arithmetic, about 10% faster and a few GiB
lighter at 720p (docs/measured.md, "VAE decode").

float16 runs as fast as bf16 with three more bits of mantissa: the decode stays within the float32 decode's own
rounding, where bf16's is an order of magnitude further (same page). Its range is 65,504: a VAE whose activations
pass it gives inf, then NaN, never a silent error. `in_range` watches for that and runs the call again in bf16,
which has float32's range, at the same memory.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

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

"""What every loader shares: the device a run means, casting that keeps fp32 islands, and Wan's scheduler."""
from __future__ import annotations

import torch
from diffusers import UniPCMultistepScheduler


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cuda' means the current CUDA device (cuda:LOCAL_RANK under torchrun); None picks CUDA when present."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to `dtype`, keeping in float32 the submodules the model class asks to keep there."""
    torch.nn.Module.to(module, dtype)  # diffusers' own .to() warns about exactly what is handled here
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype != torch.float32 and keep:
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                sub.to(torch.float32)
    return module


def scheduler_for(shift: float, base=None):
    """UniPC in flow-matching mode with the model's shift (the Wan team's sampler for every Wan 2.2 model)."""
    if base is not None:
        return UniPCMultistepScheduler.from_config(base.config, flow_shift=shift)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=shift)

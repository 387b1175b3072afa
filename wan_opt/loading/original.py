"""The Wan team's original layout -> diffusers/transformers modules, tensor by tensor, onto their target device.

Modules are built with empty parameters (accelerate's `init_empty_weights`; buffers such as the DiT's RoPE
tables are still computed) and filled with `load_state_dict(assign=True)`. Each tensor is read from the
file, mapped to its diffusers/transformers name (wan_opt.loading.original_names), cast and moved on its own, so no full
float32 copy of a model is ever held in host memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from wan_opt.loading import original_names as original
from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import DIT_MODEL_TYPES as MODEL_TYPES  # WanModel config.json "model_type"
from wan_opt.loading.layouts import T5_FILE, Checkpoint, weight_files


def dtype_for(module: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the libraries' own loaders give parameter `name`: float32 where a name component is listed in
    the class's keep-in-float32 modules, and `dtype` elsewhere.

    diffusers keeps its list in float32 at any dtype. transformers keeps `_keep_in_fp32_modules` in float32 only
    under float16 (UMT5's `wo` overflows there; in bfloat16 it loads as bfloat16, 1.9 GiB less for UMT5-XXL),
    and `_keep_in_fp32_modules_strict` under float16 and bfloat16.
    """
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    if hasattr(module, "_keep_in_fp32_modules_strict"):  # a transformers model
        if dtype != torch.float16:
            keep = set()
        if dtype in (torch.float16, torch.bfloat16):
            keep |= set(module._keep_in_fp32_modules_strict or [])
    return torch.float32 if any(part in keep for part in name.split(".")) else dtype


def fill(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Assign `tensors` into an empty `model`, naming the first tensor that does not fit."""
    expected = model.state_dict()
    kind = type(model).__name__
    for name, tensor in tensors.items():
        if name not in expected:
            raise WanOptError(f"{source} holds a tensor for {name!r}, which {kind} does not have.")
        if tensor.shape != expected[name].shape:
            raise WanOptError(f"{source} holds {name!r} of shape {tuple(tensor.shape)} where "
                              f"{kind} expects {tuple(expected[name].shape)}: is model= the right model?")
    for name in expected:
        if name not in tensors:
            raise WanOptError(f"{source} lacks the weights of {name!r}: the checkpoint is incomplete.")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _mapped(convert, key: str, source: Path):
    try:
        return convert(key)
    except ValueError as err:
        raise WanOptError(f"{source}: {err}") from None


def load_dit(folder: Path, family: str, dtype: torch.dtype, device: torch.device):
    """One WanTransformer3DModel from an original DiT folder (config.json + safetensors shards)."""
    from diffusers import WanTransformer3DModel

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type", MODEL_TYPES[family]) != MODEL_TYPES[family]:
        raise WanOptError(f"{folder / 'config.json'} has model_type={config['model_type']!r}, but this model's "
                          f"DiT is {MODEL_TYPES[family]!r}: check that model= matches the checkpoint.")
    try:
        kwargs = original.dit_config_from_original(config)
    except KeyError as err:
        raise WanOptError(f"{folder / 'config.json'} has no {err.args[0]!r} entry: it is not a WanModel config.") from None
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel(**kwargs)
    tensors = {}
    for shard in weight_files(folder, "diffusion_pytorch_model"):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                name = _mapped(original.convert_dit_key, key, shard)
                tensors[name] = f.get_tensor(key).to(device, dtype_for(model, name, dtype))
    return fill(model, tensors, str(folder)).to(device)  # buffers (RoPE tables) follow the weights


def _torch_load(path: Path) -> dict:
    # mmap: tensors are paged in as they are converted instead of all at once
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def load_text_encoder(path: Path, dtype: torch.dtype, device: torch.device):
    """UMT5EncoderModel from the Wan team's T5 .pth (their own module names)."""
    from transformers import UMT5EncoderModel

    sd = _torch_load(path)
    with init_empty_weights(include_buffers=False):
        model = UMT5EncoderModel(original.t5_config_from_state_dict(sd))
    tensors = {}
    for key, tensor in sd.items():
        names = _mapped(original.convert_t5_keys, key, path)
        value = tensor.to(device, dtype_for(model, names[0], dtype))  # one tensor for both tied embeddings
        tensors.update(dict.fromkeys(names, value))
    return fill(model, tensors, str(path)).to(device)


def load_vae(path: Path, dtype: torch.dtype, device: torch.device):
    """AutoencoderKLWan (2.1 or 2.2, told apart by its keys) from the Wan team's VAE .pth."""
    from diffusers import AutoencoderKLWan

    try:
        sd, kwargs = original.convert_vae_state_dict(_torch_load(path))
    except ValueError as err:
        raise WanOptError(f"{path}: {err}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoencoderKLWan(**kwargs)
    return fill(model, {k: v.to(device, dtype) for k, v in sd.items()}, str(path)).to(device)


def load_original_modules(ckpt: Checkpoint, dtypes: dict[str, torch.dtype], devices: dict[str, torch.device]) -> dict:
    """The experts and the text encoder of an original-layout checkpoint, each in its dtype and on its device
    (keyed by role); the VAE comes with the tokenizer (wan_opt.loading.components.load_vae_and_tokenizer)."""
    from wan_opt.loading.layouts import DIFFUSERS_DITS

    modules = {"transformer_2": None}
    for name, folder in zip(DIFFUSERS_DITS[ckpt.family], ckpt.dit_dirs()):
        modules[name] = load_dit(folder, ckpt.family, dtypes[name], devices[name])
    modules["text_encoder"] = load_text_encoder(ckpt.root / T5_FILE, dtypes["text_encoder"],
                                                devices["text_encoder"])
    return modules

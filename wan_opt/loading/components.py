"""Checkpoint -> diffusers/transformers modules, each on the device and in the dtype the memory policy says.

Weights go straight to their target: the libraries' low-memory loading (meta-device init, shard by shard)
for the Diffusers layout, meta-device modules filled tensor by tensor for the Wan team's original layout.
"""
from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig

from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import PER_TOKEN_TIMESTEPS, Checkpoint, check_checkpoint
from wan_opt.loading.modules import cast_module, scheduler_for
from wan_opt.memory.policy import EXPERTS, MemoryPolicy, torch_dtype

log = logging.getLogger(__name__)


def component_dtype(role: str, memory: MemoryPolicy) -> torch.dtype:
    """The dtype each component is loaded in under `memory`."""
    if role in EXPERTS:
        return memory.load_dtype
    return torch_dtype(memory.vae_dtype if role == "vae" else memory.compute_dtype)


def place(components: dict, memory: MemoryPolicy, device: torch.device) -> dict:
    """Cast and move built modules as the policy says (for modules built in memory, not read from disk)."""
    for role in (*EXPERTS, "text_encoder", "vae"):
        if components.get(role) is not None:
            cast_module(components[role], component_dtype(role, memory)).to(memory.load_device(role, device))
    return components


def load_components(model: DictConfig, memory: MemoryPolicy, device: torch.device) -> dict:
    """Every module and setting WanOptPipeline needs, for the tiny model or a checkpoint directory."""
    start = time.perf_counter()
    if model.family.startswith("tiny"):
        from wan_opt.loading.tiny import build_tiny_components

        components = place(build_tiny_components(seed=0, family=model.family, shift=model.shift), memory, device)
    elif model.random_weights:
        from wan_opt.loading.arch import build_random_components

        components = build_random_components(model.family, memory, device, model.shift)
    else:
        if not model.ckpt_dir:
            raise WanOptError(f"model={model.name} needs its weights: pass model.ckpt_dir=/path/to/checkpoint.")
        ckpt = check_checkpoint(model.ckpt_dir, model.family)
        if memory.idle_weights == "checkpoint":
            loader = load_from_files
        else:
            loader = load_diffusers_layout if ckpt.layout == "diffusers" else load_original_layout
        components = loader(ckpt, model, memory, device)
    components.setdefault("transformer_2", None)
    components["boundary_ratio"] = model.boundary
    components["expand_timesteps"] = model.family in PER_TOKEN_TIMESTEPS
    log.info("Loaded %s in %.1f s", model.name, time.perf_counter() - start)
    return components


def load_diffusers_layout(ckpt: Checkpoint, model: DictConfig, memory: MemoryPolicy, device: torch.device) -> dict:
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    root = ckpt.root
    components = {}
    for name, folder in zip(EXPERTS, ckpt.dit_dirs()):
        components[name] = WanTransformer3DModel.from_pretrained(
            folder, torch_dtype=memory.load_dtype, device_map=str(memory.load_device(name, device)))
    components["text_encoder"] = UMT5EncoderModel.from_pretrained(
        root / "text_encoder", dtype=component_dtype("text_encoder", memory),
        device_map=str(memory.load_device("text_encoder", device)))
    components.update(load_vae_and_tokenizer(ckpt, model, memory, device))
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return components


def load_original_layout(ckpt: Checkpoint, model: DictConfig, memory: MemoryPolicy, device: torch.device) -> dict:
    from wan_opt.loading.original import load_original_modules

    roles = (*EXPERTS, "text_encoder")
    components = load_original_modules(
        ckpt, dtypes={role: component_dtype(role, memory) for role in roles},
        devices={role: memory.load_device(role, device) for role in roles})
    components.update(load_vae_and_tokenizer(ckpt, model, memory, device))
    return components


def load_vae_and_tokenizer(ckpt: Checkpoint, model: DictConfig, memory: MemoryPolicy, device: torch.device) -> dict:
    """The VAE, the tokenizer and the scheduler of a checkpoint in either layout."""
    from transformers import AutoTokenizer

    if ckpt.layout == "diffusers":
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

        vae = AutoencoderKLWan.from_pretrained(ckpt.root / "vae", torch_dtype=component_dtype("vae", memory),
                                               device_map=str(memory.load_device("vae", device)))
        return {"vae": vae.eval().requires_grad_(False),
                "tokenizer": AutoTokenizer.from_pretrained(ckpt.root / "tokenizer"),
                "scheduler": scheduler_for(model.shift, UniPCMultistepScheduler.from_pretrained(ckpt.root / "scheduler"))}
    from wan_opt.loading.layouts import TOKENIZER_DIR, VAE_FILES
    from wan_opt.loading.original import load_vae

    return {"vae": load_vae(ckpt.root / VAE_FILES[ckpt.family], component_dtype("vae", memory),
                            memory.load_device("vae", device)),
            "tokenizer": AutoTokenizer.from_pretrained(ckpt.root / TOKENIZER_DIR),
            "scheduler": scheduler_for(model.shift)}


def load_from_files(ckpt: Checkpoint, model: DictConfig, memory: MemoryPolicy, device: torch.device) -> dict:
    """idle_weights=checkpoint: the experts and the text encoder built without weights, each read from its files
    through memory maps when it is needed (wan_opt.loading.mapped, wan_opt.memory.policy.CheckpointSwapper). Those
    that never wait (resident experts, a text encoder kept on the GPU) are read now, each tensor straight to its
    place in its final dtype (fp8 included), so no whole module passes through host memory on the way. LoRAs are
    fused as each expert is read."""
    from wan_opt.loading.layouts import DIFFUSERS_DITS
    from wan_opt.loading.lora import lora_specs
    from wan_opt.loading.mapped import CheckpointWeights

    experts = DIFFUSERS_DITS[ckpt.family]
    roles = (*experts, "text_encoder")
    high, low = lora_specs(model.lora)
    source = CheckpointWeights(ckpt, device, {role: component_dtype(role, memory) for role in roles},
                               loras={"transformer": high, "transformer_2": low})
    components = {role: source.skeleton(role) for role in roles}
    for role in experts:
        memory.shape_for_storage(components[role], device)
    for role in roles:
        if not memory.waits_in_checkpoint(role):
            source.read(role, components[role], memory.load_device(role, device))
    components.update(load_vae_and_tokenizer(ckpt, model, memory, device))
    components["weight_source"] = source
    return components

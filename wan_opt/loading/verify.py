"""A checkpoint's files read for what they claim, before any weights load, and the sizes the plan counts with.

wan_opt.loading.layouts finds the files; here each is opened without reading its tensors: every JSON file
parses, every safetensors header is readable and its file exactly as long as the header says (a cut download
is caught here, not halfway through loading), a shard index and its shards agree tensor by tensor, and every
tensor has the shape that its config.json asks for (the modules are built on the meta device from those
configs, so nothing is allocated). The same meta modules give the parameter counts the memory plan uses, so a
small checkpoint is planned as what it is.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import (PER_TOKEN_TIMESTEPS, T5_FILE, VAE_FILES, Checkpoint, read_json, required_files,
                                     safetensors_header, weight_files, weight_map)
from wan_opt.memory.plan import ModelSizes

DIT_WEIGHTS = "diffusion_pytorch_model"


@dataclass(frozen=True)
class Inspection:
    sizes: ModelSizes  # counted from the checkpoint's own configs
    dit_config: dict  # the DiT's WanTransformer3DModel arguments, for checking LoRAs against it


def inspect_checkpoint(ckpt: Checkpoint) -> Inspection:
    """Check every file of `ckpt` (already known to be present) and count its modules; the answer is kept
    while the files stay as they are."""
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in required_files(ckpt))
    return _inspect(ckpt, stamp)


@functools.lru_cache(maxsize=4)
def _inspect(ckpt: Checkpoint, stamp: tuple) -> Inspection:
    for file in required_files(ckpt):
        if file.suffix == ".json":
            read_json(file)
    if ckpt.layout == "diffusers":
        read_json(ckpt.root / "model_index.json")
    dits = [dit_module(folder, ckpt.layout) for folder in ckpt.dit_dirs()]
    if ckpt.layout == "diffusers":
        text_encoder, vae = diffusers_text_encoder(ckpt.root / "text_encoder"), diffusers_vae(ckpt.root / "vae")
        te_params, vae_params = params_b(text_encoder), params_b(vae)
        embedding = text_encoder.get_input_embeddings().weight.numel() / 1e9
        spatial, temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    else:
        t5_state = torch_file(ckpt.root / T5_FILE)
        te_params = params_b(t5_state)
        embedding = t5_state["token_embedding.weight"].numel() / 1e9 if "token_embedding.weight" in t5_state else 0.0
        vae_state = torch_file(ckpt.root / VAE_FILES[ckpt.family])
        from wan_opt.loading.original_names import is_wan22_vae

        vae_params, spatial, temporal = params_b(vae_state), 16 if is_wan22_vae(vae_state) else 8, 4
    dit = dits[0]
    sizes = sizes_of(dit, len(dits), ckpt.family, te_params, embedding, vae_params, spatial, temporal)
    return Inspection(sizes, {k: v for k, v in dit.config.items() if not k.startswith("_")})


# The Wan 2.2 VAE's tiled decode took 1.5 times the Wan 2.1 VAE's working set in bf16 and in float32 (TI2V-5B at
# 1280*704 x 121 on an H200: docs/memory-floor.md); its spatial stride of 16 (the 2.1 VAE's is 8) tells them apart.
WAN22_VAE_DECODE_SCALE = 1.5


def sizes_of(dit: torch.nn.Module, experts: int, family: str, te_params_b: float, te_embedding_params_b: float,
             vae_params_b: float, vae_spatial: int, vae_temporal: int) -> ModelSizes:
    """What the memory plan counts with, from a DiT module (real or on the meta device) and the other modules'
    parameter counts."""
    blocks = sum(p.numel() for m in dit.blocks.modules() if type(m) is torch.nn.Linear for p in m.parameters())
    config = dit.config
    return ModelSizes(params_b(dit), experts, te_params_b, vae_params_b, config.out_channels,
                      vae_spatial * config.patch_size[1], vae_temporal, blocks / 1e9, config.num_attention_heads,
                      width=config.num_attention_heads * config.attention_head_dim,
                      per_token_timesteps=family in PER_TOKEN_TIMESTEPS,
                      text_encoder_embedding_params_b=te_embedding_params_b,
                      vae_decode_scale=WAN22_VAE_DECODE_SCALE if vae_spatial == 16 else 1.0)


def params_b(module_or_state) -> float:
    """Billions of parameters of a module (tied weights once) or of a state dict's tensors."""
    tensors = module_or_state.parameters() if isinstance(module_or_state, torch.nn.Module) else (
        t for t in module_or_state.values() if isinstance(t, torch.Tensor))
    return sum(t.numel() for t in tensors) / 1e9


def shard_tensors(folder: Path, stem: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over a model folder's safetensors files, each header checked, and the shard index
    (where there is one) checked against what each shard holds."""
    headers = {file: safetensors_header(file) for file in weight_files(folder, stem)}
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        mapping = weight_map(index)
        for name, shard in mapping.items():
            if name not in headers[folder / shard]:
                raise WanOptError(f"{index} puts {name!r} in {shard}, which does not hold it: re-download the "
                                  f"checkpoint.")
        for file, header in headers.items():
            for name in header:
                if mapping.get(name) != file.name:
                    raise WanOptError(f"{file} holds {name!r}, which {index.name} does not list there: "
                                      f"re-download the checkpoint.")
    return {name: shape for header in headers.values() for name, (_, shape) in header.items()}


def built(make, name: str, config: Path) -> torch.nn.Module:
    """`make()` run on the meta device (a module from a config's arguments); a config it cannot take is a
    sentence naming the file."""
    try:
        with torch.device("meta"):
            return make()
    except Exception as exc:  # noqa: BLE001 - whatever a malformed config makes the class raise
        raise WanOptError(f"{config} does not describe a {name} ({type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:200]}): re-download it.") from None


def dit_module(folder: Path, layout: str) -> torch.nn.Module:
    """The meta DiT its config.json describes, every tensor of its shards checked against it."""
    from diffusers import WanTransformer3DModel

    from wan_opt.loading import original_names

    config_path = folder / "config.json"
    config, tensors = read_json(config_path), shard_tensors(folder, DIT_WEIGHTS)
    if layout == "diffusers":
        module = built(lambda: WanTransformer3DModel.from_config(config), "WanTransformer3DModel", config_path)
        check_shapes(module, tensors, folder, config_path, exact=False)
        return module
    try:
        arguments = original_names.dit_config_from_original(config)
    except (KeyError, TypeError, ValueError) as err:
        raise WanOptError(f"{config_path} has no usable {err.args[0]!r} entry: it is not a WanModel config.") from None
    renamed = {}
    for key, shape in tensors.items():
        try:
            renamed[original_names.convert_dit_key(key)] = shape
        except ValueError as err:
            raise WanOptError(f"{folder}: {err}") from None
    module = built(lambda: WanTransformer3DModel(**arguments), "WanTransformer3DModel", config_path)
    check_shapes(module, renamed, folder, config_path, exact=True)
    return module


def diffusers_text_encoder(folder: Path) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    config_path = folder / "config.json"
    config = read_json(config_path)
    module = built(lambda: UMT5EncoderModel(UMT5Config.from_dict(config)), "UMT5EncoderModel", config_path)
    check_shapes(module, shard_tensors(folder, "model"), folder, config_path, exact=False)
    return module


def diffusers_vae(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    config_path = folder / "config.json"
    config = read_json(config_path)
    module = built(lambda: AutoencoderKLWan.from_config(config), "AutoencoderKLWan", config_path)
    check_shapes(module, shard_tensors(folder, DIT_WEIGHTS), folder, config_path, exact=False)
    return module


def check_shapes(module: torch.nn.Module, tensors: dict[str, tuple[int, ...]], where: Path, config: Path,
                 exact: bool) -> None:
    """Every tensor of the files has the shape `module` (built from `config`) gives it, and every weight of
    `module` is in the files (tied weights once). exact: a tensor the module lacks is an error too (the original
    layout, loaded tensor by tensor); the libraries skip such tensors in the Diffusers layout."""
    expected = module.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    alias = {name: first.setdefault(id(tensor), name) for name, tensor in expected.items()}
    kind = type(module).__name__
    for name, shape in tensors.items():
        if name not in expected:
            if exact:
                raise WanOptError(f"{where} holds a tensor for {name!r}, which {kind} does not have: check that "
                                  f"model= matches the checkpoint.")
            continue
        if tuple(expected[name].shape) != tuple(shape):
            raise WanOptError(f"{where} holds {name!r} of shape {list(shape)} where {config} asks for "
                              f"{list(expected[name].shape)}: re-download it, or check that model= matches the "
                              f"checkpoint.")
    present = {alias[name] for name in tensors if name in alias}
    missing = [name for name in expected if alias[name] == name and name not in present]
    if missing:
        raise WanOptError(f"{where} lacks the weights of {missing[0]!r}"
                          f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: the checkpoint is "
                          f"incomplete; re-download it.")


def torch_file(path: Path) -> dict:
    """The state dict of a torch.save archive, mapped rather than read (its tensors stay on disk)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a cut, foreign or unsafe file: the reader's words say which
        reason = (str(exc).splitlines() or [""])[0].split(". ")[0].rstrip(".")
        raise WanOptError(f"{path} is not a readable PyTorch file ({type(exc).__name__}: {reason[:200]}): "
                          f"re-download it.") from None
    if not isinstance(state, dict):
        raise WanOptError(f"{path} holds a {type(state).__name__}, not a state dict of tensors: re-download it.")
    return state

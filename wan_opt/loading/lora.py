"""Fuse LoRAs into the Wan 2.2 experts' weights: W += strength * (alpha / rank) * up @ down, once, before inference.

Fusing instead of attaching adapters costs nothing per step and needs no PEFT. Wan2.2-T2V-A14B takes one file
and one strength per expert (`transformer`: high noise, `transformer_2`: low noise), as the step-distilled
"Lightning" / lightx2v LoRAs come in high/low pairs. Key layouts understood (one example key each):

  diffusers / PEFT     transformer.blocks.0.attn1.to_q.lora_A.weight (+ lora_B.weight, lora_B.bias);
                       the LoRA alpha is read from the safetensors header that diffusers writes
  original Wan names   diffusion_model.blocks.0.self_attn.q.lora_down.weight (+ lora_up.weight, .alpha),
                       also with lora_A/lora_B and with no prefix: ModelTC/Wan2.2-Lightning's
                       high_noise_model.safetensors / low_noise_model.safetensors, ComfyUI/Kijai conversions
  lightx2v distill     the same names plus full-tensor differences: <module>.diff (weight), <module>.diff_b
                       (bias), blocks.0.diff_m (modulation), e.g. diffusion_model.blocks.0.norm3.diff,
                       diffusion_model.head.head.diff, diffusion_model.patch_embedding.diff_b
  kohya / musubi-tuner lora_unet_blocks_0_self_attn_q.lora_down.weight (+ lora_up.weight, .alpha)

Keys are renamed with wan_opt.loading.original_names (the mapping that loads the Wan team's checkpoints), so a checkpoint
and a LoRA can never disagree on a name. diffusers' own converters (`_convert_non_diffusers_wan_lora_to_diffusers`,
`_convert_musubi_wan_lora_to_diffusers`) are not used to load: the first drops lightx2v's norm, modulation and
patch-embedding differences with only a log line and the second needs every block complete with alphas, while
here no key may be lost silently; tests/test_lora.py checks that both agree with this module where they apply.

Every key must land on a parameter of the model, otherwise WanOptError; only text-encoder keys (`lora_te*`,
`text_encoder.*`) are skipped, since Wan LoRAs target the DiT alone.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from wan_opt.loading import original_names as original
from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import safetensors_header

# Text-encoder entries some trainers save next to the DiT's; the Wan experts do not use them.
IGNORED_PREFIXES = ("lora_te", "text_encoder.")
# Outer prefixes of the DiT's keys: ComfyUI/original ("diffusion_model."), diffusers ("transformer."), PEFT.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_KOHYA_PREFIX = "lora_unet_"
# suffix -> (role, which parameter of the module it changes); ".diff" last so that ".diff_b" wins
_SUFFIXES = (
    (".lora_down.weight", "down", "weight"), (".lora_A.weight", "down", "weight"),
    (".lora_up.weight", "up", "weight"), (".lora_B.weight", "up", "weight"),
    (".lora_B.bias", "lora_bias", "bias"), (".alpha", "alpha", "weight"),
    (".diff_b", "diff", "bias"), (".diff_m", "diff", "modulation"), (".diff", "diff", "weight"),
)
_FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        if hasattr(torch, n)}
_HOOKS_THAT_OWN_WEIGHTS = ("layerwise_casting", "group_offloading")
_PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass
class LoraSpec:
    """One LoRA file and the strength it is fused with (0 leaves the weights as they are)."""
    path: str
    strength: float = 1.0


@dataclass
class LoraDelta:
    """One term a LoRA adds to a parameter: scale * up @ down (a low-rank pair) or scale * full (a difference)."""
    key: str  # the file's key, for messages
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    full: torch.Tensor | None = None
    scale: float = 1.0

    def tensor(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The term in float32 on `device`, shaped like the target parameter."""
        if self.full is not None:
            delta = self.full.to(device, torch.float32)
        else:  # conv pairs (PEFT's Conv3d LoRA: 1x1x1 up) multiply as flattened matrices
            delta = self.up.to(device, torch.float32).flatten(1) @ self.down.to(device, torch.float32).flatten(1)
        return (delta * self.scale).reshape(shape)  # not in place: `full` may be the file's own tensor

    def shape(self) -> tuple[int, ...]:
        if self.full is not None:
            return tuple(self.full.shape)
        return (self.up.shape[0], *self.down.shape[1:])


# ------------------------------------------------------------------------------------------------ reading

def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (.safetensors, or .pt/.pth/.bin through torch.load(weights_only=True)).

    A diffusers/PEFT file keeps its LoRA alpha in the safetensors header instead of a tensor; it is returned
    as `<module>.alpha` entries, so every layout carries its scale the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise WanOptError(f"LoRA file {path} does not exist.")
    try:
        if path.suffix in (".pt", ".pth", ".bin"):
            state_dict, metadata = _torch_load(path), {}
        else:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # any reader failure is the same mistake for the user: a bad file
        raise WanOptError(f"LoRA file {path} could not be read ({type(err).__name__}: {err}).") from None
    return {**state_dict, **_alphas_from_metadata(state_dict, metadata, path)}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise TypeError(f"it holds a {type(loaded).__name__}, not a dict of tensors")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _alphas_from_metadata(state_dict: dict, metadata: dict, path: Path) -> dict[str, torch.Tensor]:
    """PEFT's scale per module (lora_alpha / r, alpha_pattern, rsLoRA's / sqrt(r)) as `.alpha` tensors."""
    try:
        config = json.loads(metadata.get(_PEFT_METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        raise WanOptError(f"LoRA file {path} has an unreadable {_PEFT_METADATA_KEY} header.") from None
    if any(key.startswith("transformer.") for key in config):  # saved by a pipeline: "transformer.<field>"
        config = {key[len("transformer."):]: v for key, v in config.items() if key.startswith("transformer.")}
    if config.get("lora_alpha") is None:
        return {}
    patterns = config.get("alpha_pattern") or {}
    alphas = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        # PEFT's get_pattern_key: a pattern matches the end of the module name, at a dot boundary
        name = module.removeprefix("transformer.")
        pattern = next((p for p in patterns if re.match(rf"(.*\.)?({p})$", name)), None)
        alpha = float(patterns[pattern] if pattern is not None else config["lora_alpha"])
        if config.get("use_rslora"):
            alpha *= math.sqrt(down.shape[0])  # rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r
        if f"{module}.alpha" not in state_dict:
            alphas[f"{module}.alpha"] = torch.tensor(alpha)
    return alphas


# ------------------------------------------------------------------------------------------------ naming

def _parse(key: str) -> tuple[str, str, str, bool] | None:
    """(module path as written, role, parameter it changes, kohya naming?) or None for an unknown suffix."""
    kohya = key.startswith(_KOHYA_PREFIX)
    name = key[len(_KOHYA_PREFIX):] if kohya else next(
        (key[len(p):] for p in _PREFIXES if key.startswith(p)), key)
    for suffix, role, attr in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role, attr, kohya
    return None


@functools.lru_cache(maxsize=None)
def _original_to_diffusers(name: str) -> str | None:
    try:
        return original.convert_dit_key(name)
    except ValueError:
        return None


def _parameter(name: str, params: dict) -> str | None:
    """The model's parameter that `name` (original Wan or diffusers naming) denotes, if any.

    wan_opt.loading.original_names knows only real Wan names and raises on anything else, so trying it first cannot
    misread a diffusers name; the one name in both layouts, blocks.N.norm2, has weights only in diffusers'.
    """
    renamed = _original_to_diffusers(name)
    if renamed in params:
        return renamed
    return name if name in params else None


def _dotted(name: str) -> Iterator[str]:
    """Every way of reading the underscores of a kohya name as dots or as part of a module name."""
    parts = name.split("_")
    if len(parts) > 12:  # no Wan module path has that many; keeps the search small
        return
    for seps in itertools.product("._", repeat=len(parts) - 1):
        yield parts[0] + "".join(sep + part for sep, part in zip(seps, parts[1:]))


def _resolve(module: str, attr: str, kohya: bool, params: dict) -> str | None:
    """The model parameter a key changes. A kohya name lost its dots, so every reading is tried; exactly one
    may name a parameter (Wan's module names never make two readings valid)."""
    if not kohya:
        return _parameter(f"{module}.{attr}", params)
    hits = {hit for cand in _dotted(module) if (hit := _parameter(f"{cand}.{attr}", params))}
    return hits.pop() if len(hits) == 1 else None


# ------------------------------------------------------------------------------------------------ deltas

def lora_deltas(state_dict: dict[str, torch.Tensor], model: torch.nn.Module,
                source: str = "LoRA") -> dict[str, list[LoraDelta]]:
    """What `state_dict` adds to each parameter of `model` (a WanTransformer3DModel), by parameter name.

    Any supported layout is normalised to diffusers' names (`blocks.0.attn1.to_q.weight`,
    `blocks.0.ffn.net.0.proj.weight`, `condition_embedder.text_embedder.linear_1.weight`, `proj_out.weight`,
    `blocks.0.scale_shift_table`, ...). Raises WanOptError (naming `source`) when no key or only some keys
    match a parameter, when a pair is incomplete, or when a delta's shape differs from its parameter's.
    """
    params = dict(model.named_parameters())
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # module -> role -> (key, tensor)
    diffs: dict[str, tuple[str, torch.Tensor]] = {}  # parameter -> (key, tensor)
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        parsed = _parse(key)
        target = parsed and _resolve(parsed[0], parsed[2], parsed[3], params)
        if not target:
            unmatched.append(key)
            continue
        role = parsed[1]
        if role == "diff":
            _put(diffs, target, key, tensor, source)
        else:
            _put(pairs.setdefault(target.rpartition(".")[0], {}), role, key, tensor, source)
    _check_all_matched(unmatched, len(state_dict), bool(pairs or diffs), source)
    deltas = {target: [LoraDelta(key, full=tensor)] for target, (key, tensor) in diffs.items()}
    for module, roles in pairs.items():
        for target, delta in _pair_deltas(module, roles, source):
            deltas.setdefault(target, []).append(delta)
    for target, terms in deltas.items():
        for term in terms:
            _check_shape(term, target, params[target].shape, source)
    return deltas


def _put(slot: dict, name: str, key: str, tensor: torch.Tensor, source: str) -> None:
    if name in slot:  # two layouts in one file naming the same thing: adding both would double it
        raise WanOptError(f"{source}: {key} and {slot[name][0]} set the same thing ({name}) twice.")
    slot[name] = (key, tensor)


def _check_all_matched(unmatched: list[str], total: int, any_matched: bool, source: str) -> None:
    if not any_matched:  # also a file of text-encoder keys only: fusing nothing must not pass silently
        raise WanOptError(f"{source}: none of its {total} keys match a module of the Wan transformer; "
                          f"is it a Wan 2.2 LoRA?")
    if unmatched:
        raise WanOptError(f"{source}: {len(unmatched)} of its {total} keys match no module of the Wan "
                          f"transformer (first: {', '.join(unmatched[:3])}); is it a LoRA for another Wan "
                          f"model (I2V, another size) or in an unsupported layout?")


def _pair_deltas(module: str, roles: dict, source: str):
    """The weight term (alpha / rank * up @ down) and, with PEFT's lora_B.bias, the bias term of one module."""
    if "down" not in roles or "up" not in roles:
        key = next(iter(roles.values()))[0]
        raise WanOptError(f"{source}: {key} has no matching lora_down/lora_A and lora_up/lora_B pair.")
    (down_key, down), (up_key, up) = roles["down"], roles["up"]
    rank = down.shape[0]
    if up.dim() < 2 or up.shape[1] != rank or any(s != 1 for s in up.shape[2:]):
        raise WanOptError(f"{source}: {up_key} of shape {tuple(up.shape)} does not pair with {down_key} "
                          f"of shape {tuple(down.shape)} (rank {rank}).")
    scale = float(roles["alpha"][1]) / rank if "alpha" in roles else 1.0  # no alpha: the factors are final
    yield f"{module}.weight", LoraDelta(up_key, up=up, down=down, scale=scale)
    if "lora_bias" in roles:
        key, bias = roles["lora_bias"]
        yield f"{module}.bias", LoraDelta(key, full=bias, scale=scale)


def _check_shape(delta: LoraDelta, target: str, shape: torch.Size, source: str) -> None:
    got = delta.shape()
    # a conv pair is compared flattened: (out, in * kernel)
    fits = got == tuple(shape) or (delta.full is None and len(shape) > 2
                                   and (got[0], math.prod(got[1:])) == (shape[0], math.prod(shape[1:])))
    if not fits:
        raise WanOptError(f"{source}: {delta.key} gives a delta of shape {got}, but {target} has shape "
                          f"{tuple(shape)}; is the LoRA for another Wan model?")


# ------------------------------------------------------------------------------------------------ fusing

def apply_lora(model: torch.nn.Module, spec: LoraSpec) -> int:
    """Fuse `spec` into `model` in place; returns the number of parameters changed (0 at strength 0).

    Must run before fp8 storage, offloading hooks or expert swapping take the weights over (i.e.
    before `WanOptPipeline.apply_policies()`): the delta is added to the weights as they are then. Fusing
    twice adds twice. Each delta is computed in float32 on its weight's device, one tensor at a time, and
    the sum is rounded once into the weight's own dtype.

    >>> apply_lora(pipe.transformer, LoraSpec("high_noise_model.safetensors", strength=1.0))  # doctest: +SKIP
    400
    """
    return _fuse(model, _plan(model, spec), spec.strength)


def _plan(model: torch.nn.Module, spec: LoraSpec) -> dict[str, list[LoraDelta]]:
    """Read and check everything that can fail, without changing a weight."""
    deltas = lora_deltas(read_lora(spec.path), model, source=spec.path)
    if spec.strength != 0:
        _check_fusable(model, spec.path)
    return deltas


def _fuse(model: torch.nn.Module, deltas: dict[str, list[LoraDelta]], strength: float) -> int:
    if strength == 0:
        return 0
    params = dict(model.named_parameters())
    count = len(deltas)
    with torch.no_grad():
        while deltas:  # popping releases each LoRA tensor once fused
            target, terms = deltas.popitem()
            param = params[target]
            delta = sum(term.tensor(param.shape, param.device) for term in terms)
            param.copy_((param.float() + strength * delta).to(param.dtype))
    return count


def _check_fusable(model: torch.nn.Module, source: str) -> None:
    """Refuse weights that a storage/offloading mechanism already owns: a fused delta would be lost or wrong."""
    hooked = any(name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
                 for m in model.modules() for name in _HOOKS_THAT_OWN_WEIGHTS)
    param = next((p for p in model.parameters() if p.dtype in _FP8 or p.is_meta), None)
    if hooked or param is not None:
        raise WanOptError(f"{source}: LoRAs must be fused before fp8 storage and offloading are "
                          f"applied to the transformer (call it before apply_policies()).")


def apply_expert_loras(pipe, high: LoraSpec | None, low: LoraSpec | None) -> dict[str, int]:
    """Fuse `high` into `pipe.transformer` (the high-noise expert, or the only DiT of a one-expert model) and
    `low` into `pipe.transformer_2` (the low-noise expert); returns the parameters changed per expert.

    Every file is read and checked against its expert before any weight changes, so an error leaves the
    pipeline as it was. Call it before the memory policy is applied (see `apply_lora`).

    >>> pipe = WanOptPipeline(**load_components(model, memory, device), memory=memory, speed=speed)  # doctest: +SKIP
    >>> apply_expert_loras(pipe, LoraSpec("Wan2.2-Lightning/high_noise_model.safetensors"),
    ...                    LoraSpec("Wan2.2-Lightning/low_noise_model.safetensors"))  # doctest: +SKIP
    {'transformer': 400, 'transformer_2': 400}
    >>> pipe.apply_policies()  # doctest: +SKIP
    """
    if low is not None and getattr(pipe, "transformer_2", None) is None:
        raise WanOptError(f"A low-noise LoRA ({low.path}) was given, but this model has a single transformer "
                          f"and no low-noise expert; give it as the high-noise LoRA instead.")
    specs = {name: spec for name, spec in (("transformer", high), ("transformer_2", low)) if spec is not None}
    planned = {name: _plan(getattr(pipe, name), spec) for name, spec in specs.items()}
    return {name: _fuse(getattr(pipe, name), planned[name], specs[name].strength) for name in specs}


def check_lora_file(path: str | Path, model: torch.nn.Module | None) -> None:
    """Before anything loads: the LoRA file is readable and, given the expert's architecture (`model`, built on
    the meta device), every key lands on one of its parameters with the right shape. A safetensors file is
    checked from its header alone (its scalar alphas aside); a .pt/.pth/.bin file is read."""
    path = Path(path).expanduser()
    if path.suffix in (".pt", ".pth", ".bin"):
        state = read_lora(path)
    else:
        header = safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) if key.endswith(".alpha") else torch.empty(shape, device="meta")
                         for key, (_, shape) in header.items()}
        except Exception as err:  # noqa: BLE001 - any reader failure is the same mistake: a bad file
            raise WanOptError(f"LoRA file {path} could not be read ({type(err).__name__}: {err}).") from None
        state.update(_alphas_from_metadata(state, metadata, path))
    if model is not None:
        lora_deltas(state, model, source=str(path))


def lora_specs(cfg) -> tuple[LoraSpec | None, LoraSpec | None]:
    """The (high-noise, low-noise) LoRAs a model config's `lora:` block asks for."""
    high = LoraSpec(cfg.high_noise, cfg.high_noise_strength) if cfg.high_noise else None
    low = LoraSpec(cfg.low_noise, cfg.low_noise_strength) if cfg.low_noise else None
    return high, low


"""The rules across knobs, and what is checked before loading: a device or GPU group that cannot do what the
config asks, a LoRA or checkpoint that is not there or not whole. Each failure is one WanOptError sentence.

A single knob's type and words are the schema's (wan_opt.config), checked by Hydra when it composes;
wan_opt.prepare runs these after it and before anything slow starts. What the command line may not do at all
(add keys the schema lacks, remove settings, name code through `_target_`) is checked before Hydra starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wan_opt import hardware
from wan_opt.config import RunConfig
from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import check_checkpoint
from wan_opt.memory.plan import Layout, ModelSizes
from wan_opt.request import check_lora_config

# The keys by which Hydra's instantiate picks and calls code; a config may name only these packages' classes.
BUILD_KEYS = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")
BUILT_FROM = ("wan_opt.", "diffusers.", "transformers.")
HYDRA_BUILT_FROM = ("hydra.", "hydra_plugins.")  # Hydra's own launchers, sweepers and callbacks
MAX_TEXT_LEN = 512  # the prompt length in tokens that Wan 2.2's text encoder was trained with
# Flags of the command line whose next word is their value, not an override.
_FLAGS_WITH_VALUES = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c",
                      "--package", "-p", "--shell-completion", "-sc", "--experimental-rerun")


def check_knobs(cfg: DictConfig) -> None:
    """Values out of a knob's range, and knobs that cannot go together: name the wrong one and what to do."""
    check_targets(cfg)
    check_finite(cfg)
    check_model(cfg.model)
    memory = cfg.hardware.memory
    if memory.vram_budget_gb < 0:
        raise WanOptError(f"hardware.memory.vram_budget_gb={memory.vram_budget_gb:g} is negative: pass the GB of "
                          f"GPU memory a run may use.")
    if memory.host_ram_gb is not None and memory.host_ram_gb <= 0:
        raise WanOptError(f"hardware.memory.host_ram_gb={memory.host_ram_gb:g} is not a size: pass the GB of host "
                          f"memory a run may use, or null for this machine's.")
    if memory.offload_blocks_per_group < 1:
        raise WanOptError(f"hardware.memory.offload_blocks_per_group={memory.offload_blocks_per_group} is below 1: "
                          f"pass 1 or more.")
    speed = cfg.hardware.speed
    if not 0.0 <= speed.cfg_truncation < 1.0:
        raise WanOptError(f"hardware.speed.cfg_truncation={speed.cfg_truncation} is not a fraction of the steps: "
                          f"pass a value from 0 (off) up to, not including, 1.")
    if speed.fp8_matmul and not cfg.hardware.memory.weight_dtype.startswith("float8"):
        raise WanOptError("hardware.speed.fp8_matmul multiplies fp8-stored weights: "
                          "set hardware.memory.weight_dtype=float8_e4m3fn too.")
    if speed.step_cache_threshold <= 0 or speed.step_cache_interval < 1:
        raise WanOptError("hardware.speed.step_cache_threshold must be above 0 and step_cache_interval at least 1.")
    if speed.step_cache == "magcache":
        check_magcache(cfg)


def check_finite(cfg: DictConfig) -> None:
    """No float knob takes NaN or infinity: each is a size, a scale or a fraction."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:  # an interpolation in a profile of the user's that cannot resolve
        raise WanOptError(f"The config cannot be read: {str(exc).splitlines()[0]}.") from None
    for key, value in leaves(values):
        if isinstance(value, float) and not math.isfinite(value):
            raise WanOptError(f"{key}={value} is not a number: pass a finite value.")


def check_model(model: DictConfig) -> None:
    """The model's own knobs, which a command line can change too."""
    if model.shift <= 0:
        raise WanOptError(f"model.shift={model.shift:g} is not above 0: pass the scheduler's positive shift "
                          f"(the Wan team's: 12 for T2V-A14B, 5 for TI2V-5B).")
    if model.boundary is not None and not 0 <= model.boundary <= 1:
        raise WanOptError(f"model.boundary={model.boundary:g} is not a fraction of the timesteps: pass a value "
                          f"from 0 to 1 (the Wan team's: 0.875).")
    if not 1 <= model.text_len <= MAX_TEXT_LEN:
        raise WanOptError(f"model.text_len={model.text_len} is outside 1 to {MAX_TEXT_LEN}, the prompt length in "
                          f"tokens that Wan 2.2's text encoder was trained with.")
    if model.pixel_grid < 1:
        raise WanOptError(f"model.pixel_grid={model.pixel_grid} is not a size: pass the model's pixel grid (16, "
                          f"or 32 for TI2V-5B).")


def check_targets(cfg: DictConfig) -> None:
    """Every object the config builds is one of wan-opt's, diffusers' or transformers' (a profile in a user's
    --config-dir included): a config never names other code to run."""
    for key, value in leaves(OmegaConf.to_container(cfg, resolve=False)):
        name = key.rpartition(".")[2]
        if name in BUILD_KEYS[1:]:
            raise WanOptError(f"{key} is set: wan-opt builds its objects as the schema says, so drop it.")
        if name == "_target_" and not (isinstance(value, str) and value.startswith(BUILT_FROM)):
            raise WanOptError(f"{key}={value} names code outside wan-opt, diffusers and transformers: a config may "
                              f"build only their classes, so drop it.")


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, f"{prefix}{index}.")
    else:
        yield prefix.rstrip("."), node


# -- the command line, before Hydra starts -----------------------------------------------------------------


def check_command_line(argv: Sequence[str]) -> None:
    """What the command line may not do, said before Hydra builds anything: add settings the schema does not
    have, remove settings, set the keys by which a config names code, or bring in config folders whose files
    name code other than wan-opt's, diffusers' and transformers'."""
    overrides, folders = split_command_line(argv)
    check_overrides(overrides)
    for _, override in parsed(overrides):
        if override.key_or_group == "hydra.searchpath" and isinstance(override.value(), list):
            folders += [str(place).removeprefix("file://") for place in override.value()
                        if str(place).startswith("file://")]
    for folder in folders:
        check_config_folder(Path(folder).expanduser())


def parsed(overrides: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """Hydra's reading of each override it can read (it reports those it cannot itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        try:
            yield text, parser.parse_override(text)
        except Exception:  # noqa: BLE001 - Hydra says what is wrong with an override it cannot read
            continue


def split_command_line(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the overrides, the config folders named by --config-dir and --config-path) of a command line."""
    overrides, folders, args = [], [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, has_value, value = arg.partition("=")
        if arg in _FLAGS_WITH_VALUES or (arg.startswith("-") and has_value and flag in _FLAGS_WITH_VALUES):
            if not has_value:
                i += 1
                value = args[i] if i < len(args) else ""
            if flag in ("--config-dir", "-cd", "--config-path", "-cp"):
                folders.append(value)
        elif not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    return overrides, folders


def check_overrides(overrides: Sequence[str]) -> None:
    """Overrides in Hydra's grammar (the command line's, or the Python API's): `+`/`++` only for settings the
    schema has, no `~` of wan-opt's settings, no `@package`, and no key by which a config names code."""
    for text, override in parsed(overrides):
        key = override.key_or_group
        for path in [key, *value_paths(override, key)]:
            if set(path.split(".")) & set(BUILD_KEYS):
                raise WanOptError(f"{text} sets {'/'.join(set(path.split('.')) & set(BUILD_KEYS))}, by which a "
                                  f"config names code to run: wan-opt builds only its own objects, so drop it.")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or "/" in key:
            continue  # Hydra's own settings and config groups: Hydra checks them
        if override.is_delete():
            raise WanOptError(f"{text} removes a setting wan-opt needs: set it to a value instead.")
        if override.package is not None:
            raise WanOptError(f"{text} moves the {key} group to another place (@{override.package}): drop "
                              f"the @ part.")
        if override.is_add() or override.is_force_add():
            for path in [key, *value_paths(override, key)]:
                if not in_schema(path):
                    raise WanOptError(f"There is no setting '{path}': check its name (`python run.py --cfg job` "
                                      f"prints every setting); `+` cannot add one.")


def value_paths(override, key: str) -> list[str]:
    """The dotted keys a dict value (`key={a: 1}`) would set, in every value of a sweep."""
    values = list(override.sweep_iterator()) if override.is_sweep_override() and not (
        override.is_interval_sweep()) else [override.value()]
    return [path for value in values if isinstance(value, dict)
            for path, _ in leaves(value, f"{key}.") if path]


def in_schema(key: str) -> bool:
    """Whether dotted `key` names a setting of wan_opt.config.RunConfig (or a group of it)."""
    kind: Any = RunConfig
    for part in key.split("."):
        if dataclasses.is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            if part not in hints:
                return False
            field = next(f for f in dataclasses.fields(kind) if f.name == part)
            kind = hints[part]
            if kind is Any:  # `pipeline`: only the keys of its default
                default = field.default_factory() if field.default_factory is not dataclasses.MISSING else {}
                kind = {k: None for k in default}
        elif isinstance(kind, dict) and part in kind:
            kind = kind[part]
        else:
            return False
    return True


def check_config_folder(folder: Path) -> None:
    """Every `_target_` in a user's config folder names wan-opt's, diffusers' or transformers' classes (Hydra's
    own, in its `hydra` settings); checked before Hydra reads the folder, since Hydra builds its callbacks first."""
    import yaml

    if not folder.is_dir():
        return
    for file in config_files(folder):
        try:
            documents = list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # Hydra names a file it cannot read
        in_hydra_folder = file.relative_to(folder).parts[0] == "hydra"
        for document in documents:
            for key, value in leaves(document):
                parts = key.split(".")
                hydra_part = in_hydra_folder or parts[0] == "hydra"
                allowed = BUILT_FROM + (HYDRA_BUILT_FROM if hydra_part else ())
                if parts[-1] in BUILD_KEYS[1:] and not hydra_part:
                    raise WanOptError(f"{file} sets {key}: wan-opt builds its objects as the schema says, so "
                                      f"drop it.")
                if parts[-1] == "_target_" and not (isinstance(value, str) and value.startswith(allowed)):
                    raise WanOptError(f"{file} sets {key}={value}, code outside wan-opt, diffusers and "
                                      f"transformers: a config may build only their classes, so drop it.")


def config_files(folder: Path, depth: int = 4, limit: int = 2000) -> list[Path]:
    """The YAML files of a config folder, groups nested a few levels deep (a home folder given by mistake is
    not walked whole)."""
    files, level = [], [folder]
    for _ in range(depth):
        below = []
        for place in level:
            try:
                entries = sorted(place.iterdir())
            except OSError:
                continue
            files += [e for e in entries if e.suffix in (".yaml", ".yml") and e.is_file()]
            below += [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        level = below
    return files[:limit]


def check_magcache(cfg: DictConfig) -> None:
    from wan_opt.optim import magcache

    import diffusers.hooks

    if not hasattr(diffusers.hooks, "MagCacheConfig"):
        raise WanOptError("hardware.speed.step_cache=magcache needs a diffusers with MagCache "
                          "(diffusers.hooks.MagCacheConfig): upgrade diffusers, or pick another step_cache.")
    if cfg.hardware.speed.cfg_truncation > 0:
        raise WanOptError("hardware.speed.step_cache=magcache counts the steps of each branch, and cfg_truncation "
                          "drops the unconditional branch from the last steps: use one of the two.")
    magcache.check(cfg.hardware.speed.step_cache_ratios, cfg.model.boundary)


def check_device(cfg: DictConfig) -> None:
    if os.environ.get("WAN_OPT_HOPPER_SCHEDULE"):  # read when the Hopper kernels load: refuse a wrong name now
        with contextlib.suppress(ImportError):  # no Gluon here: no Hopper kernel to schedule
            from wan_opt.kernels.attention_hopper import schedule_from_env

            schedule_from_env()
    if cfg.hardware.device == "cuda" and hardware.device_capability() is None:
        raise WanOptError(f"Profile {cfg.hardware.name} needs a CUDA GPU and none is visible: "
                          f"pass hardware=cpu, or run on a machine with a GPU.")
    speed = cfg.hardware.speed
    check_attention_library(speed.attention, cfg.hardware.device)
    fp8_knobs = [k for k, on in (("fp8_matmul=true", speed.fp8_matmul), ("attention=fp8", speed.attention == "fp8"))
                 if on]
    if fp8_knobs:
        from wan_opt.optim.fp8_attention import triton_available

        capability = hardware.device_capability() if cfg.hardware.device == "cuda" else None
        if not hardware.has_fp8(capability):
            where = hardware.describe(capability)
            if cfg.mode == "fast":
                raise WanOptError(f"mode=fast runs on fp8 tensor cores (Ada or Hopper, compute capability 8.9+) and "
                                  f"{where}: drop mode=fast; the profile as written is this device's fastest.")
            raise WanOptError(f"hardware.speed.{fp8_knobs[0]} needs fp8 tensor cores (Ada or Hopper, compute "
                              f"capability 8.9+) and {where}: drop it.")
        if speed.attention == "fp8" and not triton_available():
            raise WanOptError("hardware.speed.attention=fp8 runs a Triton kernel and triton is not installed: "
                              "pip install triton, or pass hardware.speed.attention=auto.")


def check_attention_library(choice: str, device: str) -> None:
    """An attention kernel asked for by name, from a separately installed library or wan-opt's Hopper kernel,
    must be able to run here."""
    from wan_opt.optim.speed import OPTIONAL_ATTENTION, installed_attention

    if choice == "hopper":
        from wan_opt.optim.attention import hopper_kernel_missing

        missing = hopper_kernel_missing(None if device == "cuda" else device)
        if missing:
            raise WanOptError(f"hardware.speed.attention=hopper runs wan-opt's exact attention kernel for Hopper "
                              f"and {missing}: pass hardware.speed.attention=auto.")
        return
    if choice not in OPTIONAL_ATTENTION:
        return
    kernel, package = OPTIONAL_ATTENTION[choice]
    if choice not in installed_attention():
        raise WanOptError(f"hardware.speed.attention={choice} runs {kernel} ({package}), which is not "
                          f"installed: install it, or pass hardware.speed.attention=auto.")
    capability = hardware.device_capability() if device == "cuda" else None
    built_for = {"flash3": ((9,), "Hopper (compute capability 9.0)"),
                 "flash4": ((9, 10, 11, 12), "Hopper and Blackwell (compute capability 9.0 and up)")}
    if choice in built_for and (capability is None or capability[0] not in built_for[choice][0]):
        where = hardware.describe(capability)
        raise WanOptError(f"hardware.speed.attention={choice} runs {kernel}, "
                          f"which is built for {built_for[choice][1]}, and {where}: pass "
                          f"hardware.speed.attention=auto.")


def check_parallel(cfg: DictConfig, layout: Layout | None) -> None:
    """Under torchrun (a layout): what one process group cannot do, said before anything loads."""
    if layout is None:
        return
    if cfg.prompts or is_multirun():
        raise WanOptError("Under torchrun wan-opt runs one request across the GPUs: run prompt files and sweeps "
                          "in a single process, or one torchrun per request.")
    if layout.ring > 1 and cfg.hardware.device != "cuda":
        raise WanOptError("Ring attention needs GPUs (it merges partial attention by log-sum-exp, which only the GPU "
                          "kernels return): pass hardware.parallel.sequence=ulysses.")
    if layout.sequence > 1 and cfg.hardware.speed.compile == "full":
        raise WanOptError("hardware.speed.compile=full cannot trace the hooks that split each forward's tokens "
                          "across GPUs: pass hardware.speed.compile=regional (every block compiled but the first).")
    if layout.shard and cfg.hardware.memory.experts != "resident":
        raise WanOptError("hardware.parallel.shard=true keeps every expert on the GPUs, sharded: drop "
                          f"hardware.memory.experts={cfg.hardware.memory.experts}.")


def check_for_loading(cfg: DictConfig, layout: Layout | None) -> ModelSizes | None:
    """What a run that loads weights needs beyond a valid request: the device, the GPU group, the files, each
    file read for what it claims. Returns the checkpoint's own module sizes (None without a checkpoint)."""
    check_device(cfg)
    check_parallel(cfg, layout)
    check_lora_config(cfg.model)
    inspection = None
    if not cfg.model.family.startswith("tiny") and not cfg.model.random_weights:
        if not cfg.model.ckpt_dir:
            raise WanOptError(f"model={cfg.model.name} needs its weights: pass model.ckpt_dir=/path/to/checkpoint.")
        from wan_opt.loading.verify import inspect_checkpoint

        inspection = inspect_checkpoint(check_checkpoint(cfg.model.ckpt_dir, cfg.model.family))
    check_loras(cfg.model, inspection.dit_config if inspection else None)
    return inspection.sizes if inspection else None


def check_loras(model: DictConfig, dit_config: dict | None) -> None:
    """Each LoRA file readable and every key of it a parameter of the expert it is fused into, before loading."""
    files = [path for path in (model.lora.high_noise, model.lora.low_noise) if path]
    if not files:
        return
    import torch
    from diffusers import WanTransformer3DModel

    from wan_opt.loading import arch, tiny
    from wan_opt.loading.lora import check_lora_file

    if dit_config is None and model.family.startswith("tiny"):
        dit_config = tiny.tiny_dit(model.family)
    elif dit_config is None:
        dit_config = arch.DIT_CONFIGS.get(model.family)
    with torch.device("meta"):
        expert = WanTransformer3DModel(**dit_config) if dit_config else None
    for path in files:
        check_lora_file(path, expert)


def is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN

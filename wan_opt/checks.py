"""The rules across knobs, and what is checked before loading: a device or GPU group that cannot do what the
config asks, a LoRA or checkpoint that is not there. Each failure is one WanOptError sentence.

A single knob's type and words are the schema's (wan_opt.config), checked by Hydra when it composes;
wan_opt.prepare runs these after it and before anything slow starts.
"""
from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wan_opt import hardware
from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import check_checkpoint
from wan_opt.memory.plan import Layout
from wan_opt.request import check_lora_config


def check_knobs(cfg: DictConfig) -> None:
    """Values out of a knob's range, and knobs that cannot go together: name the wrong one and what to do."""
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
    """An attention kernel from a separately installed library, asked for by name, must be there to run."""
    from wan_opt.optim.speed import OPTIONAL_ATTENTION, installed_attention

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


def check_for_loading(cfg: DictConfig, layout: Layout | None) -> None:
    """What a run that loads weights needs beyond a valid request: the device, the GPU group, the files."""
    check_device(cfg)
    check_parallel(cfg, layout)
    check_lora_config(cfg.model)
    if cfg.model.family != "tiny" and not cfg.model.random_weights:
        if not cfg.model.ckpt_dir:
            raise WanOptError(f"model={cfg.model.name} needs its weights: pass model.ckpt_dir=/path/to/checkpoint.")
        check_checkpoint(cfg.model.ckpt_dir, cfg.model.family)


def is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN

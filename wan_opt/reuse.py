"""Keeping the loaded model between jobs of one process (Hydra's basic launcher, prompt files).

Two A14B experts fill most of an 80 GB card: a sweep over prompts, seeds, steps, guidance, sizes or frames
must not reload them. A job reuses the previous job's pipeline when everything that decides the loaded weights
and how they are placed is the same; otherwise the old pipeline is released first, so its memory is free
before the new one loads.
"""
from __future__ import annotations

import gc
import json
from typing import Callable

from omegaconf import DictConfig, OmegaConf

# Model fields that only change sampling, never the loaded modules.
SAMPLING_FIELDS = ("name", "steps", "guidance", "guidance_2", "frames", "fps", "sizes", "negative_prompt",
                   "text_len", "solver")

_loaded: dict = {"key": None, "pipe": None}


def weights_key(cfg: DictConfig) -> str:
    """What decides the loaded modules: the model's weights, LoRAs, storage, placement and kernels."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for name in SAMPLING_FIELDS:
        model.pop(name, None)
    hardware = OmegaConf.to_container(cfg.hardware, resolve=True)
    return json.dumps({"model": model, "device": hardware["device"], "memory": hardware["memory"],
                       "speed": hardware["speed"]}, sort_keys=True)


def release() -> None:
    """Drop the cached pipeline and give its GPU memory back."""
    _loaded.update(key=None, pipe=None)
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cached_pipeline(cfg: DictConfig, load: Callable[[DictConfig], object]) -> tuple[object, bool]:
    """(pipeline, reused): the previous job's pipeline when its weights key matches, else a fresh load."""
    key = weights_key(cfg)
    if _loaded["key"] == key:
        return _loaded["pipe"], True
    release()
    pipe = load(cfg)
    _loaded.update(key=key, pipe=pipe)
    return pipe, False

"""The memory a run may use, read from this machine: host RAM, and the GPU's free memory when asked for."""
from __future__ import annotations

import logging
import os

from wan_opt import hardware
from wan_opt.memory.plan import GIB

log = logging.getLogger(__name__)


def host_ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


CUDA_CONTEXT_GIB = 0.5  # what this process's CUDA context will take of the free memory


def _free_gib_now() -> tuple[float | None, str]:
    """Free memory of this process's GPU, what this process holds itself counted as free, and its name."""
    import torch  # only when the budget is the GPU's free memory: the CLI plans without importing torch

    gpu = hardware.process_gpu()
    if gpu is None or gpu.free_gib is None:
        return None, ""
    # A model kept from an earlier job of this sweep is this process's to reuse or free.
    own = torch.cuda.memory_reserved() / GIB if torch.cuda.is_initialized() else 0.0
    return gpu.free_gib + own, gpu.name


def vram_budget(mem, device: str) -> tuple[float, str]:
    """The GPU memory a plan may use, and where that number came from.

    `vram_budget_source=free` lowers the profile's budget to what the GPU has free when the run starts, for a
    card shared with other processes; it never raises it.
    """
    if mem.vram_budget_source != "free" or device == "cpu":
        return mem.vram_budget_gb, "profile"
    free, name = _free_gib_now()
    if free is None:
        log.warning("vram_budget_source=free, but the GPU's free memory cannot be read; planning to the "
                    "profile's %g GB.", mem.vram_budget_gb)
        return mem.vram_budget_gb, "profile"
    usable = round(free - CUDA_CONTEXT_GIB, 2)
    if usable < mem.vram_budget_gb:
        return usable, f"free: {free:.1f} GiB free on {name}"
    return mem.vram_budget_gb, f"profile: below the {free:.1f} GiB free on {name}"

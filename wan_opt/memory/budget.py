"""The memory a run may use, read from this machine: host RAM, and the GPU's free memory when asked for."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from wan_opt import hardware
from wan_opt.memory.plan import GIB

log = logging.getLogger(__name__)


def host_ram_gb() -> float:
    """This machine's memory, or the memory limit of the control group the process runs in (a container, a
    `systemd-run -p MemoryMax=` scope), whichever is smaller."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_memory_limit()
    return min(physical, limit) / GIB if limit else physical / GIB


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The byte limit of this process's memory control group (v2's memory.max, else v1's limit), if it has one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            file = root / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            file = root / "memory" / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v2 writes "max" for no limit, v1 a huge number
            return int(text)
    return None


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

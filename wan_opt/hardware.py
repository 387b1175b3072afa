"""What GPU this process gets, and which conf/hardware profile fits it.

`infer_profile` is pure (a name, a memory size, a capability and the profiles in; a choice and its reason
out) so every card can be table-tested; `detect` reads the device once and feeds it in. NVML is asked first
because it answers without creating a CUDA context; torch.cuda is the fallback when NVML cannot answer.

    python -m wan_opt.hardware                                          # this machine
    python -m wan_opt.hardware --name "NVIDIA L40S" --memory-gb 45      # a hypothetical card
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import warnings
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wan_opt.config import AUTO_PROFILE, CONF_DIR, GPUMatch
from wan_opt.errors import WanOptError

GIB = 2**30
# NVML reports usable GiB, a little under the GB on the box (an H100 80GB shows 79.6 GiB, an L40S 44.9).
FIT_FRACTION = 0.9


@dataclass(frozen=True)
class GPUInfo:
    index: int | None  # NVML (PCI order) index; for a MIG slice its parent's; None when torch reported it
    name: str  # NVML name; for a MIG slice the parent's
    memory_gib: float  # what this process gets: a MIG slice's own memory, not the whole card's
    capability: tuple[int, int]
    uuid: str | None = None
    mig: bool = False
    source: str = "nvml"  # nvml | torch | given
    free_gib: float | None = None  # free when it was read: total less what every process holds


@dataclass(frozen=True)
class ProfileSpec:
    """What a conf/hardware profile is written for, as its `gpu:` block says."""

    name: str  # the file's stem: what `hardware=NAME` selects
    device: str
    names: tuple[str, ...]  # normalized name fragments
    memory_gb: float
    capability: float
    gpus: int = 1  # a multi-GPU profile (parallel.gpus) is chosen for a torchrun group of that size


@dataclass(frozen=True)
class ProfileChoice:
    profile: str
    reason: str
    exact: bool  # False: no profile is written for this card; the nearest one was taken


@dataclass(frozen=True)
class HardwareChoice:
    profile: str
    reason: str
    gpu: GPUInfo | None
    exact: bool = True


def load_profiles(conf_dirs: Iterable[str | Path] | None = None) -> list[ProfileSpec]:
    """Every hardware/*.yaml under CONF_DIR, then under `conf_dirs`; on a repeated name the first wins, as in
    Hydra's search path."""
    found: dict[str, ProfileSpec] = {}
    for conf_dir in [CONF_DIR, *(conf_dirs or ())]:
        for path in sorted(Path(conf_dir).glob("hardware/*.yaml")):
            if path.stem != AUTO_PROFILE:
                found.setdefault(path.stem, _read_profile(path))
    return list(found.values())


def _read_profile(path: Path) -> ProfileSpec:
    raw = OmegaConf.load(path)
    try:  # checked against the schema so `memory_gb: 80GB` fails here, not as a wrong choice later
        gpu = OmegaConf.merge(OmegaConf.structured(GPUMatch), OmegaConf.select(raw, "gpu") or {})
    except OmegaConfBaseException as exc:
        raise WanOptError(f"The gpu block of hardware profile {path} is invalid ({exc}); fix that file.") from exc
    return ProfileSpec(name=path.stem, device=str(OmegaConf.select(raw, "device", default="cuda")),
                       names=tuple(normalize_gpu_name(n) for n in gpu.names),
                       memory_gb=float(gpu.memory_gb), capability=float(gpu.capability),
                       gpus=int(OmegaConf.select(raw, "parallel.gpus", default=1)))


def normalize_gpu_name(name: str) -> str:
    """'NVIDIA A100-PCIE-40GB' -> 'a100 pcie 40gb': the spellings NVML uses for one card compare equal."""
    return re.sub(r"[\s_-]+", " ", name.lower()).strip().removeprefix("nvidia ")


def _name_matches(fragment: str, normalized: str) -> bool:
    """Whole words only, so 'h200' is not found inside 'gh200' nor 'rtx a6000' inside 'rtx 6000 ada'."""
    return re.search(rf"(?<![a-z0-9]){re.escape(fragment)}(?![a-z0-9])", normalized) is not None


def _gpu_profiles(profiles: Sequence[ProfileSpec], gpus: int = 1) -> list[ProfileSpec]:
    """Profiles written for `gpus` cards of one kind (torchrun's world size); for a group no profile is
    written for, the single-GPU ones, whose `parallel:` defaults split the work. A profile without a gpu
    block says nothing about which card it suits: only `hardware=` picks it."""
    usable = [p for p in profiles if p.device == "cuda" and p.memory_gb > 0]
    return [p for p in usable if p.gpus == gpus] or [p for p in usable if p.gpus == 1]


def _named(profiles: Sequence[ProfileSpec], name: str) -> list[ProfileSpec]:
    normalized = normalize_gpu_name(name)
    return [p for p in profiles if any(_name_matches(f, normalized) for f in p.names)]


def capability_tuple(capability: float) -> tuple[int, int]:
    major = int(capability)
    return major, round((capability - major) * 10)


def _size(profile: ProfileSpec) -> tuple[float, float]:
    return profile.memory_gb, profile.capability


def infer_profile(name: str | None, memory_gib: float, capability: tuple[int, int],
                  profiles: Sequence[ProfileSpec], gpus: int = 1) -> ProfileChoice:
    """The profile for a card: the one written for it when it fits, else the nearest one that fits.

    A profile fits when the card has 90% of its memory_gb and at least its capability, so no card is handed
    a profile that needs more memory or newer features (fp8, say) than it has. `name=None` means no GPU.
    """
    if name is None:
        cpu = next((p.name for p in profiles if p.device == "cpu"), "cpu")
        return ProfileChoice(cpu, "no CUDA GPU visible", True)
    if not (gpu_profiles := _gpu_profiles(profiles, gpus)):
        raise WanOptError("No hardware profile is written for a GPU; add one under conf/hardware/.")
    card = f"{name} ({memory_gib:.1f} GiB, sm_{capability[0]}{capability[1]})" + (f" x {gpus}" if gpus > 1 else "")
    capable = [p for p in gpu_profiles if capability_tuple(p.capability) <= capability]
    fits = [p for p in capable if p.memory_gb * FIT_FRACTION <= memory_gib]
    named = _named(gpu_profiles, name)
    if named_fits := [p for p in named if p in fits]:
        best = max(named_fits, key=_size)
        return ProfileChoice(best.name, f"{card} matches profile {best.name}", True)
    why = (f"does not fit profile {', '.join(p.name for p in named)}" if named
           else "matches no profile's GPU names")
    if fits:
        best = max(fits, key=_size)
        return ProfileChoice(best.name, f"{card} {why}; using {best.name}, the nearest by memory and capability "
                                        f"that fits; override with hardware=NAME", False)
    smallest = min(capable or gpu_profiles, key=lambda p: (p.memory_gb, -p.capability))
    return ProfileChoice(smallest.name, f"{card} {why} and fits none; using {smallest.name}, the smallest, "
                                        f"which may not fit; override with hardware=NAME", False)


def _text(value: bytes | str) -> str:
    """Older pynvml releases return bytes, newer ones str."""
    return value.decode() if isinstance(value, bytes) else value


def _nvml_gpu(nvml, index: int) -> tuple[GPUInfo, object]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    gpu = GPUInfo(index=index, name=_text(nvml.nvmlDeviceGetName(handle)), memory_gib=memory.total / GIB,
                  capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)),
                  uuid=_text(nvml.nvmlDeviceGetUUID(handle)), source="nvml", free_gib=memory.free / GIB)
    return gpu, handle


def _mig_slices(nvml, parent: GPUInfo, handle) -> list[GPUInfo]:
    """The parent's MIG devices; the parent handle reports the whole card's memory, so each slice's comes
    from its own handle."""
    try:
        slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except nvml.NVMLError:  # not MIG-capable
        return []
    slices = []
    for slot in range(slots):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:  # an empty slot
            continue
        memory = nvml.nvmlDeviceGetMemoryInfo(mig)
        slices.append(replace(parent, memory_gib=memory.total / GIB, free_gib=memory.free / GIB,
                              uuid=_text(nvml.nvmlDeviceGetUUID(mig)), mig=True))
    return slices


def _by_uuid_prefix(entry: str, gpus: list[GPUInfo]) -> GPUInfo | None:
    """CUDA accepts any unique prefix of a UUID, with or without its 'GPU-'."""
    prefix = entry.lower() if entry.lower().startswith(("gpu-", "mig-")) else f"gpu-{entry.lower()}"
    hits = [g for g in gpus if g.uuid and g.uuid.lower().startswith(prefix)]
    return hits[0] if len(hits) == 1 else None


def _warn_if_order_differs(gpus: list[GPUInfo]) -> None:
    # NVML numbers GPUs in PCI order; CUDA fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID. Alike cards
    # make the difference moot; unlike ones make an index name a different card.
    if os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and len({(g.name, round(g.memory_gib)) for g in gpus}) > 1:
        warnings.warn("These GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID, so CUDA's device indices may "
                      "not match NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID.", RuntimeWarning, stacklevel=4)


def _nvml_visible(nvml, cuda_visible: str | None) -> list[GPUInfo]:
    pairs = [_nvml_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
    gpus = [gpu for gpu, _ in pairs]
    slices = [_mig_slices(nvml, gpu, handle) for gpu, handle in pairs]
    entries = None if cuda_visible is None else [e.strip() for e in cuda_visible.split(",")]
    if entries is None or any(e.isdecimal() for e in entries):
        _warn_if_order_differs(gpus)
    if entries is None:  # a card in MIG mode is usable only through its slices
        return [s for gpu, its in zip(gpus, slices) for s in (its or [gpu])]
    chosen = []
    for entry in entries:
        if entry.isdecimal():
            gpu = gpus[int(entry)] if int(entry) < len(gpus) else None
        elif entry.lower().startswith("mig-"):
            gpu = _by_uuid_prefix(entry, [s for its in slices for s in its])
        else:
            gpu = _by_uuid_prefix(entry, gpus) if entry else None
        if gpu is None:  # CUDA's rule: the first invalid entry ends the list ("" and "-1" hide every GPU)
            break
        chosen.append(gpu)
    return chosen


def _torch_visible() -> list[GPUInfo]:
    """torch applies CUDA_VISIBLE_DEVICES itself, and reports a MIG slice's own memory."""
    import torch

    if not torch.cuda.is_available():
        return []
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return [GPUInfo(index=None, name=p.name, memory_gib=p.total_memory / GIB, capability=(p.major, p.minor),
                    source="torch", free_gib=torch.cuda.mem_get_info(i)[0] / GIB) for i, p in enumerate(props)]


def visible_gpus() -> list[GPUInfo]:
    """The GPUs CUDA shows this process, in CUDA's order: NVML filtered by CUDA_VISIBLE_DEVICES (NVML itself
    ignores it), or torch.cuda when NVML is missing or fails (no driver, a container without the library)."""
    try:
        import pynvml
    except ImportError:
        return _torch_visible()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return _torch_visible()
    try:
        return _nvml_visible(pynvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except pynvml.NVMLError:
        return _torch_visible()
    finally:
        with suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def process_gpu(gpus: Sequence[GPUInfo] | None = None) -> GPUInfo | None:
    """The GPU this process computes on, among `gpus` (default: visible_gpus()): cuda:LOCAL_RANK, i.e. cuda:0,
    the first visible, outside torchrun."""
    gpus = visible_gpus() if gpus is None else gpus
    rank = int(os.environ.get("LOCAL_RANK", 0))
    return gpus[rank] if rank < len(gpus) else None


def infer_for(gpu: GPUInfo | None, profiles: Sequence[ProfileSpec], gpus: int = 1) -> ProfileChoice:
    """`infer_profile` for a GPUInfo; a MIG slice says so in the reason."""
    if gpu is None:
        return infer_profile(None, 0.0, (0, 0), profiles)
    return infer_profile(f"{gpu.name} MIG" if gpu.mig else gpu.name, gpu.memory_gib, gpu.capability, profiles, gpus)


@functools.cache
def detect() -> HardwareChoice:
    """The profile for this process's GPU, read once per process (tests call detect.cache_clear())."""
    gpu = process_gpu()
    choice = infer_for(gpu, load_profiles(), world_size())
    return HardwareChoice(choice.profile, choice.reason, gpu, choice.exact)


# -- what this process may ask of its device: every capability question in wan-opt is asked here -------------

Capability = tuple[int, int]


def device_capability(device=None) -> Capability | None:
    """The CUDA compute capability of `device` (this process's GPU when None); None where there is no GPU."""
    import torch  # here: the command line reads profiles and checks input before paying for torch

    if device is not None and getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def has_fp8(capability: Capability | None) -> bool:
    """fp8 tensor cores arrived with Ada (8.9) and Hopper (9.0); Ampere (8.0, 8.6) and CPUs have none."""
    return capability is not None and tuple(capability) >= (8, 9)


def is_hopper(capability: Capability | None) -> bool:
    """Hopper (sm_90: H100, H200), where wgmma and the tensor memory accelerator run."""
    return capability is not None and tuple(capability) == (9, 0)


def describe(capability: Capability | None) -> str:
    """How a sentence names the device: 'there is no GPU' or 'this GPU is 8.6'."""
    return "there is no GPU" if capability is None else f"this GPU is {capability[0]}.{capability[1]}"


def world_size() -> int:
    """Processes in this torchrun group (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    """Rank 0 writes the video, the sidecar and the console output; the others compute."""
    return rank() == 0


def _positive_gb(text: str) -> float:
    if (value := float(text)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, not {text}")
    return value


def _default_capability(name: str, profiles: Sequence[ProfileSpec]) -> tuple[int, int]:
    """A named card has its profiles' capability; an unknown one the oldest any profile targets, so it is
    never handed features it may lack."""
    gpu_profiles = _gpu_profiles(profiles)
    if named := _named(gpu_profiles, name):
        return capability_tuple(max(p.capability for p in named))
    return capability_tuple(min((p.capability for p in gpu_profiles), default=0.0))


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m wan_opt.hardware", description=(
        "Show the visible GPUs and the hardware profile each gets; with --name and --memory-gb, the profile a "
        "hypothetical GPU would get. The last line is always `profile: NAME`."))
    parser.add_argument("--name", help="GPU name as NVML or nvidia-smi prints it, e.g. 'NVIDIA A100-SXM4-40GB'")
    parser.add_argument("--memory-gb", type=_positive_gb,
                        help="its memory as nvidia-smi reports it, or as sold (profiles allow 10%% less)")
    parser.add_argument("--capability", type=float,
                        help="compute capability, e.g. 8.9; default: that of the profiles whose GPU names match "
                             "--name, else the oldest any profile targets (so no newer feature is assumed)")
    parser.add_argument("--conf-dir", action="append", default=[],
                        help="an extra config folder with hardware/*.yaml profiles (repeatable)")
    args = parser.parse_args(argv)
    if (args.name is None) != (args.memory_gb is None):
        parser.error("--name and --memory-gb go together: give both, or neither to read this machine's GPUs")
    profiles = load_profiles(args.conf_dir)
    if args.name is not None:
        capability = (capability_tuple(args.capability) if args.capability is not None
                      else _default_capability(args.name, profiles))
        gpu = GPUInfo(None, args.name, args.memory_gb, capability, source="given")
    else:
        gpus = visible_gpus()
        gpu = process_gpu(gpus)
        table = Table(title="Visible GPUs")
        for column in ("index", "name", "memory", "capability", "uuid", "profile"):
            table.add_column(column, overflow="fold")  # folded, not cut: names and UUIDs get copied from here
        for each in gpus:
            choice = infer_for(each, profiles)
            table.add_row("-" if each.index is None else str(each.index), each.name + (" MIG" if each.mig else ""),
                          f"{each.memory_gib:.1f} GiB", f"{each.capability[0]}.{each.capability[1]}",
                          each.uuid or "-", choice.profile + ("" if choice.exact else " (nearest)"))
        Console().print(table if gpus else "Visible GPUs: none")
    choice = infer_for(gpu, profiles)
    print(("warning: " if not choice.exact else "why: ") + choice.reason)
    print(f"profile: {choice.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The memory policy: where each module lives, in what dtype, and what moves when.

A profile's `memory:` block is instantiated into a `MemoryPolicy`. Loading asks it where each component
should land (`load_device`), the pipeline calls it around each stage (`encoding`, `activate_expert`), and
it applies the libraries' mechanisms (layerwise fp8 casting, group offloading, VAE tiling).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

log = logging.getLogger(__name__)

EXPERTS = ("transformer", "transformer_2")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclass
class MemoryPolicy:
    vram_budget_gb: float = 0.0
    experts: str = "resident"
    offload_granularity: str = "block"
    offload_blocks_per_group: int = 1
    offload_use_stream: bool = True
    text_encoder: str = "gpu"
    weight_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    vae_dtype: str = "float32"
    vae_tiling: bool = False

    @property
    def stores_fp8(self) -> bool:
        return self.weight_dtype.startswith("float8")

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype experts are loaded in; fp8 storage is applied after loading, from the compute dtype."""
        return torch_dtype(self.compute_dtype if self.stores_fp8 else self.weight_dtype)

    def load_device(self, component: str, device: torch.device) -> torch.device:
        """Where `component` should be materialised when it is loaded."""
        cpu = torch.device("cpu")
        if device.type == "cpu":
            return cpu
        if component in EXPERTS:
            if self.experts == "offload" or (self.experts == "swap" and component == "transformer_2"):
                return cpu
            return device
        if component == "text_encoder":
            return device if self.text_encoder == "gpu" else cpu
        return device

    def prepare(self, pipe, device: torch.device) -> None:
        """Apply the storage and offloading mechanisms to freshly loaded modules."""
        for name in EXPERTS:
            expert = getattr(pipe, name, None)
            if expert is None:
                continue
            if self.stores_fp8:
                # Weights stored in fp8 are upcast per layer for a bf16 matmul: half the bytes, same kernels.
                expert.enable_layerwise_casting(storage_dtype=torch_dtype(self.weight_dtype),
                                                compute_dtype=torch_dtype(self.compute_dtype))
            if device.type == "cuda" and self.experts == "offload":
                expert.enable_group_offload(
                    onload_device=device, offload_device=torch.device("cpu"), offload_type=f"{self.offload_granularity}_level",
                    num_blocks_per_group=self.offload_blocks_per_group if self.offload_granularity == "block" else None,
                    use_stream=self.offload_use_stream,
                )
        if device.type == "cuda" and self.experts == "swap":
            pipe.expert_swapper = ExpertSwapper([getattr(pipe, n) for n in EXPERTS if getattr(pipe, n) is not None],
                                                device)
        if self.vae_tiling:
            pipe.vae.enable_tiling()

    @contextlib.contextmanager
    def encoding(self, text_encoder: torch.nn.Module, device: torch.device) -> Iterator[torch.device]:
        """Run the text encoder where the policy says; `gpu_release` brings it in for the call only."""
        if device.type != "cuda" or self.text_encoder != "gpu_release":
            yield next(text_encoder.parameters()).device
            return
        text_encoder.to(device)
        try:
            yield device
        finally:
            text_encoder.to("cpu")
            torch.cuda.empty_cache()

    def activate_expert(self, pipe, expert: torch.nn.Module) -> None:
        """Make `expert` ready to run; with swapping, the other one goes back to pinned host memory."""
        swapper = getattr(pipe, "expert_swapper", None)
        if swapper is not None:
            swapper.activate(expert)


class ExpertSwapper:
    """Keeps each expert's weights in pinned host memory and at most one expert on the GPU.

    Offloading is free (the GPU copy is dropped and the parameters point back at the pinned copy, since
    inference never changes them); onloading is one asynchronous host-to-device copy per tensor.
    """

    def __init__(self, experts: list[torch.nn.Module], device: torch.device):
        self.device = device
        self.host = {}
        for expert in experts:
            tensors = dict(expert.named_parameters())
            tensors.update(dict(expert.named_buffers()))
            self.host[id(expert)] = {
                name: t.data.to("cpu").pin_memory() if not t.is_pinned() else t.data for name, t in tensors.items()
            }
        self.active: torch.nn.Module | None = None
        for expert in experts:
            if next(expert.parameters()).device.type == "cuda":
                self.active = expert

    def _point(self, expert: torch.nn.Module, device: torch.device) -> None:
        host = self.host[id(expert)]
        for name, tensor in list(expert.named_parameters()) + list(expert.named_buffers()):
            tensor.data = host[name] if device.type == "cpu" else host[name].to(device, non_blocking=True)

    def activate(self, expert: torch.nn.Module) -> None:
        if self.active is expert:
            return
        if self.active is not None:
            self._point(self.active, torch.device("cpu"))
            torch.cuda.empty_cache()
        self._point(expert, self.device)
        self.active = expert

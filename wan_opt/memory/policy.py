"""The memory policy: where each module lives, in what dtype, and what moves when.

A profile's `memory:` block is instantiated into a `MemoryPolicy`. Loading asks it where each component
should land (`load_device`), the pipeline calls it around each stage (`encoding`, `activate_expert`), and
it applies the mechanisms (fp8 weight storage, group offloading, expert swapping, VAE tiling).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from wan_opt.config import MemoryConfig
from wan_opt.optim.fp8 import quantize_linears

log = logging.getLogger(__name__)

EXPERTS = ("transformer", "transformer_2")
# PyTorch's pinned-memory allocator rounds every request up to a power of two: pinned one by one, a block's
# 142 MB FFN weights would take 256 MiB each and its 52 MB projections 64 MiB, so an A14B expert would hold
# 1.53x its 27.4 GB of host RAM. Chunks of 1 GiB, each packed with many tensors, are rounded by nothing.
PINNED_CHUNK = 1 << 30
PINNED_ALIGN = 512  # bytes; every dtype's view starts aligned


def move_to_pinned(tensors: list[torch.Tensor], allocate=None) -> list[torch.Tensor]:
    """Move each tensor's data into pinned host memory, packed into chunks whose sizes are powers of two.

    Largest first, each into the first chunk with room (one over 1 GiB gets a chunk of its own power of two,
    which smaller ones then fill); at most the last chunk's tail is unused. Each tensor's old data is let go as
    soon as it is copied, so host memory never holds a module twice. Tensors already pinned stay where they
    are. `allocate(nbytes)` returns a uint8 tensor (pinned by default). Returns the new data, in order.
    """
    allocate = allocate or (lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
    chunks: list[list] = []  # [uint8 tensor, bytes used]
    for tensor in sorted(tensors, key=lambda t: -t.nbytes):
        if tensor.data.is_pinned():
            continue
        nbytes = -(-tensor.nbytes // PINNED_ALIGN) * PINNED_ALIGN
        chunk = next((c for c in chunks if c[0].numel() - c[1] >= nbytes), None)
        if chunk is None:
            chunk = [allocate(max(PINNED_CHUNK, 1 << max(nbytes - 1, 1).bit_length())), 0]
            chunks.append(chunk)
        view = chunk[0][chunk[1]:chunk[1] + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.data)
        tensor.data = view
        chunk[1] += nbytes
    return [tensor.data for tensor in tensors]


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class MemoryPolicy(MemoryConfig):
    """A profile's `memory:` block (wan_opt.config.MemoryConfig, the knobs' one definition) put to work."""

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
            # Swapped experts wait in host memory: the text encoder needs the GPU first.
            return device if self.experts == "resident" else cpu
        if component == "text_encoder":
            return device if self.text_encoder == "gpu" else cpu
        return device

    def waits_pinned(self, component: str) -> bool:
        """Whether `component` waits in pinned host memory on a GPU machine, as loaded (a swapped expert, a
        released text encoder). fp8-stored experts are not: quantizing replaces their weights after loading."""
        if component in EXPERTS:
            return self.experts == "swap" and not self.stores_fp8
        return component == "text_encoder" and self.text_encoder == "gpu_release"

    def prepare(self, pipe, device: torch.device) -> None:
        """Apply the storage and offloading mechanisms to freshly loaded modules."""
        for expert in pipe.experts():
            if self.stores_fp8:
                # The blocks' linear layers (98% of the weights) in e4m3 with a scale per output channel; the
                # embeddings and norms stay in the compute dtype. Quantized on the GPU when there is one.
                for block in expert.blocks:
                    quantize_linears(block, work_device=device)
            if device.type == "cuda" and self.experts == "offload":
                if self.offload_use_stream:
                    # diffusers pins each tensor for its stream copies, each rounded up to a power of two; tensors
                    # already pinned (packed here) it keeps as they are.
                    move_to_pinned([*expert.parameters(), *expert.buffers()])
                expert.enable_group_offload(
                    onload_device=device, offload_device=torch.device("cpu"),
                    offload_type=f"{self.offload_granularity}_level",
                    num_blocks_per_group=self.offload_blocks_per_group if self.offload_granularity == "block" else None,
                    use_stream=self.offload_use_stream,
                )
        if device.type == "cuda":
            pipe.expert_swapper = (PinnedSwapper(pipe.experts(), device, overlap=self.swap_overlap)
                                   if self.experts == "swap" else None)
            pipe.text_encoder_swapper = (PinnedSwapper([pipe.text_encoder], device)
                                         if self.text_encoder == "gpu_release" else None)
        if self.vae_tiling:
            pipe.vae.enable_tiling()

    @contextlib.contextmanager
    def encoding(self, pipe) -> Iterator[torch.device]:
        """Run the text encoder where the policy says; `gpu_release` brings it in for the call only."""
        swapper = getattr(pipe, "text_encoder_swapper", None)
        if swapper is None:
            yield next(pipe.text_encoder.parameters()).device
            return
        if pipe.expert_swapper is not None:
            pipe.expert_swapper.release()  # the encoder and an expert need not share the GPU
        swapper.activate(pipe.text_encoder)
        try:
            yield swapper.device
        finally:
            swapper.release()

    def activate_expert(self, pipe, expert: torch.nn.Module) -> None:
        """Make `expert` ready to run; with swapping, the other one goes back to pinned host memory."""
        if pipe.expert_swapper is not None:
            pipe.expert_swapper.activate(expert)


class PinnedSwapper:
    """Keeps each module's weights in pinned host memory and at most one of the modules on the GPU.

    Releasing is free (the GPU copy is dropped and the parameters point back at the pinned copy, since
    inference never changes them); activating is one asynchronous host-to-device copy per tensor, at
    pinned-memory speed rather than the far slower pageable copy of `module.to("cuda")`.

    With `overlap`, activation copies on a side stream, part by part (the weights outside the blocks, then
    each block), and each part's first forward waits only for its own copy: block 0 computes while the
    later blocks are still arriving, so the switch costs about one block's copy instead of the expert's.
    """

    def __init__(self, modules: list[torch.nn.Module], device: torch.device, overlap: bool = False):
        self.device = device
        self.host = {}
        for module in modules:
            named = [*module.named_parameters(), *module.named_buffers()]
            pinned = move_to_pinned([tensor for _, tensor in named])
            self.host[id(module)] = {name: data for (name, _), data in zip(named, pinned)}
        self.active: torch.nn.Module | None = None
        self.copy_stream = torch.cuda.Stream(device) if overlap else None
        self.copied: dict[int, torch.cuda.Event] = {}  # id(part) -> its copy's completion, until first waited on
        if overlap:
            for module in modules:
                for part, _ in copy_parts(module):
                    part.register_forward_pre_hook(self._wait_for_copy)

    def _point(self, expert: torch.nn.Module, device: torch.device) -> None:
        host = self.host[id(expert)]
        if device.type == "cuda" and self.copy_stream is not None:
            self._copy_by_parts(expert, host)
            return
        for name, tensor in list(expert.named_parameters()) + list(expert.named_buffers()):
            tensor.data = host[name] if device.type == "cpu" else host[name].to(device, non_blocking=True)

    def _copy_by_parts(self, module: torch.nn.Module, host: dict[str, torch.Tensor]) -> None:
        # Targets are allocated on the compute stream (they reuse what the released module freed there); the
        # copies wait for the work already queued, then run beside the compute that follows.
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        for part, tensors in copy_parts(module):
            targets = [(tensor, host[name], torch.empty_like(host[name], device=self.device)) for name, tensor in tensors]
            with torch.cuda.stream(self.copy_stream):
                for _, source, target in targets:
                    target.copy_(source, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            for tensor, _, target in targets:
                target.record_stream(self.copy_stream)
                tensor.data = target
            self.copied[id(part)] = done

    @torch.compiler.disable  # a graph break at the block's start: stream waits are not traced
    def _wait_for_copy(self, part: torch.nn.Module, args) -> None:
        done = self.copied.pop(id(part), None)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def activate(self, module: torch.nn.Module) -> None:
        if self.active is module:
            return
        self.release()
        self._point(module, self.device)
        self.active = module

    def release(self) -> None:
        if self.active is not None:
            self._point(self.active, torch.device("cpu"))
            self.active = None
            torch.cuda.empty_cache()


def copy_parts(module: torch.nn.Module) -> list[tuple[torch.nn.Module, list[tuple[str, torch.Tensor]]]]:
    """A module's tensors in the order its forward first needs them: everything outside `module.blocks`
    (embeddings, and the output head, which runs last but is small), then each block's."""
    blocks = list(getattr(module, "blocks", []))
    owner = {id(t): i for i, block in enumerate(blocks) for t in [*block.parameters(), *block.buffers()]}
    parts: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(len(blocks) + 1)]
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        parts[owner.get(id(tensor), -1) + 1].append((name, tensor))
    return list(zip([module, *blocks], parts))

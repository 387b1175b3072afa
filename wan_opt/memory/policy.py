"""The memory policy: where each module lives, in what dtype, and what moves when.

A profile's `memory:` block is instantiated into a `MemoryPolicy`. Loading asks it where each component
should land (`load_device`), the pipeline calls it around each stage (`encoding`, `activate_expert`,
`vae_on_gpu`), and
it applies the mechanisms (fp8 weight storage, group offloading, expert swapping, VAE tiling, and with
idle_weights=checkpoint the experts and text encoder read from their files when needed: CheckpointSwapper).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

from wan_opt.config import MemoryConfig
from wan_opt.hardware import world_size
from wan_opt.optim.fp8 import quantize_linears

log = logging.getLogger(__name__)

EXPERTS = ("transformer", "transformer_2")
# PyTorch's pinned-memory allocator rounds every request up to a power of two: pinned one by one, a block's
# 142 MB FFN weights would take 256 MiB each and its 52 MB projections 64 MiB, so an A14B expert would hold
# about 1.5x its size in host RAM. Chunks of 1 GiB, each packed with many tensors, are rounded by nothing.
PINNED_CHUNK = 1 << 30
PINNED_ALIGN = 512  # bytes; every dtype's view starts aligned


def move_to_pinned(tensors: list[torch.Tensor], allocate=None) -> list[torch.Tensor]:
    """Move each tensor's data into pinned host memory, packed into chunks whose sizes are powers of two.

    Largest first, each into the first chunk with room (one over 1 GiB gets a chunk of its own power of two,
    which smaller ones then fill); at most the last chunk's tail is unused. Each tensor's old data is let go as
    soon as it is copied, so host memory never holds a module twice. Tensors already pinned stay where they
    are. `allocate(nbytes)` returns a uint8 tensor (pinned by default). Returns the new data, in order.
    """
    chunks = PinnedChunks(allocate)
    for tensor in sorted(tensors, key=lambda t: -t.nbytes):
        if tensor.data.is_pinned():
            continue
        view = chunks.view(tensor.shape, tensor.dtype)
        view.copy_(tensor.data)
        tensor.data = view
    return [tensor.data for tensor in tensors]


class PinnedChunks:
    """Pinned host memory handed out as views, packed into chunks whose sizes are powers of two (move_to_pinned)."""

    def __init__(self, allocate=None):
        self.allocate = allocate or (lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
        self.chunks: list[list] = []  # [uint8 tensor, bytes used]

    def view(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` in the first chunk with room (a new one if none)."""
        size = torch.Size(shape).numel() * dtype.itemsize
        nbytes = -(-size // PINNED_ALIGN) * PINNED_ALIGN
        chunk = next((c for c in self.chunks if c[0].numel() - c[1] >= nbytes), None)
        if chunk is None:
            chunk = [self.allocate(max(PINNED_CHUNK, 1 << max(nbytes - 1, 1).bit_length())), 0]
            self.chunks.append(chunk)
        view = chunk[0][chunk[1]:chunk[1] + size].view(dtype).view(shape)
        chunk[1] += nbytes
        return view


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
        if component == "vae":
            return cpu if self.vae_release else device
        return device

    def waits_pinned(self, component: str) -> bool:
        """Whether `component` waits in pinned host memory on a GPU machine, as loaded (a swapped expert, a
        released text encoder). fp8-stored experts are not: quantizing replaces their weights after loading."""
        if component in EXPERTS:
            return self.experts == "swap" and not self.stores_fp8
        if component == "vae":
            return self.vae_release
        return component == "text_encoder" and self.text_encoder == "gpu_release"

    def waits_in_checkpoint(self, component: str) -> bool:
        """Whether `component` is read from its files each time it is needed (idle_weights=checkpoint) rather
        than once, when the pipeline loads: swapped or offloaded experts, a released or CPU text encoder."""
        if self.idle_weights != "checkpoint":
            return False
        if component in EXPERTS:
            return self.experts != "resident"
        return component == "text_encoder" and self.text_encoder != "gpu"

    def configure_allocator(self, device: torch.device) -> None:
        """expandable_segments: PyTorch's CUDA allocator maps more memory into a growing segment instead of
        keeping gaps between segments that later tensors do not fit (a 24 GiB run once stopped with 16.6 GiB in
        use and 5.9 GiB reserved but free). Set before the weights load, in one process (not under torchrun);
        a PYTORCH_CUDA_ALLOC_CONF the user set stands."""
        if (device.type == "cuda" and self.expandable_segments and world_size() == 1
                and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ):
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")

    def shape_for_storage(self, expert: torch.nn.Module, device: torch.device) -> None:
        """fp8 storage: the blocks' linear layers (98% of the weights) in e4m3 with a scale per output channel;
        the embeddings and norms stay in the compute dtype. Quantized on the GPU when there is one; an expert
        built without weights (read later from its files) gets the layers empty. Idempotent."""
        if self.stores_fp8:
            for block in expert.blocks:
                quantize_linears(block, work_device=device)

    def prepare(self, pipe, device: torch.device) -> None:
        """Apply the storage and offloading mechanisms to freshly loaded modules."""
        source = getattr(pipe, "weight_source", None)
        reads = self.idle_weights == "checkpoint" and source is not None  # weights read from the files when needed
        for expert in pipe.experts():
            self.shape_for_storage(expert, device)
        if reads and self.waits_in_checkpoint("transformer"):
            # Offloaded experts stream from one pinned arena that each expert's weights are read into in turn.
            arena = device.type == "cuda" and self.experts == "offload" and self.offload_use_stream
            roles = dict(zip(EXPERTS, pipe.experts()))
            pipe.expert_swapper = CheckpointSwapper(source, roles, torch.device("cpu") if arena else device, arena)
        if reads and self.waits_in_checkpoint("text_encoder"):
            on = device if self.text_encoder == "gpu_release" else torch.device("cpu")
            pipe.text_encoder_swapper = CheckpointSwapper(source, {"text_encoder": pipe.text_encoder}, on)
        for expert in pipe.experts():
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
        if device.type == "cuda" and not reads:
            pipe.expert_swapper = (PinnedSwapper(pipe.experts(), device, overlap=self.swap_overlap)
                                   if self.experts == "swap" else None)
            pipe.text_encoder_swapper = (PinnedSwapper([pipe.text_encoder], device)
                                         if self.text_encoder == "gpu_release" else None)
        if device.type == "cuda" and self.vae_release:
            pipe.vae_swapper = PinnedSwapper([pipe.vae], device)
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
        with _active(swapper, pipe.text_encoder):
            yield swapper.device

    def vae_on_gpu(self, pipe) -> contextlib.AbstractContextManager:
        """The VAE where it runs for one encode or decode; `vae_release` brings it in for the call only."""
        return _active(getattr(pipe, "vae_swapper", None), pipe.vae)

    def activate_expert(self, pipe, expert: torch.nn.Module) -> None:
        """Make `expert` ready to run; with swapping, the other one goes back to pinned host memory."""
        if pipe.expert_swapper is not None:
            pipe.expert_swapper.activate(expert)


@contextlib.contextmanager
def _active(swapper, module: torch.nn.Module) -> Iterator[None]:
    """`module` brought in by its swapper for the block and released after, however the block ends."""
    if swapper is None:
        yield
        return
    swapper.activate(module)
    try:
        yield
    finally:
        swapper.release()


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


class CheckpointSwapper:
    """Holds the weights of at most one of its modules; the others wait in the checkpoint's files
    (idle_weights=checkpoint, docs/memory-floor.md).

    Activating reads the module from its memory-mapped files onto `device` (`source`: a
    wan_opt.loading.mapped.CheckpointWeights); releasing drops its weights: each parameter keeps its name, dtype
    and every hook that holds it, on a tensor of no elements. With `arena` (offloaded experts) the modules share
    one set of pinned host tensors, which diffusers' group offloading streams from: activating writes the next
    expert over the last one, and releasing keeps it, so the expert read last is not read again.
    """

    def __init__(self, source, modules: dict[str, torch.nn.Module], device: torch.device, arena: bool = False,
                 allocate=None):
        self.source, self.device = source, device
        self.roles = {id(module): role for role, module in modules.items()}
        self.specs = {id(module): {name: (tuple(p.shape), p.dtype) for name, p in module.named_parameters()}
                      for module in modules.values()}
        self.active: torch.nn.Module | None = None
        self.keeps = arena
        if arena:
            chunks = PinnedChunks(allocate)
            first = next(iter(self.specs.values()))
            views = {name: chunks.view(shape, dtype) for name, (shape, dtype) in first.items()}
            for module in modules.values():
                if self.specs[id(module)] != first:
                    raise ValueError("experts that share a pinned arena must have the same parameters")
                _rebind(module, lambda name, param: views[name])
        else:
            for module in modules.values():
                _rebind(module, lambda name, param: torch.empty(0, dtype=param.dtype))

    def activate(self, module: torch.nn.Module) -> None:
        if self.active is module:
            return
        self.release()
        work = self.source.work_device
        if self.keeps and work.type == "cuda":
            torch.cuda.synchronize(work)  # no copy out of the arena may still be reading the last expert
        self.source.read(self.roles[id(module)], module, self.device, self.specs[id(module)])
        self.active = module

    def release(self) -> None:
        if self.keeps or self.active is None:
            return
        _rebind(self.active, lambda name, param: torch.empty(0, dtype=param.dtype))
        self.active = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _rebind(module: torch.nn.Module, make) -> None:
    """Point every parameter of `module` at `make(name, parameter)`: in place where it has storage (the same
    Parameter, so hooks and tied weights keep it), as a new Parameter in each place it is used where it has none
    (a module built on the meta device)."""
    new: dict[int, torch.nn.Parameter] = {}
    for name, param in module.named_parameters():
        if param.is_meta:
            new[id(param)] = torch.nn.Parameter(make(name, param), requires_grad=False)
        else:
            param.data = make(name, param)
    for owner in module.modules():
        for attr, param in list(owner._parameters.items()):
            if param is not None and id(param) in new:
                owner._parameters[attr] = new[id(param)]

"""Several GPUs under torchrun: sequence-parallel attention, CFG-parallel branches, FSDP2-sharded weights.

Every rank runs the same pipeline on the same seed. The GPUs form a mesh (cfg, ring, ulysses):
- `cfg`: with guidance, the two branches (conditional, unconditional) run on two halves of the GPUs at once,
  and the halves exchange their predictions each step;
- `ring` / `ulysses`: within a half, each forward's tokens are split across GPUs by diffusers' context
  parallelism for Wan (its `_cp_plan`); Ulysses trades an all-to-all per attention for whole heads per GPU,
  so its degree must divide the model's heads; ring attention passes K/V around instead;
- FSDP2 (`shard: true`): each GPU holds 1/N of every expert block and of the text encoder, gathered block
  by block when it runs, for experts that one GPU cannot hold.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from wan_opt.errors import WanOptError
from wan_opt.hardware import is_main_process, rank, world_size  # noqa: F401  (this module's callers use them)
from wan_opt.memory.plan import Layout, plan_layout  # noqa: F401


def init(device_type: str) -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) and return this rank's device."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                                else None, timeout=datetime.timedelta(minutes=30))  # a cold compile takes minutes
    return device


def build_mesh(layout: Layout, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (layout.cfg, layout.ring, layout.ulysses),
                            mesh_dim_names=("cfg", "ring", "ulysses"))


@contextlib.contextmanager
def _cpu_accelerator_count():
    # diffusers places its context-parallel config on `rank % torch.accelerator.device_count()`, which
    # divides by zero in a CPU-only process (gloo); one "device" is the truth there.
    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def apply(pipe, layout: Layout, mesh) -> None:
    """Shard the weights and split the attention of `pipe`'s modules as `layout` says."""
    from diffusers import ContextParallelConfig

    for expert in pipe.experts():
        if layout.shard:
            _fully_shard(expert, expert.blocks, mesh)
        if layout.ring > 1:  # ring attention merges partial results by their log-sum-exp, which cuDNN returns
            expert.set_attention_backend("_native_cudnn")
        if layout.sequence > 1:
            config = ContextParallelConfig(ring_degree=layout.ring, ulysses_degree=layout.ulysses, mesh=mesh)
            with _cpu_accelerator_count():
                expert.enable_parallelism(config=config)
            _run_split_points_uncompiled(expert)
    if layout.shard and pipe.memory.text_encoder == "gpu":  # a released or CPU encoder is not the GPUs' to share
        _fully_shard(pipe.text_encoder, pipe.text_encoder.encoder.block, mesh)
    pipe.parallel = ParallelState(layout, mesh)


def _run_split_points_uncompiled(expert: torch.nn.Module) -> None:
    """diffusers splits the tokens in a forward hook on the first block (and gathers them after the last
    layer); the hook's Python inspects the block's signature, which dynamo cannot trace, so a compiled block
    carrying one fails. That block runs uncompiled: 1 of 40, the other 39 stay compiled. (A wholly compiled
    expert would lose all of it: wan_opt.checks refuses compile=full under a sequence split.)"""
    from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook

    for module in expert.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or getattr(module, "_compiled_call_impl", None) is None:
            continue
        if any(isinstance(hook, (ContextParallelSplitHook, ContextParallelGatherHook))
               for hook in registry.hooks.values()):
            module._compiled_call_impl = None  # what nn.Module.compile set; the hooked forward runs eagerly


def _fully_shard(module: torch.nn.Module, blocks, mesh) -> None:
    """FSDP2 over every GPU of the mesh: one all-gather per block when it runs, freed after."""
    from torch.distributed.fsdp import fully_shard

    flat = mesh._flatten("fsdp") if mesh.ndim > 1 else mesh
    for block in blocks:
        fully_shard(block, mesh=flat, reshard_after_forward=True)
    fully_shard(module, mesh=flat, reshard_after_forward=True)


@dataclass
class ParallelState:
    layout: Layout
    mesh: object

    @property
    def cfg_rank(self) -> int:
        return self.mesh["cfg"].get_local_rank() if self.layout.cfg > 1 else 0

    def gather_branches(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each half computed one branch; all-gather them across the cfg dimension -> (cond, uncond)."""
        import torch.distributed as dist

        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine.contiguous(), group=self.mesh["cfg"].get_group())
        return both[0], both[1]

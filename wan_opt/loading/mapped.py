"""Checkpoint files read through memory maps, tensor by tensor, into the modules that run them.

A safetensors file is mapped, not read: each of its tensors is a view of the mapping, paged in from the file
(or the page cache) when it is touched; the Wan team's T5 archive is mapped by torch.load(mmap=True). Reading a
module gives each of its parameters a value from those views, converted where it must be: cast to the
parameter's dtype, a LoRA's delta added, an fp8 layer's weight quantized (with its per-channel scale), on the
run's GPU when there is one. The value is written into the parameter's own storage where it has storage of that
shape on the target device (an offloaded expert's pinned arena), else it gets new storage there; on the CPU a
tensor that needs no conversion stays the mapping itself, and costs no copy. Once a view has been copied its
pages are dropped from the process, so reading a 57 GB expert never holds 57 GB of file pages.

This is how `hardware.memory.idle_weights=checkpoint` works (docs/memory-floor.md): the experts and the text
encoder are built without weights, and wan_opt.memory.policy reads each when it is needed and drops it after.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import sys
import types
from pathlib import Path

import torch

from wan_opt.errors import WanOptError
from wan_opt.loading import original_names as original
from wan_opt.loading.layouts import DIFFUSERS_DITS, T5_FILE, Checkpoint, safetensors_entries, weight_files
from wan_opt.loading.original import dtype_for
from wan_opt.optim.fp8 import Fp8Linear, quantize_rows

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PAGE = mmap.PAGESIZE
MADV_WILLNEED, MADV_DONTNEED = 3, 4  # Linux's values
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]  # parameter name -> (shape, dtype)


# -- mapping the files ---------------------------------------------------------------------------------------


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of the file's mapping (copy-on-write: the file never
    changes), its header checked against the file first."""
    start, entries = safetensors_entries(path)
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, (dtype_name, shape, (begin, end)) in entries.items():
        dtype = SAFETENSORS_DTYPES[dtype_name]
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=start + begin)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def advise(tensor: torch.Tensor, advice: int) -> None:
    """madvise the pages under a mapped tensor: WILLNEED starts reading them ahead, DONTNEED drops them from the
    process (the file and the page cache keep them). Only for views of a file mapping."""
    if _LIBC is None or tensor.nbytes == 0:
        return
    start = tensor.data_ptr() // PAGE * PAGE
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(tensor.data_ptr() + tensor.nbytes - start), advice)


def role_files(ckpt: Checkpoint, role: str) -> list[Path]:
    """The files `role` (transformer, transformer_2, text_encoder) is read from."""
    if role == "text_encoder":
        if ckpt.layout == "diffusers":
            return weight_files(ckpt.root / "text_encoder", "model")
        return [ckpt.root / T5_FILE]
    folder = ckpt.dit_dirs()[DIFFUSERS_DITS[ckpt.family].index(role)]
    return weight_files(folder, "diffusion_pytorch_model")


def role_tensors(ckpt: Checkpoint, role: str) -> dict[str, torch.Tensor]:
    """`role`'s tensors under the names its diffusers/transformers class gives them, each a view of its file."""
    tensors: dict[str, torch.Tensor] = {}
    if role == "text_encoder" and ckpt.layout == "original":
        state = torch.load(ckpt.root / T5_FILE, map_location="cpu", mmap=True, weights_only=True)
        for key, tensor in state.items():
            tensors.update(dict.fromkeys(original.convert_t5_keys(key), tensor))
        return tensors
    for file in role_files(ckpt, role):
        for key, tensor in map_safetensors(file).items():
            name = key if ckpt.layout == "diffusers" or role == "text_encoder" else original.convert_dit_key(key)
            tensors[name] = tensor
    return tensors


# -- modules without weights ---------------------------------------------------------------------------------


def skeleton(ckpt: Checkpoint, role: str, dtype: torch.dtype) -> torch.nn.Module:
    """`role`'s module as its checkpoint configures it, built without weights: meta parameters in `dtype` (the
    class's float32 islands kept, as the loaders keep them), computed buffers, eval mode."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if role != "text_encoder":
        folder = ckpt.dit_dirs()[DIFFUSERS_DITS[ckpt.family].index(role)]
        config = json.loads((folder / "config.json").read_text())
        with init_empty_weights(include_buffers=False):  # the rotary tables are buffers computed at init
            module = (WanTransformer3DModel.from_config(config) if ckpt.layout == "diffusers"
                      else WanTransformer3DModel(**original.dit_config_from_original(config)))
    else:
        if ckpt.layout == "diffusers":
            config = UMT5Config.from_pretrained(ckpt.root / "text_encoder")
        else:
            state = torch.load(ckpt.root / T5_FILE, map_location="cpu", mmap=True, weights_only=True)
            config = original.t5_config_from_state_dict(state)
        with torch.device("meta"):  # no buffers; its token embedding stays tied to the encoder's input
            module = UMT5EncoderModel(config)
    for name, param in module.named_parameters():
        param.data = torch.empty_like(param.data, dtype=dtype_for(module, name, dtype))
    return module.eval().requires_grad_(False)


def specs_of(module: torch.nn.Module) -> Specs:
    """Each parameter's shape and dtype, as the module has them now (tied parameters once)."""
    return {name: (tuple(p.shape), p.dtype) for name, p in module.named_parameters()}


# -- reading -------------------------------------------------------------------------------------------------


def read_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                work_device: torch.device, dtype: torch.dtype, specs: Specs | None = None,
                deltas: dict | None = None, strength: float = 1.0, source: str = "") -> None:
    """Give every parameter of `module` its value from `tensors` on `device` (see the module's docstring).

    dtype: the compute dtype the module was loaded in (an fp8 layer's weight is rounded to it before it is
    quantized, as loading then quantizing does); specs: the parameters' shapes and dtypes where the module holds
    placeholders (wan_opt.memory.policy), else read from the parameters; deltas: LoRA terms by parameter name,
    added in float32 at `strength`.
    """
    specs = specs or specs_of(module)
    deltas = deltas or {}
    names = {}  # id(parameter) -> every name it goes by (tied weights have two)
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    jobs = []  # (owner module, attribute, canonical name, value source, fp8 scale attribute or None)
    seen = set()
    for prefix, owner in module.named_modules():
        for attr, param in list(owner._parameters.items()):
            if param is None or attr == "weight_scale" and isinstance(owner, Fp8Linear):
                continue
            canonical = next(n for n in names[id(param)] if n in specs)
            jobs.append((owner, attr, canonical, id(param) in seen))
            seen.add(id(param))
    replaced: dict[int, torch.nn.Parameter] = {}

    def place(owner, attr: str, name: str, value: torch.Tensor) -> None:
        param = owner._parameters[attr]
        shape, want = specs[name]
        if not param.is_meta and param.device == device and tuple(param.shape) == shape and param.dtype == want:
            param.data.copy_(value)
        elif param.is_meta:  # a parameter built without storage: a new one, in every place it is used
            new = torch.nn.Parameter(value.to(device, want), requires_grad=False)
            replaced[id(param)] = new
            owner._parameters[attr] = new
        else:
            param.data = value.to(device, want)

    sources = []
    for owner, attr, name, repeat in jobs:
        found = next((tensors[n] for n in names[id(owner._parameters[attr])] if n in tensors), None)
        if found is None:
            raise WanOptError(f"{source} lacks the weights of {name!r}: the checkpoint is incomplete; re-download it.")
        sources.append(found)
    for index, (owner, attr, name, repeat) in enumerate(jobs):
        if index + 1 < len(sources):
            advise(sources[index + 1], MADV_WILLNEED)
        if repeat:  # a tied weight's second place: the same parameter, replaced there too if it was replaced
            old = owner._parameters[attr]
            owner._parameters[attr] = replaced.get(id(old), old)
            continue
        src, want = sources[index], specs[name][1]
        fp8 = isinstance(owner, Fp8Linear) and attr == "weight"
        target_dtype = dtype if fp8 else want
        if not fp8 and name not in deltas and src.dtype == want and device.type == "cpu":
            place(owner, attr, name, src)  # the mapping itself, or copied into the arena from it
            if not _is_view_of(owner._parameters[attr], src):
                advise(src, MADV_DONTNEED)
            continue
        value = src.to(work_device).to(target_dtype)
        if name in deltas:
            delta = sum(term.tensor(value.shape, value.device) for term in deltas[name])
            value = (value.float() + strength * delta).to(target_dtype)
        if fp8:
            weight, scale = quantize_rows(value)
            place(owner, attr, name, weight)
            place(owner, "weight_scale", f"{name.rpartition('.')[0]}.weight_scale", scale)
        else:
            place(owner, attr, name, value)
        advise(src, MADV_DONTNEED)
    move_buffers(module, device)


def move_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """The buffers a module computes when it is built (the DiT's rotary tables) go where its weights went: a
    resident expert runs on the GPU with them."""
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and buffer.device != device:
                owner._buffers[name] = buffer.to(device)


def _is_view_of(param: torch.Tensor, src: torch.Tensor) -> bool:
    return param.device.type == "cpu" and param.data_ptr() == src.data_ptr()


class CheckpointWeights:
    """The experts' and the text encoder's weights in one checkpoint's files, read when a module is needed.

    loras: (LoraSpec) per expert role, fused while the expert is read, its file read again each time (a LoRA is
    small beside its expert, and is not kept in host memory between reads).
    """

    def __init__(self, ckpt: Checkpoint, work_device: torch.device, dtypes: dict[str, torch.dtype],
                 loras: dict | None = None):
        self.ckpt, self.work_device, self.dtypes = ckpt, work_device, dtypes
        self.loras = {role: spec for role, spec in (loras or {}).items() if spec is not None}

    def skeleton(self, role: str) -> torch.nn.Module:
        module = skeleton(self.ckpt, role, self.dtypes[role])
        if role in self.loras:
            self._deltas(role, specs_of(module))  # a LoRA that does not fit is said now, before any reading
        return module

    def files(self, role: str) -> list[Path]:
        return role_files(self.ckpt, role)

    def read(self, role: str, module: torch.nn.Module, device: torch.device, specs: Specs | None = None) -> None:
        """Read `role` into `module` on `device` (see read_module)."""
        specs = specs or specs_of(module)
        deltas = self._deltas(role, specs) if role in self.loras else None
        read_module(module, role_tensors(self.ckpt, role), device, self.work_device, self.dtypes[role], specs,
                    deltas, self.loras[role].strength if deltas else 1.0, source=str(self.ckpt.root / role))

    def _deltas(self, role: str, specs: Specs) -> dict:
        from wan_opt.loading.lora import lora_deltas, read_lora

        spec = self.loras[role]
        shapes = types.SimpleNamespace(named_parameters=lambda: [
            (name, torch.empty(shape, dtype=dtype, device="meta")) for name, (shape, dtype) in specs.items()])
        return lora_deltas(read_lora(spec.path), shapes, source=spec.path) if spec.strength else {}

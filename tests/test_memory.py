"""The memory policy's CPU-side logic (its GPU mechanisms are checked in test_gpu.py)."""
import torch

from wan_opt.memory import policy as memory
from wan_opt.memory.policy import copy_parts, move_to_pinned
from wan_opt.loading.tiny import build_tiny_components


def test_an_expert_is_copied_outside_the_blocks_first_then_block_by_block():
    expert = build_tiny_components(seed=0)["transformer"]
    parts = copy_parts(expert)
    assert [part for part, _ in parts] == [expert, *expert.blocks]
    outside = {name for name, _ in parts[0][1]}
    assert "patch_embedding.weight" in outside and "proj_out.weight" in outside
    assert not any(name.startswith("blocks.") for name in outside)
    for i, (_, tensors) in enumerate(parts[1:]):
        assert tensors and all(name.startswith(f"blocks.{i}.") for name, _ in tensors)
    named = dict(expert.named_parameters()) | dict(expert.named_buffers())
    assert sorted(n for _, tensors in parts for n, _ in tensors) == sorted(named)  # every tensor, once


def test_pinned_copies_are_packed_into_power_of_two_chunks_without_rounding_each_tensor(monkeypatch):
    """PyTorch rounds each pinned allocation up to a power of two; packing must not: the chunks hold the
    tensors with at most one chunk's tail to spare, whatever the tensors' sizes."""
    monkeypatch.setattr(memory, "PINNED_CHUNK", 4096)
    chunks = []

    def allocate(nbytes):
        assert nbytes & (nbytes - 1) == 0  # a power of two: the allocator keeps it as it is
        chunks.append(torch.empty(nbytes, dtype=torch.uint8))
        return chunks[-1]

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 3), torch.nn.LayerNorm(3))
    module.register_buffer("big", torch.randn(1500, dtype=torch.float64))  # 12 kB: a chunk of its own, 16 kB
    module.register_buffer("scale", torch.tensor(2.0, dtype=torch.bfloat16))  # 0-dim
    module[0].weight.data = module[0].weight.data.to(torch.float8_e4m3fn)
    tensors = [*module.parameters(), *module.buffers()]
    before = [t.detach().clone() for t in tensors]
    pinned = move_to_pinned(tensors, allocate=allocate)

    for tensor, data, old in zip(tensors, pinned, before):
        assert tensor.data is data or tensor.data.data_ptr() == data.data_ptr()  # moved in place
        assert data.dtype == old.dtype and data.shape == old.shape
        assert torch.equal(data.reshape(-1).view(torch.uint8), old.reshape(-1).view(torch.uint8))
        assert any(c.data_ptr() <= data.data_ptr() < c.data_ptr() + c.numel() for c in chunks)
    spans = sorted((d.data_ptr(), d.data_ptr() + d.nbytes) for d in pinned)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    assert sum(c.numel() for c in chunks) <= 16384 + 4096  # the big buffer's chunk (others fill it) + one more


def test_the_policy_says_which_modules_wait_in_pinned_memory_as_loaded():
    from wan_opt.memory.policy import MemoryPolicy

    swap = MemoryPolicy(experts="swap", text_encoder="gpu_release")
    assert swap.waits_pinned("transformer") and swap.waits_pinned("transformer_2") and swap.waits_pinned("text_encoder")
    assert not MemoryPolicy(experts="swap", weight_dtype="float8_e4m3fn").waits_pinned("transformer")  # requantized
    assert not MemoryPolicy(experts="resident", text_encoder="cpu").waits_pinned("text_encoder")
    assert not swap.waits_pinned("vae")
    released = MemoryPolicy(vae_release=True)
    assert released.waits_pinned("vae") and released.load_device("vae", torch.device("cuda")).type == "cpu"
    assert MemoryPolicy().load_device("vae", torch.device("cuda")).type == "cuda"


class RecordingSwapper:
    def __init__(self, calls: list):
        self.calls = calls

    def activate(self, module):
        self.calls.append("vae in")

    def release(self):
        self.calls.append("vae out")


def test_a_released_vae_comes_in_for_the_decode_and_the_image_encode_only(monkeypatch):
    """The pipeline asks the policy for the VAE around its two calls, and at no other time."""
    from PIL import Image

    from wan_opt.loading.tiny import build_tiny_components as build
    from wan_opt.pipeline import WanOptPipeline

    calls: list[str] = []
    pipe = WanOptPipeline(**build(seed=0, family="i2v_a14b"), boundary_ratio=0.875)
    pipe.vae_swapper = RecordingSwapper(calls)
    for name in ("encode", "decode"):
        real = getattr(pipe.vae, name)
        monkeypatch.setattr(pipe.vae, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    monkeypatch.setattr(pipe, "denoise", lambda expert, hidden, *a, **k: (calls.append("step"), hidden[:, :16] * 0)[1])
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    pipe("a fox", image=image, height=64, width=96, num_frames=9, num_inference_steps=2)
    assert calls == ["vae in", "encode", "vae out", "step", "step", "vae in", "decode", "vae out"]

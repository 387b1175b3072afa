"""Weights read from checkpoint files through memory maps (idle_weights=checkpoint): the same model as eager
loading, bit for bit, in every layout and storage dtype; read when needed and dropped after."""
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import write_diffusers_checkpoint, write_original_checkpoint
from tests.test_lora import original as original_lora
from wan_opt.errors import WanOptError
from wan_opt.loading.components import load_diffusers_layout, load_original_layout
from wan_opt.loading.layouts import check_checkpoint
from wan_opt.loading.lora import LoraSpec, apply_lora
from wan_opt.loading.mapped import CheckpointWeights, map_safetensors, read_module, role_tensors, skeleton
from wan_opt.loading.tiny import build_tiny_components
from wan_opt.memory.policy import CheckpointSwapper, MemoryPolicy
from wan_opt.optim.fp8 import Fp8Linear, quantize_linears
from wan_opt.pipeline import WanOptPipeline
from wan_opt.prepare import compose_config, prepare

CPU = torch.device("cpu")
WRITERS = {"diffusers": write_diffusers_checkpoint, "original": write_original_checkpoint}
ROLES = ("transformer", "transformer_2", "text_encoder")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny T2V-A14B in both layouts, and the modules it was written from."""
    tiny = build_tiny_components(seed=3, family="t2v_a14b", shift=12.0)
    root = tmp_path_factory.mktemp("ckpt")
    return tiny, {layout: check_checkpoint(write(root / layout, tiny, "t2v_a14b"), "t2v_a14b")
                  for layout, write in WRITERS.items()}


def state(module):
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def assert_same(ours, reference):
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_a_safetensors_file_is_mapped_not_copied(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2).half(),
               "d": torch.randn(4, 8).to(torch.float8_e4m3fn), "e": torch.arange(6).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    mapped, eager = map_safetensors(tmp_path / "x.safetensors"), load_file(str(tmp_path / "x.safetensors"))
    for name, tensor in eager.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name].view(torch.uint8),
                                                                  tensor.view(torch.uint8)), name
    # views of one mapping: their addresses lie as far apart as their bytes in the file
    header_order = sorted(mapped, key=lambda n: mapped[n].data_ptr())
    first, last = mapped[header_order[0]], mapped[header_order[-1]]
    span = last.data_ptr() + last.nbytes - first.data_ptr()
    assert span == sum(t.nbytes for t in mapped.values())


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_mapped_loading_equals_the_modules_written_in_float32(written, layout):
    tiny, ckpts = written
    for role in ROLES:
        module = skeleton(ckpts[layout], role, torch.float32)
        read_module(module, role_tensors(ckpts[layout], role), CPU, CPU, torch.float32)
        assert_same(state(module), state(tiny[role]))


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("weight_dtype", ["bfloat16", "float8_e4m3fn"])
def test_mapped_loading_equals_eager_loading(written, layout, weight_dtype):
    """bf16 storage, and fp8 storage quantized tensor by tensor as it is read against quantized after loading."""
    _, ckpts = written
    memory = MemoryPolicy(experts="resident", text_encoder="gpu", weight_dtype=weight_dtype,
                          compute_dtype="bfloat16", vae_dtype="float32")
    model = compose_config(["model=wan22_t2v_a14b"], hardware="cpu").model
    eager = (load_diffusers_layout if layout == "diffusers" else load_original_layout)(ckpts[layout], model, memory,
                                                                                     CPU)
    for role in ROLES:  # T5 in bf16 whole, as transformers loads it (its `wo` in float32 only under float16)
        module = skeleton(ckpts[layout], role, torch.bfloat16)
        if role != "text_encoder":
            memory.shape_for_storage(eager[role], CPU)  # quantized after loading, as the policy does
            memory.shape_for_storage(module, CPU)  # empty fp8 layers, filled as they are read
        read_module(module, role_tensors(ckpts[layout], role), CPU, CPU, torch.bfloat16)
        assert_same(state(module), state(eager[role]))
        fp8 = [m for m in module.modules() if isinstance(m, Fp8Linear)]
        assert bool(fp8) == (weight_dtype.startswith("float8") and role != "text_encoder")


@pytest.mark.parametrize("fp8", [False, True])
def test_a_lora_is_fused_as_the_expert_is_read(written, tmp_path, fp8):
    tiny, ckpts = written
    path = original_lora(tiny["transformer"], seed=5).save(tmp_path)
    source = CheckpointWeights(ckpts["original"], CPU, dict.fromkeys(ROLES, torch.float32),
                               loras={"transformer": LoraSpec(path, 0.7)})
    ours = source.skeleton("transformer")
    reference = build_tiny_components(seed=3, family="t2v_a14b")["transformer"]
    apply_lora(reference, LoraSpec(path, 0.7))
    if fp8:
        for block in [*ours.blocks, *reference.blocks]:
            quantize_linears(block)
    source.read("transformer", ours, CPU)
    assert_same(state(ours), state(reference))


def test_a_lora_that_does_not_fit_is_named_before_anything_is_read(written, tmp_path):
    _, ckpts = written
    path = tmp_path / "other.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 7),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(24, 4)}, str(path))
    source = CheckpointWeights(ckpts["original"], CPU, dict.fromkeys(ROLES, torch.float32),
                               loras={"transformer": LoraSpec(str(path))})
    with pytest.raises(WanOptError, match="other.safetensors"):
        source.skeleton("transformer")


def test_offloaded_experts_share_one_arena_each_read_in_turn(written):
    """The arena (pinned on a GPU; plain here): one set of tensors both experts point at, written over by the
    expert that is activated and kept when it is released."""
    tiny, ckpts = written
    source = CheckpointWeights(ckpts["diffusers"], CPU, dict.fromkeys(ROLES, torch.float32))
    experts = {role: source.skeleton(role) for role in ("transformer", "transformer_2")}
    chunks = []
    swapper = CheckpointSwapper(source, experts, CPU, arena=True,
                                allocate=lambda n: chunks.append(torch.empty(n, dtype=torch.uint8)) or chunks[-1])
    high, low = experts["transformer"], experts["transformer_2"]
    pairs = list(zip(high.parameters(), low.parameters()))
    assert all(a.data_ptr() == b.data_ptr() for a, b in pairs)
    assert sum(c.numel() for c in chunks) < 2 * sum(p.nbytes for p in high.parameters()) + (1 << 30)
    swapper.activate(high)
    assert_same(state(high), state(tiny["transformer"]))
    swapper.activate(low)
    assert_same(state(low), state(tiny["transformer_2"]))
    swapper.release()  # kept: the arena holds the low-noise expert until another one is read
    assert swapper.active is low and all(a.data_ptr() == b.data_ptr() for a, b in pairs)


def generate(pipe, steps=3):
    return pipe("a red fox", negative_prompt="blurry", height=64, width=96, num_frames=5, num_inference_steps=steps,
                guidance_scale=4.0, guidance_scale_2=3.0, generator=torch.Generator().manual_seed(0)).frames


def load(ckpt, *overrides):
    overrides = [f"model.ckpt_dir={ckpt.root}", *overrides]
    return WanOptPipeline.from_prepared(prepare(compose_config(["model=wan22_t2v_a14b", *overrides],
                                                               hardware="cpu"), overrides, prompt_required=False))


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_idle_weights_wait_in_the_checkpoint_and_the_video_is_the_same(written, layout):
    _, ckpts = written
    reference = generate(load(ckpts[layout]))
    pipe = load(ckpts[layout], "hardware.memory.idle_weights=checkpoint", "hardware.memory.experts=swap",
                "hardware.memory.text_encoder=cpu")
    reads = []
    real_read = pipe.weight_source.read
    pipe.weight_source.read = lambda role, *a: reads.append(role) or real_read(role, *a)
    assert all(p.numel() == 0 for m in pipe.experts() + [pipe.text_encoder] for p in m.parameters())
    for _ in range(2):
        np.testing.assert_array_equal(generate(pipe), reference)
    # each request reads the encoder for its encode and each expert at its first step; nothing else stays
    assert reads == ["text_encoder", "transformer", "transformer_2"] * 2
    assert all(p.numel() == 0 for m in (pipe.text_encoder, pipe.transformer) for p in m.parameters())
    assert all(p.numel() > 0 for p in pipe.transformer_2.parameters())


def test_resident_experts_are_read_once_as_the_pipeline_loads(written):
    _, ckpts = written
    pipe = load(ckpts["original"], "hardware.memory.idle_weights=checkpoint")
    assert pipe.expert_swapper is None and pipe.text_encoder_swapper is not None
    assert all(p.numel() > 0 for m in pipe.experts() for p in m.parameters())
    np.testing.assert_array_equal(generate(pipe, steps=2), generate(load(ckpts["original"]), steps=2))


def test_idle_weights_checkpoint_and_fused_qkv_are_refused_together(written):
    _, ckpts = written
    overrides = ["hardware.memory.idle_weights=checkpoint", "hardware.speed.fuse_qkv=true"]
    with pytest.raises(WanOptError, match="fuse_qkv=true, which joins whole weights after loading: pass "
                                          "hardware.memory.idle_weights=host"):
        load(ckpts["original"], *overrides)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
def test_a_copied_tensor_leaves_no_file_pages_in_the_process(tmp_path):
    def rss_file_kib():
        line = next(l for l in open("/proc/self/status") if l.startswith("RssFile:"))
        return int(line.split()[1])

    save_file({"weight": torch.randn(4096, 4096)}, str(tmp_path / "big.safetensors"))  # 64 MiB
    module = torch.nn.Linear(4096, 4096, bias=False)
    module.weight.data = torch.empty(0)
    mapped = map_safetensors(tmp_path / "big.safetensors")
    before = rss_file_kib()
    read_module(module, mapped, CPU, CPU, torch.bfloat16, specs={"weight": ((4096, 4096), torch.bfloat16)})
    assert module.weight.shape == (4096, 4096) and module.weight.dtype == torch.bfloat16
    # with the file still mapped: not the 64 MiB it was read through
    assert rss_file_kib() - before < 16 * 1024 and mapped["weight"].shape == (4096, 4096)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("knobs", [
    ["hardware.memory.experts=offload", "hardware.memory.text_encoder=gpu_release"],  # one pinned arena
    ["hardware.memory.experts=swap", "hardware.memory.text_encoder=cpu"],  # read straight to the GPU
    ["hardware.memory.experts=resident", "hardware.memory.text_encoder=gpu",
     "hardware.memory.weight_dtype=float8_e4m3fn"],  # quantized on the GPU as it is read
])
def test_on_a_gpu_weights_read_when_needed_give_the_same_video(written, knobs):
    _, ckpts = written
    exact = ["hardware.memory.compute_dtype=float32", "hardware.memory.vae_dtype=float32", "hardware.speed.tf32=false"]

    def on_gpu(*overrides):
        overrides = [f"model.ckpt_dir={ckpts['original'].root}", *exact, *overrides]
        cfg = compose_config(["model=wan22_t2v_a14b", *overrides], hardware="rtx_16gb")
        return WanOptPipeline.from_prepared(prepare(cfg, overrides, prompt_required=False))

    fp8 = "hardware.memory.weight_dtype=float8_e4m3fn" in knobs
    host = ["hardware.memory.idle_weights=host", "hardware.memory.experts=resident", "hardware.memory.text_encoder=gpu",
            "hardware.memory.weight_dtype=" + ("float8_e4m3fn" if fp8 else "float32")]
    reference = generate(on_gpu(*host))
    pipe = on_gpu("hardware.memory.idle_weights=checkpoint", *knobs,
                  *([] if fp8 else ["hardware.memory.weight_dtype=float32"]))
    for _ in range(2):
        out = generate(pipe)
        assert np.linalg.norm(out - reference) / np.linalg.norm(reference) < 1e-4
    if "hardware.memory.experts=offload" in knobs:
        assert all(a.is_pinned() and a.data_ptr() == b.data_ptr()
                   for a, b in zip(pipe.transformer.blocks.parameters(), pipe.transformer_2.blocks.parameters()))
    if "hardware.memory.experts=swap" in knobs:
        assert all(p.numel() == 0 for p in pipe.transformer.parameters())
        assert all(p.device.type == "cuda" for p in pipe.transformer_2.parameters())


def test_a_module_read_onto_a_device_takes_its_computed_buffers_along(written):
    """The DiT's rotary tables are computed when the skeleton is built, on the CPU: a resident expert read onto the
    GPU needs them there (the meta device stands in for the GPU here)."""
    _, ckpts = written
    module = skeleton(ckpts["diffusers"], "transformer", torch.bfloat16)
    buffers = dict(module.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())
    read_module(module, role_tensors(ckpts["diffusers"], "transformer"), torch.device("meta"), CPU, torch.bfloat16)
    assert all(t.device.type == "meta" for t in [*module.buffers(), *module.parameters()])
    assert set(dict(module.named_buffers())) == set(buffers)

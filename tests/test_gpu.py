"""The memory and speed mechanisms on a real CUDA device, with the tiny model, against their plain results."""
import numpy as np
import pytest
import torch

from wan_opt.memory.policy import MemoryPolicy
from wan_opt.pipeline import WanOptPipeline
from wan_opt.optim.speed import SpeedPolicy
from wan_opt.loading.tiny import build_tiny_components
from wan_opt.bench.report import rel_l2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CALL = dict(prompt="a red fox", negative_prompt="blurry", height=64, width=96, num_frames=9,
            num_inference_steps=6, guidance_scale=4.0, guidance_scale_2=3.0)


def run(memory: MemoryPolicy, speed: SpeedPolicy | None = None) -> np.ndarray:
    components = build_tiny_components(seed=2)
    for name in ("transformer", "transformer_2", "text_encoder", "vae"):
        components[name].to(memory.load_device(name, torch.device("cuda")))
    pipe = WanOptPipeline(**components, boundary_ratio=0.875, memory=memory, speed=speed, device="cuda")
    pipe.apply_policies()
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def resident():
    return run(MemoryPolicy(experts="resident", text_encoder="gpu", weight_dtype="float32", compute_dtype="float32"))


@pytest.mark.parametrize("knobs", [
    dict(experts="swap", text_encoder="gpu_release"),
    dict(experts="swap", swap_overlap=True, text_encoder="gpu_release"),
    dict(experts="offload", text_encoder="cpu"),
    dict(experts="offload", offload_granularity="leaf", text_encoder="gpu"),
    dict(experts="resident", text_encoder="gpu", vae_tiling=True),
    dict(experts="resident", text_encoder="gpu", vae_release=True),
])
def test_placement_mechanisms_do_not_change_the_result(resident, knobs):
    out = run(MemoryPolicy(weight_dtype="float32", compute_dtype="float32", **knobs))
    assert rel_l2(out, resident) < 1e-4


def test_fp8_storage_stays_close(resident):
    out = run(MemoryPolicy(weight_dtype="float8_e4m3fn", compute_dtype="float32", text_encoder="gpu"))
    assert np.isfinite(out).all() and rel_l2(out, resident) < 0.2


def test_swap_keeps_one_expert_on_the_gpu():
    components = build_tiny_components(seed=2)
    pipe = WanOptPipeline(**components, boundary_ratio=0.875, device="cuda",
                          memory=MemoryPolicy(experts="swap", weight_dtype="float32", compute_dtype="float32"))
    pipe.vae.to("cuda")
    pipe.text_encoder.to("cuda")
    pipe.apply_policies()
    swapper = pipe.expert_swapper
    assert all(p.device.type == "cpu" and p.is_pinned() for p in pipe.transformer.parameters())
    swapper.activate(pipe.transformer_2)
    assert all(p.device.type == "cuda" for p in pipe.transformer_2.parameters())
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())


def test_a_released_vae_waits_pinned_and_is_on_the_gpu_only_for_its_call():
    components = build_tiny_components(seed=2)
    memory = MemoryPolicy(vae_release=True, weight_dtype="float32", compute_dtype="float32")
    for name in ("transformer", "transformer_2", "text_encoder", "vae"):
        components[name].to(memory.load_device(name, torch.device("cuda")))
    pipe = WanOptPipeline(**components, boundary_ratio=0.875, memory=memory, device="cuda")
    pipe.apply_policies()
    assert all(p.device.type == "cpu" and p.is_pinned() for p in pipe.vae.parameters())
    with memory.vae_on_gpu(pipe):
        assert all(p.device.type == "cuda" for p in pipe.vae.parameters())
    assert all(p.device.type == "cpu" for p in pipe.vae.parameters())


def test_fp8_matmul_on_tensor_cores_stays_close_to_bf16():
    from wan_opt.hardware import has_fp8
    from wan_opt.optim.fp8 import Fp8Linear

    if not has_fp8(torch.cuda.get_device_capability()):
        pytest.skip("needs fp8 tensor cores (Ada or Hopper)")
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 300, 512, device="cuda", dtype=torch.bfloat16)
    layer = Fp8Linear(linear, fp8_matmul=True)
    out, reference = layer(x).float(), linear(x).float()
    assert ((out - reference).norm() / reference.norm()).item() < 0.08


def errors_against_sdpa(kernel) -> tuple[float, float]:
    """Relative L2 from PyTorch's SDPA of `kernel` on (B, N, H, D) bf16 tensors, run alone and inside a compiled
    graph (as the profiles run it), on a length that leaves a partly masked last block of keys."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    reference = reference.transpose(1, 2).float().cpu().numpy()
    eager = kernel(q, k, v).float().cpu().numpy()
    compiled = torch.compile(lambda *a: kernel(*a) * 1.0, fullgraph=True, dynamic=False)(q, k, v)
    return rel_l2(eager, reference), rel_l2(compiled.float().cpu().numpy(), reference)


def test_fp8_attention_kernel_matches_sdpa_eager_and_compiled():
    from wan_opt.hardware import has_fp8
    from wan_opt.optim.fp8_attention import fp8_attention

    if not has_fp8(torch.cuda.get_device_capability()):
        pytest.skip("needs fp8 tensor cores (Ada or Hopper)")
    eager, compiled = errors_against_sdpa(fp8_attention)
    assert eager < 0.03 and compiled < 0.03


def test_the_hopper_fp8_kernel_matches_sdpa_and_the_triton_kernel():
    from wan_opt.optim.fp8_attention import fp8_attention, hopper_kernel_available

    if not hopper_kernel_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU and a Triton with Gluon")
    eager, compiled = errors_against_sdpa(lambda *a: fp8_attention(*a, hopper=True))
    assert eager < 0.03 and compiled < 0.03
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 4000, 2, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    warp_specialised, plain = (fp8_attention(q, k, v, hopper=h).float().cpu().numpy() for h in (True, False))
    exact = exact.float().cpu().numpy()
    # The same arithmetic on the same operands, but for the Triton kernel's autotuned block of keys (64 or 128),
    # over which P is scaled and rounded
    assert rel_l2(warp_specialised, plain) < 0.02
    assert rel_l2(warp_specialised, exact) < 0.03 and rel_l2(plain, exact) < 0.03


@pytest.mark.parametrize("hopper", [True, False], ids=["hopper_kernel", "triton_kernel"])
def test_the_fast_attention_stays_within_three_percent_on_the_sweep(hopper):
    """Every case of benchmarks/attention_accuracy.py's sweep (near-uniform to peaky, local, biased and sunk
    attention) at 16,380 tokens (a partly padded last block), 2 heads, against fp32 attention: each kernel
    mode=fast can run is within 3% (the script writes the same table at 32,760 and 75,600 tokens)."""
    from benchmarks.attention_accuracy import CASES, LIMIT, exact_attention, sweep_inputs
    from wan_opt.hardware import has_fp8
    from wan_opt.optim.fp8_attention import fp8_attention, hopper_kernel_available

    if not has_fp8(torch.cuda.get_device_capability()):
        pytest.skip("needs fp8 tensor cores (Ada or Hopper)")
    if hopper and not hopper_kernel_available(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU and a Triton with Gluon")
    errors = {}
    for case in CASES:
        q, k, v = sweep_inputs(case, 16_380, heads=2, device="cuda")
        reference = exact_attention(q, k, v)[0].cpu().numpy()
        errors[case] = rel_l2(fp8_attention(q, k, v, hopper=hopper).float().cpu().numpy(), reference)
    assert max(errors.values()) < LIMIT, errors


def test_the_exact_hopper_kernel_is_exact_attention():
    """attention=hopper against fp32 attention, as close as bf16 SDPA is (eager and compiled, two sequences of a
    batch that end inside a block of keys), on every case of the fast mode's sweep, and on Q, K and V read in
    place from a fused QKV projection's output."""
    from benchmarks.attention_accuracy import CASES, exact_attention, sweep_inputs
    from wan_opt.optim.attention import exact_attention_hopper, hopper_kernel_missing

    if hopper_kernel_missing():
        pytest.skip(f"the Hopper kernel does not run here: {hopper_kernel_missing()}")
    eager, compiled = errors_against_sdpa(exact_attention_hopper)
    assert eager < 0.01 and compiled < 0.01
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for case in CASES:
        q, k, v = sweep_inputs(case, 16_380, heads=2, device="cuda")
        reference = exact_attention(q, k, v)[0].cpu().numpy()
        ours, theirs = (rel_l2(f(q, k, v).float().cpu().numpy(), reference) for f in (exact_attention_hopper, sdpa))
        assert ours < 2 * theirs + 1e-3, (case, ours, theirs)
    gen = torch.Generator(device="cuda").manual_seed(2)
    qkv = torch.randn(2, 3000, 3 * 4 * 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = (t.unflatten(2, (4, 128)) for t in qkv.chunk(3, dim=2))
    assert rel_l2(exact_attention_hopper(q, k, v).float().cpu().numpy(),
                  sdpa(q, k, v).float().cpu().numpy()) < 0.01


@pytest.mark.parametrize("pv_type, schedule", [("bf16", "turns"), ("bf16", "turns+overlap"), ("int8", "turns")])
def test_every_schedule_gives_the_same_result_to_the_bit(pv_type, schedule, monkeypatch):
    """The Hopper kernel in a schedule and in "overlap": the same arithmetic in another order of issue, so the
    same output to the bit, at lengths that end inside a block of keys (the schedules' last block, masked): many
    blocks, two (no turn before the masked one) and one alone."""
    from wan_opt.kernels import attention_hopper
    from wan_opt.optim.attention import exact_attention_hopper, hopper_kernel_missing
    from wan_opt.optim.fp8_attention import fp8_attention

    if hopper_kernel_missing():
        pytest.skip(f"the Hopper kernel does not run here: {hopper_kernel_missing()}")
    run = exact_attention_hopper if pv_type == "bf16" else (lambda *a: fp8_attention(*a, hopper=True))
    gen = torch.Generator(device="cuda").manual_seed(3)
    for tokens in (5000, 200, 100):
        q, k, v = (torch.randn(2, tokens, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        outputs = []
        for name in ("overlap", schedule):
            monkeypatch.setitem(attention_hopper.SCHEDULE, pv_type, name)
            outputs.append(run(q, k, v))
        assert torch.equal(*outputs), tokens
        reference = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        assert rel_l2(outputs[1].float().cpu().numpy(), reference.transpose(1, 2).float().cpu().numpy()) < 0.03


def test_flashattention4_matches_sdpa_eager_and_compiled():
    from wan_opt.optim.attention import flash4_attention, flash4_available

    if not flash4_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs flash-attn-4 and a Hopper or newer GPU")
    eager, compiled = errors_against_sdpa(flash4_attention)
    assert eager < 0.01 and compiled < 0.01


FP32 = dict(weight_dtype="float32", compute_dtype="float32", text_encoder="gpu")


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(fuse_qkv=True),
    dict(step_cache="first_block", step_cache_threshold=0.5),
    dict(step_cache="taylorseer", step_cache_interval=2),
    dict(step_cache="magcache", step_cache_ratios="{tmp_path}/{run}.json"),  # calibrating: every step computed
    dict(cfg_truncation=0.5),
    dict(fuse_gelu=True),
], ids=["plain", "fuse_qkv", "first_block", "taylorseer", "magcache", "cfg_truncation", "fuse_gelu"])
def test_regional_compile_keeps_each_speed_knobs_result(knobs, tmp_path):
    def knobs_of(name: str) -> dict:  # a MagCache run writes its ratios: each run its own file
        return {k: v.format(tmp_path=tmp_path, run=name) if isinstance(v, str) else v for k, v in knobs.items()}

    eager = run(MemoryPolicy(**FP32), SpeedPolicy(**knobs_of("eager")))
    compiled = run(MemoryPolicy(**FP32), SpeedPolicy(compile="regional", compile_cache_dir=str(tmp_path),
                                                     **knobs_of("compiled")))
    assert np.isfinite(compiled).all() and rel_l2(compiled, eager) < 1e-3


def test_overlapped_swap_under_compile_keeps_the_result(resident, tmp_path):
    memory = MemoryPolicy(experts="swap", swap_overlap=True, **FP32)
    out = run(memory, SpeedPolicy(compile="regional", compile_cache_dir=str(tmp_path)))
    assert rel_l2(out, resident) < 1e-3

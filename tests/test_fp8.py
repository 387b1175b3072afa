"""fp8 weights with per-channel scales: storage (bf16 matmul) and fp8 matmuls, on the CPU."""
import pytest
import torch
from diffusers import WanPipeline

from wan_opt.prepare import compose_config
from wan_opt.checks import check_knobs
from wan_opt.errors import WanOptError
from tests.test_pipeline import rel_l2
from wan_opt.hardware import has_fp8
from wan_opt.optim.fp8 import FP8, Fp8Linear, quantize_linears, quantize_rows, use_fp8_matmul
from wan_opt.loading.lora import LoraSpec, apply_lora
from wan_opt.memory.policy import MemoryPolicy
from wan_opt.pipeline import WanOptPipeline
from wan_opt.loading.arch import model_sizes
from wan_opt.memory.plan import BYTES, GIB, Mechanisms, Request, predict
from wan_opt.optim.speed import SpeedPolicy
from wan_opt.loading.tiny import build_tiny_components

CALL = dict(prompt="a red fox in the snow", negative_prompt="blurry, static", height=64, width=96, num_frames=9,
            num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0, output_type="np")


def test_per_channel_scales_keep_the_small_weights_a_plain_cast_loses():
    torch.manual_seed(0)
    # A DiT's weights sit mostly below e4m3's smallest normal (2^-6), some channels far below.
    weight = torch.randn(64, 256) * torch.logspace(-4, -1, 64).unsqueeze(1)
    q, scale = quantize_rows(weight)
    assert q.dtype == FP8 and scale.shape == (64, 1)
    def worst_channel(approx):  # relative error of the worst output channel
        return ((approx - weight).norm(dim=1) / weight.norm(dim=1)).max().item()

    assert worst_channel(q.float() * scale) < 0.05
    assert worst_channel(weight.to(FP8).float()) > 0.5


def test_an_all_zero_channel_stays_zero():
    q, scale = quantize_rows(torch.zeros(2, 32))
    assert torch.equal(q.float() * scale, torch.zeros(2, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_stays_close_to_the_linear_in_both_modes(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(dtype)
    x = torch.randn(2, 40, 64, dtype=dtype)
    reference = linear(x)
    layer = Fp8Linear(linear)
    stored = layer(x)
    layer.fp8_matmul = True
    fp8 = layer(x)
    assert stored.dtype == fp8.dtype == dtype and fp8.shape == reference.shape
    assert rel_l2(stored.float(), reference.float()) < 0.05
    assert 0 < rel_l2(fp8.float(), reference.float()) < 0.08  # activations are quantised too


def test_few_rows_take_the_dequantised_path():
    layer = Fp8Linear(torch.nn.Linear(32, 32), fp8_matmul=True)
    x = torch.randn(1, 32)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight(x.dtype), layer.bias))


def test_fp8_storage_quantizes_the_blocks_and_keeps_the_compute_dtype():
    pipe = WanPipeline(**build_tiny_components(seed=1), boundary_ratio=0.875)
    reference = WanOptPipeline.from_diffusers(pipe)(**CALL, generator=torch.Generator().manual_seed(2)).frames
    linears = sum(type(m) is torch.nn.Linear for m in pipe.transformer.blocks.modules())
    memory = MemoryPolicy(weight_dtype="float8_e4m3fn", compute_dtype="float32")
    ours = WanOptPipeline.from_diffusers(pipe, memory=memory)
    for expert in ours.experts():
        assert sum(isinstance(m, Fp8Linear) for m in expert.blocks.modules()) == linears
        assert not any(type(m) is torch.nn.Linear for m in expert.blocks.modules())
        assert expert.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
        assert expert.dtype == torch.float32  # what the pipeline casts latents to
    stored = ours(**CALL, generator=torch.Generator().manual_seed(2)).frames
    ours.speed = SpeedPolicy(fp8_matmul=True)
    ours.speed.apply(ours.experts(), ours.device)
    assert all(layer.fp8_matmul for e in ours.experts() for layer in e.modules() if isinstance(layer, Fp8Linear))
    fp8 = ours(**CALL, generator=torch.Generator().manual_seed(2)).frames
    assert 0 < rel_l2(stored, reference) < 0.05
    assert 0 < rel_l2(fp8, reference) < 0.08 and rel_l2(fp8, stored) > 0


def test_a_lora_is_refused_once_the_weights_are_fp8(tmp_path):
    from tests.test_lora import original

    expert = build_tiny_components(seed=0)["transformer"]
    lora = original(expert).save(tmp_path)
    for block in expert.blocks:
        quantize_linears(block)
    with pytest.raises(WanOptError, match="before fp8 storage"):
        apply_lora(expert, LoraSpec(lora))


def test_use_fp8_matmul_counts_the_layers():
    block = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    assert quantize_linears(block) == 2 and use_fp8_matmul(block) == 2


def test_fp8_matmul_needs_ada_or_hopper():
    assert has_fp8((9, 0)) and has_fp8((8, 9))
    assert not has_fp8((8, 0)) and not has_fp8((8, 6))


def test_fp8_matmul_without_fp8_storage_is_named():
    with pytest.raises(WanOptError, match="weight_dtype=float8_e4m3fn"):
        check_knobs(compose_config(["hardware.speed.fp8_matmul=true"], hardware="cpu"))
    check_knobs(compose_config(["hardware.speed.fp8_matmul=true", "hardware.memory.weight_dtype=float8_e4m3fn"],
                                    hardware="cpu"))


def test_the_planner_counts_fp8_for_the_block_linears_only():
    sizes = model_sizes("t2v_a14b")
    assert 0.95 < sizes.expert_block_linear_params_b / sizes.expert_params_b < 1.0
    req = Request(1280, 720, 81)
    bf16, fp8 = (predict(sizes, req, Mechanisms(experts="resident", weight_dtype=w), "bfloat16", "float32", 1e3, 1e3)
                 for w in ("bfloat16", "float8_e4m3fn"))
    saved = bf16.stages["encode"] - fp8.stages["encode"]  # both experts, resident
    assert saved == pytest.approx(2 * sizes.expert_block_linear_params_b * 1e9 * (BYTES["bfloat16"] - 1) / GIB, abs=0.02)


@pytest.mark.parametrize("input_gelu", [False, True])
def test_the_quantisation_kernel_scales_each_row_as_quantize_rows_does(input_gelu):
    """The Triton kernel's arithmetic before its e4m3 cast, in Triton's interpreter without a GPU (its cast there
    rounds some values at a power of two down a binade, unlike the GPU's): written to a float32 buffer."""
    pytest.importorskip("triton", reason="the kernel is Triton code")
    import triton

    from wan_opt.kernels.fp8_rows import quantize_rows_kernel
    from wan_opt.optim.fp8 import gelu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(7, 300, device=device) * torch.logspace(-3, 2, 7, device=device).unsqueeze(1)
    x[3] = 0.0  # an all-zero row
    scaled = torch.empty_like(x)
    scale = torch.empty(7, 1, device=device)
    quantize_rows_kernel[(7,)](x, scaled, scale, 300, x.stride(0), GELU=input_gelu,
                               BLOCK=triton.next_power_of_2(300))
    reference, reference_scale = quantize_rows(gelu(x) if input_gelu else x)
    assert torch.allclose(scale, reference_scale, rtol=1e-5, atol=0)
    expected = ((gelu(x) if input_gelu else x).float() / reference_scale).clamp(-448, 448)
    assert torch.allclose(scaled, expected, rtol=1e-4, atol=1e-4)
    assert scaled.abs().amax(dim=1).tolist() == pytest.approx([448.0] * 3 + [0.0] + [448.0] * 3, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_quantisation_op_matches_quantize_rows_on_the_gpu():
    from wan_opt.optim.fp8 import gelu, quantize_activations

    torch.manual_seed(0)
    x = torch.randn(300, 5120, device="cuda", dtype=torch.bfloat16) * 4
    for input_gelu in (False, True):
        q, scale = quantize_activations(x, input_gelu)
        # the kernel computes in float32 (GELU included) before rounding to e4m3
        reference, reference_scale = quantize_rows(gelu(x.float()) if input_gelu else x)
        assert torch.allclose(scale, reference_scale, rtol=1e-5)
        # a value at a rounding tie may land on either side: one e4m3 step at most, rarely
        differ = q.float() != reference.float()
        assert differ.float().mean() < 1e-3
        assert torch.allclose(q.float(), reference.float(), rtol=0.13, atol=2.0**-9)  # e4m3's smallest step


def test_fp8_matmul_moves_the_feed_forward_gelu_into_the_output_layer():
    """use_fp8_matmul folds GELU(proj(x)) -> output into proj(x) -> output(GELU(.)): the same arithmetic."""
    torch.manual_seed(0)
    expert = build_tiny_components(seed=0)["transformer"]
    for block in expert.blocks:
        quantize_linears(block)
    for layer in expert.modules():
        if isinstance(layer, Fp8Linear):
            layer.fp8_matmul = True
    inputs = (torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 12, expert.config.text_dim))
    with torch.no_grad():
        before = expert(*inputs, return_dict=False)[0]
        use_fp8_matmul(expert)
        after = expert(*inputs, return_dict=False)[0]
    ffns = [block.ffn for block in expert.blocks]
    assert all(isinstance(ff.net[0], Fp8Linear) and ff.net[2].input_gelu for ff in ffns)
    assert torch.equal(before, after)

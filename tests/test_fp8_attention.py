"""The fast mode's attention kernel, run by Triton's interpreter on the CPU (the same kernel code the GPU compiles).

Without a GPU, tests/conftest.py switches Triton to its interpreter before anything imports it; with one,
these tests run the compiled kernel on it (fp8 tensor cores needed).
"""

import pytest
import torch

pytest.importorskip("triton", reason="the kernel is Triton code")

from diffusers import WanTransformer3DModel  # noqa: E402

from benchmarks.attention_accuracy import CASES, LIMIT, emulate, exact_attention, sweep_inputs  # noqa: E402
from tests.sm90 import OTHER_TRITONS, SHARED_MEMORY, compile_for_hopper, compile_gluon_attention  # noqa: E402
from tests.test_pipeline import rel_l2  # noqa: E402
from wan_opt.optim import fp8_attention as kernel  # noqa: E402
from wan_opt.prepare import compose_config  # noqa: E402
from wan_opt.optim.attention import use_self_attention  # noqa: E402
from wan_opt.checks import check_device  # noqa: E402
from wan_opt.errors import WanOptError  # noqa: E402
from wan_opt.hardware import has_fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda" and not has_fp8(torch.cuda.get_device_capability()):
    pytest.skip("needs fp8 tensor cores (Ada or Hopper)", allow_module_level=True)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def randn(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE)


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("tokens, head_dim", [(200, 64), (128, 128), (75, 128)])
def test_matches_exact_attention_within_three_percent(tokens, head_dim):
    torch.manual_seed(0)
    q, k, v = (randn(2, tokens, 3, head_dim) for _ in range(3))
    out = kernel.fp8_attention(q, k, v)
    assert out.shape == q.shape
    assert rel_l2(out, sdpa(q, k, v)) < LIMIT


@pytest.mark.parametrize("case", CASES)
def test_the_sweep_stays_within_three_percent_of_exact_attention(case):
    """Every case of benchmarks/attention_accuracy.py's sweep, small (300 tokens: a partly padded last block),
    against fp32 attention: the kernel within LIMIT, and its arithmetic the emulation's (which the next test
    runs at 4,096 tokens; the GPU sweep at 32,760 and 75,600). Inputs are bf16 values held in float32, as the
    interpreter computes them."""
    q, k, v = (t.float().to(DEVICE) for t in sweep_inputs(case, tokens=300, heads=1))
    reference, _ = exact_attention(q, k, v)
    out = kernel.fp8_attention(q, k, v).float()
    assert rel_l2(out, reference) < LIMIT
    if DEVICE == "cpu":  # the interpreter's one tile: 64 keys a block
        assert rel_l2(out, emulate(q, k, v, "bf16", "int8_block", "int8", block=64)) < 1e-3


@pytest.mark.parametrize("case", CASES)
def test_the_kernels_arithmetic_stays_within_three_percent_at_4096_tokens(case):
    """The kernels' arithmetic in PyTorch (attention_accuracy.emulate: bf16 Q K^T in fp32, each block's P scaled
    to 127 and rounded, V smoothed and rounded to int8 per channel) over 128-key blocks, the Hopper kernel's, at
    4,096 tokens and 2 heads: within LIMIT on every case, the peaky ones included. The previous kernels' e4m3
    arithmetic, on the same inputs, is past it on the peakiest, so the sweep tells the two apart."""
    q, k, v = sweep_inputs(case, tokens=4096, heads=2)
    reference, _ = exact_attention(q, k, v)
    assert rel_l2(emulate(q, k, v, "bf16", "int8_block", "int8", block=128), reference) < LIMIT
    if case == "gaussian_std16":
        assert rel_l2(emulate(q, k, v, "e4m3", "e4m3", "e4m3", block=128), reference) > 2 * LIMIT


def test_an_offset_shared_by_the_keys_or_the_values_costs_nothing():
    """An offset common to all keys moves every score of a query equally, which softmax ignores (and Q K^T is
    exact); one common to all values is smoothed away before V is rounded, and added back exactly."""
    torch.manual_seed(1)
    q, k, v = (randn(1, 128, 2, 64).bfloat16().float() for _ in range(3))

    def error(q, k, v):
        return (kernel.fp8_attention(q, k, v).float() - exact_attention(q, k, v)[0]).norm().item()

    plain = error(q, k, v)
    assert error(q, (k + 20.0).bfloat16().float(), v) < 1.5 * plain
    assert error(q, k, (v + 20.0).bfloat16().float()) < 1.5 * plain


def test_padded_keys_are_masked():
    """75 tokens run in one 128-token tile: the 53 padded keys (zero, so scores of zero) must get no weight."""
    torch.manual_seed(2)
    q, k, v = (randn(1, 75, 1, 64) for _ in range(3))
    assert rel_l2(kernel.fp8_attention(q, k, v), sdpa(q, k, v)) < LIMIT


def test_queries_in_any_layout_give_the_same_output():
    """The output is written at unit stride over the channels, whatever the strides of the queries it takes the
    shape of (a view of a (B, H, N, D) tensor here)."""
    torch.manual_seed(5)
    q, k, v = (randn(1, 2, 200, 64).transpose(1, 2) for _ in range(3))
    assert torch.equal(kernel.fp8_attention(q, k, v), kernel.fp8_attention(*(t.contiguous() for t in (q, k, v))))


def test_the_processor_runs_the_self_attention_only():
    torch.manual_seed(3)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16,
                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    model = WanTransformer3DModel(**config).eval().to(DEVICE, DTYPE)
    x, t, ctx = randn(1, 16, 3, 8, 12), torch.tensor([700.0], device=DEVICE), randn(1, 16, 32)
    with torch.no_grad():
        reference = model(x, t, ctx, return_dict=False)[0]
        assert use_self_attention(model, kernel.Fp8SelfAttnProcessor) == 2
        assert isinstance(model.blocks[0].attn1.processor, kernel.Fp8SelfAttnProcessor)
        calls = []
        original = kernel.fp8_attention
        kernel.fp8_attention = lambda *a: calls.append(a[0].shape) or original(*a)
        try:
            out = model(x, t, ctx, return_dict=False)[0]
        finally:
            kernel.fp8_attention = original
    assert calls == [(1, 72, 2, 64)] * 2  # the self-attention of each block; cross-attention stays on SDPA
    assert 0 < rel_l2(out, reference) < 0.1


def test_values_in_mma_key_order_meet_p_as_the_hopper_kernel_relabels_it():
    """The Hopper kernel hands the S accumulator's registers to the P V MMA as they are. Per the PTX ISA's wgmma
    layouts, in every 32 columns the register a thread holds at (h, a, b) is accumulator column
    16h + 8a + 2t + b and operand column 16h + 4t + 2a + b (t: the thread's lane in its quad); V^T in
    mma_key_order must pair each operand column with the key of the accumulator column it came from."""
    torch.manual_seed(4)
    keys, head_dim = 96, 8
    p, vt = torch.rand(5, keys, dtype=torch.float64), torch.randn(head_dim, keys, dtype=torch.float64)
    operand = torch.empty_like(p)
    for base in range(0, keys, 32):
        for h, a, b, t in ((h, a, b, t) for h in (0, 1) for a in (0, 1) for b in (0, 1) for t in range(4)):
            operand[:, base + 16 * h + 4 * t + 2 * a + b] = p[:, base + 16 * h + 8 * a + 2 * t + b]
    assert not torch.equal(operand, p)
    assert torch.allclose(operand @ kernel.mma_key_order(vt).T, p @ vt.T)


def test_the_hopper_kernel_is_chosen_only_where_it_runs():
    assert not kernel.hopper_kernel_available(torch.device("cpu"))
    if DEVICE == "cpu":
        assert not kernel.Fp8SelfAttnProcessor().hopper


def test_one_switch_takes_the_hopper_kernel_out(monkeypatch):
    """HOPPER_KERNEL off: a Hopper GPU gets the Triton kernel, as every other GPU does."""
    from wan_opt.optim import attention

    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs a Triton with Gluon")
    monkeypatch.setattr(attention, "device_capability", lambda device: (9, 0))
    assert kernel.hopper_kernel_available(torch.device("cuda"))
    monkeypatch.setattr(attention, "HOPPER_KERNEL", False)
    assert not kernel.hopper_kernel_available(torch.device("cuda"))


def test_fp8_attention_without_fp8_tensor_cores_is_named():
    cfg = compose_config(["hardware.speed.attention=fp8"], hardware="cpu")
    with pytest.raises(WanOptError, match="attention=fp8 needs fp8 tensor cores"):
        check_device(cfg)


HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wan_opt.kernels.fp8_attention_triton import fp8_attention_kernel
types = dict(Q="*bf16", K="*bf16", VT="*i8", V_SCALE="*fp32", V_MEAN="*fp32", OUT="*bf16", n_ctx="i32",
             n_heads="i32", n_pad="i32", stride_ob="i32", stride_on="i32", stride_oh="i32", HEAD_DIM="constexpr",
             QK_SCALE="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr")
for config in fp8_attention_kernel.configs:
    source = ASTSource(fp8_attention_kernel.fn, types, dict(HEAD_DIM=128, QK_SCALE=0.1275, **config.kwargs))
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ptx = kernel.asm["ptx"]
    assert ".bf16.bf16" in ptx and ".s8.s8" in ptx, "Q K^T is not on bf16 operands or P V not on int8 ones"
    assert "cvt.rn.f32.s32" not in ptx, "an integer score converted on the conversion unit"
"""


NORM_ROPE_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wan_opt.kernels.qk_norm_rope import qk_norm_rope_kernel
types = dict(Q="*bf16", K="*bf16", WQ="*bf16", WK="*bf16", COS="*fp32", SIN="*fp32", QO="*bf16", KO="*bf16",
             n_tokens="i32", stride_qb="i64", stride_qn="i32", stride_kb="i64", stride_kn="i32", stride_c="i32",
             eps="fp32", HEADS="constexpr", HEAD_DIM="constexpr", BLOCK_H="constexpr")
triton.compile(ASTSource(qk_norm_rope_kernel, types, dict(HEADS=40, HEAD_DIM=128, BLOCK_H=64)),
               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
"""


@pytest.mark.parametrize("schedule", ["overlap", "turns"])
@pytest.mark.parametrize("triton_path", [None, *OTHER_TRITONS], ids=["installed", *OTHER_TRITONS])
def test_the_hopper_kernel_compiles_without_a_gpu(triton_path, schedule):
    """Gluon has no CPU interpreter: compiling for sm_90 checks its layouts, among them that P's relabelling
    moves no data (assert_trivial), before a GPU run: bf16 Q K^T and int8 P V on wgmma, the integer P V made a
    float by its bits, within Hopper's shared memory and without register spills. Gluon's API moves between
    releases: WAN_OPT_OTHER_TRITONS names folders that `pip install --no-deps --target` filled with other
    Tritons (e.g. 3.6, PyTorch 2.11's), each compiled on as well. In each of int8 P V's schedules
    (attention_hopper.SCHEDULES)."""
    report = compile_gluon_attention("int8", triton_path, schedule)
    assert report["wgmma"] == ["m64n128k16.f32.bf16.bf16", "m64n128k32.s32.s8.s8"], report
    assert not report["int_to_float"], "an integer converted on the conversion unit"
    assert report["shared"] <= SHARED_MEMORY and report["spills"] == 0, report


def test_every_tile_shape_compiles_for_hopper_without_a_gpu():
    """What the interpreter lets pass but the compiler refuses (types, globals) fails here, before a GPU run."""
    compile_for_hopper(HOPPER_COMPILE)


def test_the_norm_and_rotary_kernel_compiles_without_a_gpu():
    compile_for_hopper(NORM_ROPE_COMPILE)


def test_the_flashattention4_processor_hands_the_kernel_what_sdpa_would_get(monkeypatch):
    """On a CPU the kernel is stood in for by SDPA: the processor's projections, norms, rotary embedding and
    layout are diffusers', so the forward equals diffusers' own; cross-attention never reaches the kernel."""
    from wan_opt.optim import attention

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16,
                  out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    torch.manual_seed(3)
    model = WanTransformer3DModel(**config).eval()
    x, t, ctx = torch.randn(1, 16, 3, 8, 12), torch.tensor([700.0]), torch.randn(1, 16, 32)
    calls = []

    monkeypatch.setattr(attention, "flash4_attention", lambda q, k, v: calls.append(q.shape) or sdpa(q, k, v))
    with torch.no_grad():
        reference = model(x, t, ctx, return_dict=False)[0]
        assert attention.use_self_attention(model, attention.Flash4SelfAttnProcessor) == 2
        out = model(x, t, ctx, return_dict=False)[0]
    assert calls == [(1, 72, 2, 64)] * 2
    assert rel_l2(out, reference) < 1e-5


def test_the_flashattention4_op_has_a_shape_for_compile_without_the_library():
    """torch.compile traces the custom op through its fake implementation: the output is shaped like Q."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wan_opt.optim.attention import flash4_attention

    with FakeTensorMode():
        q = torch.empty(2, 72, 4, 64, dtype=torch.bfloat16)
        out = flash4_attention(q, torch.empty_like(q), torch.empty_like(q))
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize("hopper", [False, True])
def test_the_quantisation_kernels_match_the_pytorch_quantisation(hopper):
    """quantize_qkv's Triton kernels (a GPU's path) against its PyTorch arithmetic, on tokens that fill part of
    the last tile and values with an offset to smooth away: Q and K the same bf16 values, V's int8 the same but
    for a rare value at a rounding tie, the same scales and means."""
    from wan_opt.kernels.fp8_qkv import launch

    torch.manual_seed(3)
    q, k, v = (randn(2, 200, 3, 64) for _ in range(3))
    v = v + 5.0
    padded = 256
    ours = launch(q, k, v, padded, hopper)
    reference = kernel._quantize_qkv(q.float(), k.float(), v.float(), padded, hopper)  # the kernels compute in fp32
    bf16_ulp = 0 if DEVICE == "cuda" else 2 ** -7  # Triton's interpreter truncates to bf16, a GPU rounds
    for name, got, want in zip(("q", "k"), ours[:2], reference[:2]):
        assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), rtol=bf16_ulp, atol=0), name
    assert ours[2].dtype == torch.int8 and (ours[2] == reference[2]).float().mean().item() > 0.999
    assert (ours[2].int() - reference[2].int()).abs().max().item() <= 1
    for got, want in zip(ours[3:], reference[3:]):
        assert torch.allclose(got, want.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("heads, head_dim, fused", [(3, 64, False), (5, 128, True)])
def test_the_norm_and_rotary_kernel_matches_diffusers_arithmetic(heads, head_dim, fused):
    """The fp8 and FlashAttention-4 processors' Q and K: one kernel's RMSNorm over all heads and rotary embedding
    against diffusers' modules on the same rows (strided, as a fused QKV projection leaves them, or not)."""
    from types import SimpleNamespace

    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from wan_opt.kernels.qk_norm_rope import launch
    from wan_opt.optim.attention import norm_and_rotate_as_diffusers

    torch.manual_seed(0)
    cos, sin = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=32)(torch.zeros(2, 4, 3, 8, 6))
    tokens, width = cos.shape[1], heads * head_dim
    norms = [torch.nn.RMSNorm(width, eps=1e-6) for _ in range(2)]
    for norm in norms:
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    if fused:
        query, key, _ = randn(2, tokens, 3 * width).split(width, dim=-1)
    else:
        query, key = randn(2, tokens, width), randn(2, tokens, width)
    attn = SimpleNamespace(heads=heads, norm_q=norms[0], norm_k=norms[1])
    with torch.no_grad():
        want = norm_and_rotate_as_diffusers(attn, query.float().cpu(), key.float().cpu(), (cos, sin))
        got = launch(query, key, *(n.weight.to(DEVICE) for n in norms), cos.to(DEVICE), sin.to(DEVICE), 1e-6, heads)
    for expected, actual in zip(want, got):
        assert actual.shape == (2, tokens, width) and actual.is_contiguous()
        assert rel_l2(actual.float().cpu().unflatten(2, (heads, -1)), expected) < (1e-2 if DEVICE == "cuda" else 1e-5)

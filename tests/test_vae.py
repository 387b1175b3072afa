"""The VAE's speed (wan_opt.optim.vae): channels-last weights compute the same frames, and a float16 encode or
decode that overflows runs again in bf16 instead of giving a broken video."""
import copy
import logging

import pytest
import torch
from diffusers import AutoencoderKLWan

from wan_opt.bench.report import rel_l2
from wan_opt.loading.tiny import TINY_TI2V_VAE, TINY_VAE
from wan_opt.memory.policy import MemoryPolicy
from wan_opt.optim.speed import SpeedPolicy
from wan_opt.optim.vae import in_range, use_channels_last

LATENTS = (1, 16, 3, 8, 10)


def tiny_vae(config=TINY_VAE) -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**config).eval().requires_grad_(False)


def decode(vae, z):
    return in_range(vae, lambda: vae.decode(z.to(vae.dtype), return_dict=False)[0], "decode")


def decode_as_the_retry(vae, z):
    """The bf16 decode that a float16 VAE's retry runs: its float16 weights in bf16 (not the float32 ones, which
    differ where float16 rounded tiny weights), on a copy, so `vae` stays float16."""
    return decode(torch.nn.Module.to(copy.deepcopy(vae), torch.bfloat16), z)


@pytest.mark.parametrize("config", [TINY_VAE, TINY_TI2V_VAE], ids=["wan21_vae", "wan22_vae"])
def test_channels_last_weights_decode_the_same_frames(config):
    vae = tiny_vae(config)
    z = torch.randn(1, vae.config.z_dim, *LATENTS[2:])
    with torch.inference_mode():
        plain = decode(vae, z)
        use_channels_last(vae)
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
        assert rel_l2(decode(vae, z), plain) < 1e-5


def test_a_float16_decode_that_overflows_runs_again_in_bf16(caplog):
    vae = tiny_vae()
    z = torch.randn(LATENTS)
    with torch.inference_mode():
        exact = decode(vae, z)
        vae.to(torch.float16)
        in_bf16 = decode_as_the_retry(vae, z)
        # An activation past float16's 65,504 is inf, and NaN after the next norm: this one overflows in
        # float16 only, as a real one would.
        overflow = vae.decoder.mid_block.register_forward_hook(
            lambda _m, _a, out: out * float("inf") if out.dtype == torch.float16 else out)
        with caplog.at_level(logging.WARNING, logger="wan_opt.optim.vae"):
            frames = decode(vae, z)
        overflow.remove()
    assert "overflowed; it ran again in bfloat16" in caplog.text
    assert torch.isfinite(frames).all() and frames.dtype == torch.bfloat16
    assert torch.equal(frames, in_bf16) and rel_l2(frames.float(), exact) < 0.05
    assert vae.dtype == torch.float16  # the VAE is left as the profile asked


def test_a_float16_decode_in_range_runs_once_and_other_dtypes_are_not_watched(caplog):
    vae = tiny_vae()
    z = torch.randn(LATENTS)
    calls = []

    def counted():
        calls.append(vae.dtype)
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="wan_opt.optim.vae"):
        exact = in_range(vae, counted, "decode")
        vae.to(torch.float16)
        half = in_range(vae, counted, "decode")
    assert calls == [torch.float32, torch.float16]
    assert not [record for record in caplog.records if record.name == "wan_opt.optim.vae"]
    assert not vae.decoder._forward_hooks and not vae.encoder._forward_hooks  # the watch comes off
    assert rel_l2(half.float(), exact) < 0.02


def test_the_layout_is_left_alone_where_it_was_measured_in_the_other():
    """Channels last only for an untiled VAE on the GPU that stays there: a tiled decode and a released VAE (in
    pinned host memory between its calls) keep diffusers' layout, and a CPU run keeps PyTorch's."""
    for memory in (MemoryPolicy(), MemoryPolicy(vae_tiling=True), MemoryPolicy(vae_release=True)):
        vae = tiny_vae()
        SpeedPolicy().apply_to_vae(vae, memory)  # on the CPU: never
        assert not vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["t2v_a14b", "ti2v_5b"])
def test_float16_channels_last_decode_on_the_gpu_keeps_the_float32_decodes_rounding(family):
    """The full-size VAE (random weights) at a small size: the profiles' decode (float16, channels last) against
    float32 without TF32; benchmarks/vae_decode.py measures the same at 720p (0.2-0.34%). With fuse_vae on top, the
    decode is no further off."""
    from wan_opt.loading.arch import VAE_CONFIGS

    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLWan(**VAE_CONFIGS[family]).eval().requires_grad_(False)
    z = torch.randn(1, vae.config.z_dim, 3, 16, 16, device="cuda")
    with torch.inference_mode():
        exact = decode(vae, z)
        vae.to(torch.float16)
        SpeedPolicy().apply_to_vae(vae, MemoryPolicy())
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
        frames = decode(vae, z)
        SpeedPolicy(fuse_vae=True).apply_to_vae(vae, MemoryPolicy())
        fused = decode(vae, z)
    assert torch.isfinite(frames).all() and rel_l2(frames.float(), exact) < 0.01
    assert torch.isfinite(fused).all()
    assert rel_l2(fused.float(), exact) <= 1.05 * rel_l2(frames.float(), exact) + 1e-4


# -- fewer passes over the activations (fuse_vae) ----------------------------------------------------------------


def diffusers_norm_silu(x, norm):
    return torch.nn.functional.silu(norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("bias", [False, True])
def test_the_norm_silu_kernel_is_the_fp32_arithmetic_rounded_once(dtype, layout, bias):
    """The Triton kernel (Triton's interpreter on a CPU) against its PyTorch arithmetic, on 12 channels (not a
    power of two), positions of two videos, a position whose channels are all zero, either layout kept."""
    pytest.importorskip("triton", reason="the kernel is Triton code")
    from wan_opt.kernels.channel_norm import norm_silu
    from wan_opt.optim.vae import NORM_EPS, norm_silu_reference

    torch.manual_seed(1)
    x = torch.randn(2, 12, 3, 5, 7) * 4
    x[1, :, 2, 4, 6] = 0.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x = x.to(dtype)
    gamma, beta = torch.randn(12, 1, 1, 1), (torch.randn(12, 1, 1, 1) if bias else None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, gamma, beta = (t.to(device) if t is not None else None for t in (x, gamma, beta))
    ours = norm_silu(x, gamma, beta, 12 ** 0.5, NORM_EPS)
    reference = norm_silu_reference(x, gamma, beta, 12 ** 0.5)
    assert ours.dtype == dtype and ours.stride() == x.stride()
    ulp = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    assert torch.allclose(ours.float(), reference.float(), rtol=ulp, atol=ulp)
    assert bias or not ours[1, :, 2, 4, 6].any()  # no division by a zero norm


def test_the_fused_norm_is_nearer_float32_than_diffusers_float16_norm():
    """diffusers rounds a float16 norm four times (to float16 after normalising, after each product, after SiLU);
    the kernel's arithmetic once: never further from the float32 result."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from wan_opt.optim.vae import norm_silu_reference

    torch.manual_seed(2)
    norm = WanRMS_norm(96, images=False)
    norm.gamma.data.normal_(1.0, 0.3)
    x = torch.randn(1, 96, 2, 16, 16) * 3
    exact = diffusers_norm_silu(x, norm)
    theirs = diffusers_norm_silu(x.half(), norm.half()).float()
    ours = norm_silu_reference(x.half(), norm.gamma, None, norm.scale).float()
    assert rel_l2(ours, exact) <= rel_l2(theirs, exact) and rel_l2(ours, exact) < 1e-3


@pytest.mark.parametrize("config", [TINY_VAE, TINY_TI2V_VAE], ids=["wan21_vae", "wan22_vae"])
def test_a_fused_vae_decodes_and_encodes_as_before(config):
    """Every norm and its SiLU fused, every causal convolution padded in place, the upsampling in its dtype: the
    same frames and latents as diffusers' modules, the same weights under the same names."""
    from wan_opt.optim.vae import NormSiLU, fuse_vae

    plain, fused = tiny_vae(config), tiny_vae(config)
    counts = fuse_vae(fused)
    assert counts["norms"] > 0 and counts["convolutions"] > 0 and counts["upsamplings"] > 0
    assert fuse_vae(fused) == {"norms": 0, "convolutions": 0, "upsamplings": 0}  # once is all
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert sum(isinstance(m, NormSiLU) for m in fused.modules()) == counts["norms"]
    z = torch.randn(1, plain.config.z_dim, *LATENTS[2:])
    video = torch.randn(1, 3, 5, 64, 80)
    with torch.inference_mode():
        assert rel_l2(decode(fused, z), decode(plain, z)) < 1e-6
        assert rel_l2(fused.encode(video).latent_dist.mean, plain.encode(video).latent_dist.mean) < 1e-6


def test_fuse_vae_is_a_speed_knob_and_keeps_the_bf16_retry():
    """hardware.speed.fuse_vae applies it (off by default); a fused float16 VAE that overflows still runs again in
    bf16, the fused norms following the weights' dtype."""
    from wan_opt.optim.vae import NormSiLU

    vae = tiny_vae()
    SpeedPolicy().apply_to_vae(vae, MemoryPolicy())
    assert not any(isinstance(m, NormSiLU) for m in vae.modules())
    SpeedPolicy(fuse_vae=True).apply_to_vae(vae, MemoryPolicy())
    assert any(isinstance(m, NormSiLU) for m in vae.modules())
    z = torch.randn(LATENTS)
    with torch.inference_mode():
        vae.to(torch.float16)
        in_bf16 = decode_as_the_retry(vae, z)
        overflow = vae.decoder.mid_block.register_forward_hook(
            lambda _m, _a, out: out * float("inf") if out.dtype == torch.float16 else out)
        frames = decode(vae, z)
        overflow.remove()
    assert torch.equal(frames, in_bf16) and vae.dtype == torch.float16


NORM_SILU_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wan_opt.kernels.channel_norm import norm_silu_kernel
for dtype in ("fp16", "bf16", "fp32"):
    types = dict(X=f"*{dtype}", GAMMA=f"*{dtype}", BIAS=f"*{dtype}", Y=f"*{dtype}", n_rows="i64",
                 rows_per_batch="i64", channels="i32", stride_b="i64", stride_r="i64", stride_c="i64", scale="fp32",
                 eps="fp32", HAS_BIAS="constexpr", SILU="constexpr", BLOCK_R="constexpr", BLOCK_C="constexpr")
    for block_c in (16, 128, 512):
        triton.compile(ASTSource(norm_silu_kernel, types, dict(HAS_BIAS=False, SILU=True, BLOCK_R=8192 // block_c,
                                                                BLOCK_C=block_c)),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
"""


def test_the_norm_silu_kernel_compiles_for_hopper_without_a_gpu():
    from tests.sm90 import compile_for_hopper

    compile_for_hopper(NORM_SILU_COMPILE)

"""The VAE's speed (wan_opt.optim.vae): channels-last weights compute the same frames, and a float16 encode or
decode that overflows runs again in bf16 instead of giving a broken video."""
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
        vae.to(torch.bfloat16)
        in_bf16 = decode(vae, z)
        vae.to(torch.float16)
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
        SpeedPolicy().lay_out_vae(vae, memory)  # on the CPU: never
        assert not vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["t2v_a14b", "ti2v_5b"])
def test_float16_channels_last_decode_on_the_gpu_keeps_the_float32_decodes_rounding(family):
    """The full-size VAE (random weights) at a small size: the profiles' decode (float16, channels last) against
    float32 without TF32; benchmarks/vae_decode.py measures the same at 720p (0.2-0.34%)."""
    from wan_opt.loading.arch import VAE_CONFIGS

    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLWan(**VAE_CONFIGS[family]).eval().requires_grad_(False)
    z = torch.randn(1, vae.config.z_dim, 3, 16, 16, device="cuda")
    with torch.inference_mode():
        exact = decode(vae, z)
        vae.to(torch.float16)
        SpeedPolicy().lay_out_vae(vae, MemoryPolicy())
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
        frames = decode(vae, z)
    assert torch.isfinite(frames).all() and rel_l2(frames.float(), exact) < 0.01

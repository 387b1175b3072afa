"""WanOptPipeline against diffusers' WanPipeline on tiny random models (float32, CPU)."""
import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers.video_processor import VideoProcessor

from wan_opt.memory.policy import MemoryPolicy
from wan_opt.pipeline import FRAMES_PER_COPY, WanOptPipeline, host_frames
from wan_opt.video import pixels
from wan_opt.optim.speed import SpeedPolicy
from wan_opt.loading.tiny import build_tiny_components
from wan_opt.bench.report import rel_l2

CALL = dict(prompt="a red fox in the snow", negative_prompt="blurry, static", height=64, width=96, num_frames=9,
            num_inference_steps=6, guidance_scale=4.0, guidance_scale_2=3.0, output_type="np")


def diffusers_pipe(family: str) -> WanPipeline:
    components = build_tiny_components(seed=1, family=family)
    if family == "ti2v_5b":
        components.pop("transformer_2")
        return WanPipeline(**components, expand_timesteps=True)
    return WanPipeline(**components, boundary_ratio=0.875)


def run_both(pipe, wrapped, **overrides):
    call = {**CALL, **overrides}
    reference = pipe(**call, generator=torch.Generator().manual_seed(7)).frames
    ours = wrapped(**call, generator=torch.Generator().manual_seed(7)).frames
    return reference, ours


@pytest.mark.parametrize("family", ["t2v_a14b", "ti2v_5b"])
def test_matches_diffusers_wan_pipeline(family):
    pipe = diffusers_pipe(family)
    overrides = {"guidance_scale_2": None, "height": 64, "width": 64} if family == "ti2v_5b" else {}
    reference, ours = run_both(pipe, WanOptPipeline.from_diffusers(pipe), **overrides)
    assert ours.shape == reference.shape
    assert rel_l2(ours, reference) < 1e-5


def test_latents_match_diffusers_without_guidance():
    pipe = diffusers_pipe("t2v_a14b")
    reference, ours = run_both(pipe, WanOptPipeline.from_diffusers(pipe), guidance_scale=1.0,
                               guidance_scale_2=1.0, output_type="latent")
    assert rel_l2(ours, reference) < 1e-5


def test_batched_cfg_equals_sequential():
    pipe = diffusers_pipe("t2v_a14b")
    sequential = WanOptPipeline.from_diffusers(pipe)
    batched = WanOptPipeline.from_diffusers(pipe, speed=SpeedPolicy(cfg="batched"))
    a = sequential(**CALL, generator=torch.Generator().manual_seed(3), ).frames
    b = batched(**CALL, generator=torch.Generator().manual_seed(3)).frames
    assert rel_l2(b, a) < 1e-5


def test_same_seed_same_video_and_other_seed_differs():
    pipe = WanOptPipeline.from_diffusers(diffusers_pipe("t2v_a14b"))
    a = pipe(**CALL, generator=torch.Generator().manual_seed(5)).frames
    b = pipe(**CALL, generator=torch.Generator().manual_seed(5)).frames
    c = pipe(**CALL, generator=torch.Generator().manual_seed(6)).frames
    assert (a == b).all()
    assert rel_l2(c, a) > 1e-3


def test_experts_switch_at_the_boundary():
    pipe = WanOptPipeline.from_diffusers(diffusers_pipe("t2v_a14b"))
    seen = []
    for name, expert in (("high", pipe.transformer), ("low", pipe.transformer_2)):
        expert.register_forward_pre_hook(lambda m, args, kwargs, name=name: seen.append(
            (name, float(kwargs["timestep"].flatten()[0]))), with_kwargs=True)
    labels = []
    pipe(**CALL, generator=torch.Generator().manual_seed(0), on_step=lambda i, n, label, s: labels.append(label))
    boundary = 0.875 * 1000
    assert all(t >= boundary for name, t in seen if name == "high")
    assert all(t < boundary for name, t in seen if name == "low")
    assert {"high", "low"} == {name for name, _ in seen}
    assert len(seen) == 2 * CALL["num_inference_steps"]  # two forwards (CFG) per step
    assert labels == sorted(labels)  # all high-noise steps come first
    assert len(labels) == CALL["num_inference_steps"]


def test_guidance_is_per_expert():
    pipe = WanOptPipeline.from_diffusers(diffusers_pipe("t2v_a14b"))
    picks = [pipe.expert_for_timestep(torch.tensor(t), 4.0, 3.0) for t in (999.0, 875.0, 874.0, 10.0)]
    assert [(g, label) for _, g, label in picks] == [(4.0, "high_noise"), (4.0, "high_noise"),
                                                     (3.0, "low_noise"), (3.0, "low_noise")]


def test_stage_timings_are_reported():
    pipe = WanOptPipeline.from_diffusers(diffusers_pipe("t2v_a14b"))
    out = pipe(**CALL, generator=torch.Generator().manual_seed(0))
    assert set(out.stage_seconds) == {"text_encoding", "denoise_high_noise", "denoise_low_noise", "vae_decode"}
    assert len(out.step_seconds) == CALL["num_inference_steps"]
    assert all(s > 0 for s in out.stage_seconds.values())


@pytest.mark.parametrize("bad, message", [
    (dict(num_frames=10), r"4n\+1"), (dict(height=60), "multiples of 16"), (dict(num_inference_steps=0), "at least 1"),
    (dict(output_type="png"), "output_type must be one of np, uint8"),
])
def test_rejects_what_the_model_cannot_do(bad, message):
    pipe = WanOptPipeline.from_diffusers(diffusers_pipe("t2v_a14b"))
    with pytest.raises(ValueError, match=message):
        pipe(**{**CALL, **bad})


def test_host_frames_are_diffusers_frames_converted_a_few_at_a_time():
    # past the last chunk's edge, with values beyond [-1, 1] that both must clamp
    video = torch.randn(2, 3, 2 * FRAMES_PER_COPY + 1, 16, 24, generator=torch.Generator().manual_seed(0)) * 0.8
    before = video.clone()
    expected = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")
    floats, levels = host_frames(video, pixels=False), host_frames(video, pixels=True)
    assert floats.dtype == np.float32 and floats.shape == expected.shape == (2, 2 * FRAMES_PER_COPY + 1, 16, 24, 3)
    np.testing.assert_array_equal(floats, expected)
    assert levels.dtype == np.uint8 and levels.flags.c_contiguous
    np.testing.assert_array_equal(levels, pixels(expected))  # the rounding a video file gets from floats
    assert levels.min() == 0 and levels.max() == 255
    assert torch.equal(video, before)  # the VAE's output is read, not changed in place


def test_uint8_frames_are_the_videos_pixels():
    pipe = WanOptPipeline.from_diffusers(diffusers_pipe("t2v_a14b"))
    floats = pipe(**CALL, generator=torch.Generator().manual_seed(2)).frames
    levels = pipe(**{**CALL, "output_type": "uint8"}, generator=torch.Generator().manual_seed(2)).frames
    assert levels.dtype == np.uint8 and levels.shape == floats.shape
    np.testing.assert_array_equal(levels, pixels(floats))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_frames_from_the_gpu_equal_the_cpus():
    video = torch.randn(1, 3, 21, 72, 128, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    for as_pixels in (False, True):
        np.testing.assert_array_equal(host_frames(video.cuda(), as_pixels), host_frames(video, as_pixels))


def test_cpu_memory_policy_is_a_no_op_on_cpu():
    components = build_tiny_components(seed=1)
    policy = MemoryPolicy(experts="swap", text_encoder="gpu_release")
    assert policy.load_device("transformer_2", torch.device("cpu")).type == "cpu"
    pipe = WanOptPipeline.from_diffusers(WanPipeline(**components, boundary_ratio=0.875), memory=policy)
    assert pipe.expert_swapper is None


def test_fused_qkv_gives_the_same_video_with_no_extra_weights():
    from diffusers.models.transformers.transformer_wan import WanAttention

    pipe = diffusers_pipe("t2v_a14b")
    reference = WanOptPipeline.from_diffusers(pipe)(**CALL, generator=torch.Generator().manual_seed(3)).frames
    params = sum(p.numel() for p in pipe.transformer.parameters())
    fused = WanOptPipeline.from_diffusers(pipe, speed=SpeedPolicy(fuse_qkv=True))
    for expert in fused.experts():
        attentions = [m for m in expert.modules() if isinstance(m, WanAttention)]
        assert attentions and all(m.fused_projections for m in attentions)
        assert all(not hasattr(m, "to_k") for m in attentions)
    assert sum(p.numel() for p in pipe.transformer.parameters()) == params  # the separate layers are gone
    assert rel_l2(fused(**CALL, generator=torch.Generator().manual_seed(3)).frames, reference) < 1e-5


def test_fused_qkv_then_fp8_storage_quantizes_the_fused_layers():
    from wan_opt.optim.fp8 import Fp8Linear

    pipe = diffusers_pipe("t2v_a14b")
    ours = WanOptPipeline.from_diffusers(pipe, memory=MemoryPolicy(weight_dtype="float8_e4m3fn", compute_dtype="float32"),
                                         speed=SpeedPolicy(fuse_qkv=True))
    assert isinstance(ours.transformer.blocks[0].attn1.to_qkv, Fp8Linear)
    assert isinstance(ours.transformer.blocks[0].attn2.to_kv, Fp8Linear)
    assert ours(**CALL, generator=torch.Generator().manual_seed(3)).frames.shape[1] == CALL["num_frames"]

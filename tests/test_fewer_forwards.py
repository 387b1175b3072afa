"""CFG truncation and step caching: fewer denoiser forwards, the same hooks diffusers uses (tiny models, CPU)."""
import pytest
import torch
from diffusers import FirstBlockCacheConfig, WanPipeline

from tests.test_pipeline import rel_l2
from wan_opt.prepare import compose_config
from wan_opt.checks import check_knobs
from wan_opt.errors import WanOptError
from wan_opt.pipeline import WanOptPipeline
from wan_opt.optim.speed import SpeedPolicy
from wan_opt.loading.tiny import build_tiny_components

CALL = dict(prompt="a red fox in the snow", negative_prompt="blurry, static", height=64, width=96, num_frames=9,
            num_inference_steps=8, guidance_scale=4.0, guidance_scale_2=3.0, output_type="np")


def generate(speed: SpeedPolicy, **overrides):
    pipe = WanPipeline(**build_tiny_components(seed=1), boundary_ratio=0.875)
    ours = WanOptPipeline.from_diffusers(pipe, speed=speed)
    calls = []
    for expert in ours.experts():
        expert.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["encoder_hidden_states"]),
                                         with_kwargs=True)
    frames = ours(**{**CALL, **overrides}, generator=torch.Generator().manual_seed(5)).frames
    return frames, calls


def test_cfg_truncation_drops_the_unconditional_pass_of_the_last_low_noise_steps():
    full, full_calls = generate(SpeedPolicy())
    truncated, calls = generate(SpeedPolicy(cfg_truncation=0.25))
    assert len(full_calls) == 2 * CALL["num_inference_steps"]
    assert len(calls) == len(full_calls) - 2  # the last 2 of 8 steps run the conditional branch only
    assert 0 < rel_l2(truncated, full) < 0.2


def test_cfg_truncation_leaves_the_high_noise_expert_guided():
    speed = SpeedPolicy(cfg_truncation=0.9)
    assert speed.guidance_at(7, 8, 4.0, "high_noise") == 4.0
    assert speed.guidance_at(7, 8, 3.0, "low_noise") == 1.0
    assert speed.guidance_at(0, 8, 3.0, "low_noise") == 3.0
    assert SpeedPolicy().guidance_at(7, 8, 3.0, "low_noise") == 3.0


def test_first_block_cache_matches_diffusers_with_the_same_hooks():
    """Our loop sets the cache contexts as diffusers' WanPipeline does, so the cached results agree."""
    components = build_tiny_components(seed=1)
    reference_pipe = WanPipeline(**components, boundary_ratio=0.875)
    ours = WanOptPipeline.from_diffusers(reference_pipe, speed=SpeedPolicy(step_cache="first_block",
                                                                           step_cache_threshold=0.5))
    assert all(expert.is_cache_enabled for expert in ours.experts())
    cached = ours(**CALL, generator=torch.Generator().manual_seed(5)).frames
    again = ours(**CALL, generator=torch.Generator().manual_seed(5)).frames  # state is reset per call
    for expert in ours.experts():
        expert.disable_cache()
        expert.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    reference = reference_pipe(**CALL, generator=torch.Generator().manual_seed(5)).frames
    assert rel_l2(cached, reference) < 1e-5
    assert rel_l2(again, cached) < 1e-6


@pytest.mark.parametrize("step_cache", ["first_block", "taylorseer"])
def test_step_cache_changes_the_result_a_bounded_amount(step_cache):
    full, _ = generate(SpeedPolicy())
    cached, _ = generate(SpeedPolicy(step_cache=step_cache, step_cache_threshold=0.5, step_cache_interval=2))
    assert 0 < rel_l2(cached, full) < 0.5


def test_taylorseer_extrapolates_the_output_projection_alone():
    """Predicted steps skip every block and extrapolate the (small) output of proj_out: what the hooks keep per
    expert and branch stays a few latent-sized tensors, not two factors of every block's activations."""
    expert = build_tiny_components(seed=1)["transformer"]
    expert.enable_cache(SpeedPolicy(step_cache="taylorseer").cache_config())
    hooked = {name: module._diffusers_hook.get_hook("taylorseer_cache").state_manager._init_kwargs["is_inactive"]
              for name, module in expert.named_modules()
              if getattr(module, "_diffusers_hook", None) and "taylorseer_cache" in module._diffusers_hook.hooks}
    assert {name for name, skipped in hooked.items() if not skipped} == {"proj_out"}
    assert {name for name, skipped in hooked.items() if skipped} == {f"blocks.{i}" for i in range(len(expert.blocks))}


def test_a_tiny_threshold_reuses_nothing():
    full, _ = generate(SpeedPolicy())
    cached, _ = generate(SpeedPolicy(step_cache="first_block", step_cache_threshold=1e-9))
    assert rel_l2(cached, full) < 1e-6


@pytest.mark.parametrize("override, message", [
    ("hardware.speed.cfg_truncation=1.0", "cfg_truncation"),
    ("hardware.speed.step_cache=teacache", "step_cache"),
    ("hardware.speed.step_cache_threshold=0", "step_cache_threshold"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(WanOptError, match=message):
        check_knobs(compose_config([override], hardware="cpu"))


def test_the_passes_of_a_request_are_known_before_it_runs():
    pipe = WanPipeline(**build_tiny_components(seed=1), boundary_ratio=0.875)
    plain = WanOptPipeline.from_diffusers(pipe)
    assert plain.forwards_per_step(8, 4.0, 3.0) == [2] * 8
    assert plain.forwards_per_step(4, 1.0, 1.0) == [1] * 4  # the distilled preset: no guidance
    truncated = WanOptPipeline.from_diffusers(pipe, speed=SpeedPolicy(cfg_truncation=0.25))
    assert truncated.forwards_per_step(8, 4.0, 3.0) == [2] * 6 + [1] * 2  # the low-noise tail loses its branch


def block_runs(pipe: WanOptPipeline) -> list[int]:
    """Counts, per expert, of the forwards that ran its blocks (a skipped step does not reach their layers)."""
    counts = [0 for _ in pipe.experts()]
    for index, expert in enumerate(pipe.experts()):
        expert.blocks[-1].ffn.register_forward_hook(lambda *_, index=index: counts.__setitem__(index, counts[index] + 1))
    return counts


def magcache_pipe(ratios_file, **knobs) -> WanOptPipeline:
    pipe = WanPipeline(**build_tiny_components(seed=1), boundary_ratio=0.875)
    return WanOptPipeline.from_diffusers(pipe, speed=SpeedPolicy(step_cache="magcache",
                                                                 step_cache_ratios=str(ratios_file), **knobs))


def test_magcache_calibrates_each_expert_then_skips_steps_with_its_ratios(tmp_path):
    import json

    ratios_file = tmp_path / "ratios.json"
    full, _ = generate(SpeedPolicy())
    calibrating = magcache_pipe(ratios_file, step_cache_threshold=0.5)
    runs = block_runs(calibrating)
    first = calibrating(**CALL, generator=torch.Generator().manual_seed(5)).frames
    steps = [label for _, _, label in (calibrating.step_plan(i, t, 8, 4.0, 3.0)
                                       for i, t in enumerate(calibrating.scheduler.timesteps))]
    written = json.loads(ratios_file.read_text())
    assert written["steps"] == {"high_noise": steps.count("high_noise"), "low_noise": steps.count("low_noise")}
    assert rel_l2(first, full) < 1e-6 and runs == [2 * steps.count("high_noise"), 2 * steps.count("low_noise")]

    cached_pipe = magcache_pipe(ratios_file, step_cache_threshold=0.5)
    runs = block_runs(cached_pipe)
    cached = cached_pipe(**CALL, generator=torch.Generator().manual_seed(5)).frames
    assert sum(runs) < 2 * CALL["num_inference_steps"]  # some steps reused the blocks' residual
    assert 0 < rel_l2(cached, full) < 0.5
    again = cached_pipe(**CALL, generator=torch.Generator().manual_seed(5)).frames  # state is reset per call
    assert rel_l2(again, cached) < 1e-6


def test_magcache_stretches_the_ratios_to_each_experts_steps(tmp_path):
    import json

    ratios_file = tmp_path / "ratios.json"
    ratios_file.write_text(json.dumps({"ratios": {"high_noise": [1.0, 0.99], "low_noise": [1.0, 0.98, 0.97, 0.96]}}))
    pipe = magcache_pipe(ratios_file)
    plan = [pipe.step_plan(i, t, 8, 4.0, 3.0) for i, t in enumerate(pipe.scheduler.timesteps)]
    pipe.speed.begin_request(plan)
    for expert, label in ((pipe.transformer, "high_noise"), (pipe.transformer_2, "low_noise")):
        config = expert.blocks[0]._diffusers_hook.get_hook("mag_cache_leader_block_hook").config
        steps = sum(1 for _, _, step_label in plan if step_label == label)
        assert not config.calibrate and config.num_inference_steps == steps and len(config.mag_ratios) == steps


@pytest.mark.parametrize("overrides, message", [
    ([], "needs hardware.speed.step_cache_ratios"),
    (["hardware.speed.step_cache_ratios=/no/such/folder/r.json"], "does not exist"),
    (["hardware.speed.step_cache_ratios={bad}"], "is not a MagCache ratios file"),
    (["hardware.speed.step_cache_ratios={new}", "hardware.speed.cfg_truncation=0.25"], "use one of the two"),
])
def test_magcache_input_errors_are_sentences(overrides, message, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"ratios": {"high_noise": [1.0]}}')  # no list for the low-noise expert
    overrides = [o.format(bad=bad, new=tmp_path / "new.json") for o in overrides]
    with pytest.raises(WanOptError, match=message):
        check_knobs(compose_config(["model=tiny", "hardware.speed.step_cache=magcache", *overrides],
                                        hardware="cpu"))

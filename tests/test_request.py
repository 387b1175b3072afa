"""Bad requests are one clear sentence, raised before any weights load."""
import logging

import pytest

from wan_opt.prepare import compose_config, prepare
from wan_opt.errors import WanOptError
from wan_opt.request import nearest_valid_frames, parse_size


def request(*overrides, model="tiny"):
    return prepare(compose_config([f"model={model}", "prompt=a red fox", *overrides], hardware="cpu")).request


def test_defaults_come_from_the_model():
    # The full-size model planned on the CPU of a host with room for it (a 24 GB one is refused before loading).
    cfg = compose_config(["model=wan22_t2v_a14b", "prompt=a fox", "model.random_weights=true",
                          "hardware.memory.host_ram_gb=256"], hardware="cpu")
    req = prepare(cfg).request
    assert (req.steps, req.guidance, req.guidance_2, req.frames, req.fps) == (40, 4.0, 3.0, 81, 16)
    assert (req.width, req.height) == (1280, 720)


def test_run_knobs_override_the_model():
    req = request("steps=3", "guidance=2.5", "guidance_2=1.5", "frames=9", "size=96*160", "seed=11")
    assert (req.steps, req.guidance, req.guidance_2, req.frames, req.width, req.height, req.seed) == (
        3, 2.5, 1.5, 9, 96, 160, 11)


@pytest.mark.parametrize("frames, below, above", [(80, 77, 81), (82, 81, 85), (2, 1, 5)])
def test_frames_not_4n_plus_1_names_the_nearest_valid_counts(frames, below, above):
    assert nearest_valid_frames(frames) == (below, above)
    with pytest.raises(WanOptError, match=f"frames={below} or frames={above}"):
        request(f"frames={frames}")


@pytest.mark.parametrize("size", ["100*128", "128*70"])
def test_a_size_off_the_pixel_grid_is_rejected(size):
    with pytest.raises(WanOptError, match="16-pixel grid"):
        request(f"size={size}")


def test_ti2v_has_a_32_pixel_grid():
    cfg = compose_config(["model=wan22_ti2v_5b", "model.random_weights=true", "prompt=x", "size=1280*720"],
                         hardware="cpu")
    with pytest.raises(WanOptError, match="32-pixel grid"):
        prepare(cfg).request


def test_a_size_on_the_grid_but_not_official_runs_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        req = request("size=64*64")
    assert (req.width, req.height) == (64, 64)
    assert "not one of tiny's official sizes" in caplog.text


@pytest.mark.parametrize("size", ["1280", "wide", "1280*720*3"])
def test_a_malformed_size_is_rejected(size):
    with pytest.raises(WanOptError, match="W\\*H"):
        parse_size(size)


@pytest.mark.parametrize("override, message", [
    ("steps=0", "steps=0 is below 1"),
    ("guidance=-1", "guidance=-1.0 is negative"),
    ("guidance_2=-0.5", "guidance_2=-0.5 is negative"),
    ("prompt=", "prompt is empty"),
    ("prompt='   '", "prompt is empty"),
])
def test_bad_knobs_are_rejected(override, message):
    with pytest.raises(WanOptError, match=message):
        request(override)


def test_guidance_2_on_a_one_expert_model_is_rejected():
    cfg = compose_config(["model=wan22_ti2v_5b", "model.random_weights=true", "prompt=x", "guidance_2=3"],
                         hardware="cpu")
    with pytest.raises(WanOptError, match="only one expert"):
        prepare(cfg).request


def test_a_gpu_profile_without_a_gpu_is_rejected():
    with pytest.raises(WanOptError, match="needs a CUDA GPU"):
        prepare(compose_config(["prompt=x"], hardware="h100")).request


@pytest.mark.parametrize("ckpt, message", [(None, "needs its weights"), ("/nonexistent/wan", "not a directory")])
def test_a_missing_checkpoint_is_rejected(ckpt, message):
    overrides = ["model=wan22_t2v_a14b", "prompt=x"] + ([f"model.ckpt_dir={ckpt}"] if ckpt else [])
    with pytest.raises(WanOptError, match=message):
        prepare(compose_config(overrides, hardware="cpu")).request

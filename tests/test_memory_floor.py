"""benchmarks/memory_floor.py on the CPU: the checkpoints it writes, the runs its suite plans, what it removes."""
import importlib.util
import json
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_opt.loading import tiny
from wan_opt.loading.layouts import check_checkpoint
from wan_opt.pipeline import WanOptPipeline
from wan_opt.prepare import compose_config, plan_for, prepare

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("memory_floor", ROOT / "benchmarks" / "memory_floor.py")
floor = sys.modules.setdefault("memory_floor", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(floor)
TINY_TI2V = {"dit": tiny.TINY_TI2V_TRANSFORMER, "text_encoder": tiny.TINY_TEXT_ENCODER, "vae": tiny.TINY_TI2V_VAE}


def test_the_ti2v_checkpoint_it_writes_is_read_from_its_files(tmp_path):
    """The writer's TI2V-5B path at a tiny size: the Diffusers layout wan-opt recognises as TI2V-5B, loaded with the
    DiT and the text encoder read from the files, as the 12 GB run loads it."""
    folder = tmp_path / "wan-ti2v5b-random"
    floor.write_checkpoint(folder, floor.MODELS["ti2v5b"], "cpu", TINY_TI2V)
    assert check_checkpoint(folder, "ti2v_5b").family == "ti2v_5b" and floor.written_here(folder)
    assert not (folder / "transformer_2").exists()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["expand_timesteps"] and index["transformer_2"] == [None, None]
    overrides = ["model=wan22_ti2v_5b", f"model.ckpt_dir={folder}", "size=64*64", "frames=5",
                 "hardware.memory.idle_weights=checkpoint", "hardware.memory.text_encoder=cpu"]
    prepared = prepare(compose_config(overrides, hardware="cpu"), overrides, prompt_required=False)
    assert prepared.sizes.latent_channels == 48 and prepared.sizes.experts == 1
    pipe = WanOptPipeline.from_prepared(prepared)
    out = pipe("a red fox", height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), max_sequence_length=16)
    video = np.asarray(out.frames)
    assert video.shape == (1, 5, 64, 64, 3) and np.isfinite(video).all()


@pytest.mark.parametrize("key, profile, cap, host", [(key, *entry) for key, model in floor.MODELS.items()
                                                     for entry in model.suite])
def test_every_suite_run_plans_to_fit_and_names_its_record_as_the_test_expects(key, profile, cap, host):
    model = floor.MODELS[key]
    name = floor.record_name(model, profile, cap, host)
    assert name == f"e2e_{model.name}_{profile}_cap{cap:g}_host{host:g}_files.json"
    cfg = compose_config([f"model={model.name}", f"model.ckpt_dir={model.ckpt}", f"size={model.size}",
                          f"frames={model.frames}", f"hardware.memory.host_ram_gb={host}",
                          "hardware.speed.compile=none", *model.knobs], hardware=profile)
    plan, _ = plan_for(cfg, [])
    assert plan.fits and plan.vram_budget_gb <= cap
    if profile == "rtx_12gb":  # the 12 GB + 16 GB
        assert (model.name, model.size, model.frames, cap, host) == ("wan22_ti2v_5b", "1280*704", 121, 12, 16)
        assert plan.mechanisms["experts"] == "resident" and plan.mechanisms["text_encoder"] == "cpu"


def _record(model, profile, steps, reads=()):
    run = {"size": "1280*704", "frames": 121, "step_seconds": steps, "stage_seconds": {}, "reads": list(reads),
           "peak_gpu_gib": 9.0, "predicted_peak_gpu_gib": 9.28, "peak_reserved_gib": 9.5, "peak_host_gib": 12.0,
           "predicted_host_gib": 12.58, "finite": True}
    return {"model": model, "profile": profile, "cap_gb": 12, "plan": {"host_ram_gb": 16, "mechanisms": {}},
            "load_seconds": 1.0, "host_ram": "measured", "runs": [run]}


def test_the_summary_holds_every_record_beside_its_models_resident_plan(tmp_path):
    records = {"e2e_wan22_ti2v_5b_rtx_12gb_cap12_host16_files.json": _record("wan22_ti2v_5b", "rtx_12gb", [6.0, 4.0]),
               "e2e_wan22_ti2v_5b_h100_cap80_host32_files.json": _record("wan22_ti2v_5b", "h100", [3.0, 2.0]),
               "e2e_wan22_t2v_a14b_rtx_16gb_cap16_host32_files.json": _record(
                   "wan22_t2v_a14b", "rtx_16gb", [30.0], [{"role": "transformer", "stage": "denoise_high_noise",
                                                           "seconds": 4.0}]),
               "e2e_wan22_t2v_a14b_h100.json": _record("wan22_t2v_a14b", "h100", [1.0])}  # not this benchmark's
    for name, record in records.items():
        (tmp_path / name).write_text(json.dumps(record))
    runs = json.loads(floor.summarize(tmp_path, "test").read_text())["runs"]
    assert runs["wan22_ti2v_5b"]["rtx_12gb"]["step_ratio_to_resident"] == [2.0, 2.0]
    assert runs["wan22_t2v_a14b"]["rtx_16gb"]["step_ratio_to_resident"] is None  # no resident record here
    assert runs["wan22_t2v_a14b"]["rtx_16gb"]["read_seconds_in_steps"] == {"transformer": 4.0}
    assert set(runs["wan22_t2v_a14b"]) == {"rtx_16gb"}


def test_only_checkpoints_it_wrote_are_removed_to_make_room(tmp_path, monkeypatch):
    ours, theirs = tmp_path / "wan-a14b-random", tmp_path / "someone-elses"
    for folder in (ours, theirs):
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
    (ours / floor.MARKER).write_text("{}")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(floor.shutil, "disk_usage",
                        lambda path: usage(64 * 2**30, 0, (10 if ours.exists() else 30) * 2**30))
    target = tmp_path / "wan-ti2v5b-random"
    floor.make_room(target, floor.MODELS["ti2v5b"], [theirs, ours])
    assert not ours.exists() and theirs.exists()
    monkeypatch.setattr(floor.shutil, "disk_usage", lambda path: usage(64 * 2**30, 0, 10 * 2**30))
    with pytest.raises(SystemExit, match="GiB free"):
        floor.make_room(target, floor.MODELS["ti2v5b"], [theirs])
    assert theirs.exists()

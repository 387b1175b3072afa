"""The memory planner: predictions against what was measured, choices per budget, and its errors."""
import json
import logging
from pathlib import Path

import pytest

from wan_opt.app import run_job
from wan_opt.prepare import compose_config
from wan_opt.errors import WanOptError
from wan_opt.loading.arch import model_sizes
from wan_opt.memory.plan import Mechanisms, Request, plan_memory, predict
from wan_opt.prepare import plan_for, user_memory_knobs

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
A14B_720P = Request(1280, 720, 81)


def test_a14b_sizes_are_the_real_ones():
    sizes = model_sizes("t2v_a14b")
    assert sizes.expert_params_b == pytest.approx(14.29, abs=0.01)
    assert sizes.text_encoder_params_b == pytest.approx(5.68, abs=0.01)
    assert sizes.experts == 2 and sizes.spatial_compression == 16
    assert model_sizes("ti2v_5b").spatial_compression == 32 and model_sizes("ti2v_5b").experts == 1


@pytest.mark.parametrize("result", sorted(RESULTS.glob("e2e_*.json")), ids=lambda p: p.stem)
def test_predicted_peak_is_within_10_percent_of_the_measured_one(result, monkeypatch):
    record = json.loads(result.read_text())
    monkeypatch.setenv("WORLD_SIZE", str(record.get("gpus", 1)))  # a torchrun record is one GPU's peak
    cfg = compose_config([f"model={record['model']}", "model.random_weights=true", *record["overrides"],
                          "hardware.memory.host_ram_gb=128"], hardware=record["profile"])
    for run in record["runs"]:
        cfg.size, cfg.frames = run["size"], run["frames"]
        plan, _ = plan_for(cfg, [])
        assert plan.predicted_peak_gpu_gb == pytest.approx(run["peak_gpu_gib"], rel=0.10), run["size"]


@pytest.mark.parametrize("profile", ["h100", "h200", "a100_80gb", "a100_40gb", "l40s", "rtx_a6000", "rtx4090"])
def test_every_gpu_profile_runs_a14b_at_720p_as_written(profile):
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.host_ram_gb=128"], hardware=profile)
    plan, decided = plan_for(cfg, [])
    assert plan.fits and set(decided.values()) == {"profile"}


def test_80gb_makes_no_weight_transfers_and_24gb_still_runs_720p():
    assert plan_memory(model_sizes("t2v_a14b"), A14B_720P, 76, 128).mechanisms["experts"] in ("resident", "swap")
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.host_ram_gb=128"], hardware="h100")
    assert plan_for(cfg, [])[0].mechanisms["experts"] == "resident"
    small = plan_memory(model_sizes("t2v_a14b"), A14B_720P, 22, 64)
    assert small.fits and small.mechanisms["experts"] == "offload"


@pytest.mark.parametrize("budget, host", [(141, 256), (76, 128), (46, 128), (38, 128), (22, 64)])
def test_the_chosen_plan_fits_with_the_safety_margin(budget, host):
    plan = plan_memory(model_sizes("t2v_a14b"), A14B_720P, budget, host)
    assert plan.fits and plan.predicted_peak_gpu_gb <= 0.92 * budget and plan.predicted_host_gb <= 0.92 * host


def test_lossless_plans_come_before_fp8_storage():
    assert plan_memory(model_sizes("t2v_a14b"), A14B_720P, 38, 128).mechanisms["weight_dtype"] == "bfloat16"
    assert plan_memory(model_sizes("t2v_a14b"), A14B_720P, 22, 40).mechanisms["weight_dtype"] == "float8_e4m3fn"


def test_batched_cfg_needs_more_memory_than_sequential():
    sizes = model_sizes("t2v_a14b")
    one = predict(sizes, A14B_720P, Mechanisms(), "bfloat16", "float32", 80, 128)
    two = predict(sizes, Request(1280, 720, 81, batched_cfg=True), Mechanisms(), "bfloat16", "float32", 80, 128)
    assert two.stages["denoise_high_noise"] - one.stages["denoise_high_noise"] == pytest.approx(7.6, abs=0.2)


def test_a_budget_no_plan_fits_names_what_would_work():
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.vram_budget_gb=6",
                          "hardware.memory.host_ram_gb=128"], hardware="rtx4090")
    with pytest.raises(WanOptError, match=r"needs \d+\.\d GB of VRAM with \d+\.\d GB of host RAM.*nearest request that fits here: size=1280\*720 frames=\d+"):
        plan_for(cfg, [])


def test_a_knob_set_by_hand_wins_with_a_warning_when_it_does_not_fit(caplog):
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.experts=resident",
                          "hardware.memory.host_ram_gb=128"], hardware="a100_40gb")
    overrides = ["hardware.memory.experts=resident"]
    assert user_memory_knobs(overrides) == {"experts": "resident"}
    with caplog.at_level(logging.WARNING):
        plan, decided = plan_for(cfg, overrides)
    assert plan.mechanisms["experts"] == "resident" and decided["experts"] == "user" and not plan.fits
    assert "do not fit" in caplog.text


def test_the_planner_changes_a_profile_knob_that_does_not_fit():
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.host_ram_gb=128", "size=1280*720",
                          "hardware.memory.vram_budget_gb=60"], hardware="h100")
    plan, decided = plan_for(cfg, [])
    assert plan.fits and "planner" in decided.values()


def test_plan_true_writes_plan_json_without_loading_anything(tmp_path):
    cfg = compose_config(["model=wan22_t2v_a14b", "plan=true", f"output_dir={tmp_path}",
                          "hardware.memory.host_ram_gb=128"], hardware="rtx4090")
    path = run_job(cfg)
    plan = json.loads(path.read_text())
    assert {"fits", "predicted_peak_gpu_gb", "vram_budget_gb", "host_ram_gb", "mechanisms", "stages"} <= set(plan)
    assert plan["fits"] and plan["vram_budget_gb"] == 22
    assert {"encode", "denoise_high_noise", "denoise_low_noise", "switch", "decode"} == set(plan["stages"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_out_of_memory_falls_back_to_a_leaner_plan_and_says_so(tmp_path, monkeypatch):
    import torch

    from wan_opt.pipeline import WanOptPipeline

    real_call, calls = WanOptPipeline.__call__, []

    def first_call_runs_out(self, *args, **kwargs):
        calls.append(dict(self.memory.__dict__))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(WanOptPipeline, "__call__", first_call_runs_out)
    # The h100 profile's knobs on the CPU: planned as on the card, run on the tiny model.
    cfg = compose_config(["prompt=a fox", "steps=2", f"output_dir={tmp_path}", "hardware.memory.host_ram_gb=128",
                          "hardware.speed.compile=none"], hardware="h100")
    cfg.hardware.device = "cpu"
    cfg.model.family = "tiny"
    monkeypatch.setattr("wan_opt.checks.check_device", lambda cfg: None)
    path = run_job(cfg)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    [fallback] = sidecar["memory_plan"]["fallbacks"]
    assert fallback["from"]["experts"] == "resident" and "out of memory" in fallback["error"]
    assert calls[1]["experts"] != "resident" or calls[1]["text_encoder"] != calls[0]["text_encoder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.with_suffix(".json").name])


def _gpu_with_free(monkeypatch, free_gib):
    from wan_opt import hardware

    gpu = hardware.GPUInfo(index=0, name="NVIDIA H100 80GB HBM3", memory_gib=79.2, capability=(9, 0),
                           free_gib=free_gib)
    monkeypatch.setattr(hardware, "process_gpu", lambda gpus=None: gpu)


def test_a_shared_card_plans_to_its_free_memory(monkeypatch):
    _gpu_with_free(monkeypatch, 40.0)  # another process holds 39 GiB of this H100
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.host_ram_gb=128",
                          "hardware.memory.vram_budget_source=free"], hardware="h100")
    plan, decided = plan_for(cfg, [])
    assert plan.vram_budget_gb == pytest.approx(39.5) and plan.budget_source.startswith("free: 40.0 GiB free")
    assert plan.fits and plan.mechanisms["experts"] != "resident" and decided["experts"] == "planner"


def test_free_memory_never_raises_the_profiles_budget(monkeypatch):
    _gpu_with_free(monkeypatch, 79.0)
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.host_ram_gb=128",
                          "hardware.memory.vram_budget_source=free"], hardware="h100")
    plan, _ = plan_for(cfg, [])
    assert plan.vram_budget_gb == 76 and plan.budget_source.startswith("profile: below")
    assert plan_for(compose_config(["model=wan22_t2v_a14b"], hardware="h100"), [])[0].budget_source == "profile"


def test_unreadable_free_memory_falls_back_to_the_profile_with_a_warning(monkeypatch, caplog):
    from wan_opt import hardware

    monkeypatch.setattr(hardware, "process_gpu", lambda gpus=None: None)
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.host_ram_gb=128",
                          "hardware.memory.vram_budget_source=free"], hardware="h100")
    with caplog.at_level(logging.WARNING):
        plan, _ = plan_for(cfg, [])
    assert plan.vram_budget_gb == 76 and "cannot be read" in caplog.text

"""The memory planner: predictions against what was measured, choices per budget, and its errors."""
import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from wan_opt.app import run_job
from wan_opt.prepare import compose_config
from wan_opt.errors import WanOptError
from wan_opt.loading.arch import model_sizes
from wan_opt.memory.budget import CUDA_CONTEXT_GIB
from wan_opt.memory import plan as planner
from wan_opt.memory.plan import GIB, Mechanisms, Request, plan_memory, predict
from wan_opt.prepare import plan_for, user_memory_knobs

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
A14B_720P = Request(1280, 720, 81)


def test_a14b_sizes_are_the_real_ones():
    sizes = model_sizes("t2v_a14b")
    assert sizes.expert_params_b == pytest.approx(14.29, abs=0.01)
    assert sizes.text_encoder_params_b == pytest.approx(5.68, abs=0.01)
    assert sizes.experts == 2 and sizes.spatial_compression == 16
    assert model_sizes("ti2v_5b").spatial_compression == 32 and model_sizes("ti2v_5b").experts == 1


# profile -> (vae_dtype, vae_tiling) before the Hopper profiles' float16 decode, for the records made before it
VAE_BEFORE_FLOAT16 = {"h100": ("float32", True), "h200": ("float32", False)}
# Records made before the pipeline converted its frames on the device (their runs name no output_type) held the
# decoded video as diffusers' post-processing does: in float32, three times over.
FRAME_COPIES_BEFORE = 3


def frames_before_gib(req: Request) -> float:
    return req.width * req.height * req.frames * 3 * 4 * FRAME_COPIES_BEFORE / GIB


@pytest.mark.parametrize("result", sorted(RESULTS.glob("e2e_*.json")), ids=lambda p: p.stem)
def test_predicted_peak_is_within_10_percent_of_the_measured_one(result, monkeypatch):
    """GPU peaks of every record; host peaks (resident set) and the allocator's reserve where a record has them
    (benchmarks/memory_floor.py reads its weights from files written in a checkpoint layout)."""
    check_record(json.loads(result.read_text()), monkeypatch)


def ran_vae(record: dict) -> list[str]:
    """The VAE's dtype and tiling the record ran with, as overrides: a record carries its dtype; one from before it
    did ran its profile's VAE as it then was (the Hopper profiles decoded in float32 before their float16 decode)."""
    plan = record.get("plan", {})
    dtype, tiling = plan.get("vae_dtype"), plan.get("mechanisms", {}).get("vae_tiling")
    if dtype is None and record["profile"] in VAE_BEFORE_FLOAT16:
        dtype, before = VAE_BEFORE_FLOAT16[record["profile"]]
        tiling = before if tiling is None else tiling
    return [f"hardware.memory.{knob}={value}" for knob, value in (("vae_dtype", dtype), ("vae_tiling", tiling))
            if value is not None]


def check_record(record: dict, monkeypatch) -> None:
    """The plan a record's run would get now, against what it measured. Planned from the record alone: its model,
    profile, overrides, VAE, size and frames; its checkpoint need not be on this machine (a plan reads no files)."""
    monkeypatch.setenv("WORLD_SIZE", str(record.get("gpus", 1)))  # a torchrun record is one GPU's peak
    if not all("output_type" in run for run in record["runs"]):
        monkeypatch.setattr(planner, "frames_gib", frames_before_gib)
    weights = ([f"model.ckpt_dir={record['ckpt_dir']}"] if record.get("ckpt_dir") else ["model.random_weights=true"])
    host = [] if any(o.startswith("hardware.memory.host_ram_gb=") for o in record["overrides"]) else [
        "hardware.memory.host_ram_gb=128"]
    cfg = compose_config([f"model={record['model']}", *weights, *ran_vae(record), *record["overrides"], *host],
                         hardware=record["profile"])
    for run in record["runs"]:
        cfg.size, cfg.frames = run["size"], run["frames"]
        plan, _ = plan_for(cfg, [])
        assert plan.predicted_peak_gpu_gb == pytest.approx(run["peak_gpu_gib"], rel=0.10), run["size"]
        if "peak_host_gib" in run:
            # a record from before a knob existed ran with its default
            assert plan.mechanisms == {**asdict(Mechanisms()), **record["plan"]["mechanisms"]}
            assert plan.predicted_host_gb == pytest.approx(run["peak_host_gib"], rel=0.10), run["size"]
            # The budget leaves the card's last GiBs to the CUDA context and a desktop; the allocator's cache may
            # reach into them at the decode, never past the card less the context.
            assert run["peak_reserved_gib"] <= record["cap_gb"] - CUDA_CONTEXT_GIB, "the reserve outgrew the card"


def test_a_ti2v_5b_record_is_planned_with_its_own_model_size_and_frames(monkeypatch):
    """What benchmarks/memory_floor.py writes for TI2V-5B under a 12 GiB cap, with the planner's own figures as the
    measurements (so only the way a record is planned again is checked): its checkpoint is not on this machine."""
    plan = {"mechanisms": {"experts": "resident", "weight_dtype": "float8_e4m3fn", "text_encoder": "cpu",
                           "vae_tiling": True, "idle_weights": "checkpoint", "vae_release": True}}
    run = {"size": "1280*704", "frames": 121, "peak_gpu_gib": 9.84, "peak_host_gib": 12.63, "peak_reserved_gib": 10.5}
    record = {"model": "wan22_ti2v_5b", "profile": "rtx_12gb", "cap_gb": 12.0,
              "ckpt_dir": "/nonexistent/wan-ti2v5b-random",
              "overrides": ["hardware.memory.host_ram_gb=16", "hardware.speed.compile=none"], "gpus": 1,
              "plan": plan, "runs": [run]}
    check_record(record, monkeypatch)
    with pytest.raises((AssertionError, WanOptError)):  # planned as A14B, the same record is another plan
        check_record({**record, "model": "wan22_t2v_a14b"}, monkeypatch)
    with pytest.raises(AssertionError):  # and at fewer frames, another peak
        check_record({**record, "runs": [{**run, "frames": 61}]}, monkeypatch)


@pytest.mark.parametrize("profile", ["h100", "h200", "a100_80gb", "a100_40gb", "l40s", "rtx_a6000", "rtx4090",
                                     "rtx5090", "rtx3090", "rtx_16gb"])
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
    # 32 GB of host RAM holds one fp8 expert, not one bf16 expert beside the process and the decoded frames
    assert plan_memory(model_sizes("t2v_a14b"), A14B_720P, 22, 48).mechanisms["weight_dtype"] == "bfloat16"
    assert plan_memory(model_sizes("t2v_a14b"), A14B_720P, 22, 32).mechanisms["weight_dtype"] == "float8_e4m3fn"


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
    assert {"load", "encode", "denoise_high_noise", "denoise_low_noise", "switch", "decode"} == set(plan["stages"])
    assert set(plan["host_stages"]) == set(plan["stages"]) and plan["predicted_host_gb"] == max(
        plan["host_stages"].values())
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
    # The h100 profile's knobs on the CPU: planned as on the card, run on the tiny model. A tiled decode's fixed
    # working set makes the tiny model's first plan one that a leaner plan undercuts.
    cfg = compose_config(["prompt=a fox", "steps=2", f"output_dir={tmp_path}", "hardware.memory.host_ram_gb=128",
                          "hardware.speed.compile=none", "hardware.memory.vae_tiling=true"], hardware="h100")
    cfg.hardware.device = "cpu"
    cfg.model.family = "tiny"
    monkeypatch.setattr("wan_opt.checks.check_device", lambda cfg: None)
    path = run_job(cfg)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    [fallback] = sidecar["memory_plan"]["fallbacks"]
    assert sidecar["memory_plan"]["measured_peak_host_gib"] > 0.1  # the run's peak resident set beside the plan's
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


# -- the memory floor: the cards and the host RAM people have (docs/memory-floor.md) -------------------------


@pytest.mark.parametrize("profile, host, expected", [
    # the issue's 24 GB + 32 GB: one fp8 expert in host memory, the other read from the files at the boundary
    ("rtx4090", 32, {"experts": "offload", "weight_dtype": "float8_e4m3fn", "idle_weights": "checkpoint"}),
    ("rtx3090", 32, {"experts": "offload", "weight_dtype": "float8_e4m3fn", "idle_weights": "checkpoint"}),
    ("rtx_16gb", 32, {"experts": "offload", "weight_dtype": "float8_e4m3fn", "text_encoder": "gpu_release",
                      "idle_weights": "checkpoint"}),
    ("rtx_16gb", 64, {"experts": "offload", "weight_dtype": "bfloat16", "idle_weights": "checkpoint"}),  # lossless
    ("rtx5090", 32, {"experts": "swap", "weight_dtype": "float8_e4m3fn", "idle_weights": "checkpoint"}),
    ("rtx5090", 64, {"experts": "offload", "weight_dtype": "bfloat16", "text_encoder": "gpu"}),
    ("rtx4090", 128, {"experts": "offload", "idle_weights": "host"}),  # as written: both experts pinned, read once
])
def test_a14b_720p_runs_on_the_cards_and_host_ram_people_have(profile, host, expected):
    cfg = compose_config(["model=wan22_t2v_a14b", "size=1280*720", f"hardware.memory.host_ram_gb={host}"],
                         hardware=profile)
    plan, _ = plan_for(cfg, [])
    assert plan.fits and expected.items() <= plan.mechanisms.items()
    assert plan.predicted_peak_gpu_gb <= 0.92 * plan.vram_budget_gb and plan.predicted_host_gb <= 0.92 * host
    assert plan.predicted_host_gb == max(plan.host_stages.values())


def test_ti2v_5b_at_1280x704_runs_with_12_gb_of_vram_and_16_gb_of_host_ram():
    """The issue's 12 GB + 16 GB, with the profile named as the one command names it (rtx_12gb)."""
    cfg = compose_config(["model=wan22_ti2v_5b", "model.ckpt_dir=/models/Wan2.2-TI2V-5B", "size=1280*704",
                          "frames=121", "hardware.memory.host_ram_gb=16"], hardware="rtx_12gb")
    plan, decided = plan_for(cfg, [])
    assert plan.fits and plan.vram_budget_gb == 11.0
    assert plan.predicted_peak_gpu_gb <= 0.92 * 11.0 and plan.predicted_host_gb <= 0.92 * 16
    # the 5 B DiT resident in fp8 (4.7 GiB); UMT5-XXL encodes on the CPU, read for the encode and dropped; the
    # VAE (1.3 GiB) waits in host memory through the steps, whose per-token time embedding makes them the peak
    assert plan.mechanisms == {"experts": "resident", "weight_dtype": "float8_e4m3fn", "text_encoder": "cpu",
                               "vae_tiling": True, "idle_weights": "checkpoint", "vae_release": True}
    assert decided == {"experts": "planner", "weight_dtype": "planner", "text_encoder": "profile",
                       "vae_tiling": "profile", "idle_weights": "profile", "vae_release": "planner"}
    assert plan.host_stages["encode"] == plan.predicted_host_gb > plan.host_stages["denoise_high_noise"] + 8
    assert plan.stages["denoise_high_noise"] == plan.predicted_peak_gpu_gb
    assert plan.stages["denoise_high_noise"] - plan.stages["encode"] == pytest.approx(0.5 + 1.64 + 2.97, abs=0.05)
    assert plan.read_gb_per_request == pytest.approx(11.4, abs=0.1)  # the text encoder, nothing else
    # with 32 GB the profile stands as written: lossless, the bf16 DiT streamed block by block from one pinned copy
    cfg = compose_config(["model=wan22_ti2v_5b", "model.ckpt_dir=/models/Wan2.2-TI2V-5B", "size=1280*704",
                          "frames=121", "hardware.memory.host_ram_gb=32"], hardware="rtx_12gb")
    plan, decided = plan_for(cfg, [])
    assert plan.fits and set(decided.values()) == {"profile"}
    assert plan.mechanisms["experts"] == "offload" and plan.mechanisms["weight_dtype"] == "bfloat16"


def test_a14b_on_the_12gb_profile_needs_32_gb_of_host_ram_and_says_so():
    overrides = ["model=wan22_t2v_a14b", "model.ckpt_dir=/models/Wan2.2-T2V-A14B", "size=1280*720"]
    with pytest.raises(WanOptError) as error:
        plan_for(compose_config([*overrides, "hardware.memory.host_ram_gb=16"], hardware="rtx_12gb"), [])
    needs = float(re.search(r"with 11 GB of VRAM it needs (\d+\.\d) GB of host RAM", str(error.value))[1])
    assert 24 < needs <= 32
    plan, _ = plan_for(compose_config([*overrides, "hardware.memory.host_ram_gb=32"], hardware="rtx_12gb"), [])
    assert plan.fits and plan.predicted_host_gb <= 0.92 * 32
    assert {"experts": "offload", "weight_dtype": "float8_e4m3fn", "text_encoder": "cpu",
            "idle_weights": "checkpoint"}.items() <= plan.mechanisms.items()


def test_host_memory_is_planned_per_stage():
    sizes = model_sizes("t2v_a14b")
    fp8 = Mechanisms("offload", "float8_e4m3fn", "gpu_release", True, "host")
    kept = predict(sizes, A14B_720P, fp8, "bfloat16", "bfloat16", 22, 128)
    # loaded by the libraries, both experts are whole in bf16 before they are quantized: the load is the peak
    assert kept.host_stages["load"] == kept.predicted_host_gb > 2 * 26.5 + 10.5
    assert kept.host_stages["denoise_high_noise"] == pytest.approx(2.0 + 2 * 14 + 2 * 0.44 + 11, abs=0.1)
    read = predict(sizes, A14B_720P, Mechanisms(**{**asdict(fp8), "idle_weights": "checkpoint"}), "bfloat16",
                   "bfloat16", 22, 32)
    # one expert's pinned arena (14 GiB), and at the decode the decoded frames in float32, once (0.83 GiB at 720p x 81)
    assert read.host_stages["denoise_high_noise"] == pytest.approx(2.0 + 14 + 2 * 0.44, abs=0.1)
    assert read.host_stages["decode"] - read.host_stages["denoise_high_noise"] == pytest.approx(0.83, abs=0.01)
    assert read.predicted_host_gb == read.host_stages["encode"] == max(read.host_stages.values()) and read.fits
    # every request reads both fp32 experts and the bf16 text encoder again: 114.3 + 11.4 GB
    assert read.read_gb_per_request == pytest.approx(125.7, abs=0.1) and kept.read_gb_per_request == 0
    swap = predict(sizes, A14B_720P, Mechanisms("swap", "float8_e4m3fn", "gpu_release", True, "checkpoint"),
                   "bfloat16", "bfloat16", 30, 32)
    assert swap.predicted_host_gb < 5 and swap.stages["switch"] == pytest.approx(13.53 + 0.24, abs=0.05)


def test_the_issues_24_gb_and_32_gb_plan_no_longer_counts_on_host_ram_it_lacks():
    """At 32 GB the planner once put the text encoder on the GPU and both fp8 experts in host memory (27.1 GB
    predicted, the process not counted): the process, its pinned chunks and the decoded frames do not fit."""
    sizes = model_sizes("t2v_a14b")
    both = predict(sizes, A14B_720P, Mechanisms("offload", "float8_e4m3fn", "gpu", True, "host"), "bfloat16",
                   "bfloat16", 22, 32)
    assert not both.fits and both.predicted_host_gb > 0.92 * 32
    cfg = compose_config(["model=wan22_t2v_a14b", "hardware.memory.host_ram_gb=32"], hardware="rtx4090")
    plan, decided = plan_for(cfg, [])
    assert plan.fits and plan.mechanisms["idle_weights"] == "checkpoint" and decided["idle_weights"] == "planner"


def test_a_request_no_plan_fits_names_the_ram_and_vram_that_would_work():
    cfg = compose_config(["model=wan22_t2v_a14b", "size=1280*720", "hardware.memory.vram_budget_gb=10",
                          "hardware.memory.host_ram_gb=16"], hardware="rtx_16gb")
    with pytest.raises(WanOptError) as error:
        plan_for(cfg, [])
    text = str(error.value)
    assert re.search(r"with 10 GB of VRAM it needs \d+\.\d GB of host RAM", text)
    assert re.search(r"with 16 GB of host RAM \d+\.\d GB of VRAM", text)
    needs_host = float(re.search(r"it needs (\d+\.\d) GB of host RAM", text)[1])
    assert 16 < needs_host < 32  # one fp8 expert pinned and the process


def test_weights_without_files_never_wait_in_a_checkpoint():
    cfg = compose_config(["model=wan22_t2v_a14b", "model.random_weights=true", "hardware.memory.host_ram_gb=128"],
                         hardware="rtx_16gb")
    plan, decided = plan_for(cfg, [])
    assert plan.mechanisms["idle_weights"] == "host" and decided["idle_weights"] == "planner"
    overrides = ["hardware.memory.idle_weights=checkpoint"]
    with pytest.raises(WanOptError, match=r"idle_weights=checkpoint .* has no checkpoint files: pass "
                                          r"hardware.memory.idle_weights=host\."):
        plan_for(compose_config(["model=tiny", *overrides], hardware="cpu"), overrides)


def test_host_ram_is_the_cgroup_limit_where_one_is_set(tmp_path, monkeypatch):
    from wan_opt.memory import budget

    (tmp_path / "user.slice/run.scope").mkdir(parents=True)
    (tmp_path / "user.slice/run.scope/memory.max").write_text(f"{32 * 2**30}\n")
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "0::/user.slice/run.scope\n"
                        if str(self) == "/proc/self/cgroup" else real_read(self, *a, **k))
    assert budget.cgroup_memory_limit(tmp_path) == 32 * 2**30
    (tmp_path / "user.slice/run.scope/memory.max").write_text("max\n")
    assert budget.cgroup_memory_limit(tmp_path) is None


def test_a_released_vae_leaves_the_steps_and_waits_pinned_on_the_host():
    sizes = model_sizes("ti2v_5b")
    request = Request(1280, 704, 121, image_frames=1)
    kept, released = (predict(sizes, request, Mechanisms("resident", "float8_e4m3fn", "cpu", True, "checkpoint", r),
                              "bfloat16", "bfloat16", 11, 16) for r in (False, True))
    vae = sizes.vae_params_b * 1e9 * 2 / 2**30  # the Wan 2.2 VAE in bf16: 1.31 GiB
    for stage in ("load", "encode", "denoise_high_noise"):
        assert kept.stages[stage] - released.stages[stage] == pytest.approx(vae, abs=0.01)
    for stage in ("vae_encode", "decode"):  # on the GPU for its own calls
        assert released.stages[stage] == kept.stages[stage]
    for stage, gib in released.host_stages.items():  # pinned in 1 GiB chunks the whole time
        assert gib - kept.host_stages[stage] == pytest.approx(2.0)
    assert released.est_extra_seconds > kept.est_extra_seconds  # chosen only where it is needed
    assert plan_memory(model_sizes("t2v_a14b"), A14B_720P, 76, 128).mechanisms["vae_release"] is False


def test_per_token_timesteps_and_the_wan22_vae_are_counted_from_the_model():
    """TI2V-5B's time embedding per token and its VAE's larger decode are facts of the model, not of a profile."""
    a14b, ti2v = model_sizes("t2v_a14b"), model_sizes("ti2v_5b")
    assert not a14b.per_token_timesteps and ti2v.per_token_timesteps
    assert (a14b.width, ti2v.width) == (5120, 3072)
    assert (a14b.vae_decode_scale, ti2v.vae_decode_scale) == (1.0, 1.5)
    assert ti2v.text_encoder_embedding_params_b == pytest.approx(256384 * 4096 / 1e9)

"""A CPU smoke of the benchmark's code path on the tiny model (the benchmark itself runs on a GPU)."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wan_opt.loading.arch import A14B_EXPERT
from wan_opt.bench import forward_flops, main

# Decoded frames are compared as the 8-bit videos they make: equal floats up to 1e-7 still move the odd value
# across a rounding boundary, by one level.
SAME_VIDEO = 2e-4


def test_a14b_flops_match_the_baseline_arithmetic():
    # 720p x 81 = 75,600 tokens: ~6.5e15 FLOP per forward, 1.3e16 per CFG step (docs/measured.md, 'The FLOP floor').
    assert 2 * forward_flops(A14B_EXPERT, 75_600) == pytest.approx(1.3e16, rel=0.05)


def test_tiny_smoke_writes_a_report(tmp_path):
    truncated = "cpu,hardware.speed.cfg_truncation=0.5"
    # fp8 on the fused weights: the experts are shared, so every fp8 run after a fusing one is fused too
    fp8 = "cpu,hardware.memory.weight_dtype=float8_e4m3fn,hardware.speed.fp8_matmul=true,hardware.speed.fuse_qkv=true"
    fused = "cpu,hardware.speed.fuse_qkv=true"
    unguided = "cpu,guidance=1,guidance_2=1,steps=4"  # as the distilled preset runs: one forward a step
    cached = "cpu,hardware.speed.step_cache=first_block"  # its hooks stay on for the reference forward
    runs = [fp8, "cpu", fused, "h100", truncated, unguided, cached]
    assert main(["--tiny", "--profiles", *runs, "--steps", "3", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("bench_tiny-cpu_*.json")
    report = json.loads(path.read_text())
    # Runs that rewrite the shared experts go last whatever their place on the command line: fusing, then fp8.
    assert list(report["runs"]) == ["diffusers", "cpu", "h100", truncated, unguided, cached, fused, fp8]
    lossless = {k: v for k, v in report["runs"].items() if k not in (truncated, fp8, unguided, cached)}
    for name, run in lossless.items():
        assert len(run["step_seconds"]) == 3 and run["seconds_per_cfg_step"] > 0 and run["speedup"] > 0
        assert {"text_encoding", "vae_decode"} <= set(run["stage_seconds"])
        # Same modules, same inputs: every profile's frames equal diffusers' on the CPU (no kernels change there),
        # but for the h100 profile's float16 decode, in its own copy of the VAE: the runs after it decode in float32.
        assert run["frames_rel_l2"] < (1e-2 if name == "h100" else SAME_VIDEO) and run["forward_rel_l2"] < 1e-6
    assert report["runs"]["h100"]["frames_rel_l2"] > 1e-5
    # A knob that drops forwards is reported with its deviation, which is no longer zero.
    assert report["runs"][truncated]["frames_rel_l2"] > 1e-4
    assert 1e-4 < report["runs"][fp8]["forward_rel_l2"] < 0.1
    # Whole requests are extrapolated to each run's own step count (the tiny model's 8, or the run's).
    assert report["runs"]["diffusers"]["request_steps"] == 8 and report["runs"][unguided]["request_steps"] == 4
    # ... and to its own passes: 2 a guided step, 1 an unguided one, CFG truncation's tail included.
    assert report["runs"]["diffusers"]["request_forwards"] == 16 and report["runs"][unguided]["request_forwards"] == 4
    assert report["runs"][truncated]["request_forwards"] < 16
    assert report["failed"] == {}
    table = path.with_suffix(".md").read_text()
    assert all(f"| `{name}` |" in table for name in report["runs"]) and "extrapolated" in table
    chart = path.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chart.unlink()
    path.with_suffix(".md").unlink()
    assert main(["--replot", str(path)]) == 0  # chart and table again from the report alone
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.with_suffix(".md").read_text() == table


@pytest.mark.parametrize("profiles, says", [
    (["nosuch"], "Could not find 'hardware/nosuch': choose one of a100_40gb,"),
    (["cpu,model=nosuch"], "Could not find 'model/nosuch': choose one of tiny,"),
    (["cpu,hardware.speed.nokey=1"], "There is no setting 'hardware.speed.nokey'"),
    (["cpu,hardware.speed.attention=bogus"], "hardware.speed.attention=bogus is not one of"),
    # fusing QKV rewrites the shared experts, and fp8 storage too: no order gives both runs what they ask
    (["cpu,hardware.memory.weight_dtype=float8_e4m3fn", "cpu,hardware.speed.fuse_qkv=true"],
     "cannot be unfused: benchmark them in separate commands."),
])
def test_bad_profiles_get_one_sentence_before_anything_is_built(profiles, says, tmp_path, capsys, monkeypatch):
    import wan_opt.bench.measure as bench

    monkeypatch.setattr(bench, "build", lambda *a: pytest.fail("built before the profiles were checked"))
    assert main(["--tiny", "--profiles", *profiles, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_no_decode_compares_latents_and_skips_the_vae(tmp_path):
    assert main(["--tiny", "--profiles", "cpu", "--steps", "2", "--no-decode", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("bench_tiny-cpu_*.json")
    report = json.loads(path.read_text())
    assert report["frames_rel_l2_of"] == "latents"
    assert all("vae_decode" not in run["stage_seconds"] for run in report["runs"].values())
    assert report["runs"]["cpu"]["frames_rel_l2"] < 1e-5


def test_image_to_video_runs_against_diffusers_image_pipeline(tmp_path):
    """--model wan22_i2v_a14b: the same code path on tiny_i2v, against diffusers' WanImageToVideoPipeline, every run
    starting from the same generated picture; the VAE encode is its own stage, taken out of the first step."""
    fast_like = "cpu,hardware.memory.weight_dtype=float8_e4m3fn,hardware.speed.fp8_matmul=true"
    runs = ["cpu", "cpu,hardware.speed.cfg=batched", fast_like]
    assert main(["--tiny", "--model", "wan22_i2v_a14b", "--profiles", *runs, "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("bench_tiny-cpu_wan22_i2v_a14b_*.json")
    report = json.loads(path.read_text())
    assert report["reference"] == "WanImageToVideoPipeline" and report["model"] == "wan22_i2v_a14b"
    assert report["failed"] == {}
    for name, run in report["runs"].items():
        assert {"text_encoding", "vae_encode", "vae_decode"} <= set(run["stage_seconds"]), name
        assert run["request_steps"] == 8 and run["request_forwards"] == 16  # tiny_i2v: 8 guided steps
    for name in runs[:2]:  # lossless: diffusers' frames from the same image and weights
        assert report["runs"][name]["frames_rel_l2"] < SAME_VIDEO and report["runs"][name]["forward_rel_l2"] < 1e-6
    assert 1e-4 < report["runs"][fast_like]["forward_rel_l2"] < 0.1
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("image", [False, True], ids=["text", "first_frame"])
def test_ti2v_5b_runs_against_diffusers_with_a_timestep_per_token(tmp_path, image):
    """--model wan22_ti2v_5b on tiny_ti2v (one DiT, the Wan 2.2 VAE): against diffusers' WanPipeline with
    expand_timesteps, or with --image its WanImageToVideoPipeline from the benchmark's picture; one guidance, so
    diffusers gets no guidance_scale_2 (which it refuses for one expert). Text and image runs keep their own
    files."""
    argv = ["--tiny", "--model", "wan22_ti2v_5b", "--profiles", "cpu", "cpu,hardware.speed.cfg=batched",
            "--steps", "2", "--out", str(tmp_path)]
    assert main(argv + (["--image"] if image else [])) == 0
    [path] = tmp_path.glob("bench_tiny-cpu_wan22_ti2v_5b_*.json")
    assert ("_image_" in path.name) == image
    report = json.loads(path.read_text())
    assert report["reference"] == ("WanImageToVideoPipeline" if image else "WanPipeline")
    assert report["failed"] == {}
    for name, run in report["runs"].items():
        assert ("vae_encode" in run["stage_seconds"]) == image, name
        assert run["stage_seconds"]["denoise"] > 0, name  # one expert: the stage the chart draws as denoising
        assert run["request_steps"] == 8 and run["request_forwards"] == 16  # tiny_ti2v: 8 guided steps
        if name != "diffusers":
            assert run["frames_rel_l2"] < SAME_VIDEO and run["forward_rel_l2"] < 1e-6, name


def test_image_for_a_text_only_model_is_one_sentence(tmp_path, capsys):
    assert main(["--tiny", "--image", "--profiles", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image: --model wan22_t2v_a14b makes video from text alone") and len(
        err.splitlines()) == 1


def test_a_whole_request_is_measured_beside_its_extrapolation(tmp_path):
    """--steps 8 is the tiny model's own request: every run's whole timed call is the request, measured."""
    assert main(["--tiny", "--profiles", "cpu", "--steps", "8", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("bench_tiny-cpu_*.json")
    report = json.loads(path.read_text())
    for name, run in report["runs"].items():
        assert run["steps"] == run["request_steps"] == 8, name
        assert run["request_seconds_measured"] == run["total_seconds"], name
        # the same stages, summed rather than timed as one call: close, not equal
        assert run["request_seconds_measured"] == pytest.approx(run["request_seconds_extrapolated"], rel=0.5), name
    cpu = report["runs"]["cpu"]
    assert cpu["request_speedup_measured"] == pytest.approx(
        report["runs"]["diffusers"]["request_seconds_measured"] / cpu["request_seconds_measured"], rel=1e-2)
    assert cpu["frames_rel_l2"] < SAME_VIDEO
    assert "s measured (" in path.with_suffix(".md").read_text()


def test_baseline_steps_measure_the_profiles_request_and_extrapolate_diffusers(tmp_path):
    assert main(["--tiny", "--profiles", "cpu", "--baseline-steps", "2", "--steps", "8", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("bench_tiny-cpu_*.json")
    report = json.loads(path.read_text())
    base, cpu = report["runs"]["diffusers"], report["runs"]["cpu"]
    assert report["baseline_steps"] == 2 and report["steps"] == 8
    assert len(base["step_seconds"]) == 2 and len(cpu["step_seconds"]) == 8
    assert base["request_seconds_measured"] is None and base["request_seconds_extrapolated"] > 0
    assert cpu["request_seconds_measured"] == cpu["total_seconds"] and cpu["request_speedup_measured"] is None
    # per step against per step; frames 2 steps apart say nothing of the kernels, the forward still does
    assert cpu["speedup"] > 0 and cpu["frames_rel_l2"] is None and cpu["forward_rel_l2"] < 1e-6
    assert "not compared" in report["frames_rel_l2_null"]
    table = path.with_suffix(".md").read_text()
    assert "8 steps (diffusers: 2)" in table and "not compared" in table and "| - |" in table


def test_baseline_vae_tiling_tiles_diffusers_decode_alone(tmp_path, monkeypatch):
    """--baseline-vae-tiling: diffusers' decode in tiles (its untiled 720p decode does not fit an 80 GB card beside
    both experts), the profiles' VAE as their plans leave it, and the report saying so."""
    from wan_opt.bench import measure
    tiled = {}

    def spy(name, run):
        def wrapped(pipe, *args, **kwargs):
            tiled[name] = pipe.vae.use_tiling
            return run(pipe, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(measure, "baseline", spy("diffusers", measure.baseline))
    monkeypatch.setattr(measure, "profile_run", spy("cpu", measure.profile_run))
    for name in [k for k in os.environ if k.startswith("WAN_OPT_")]:  # the test's own switch alone
        monkeypatch.delenv(name)
    monkeypatch.setenv("WAN_OPT_HOPPER_SCHEDULE", "overlap")  # a process-wide kernel switch: recorded with the command
    assert main(["--tiny", "--profiles", "cpu", "--steps", "2", "--baseline-vae-tiling", "--out", str(tmp_path)]) == 0
    assert tiled == {"diffusers": True, "cpu": False}
    [path] = tmp_path.glob("bench_tiny-cpu_*.json")
    report = json.loads(path.read_text())
    assert report["baseline_vae_tiling"] is True and report["environment"]["WAN_OPT_HOPPER_SCHEDULE"] == "overlap"
    table = path.with_suffix(".md").read_text()
    assert "Diffusers decoded in tiles" in table and "`WAN_OPT_HOPPER_SCHEDULE=overlap python -m wan_opt.bench" in table


@pytest.mark.parametrize("argv, says", [
    (["--baseline-steps", "0"], "--baseline-steps 0: a run needs at least one step."),
    (["--steps", "-1"], "--steps -1: a run needs at least one step."),
    (["--profiles", "nosuch", "--detach"], "Could not find 'hardware/nosuch'"),  # checked before detaching
])
def test_bad_steps_and_detached_requests_fail_in_the_foreground(argv, says, tmp_path, capsys, monkeypatch):
    import wan_opt.bench.detached as detached
    import wan_opt.bench.measure as bench

    monkeypatch.setattr(bench, "build", lambda *a: pytest.fail("built before the request was checked"))
    monkeypatch.setattr(detached.subprocess, "Popen", lambda *a, **k: pytest.fail("detached a bad request"))
    assert main(["--tiny", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_detach_returns_at_once_and_collect_reports_the_run_then_its_result(tmp_path, capsys, monkeypatch):
    import wan_opt
    import wan_opt.bench.detached as bench

    # the child imports this checkout's wan_opt, wherever pytest was started
    root = str(Path(wan_opt.__file__).parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "results"
    assert main(["--tiny", "--profiles", "cpu", "--steps", "2", "--out", str(out), "--detach"]) == 0
    [record] = out.glob("bench_detached_*.json")
    started = json.loads(record.read_text())
    assert "--detach" not in started["command"] and started["command"][1:3] == ["-m", "wan_opt.bench"]
    try:
        # returned while the child still imports torch: it runs, in a session of its own (no terminal's hang-up)
        assert os.getsid(started["pid"]) == started["pid"] != os.getsid(0)
        assert main(["--collect", str(out)]) == 3
        assert "still running" in capsys.readouterr().out
        deadline = time.monotonic() + 120
        while (code := main(["--collect", str(out)])) == 3 and time.monotonic() < deadline:
            time.sleep(1)
        said = capsys.readouterr().out
        assert code == 0, said + Path(started["log"]).read_text()
        assert "finished" in said and "| `cpu` |" in said and "| `diffusers` |" in said
        assert record.exists()  # records stay
    finally:  # the child is this process's: stopped where the test failed before it ended, and reaped
        if bench.still_running(started):
            os.kill(started["pid"], 9)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(started["pid"], 0)


def test_collect_reports_a_run_that_ended_without_a_result(tmp_path, capsys):
    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: its pid is gone
    command = [sys.executable, "-m", "wan_opt.bench", "--tiny"]
    # a pid that ended, and a live pid that is not the benchmark (a pid reused by another program)
    for name, pid in (("gone", ended.pid), ("reused", os.getpid())):
        log = tmp_path / f"bench_detached_{name}.log"
        log.write_text("loading\nTraceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
        (tmp_path / f"bench_detached_{name}.json").write_text(json.dumps(
            {"detached": True, "pid": pid, "command": command, "cwd": str(tmp_path), "log": str(log),
             "started": "2026-01-01T00:00:00", "host": socket.gethostname()}))
    assert main(["--collect", str(tmp_path)]) == 1
    said = capsys.readouterr().out
    assert said.count("ended without a result") == 2 and "still running" not in said
    assert said.count("RuntimeError: CUDA out of memory") == 2

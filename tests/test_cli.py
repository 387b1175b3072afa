"""The command line end to end, in subprocesses, with the tiny model on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
A100_40GB = [["NVIDIA A100-SXM4-40GB", 40960, [8, 0], "GPU-5a1d0c2e-77b3-4e0f-9b1a-3c4d5e6f7a8b"]]
pytestmark = pytest.mark.slow


def run(*args, fake_gpus=None, timeout=240):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if fake_gpus is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "nvml_stub"), str(REPO)])
        env["WAN_OPT_FAKE_NVML"] = json.dumps(fake_gpus)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def videos(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.mp4"))


def assert_one_sentence(result, message: str) -> None:
    """Exit status 2 and one line on stderr: `error: ` and a sentence containing `message`."""
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_a_run_writes_a_video_and_its_sidecar(tmp_path):
    result = run("model=tiny", "prompt=a red fox", "seed=4", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    [mp4] = videos(tmp_path)
    with imageio.get_reader(mp4) as reader:
        assert reader.count_frames() == 17
    sidecar = json.loads(mp4.with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red fox" and sidecar["seed"] == 4
    assert sidecar["negative_prompt"].startswith("色调艳丽")
    assert sidecar["hardware"]["profile"] == "cpu" and "auto-detected" in sidecar["hardware"]["why"]
    assert {"text_encoding", "denoise_high_noise", "denoise_low_noise", "vae_decode"} <= set(sidecar["seconds"])
    assert {"torch", "diffusers", "transformers", "hydra"} <= set(sidecar["versions"])
    assert sidecar["config"]["model"]["name"] == "tiny"
    assert not [p for p in tmp_path.rglob(".*partial*")]
    assert yaml.safe_load((tmp_path / ".hydra" / "overrides.yaml").read_text())[0] == "hardware=cpu"


def test_detected_profile_is_recorded_as_a_hydra_choice():
    result = run("prompt=x", "--cfg", "hydra", fake_gpus=A100_40GB)
    assert result.returncode == 0, result.stderr
    hydra_cfg = yaml.safe_load(result.stdout)["hydra"]
    assert hydra_cfg["runtime"]["choices"]["hardware"] == "a100_40gb"
    assert "hardware=a100_40gb" in hydra_cfg["overrides"]["task"]


def test_help_shows_how_to_run_and_every_profile():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert 'python run.py prompt="a red fox running through snow"' in result.stdout
    assert "hardware: a100_40gb, a100_80gb" in result.stdout and "mode: fast, lossless" in result.stdout


def test_an_explicit_profile_wins_over_detection():
    result = run("prompt=x", "hardware=h200", "--cfg", "job", fake_gpus=A100_40GB)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["hardware"]["name"] == "h200"


def test_multirun_over_three_profiles(tmp_path):
    # GPU profiles run here with their device set to the CPU: the sweep machinery and every profile's
    # policies are exercised; the kernels they pick on a GPU are not.
    result = run("-m", "model=tiny", "prompt=a red fox", "hardware=cpu,h100,rtx4090", "hardware.device=cpu",
                 "steps=2", f"hydra.sweep.dir={tmp_path}", timeout=400)
    assert result.returncode == 0, result.stderr
    profiles = sorted(json.loads(p.with_suffix(".json").read_text())["hardware"]["profile"]
                      for p in videos(tmp_path))
    assert profiles == ["cpu", "h100", "rtx4090"]


def test_multirun_records_the_detected_profile_in_every_job(tmp_path):
    result = run("-m", "model=tiny", "prompt=a fox", "seed=1,2", "steps=1", "hardware.device=cpu",
                 f"hydra.sweep.dir={tmp_path}", fake_gpus=A100_40GB, timeout=400)
    assert result.returncode == 0, result.stderr
    overrides = sorted(tmp_path.glob("*/.hydra/overrides.yaml"))
    assert len(overrides) == 2
    for path in overrides:
        assert "hardware=a100_40gb" in yaml.safe_load(path.read_text())
        hydra_cfg = yaml.safe_load((path.parent / "hydra.yaml").read_text())["hydra"]
        assert hydra_cfg["runtime"]["choices"]["hardware"] == "a100_40gb"
    reused = [json.loads(p.with_suffix(".json").read_text())["model_reused"] for p in videos(tmp_path)]
    assert reused == [False, True]  # the second job changed only the seed


@pytest.mark.parametrize("args, message", [
    (["frames=80"], "frames=77 or frames=81"),
    (["size=100*128"], "16-pixel grid"),
    (["steps=0"], "steps=0 is below 1"),
    (["guidance=-2"], "negative"),
    (["prompt="], "prompt is empty"),
    (["model=wan22_t2v_a14b", "model.ckpt_dir=/nonexistent"], "not a directory"),
    (["hardware=h100"], "needs a CUDA GPU"),
])
def test_bad_input_is_one_sentence_and_a_nonzero_exit(tmp_path, args, message):
    result = run("prompt=a fox", *args, f"hydra.run.dir={tmp_path}")
    assert_one_sentence(result, message)
    assert "Traceback" not in result.stderr and not videos(tmp_path)


def test_an_unwritable_output_directory_is_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("prompt=a fox", f"output_dir={blocker}/videos", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and "Cannot write to the output directory" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["hardware=h1000"], "Could not find 'hardware/h1000': choose one of a100_40gb,"),
    (["model=wan99"], "Could not find 'model/wan99': choose one of tiny,"),
    (["hardware.memroy.experts=swap"], "There is no setting 'hardware.memroy'"),
    (["seed=abc"], "seed=abc is not valid"),
    (["prompt=a (red) fox"], "quote a value"),
    (["-m", "seed=1,abc"], "seed=abc is not valid"),
])
def test_a_config_hydra_cannot_compose_is_one_sentence(tmp_path, args, message):
    flags, overrides = [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]
    result = run(*flags, "prompt=a fox", "model=tiny", *overrides, f"hydra.run.dir={tmp_path}",
                 f"hydra.sweep.dir={tmp_path}")
    assert_one_sentence(result, message)
    assert not videos(tmp_path)


def test_a_prompt_file_is_one_batch_with_one_loaded_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red fox", "seed": 1}\n{"prompt": "a cat", "frames": 10}\n'
                       '{"prompt": "a dog", "seed": 2, "size": "160*96"}\n')
    result = run("model=tiny", "hardware=cpu", f"prompts={prompts}", "steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1  # one line failed; the others ran
    sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in videos(tmp_path / "run")]
    assert [(s["prompt"], s["seed"], s["model_reused"]) for s in sidecars] == [
        ("a red fox", 1, False), ("a dog", 2, True)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["total"], summary["failed"]) == (3, 1) and "4n+1" in summary["results"][1]["error"]


def test_a_failed_job_does_not_stop_the_sweep(tmp_path):
    result = run("-m", "model=tiny", "hardware=cpu", "prompt=a fox", "steps=1", "frames=10,9",
                 f"hydra.sweep.dir={tmp_path}", timeout=400)
    assert result.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["failed", "ok"] and len(videos(tmp_path)) == 1

"""`pip install .` gives a `wan-opt` command that works from any folder, with the config tree inside."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not the checkout
    return target / "bin" / "wan-opt", env


def test_the_config_tree_ships_inside_the_package(installed):
    command, env = installed
    site = command.parent.parent
    assert (site / "wan_opt" / "conf" / "config.yaml").is_file()
    assert {p.stem for p in (site / "wan_opt" / "conf" / "hardware").glob("*.yaml")} >= {"h100", "rtx4090", "cpu"}


def test_help_from_another_folder(installed, tmp_path):
    command, env = installed
    result = subprocess.run([str(command), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "hardware: " in result.stdout and "wan22_t2v_a14b" in result.stdout


def test_a_tiny_run_from_another_folder(installed, tmp_path):
    command, env = installed
    result = subprocess.run([str(command), "model=tiny", "prompt=a red fox", "steps=1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "outputs").rglob("*.mp4"))) == 1


def test_a_profile_kept_outside_the_package(installed, tmp_path):
    command, env = installed
    (tmp_path / "my-conf" / "hardware").mkdir(parents=True)
    profile = (REPO / "conf" / "hardware" / "h100.yaml").read_text().replace("name: h100", "name: my_gpu")
    (tmp_path / "my-conf" / "hardware" / "my_gpu.yaml").write_text(profile)
    result = subprocess.run([str(command), "--config-dir", str(tmp_path / "my-conf"), "hardware=my_gpu",
                             "prompt=x", "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "name: my_gpu" in result.stdout


def test_the_web_page_ships_inside_the_package(installed, tmp_path):
    command, env = installed
    static = command.parent.parent / "wan_opt" / "serve" / "static"
    assert {"index.html", "app.js", "charts.js", "compare.js", "panels.js", "app.css"} <= {p.name for p in static.iterdir()}
    result = subprocess.run([str(command), "serve", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--port" in result.stdout and "--no-form" in result.stdout

"""Comparing two renders of one prompt and seed: metrics, the three output files, and the CLI's errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from wan_opt.compare import compare_videos, main
from wan_opt.errors import WanOptError
from wan_opt.video import write_video

REPO = Path(__file__).resolve().parents[1]
FPS = 8


def smooth(n=6, h=32, w=48):
    """Gradients that move: H.264 keeps them well, so the added noise dominates the difference."""
    y, x = np.mgrid[0:h, 0:w] / np.float32(max(h, w))
    return np.stack([np.stack([(x + t / 10) % 1, y, (x + y) / 2], axis=-1) for t in range(n)]).astype(np.float32)


def noisy(frames, sigma):
    return np.clip(frames + np.random.default_rng(1).normal(0, sigma, frames.shape), 0, 1)


def clip(path, frames):
    return write_video(frames, path, FPS)


def decoded(path):
    with imageio.get_reader(path) as reader:
        return np.stack([frame for frame in reader])  # not list(reader): its len() is inf


def test_the_same_frames_written_twice_decode_identically(tmp_path):
    # The premise of the "identical" tests: H.264 is lossy, but deterministic for the same input.
    a, b = clip(tmp_path / "a.mp4", smooth()), clip(tmp_path / "b.mp4", smooth())
    assert np.array_equal(decoded(a), decoded(b))


@pytest.mark.parametrize("same_file", [True, False])
def test_identical_clips_give_infinite_psnr_and_ssim_one(tmp_path, same_file):
    a = clip(tmp_path / "a.mp4", smooth())
    b = a if same_file else clip(tmp_path / "b.mp4", smooth())
    result = compare_videos(a, b, tmp_path / "out")
    assert result.psnr == [math.inf] * 6 and result.psnr_mean == math.inf
    assert all(abs(s - 1) < 1e-6 for s in result.ssim) and abs(result.ssim_mean - 1) < 1e-6
    data = json.loads(result.metrics.read_text(), parse_constant=pytest.fail)  # strict JSON: no Infinity/NaN
    assert data["psnr_db"] == [None] * 6 and data["psnr_db_mean"] is None
    diff_panel = decoded(result.side_by_side)[:, :, 96:]
    assert diff_panel.mean() < 2  # black up to encoding noise


def test_more_noise_gives_lower_scores(tmp_path):
    a = clip(tmp_path / "a.mp4", smooth())
    little, more = (compare_videos(a, clip(tmp_path / f"n{s}.mp4", noisy(smooth(), s)), tmp_path)
                    for s in (0.03, 0.15))
    for r in (little, more):
        assert all(math.isfinite(p) for p in r.psnr) and math.isfinite(r.psnr_mean)
        assert all(s < 1 for s in r.ssim)
    assert more.psnr_mean < little.psnr_mean < 60
    assert more.ssim_mean < little.ssim_mean < 1
    assert all(m < l for m, l in zip(more.psnr, little.psnr)) and all(m < l for m, l in zip(more.ssim, little.ssim))


@pytest.mark.parametrize("other, shapes", [
    (smooth(n=5), "6 frames of 48x32 pixels but .* 5 frames of 48x32"),
    (smooth(w=64), "6 frames of 48x32 pixels but .* 6 frames of 64x32"),
])
def test_mismatched_clips_are_refused_before_writing_anything(tmp_path, other, shapes):
    a, b = clip(tmp_path / "a.mp4", smooth()), clip(tmp_path / "b.mp4", other)
    with pytest.raises(WanOptError, match=shapes):
        compare_videos(a, b, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_unreadable_files_are_named(tmp_path):
    a = clip(tmp_path / "a.mp4", smooth())
    with pytest.raises(WanOptError, match="nope.mp4: there is no such file"):
        compare_videos(a, tmp_path / "nope.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(WanOptError, match=r"Cannot read the video .*junk.mp4 \(.*\); pass an mp4"):
        compare_videos(tmp_path / "junk.mp4", a)


def test_outputs_go_next_to_a_by_default_and_are_valid(tmp_path):
    a = clip(tmp_path / "run-fast.mp4", noisy(smooth(), 0.05))
    (tmp_path / "ref").mkdir()
    b = clip(tmp_path / "ref" / "run-ref.mp4", smooth())
    r = compare_videos(a, b)
    stem = "compare_run-fast_vs_run-ref"
    assert (r.plot, r.side_by_side, r.metrics) == (tmp_path / f"{stem}.png", tmp_path / f"{stem}_side_by_side.mp4",
                                                   tmp_path / f"{stem}_metrics.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary files left behind
        ["ref", "run-fast.mp4", f"{stem}.png", f"{stem}_side_by_side.mp4", f"{stem}_metrics.json"])

    assert r.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(r.plot) as image:
        assert image.format == "PNG" and image.mode in ("RGB", "RGBA") and image.width > 100

    with imageio.get_reader(r.side_by_side) as reader:
        assert reader.count_frames() == 6
        assert reader.get_data(0).shape == (32, 3 * 48, 3)
        assert reader.get_meta_data()["fps"] == FPS

    data = json.loads(r.metrics.read_text(), parse_constant=pytest.fail)
    assert data["shape"] == {"frames": 6, "height": 32, "width": 48} and data["fps"] == FPS
    assert data["psnr_db"] == pytest.approx(r.psnr) and data["ssim"] == pytest.approx(r.ssim)
    assert data["a"] == str(a.resolve()) and data["b"] == str(b.resolve())
    assert data["worst_ssim_frame"] == int(np.argmin(r.ssim))


def test_main_returns_2_and_prints_one_line_on_user_errors(tmp_path, capsys):
    assert main([str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot read the video") and err.count("\n") == 1


def cli(*args):
    return subprocess.run([sys.executable, "-m", "wan_opt.compare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_prints_the_table(tmp_path):
    a, b = clip(tmp_path / "a.mp4", smooth()), clip(tmp_path / "b.mp4", noisy(smooth(), 0.05))
    result = cli(a, b, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "PSNR (dB)" in result.stdout and "SSIM" in result.stdout and "worst frame" in result.stdout
    assert len(list((tmp_path / "out").iterdir())) == 3


@pytest.mark.slow
def test_cli_refuses_mismatched_clips_with_one_line(tmp_path):
    a, b = clip(tmp_path / "a.mp4", smooth()), clip(tmp_path / "b.mp4", smooth(n=4))
    (tmp_path / "out").mkdir()
    result = cli(a, b, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "6 frames" in result.stderr and "4 frames" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_overall_psnr_pools_the_squared_error_over_frames():
    from wan_opt.compare import pooled_psnr

    assert pooled_psnr([math.inf, 20.0]) == pytest.approx(20.0 + 10 * math.log10(2))  # mse 0 and 0.01 -> 0.005
    assert pooled_psnr([math.inf, math.inf]) == math.inf

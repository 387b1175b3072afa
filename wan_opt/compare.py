"""Compare two videos of the same prompt and seed, e.g. made under a fast profile and a reference one.

`python -m wan_opt.compare A.mp4 B.mp4 [--out DIR]` writes, next to A unless --out says otherwise:
  compare_<A>_vs_<B>.png               PSNR and SSIM per frame
  compare_<A>_vs_<B>_side_by_side.mp4  A | B | |A - B| amplified x4
  compare_<A>_vs_<B>_metrics.json      per-frame and overall values
PSNR of identical frames is infinite: `inf` in the table, `null` in the JSON. The overall PSNR is that of the
mean squared error over all frames (infinite only when every frame is identical); the overall SSIM is the
mean over frames.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from wan_opt.errors import WanOptError
from wan_opt.video import new_figure, write_figure, write_json, write_video

CHUNK = 8               # frames per torchmetrics call: a few hundred MB of SSIM temporaries at 832x480, not GBs
DIFF_GAIN = 4           # small differences are invisible unamplified
PSNR_CEILING_DB = 100.0  # where the plot draws infinite PSNR (identical frames)


def pooled_psnr(per_frame_db: list[float]) -> float:
    """PSNR of the whole clip: from the mean of the frames' squared errors (data range 1), not their dB."""
    mse = float(np.mean([10.0 ** (-db / 10.0) for db in per_frame_db]))
    return float("inf") if mse == 0.0 else float(-10.0 * np.log10(mse))


@dataclass
class ComparisonResult:
    psnr: list[float]   # dB per frame; inf where the frames are identical
    ssim: list[float]
    psnr_mean: float
    ssim_mean: float
    plot: Path
    side_by_side: Path
    metrics: Path


def read_video(path: Path) -> tuple[np.ndarray, float]:
    """All frames as uint8 (F, H, W, 3), and the frame rate."""
    import imageio.v2 as imageio

    if not path.is_file():
        raise WanOptError(f"Cannot read the video {path}: there is no such file, so pass the path of an existing mp4.")
    try:
        with imageio.get_reader(path) as reader:
            fps = float(reader.get_meta_data().get("fps", 16.0))
            frames = [np.asarray(f, dtype=np.uint8)[..., :3] for f in reader]
    except Exception as exc:  # imageio/ffmpeg raise many types; ffmpeg's text is multi-line, keep its first line
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WanOptError(f"Cannot read the video {path} ({detail}); pass an mp4 that plays.") from exc
    if not frames:
        raise WanOptError(f"The video {path} has no frames; pass an mp4 that plays.")
    return np.stack(frames), fps


def _check_same_shape(a: Path, fa: np.ndarray, b: Path, fb: np.ndarray) -> None:
    if fa.shape != fb.shape:
        def shape(f: np.ndarray) -> str:
            return f"{f.shape[0]} frames of {f.shape[2]}x{f.shape[1]} pixels"
        raise WanOptError(f"{a} has {shape(fa)} but {b} has {shape(fb)}; compare two videos rendered with the "
                          f"same size and frame count.")


def _metrics_and_panels(fa: np.ndarray, fb: np.ndarray, psnr: list[float], ssim: list[float]) -> Iterator[np.ndarray]:
    """The A | B | diff frames as uint8 pixels, chunk by chunk, appending each chunk's per-frame PSNR and SSIM.

    A generator, so that ffmpeg (another process) encodes one chunk while the next one's SSIM is computed.
    """
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    for i in range(0, fa.shape[0], CHUNK):
        a, b = fa[i:i + CHUNK], fb[i:i + CHUNK]
        ta = torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255)
        tb = torch.from_numpy(b).permute(0, 3, 1, 2).float().div_(255)
        psnr += peak_signal_noise_ratio(ta, tb, data_range=1.0, reduction="none", dim=(1, 2, 3)).tolist()
        ssim += structural_similarity_index_measure(ta, tb, data_range=1.0, reduction="none").tolist()
        diff = np.minimum(np.abs(a.astype(np.int16) - b) * DIFF_GAIN, 255).astype(np.uint8)
        yield from np.concatenate([a, b, diff], axis=2)


def _write_plot(psnr: list[float], ssim: list[float], a: Path, b: Path, path: Path) -> Path:
    fig = new_figure(10, 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    clipped = np.minimum(np.asarray(psnr), PSNR_CEILING_DB)
    top.plot(clipped, marker=".")
    if np.any(np.asarray(psnr) >= PSNR_CEILING_DB):
        top.axhline(PSNR_CEILING_DB, color="grey", linestyle="--",
                    label=f"ceiling: PSNR above {PSNR_CEILING_DB:g} dB (inf = identical frame) drawn here")
        top.legend(loc="lower right")
    top.set_ylabel("PSNR (dB)")
    bottom.plot(ssim, marker=".", color="tab:orange")
    bottom.set_ylabel("SSIM")
    bottom.set_xlabel("frame")
    fig.suptitle(f"{a.name} vs {b.name}")
    return write_figure(fig, path)


def compare_videos(a: Path, b: Path, out_dir: Path | None = None) -> ComparisonResult:
    a, b = Path(a), Path(b)
    fa, fps = read_video(a)
    fb, _ = read_video(b)
    _check_same_shape(a, fa, b, fb)
    n, h, w, _ = fa.shape
    out = Path(out_dir) if out_dir is not None else a.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WanOptError(f"Cannot create the output folder {out} ({exc.strerror}): pass --out (out_dir=) a "
                          f"writable folder.") from exc
    stem = f"compare_{a.stem}_vs_{b.stem}"
    plot, video, metrics = out / f"{stem}.png", out / f"{stem}_side_by_side.mp4", out / f"{stem}_metrics.json"
    psnr: list[float] = []
    ssim: list[float] = []
    try:  # all three or none: a half set would pass for a finished comparison
        # A diagnostic clip: x264's "veryfast" preset encodes it several times faster than the default.
        write_video(_metrics_and_panels(fa, fb, psnr, ssim), video, fps, preset="veryfast")
        result = ComparisonResult(psnr, ssim, pooled_psnr(psnr), float(np.mean(ssim)), plot, video, metrics)
        _write_plot(psnr, ssim, a, b, plot)
        write_json({
            "a": str(a.resolve()), "b": str(b.resolve()), "fps": fps,
            "shape": {"frames": n, "height": h, "width": w},
            "psnr_db": psnr, "ssim": ssim,  # write_json: infinite PSNR (identical frames) as null
            "psnr_db_mean": result.psnr_mean, "ssim_mean": result.ssim_mean,
            "worst_psnr_frame": int(np.argmin(psnr)), "worst_ssim_frame": int(np.argmin(ssim)),
            "note": "psnr_db is null where PSNR is infinite (identical frames); means are over frames.",
            "outputs": {"plot": str(plot), "side_by_side": str(video)},
        }, metrics)
    except BaseException:
        for path in (plot, video, metrics):
            path.unlink(missing_ok=True)
        raise
    return result


def _fmt(x: float, fmt: str) -> str:
    return "inf" if np.isinf(x) else fmt.format(x)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m wan_opt.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="first mp4, e.g. rendered under the reference profile")
    parser.add_argument("b", type=Path, help="second mp4 of the same prompt and seed, e.g. under a fast mode")
    parser.add_argument("--out", type=Path, help="folder for the plot, side-by-side mp4 and JSON (default: A's)")
    args = parser.parse_args(argv)
    try:
        r = compare_videos(args.a, args.b, args.out)
    except WanOptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = Table(title=f"{args.a.name} vs {args.b.name}, {len(r.psnr)} frames", title_justify="left")
    for column in ("metric", "overall (mean)", "worst frame", "worst value"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    rows = (("PSNR (dB)", r.psnr, r.psnr_mean, "{:.2f}"), ("SSIM", r.ssim, r.ssim_mean, "{:.4f}"))
    for name, values, mean, fmt in rows:
        worst = int(np.argmin(values))
        table.add_row(name, _fmt(mean, fmt), str(worst), _fmt(values[worst], fmt))
    Console().print(table)
    print(f"saved {r.plot}, {r.side_by_side} and {r.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

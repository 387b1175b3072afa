"""Writing the mp4 and its JSON sidecar atomically: a file has its final name only once it is complete."""
from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from wan_opt.errors import WanOptError


def safe_stem(text: str, max_len: int = 48) -> str:
    """A file-name stem safe on every OS and in ffmpeg: ASCII letters, digits, '-' and '_' only."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9]+", "-", ascii_text).strip("-").lower()
    return stem[:max_len].rstrip("-") or "video"


def unique_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/stem.suffix`, or `stem-2`, `stem-3`, ... when an earlier video already has that name."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


def check_writable(folder: Path) -> None:
    """Fail now, not after minutes of denoising, if the output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".wan-opt-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WanOptError(f"Cannot write to the output directory {folder} ({exc.strerror}): "
                          f"pass output_dir= a writable folder.") from exc


def _partial(path: Path) -> Path:
    # Same extension, so ffmpeg still picks the container from the name; the dot keeps it out of listings.
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def write_video(frames: Iterable[np.ndarray], path: Path, fps: float, preset: str | None = None) -> Path:
    """Encode `frames` ((H, W, 3) each, floats in [0, 1] or uint8 pixels; an (F, H, W, 3) array or any
    iterable, e.g. a generator that computes them while ffmpeg encodes the previous ones) as H.264 mp4,
    verify it reads back, then give it its name. `preset` is x264's speed/size trade-off (None: ffmpeg's
    default, "medium")."""
    import imageio.v2 as imageio

    tmp = _partial(path)
    count = 0
    try:
        extra = {"ffmpeg_params": ["-preset", preset]} if preset else {}
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                ffmpeg_log_level="error", **extra) as writer:
            for frame in frames:
                pixels = frame if frame.dtype == np.uint8 else (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
                writer.append_data(pixels)
                count += 1
        with imageio.get_reader(tmp) as reader:
            written = reader.count_frames()
        if written != count:
            raise OSError(f"the encoder wrote {written} of {count} frames")
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise WanOptError(f"Writing the video {path} failed ({exc}); nothing was saved under that name.") from exc
    return path


def write_json(data: dict[str, Any], path: Path) -> Path:
    tmp = _partial(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WanOptError(f"Writing {path} failed ({exc.strerror}).") from exc
    return path


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas: no pyplot state, no display, the caller's backend untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def write_figure(fig, path: Path) -> Path:
    tmp = _partial(path)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WanOptError(f"Writing {path} failed ({exc.strerror}).") from exc
    return path

"""Writing videos and their JSON sidecars so that nothing made is lost and nothing half-made stays.

- A file takes its final name only once it is complete: it is written as a hidden temporary in the same folder,
  flushed to disk, then renamed.
- `save` names a video and its sidecar under a reservation (`.<name>.reserved`, created with O_EXCL), so any
  number of processes saving the same name into one folder keep every pair (`name`, `name-2`, ...), each
  sidecar beside its own video. The sidecar is placed before the video; a failure or an interrupt removes both.
- ffmpeg runs as a child in its own session (a Ctrl-C at the terminal reaches wan-opt, which decides); unless it
  finished cleanly it is killed and waited on.
docs/failures.md states these guarantees as a user reads them.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import subprocess
import tempfile
import unicodedata
from contextlib import contextmanager
from itertools import count
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from wan_opt.errors import WanOptError
from wan_opt.interrupts import deferred

NO_SPACE = os.strerror(28)  # ENOSPC: "No space left on device"
X264_CRF = 10  # near-lossless: these are the files people keep and compare


def safe_stem(text: str, max_len: int = 48) -> str:
    """A file-name stem safe on every OS and in ffmpeg: ASCII letters, digits, '-' and '_' only."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9]+", "-", ascii_text).strip("-").lower()
    return stem[:max_len].rstrip("-") or "video"


def _failure(path: Path, reason: str) -> WanOptError:
    if NO_SPACE in reason:
        return WanOptError(f"Could not write {path}: {NO_SPACE}; nothing was saved: free some space there or "
                           f"pass output_dir= a folder with room.")
    return WanOptError(f"Could not write {path} ({reason}); nothing was saved under that name.")


@contextmanager
def _temporary(folder: Path, name: str) -> Iterator[Path]:
    """A new hidden file beside `folder/name` (same extension, so ffmpeg picks the container from it), removed
    on the way out unless it was renamed away."""
    stem, suffix = os.path.splitext(name)
    path, created = folder / f".{stem}.partial-{os.getpid()}-{secrets.token_hex(4)}{suffix}", False
    try:
        with deferred():
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            created = True
        yield path
    finally:
        if created:
            with deferred():
                path.unlink(missing_ok=True)


@contextmanager
def _reservation(path: Path) -> Iterator[bool]:
    """Whether this process now holds `path` (created with O_EXCL); released on the way out."""
    held = False
    try:
        with deferred():
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                held = True
            except FileExistsError:
                pass
        yield held
    finally:
        if held:
            with deferred():
                path.unlink(missing_ok=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())  # a network file system may report a full disk only here


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def check_writable(folder: Path) -> None:
    """Fail now, not after minutes of denoising, if the output folder cannot be written or is full."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _temporary(folder, "write-test") as probe:
            _write_file(probe, bytes(64 * 1024))
    except OSError as exc:
        if exc.strerror == NO_SPACE:
            raise WanOptError(f"The output directory {folder} is full ({NO_SPACE}): free some space or pass "
                              f"output_dir= another folder.") from exc
        raise WanOptError(f"Cannot write to the output directory {folder} ({exc.strerror}): "
                          f"pass output_dir= a writable folder.") from exc


# -- the video ----------------------------------------------------------------------------------------------


def pixels(frames: np.ndarray) -> np.ndarray:
    """Frames as 8-bit pixels: floats in [0, 1] rounded to the nearest level (as wan_opt.pipeline.host_frames
    does on the device), 8-bit pixels as they are."""
    levels = frames if frames.dtype == np.uint8 else (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(levels)


def _ffmpeg_command(width: int, height: int, fps: float, preset: str | None, out: Path) -> list[str]:
    import imageio_ffmpeg

    return [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps:g}", "-i", "-",
            "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(X264_CRF),
            *(["-preset", preset] if preset else []), str(out)]


def _ffmpeg_reason(log, status: int) -> str:
    """ffmpeg's first error line (the cause; later ones are its consequences) without the `[x264 @ 0x...]`
    prefixes; the bare reason for a full disk."""
    log.seek(0)
    lines = [re.sub(r"^(\[[^]]*\]\s*)+", "", line).strip() for line in log.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if any(NO_SPACE in line for line in lines):
        return NO_SPACE
    return lines[0] if lines else f"ffmpeg exited with status {status}"


def _encode(frames: Iterable[np.ndarray], out: Path, fps: float, preset: str | None) -> int:
    """Pipe `frames` to ffmpeg (H.264 into `out`); returns how many were written. Raises OSError with
    ffmpeg's reason when it fails."""
    process, written, shape = None, 0, None
    with tempfile.TemporaryFile() as log:
        try:
            for frame in frames:
                levels = pixels(frame)
                if shape is None:
                    shape = levels.shape
                    if len(shape) != 3 or shape[2] != 3:
                        raise ValueError(f"frames must be (height, width, 3); got {shape}")
                    command = _ffmpeg_command(shape[1], shape[0], fps, preset, out)
                    with deferred():
                        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                                   stderr=log, start_new_session=True)
                elif levels.shape != shape:
                    raise ValueError(f"frame {written} is {levels.shape}, the first was {shape}")
                process.stdin.write(levels.data)
                written += 1
            if process is None:
                raise ValueError("there are no frames to write")
            process.stdin.close()
            if process.wait() != 0:
                raise OSError(_ffmpeg_reason(log, process.returncode))
        except BrokenPipeError:  # ffmpeg stopped reading: it failed, and says why
            raise OSError(_ffmpeg_reason(log, process.wait())) from None
        finally:
            if process is not None:
                with deferred():
                    if process.poll() is None:
                        process.kill()
                    process.wait()
                    try:
                        process.stdin.close()
                    except OSError:
                        pass
    return written


def _encode_checked(frames: Iterable[np.ndarray], out: Path, named: Path, fps: float, preset: str | None) -> None:
    """Encode into `out`, read the frame count back and flush it to disk; errors name `named`, the file meant."""
    import imageio_ffmpeg

    try:
        written = _encode(frames, out, fps, preset)
        found, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
        if found != written:
            raise OSError(f"the encoder wrote {found} of {written} frames")
        _fsync(out)
    except OSError as exc:
        raise _failure(named, exc.strerror or str(exc)) from exc
    except RuntimeError as exc:  # no ffmpeg found, or it cannot read back what it wrote
        raise _failure(named, str(exc).strip().splitlines()[0]) from exc


def write_video(frames: Iterable[np.ndarray], path: Path, fps: float, preset: str | None = None) -> Path:
    """Encode `frames` ((H, W, 3) each, floats in [0, 1] or uint8 pixels; an (F, H, W, 3) array or any
    iterable, e.g. a generator that computes them while ffmpeg encodes the previous ones) as H.264 mp4,
    verify it reads back, then give it the name `path` (replacing a file of that name). `preset` is x264's
    speed/size trade-off (None: ffmpeg's default, "medium")."""
    try:
        with _temporary(path.parent, path.name) as tmp:
            _encode_checked(frames, tmp, path, fps, preset)
            os.replace(tmp, path)
    except OSError as exc:
        raise _failure(path, exc.strerror or str(exc)) from exc
    return path


# -- JSON, the video with its sidecar, figures ----------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """NaN and infinities as null: the file stays JSON that any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(data: dict[str, Any], path: Path) -> Path:
    """`data` as UTF-8 JSON under `path` (replacing a file of that name), written whole or not at all."""
    payload = (json.dumps(json_safe(data), indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    try:
        with _temporary(path.parent, path.name) as tmp:
            _write_file(tmp, payload)
            os.replace(tmp, path)
    except OSError as exc:
        raise _failure(path, exc.strerror or str(exc)) from exc
    return path


def _names(stem: str) -> Iterator[str]:
    yield stem
    for n in count(2):
        yield f"{stem}-{n}"


def _place(tmp: Path, folder: Path, stem: str, sidecar: dict[str, Any]) -> Path:
    """Give the encoded `tmp` the first free name of `stem`, `stem-2`, ..., its sidecar first."""
    for name in _names(stem):
        video, side = folder / f"{name}.mp4", folder / f"{name}.json"
        with _reservation(folder / f".{name}.reserved") as held:
            # Every writer checks under the reservation and releases it only once its files stand.
            if not held or os.path.lexists(video) or os.path.lexists(side):
                continue
            try:
                write_json({"video": video.name, **sidecar}, side)
                os.replace(tmp, video)
            except BaseException:  # the reservation makes both names ours: remove what was placed
                with deferred():
                    side.unlink(missing_ok=True)
                    video.unlink(missing_ok=True)
                raise
            return video
    raise AssertionError("unreachable")


def save(frames: Iterable[np.ndarray], folder: Path, stem: str, fps: float, sidecar: dict[str, Any],
         preset: str | None = None) -> Path:
    """Encode `frames` as `folder/<name>.mp4` with `sidecar` (and `"video": "<name>.mp4"`) in
    `folder/<name>.json`, <name> the first free one of `stem`, `stem-2`, ...; never replaces a file. Both
    files stand, complete, or neither does. Returns the video's path."""
    try:
        with _temporary(folder, f"{stem}.mp4") as tmp:
            _encode_checked(frames, tmp, folder / f"{stem}.mp4", fps, preset)
            return _place(tmp, folder, stem, sidecar)
    except OSError as exc:  # the temporary or the reservation could not be created
        raise _failure(folder / f"{stem}.mp4", exc.strerror or str(exc)) from exc


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas: no pyplot state, no display, the caller's backend untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def write_figure(fig, path: Path) -> Path:
    try:
        with _temporary(path.parent, path.name) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
            os.replace(tmp, path)
    except OSError as exc:
        raise _failure(path, exc.strerror or str(exc)) from exc
    return path

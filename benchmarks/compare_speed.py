"""How long `python -m wan_opt.compare` takes on this machine for two 81-frame 832*480 clips.

The clips are synthetic (smooth moving patterns; the second is the first plus a low-frequency ripple, the
kind of difference two profiles make), written with wan-opt's own video writer; the timing covers reading
both, PSNR and SSIM per frame, the plot, the side-by-side clip and the JSON.

    python benchmarks/compare_speed.py
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wan_opt.compare import compare_videos  # noqa: E402
from wan_opt.video import write_video  # noqa: E402

FRAMES, HEIGHT, WIDTH = 81, 480, 832


def clips() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH]).reshape(2, 1, 1)
    a = np.stack([np.stack([np.sin(6 * x + 0.1 * i) * 0.5 + 0.5, np.cos(5 * y + 0.07 * i) * 0.5 + 0.5,
                            (x * y + 0.01 * i) % 1], -1) for i in range(FRAMES)]).astype(np.float32)
    b = np.clip(a + 0.03 * np.sin(20 * x + 3 * y)[None, ..., None].astype(np.float32), 0, 1)
    return a, b


def main() -> None:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    with tempfile.TemporaryDirectory() as folder:
        a, b = clips()
        paths = [write_video(clip, Path(folder) / f"{name}.mp4", 16) for name, clip in (("a", a), ("b", b))]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            result = compare_videos(*paths)
            times.append(round(time.perf_counter() - start, 2))
    record = {"command": "python benchmarks/compare_speed.py", "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "clip": f"{FRAMES} frames of {WIDTH}x{HEIGHT}", "seconds": times,
              "psnr_db_mean": round(result.psnr_mean, 2), "ssim_mean": round(result.ssim_mean, 4)}
    print(json.dumps(record))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compare_speed_{os.cpu_count()}cpu.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

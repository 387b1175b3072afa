"""PSNR and SSIM per frame between runs shown side by side, from wan_opt.compare (the same numbers as
`python -m wan_opt.compare A.mp4 B.mp4`): the first run against each of the others.

Each comparison's files (its metrics, plot and A | B | difference clip) go to a cache folder of the page's own,
never beside the user's videos, under a name made of the two videos' paths, sizes and times: opened again,
a comparison is read back instead of computed.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from wan_opt.compare import compare_videos
from wan_opt.errors import WanOptError
from wan_opt.serve.index import short_id

METRICS = "metrics.json"


def _key(a: Path, b: Path) -> str:
    sa, sb = a.stat(), b.stat()
    return short_id(str(a), str(sa.st_size), str(sa.st_mtime_ns), str(b), str(sb.st_size), str(sb.st_mtime_ns))


class Comparisons:
    """One comparison at a time (each uses every core), cached on disk under `cache`."""

    def __init__(self, cache: Path):
        self.cache = Path(cache)
        self._lock = threading.Lock()

    def pair(self, a: Path, b: Path) -> dict:
        """{psnr: [dB or null for identical], ssim: [...], means, the A | B | diff clip's name}, or {error}."""
        key = _key(a, b)
        folder = self.cache / key
        with self._lock:
            stored = folder / METRICS
            if not stored.is_file():
                try:
                    result = compare_videos(a, b, folder)
                except WanOptError as exc:
                    return {"error": str(exc)}
                # One fixed name per folder, so the page can ask for the clip by the key alone.
                result.metrics.replace(stored)
                result.side_by_side.replace(folder / "side_by_side.mp4")
                result.plot.unlink(missing_ok=True)  # the page draws its own
            metrics = json.loads(stored.read_text(encoding="utf-8"))
        return {"key": key, "psnr": metrics["psnr_db"], "ssim": metrics["ssim"],
                "psnr_mean": metrics["psnr_db_mean"], "ssim_mean": metrics["ssim_mean"],
                "fps": metrics.get("fps"), "clip": f"{key}/side_by_side.mp4"}

    def clip(self, ref: str) -> Path | None:
        """The A | B | diff clip named `KEY/side_by_side.mp4`, if this cache made it."""
        key, _, name = ref.partition("/")
        if len(key) != 12 or not all(c in "0123456789abcdef" for c in key) or name != "side_by_side.mp4":
            return None
        path = self.cache / key / name
        return path if path.is_file() else None

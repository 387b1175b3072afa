"""wan-opt's command line with one stage held open, so that a test can signal the process right there.

    python tests/fault_driver.py STAGE N MARK [run.py arguments...]

STAGE is where to hold: `load` (building the pipeline), `denoise` (a transformer forward), `encode` (the
second frame going to ffmpeg, which is running and holds the first) or `place` (the sidecar placed, its video
still the hidden temporary). The N-th time the process gets there it writes its pid to the file MARK and
sleeps until signalled. Only the tests use this file; wan_opt has no hook for it.
"""
import os
import sys
import time
from pathlib import Path

stage, at, mark, args = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
reached = 0


def held(original, after=False):
    def wrapper(*a, **k):
        global reached
        reached += 1
        result = original(*a, **k) if after else None
        if reached == at:
            mark.write_text(str(os.getpid()))
            time.sleep(600)
        return result if after else original(*a, **k)

    return wrapper


if stage in ("load", "denoise"):
    from wan_opt.pipeline import WanOptPipeline

    if stage == "load":
        WanOptPipeline.from_prepared = classmethod(held(WanOptPipeline.from_prepared.__func__))
    else:
        WanOptPipeline.denoise = held(WanOptPipeline.denoise)
else:
    from wan_opt import video

    if stage == "encode":
        video.pixels = held(video.pixels)
    else:
        video.write_json = held(video.write_json, after=True)

sys.argv = ["run.py", *args]
from wan_opt.cli import main  # noqa: E402  (after the patch, as the command would import it)

main()

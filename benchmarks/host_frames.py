"""The decoded video's way from the VAE to 8-bit pixels in host memory, as run.py needs them for the video file:
diffusers' post-processing (output_type="np", floats converted on the host, then rounded frame by frame as the
video is written) against wan_opt.pipeline.host_frames (converted where the video lies, a few frames at a time).

Each way runs in a fresh process on the same random video in the VAE's output shape and dtype (float16, as the
Hopper profiles decode). A first, small call warms the device up; then the first full-size call, as a run.py
process makes one a video, and the best of the --repeats after it, each with the CPU time it took in the process
and in the kernel on its behalf (touching fresh memory is the kernel's work). Each way reports how much the
process' peak resident set grew over the video it was given, and the largest difference of its pixels from
host_frames'.

    python benchmarks/host_frames.py [--device cuda] [--size 1280*720] [--frames 81]

writes benchmarks/results/host_frames_<device>.json (on a GPU: its name) with the command and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_report import gpu_report, write_report  # noqa: E402
from wan_opt.app import library_versions  # noqa: E402
from wan_opt.pipeline import host_frames  # noqa: E402
from wan_opt.request import parse_size  # noqa: E402
from wan_opt.video import pixels  # noqa: E402

GIB = 2**30
WAYS = {
    "diffusers": "diffusers' post-processing to floats, then rounded to pixels frame by frame",
    "floats": "host_frames, floats in [0, 1] (the Python API's output_type=\"np\")",
    "pixels": "host_frames, 8-bit pixels (output_type=\"uint8\", what run.py writes)",
}


def video_of(args, frames: int) -> torch.Tensor:
    width, height = parse_size(args.size)
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 3, frames, height, width, generator=generator) * 0.6).to(torch.float16).to(args.device)


def convert(way: str, video: torch.Tensor) -> np.ndarray:
    """The video in host memory the given way, as run.py would hold it while writing the file: 8-bit pixels, or
    floats rounded frame by frame as each frame goes to the encoder (each frame's pixels then dropped)."""
    if way == "pixels":
        return host_frames(video, pixels=True)
    if way == "diffusers":
        from diffusers.video_processor import VideoProcessor

        floats = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")
    else:
        floats = host_frames(video, pixels=False)
    for frame in floats[0]:
        pixels(frame)
    return floats


def status_gib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 2**20


def one_way(args) -> dict:
    """In this (fresh) process: the seconds and peak resident growth of one way, and its pixels' checksum."""
    convert(args.way, video_of(args, 5))  # warm-up: the device, the allocator, the libraries' first calls
    video = video_of(args, args.frames)
    sync = torch.cuda.synchronize if video.is_cuda else (lambda: None)
    sync()
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set (VmHWM) starts again from here
    before, seconds, cpu = status_gib("VmRSS"), [], []
    for _ in range(1 + args.repeats):
        start, times = time.perf_counter(), os.times()
        levels = convert(args.way, video)
        sync()
        seconds.append(time.perf_counter() - start)
        after = os.times()
        cpu.append({"user": round(after.user - times.user, 2), "system": round(after.system - times.system, 2)})
        if len(seconds) <= args.repeats:
            del levels
    grown = status_gib("VmHWM") - before
    np.save(args.pixels_out, pixels(levels))  # after the peak is read: the file's pixels are not the way's
    return {"way": WAYS[args.way], "first_seconds": round(seconds[0], 3), "later_seconds": round(min(seconds[1:]), 3),
            "all_seconds": [round(s, 3) for s in seconds], "cpu_seconds": cpu,
            "peak_resident_growth_gib": round(grown, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="1280*720")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--way", choices=list(WAYS), help=argparse.SUPPRESS)  # one way, in a child process
    parser.add_argument("--pixels-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(one_way(args)))
        return

    rows, reference = {}, None
    for way in ("pixels", "floats", "diffusers"):
        saved = Path(args.out) / f".host_frames_{way}.npy"
        child = [sys.executable, __file__, "--device", args.device, "--size", args.size, "--frames", str(args.frames),
                 "--repeats", str(args.repeats), "--way", way, "--pixels-out", str(saved)]
        rows[way] = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        levels = np.load(saved).astype(np.int16)
        saved.unlink()
        reference = levels if reference is None else reference
        rows[way]["largest_pixel_difference"] = int(np.abs(levels - reference).max())
        rows[way]["pixels_differing"] = float((levels != reference).mean())
        print(f"{way:10s} first {rows[way]['first_seconds']:6.2f} s, later {rows[way]['later_seconds']:6.2f} s, "
              f"+{rows[way]['peak_resident_growth_gib']:.2f} GiB resident, "
              f"largest difference {rows[way]['largest_pixel_difference']} level(s)", flush=True)
    fields = {"size": args.size, "frames": args.frames, "video_dtype": "float16", "ways": rows}
    if args.device.startswith("cuda"):
        report = gpu_report(**fields)
        name = report["gpu"].replace(" ", "-")
    else:
        report = {"command": " ".join(["python", *sys.argv]), "device": "cpu",
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(), "versions": library_versions(), **fields}
        name = f"cpu{os.cpu_count()}"
    write_report(report, Path(args.out) / f"host_frames_{name}.json")


if __name__ == "__main__":
    main()

"""A benchmark's report: seconds per step and per stage against diffusers' baseline, whole requests measured or
extrapolated, deviations; written as JSON, a markdown table and a chart."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from wan_opt.app import library_versions
from wan_opt.video import new_figure, pixels, write_figure, write_json


def request_steps(cfg) -> int:
    """The step count of the request a run stands for: the run's `steps=` override, or its model's own."""
    return int(cfg.steps or cfg.model.steps)


def rel_l2(a, b) -> float:
    """The relative L2 distance of `a` from `b`, in float64: arrays, or tensors on any device."""
    a, b = (x.detach().double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.float64)
            for x in (a, b))
    return float((a - b).norm() / b.norm())


def frames_rel_l2(frames, reference, decoded: bool) -> float:
    """Decoded frames compared as the 8-bit videos they make (wan-opt's come as 8-bit pixels, as run.py writes
    them; diffusers' floats are rounded as a video file stores them); latents as they are."""
    return rel_l2(pixels(np.asarray(frames)), pixels(np.asarray(reference))) if decoded else rel_l2(frames, reference)


def seconds_per_forward(row: dict) -> float:
    """The measured denoising time over the denoiser passes it made (2 a step with guidance, 1 without): a step
    cache's cheap steps count here, where the median step would hide them."""
    return float(sum(row["step_seconds"]) / sum(row["forwards"]))


def request_seconds(row: dict) -> float:
    """A whole request extrapolated from measured stages: encode, the request's denoiser passes (its own step
    count and guidance schedule) at the measured time per pass, decode (when the benchmark decoded)."""
    stages = row["stage_seconds"]
    return (stages.get("text_encoding", 0.0) + stages.get("vae_encode", 0.0)
            + row["request_forwards"] * seconds_per_forward(row) + stages.get("vae_decode", 0.0))


def measured_request(row: dict, steps: int, request: int, decode: bool) -> float | None:
    """The whole timed call (text encoding, VAE encode, every step, decode) where it was a whole request: the
    run ran its request's every step and decoded; else None, and only the extrapolation stands."""
    return round(row["seconds"], 3) if steps == request and decode else None


def summarize(rows: dict, configs: dict, args, step_flops: float, device: torch.device) -> dict:
    base = rows["diffusers"]
    base_step = float(np.median(base["step_seconds"]))
    base_request = request_seconds(base)
    base_measured = measured_request(base, args.baseline_steps, request_steps(configs["diffusers"]), args.decode)
    report = {"command": " ".join(["python -m wan_opt.bench", *sys.argv[1:]]), "size": args.size,
              "frames": args.frames, "steps": args.steps, "baseline_steps": args.baseline_steps,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "versions": library_versions(), "cfg_step_tflop": step_flops / 1e12,
              "frames_rel_l2_of": "8-bit frames" if args.decode else "latents", "runs": {}}
    if args.baseline_steps != args.steps:
        # A run of 8 steps and one of 2 end at different noise levels: their distance says nothing of the kernels.
        report["frames_rel_l2_null"] = (f"diffusers ran {args.baseline_steps} steps and the profiles {args.steps}: "
                                        "frames of different step counts are not compared; forward_rel_l2 is")
    for name, row in rows.items():
        step = float(np.median(row["step_seconds"]))
        request = request_seconds(row)
        steps = args.baseline_steps if name == "diffusers" else args.steps
        measured = measured_request(row, steps, request_steps(configs[name]), args.decode)
        comparable = name != "diffusers" and steps == args.baseline_steps
        report["runs"][name] = {
            "steps": steps,
            "seconds_per_cfg_step": round(step, 4), "step_seconds": [round(s, 4) for s in row["step_seconds"]],
            "stage_seconds": {k: round(v, 3) for k, v in row.get("stage_seconds", {}).items()},
            "total_seconds": round(row["seconds"], 3), "tflops": round(step_flops / step / 1e12, 1),
            "peak_gpu_gib": None if row["peak_gib"] is None else round(row["peak_gib"], 2),
            "speedup": round(base_step / step, 3),
            # Extrapolated: the model's own step count (40 for A14B, 4 distilled) and guidance schedule (CFG
            # truncation drops passes) at the measured time per pass, plus encode and decode. A step cache's hits
            # depend on the weights: its row's time per pass is what random weights gave.
            "seconds_per_forward": round(seconds_per_forward(row), 4),
            "request_steps": request_steps(configs[name]),
            "request_forwards": row["request_forwards"], "request_seconds_extrapolated": round(request, 2),
            "request_speedup_extrapolated": round(base_request / request, 3),
            # Measured: the whole request timed end to end, where the run was one (and the baseline's, for the ratio).
            "request_seconds_measured": measured,
            "request_speedup_measured": round(base_measured / measured, 3) if measured and base_measured else None,
            "forward_rel_l2": row.get("forward_rel_l2", 0.0),
            "frames_rel_l2": frames_rel_l2(row["frames"], base["frames"], args.decode) if comparable else
            (0.0 if name == "diffusers" else None),
        }
    return report


def request_text(run: dict, digits: int = 0) -> str:
    """A run's whole request and its speedup: measured where both it and the baseline's were timed end to end,
    else extrapolated (a measured request against an extrapolated baseline says so)."""
    measured, speedup = run.get("request_seconds_measured"), run.get("request_speedup_measured")
    if measured is None:
        seconds, speedup = run["request_seconds_extrapolated"], run["request_speedup_extrapolated"]
        return f"{seconds:.{digits}f} s extrapolated ({speedup:.2f}x)"
    ratio = f"{speedup:.2f}x" if speedup is not None else f"{run['request_speedup_extrapolated']:.2f}x extrapolated"
    return f"{measured:.{digits}f} s measured ({ratio})"


def rel_l2_text(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}e}"


def write(report: dict, args) -> Path:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['device']}: {args.size} x {args.frames} frames, {steps_text(report)}")
    for column in ("run", "s / CFG step", "TFLOP/s", "peak GiB", "speedup", "whole request", "forward rel L2",
                   "frames rel L2"):
        table.add_column(column)
    for name, r in report["runs"].items():
        table.add_row(name, f"{r['seconds_per_cfg_step']:.3f}", f"{r['tflops']}", str(r["peak_gpu_gib"]),
                      f"{r['speedup']:.2f}x", request_text(r, 1), f"{r['forward_rel_l2']:.2e}",
                      rel_l2_text(r["frames_rel_l2"], 2))
    Console().print(table)
    if "frames_rel_l2_null" in report:
        print(f"frames rel L2: {report['frames_rel_l2_null']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny-cpu" if args.tiny else report["device"].replace(" ", "-")
    model = "" if args.model == "wan22_t2v_a14b" else f"{args.model}_" + ("image_" if args.image else "")
    path = out / f"bench_{tag}_{model}{args.size.replace('*', 'x')}x{args.frames}.json"
    write_json(report, path)
    chart(report, path.with_suffix(".png"))
    path.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {path}, {path.with_suffix('.png').name} and {path.with_suffix('.md').name}")
    return path


def steps_text(report: dict) -> str:
    """The steps each run ran: "8 steps", or "8 steps (diffusers: 2)" under --baseline-steps."""
    base = report.get("baseline_steps", report["steps"])  # reports from before --baseline-steps lack it
    return f"{report['steps']} steps" + (f" (diffusers: {base})" if base != report["steps"] else "")


def markdown(report: dict) -> str:
    """The report as a README table, each row with the command that reproduces it."""
    lines = [f"{report['device']}, {report['size']} x {report['frames']} frames; per-step times measured over "
             f"{steps_text(report)}; a whole request measured end to end where the run ran its every step and "
             "decoded, else extrapolated from the measured stages.", "",
             "| run | s / CFG step | speedup | steps (passes) | whole request | forward rel L2 | "
             f"{report['frames_rel_l2_of']} rel L2 |", "|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(f"| `{name}` | {r['seconds_per_cfg_step']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['request_steps']} ({r['request_forwards']}) | {request_text(r)} | "
                     f"{r['forward_rel_l2']:.1e} | {rel_l2_text(r['frames_rel_l2'], 1)} |")
    note = [f"{report['frames_rel_l2_of'].capitalize()} rel L2: {report['frames_rel_l2_null']}.", ""] \
        if "frames_rel_l2_null" in report else []
    if report.get("baseline_vae_tiling"):
        note += ["Diffusers decoded in tiles (`--baseline-vae-tiling`); the profiles as their plans say.", ""]
    command = " ".join([*(f"{k}={v}" for k, v in report.get("environment", {}).items()), report["command"]])
    return "\n".join([*lines, "", *note, f"`{command}`", ""])


STAGES = (("text_encoding", "text encoding"), ("vae_encode", "VAE encode"), ("denoise", "denoising"),
          ("denoise_high_noise", "high-noise expert"),
          ("denoise_low_noise", "low-noise expert"), ("vae_decode", "VAE decode"))


def run_label(name: str) -> str:
    """A run's name for a chart: the knob names without their config path, wrapped."""
    words = [word.rpartition(".")[2] if word.startswith("hardware.") else word for word in name.split(",")]
    return "\n".join(textwrap.wrap(", ".join(words), 34))


def chart(report: dict, path: Path) -> Path:
    """Seconds of the benchmarked request per run, stacked by stage, with the speedup per CFG step on each bar."""
    names = list(report["runs"])
    labels = [run_label(name) for name in names]
    fig = new_figure(10, 1.6 + sum(0.45 + 0.2 * label.count("\n") for label in labels))
    ax = fig.subplots()
    for i, name in enumerate(names):
        left, stages = 0.0, report["runs"][name]["stage_seconds"]
        for key, label in STAGES:
            if stages.get(key):
                ax.barh(i, stages[key], left=left, color=f"C{[k for k, _ in STAGES].index(key)}",
                        label=label if label not in ax.get_legend_handles_labels()[1] else None)
                left += stages[key]
        run = report["runs"][name]
        unguided = run["seconds_per_cfg_step"] < 1.5 * run["seconds_per_forward"]  # one pass a step: no CFG
        ax.text(left, i, f"  {run['speedup']:.2f}x per step" + (" (no CFG)" if unguided else ""), va="center")
    ax.set_yticks(range(len(names)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds for {steps_text(report)} at {report['size']} x {report['frames']} frames")
    ax.set_title(f"{report['device']}: wan-opt profiles against diffusers' {report.get('reference', 'WanPipeline')}")
    ax.legend(loc="lower right", fontsize="small")
    ax.margins(x=0.25)
    return write_figure(fig, path)

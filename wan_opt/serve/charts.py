"""What the page's charts draw, as plain data: a memory plan (its stages against GPU and host memory, the
card's budget) and the files under benchmarks/results/ (seconds per step, ratios against the baseline).

The page draws them as SVG with its own script; these functions only pick the numbers out of the JSON that
wan-opt writes, and read unknown or older layouts defensively.
"""
from __future__ import annotations

from typing import Any

from wan_opt.memory.plan import SAFETY

from wan_opt.serve.knobs import as_number

BASELINE = "diffusers"  # the run every bench file measures the others against (wan_opt.bench)


def _numbers(tree: Any) -> dict[str, float]:
    if not isinstance(tree, dict):
        return {}
    return {str(k): v for k, v in ((k, as_number(v)) for k, v in tree.items()) if v is not None}


def plan_chart(plan: Any, measured_gpu_gib: float | None = None) -> dict | None:
    """A memory plan (a sidecar's `memory_plan`, or a plan.json) as the page's chart; None if it is not one."""
    if not isinstance(plan, dict) or not isinstance(plan.get("stages"), dict):
        return None
    gpu = _numbers(plan["stages"])
    # Host memory per stage, where a plan records it (any mapping of stage -> GB whose name speaks of the host).
    host = next((_numbers(v) for k, v in plan.items() if "host" in str(k) and isinstance(v, dict) and _numbers(v)),
                {})
    budget = as_number(plan.get("vram_budget_gb"))
    host_ram = as_number(plan.get("host_ram_gb"))
    return {
        "stages": [{"name": name, "gpu_gb": gpu.get(name), "host_gb": host.get(name)}
                   for name in list(gpu) + [n for n in host if n not in gpu]],
        "vram_budget_gb": budget or None,  # 0 on the CPU profile: no card to draw
        "usable_gb": round(budget * SAFETY, 2) if budget else None,
        "host_ram_gb": host_ram,
        "usable_host_gb": round(host_ram * SAFETY, 2) if host_ram else None,
        "predicted_peak_gpu_gb": as_number(plan.get("predicted_peak_gpu_gb")),
        "predicted_host_gb": as_number(plan.get("predicted_host_gb")),
        "measured_peak_gpu_gib": measured_gpu_gib,
        "fits": plan.get("fits"),
        "mechanisms": plan.get("mechanisms") if isinstance(plan.get("mechanisms"), dict) else {},
        "decided_by": plan.get("decided_by") if isinstance(plan.get("decided_by"), dict) else {},
        "budget_source": plan.get("budget_source"),
        "fallbacks": plan.get("fallbacks") if isinstance(plan.get("fallbacks"), list) else [],
        "safety": SAFETY,
    }


def is_plan(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("stages"), dict) and "mechanisms" in data


def is_benchmark(data: Any) -> bool:
    """A result file of wan-opt's benchmarks: a command that made it and what it measured."""
    return isinstance(data, dict) and isinstance(data.get("command"), str) and any(
        key in data for key in ("runs", "seconds", "cold", "results"))


def _bench_runs(runs: dict) -> dict:
    """wan_opt.bench's layout: runs by profile, each with seconds per CFG step and the speedup over diffusers."""
    names = [n for n, r in runs.items() if isinstance(r, dict) and as_number(r.get("seconds_per_cfg_step"))]
    base = as_number(runs.get(BASELINE, {}).get("seconds_per_cfg_step")) if isinstance(runs.get(BASELINE), dict) else None
    rows = []
    for name in names:
        run = runs[name]
        seconds = as_number(run["seconds_per_cfg_step"])
        ratio = as_number(run.get("speedup")) or (round(base / seconds, 3) if base else None)
        rows.append({"name": name, "seconds_per_step": seconds, "ratio": ratio,
                     "peak_gpu_gib": as_number(run.get("peak_gpu_gib")), "deviation": as_number(run.get("forward_rel_l2")),
                     "stages": _numbers(run.get("stage_seconds"))})
    return {"kind": "bench", "baseline": BASELINE if base else None, "rows": rows}


def _run_list(runs: list) -> dict:
    """Other benchmarks write a list of runs: each run's stage seconds (end to end) or its numbers."""
    rows = []
    for number, run in enumerate(r for r in runs if isinstance(r, dict)):
        label = next((str(run[k]) for k in ("run", "name", "layer", "kernel", "size", "profile") if k in run), "")
        steps = [s for s in run.get("step_seconds") or [] if as_number(s) is not None]
        rows.append({"name": label or f"run {number + 1}",
                     "seconds_per_step": round(sum(steps) / len(steps), 4) if steps else None,
                     "stages": _numbers(run.get("stage_seconds")),
                     "numbers": {k: v for k, v in _numbers(run).items() if k not in ("tokens", "heads", "head_dim")}})
    return {"kind": "runs", "rows": rows}


def benchmark_chart(data: dict) -> dict:
    """A benchmark result file as the page's charts: bars of seconds per step and of the ratio to the baseline,
    stage seconds, or else a table of its numbers."""
    runs = data.get("runs")
    if isinstance(runs, dict) and any(isinstance(r, dict) and "seconds_per_cfg_step" in r for r in runs.values()):
        chart = _bench_runs(runs)
    elif isinstance(runs, list):
        chart = _run_list(runs)
    else:
        chart = {"kind": "numbers", "rows": [{"name": key, "numbers": _numbers(value)}
                                             for key, value in data.items() if _numbers(value)]}
        top = _numbers(data)
        if top:
            chart["rows"].insert(0, {"name": "", "numbers": top})
    chart.update({"command": data.get("command"), "device": data.get("device") or data.get("gpu"),
                  "size": data.get("size"), "frames": data.get("frames"), "steps": data.get("steps"),
                  "failed": data.get("failed") if isinstance(data.get("failed"), dict) else {}})
    return chart

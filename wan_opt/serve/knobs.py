"""A sidecar read as the page shows it: the knobs a run was made with, named as on the command line, and its
figures (seconds per step, total seconds, peak memory, deviation).

Sidecars change as wan-opt grows (new memory fields, an input image), so every field is read defensively: a
missing or oddly typed field is left out, never an error.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable

# Config leaves that describe rather than choose: left out of the knobs, so they never pass for a difference.
_NOT_KNOBS = ("prompt", "negative_prompt", "output_dir", "prompts", "plan", "pipeline", "hardware.description",
              "hardware.gpu", "model.sizes", "model.negative_prompt", "model.family", "model.text_len",
              "model.pixel_grid")
# Run knobs left null in the config (the model's default) take the value the request resolved them to.
_FROM_REQUEST = ("seed", "steps", "guidance", "guidance_2", "frames", "fps")
# The figures a run may record: name -> (label, unit); the page sorts and filters by any of them.
FIGURES = {
    "s_per_step": ("s / step", "s"),
    "total_s": ("total", "s"),
    "load_s": ("load", "s"),
    "peak_gpu_gib": ("peak GPU", "GiB"),
    "peak_host_gib": ("peak host", "GiB"),
    "plan_gpu_gb": ("planned GPU", "GB"),
    "plan_host_gb": ("planned host", "GB"),
    "deviation": ("deviation", ""),
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a.b.c': leaf}; lists become one comma-separated value."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(tree, list):
        return {prefix[:-1]: ",".join(str(item) for item in tree)}
    return {prefix[:-1]: tree} if prefix else {}


def _is_knob(key: str) -> bool:
    return not (key.endswith("._target_") or any(key == skip or key.startswith(skip + ".") for skip in _NOT_KNOBS))


def config_knobs(config: Any) -> dict[str, Any]:
    """The knobs of a composed config (a sidecar's `config`, or a job's .hydra/config.yaml)."""
    if not isinstance(config, dict):
        return {}
    return {key: value for key, value in flatten(config).items() if _is_knob(key)}


def run_knobs(sidecar: dict) -> dict[str, Any]:
    """Every knob a run was made with, by its command-line name, nulls resolved from the request."""
    knobs = config_knobs(sidecar.get("config"))
    request = sidecar.get("request") if isinstance(sidecar.get("request"), dict) else {}
    for key in _FROM_REQUEST:
        if knobs.get(key) is None and request.get(key) is not None:
            knobs[key] = request[key]
    if knobs.get("size") is None and request.get("width") and request.get("height"):
        knobs["size"] = f"{request['width']}*{request['height']}"
    hardware = sidecar.get("hardware") if isinstance(sidecar.get("hardware"), dict) else {}
    if "hardware.name" not in knobs and isinstance(hardware.get("profile"), str):
        knobs["hardware.name"] = hardware["profile"]
    if knobs.get("seed") is None and isinstance(sidecar.get("seed"), int):
        knobs["seed"] = sidecar["seed"]
    return knobs


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def find_number(tree: Any, words: Iterable[str], depth: int = 3, skip: tuple[str, ...] = ()) -> float | None:
    """The first number whose key holds every one of `words` (e.g. a host memory peak, wherever a newer sidecar
    puts it), searching `depth` levels of dicts, skipping the subtrees named in `skip`."""
    if not isinstance(tree, dict) or depth < 0:
        return None
    words = tuple(words)
    for key, value in tree.items():
        if all(word in str(key).lower() for word in words) and as_number(value) is not None:
            return as_number(value)
    for key, value in tree.items():
        if key not in skip and (found := find_number(value, words, depth - 1, skip)) is not None:
            return found
    return None


def _dict(tree: Any, key: str) -> dict:
    value = tree.get(key) if isinstance(tree, dict) else None
    return value if isinstance(value, dict) else {}


def figures(sidecar: dict) -> dict[str, float]:
    """The run's figures; a figure its sidecar does not record is absent."""
    found: dict[str, float | None] = {}
    steps = [s for s in sidecar.get("step_seconds") or [] if as_number(s) is not None]
    found["s_per_step"] = statistics.median(steps) if steps else None  # the median: a compile's first step aside
    seconds = {k: as_number(v) for k, v in _dict(sidecar, "seconds").items()}
    found["total_s"] = sum(v for v in seconds.values() if v is not None) if seconds else None
    found["load_s"] = seconds.get("load")
    found["peak_gpu_gib"] = as_number(_dict(_dict(sidecar, "hardware"), "gpu").get("peak_allocated_gib"))
    if found["peak_gpu_gib"] is None:
        found["peak_gpu_gib"] = find_number(sidecar, ("peak", "gpu"), skip=("memory_plan", "config"))
    found["peak_host_gib"] = find_number(sidecar, ("peak", "host"), skip=("memory_plan", "config"))
    plan = _dict(sidecar, "memory_plan")
    found["plan_gpu_gb"] = as_number(plan.get("predicted_peak_gpu_gb"))
    found["plan_host_gb"] = as_number(plan.get("predicted_host_gb"))
    found["deviation"] = find_number(sidecar, ("deviation",), skip=("config",))
    if found["deviation"] is None:
        found["deviation"] = find_number(sidecar, ("rel_l2",), skip=("config",))
    return {name: round(value, 4) for name, value in found.items() if value is not None}


def differing(knob_sets: Iterable[dict[str, Any]]) -> list[str]:
    """The knobs whose value is not the same in every one of the sets (a knob absent in some counts as differing)."""
    knob_sets = list(knob_sets)
    keys = sorted({key for knobs in knob_sets for key in knobs})
    return [key for key in keys if len({_hashable(knobs.get(key)) for knobs in knob_sets}) > 1]


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def shown(value: Any) -> str:
    """A knob's value as the page writes it (and as a filter names it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

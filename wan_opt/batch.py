"""Batches and sweeps: prompt files, one result per video, and the summary a sweep ends with.

A failed item (a bad prompt line, a request the card cannot run) is recorded and the rest go on; the
summary table and summary.json list every item, and the process exits non-zero if any failed.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from wan_opt.errors import WanOptError

# What one line of a prompt file may set: the run's own knobs.
LINE_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_2", "size", "frames", "fps")
RESULTS_FILE = "results.json"


@dataclass
class ItemResult:
    item: str  # "prompt" for a single run, "file.jsonl:3" for a line of a prompt file
    prompt: str
    status: str  # ok | failed
    seconds: float
    output: str | None = None
    error: str | None = None
    job: str = ""


def read_prompt_file(path: str) -> list[tuple[str, dict | str]]:
    """(label, overrides) per non-empty line; a line that cannot be used becomes its error message."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WanOptError(f"prompts={path} is not a file: pass a .txt (one prompt per line) or .jsonl file.")
    items: list[tuple[str, dict | str]] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label = f"{file.name}:{number}"
        if file.suffix != ".jsonl":
            items.append((label, {"prompt": line.strip()}))
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            items.append((label, f"line {number} of {file.name} is not valid JSON ({exc.msg})."))
            continue
        unknown = sorted(set(entry) - set(LINE_KEYS)) if isinstance(entry, dict) else ["(not an object)"]
        if unknown:
            items.append((label, f"line {number} of {file.name} has {', '.join(unknown)}; a line may set "
                                 f"{', '.join(LINE_KEYS)}."))
        else:
            items.append((label, entry))
    if not items:
        raise WanOptError(f"prompts={path} has no prompts in it.")
    return items


def items_of(cfg: DictConfig) -> list[tuple[str, dict | str]]:
    return read_prompt_file(cfg.prompts) if cfg.prompts else [("prompt", {})]


def with_overrides(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    item = cfg.copy()
    for key, value in overrides.items():
        item[key] = value
    return item


def run_items(cfg: DictConfig, run_one, job: str = "") -> list[ItemResult]:
    """Run every item of the job, recording each outcome; a failure does not stop the others."""
    results = []
    for label, overrides in items_of(cfg):
        start = time.perf_counter()
        prompt = overrides.get("prompt", cfg.prompt) if isinstance(overrides, dict) else ""
        try:
            if isinstance(overrides, str):
                raise WanOptError(overrides)
            output = run_one(with_overrides(cfg, overrides))
            results.append(ItemResult(label, prompt, "ok", round(time.perf_counter() - start, 2), str(output), job=job))
        except WanOptError as exc:
            results.append(ItemResult(label, prompt, "failed", round(time.perf_counter() - start, 2),
                                      error=str(exc), job=job))
            Console(stderr=True).print(f"[red]error[/red] ({label}): {exc}", highlight=False)
    return results


def write_results(folder: Path, results: list[ItemResult]) -> None:
    from wan_opt.video import write_json

    write_json({"results": [asdict(r) for r in results]}, folder / RESULTS_FILE)


def summarize(results: list[ItemResult], path: Path, title: str) -> bool:
    """Print the summary table, write summary JSON to `path`; True when every item succeeded."""
    from wan_opt.video import write_json

    table = Table(title=title, title_justify="left")
    for column in ("job", "item", "status", "seconds", "output / error"):
        table.add_column(column)
    for r in results:
        status = "[green]ok[/green]" if r.status == "ok" else "[red]failed[/red]"
        table.add_row(r.job, r.item, status, f"{r.seconds:.1f}", r.output if r.status == "ok" else r.error)
    Console().print(table)
    failed = sum(r.status != "ok" for r in results)
    write_json({"total": len(results), "failed": failed, "results": [asdict(r) for r in results]}, path)
    return failed == 0


def gather(sweep_dir: Path) -> list[ItemResult]:
    results = []
    for file in sorted(sweep_dir.glob(f"*/{RESULTS_FILE}")):
        results += [ItemResult(**r) for r in json.loads(file.read_text())["results"]]
    return results


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra always ships it from 1.1 on
    Callback = object


class SweepSummary(Callback):
    """At the end of a multirun: every job's items in one table and summary.json, exit 1 if any failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        results = gather(sweep_dir)
        if results and not summarize(results, sweep_dir / "summary.json", f"sweep {sweep_dir}"):
            raise SystemExit(1)

"""Batches and sweeps: prompt files, one result per video, and the summary a sweep ends with.

A failed item (a bad prompt line, a request the card cannot run) is recorded and the rest go on; the
summary table and summary.json list every item, and the process exits non-zero if any failed.
"""
from __future__ import annotations

import codecs
import functools
import json
import math
import sys
import time
import traceback
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wan_opt.config import RunConfig
from wan_opt.errors import WanOptError
from wan_opt.request import REQUEST_KEYS, control_characters, literal

LINE_KEYS = REQUEST_KEYS  # what one line of a prompt file may set: the run's own knobs
IMAGE_KEYS = ("image", "last_image")  # paths, relative to the prompt file's folder unless absolute
RESULTS_FILE = "results.json"
MAX_PROMPT_FILE_BYTES = 64 * 2**20  # read whole: a million prompts fit; a mistaken video or dump does not
STATUS_STYLES = {"ok": "green", "failed": "red", "interrupted": "yellow"}


@dataclass
class ItemResult:
    item: str  # "prompt" for a single run, "file.jsonl:3" for a line of a prompt file
    prompt: str
    status: str  # ok | failed | interrupted
    seconds: float
    output: str | None = None
    error: str | None = None
    job: str = ""
    traceback: str | None = None  # a bug in wan-opt: where it happened, for the report


def read_prompt_file(path: str) -> list[tuple[str, dict | str]]:
    """(label, overrides) per non-empty line; a line that cannot be used becomes its error message.

    A .jsonl file (in any case) holds one JSON object per line, any other file one prompt per line. Lines end
    at a newline only (a JSON string may hold U+2028), a UTF-8 byte-order mark is dropped, and a line that is
    not UTF-8 fails alone; a file that cannot be read as text at all is one error for the whole batch."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WanOptError(f"prompts={path} is not a file: pass a .txt (one prompt per line) or .jsonl file.")
    json_lines = file.suffix.lower() == ".jsonl"
    if file.suffix.lower() == ".json":
        raise WanOptError(f"prompts={path} is a .json file: write one JSON object per line in a .jsonl file, "
                          f"or one prompt per line in a .txt file.")
    if file.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise WanOptError(f"prompts={path} is {file.stat().st_size / 2**20:.0f} MB: a prompt file may hold "
                          f"{MAX_PROMPT_FILE_BYTES // 2**20} MB; split it.")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise WanOptError(f"prompts={path} cannot be read ({exc.strerror}): check the file's permissions.") from None
    if b"\0" in data:
        raise WanOptError(f"prompts={path} is not a text file (it holds NUL bytes; UTF-16 text does too): "
                          f"save it as UTF-8 text.")
    items: list[tuple[str, dict | str]] = []
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n"), 1):
        label = f"{file.name}:{number}"
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            items.append((label, f"line {number} of {file.name} is not UTF-8 text (byte {exc.start + 1} of the "
                                 f"line): save the file as UTF-8."))
            continue
        if line.strip():
            items.append((label, beside(read_line(line, number, file.name, json_lines), file.parent)))
    if not items:
        raise WanOptError(f"prompts={path} has no prompts in it.")
    return items


def read_line(line: str, number: int, name: str, json_lines: bool) -> dict | str:
    """One line's overrides, or the sentence saying why it cannot be used."""
    if not json_lines:
        entry = {"prompt": line.strip()}
    else:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number} of {name} is not valid JSON ({exc.msg})."
        except (ValueError, RecursionError) as exc:  # a number of thousands of digits, nesting thousands deep
            return f"line {number} of {name} is not JSON wan-opt can read ({str(exc).split(';')[0]})."
    unknown = sorted(set(entry) - set(LINE_KEYS)) if isinstance(entry, dict) else ["(not an object)"]
    if unknown:
        return (f"line {number} of {name} has {', '.join(map(str, unknown))}; a line may set "
                f"{', '.join(LINE_KEYS)}.")
    for key, value in entry.items():
        if (wrong := value_error(key, value)) is not None:
            return f"line {number} of {name}: {wrong}"
    return entry


def beside(entry: dict | str, folder: Path) -> dict | str:
    """A line's image paths read from the prompt file's folder (a path that starts with ~ or / as written)."""
    if not isinstance(entry, dict):
        return entry
    return {key: str(folder / Path(value).expanduser()) if key in IMAGE_KEYS and isinstance(value, str) and value
            else value for key, value in entry.items()}


@functools.cache
def run_knob_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def value_error(key: str, value: Any) -> str | None:
    """Why `value` cannot set run knob `key` (its type as the schema, wan_opt.config.RunConfig, declares it)."""
    kind = run_knob_types().get(key, Any)
    optional = type(None) in typing.get_args(kind)
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)
    shown = json.dumps(value, ensure_ascii=True)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    default = " or null (the model's default)" if optional else ""
    if value is None:
        return None if optional else f'"{key}" is null: give it a value.'
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f'"{key}": {shown} is not a whole number{default}.'
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        return f'"{key}": {shown} is not a finite number{default}.'
    if kind is str and not isinstance(value, str):
        return f'"{key}": {shown} is not text{default}: put it in quotes.'
    if isinstance(value, str) and (bad := control_characters(value)):
        return f'"{key}" holds the control character {bad}: remove it (newlines and tabs are fine).'
    return None


def items_of(cfg: DictConfig) -> list[tuple[str, dict | str]]:
    return read_prompt_file(cfg.prompts) if cfg.prompts else [("prompt", {})]


def with_overrides(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    """`cfg` with one line's values set, each taken as written: a `${...}` in a prompt is text."""
    item = cfg.copy()
    for key, value in overrides.items():
        item[key] = literal(value) if isinstance(value, str) else value
    return item


def run_items(cfg: DictConfig, run_one, job: str = "", results: list[ItemResult] | None = None
              ) -> list[ItemResult]:
    """Run every item of the job, recording each outcome in `results` as it ends; a failure does not stop the
    others. An interrupt (Ctrl-C, SIGTERM) records its item as interrupted and goes on up: the caller's
    `results` then hold what ran."""
    results = [] if results is None else results
    for label, overrides in items_of(cfg):
        start = time.perf_counter()
        prompt = overrides.get("prompt", cfg.prompt) if isinstance(overrides, dict) else ""
        try:
            if isinstance(overrides, str):
                raise WanOptError(overrides)
            output = run_one(with_overrides(cfg, overrides))
            results.append(ItemResult(label, prompt, "ok", round(time.perf_counter() - start, 2), str(output), job=job))
        except Exception as exc:  # whatever one item does, the others still run; a bug keeps its traceback
            error, trace = failure(exc)
            results.append(ItemResult(label, prompt, "failed", round(time.perf_counter() - start, 2),
                                      error=error, job=job, traceback=trace))
            Console(stderr=True).print(f"[red]error[/red] ({escape(label)}): {escape(error)}", highlight=False)
            if trace:
                print(trace, file=sys.stderr, end="")
        except KeyboardInterrupt:
            results.append(ItemResult(label, prompt, "interrupted", round(time.perf_counter() - start, 2),
                                      error="interrupted: nothing was written for this item", job=job))
            raise
    return results


def failure(exc: Exception) -> tuple[str, str | None]:
    """(what the summary says, the traceback) of a failed item. The user's mistakes (WanOptError) and what
    the machine ran out of (memory, disk, a file it could not open) are a sentence; anything else is a bug
    in wan-opt, reported with its traceback."""
    if isinstance(exc, WanOptError):
        return str(exc), None
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, (OSError, MemoryError)) or type(exc).__name__ == "OutOfMemoryError" or (
            isinstance(exc, RuntimeError) and ("can't allocate memory" in first or "out of memory" in first)):
        return f"{type(exc).__name__}: {first}", None
    trace = "".join(traceback.format_exception(exc))
    return f"a bug in wan-opt ({type(exc).__name__}: {first}); the traceback is in this item's summary entry", trace


def write_results(folder: Path, results: list[ItemResult]) -> None:
    from wan_opt.video import write_json

    write_json({"results": [asdict(r) for r in results]}, folder / RESULTS_FILE)


def summarize(results: list[ItemResult], path: Path, title: str) -> bool:
    """Print the summary table, write summary JSON to `path`; True when every item succeeded."""
    from wan_opt.video import write_json

    table = Table(title=escape(title), title_justify="left")  # paths and errors are shown as written
    for column in ("job", "item", "status", "seconds", "output / error"):
        table.add_column(column)
    for r in results:
        style = STATUS_STYLES.get(r.status, "red")
        table.add_row(escape(r.job), escape(r.item), f"[{style}]{r.status}[/{style}]", f"{r.seconds:.1f}",
                      escape(str((r.output if r.status == "ok" else r.error) or "")))
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

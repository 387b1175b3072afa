"""What is on disk under the served folders: runs (an mp4 and its sidecar), the failed items of batches and
sweeps, memory plans and benchmark results, each grouped into its set (a sweep, a batch, or single runs).

The folders are walked again whenever the page asks and a second has passed, so runs that land while the
page is open appear in it; a JSON file is parsed again only when its size or time changed, so a walk over
hundreds of runs costs a few milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_opt.serve import charts, knobs
from wan_opt.serve.files import Roots

SKIPPED_FOLDERS = {"__pycache__", "node_modules", "site-packages"}
LARGEST_JSON = 32 * 2**20  # larger JSON files are not wan-opt's
SWEEP_MARK = "multirun.yaml"  # Hydra writes it at the top of every multirun


def short_id(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:12]


@dataclass
class Parsed:
    stamp: tuple[int, int]  # (mtime_ns, size): parsed again only when it changes
    data: Any


@dataclass
class Snapshot:
    """One walk's outcome: everything the page lists."""

    runs: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    sets: list[dict] = field(default_factory=list)
    plans: list[dict] = field(default_factory=list)
    benchmarks: list[dict] = field(default_factory=list)
    benchmark_charts: dict[str, dict] = field(default_factory=dict)  # id -> its chart, drawn from the parsed file
    full: dict[str, dict] = field(default_factory=dict)  # id -> the record with its sidecar and every knob


def _is_sidecar(data: Any) -> bool:
    """A run's sidecar (wan_opt.app.run_job): its request and the config it ran under."""
    return isinstance(data, dict) and isinstance(data.get("request"), dict) and "config" in data


def _video_of(sidecar_path: Path, sidecar: dict) -> Path:
    """The sidecar's video: the one it names beside it, else the mp4 of the same name."""
    named = sidecar.get("video")
    return sidecar_path.parent / Path(named).name if isinstance(named, str) and named else sidecar_path.with_suffix(".mp4")


def _results(data: Any) -> list[dict]:
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        return [r for r in data["results"] if isinstance(r, dict)]
    return []


class Index:
    """The served folders' runs, kept up to date by `refresh()`; thread-safe."""

    def __init__(self, roots: Roots, min_interval: float = 1.0):
        self.roots = roots
        self.min_interval = min_interval
        self.version = 0
        self.snapshot = Snapshot()
        self._parsed: dict[Path, Parsed] = {}
        self._stamps: dict[Path, tuple] = {}
        self._records: dict[Path, tuple[tuple, dict]] = {}  # sidecar -> (its stamps and set, its record)
        self._walked = 0.0
        self._lock = threading.Lock()

    # -- walking ---------------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> int:
        """Walk the folders again (at most once per `min_interval` unless forced); returns the version, which
        changes whenever anything listed changed."""
        with self._lock:
            if not force and time.monotonic() - self._walked < self.min_interval:
                return self.version
            jsons, sweeps, stamps = self._walk()
            self._walked = time.monotonic()
            if stamps != self._stamps:
                self._stamps = stamps
                self._parsed = {path: self._parse(path, stamps[path]) for path in jsons}
                self._records = {path: known for path, known in self._records.items() if path in self._parsed}
                self.snapshot = self._build(jsons, sweeps)
                self.version += 1
            return self.version

    def _walk(self) -> tuple[list[Path], set[Path], dict[Path, tuple]]:
        jsons, sweeps, stamps = [], set(), {}
        for root in self.roots.folders:
            self._walk_folder(root, root, jsons, sweeps, stamps)
        return jsons, sweeps, stamps

    def _walk_folder(self, root: Path, folder: Path, jsons: list, sweeps: set, stamps: dict) -> None:
        """One folder and those below it: one directory read each, one stat per JSON or mp4 file."""
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            return
        if any(entry.name == SWEEP_MARK for entry in entries):
            sweeps.add(folder)
        for entry in entries:
            if entry.name.startswith("."):  # .hydra/, and the .partial files of a write in progress
                continue
            try:
                if entry.is_dir(follow_symlinks=False):  # a linked folder is not entered
                    if entry.name not in SKIPPED_FOLDERS:
                        self._walk_folder(root, folder / entry.name, jsons, sweeps, stamps)
                    continue
                if not entry.name.endswith((".json", ".mp4")):
                    continue
                path = folder / entry.name
                if entry.is_symlink() and not path.resolve().is_relative_to(root):
                    continue  # a link out of the folder: neither read nor listed
                st = entry.stat()
            except OSError:
                continue
            stamps[path] = (st.st_mtime_ns, st.st_size)
            if entry.name.endswith(".json"):
                jsons.append(path)

    def _parse(self, path: Path, stamp: tuple[int, int]) -> Parsed:
        known = self._parsed.get(path)
        if known is not None and known.stamp == stamp:
            return known
        data = None
        if stamp[1] <= LARGEST_JSON:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                data = None  # half-written by a tool that writes in place, or not JSON: left out
        return Parsed(stamp, data)

    # -- building the lists ----------------------------------------------------------------------------

    def _set_of(self, folder: Path, sweeps: set[Path], batches: set[Path], sets: dict[str, dict]) -> str:
        """The id of the set a run or failure in `folder` belongs to, registering the set on first sight."""
        sweep = next((p for p in (folder, *folder.parents) if p in sweeps), None)
        if sweep is not None:
            kind, where = "sweep", sweep
        elif folder in batches:
            kind, where = "batch", folder
        else:
            root = next(r for r in self.roots.folders if folder == r or folder.is_relative_to(r))
            kind, where = "single", root
        ref = self.roots.ref(where) or ""
        set_id = short_id(kind, ref)
        if set_id not in sets:
            name = where.name if kind != "single" else f"single runs in {where.name or where}"
            if kind == "sweep" and where.parent.name:
                name = f"{where.parent.name}/{where.name}"
            sets[set_id] = {"id": set_id, "kind": kind, "name": name, "folder": ref, "runs": 0, "failed": 0}
        return set_id

    def _build(self, jsons: list[Path], sweeps: set[Path]) -> Snapshot:
        snap, sets = Snapshot(), {}
        parsed = {path: self._parsed[path].data for path in jsons}
        with_results = {p.parent for p, d in parsed.items() if p.name == "results.json" and _results(d)}
        batches = {p for p in with_results if not any(s == p or p.is_relative_to(s) for s in sweeps)}
        for path, data in parsed.items():
            if _is_sidecar(data):
                run = self._run(path, data, sweeps, batches, sets)
                if run is not None:
                    snap.full[run["id"]] = run
            elif path.name == "plan.json" and charts.is_plan(data):
                snap.plans.append(self._plan(path, data))
            elif charts.is_benchmark(data):
                bench_id = short_id("bench", self.roots.ref(path) or "")
                snap.benchmarks.append({"id": bench_id, "file": self.roots.ref(path), "name": path.stem,
                                        "device": data.get("device") or data.get("gpu"),
                                        "command": data.get("command")})
                snap.benchmark_charts[bench_id] = charts.benchmark_chart(data)
        for failure in self._failures(parsed, with_results, sweeps, batches, sets):
            snap.full[failure["id"]] = failure
        for record in snap.full.values():
            sets[record["set"]]["runs" if record["status"] == "ok" else "failed"] += 1
        snap.runs = sorted((r for r in snap.full.values() if r["status"] == "ok"), key=lambda r: -r["created"])
        snap.failures = sorted((r for r in snap.full.values() if r["status"] != "ok"), key=lambda r: -r["created"])
        snap.sets = sorted(sets.values(), key=lambda s: (s["kind"] == "single", s["name"]))
        snap.benchmarks.sort(key=lambda b: b["name"])
        snap.plans.sort(key=lambda p: p["name"])
        return snap

    def _run(self, path: Path, sidecar: dict, sweeps, batches, sets) -> dict | None:
        video = _video_of(path, sidecar)
        stamp = self._stamps.get(video)
        if stamp is None:
            return None  # the video is not (or no longer) there
        set_id = self._set_of(path.parent, sweeps, batches, sets)
        key = (self._stamps[path], stamp, set_id)
        known = self._records.get(path)
        if known is not None and known[0] == key:
            return known[1]  # read before, and neither file nor its set changed since
        record = self._read_run(path, sidecar, video, stamp, set_id)
        self._records[path] = (key, record)
        return record

    def _read_run(self, path: Path, sidecar: dict, video: Path, stamp: tuple, set_id: str) -> dict:
        hardware = sidecar.get("hardware") if isinstance(sidecar.get("hardware"), dict) else {}
        config = sidecar.get("config") if isinstance(sidecar.get("config"), dict) else {}
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        all_knobs = knobs.run_knobs(sidecar)
        video_ref = self.roots.ref(video)
        image_ref = self._image(path.parent, sidecar)
        return {
            "id": short_id("run", self.roots.ref(path) or ""),
            "status": "ok",
            "set": set_id,
            "video": video_ref,
            "sidecar": self.roots.ref(path),
            "image": image_ref,
            "name": video.name,
            "folder": self.roots.ref(path.parent),
            "prompt": str(sidecar.get("prompt") or ""),
            "seed": sidecar.get("seed"),
            "profile": hardware.get("profile") or all_knobs.get("hardware.name"),
            "mode": config.get("mode"),
            "model": model.get("name"),
            "created": stamp[0] / 1e9,
            "figures": knobs.figures(sidecar),
            "knobs": all_knobs,
            "data": sidecar,
        }

    def _image(self, folder: Path, sidecar: dict) -> str | None:
        """The page's name for an image-to-video run's input image, where it lies in a served folder."""
        request = sidecar.get("request") if isinstance(sidecar.get("request"), dict) else {}
        config = sidecar.get("config") if isinstance(sidecar.get("config"), dict) else {}
        for image in (sidecar.get("image"), request.get("image"), config.get("image")):
            if isinstance(image, dict):
                image = image.get("path")
            if isinstance(image, str) and image:
                candidate = folder / image  # an absolute path stays absolute
                if candidate.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and candidate.is_file():
                    return self.roots.ref(candidate.resolve())
        return None

    def _failures(self, parsed: dict[Path, Any], with_results: set[Path], sweeps, batches, sets) -> list[dict]:
        """Failed items from results.json files; from a summary.json only where no results.json says it
        (`with_results`: the folders with a results.json that lists items)."""
        failures = []
        for path, data in parsed.items():
            if path.name == "summary.json":
                if path.parent in with_results or any(p.parent == path.parent for p in with_results):
                    continue
            elif path.name != "results.json":
                continue
            folder = path.parent
            failed = [(number, item) for number, item in enumerate(_results(data)) if item.get("status") != "ok"]
            if not failed:
                continue
            set_id = self._set_of(folder, sweeps, batches, sets)
            config_knobs = knobs.config_knobs(self._job_config(folder))  # one file's items share their job's config
            for number, item in failed:
                failures.append({
                    "id": short_id("failed", self.roots.ref(path) or "", str(number)),
                    "status": "failed",
                    "outcome": str(item.get("status") or "failed"),  # failed, or interrupted
                    "set": set_id,
                    "folder": self.roots.ref(folder),
                    "item": str(item.get("item") or ""),
                    "job": str(item.get("job") or ""),
                    "prompt": str(item.get("prompt") or ""),
                    "error": str(item.get("error") or "failed, with no message recorded"),
                    "seconds": knobs.as_number(item.get("seconds")),
                    "created": self._stamps[path][0] / 1e9,
                    "figures": {},
                    "knobs": config_knobs,
                    "data": item,
                })
        return failures

    def _job_config(self, folder: Path) -> dict:
        """A sweep job's or batch's composed config (Hydra's .hydra/config.yaml), for its failed items' knobs."""
        path = folder / ".hydra" / "config.yaml"
        try:
            import yaml

            config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError, yaml.YAMLError):
            config = None
        return config if isinstance(config, dict) else {}

    def _plan(self, path: Path, data: dict) -> dict:
        return {"id": short_id("plan", self.roots.ref(path) or ""), "file": self.roots.ref(path),
                "name": self.roots.ref(path.parent), "profile": data.get("profile"), "model": data.get("model"),
                "chart": charts.plan_chart(data)}

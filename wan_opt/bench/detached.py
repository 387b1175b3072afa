"""Benchmarks longer than a job may last: started in a session of their own (--detach), their results collected
later from the records they leave beside their logs (--collect)."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from wan_opt.bench.report import markdown
from wan_opt.video import write_json


def detach(argv: list[str], out: Path) -> int:
    """Start this benchmark without --detach in a session of its own (no terminal to hang up on it, and it
    outlives this process), its output to a log in `out`, and write a record beside the log for --collect."""
    # argparse takes any unambiguous prefix of --detach (--det, --deta...): the child must see none of them
    own = [arg for arg in argv if not (arg.startswith("--det") and "--detach".startswith(arg))]
    command = [sys.executable, "-m", "wan_opt.bench", *own]
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_detached_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    log, record = stem.with_suffix(".log"), stem.with_suffix(".json")
    with open(log, "wb") as sink:  # the child holds its own copy of the descriptor
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Never waited for here: it outlives this process (init reaps it), and Popen would warn that it still runs.
    child.returncode = 0
    # A list, not a string, under "command": the page's index takes a string command for a result file.
    write_json({"detached": True, "pid": child.pid, "command": command, "cwd": os.getcwd(), "log": str(log.resolve()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}, record)
    print(f"started pid {child.pid} on {socket.gethostname()}: {shlex.join(command)}\n  log:    {log}\n"
          f"  record: {record}\n  collect with: python -m wan_opt.bench --collect {out}")
    return 0


COLLECT_DONE, COLLECT_ENDED, COLLECT_RUNNING = 0, 1, 3


def collect(folder: Path) -> int:
    """Report each detached run recorded in `folder`: its result, that it still runs, or how its log ends.
    Exit 3 while any still runs (come back later), else 1 where any ended without a result, else 0."""
    records = sorted(folder.glob("bench_detached_*.json"))
    if not records:
        print(f"error: {folder} holds no record of a detached run (bench_detached_*.json).", file=sys.stderr)
        return 2
    codes = [collect_one(json.loads(path.read_text()), path) for path in records]
    return COLLECT_RUNNING if COLLECT_RUNNING in codes else max(codes)


def collect_one(record: dict, path: Path) -> int:
    """One record's state, printed: its result once its log names one that exists, whatever the host (the folder
    may be shared); else running, judged by its pid on its own host only; else ended, with its log's end."""
    log = Path(record["log"])
    text = log.read_text(errors="replace") if log.exists() else ""
    result = result_of(text, Path(record["cwd"]))
    if result is not None and result.exists():
        report = json.loads(result.read_text())
        failed = "".join(f"\n  failed {name}: {why}" for name, why in report.get("failed", {}).items())
        print(f"{path.name}: finished, {result}{failed}\n\n{markdown(report)}")
        return COLLECT_DONE
    if record["host"] != socket.gethostname() and result is None:
        print(f"{path.name}: pid {record['pid']} runs, or ran, on {record['host']}, not here: collect it there.")
        return COLLECT_RUNNING
    if result is None and still_running(record):
        print(f"{path.name}: still running (pid {record['pid']}, started {record['started']}); log: {log}")
        return COLLECT_RUNNING
    ended = f"wrote {result}, which is gone" if result is not None else "ended without a result"
    tail = "\n".join(f"  {line}" for line in text.splitlines()[-20:]) or "  (the log is empty or gone)"
    print(f"{path.name}: pid {record['pid']} {ended}; the end of {log}:\n{tail}")
    return COLLECT_ENDED


def result_of(log: str, cwd: Path) -> Path | None:
    """The result file a run's log names (write() prints `wrote <json>, <png> and <md>`), from the run's folder."""
    found = re.findall(r"^wrote (.+\.json), ", log, flags=re.MULTILINE)
    return cwd / found[-1] if found else None


def still_running(record: dict) -> bool:
    """Whether the record's process still runs this benchmark: a pid alone may since have gone to another program.
    Its arguments after the interpreter must be the record's; an ended, unreaped process reads as ended."""
    if not Path("/proc/self").exists():  # not Linux: no arguments to read, the pid alone
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        return True
    try:
        argv = Path(f"/proc/{record['pid']}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:  # gone
        return False
    own = record["command"][1:]  # -m wan_opt.bench ...: the interpreter's path may read otherwise there
    return len(argv) > len(own) and argv[-len(own):] == own

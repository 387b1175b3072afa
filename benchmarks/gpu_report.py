"""What every GPU benchmark here records beside its measurements (the command, the GPU, the library versions)
and how it writes them, so that each result file says what produced it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wan_opt.app import library_versions  # noqa: E402


def gpu_report(**fields) -> dict:
    """The command line, the GPU's name and the library versions, then `fields`."""
    return {"command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(0),
            "versions": library_versions(), **fields}


def gpu_file_name(prefix: str, report: dict, suffix: str = "") -> str:
    """`<prefix>_<GPU name>[<suffix>].json`, the GPU's name with dashes for spaces."""
    return f"{prefix}_{report['gpu'].replace(' ', '-')}{suffix}.json"


def write_report(report: dict, path: Path | str) -> Path:
    """The report as indented JSON at `path` (its folder made if missing); says where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path

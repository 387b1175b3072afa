"""The page's request form: its fields become the command line's overrides, go through the same checks
(wan_opt.prepare) and run through the same job (wan_opt.app.run_job), one at a time, in a visible queue.

A request the command line would refuse is refused with the command line's sentence, before it is queued;
the memory plan can be asked for first (what `plan=true` prints). Videos land under the page's output folder,
inside a served folder, so they appear in the gallery as they are written.
"""
from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from wan_opt import console
from wan_opt.config import CONF_DIR
from wan_opt.errors import WanOptError
from wan_opt.prepare import compose_config, detection_record, plan_for, prepare
from wan_opt.serve.charts import plan_chart

log = logging.getLogger(__name__)

GROUPS = ("model", "hardware", "mode")  # config groups the form picks from
TEXT_KNOBS = ("prompt", "negative_prompt")  # free text: quoted for Hydra, never interpolated
KNOBS = ("seed", "steps", "guidance", "guidance_2", "size", "frames", "fps")  # as typed, as on the command line
IMAGE = "image"  # image-to-video's input, where the schema has it
COMPOSING = threading.Lock()  # Hydra composes through one global instance


def quoted(text: str) -> str:
    """`text` as one quoted Hydra override value that reads back exactly: its quotes, and the backslashes before
    them or at its end, escaped. (`${` in it stays text: compose_config takes a prompt as written.)"""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def form_overrides(form: dict[str, Any], image: Path | None = None) -> list[str]:
    """The form's fields as command-line overrides; an empty field is left to the model's default."""
    fields = {*GROUPS, *TEXT_KNOBS, *KNOBS, IMAGE}
    unknown = sorted(set(form) - fields)
    if unknown:
        raise WanOptError(f"The form has no field {', '.join(unknown)}: it takes {', '.join(sorted(fields))}.")
    overrides = []
    for key in (*GROUPS, *KNOBS):
        value = str(form.get(key) if form.get(key) is not None else "").strip()
        if value:
            overrides.append(f"{key}={value}")
    for key in TEXT_KNOBS:
        value = form.get(key)
        if value is not None and (str(value).strip() or key == "prompt"):
            overrides.append(f"{key}={quoted(str(value))}")
    if image is not None:
        overrides.append(f"{IMAGE}={quoted(str(image))}")
    return overrides


def compose(overrides: list[str]):
    with COMPOSING:
        return compose_config(overrides)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if p.stem != "auto")


def form_schema() -> dict:
    """What the page's form offers (where it is on): each group's options, the defaults here, each model's own
    defaults."""
    detected = detection_record()
    with COMPOSING:
        base = compose_config([], hardware=detected["profile"])
    models = {}
    for name in options("model"):
        with COMPOSING:
            model = compose_config([f"model={name}"], hardware=detected["profile"]).model
        models[name] = {"sizes": list(model.sizes), "steps": model.steps, "frames": model.frames, "fps": model.fps,
                        "guidance": model.guidance, "guidance_2": model.guidance_2}
    gpu = detected["profile"] != "cpu"
    return {"enabled": True, "detected": detected, "groups": {g: options(g) for g in GROUPS},
            "defaults": {"model": "tiny" if not gpu else OmegaConf.select(base, "model.name"),
                         "hardware": detected["profile"], "mode": OmegaConf.select(base, "mode") or "lossless"},
            "models": models, "image": IMAGE in base}


def preview(form: dict[str, Any], image: Path | None = None) -> dict:
    """The memory plan the request would run under (as `plan=true` gives it); raises WanOptError."""
    overrides = form_overrides({**form, "prompt": form.get("prompt") or "plan"}, image)
    cfg = compose(overrides)
    plan, decided = plan_for(cfg, overrides)
    return {"profile": cfg.hardware.name, "model": cfg.model.name,
            "chart": plan_chart({**plan.to_dict(), "decided_by": decided})}


@dataclass
class Job:
    id: int
    prompt: str
    overrides: list[str]
    cfg: Any = field(repr=False)
    detected: dict | None = None
    plan: dict | None = None
    status: str = "queued"  # queued | running | done | failed | cancelled
    stage: str = "waiting"
    step: int = 0
    steps: int = 0
    expert: str = ""
    step_seconds: float | None = None
    error: str | None = None
    video: str | None = None  # the page's name for the video, once written
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def public(self) -> dict:
        keep = ("id", "prompt", "overrides", "plan", "status", "stage", "step", "steps", "expert", "step_seconds",
                "error", "video", "created", "started", "finished")
        return {key: getattr(self, key) for key in keep}


class JobQueue:
    """Requests from the page, run one at a time on this machine's device by one worker thread."""

    def __init__(self, output: Path, name_of: Callable[[Path], str | None], run: Callable | None = None):
        self.output = Path(output)
        self.name_of = name_of  # a written file -> the page's name for it
        self._run = run
        self._jobs: list[Job] = []
        self._numbers = itertools.count(1)
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="wan-opt-serve-jobs", daemon=True)
        self._worker.start()

    def submit(self, form: dict[str, Any], image: Path | None = None) -> Job:
        """Check the request as the command line would and queue it; raises WanOptError with its sentence."""
        with self._lock:
            number = next(self._numbers)
        folder = self.output / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}-{number}"
        overrides = form_overrides(form, image) + [f"output_dir={quoted(str(folder))}"]
        cfg = compose(overrides)
        detected = detection_record()
        prepared = prepare(cfg, overrides, detected=detected)
        job = Job(number, prepared.request.prompt, overrides, cfg,
                  detected if cfg.hardware.name == detected["profile"] else None,
                  plan_chart({**prepared.plan.to_dict(), "decided_by": prepared.decided}),
                  steps=prepared.request.steps)
        with self._lock:
            self._jobs.append(job)
        self._pending.put(job)
        return job

    def cancel(self, number: int) -> Job:
        with self._lock:
            job = next((j for j in self._jobs if j.id == number), None)
            if job is None:
                raise WanOptError(f"There is no request {number} in the queue.")
            if job.status != "queued":
                raise WanOptError(f"Request {number} is {job.status}: only a waiting request can be cancelled.")
            job.status, job.stage, job.finished = "cancelled", "cancelled", time.time()
        return job

    def jobs(self) -> list[dict]:
        with self._lock:
            return [job.public() for job in self._jobs]

    def stop(self) -> None:
        self._pending.put(None)

    def _work(self) -> None:
        while (job := self._pending.get()) is not None:
            with self._lock:
                if job.status != "queued":
                    continue
                job.status, job.stage, job.started = "running", "loading and encoding the prompt", time.time()
            self._run_one(job)

    def _run_one(self, job: Job) -> None:
        from wan_opt.app import run_job

        def on_step(index: int, steps: int, expert: str, seconds: float) -> None:
            job.step, job.steps, job.expert, job.step_seconds = index + 1, steps, expert, seconds
            job.stage = "denoising" if index + 1 < steps else "decoding and writing the video"

        token = console.step_watcher.set(on_step)
        try:
            path = (self._run or run_job)(job.cfg, job.detected)
            job.video, job.status, job.stage = self.name_of(Path(path)), "done", "done"
        except WanOptError as exc:
            job.error, job.status, job.stage = str(exc), "failed", "failed"
        except Exception as exc:  # a bug: the page says so in one line, the server's log has the traceback
            log.exception("request %d failed", job.id)
            job.error = f"{type(exc).__name__}: {exc} (the server's log has the traceback)"
            job.status, job.stage = "failed", "failed"
        finally:
            console.step_watcher.reset(token)
            job.finished = time.time()

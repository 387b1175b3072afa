"""The page's HTTP side: a small Starlette app over the index, the comparisons and the request queue.

Every answer is JSON or a file; the page (static/, plain HTML, CSS and script of its own) renders JSON with
text nodes only, so nothing in a sidecar or a prompt can become markup or script. Files come only from the
served folders (wan_opt.serve.files), and guard.Guard stands in front of it all.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from wan_opt.errors import WanOptError
from wan_opt.serve import charts, jobs, knobs
from wan_opt.serve.comparisons import Comparisons
from wan_opt.serve.files import Refused, Roots, media_type
from wan_opt.serve.guard import Guard
from wan_opt.serve.index import Index
from wan_opt.serve.query import BadQuery, Query, card, run_query
from wan_opt.video import json_safe

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "charts.js": "text/javascript", "compare.js": "text/javascript",
              "panels.js": "text/javascript", "app.css": "text/css"}
MOST_COMPARED = 4
LARGEST_IMAGE = 32 * 2**20
IMAGE_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


def answer(data: Any, status: int = 200) -> Response:
    try:
        body = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:
        body = json.dumps(json_safe(data), ensure_ascii=False, default=str)
    return Response(body, status, media_type="application/json", headers={"cache-control": "no-store"})


def refusal(status: int, sentence: str) -> Response:
    return answer({"error": sentence}, status)


@dataclass
class Site:
    """What the routes share: the folders and their index, the comparisons, the queue (None: no form)."""

    roots: Roots
    index: Index
    comparisons: Comparisons
    queue: jobs.JobQueue | None
    uploads: Path | None = None
    _form: dict | None = None

    def form(self) -> dict:
        if self._form is None:
            self._form = jobs.form_schema() if self.queue else {"enabled": False}
        return self._form

    def record(self, ident: str) -> dict | None:
        self.index.refresh()
        return self.index.snapshot.full.get(ident)


class Pages:
    """The routes: each answers JSON or a file, refusals as {"error": sentence} with their status."""

    def __init__(self, site: Site):
        self.site = site

    def page(self, request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name != "index.html" and name not in PAGE_FILES:
            return refusal(404, "There is no such page file.")
        kind = PAGE_FILES.get(name, "text/html")
        return FileResponse(STATIC / name, media_type=f"{kind}; charset=utf-8", headers={"cache-control": "no-cache"})

    def version(self, request: Request) -> Response:
        return answer({"version": self.site.index.refresh()})

    def runs(self, request: Request) -> Response:
        try:
            query = Query.parse(request.query_params.multi_items())
        except BadQuery as exc:
            return refusal(400, str(exc))
        version = self.site.index.refresh()
        snap = self.site.index.snapshot
        found = run_query(snap.runs + snap.failures, query)
        shown = found["differing"]
        return answer({"version": version, "roots": [str(p) for p in self.site.roots.folders], "sets": snap.sets,
                       "figure_labels": knobs.FIGURES,
                       **{k: v for k, v in found.items() if k != "records"},
                       "records": [card(r, shown) for r in found["records"]]})

    def run(self, request: Request) -> Response:
        record = self.site.record(request.path_params["id"])
        if record is None:
            return refusal(404, "There is no such run: it may have been moved or deleted.")
        data = record["data"]
        chart = None
        if record["status"] == "ok":
            chart = charts.plan_chart(data.get("memory_plan"), record["figures"].get("peak_gpu_gib"))
        return answer({**card(record, record["knobs"]), "recorded": data, "plan": chart, "figure_labels": knobs.FIGURES,
                       "step_seconds": data.get("step_seconds") if record["status"] == "ok" else None})

    def chosen(self, request: Request) -> list[dict] | Response:
        ids = [i for i in request.query_params.get("ids", "").split(",") if i]
        if not 2 <= len(ids) <= MOST_COMPARED:
            return refusal(400, f"Pick two to {MOST_COMPARED} runs to compare (ids=A,B,...).")
        records = [self.site.record(i) for i in ids]
        if any(r is None or r["status"] != "ok" for r in records):
            return refusal(404, "One of those runs is not in the served folders (or has no video).")
        return records

    def side_by_side(self, request: Request) -> Response:
        records = self.chosen(request)
        if isinstance(records, Response):
            return records
        keys = sorted({k for r in records for k in r["knobs"]})
        table = {k: [r["knobs"].get(k) for r in records] for k in keys}
        return answer({"runs": [card(r, []) for r in records], "knobs": table,
                       "differing": knobs.differing(r["knobs"] for r in records)})

    def metrics(self, request: Request) -> Response:
        records = self.chosen(request)
        if isinstance(records, Response):
            return records
        try:
            paths = [self.site.roots.resolve(r["video"]) for r in records]
        except Refused as exc:
            return refusal(exc.status, str(exc))
        pairs = [{"a": records[0]["id"], "b": r["id"], **self.site.comparisons.pair(paths[0], p)}
                 for r, p in zip(records[1:], paths[1:])]
        return answer({"pairs": pairs})

    def served_file(self, request: Request) -> Response:
        try:
            path = self.site.roots.resolve(request.path_params["ref"])
        except Refused as exc:
            return refusal(exc.status, str(exc))
        return FileResponse(path, media_type=media_type(path), content_disposition_type="inline")

    def clip(self, request: Request) -> Response:
        path = self.site.comparisons.clip(request.path_params["ref"])
        if path is None:
            return refusal(404, "There is no such comparison clip.")
        return FileResponse(path, media_type="video/mp4", content_disposition_type="inline")

    def benchmarks(self, request: Request) -> Response:
        self.site.index.refresh()
        return answer({"benchmarks": self.site.index.snapshot.benchmarks})

    def benchmark(self, request: Request) -> Response:
        self.site.index.refresh()
        snapshot = self.site.index.snapshot
        found = next((b for b in snapshot.benchmarks if b["id"] == request.path_params["id"]), None)
        if found is None:
            return refusal(404, "There is no such benchmark file.")
        return answer({**found, "chart": snapshot.benchmark_charts[found["id"]]})

    def plans(self, request: Request) -> Response:
        self.site.index.refresh()
        return answer({"plans": self.site.index.snapshot.plans})

    def form(self, request: Request) -> Response:
        return answer(self.site.form())

    async def form_fields(self, request: Request) -> tuple[dict, Path | None] | Response:
        """The form's fields, and the uploaded image they name (by its page name: only a served file)."""
        if self.site.queue is None:
            return refusal(403, "The request form is off (wan-opt serve --no-form).")
        fields = await _json(request)
        if isinstance(fields, Response):
            return fields
        image = fields.pop("image", None)
        if not image:
            return fields, None
        try:
            return fields, self.site.roots.resolve(str(image))
        except Refused as exc:
            return refusal(exc.status, str(exc))

    async def plan(self, request: Request) -> Response:
        given = await self.form_fields(request)
        if isinstance(given, Response):
            return given
        return await _in_thread(lambda: answer(jobs.preview(*given)))

    async def submit(self, request: Request) -> Response:
        given = await self.form_fields(request)
        if isinstance(given, Response):
            return given
        return await _in_thread(lambda: answer(self.site.queue.submit(*given).public(), 202))

    def queue(self, request: Request) -> Response:
        return answer({"jobs": self.site.queue.jobs() if self.site.queue else [], "enabled": self.site.queue is not None})

    def cancel(self, request: Request) -> Response:
        if self.site.queue is None:
            return refusal(403, "The request form is off (wan-opt serve --no-form).")
        try:
            return answer(self.site.queue.cancel(int(request.path_params["id"])).public())
        except WanOptError as exc:
            return refusal(409, str(exc))

    async def upload(self, request: Request) -> Response:
        """An input image for image-to-video, kept under the page's output folder (so it is served too)."""
        if self.site.queue is None or self.site.uploads is None or not (await run_in_threadpool(self.site.form))["image"]:
            return refusal(403, "This wan-opt takes no input image.")
        suffix = IMAGE_SUFFIXES.get(request.headers.get("content-type", "").split(";")[0].strip())
        too_large = refusal(400, "Send one PNG, JPEG or WebP image of at most 32 MB.")
        if suffix is None or int(request.headers.get("content-length") or 0) > LARGEST_IMAGE:
            return too_large
        body = bytearray()
        async for chunk in request.stream():  # counted as it comes: a client may not say its length
            body += chunk
            if len(body) > LARGEST_IMAGE:
                return too_large
        if not body:
            return too_large
        body = bytes(body)
        self.site.uploads.mkdir(parents=True, exist_ok=True)
        path = self.site.uploads / f"{hashlib.sha1(body).hexdigest()[:16]}{suffix}"
        path.write_bytes(body)
        return answer({"image": self.site.roots.ref(path.resolve())})


def build_app(site: Site, token: str | None = None, hosts: set[str] | None = None):
    """The ASGI app for `site`, behind the guard."""
    pages = Pages(site)
    routes = [
        Route("/", pages.page), Route("/static/{name}", pages.page),
        Route("/api/version", pages.version), Route("/api/runs", pages.runs), Route("/api/runs/{id}", pages.run),
        Route("/api/side-by-side", pages.side_by_side), Route("/api/metrics", pages.metrics),
        Route("/api/benchmarks", pages.benchmarks), Route("/api/benchmarks/{id}", pages.benchmark),
        Route("/api/plans", pages.plans), Route("/api/form", pages.form), Route("/api/plan", pages.plan, methods=["POST"]),
        Route("/api/requests", pages.submit, methods=["POST"]), Route("/api/queue", pages.queue),
        Route("/api/queue/{id:int}/cancel", pages.cancel, methods=["POST"]),
        Route("/api/upload", pages.upload, methods=["POST"]),
        Route("/files/{ref:path}", pages.served_file), Route("/clips/{ref:path}", pages.clip),
    ]
    return Guard(Starlette(routes=routes), token, hosts)


async def _json(request: Request) -> dict | Response:
    try:
        fields = json.loads(await request.body())
    except ValueError:
        return refusal(400, "The request is not JSON.")
    if not isinstance(fields, dict):
        return refusal(400, "Send the form's fields as one JSON object.")
    return fields


async def _in_thread(work) -> Response:
    """Composing and checking import torch and may take seconds: off the event loop, errors as sentences."""
    def guarded():
        try:
            return work()
        except WanOptError as exc:
            return refusal(400, str(exc))

    return await run_in_threadpool(guarded)

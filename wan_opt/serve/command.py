"""`wan-opt serve [DIR ...]` and `python -m wan_opt.serve`: a local page over the runs under the folders.

    wan-opt serve multirun/2025-06-01/14-03-22-4242     # one sweep
    wan-opt serve                                         # ./outputs, ./multirun and ./benchmarks/results
    wan-opt serve runs/ --host 0.0.0.0 --port 9000        # another address: a token is made and printed

docs/web.md says what the page shows and what it refuses.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

from wan_opt.errors import WanOptError

DEFAULT_FOLDERS = ("outputs", "multirun", "benchmarks/results")  # where the command line and benchmarks write
DEFAULT_PORT = 8642
EXTRA = 'pip install "wan-opt[web]" (in a checkout: pip install -e ".[web]")'


def folders_to_serve(given: Sequence[str]) -> list[Path]:
    """The folders named, each an existing folder; with none named, wan-opt's own output folders here."""
    if not given:
        found = [Path(f) for f in DEFAULT_FOLDERS if Path(f).is_dir()]
        if not found:
            raise WanOptError(f"There is no {', '.join(DEFAULT_FOLDERS[:2])} or {DEFAULT_FOLDERS[2]} folder here: "
                              f"name the folders to serve, e.g. wan-opt serve multirun/.")
        return found
    folders = []
    for name in given:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise WanOptError(f"{name} is not a folder: name folders that hold runs, e.g. wan-opt serve multirun/.")
        folders.append(path)
    return folders


def token_for(host: str, given: str | None) -> str | None:
    """The token the page asks for: the one given, else one made up when the address is not this machine's."""
    from wan_opt.serve.guard import is_loopback

    return given or (None if is_loopback(host) else secrets.token_urlsafe(24))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so that a busy port is one sentence."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise WanOptError(f"Cannot listen on {host}:{port} ({exc.strerror}): pass --port another port, "
                          f"or --port 0 for any free one.") from None
    sock.listen(128)
    return sock


def make_site(folders: Sequence[Path], form: bool = True, output: Path | None = None, cache: Path | None = None):
    """The index, comparisons and queue over `folders`; the form's videos go to `output` (default: web/ in the
    first folder), which must lie inside a served folder so that its runs appear on the page."""
    from wan_opt.serve.comparisons import Comparisons
    from wan_opt.serve.files import Roots
    from wan_opt.serve.index import Index
    from wan_opt.serve.jobs import JobQueue
    from wan_opt.serve.web import Site

    roots = Roots(folders)
    output = Path(output).expanduser().resolve() if output else roots.folders[0] / "web"
    if roots.ref(output) is None:
        raise WanOptError(f"--output {output} is outside the served folders: pick a folder inside one of them, "
                          f"so that the runs it gets appear on the page.")
    if cache is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache = Path(base) / "wan-opt" / "compare"
    queue = JobQueue(output, lambda path: roots.ref(Path(path).resolve())) if form else None
    index = Index(roots)
    index.refresh(force=True)
    return Site(roots, index, Comparisons(cache), queue, uploads=output / "inputs")


@contextlib.contextmanager
def serving(app, sock: socket.socket) -> Iterator[str]:
    """Run `app` on `sock` in a thread (for tests and embedding); yields its address, stops on the way out."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    try:
        while not server.started and thread.is_alive():
            thread.join(0.02)
        yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wan-opt serve", description="A local page over wan-opt's runs: the gallery, "
                                "side by side, memory plans, benchmarks and a request form.")
    p.add_argument("folders", nargs="*", metavar="DIR", help="folders of runs, batches, sweeps or benchmark "
                   f"results (default: {', '.join(DEFAULT_FOLDERS)} where they exist)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--token", default=os.environ.get("WAN_OPT_SERVE_TOKEN"),
                   help="token the page asks for (default: made up and printed when --host is not loopback)")
    p.add_argument("--no-form", action="store_true", help="no request form: the page only shows what is on disk")
    p.add_argument("--output", type=Path, help="where the form's videos go (default: web/ in the first folder)")
    p.add_argument("--cache", type=Path, help="where comparisons are kept (default: ~/.cache/wan-opt/compare)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print(f"error: wan-opt serve needs the web extra: {EXTRA}.", file=sys.stderr)
        return 2
    from wan_opt.serve.guard import allowed_hosts
    from wan_opt.serve.web import build_app

    try:
        folders = folders_to_serve(args.folders)
        token = token_for(args.host, args.token)
        sock = bind(args.host, args.port)
        site = make_site(folders, form=not args.no_form, output=args.output, cache=args.cache)
    except WanOptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    address = f"http://{shown_host}:{port}/" + (f"?token={token}" if token else "")
    snap = site.index.snapshot
    print(f"wan-opt serve: {len(snap.runs)} runs, {len(snap.failures)} failed items, {len(snap.benchmarks)} "
          f"benchmark files in {', '.join(str(f) for f in folders)}")
    print(f"open {address}", flush=True)
    app = build_app(site, token, allowed_hosts(args.host, port))
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")).run(sockets=[sock])
    finally:
        if site.queue is not None:
            site.queue.stop()
    return 0

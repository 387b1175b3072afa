"""`wan-opt serve`: a local web page over the videos, sidecars, batches, sweeps, memory plans and benchmark
results that wan-opt writes, with a request form that runs through the command line's own path.

Needs the `web` extra (Starlette and uvicorn); nothing here is imported by a run. docs/web.md describes it.

    files.py        which files may be served (only under the given folders)
    knobs.py        a sidecar's knobs and figures
    index.py        walking the folders: runs, failed items, sets, plans, benchmarks
    query.py        filtering and sorting them, and the knobs that differ
    charts.py       what the memory-plan and benchmark charts draw
    comparisons.py  PSNR/SSIM per frame from wan_opt.compare, cached
    jobs.py         the request form and its one-at-a-time queue
    guard.py        host, token and origin checks, security headers
    web.py          the HTTP routes;  command.py  the command;  static/  the page
"""

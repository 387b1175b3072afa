"""`wan-opt serve`: the index, filters, comparisons, the request form and the refusals, over HTTP on the CPU, on a
real sweep, batch and plan made with model=tiny."""
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from wan_opt import console
from wan_opt.errors import WanOptError
from wan_opt.prepare import compose_config
from wan_opt.serve import charts, jobs, knobs
from wan_opt.serve.files import Refused, Roots
from wan_opt.serve.index import Index
from wan_opt.serve.query import BadQuery, Query, run_query

REPO = Path(__file__).resolve().parent.parent
SCRIPT_PROMPT = "a cat <script>window.pwned=1</script><img src=x onerror=window.pwned=2> on a mat"
FOX = "a red fox running through fresh snow"
BENCH = ("bench_h100_1280x720x81.json", "e2e_wan22_t2v_a14b_rtx4090_cap24.json")


def wan_opt(*args, timeout=300):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """A sweep (steps x frames x seed: 8 videos, and 4 jobs that fail on frames=10), a batch with a bad line and
    a prompt holding markup, a plan, and two benchmark files: what the page is for, made by the command line."""
    top = tmp_path_factory.mktemp("served")
    runs, bench = top / "runs", top / "bench"
    sweep = wan_opt("-m", "model=tiny", f"prompt='{FOX}'", "steps=1,2", "frames=5,9,10", "seed=7,8",
                    f"hydra.sweep.dir={runs / 'sweep'}")
    assert sweep.returncode == 1, sweep.stderr  # the sweep goes on past its failed jobs and says so at the end
    lines = runs / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": SCRIPT_PROMPT, "seed": 1}) + '\nnot json\n{"prompt": "a cat", "seed": 2, "size": "160*96"}\n')
    batch = wan_opt("model=tiny", f"prompts={lines}", "steps=1", "frames=5", f"output_dir={runs / 'batch'}",
                    f"hydra.run.dir={runs / 'batch'}")
    assert batch.returncode == 1, batch.stderr
    plan = wan_opt("plan=true", "model=wan22_t2v_a14b", "hardware=h100", "prompt=x", f"output_dir={runs / 'plan'}",
                   f"hydra.run.dir={runs / 'plan'}")
    assert plan.returncode == 0, plan.stderr
    bench.mkdir()
    for name in BENCH:
        shutil.copy(REPO / "benchmarks" / "results" / name, bench / name)
    return runs, bench


@pytest.fixture
def on_disk(made):
    """Page names -> paths, as the server resolves them."""
    return Roots(made)


@pytest.fixture(scope="session")
def site(made, tmp_path_factory):
    pytest.importorskip("starlette", reason="the web extra (starlette, uvicorn) is not installed")
    from wan_opt.serve.command import make_site

    site = make_site(made, cache=tmp_path_factory.mktemp("compare-cache"))
    site.index.min_interval = 0.0  # every request looks at the disk again
    yield site
    site.queue.stop()


@pytest.fixture(scope="session")
def server(site):
    pytest.importorskip("uvicorn", reason="the web extra (starlette, uvicorn) is not installed")
    from wan_opt.serve.command import bind, serving
    from wan_opt.serve.guard import allowed_hosts
    from wan_opt.serve.web import build_app

    sock = bind("127.0.0.1", 0)
    with serving(build_app(site, None, allowed_hosts("127.0.0.1", sock.getsockname()[1])), sock) as url:
        yield url


def call(url, path, method="GET", body=None, headers=None):
    """(status, headers, body) for a raw request: the path is sent exactly as given, never normalised."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Host": f"{host}:{port}", **(headers or {})}
    if isinstance(body, (dict, list)):
        body, headers = json.dumps(body), {"Content-Type": "application/json", **headers}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def get_json(url, path, **kwargs):
    status, _, data = call(url, path, **kwargs)
    return status, json.loads(data)


def runs(url, query=""):
    status, answer = get_json(url, "/api/runs" + query)
    assert status == 200, answer
    return answer


# -- the index ---------------------------------------------------------------------------------------------------


def test_the_index_holds_the_sweep_the_batch_and_their_failures(server):
    answer = runs(server)
    kinds = {s["kind"]: s for s in answer["sets"]}
    assert kinds["sweep"]["runs"] == 8 and kinds["sweep"]["failed"] == 4
    assert kinds["batch"]["runs"] == 2 and kinds["batch"]["failed"] == 1
    ok = [r for r in answer["records"] if r["status"] == "ok"]
    failed = [r for r in answer["records"] if r["status"] == "failed"]
    assert len(ok) == 10 and len(failed) == 5
    sweep_failures = [r for r in failed if r["set"] == kinds["sweep"]["id"]]
    assert {r["error"] for r in sweep_failures} == {"frames=10 is not of the form 4n+1: use frames=9 or frames=13."}
    assert {r["knobs"]["frames"] for r in sweep_failures} == {10}  # from each job's own config
    [bad_line] = [r for r in failed if r["set"] == kinds["batch"]["id"]]
    assert bad_line["item"] == "prompts.jsonl:2" and "not valid JSON" in bad_line["error"]
    for run in ok:
        assert {"s_per_step", "total_s", "plan_gpu_gb"} <= set(run["figures"])
        assert run["profile"] == "cpu" and run["mode"] == "lossless" and run["video"].endswith(".mp4")


def test_a_set_reports_the_knobs_that_differ_across_it(server):
    answer = runs(server)
    sweep = next(s["id"] for s in answer["sets"] if s["kind"] == "sweep")
    in_sweep = runs(server, f"?set={sweep}")
    assert in_sweep["differing"] == ["frames", "seed", "steps"]
    assert in_sweep["facets"]["frames"] == {"5": 4, "9": 4, "10": 4}  # frames=10 failed: from each job's config
    assert in_sweep["facets"]["steps"] == {"1": 6, "2": 6} and in_sweep["total"] == 12
    card = next(r for r in in_sweep["records"] if r["status"] == "ok")
    assert set(card["knobs"]) == {"hardware.name", "mode", "model.name", "seed", "steps", "frames"}  # not all
    assert "recorded" not in card and "data" not in card
    everything = runs(server)
    assert {"seed", "steps", "frames", "size"} <= set(everything["differing"])  # a batch line set its size


def test_filters_and_sorting(server):
    sweep = next(s["id"] for s in runs(server)["sets"] if s["kind"] == "sweep")
    two = runs(server, f"?set={sweep}&status=ok&f=steps=2")
    assert two["count"] == 4 and {r["knobs"]["steps"] for r in two["records"]} == {2}
    assert two["facets"]["steps"] == {"1": 4, "2": 4}  # a facet counts what its other filters leave
    both = runs(server, f"?set={sweep}&status=ok&f=steps=1&f=steps=2&f=seed=8&f=frames=9")
    assert both["count"] == 2 and {(r["knobs"]["seed"], r["knobs"]["frames"]) for r in both["records"]} == {(8, 9)}
    failed = runs(server, "?status=failed&q=4n%2B1")
    assert failed["count"] == 4
    cats = runs(server, "?q=CAT")
    assert sorted(r["prompt"] for r in cats["records"]) == ["a cat", SCRIPT_PROMPT]
    by_speed = runs(server, "?status=ok&sort=s_per_step&order=asc")["records"]
    speeds = [r["figures"]["s_per_step"] for r in by_speed]
    assert speeds == sorted(speeds)
    fastest = speeds[0]
    assert runs(server, f"?status=ok&max=s_per_step={fastest}")["count"] == speeds.count(fastest)
    by_seed = [r["knobs"]["seed"] for r in runs(server, "?status=ok&sort=seed&order=desc")["records"]]
    assert by_seed == sorted(by_seed, reverse=True)
    status, answer = get_json(server, "/api/runs?min=s_per_step=fast")
    assert status == 400 and answer["error"] == "min=s_per_step=fast: 'fast' is not a number."


def test_new_runs_appear_while_the_page_is_open(server, made, on_disk):
    before = runs(server)
    version = before["version"]
    source = next(r for r in before["records"] if r["status"] == "ok" and r["set"] != "")
    folder = made[0] / "later"
    folder.mkdir()
    video = on_disk.resolve(source["video"])
    sidecar = json.loads(video.with_suffix(".json").read_text())
    # The sidecar may land before its video: no run until the video is there too.
    (folder / "late.json").write_text(json.dumps({**sidecar, "video": "late.mp4"}))
    assert runs(server)["count"] == before["count"]
    shutil.copy(video, folder / "late.mp4")
    after = runs(server)
    assert after["version"] > version and after["count"] == before["count"] + 1
    assert any(r["video"].endswith("later/late.mp4") for r in after["records"])
    shutil.rmtree(folder)
    assert runs(server)["count"] == before["count"]


# -- one run, side by side, charts ---------------------------------------------------------------------------------


def test_a_run_and_its_memory_plan(server):
    run = next(r for r in runs(server, "?status=ok")["records"])
    status, answer = get_json(server, f"/api/runs/{run['id']}")
    assert status == 200 and answer["recorded"]["prompt"] == answer["prompt"]
    assert {"encode", "denoise_high_noise", "decode"} <= {s["name"] for s in answer["plan"]["stages"]}
    assert answer["plan"]["vram_budget_gb"] is None  # the CPU profile has no card to draw
    assert len(answer["step_seconds"]) == answer["knobs"]["steps"]
    assert get_json(server, "/api/runs/000000000000")[0] == 404


def test_side_by_side_highlights_the_differing_knobs_and_plots_psnr_ssim(server, on_disk, tmp_path):
    from wan_opt.compare import compare_videos

    sweep = next(s["id"] for s in runs(server)["sets"] if s["kind"] == "sweep")
    a, b = runs(server, f"?set={sweep}&status=ok&f=seed=7&f=frames=9&sort=steps&order=asc")["records"]
    status, side = get_json(server, f"/api/side-by-side?ids={a['id']},{b['id']}")
    assert status == 200 and side["differing"] == ["steps"] and side["knobs"]["steps"] == [1, 2]
    status, metrics = get_json(server, f"/api/metrics?ids={a['id']},{b['id']}")
    assert status == 200
    [pair] = metrics["pairs"]
    files = [on_disk.resolve(a["video"]), on_disk.resolve(b["video"])]
    expected = compare_videos(*files, out_dir=tmp_path)
    assert len(pair["psnr"]) == len(pair["ssim"]) == 9
    assert pair["psnr"] == pytest.approx(expected.psnr) and pair["ssim"] == pytest.approx(expected.ssim)
    status, headers, clip = call(server, f"/clips/{pair['clip']}")
    assert status == 200 and headers["content-type"] == "video/mp4" and clip[4:8] == b"ftyp"
    assert not list(files[0].parent.glob("compare_*"))  # nothing written beside the user's videos
    batch = next(r for r in runs(server, "?status=ok&q=cat")["records"])
    status, metrics = get_json(server, f"/api/metrics?ids={a['id']},{batch['id']}")
    assert status == 200 and "compare two videos rendered with the same size" in metrics["pairs"][0]["error"]
    assert get_json(server, f"/api/side-by-side?ids={a['id']}")[0] == 400


def test_benchmark_files_and_plans_as_charts(server):
    status, listing = get_json(server, "/api/benchmarks")
    names = {b["name"]: b["id"] for b in listing["benchmarks"]}
    assert status == 200 and set(names) == {Path(n).stem for n in BENCH}
    status, bench = get_json(server, f"/api/benchmarks/{names['bench_h100_1280x720x81']}")
    rows = {r["name"]: r for r in bench["chart"]["rows"]}
    assert bench["chart"]["baseline"] == "diffusers" and rows["diffusers"]["ratio"] == 1.0
    assert rows["h100,mode=fast"]["seconds_per_step"] == 16.6864 and rows["h100,mode=fast"]["ratio"] == 1.485
    status, e2e = get_json(server, f"/api/benchmarks/{names['e2e_wan22_t2v_a14b_rtx4090_cap24']}")
    assert e2e["chart"]["kind"] == "runs" and e2e["chart"]["rows"][0]["stages"]["vae_decode"] == 5.73
    status, plans = get_json(server, "/api/plans")
    [plan] = plans["plans"]
    assert plan["profile"] == "h100" and plan["chart"]["vram_budget_gb"] > 0
    assert plan["chart"]["usable_gb"] == pytest.approx(plan["chart"]["vram_budget_gb"] * 0.92, abs=0.01)


# -- the request form -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("frames", "10"), ("seed", "abc"), ("hardware", "h1000")])
def test_bad_input_is_the_command_lines_own_sentence(server, field, value, tmp_path):
    status, answer = get_json(server, "/api/requests", method="POST",
                              body={"model": "tiny", "hardware": "cpu", "prompt": "a fox", field: value})
    cli = wan_opt("model=tiny", "hardware=cpu", "prompt=a fox", f"{field}={value}", f"hydra.run.dir={tmp_path}")
    assert status == 400 and cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [f"error: {answer['error']}"]


def test_a_form_field_the_command_line_does_not_have(server):
    status, answer = get_json(server, "/api/requests", method="POST", body={"model": "tiny", "colour": "red"})
    assert status == 400 and "no field colour" in answer["error"]


def test_the_plan_before_it_runs(server):
    status, plan = get_json(server, "/api/plan", method="POST",
                            body={"model": "wan22_t2v_a14b", "hardware": "h100", "mode": "lossless", "prompt": ""})
    assert status == 200 and plan["profile"] == "h100" and plan["chart"]["vram_budget_gb"] == 76.0
    assert plan["chart"]["mechanisms"]["experts"] == "resident"
    status, refused = get_json(server, "/api/plan", method="POST", body={"model": "tiny", "frames": "6"})
    assert status == 400 and refused["error"].startswith("frames=6 is not of the form 4n+1")


def test_a_request_runs_through_the_queue_and_lands_in_the_gallery(server, made):
    status, job = get_json(server, "/api/requests", method="POST",
                           body={"model": "tiny", "hardware": "cpu", "mode": "lossless", "prompt": "it's a ${oc.env:HOME} fox",
                                 "seed": "11", "steps": "2", "frames": "5"})
    assert status == 202 and job["status"] == "queued" and job["plan"]["stages"]
    deadline = time.time() + 240
    while time.time() < deadline:
        done = next(j for j in get_json(server, "/api/queue")[1]["jobs"] if j["id"] == job["id"])
        if done["status"] in ("done", "failed"):
            break
        time.sleep(0.5)
    assert done["status"] == "done", done
    assert done["step"] == done["steps"] == 2 and done["video"].startswith("0/web/")
    found = runs(server, "?q=oc.env")["records"]
    assert [r["prompt"] for r in found] == ["it's a ${oc.env:HOME} fox"]  # taken as written, never interpolated
    assert found[0]["knobs"]["seed"] == 11 and found[0]["video"] == done["video"]
    assert "auto-detected" in get_json(server, f"/api/runs/{found[0]['id']}")[1]["recorded"]["hardware"]["why"]


def test_an_input_image_is_uploaded_into_a_served_folder(server, on_disk):
    import io

    import imageio.v2 as imageio
    import numpy as np

    if not get_json(server, "/api/form")[1]["image"]:
        pytest.skip("this wan-opt has no image-to-video (no `image` setting)")
    buffer = io.BytesIO()
    imageio.imwrite(buffer, np.full((96, 160, 3), 200, np.uint8), format="png")
    png = buffer.getvalue()
    status, _, body = call(server, "/api/upload", method="POST", body=png, headers={"Content-Type": "image/png"})
    ref = json.loads(body)["image"]
    assert status == 200 and ref.startswith("0/web/inputs/") and on_disk.resolve(ref).read_bytes() == png
    status, plan = get_json(server, "/api/plan", method="POST", body={"model": "tiny_i2v", "hardware": "cpu", "image": ref})
    assert status == 200 and plan["model"] == "tiny_i2v", plan
    status, refused = get_json(server, "/api/plan", method="POST", body={"model": "tiny_i2v", "image": "0/../../etc/passwd"})
    assert status == 403
    status, _, _ = call(server, "/api/upload", method="POST", body=b"GIF89a", headers={"Content-Type": "image/gif"})
    assert status == 400


def test_the_queue_runs_one_at_a_time_and_reports_progress(tmp_path):
    running, most, release = [], [0], threading.Event()

    def fake_run(cfg, detected):
        running.append(cfg.seed)
        most[0] = max(most[0], len(running))
        with console.denoise_progress(3) as on_step:
            for i in range(3):
                on_step(i, 3, "high_noise", 0.1)
                if cfg.seed == 1:
                    release.wait(10)
        running.remove(cfg.seed)
        if cfg.seed == 3:
            raise WanOptError("the third one fails with its sentence.")
        return tmp_path / f"{cfg.seed}.mp4"

    queue = jobs.JobQueue(tmp_path, lambda p: f"0/{p.name}", run=fake_run)
    try:
        first, second, third, fourth = (queue.submit({"model": "tiny", "hardware": "cpu", "prompt": "x", "seed": str(s)})
                                        for s in (1, 2, 3, 4))
        deadline = time.time() + 30
        while first.step < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert (first.status, first.stage, first.step, first.steps) == ("running", "denoising", 1, 3)
        assert second.status == "queued"
        assert queue.cancel(fourth.id).status == "cancelled"
        with pytest.raises(WanOptError, match="only a waiting request"):
            queue.cancel(first.id)
        release.set()
        while third.status in ("queued", "running") and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert [j["status"] for j in queue.jobs()] == ["done", "done", "failed", "cancelled"]
        assert third.error == "the third one fails with its sentence." and first.video == "0/1.mp4"
        assert most[0] == 1 and first.stage == "done"
    finally:
        queue.stop()


# -- what is refused ---------------------------------------------------------------------------------------------


def test_only_files_under_the_served_folders(server, made, on_disk, tmp_path_factory):
    video = next(r["video"] for r in runs(server, "?status=ok")["records"])
    status, headers, body = call(server, "/files/" + quote(video), headers={"Range": "bytes=0-99"})
    assert status == 206 and headers["content-type"] == "video/mp4" and len(body) == 100  # seekable in a browser
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.mp4").write_bytes(b"not yours")
    (made[0] / "link-out.mp4").symlink_to(outside / "secret.mp4")
    (made[0] / "link-in.mp4").symlink_to(on_disk.resolve(video))
    try:
        refused = {
            "/files/0/../../../etc/passwd": 403, "/files/0/%2e%2e/%2e%2e/etc/passwd": 403,
            "/files/0/sweep/..%2f..%2f..%2fetc/hostname": 403, "/files//etc/passwd": 404, "/files/0//etc/passwd": 403,
            f"/files/0/{quote(str(outside / 'secret.mp4'))}": 403, "/files/0/link-out.mp4": 403,
            "/files/0/sweep/0-tiny-cpu/.hydra/config.yaml": 403, "/files/0/sweep/0-tiny-cpu/wan-opt.log": 403,
            "/files/0/nothing-here.mp4": 404, "/files/7/x.mp4": 404, "/clips/../../etc/passwd": 404,
        }
        for path, expected in refused.items():
            status, _, body = call(server, path)
            assert status == expected and b"not yours" not in body and b"root:" not in body, (path, status, body)
        assert call(server, "/files/0/link-in.mp4")[0] == 200  # a link that stays inside is fine
    finally:
        (made[0] / "link-out.mp4").unlink()
        (made[0] / "link-in.mp4").unlink()


def test_roots_refuse_what_leads_out(tmp_path):
    (tmp_path / "served" / "a").mkdir(parents=True)
    (tmp_path / "served" / "a" / "v.mp4").write_bytes(b"v")
    (tmp_path / "elsewhere.json").write_text("{}")
    (tmp_path / "served" / "a" / "out.json").symlink_to(tmp_path / "elsewhere.json")
    roots = Roots([tmp_path / "served"])
    assert roots.resolve("0/a/v.mp4") == (tmp_path / "served" / "a" / "v.mp4").resolve()
    for ref, status in [("0/a/../../elsewhere.json", 403), ("0/a/out.json", 403), ("0//etc/passwd", 403),
                        ("0/a\\..\\v.mp4", 403), ("1/a/v.mp4", 404), ("0/", 403), ("x/a/v.mp4", 404)]:
        with pytest.raises(Refused) as refused:
            roots.resolve(ref)
        assert refused.value.status == status, ref


def test_another_host_header_and_cross_site_changes_are_refused(server):
    assert call(server, "/api/runs", headers={"Host": "attacker.example:80"})[0] == 403  # DNS rebinding
    status, _, _ = call(server, "/api/requests", method="POST", body={"prompt": "x"},
                        headers={"Origin": "http://attacker.example"})
    assert status == 403
    status, _, _ = call(server, "/api/requests", method="POST", body="prompt=x",
                        headers={"Content-Type": "text/plain"})  # a form another page could post without asking
    assert status == 415


def test_another_address_needs_the_token(site):
    from wan_opt.serve.command import bind, serving
    from wan_opt.serve.guard import allowed_hosts
    from wan_opt.serve.web import build_app

    sock = bind("127.0.0.1", 0)
    app = build_app(site, "s3cret-token", allowed_hosts("0.0.0.0", sock.getsockname()[1]))
    with serving(app, sock) as url:
        assert call(url, "/api/runs")[0] == 401
        assert call(url, "/files/0/plan/plan.json")[0] == 401
        assert call(url, "/?token=wrong")[0] == 401
        status, headers, _ = call(url, "/?token=s3cret-token&x=1")
        assert status == 303 and headers["location"] == "/?x=1" and "HttpOnly" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        assert call(url, "/api/runs", headers={"Cookie": cookie})[0] == 200
        assert call(url, "/api/runs", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        assert call(url, "/api/runs", headers={"Cookie": "wan_opt_token=guess"})[0] == 401


def test_a_non_loopback_address_gets_a_token_and_a_busy_port_is_a_sentence():
    from wan_opt.serve.command import bind, token_for

    assert token_for("127.0.0.1", None) is None and token_for("localhost", None) is None
    assert len(token_for("0.0.0.0", None)) >= 24 and token_for("0.0.0.0", "mine") == "mine"
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(WanOptError, match=r"Cannot listen on 127.0.0.1:\d+ .*--port"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_nothing_from_a_sidecar_or_prompt_becomes_markup(server):
    status, headers, page = call(server, "/")
    assert status == 200 and b"pwned" not in page and "script-src 'self'" in headers["content-security-policy"]
    status, headers, body = call(server, "/api/runs")
    assert headers["content-type"] == "application/json" and headers["x-content-type-options"] == "nosniff"
    assert SCRIPT_PROMPT in body.decode()  # the prompt as data, to be written as text
    status, headers, _ = call(server, "/files/0/plan/plan.json")
    assert headers["content-type"] == "application/json" and "default-src 'self'" in headers["content-security-policy"]
    # The page's own script writes text nodes only: nothing that parses markup.
    for name in ("app.js", "compare.js", "panels.js", "charts.js"):
        status, _, script = call(server, f"/static/{name}")
        assert status == 200
        for sink in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write", b"eval(", b"new Function"):
            assert sink not in script, (name, sink)


def test_the_command_without_the_web_extra_says_how_to_get_it(tmp_path):
    blocker = tmp_path / "starlette.py"
    blocker.write_text("raise ImportError('no starlette here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "wan_opt.serve", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'pip install -e ".[web]"' in result.stderr


def test_wan_opt_serve_names_a_missing_folder():
    result = subprocess.run([sys.executable, "run.py", "serve", "no/such/folder"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: no/such/folder is not a folder: name folders that hold runs, e.g. wan-opt serve multirun/.")


# -- the pieces, without a server ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["plain", "it's", "a\\'b", "end\\", "${oc.env:HOME}", "\\${x}", "\\\\${x}",
                                  "<script>alert('x')</script>", 'q"q', "a,b=c [x] {y} $", "line\nbreak", "🦊 汉字"])
def test_free_text_reaches_the_config_exactly(text):
    cfg = compose_config(["model=tiny", f"prompt={jobs.quoted(text)}"], hardware="cpu")
    assert cfg.prompt == text


def test_a_newer_sidecar_is_read_defensively():
    sidecar = {"request": {"seed": 3, "steps": 4, "width": 160, "height": 96, "frames": 9, "fps": 8},
               "config": {"seed": 3, "steps": None, "size": None, "mode": "fast", "hardware": {"name": "h100",
                          "memory": {"experts": "swap", "_target_": "x"}, "description": "d"}, "prompt": "p"},
               "step_seconds": [5.0, 1.0, 1.2, "bad"], "seconds": {"load": 2.0, "denoise": 3.0},
               "hardware": {"gpu": {"peak_allocated_gib": 40.5}},
               "memory": {"host": {"peak_host_gib": 12.25}}, "quality": {"deviation": 0.0},
               "memory_plan": {"stages": {"encode": 1.0}, "host_stages_gb": {"encode": 20.0, "denoise": 9.0},
                               "predicted_peak_gpu_gb": 30.0, "vram_budget_gb": 80.0, "host_ram_gb": 64.0}}
    k = knobs.run_knobs(sidecar)
    assert k == {"seed": 3, "steps": 4, "size": "160*96", "mode": "fast", "hardware.name": "h100",
                 "hardware.memory.experts": "swap", "frames": 9, "fps": 8}
    f = knobs.figures(sidecar)
    assert f == {"s_per_step": 1.2, "total_s": 5.0, "load_s": 2.0, "peak_gpu_gib": 40.5, "peak_host_gib": 12.25,
                 "plan_gpu_gb": 30.0, "deviation": 0.0}
    chart = charts.plan_chart(sidecar["memory_plan"], f["peak_gpu_gib"])
    assert chart["stages"] == [{"name": "encode", "gpu_gb": 1.0, "host_gb": 20.0},
                               {"name": "denoise", "gpu_gb": None, "host_gb": 9.0}]
    assert chart["usable_gb"] == 73.6 and chart["measured_peak_gpu_gib"] == 40.5
    assert knobs.figures({}) == {} and knobs.run_knobs({"config": "odd", "request": None}) == {}


def test_the_index_skips_half_written_and_foreign_files(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "broken.json").write_text('{"request": {"seed": 1}, "config"')
    (tmp_path / "run" / ".v.partial-1.json").write_text('{"request": {}, "config": {}}')
    (tmp_path / "run" / "other.json").write_text('{"hello": "world"}')
    (tmp_path / "run" / "v.json").write_text('{"request": {"seed": 1}, "config": {}, "video": "v.mp4", "prompt": "p"}')
    index = Index(Roots([tmp_path]), min_interval=0)
    index.refresh()
    assert index.snapshot.runs == [] and index.snapshot.benchmarks == []  # no video yet
    (tmp_path / "run" / "v.mp4").write_bytes(b"\x00")
    version = index.version
    index.refresh()
    [run] = index.snapshot.runs
    assert run["prompt"] == "p" and run["set"] and index.version == version + 1
    index.refresh()
    assert index.version == version + 1  # nothing changed, nothing rebuilt


def test_queries_refuse_what_the_page_never_sends():
    with pytest.raises(BadQuery, match="not KEY=VALUE"):
        Query.parse([("f", "steps")])
    with pytest.raises(BadQuery, match="status=maybe"):
        Query.parse([("status", "maybe")])
    records = [{"id": str(i), "set": "s", "status": "ok", "prompt": f"p{i}", "created": i,
                "knobs": {"steps": i % 2, "seed": i}, "figures": {"s_per_step": float(i)} if i else {}}
               for i in range(4)]
    found = run_query(records, Query.parse([("sort", "s_per_step"), ("order", "asc")]))
    assert [r["id"] for r in found["records"]] == ["1", "2", "3", "0"]  # no figure: last
    assert found["differing"] == ["seed", "steps"] and found["ranges"]["s_per_step"] == [1.0, 3.0]

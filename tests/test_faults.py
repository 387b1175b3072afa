"""Faults on the output side: nothing a user made is lost, nothing half-made stays, interrupts end cleanly.

Concurrent writers (8 processes saving one name into one folder, and real runs of the command), full disks (a
writer patched to fail with ENOSPC, and a small tmpfs where mounting one is permitted), unwritable run and
output folders, and SIGINT / SIGTERM sent at each stage of a run through tests/fault_driver.py.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from wan_opt import batch, interrupts, video
from wan_opt.errors import WanOptError

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "fault_driver.py"
NOTHING = "interrupted: nothing was written for the current video"
pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="looks for processes in /proc")


def frames(n=5, level=None):
    if level is not None:
        return np.full((n, 32, 48, 3), level, np.uint8)
    return np.random.default_rng(0).random((n, 64, 96, 3), dtype=np.float32)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line mentions `path` (an ffmpeg writing there, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                if (entry / "stat").read_text().split(")")[-1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            pass
    return found


def children(pid: int) -> list[str]:
    """The command names of `pid`'s children."""
    names = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            names.append(stat.split("(", 1)[1].rsplit(")", 1)[0])
    return names


def env():
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    return environment


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "run.py", "model=tiny", "hardware=cpu", "steps=1", *args], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=timeout)


def one_sentence(result, message: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    return lines[-1]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs folder; the test is skipped where mounting is not permitted."""
    mounted = []

    def mount(size: str, *options: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                                 str(folder)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({result.stderr.decode().strip()})")
        mounted.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in mounted:
            subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as file:
        try:
            while True:
                file.write(bytes(1 << 16))
                file.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


# -- names reserved atomically ------------------------------------------------------------------------------


def test_the_same_name_twice_keeps_both_pairs(tmp_path):
    first = video.save(frames(level=10), tmp_path, "0-a-fox", 8, {"prompt": "first"})
    second = video.save(frames(level=200), tmp_path, "0-a-fox", 8, {"prompt": "second"})
    assert (first.name, second.name) == ("0-a-fox.mp4", "0-a-fox-2.mp4")
    assert listing(tmp_path) == ["0-a-fox-2.json", "0-a-fox-2.mp4", "0-a-fox.json", "0-a-fox.mp4"]
    for path, prompt in ((first, "first"), (second, "second")):
        assert json.loads(path.with_suffix(".json").read_text()) == {"video": path.name, "prompt": prompt}


def test_a_name_held_by_another_writer_or_a_stray_sidecar_is_skipped(tmp_path):
    (tmp_path / ".0-a-fox.reserved").touch()  # another process is placing 0-a-fox right now
    (tmp_path / "0-a-fox-2.json").write_text("mine")  # a file of the user's own
    path = video.save(frames(), tmp_path, "0-a-fox", 8, {})
    assert path.name == "0-a-fox-3.mp4" and (tmp_path / "0-a-fox-2.json").read_text() == "mine"
    assert not (tmp_path / ".0-a-fox-3.reserved").exists()


WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from wan_opt import video

index, folder, ready, go = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
place = video._place

def all_at_once(*args):  # encoded: wait for the others, then all name their files together
    (ready / str(index)).touch()
    while not go.exists():
        time.sleep(0.005)
    return place(*args)

video._place = all_at_once
print(video.save(np.full((5, 32, 48, 3), 25 * index, np.uint8), folder, "0-a-red-fox", 8, {"writer": index}))
"""


def test_eight_processes_saving_one_name_keep_eight_pairs(tmp_path):
    folder, ready, go = tmp_path / "videos", tmp_path / "ready", tmp_path / "go"
    folder.mkdir(), ready.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(folder), str(ready), str(go)], env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    while len(list(ready.iterdir())) < 8 and all(w.poll() is None for w in writers):
        time.sleep(0.01)
    go.touch()
    outcomes = [w.communicate(timeout=120) for w in writers]
    assert [w.returncode for w in writers] == [0] * 8, outcomes
    stems = ["0-a-red-fox"] + [f"0-a-red-fox-{n}" for n in range(2, 9)]
    assert listing(folder) == sorted(f"{s}{x}" for s in stems for x in (".json", ".mp4"))
    writers_seen = []
    for mp4 in folder.glob("*.mp4"):
        sidecar = json.loads(mp4.with_suffix(".json").read_text())
        assert sidecar["video"] == mp4.name
        with imageio.get_reader(mp4) as reader:  # the video beside the sidecar is that writer's video
            assert abs(reader.get_data(0).mean() - 25 * sidecar["writer"]) < 4
        writers_seen.append(sidecar["writer"])
    assert sorted(writers_seen) == list(range(8))
    assert sorted(out.strip() for out, _ in outcomes) == sorted(str(folder / f"{s}.mp4") for s in stems)


@pytest.mark.slow
def test_runs_started_together_into_one_folder_keep_every_video(tmp_path):
    shared = "a red fox running through deep snow at dawn as seen from"  # the first 48 characters match
    prompts = ["a fox", "a fox", f"{shared} above", f"{shared} below"]
    runs = [subprocess.Popen([sys.executable, "run.py", "model=tiny", "hardware=cpu", "steps=1", "frames=5",
                              f"prompt={p}", f"output_dir={tmp_path / 'videos'}", f"hydra.run.dir={tmp_path / str(i)}"],
                             cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, p in enumerate(prompts)]
    outcomes = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0] * 4, outcomes
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    sidecars = [json.loads(v.with_suffix(".json").read_text()) for v in videos]
    assert [s["video"] for s in sidecars] == [v.name for v in videos]
    assert Counter(s["prompt"] for s in sidecars) == Counter(prompts)
    assert len(listing(tmp_path / "videos")) == 8  # four pairs, nothing hidden


# -- full disks and failed writes ---------------------------------------------------------------------------


def test_a_sidecar_that_does_not_fit_takes_its_video_with_it(tmp_path, monkeypatch):
    def full(path, data):
        if path.suffix == ".json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_file(path, data)

    write_file = video._write_file
    monkeypatch.setattr(video, "_write_file", full)
    with pytest.raises(WanOptError) as error:
        video.save(frames(), tmp_path, "0-a-fox", 8, {"prompt": "a fox"})
    assert str(error.value).startswith(f"Could not write {tmp_path / '0-a-fox.json'}: No space left on device;")
    assert listing(tmp_path) == []


def test_a_video_that_does_not_fit_is_one_sentence_naming_it(tmp_path, monkeypatch):
    command = video._ffmpeg_command
    monkeypatch.setattr(video, "_ffmpeg_command", lambda *a: [*command(*a)[:-1], "-f", "mp4", "/dev/full"])
    with pytest.raises(WanOptError) as error:
        video.save(frames(), tmp_path, "0-a-fox", 8, {})
    assert str(error.value) == (f"Could not write {tmp_path / '0-a-fox.mp4'}: No space left on device; nothing "
                                f"was saved: free some space there or pass output_dir= a folder with room.")
    assert listing(tmp_path) == [] and not processes_naming(Path("/dev/full"))


def test_a_record_that_fails_halfway_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    old = [batch.ItemResult("p:1", "fox", "ok", 1.0, "a.mp4")]
    batch.summarize(old, tmp_path / "summary.json", "batch")

    def half_then_full(path, data):
        path.write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(video, "_write_file", half_then_full)
    for write in (lambda: batch.summarize(old * 2, tmp_path / "summary.json", "batch"),
                  lambda: batch.write_results(tmp_path, old)):
        with pytest.raises(WanOptError, match="No space left on device"):
            write()
    assert json.loads((tmp_path / "summary.json").read_text())["total"] == 1
    assert listing(tmp_path) == ["summary.json"]


def test_records_are_strict_json(tmp_path):
    video.write_json({"psnr": float("inf"), "values": [1.0, float("nan")]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=pytest.fail) == {"psnr": None,
                                                                                          "values": [1.0, None]}


def test_on_a_full_tmpfs_the_video_fits_and_the_sidecar_does_not(tmpfs):
    folder = tmpfs("256k")
    with pytest.raises(WanOptError, match=r"0-a-fox\.json: No space left on device; nothing was saved"):
        video.save(frames(), folder, "0-a-fox", 8, {"padding": "x" * 400_000})
    assert listing(folder) == []
    assert video.save(frames(), folder, "0-a-fox", 8, {}).name == "0-a-fox.mp4"  # the same video alone fits


@pytest.mark.slow
def test_a_run_whose_video_does_not_fit(tmpfs):
    folder = tmpfs("128k")  # room for the start's write test, not for the 17-frame video
    result = cli("prompt=a fox", f"output_dir={folder}", f"hydra.run.dir={folder.parent / 'run'}")
    one_sentence(result, f"Could not write {folder / '0-a-fox.mp4'}: No space left on device; nothing was saved")
    assert listing(folder) == [] and not processes_naming(folder)


@pytest.mark.slow
def test_a_full_output_folder_is_refused_before_loading(tmpfs):
    folder = tmpfs("256k")
    fill(folder)
    result = cli("prompt=a fox", f"output_dir={folder}", f"hydra.run.dir={folder.parent / 'run'}")
    one_sentence(result, f"The output directory {folder} is full (No space left on device)")
    assert listing(folder) == ["filler"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["file in the way", "full", "read-only"])
def test_a_run_folder_hydra_cannot_write_is_one_sentence(tmp_path, tmpfs, case):
    if case == "file in the way":
        (tmp_path / "file").write_text("")
        run_dir, reason = tmp_path / "file" / "run", "Not a directory"
    elif case == "full":
        folder = tmpfs("256k")
        fill(folder)
        run_dir, reason = folder / "run", "No space left on device"
    else:
        run_dir, reason = tmpfs("256k", "ro") / "run", "Read-only file system"
    result = cli("prompt=a fox", f"hydra.run.dir={run_dir}")
    sentence = one_sentence(result, "Cannot write the run folder (")
    assert reason in sentence and sentence.endswith("pass hydra.run.dir= a writable folder with free space.")


# -- interrupts ---------------------------------------------------------------------------------------------


@pytest.fixture
def handlers():
    """The command's signal handling, in this process, for the length of one test, as a terminal's: a shell that
    starts the tests in the background (`pytest &`) has them ignore SIGINT, which the command keeps ignoring."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts.install()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_inside_a_deferred_block_waits_for_its_end(handlers):
    done = []
    with pytest.raises(interrupts.Interrupted) as interrupt:
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the rest of the block")
    assert done == ["the rest of the block"] and interrupts.exit_line(interrupt.value) == (NOTHING, 143)


def test_an_interrupt_while_encoding_kills_ffmpeg_and_leaves_nothing(tmp_path, handlers):
    seen = []

    def frames_then_ctrl_c():
        yield frames(1)[0]
        yield frames(1)[0]
        seen.extend(children(os.getpid()))  # ffmpeg holds the first frames
        os.kill(os.getpid(), signal.SIGINT)
        yield frames(1)[0]

    with pytest.raises(KeyboardInterrupt):
        video.save(frames_then_ctrl_c(), tmp_path, "0-a-fox", 8, {})
    assert any("ffmpeg" in name for name in seen)
    assert listing(tmp_path) == [] and not processes_naming(tmp_path)


def test_an_interrupt_while_placing_removes_the_placed_sidecar(tmp_path, handlers, monkeypatch):
    write_json = video.write_json

    def then_sigterm(data, path):
        write_json(data, path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(video, "write_json", then_sigterm)
    with pytest.raises(interrupts.Interrupted):
        video.save(frames(), tmp_path, "0-a-fox", 8, {})
    assert listing(tmp_path) == []


def signalled(tmp_path, stage, signum, *args, at=1, multirun=False):
    """Run the command held at `stage` (the `at`-th time), signal it there; returns (the result, the names of
    its children when signalled)."""
    mark, run_dir = tmp_path / "held", tmp_path / "run"
    command = [sys.executable, str(DRIVER), stage, str(at), str(mark), *(["-m"] if multirun else []), "model=tiny",
               "hardware=cpu", "steps=1", "frames=5", f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}", *args]
    # A shell that starts a job in the background ignores SIGINT in it; the test wants Ctrl-C's own behaviour.
    process = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not mark.exists() and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    held = children(process.pid)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), held


def assert_ended_cleanly(result, signum, line):
    lines = [text for text in result.stderr.splitlines() if text.strip()]
    assert result.returncode == 128 + signum and lines[-1] == line, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage, signum", [("denoise", signal.SIGINT), ("denoise", signal.SIGTERM),
                                           ("encode", signal.SIGINT), ("encode", signal.SIGTERM),
                                           ("place", signal.SIGTERM), ("load", signal.SIGINT)])
def test_an_interrupted_run_writes_nothing_and_leaves_no_process(tmp_path, stage, signum):
    result, held = signalled(tmp_path, stage, signum, "prompt=a fox", at=2 if stage == "encode" else 1)
    assert_ended_cleanly(result, signum, NOTHING)
    assert listing(tmp_path / "run") == [".hydra", "wan-opt.log"]
    assert ("ffmpeg" in " ".join(held)) == (stage == "encode") and not processes_naming(tmp_path)


@pytest.mark.slow
def test_an_interrupted_batch_keeps_what_finished_and_says_so(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na cat\na dog\n")
    result, _ = signalled(tmp_path, "encode", signal.SIGINT, f"prompts={prompts}", at=5 + 2)  # the 2nd video
    run_dir = tmp_path / "run"
    assert_ended_cleanly(result, signal.SIGINT,
                         f"interrupted: kept 1 finished video; {run_dir / 'summary.json'} lists what ran")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(r["prompt"], r["status"]) for r in summary["results"]] == [("a red fox", "ok"), ("a cat", "interrupted")]
    assert sorted(p.name for p in run_dir.glob("*.mp4")) == ["0-a-red-fox.mp4"]
    assert not list(run_dir.glob(".*.*")) and not processes_naming(tmp_path)


@pytest.mark.slow
def test_an_interrupted_sweep_summarises_the_jobs_that_ran(tmp_path):
    result, _ = signalled(tmp_path, "encode", signal.SIGTERM, "prompt=a fox", "seed=1,2,3", at=5 + 2, multirun=True)
    summary_path = tmp_path / "run" / "summary.json"
    assert_ended_cleanly(result, signal.SIGTERM, f"interrupted: kept 1 finished video; {summary_path} "
                                                 f"lists what ran")
    summary = json.loads(summary_path.read_text())
    assert [(r["job"], r["status"]) for r in summary["results"]] == [("0", "ok"), ("1", "interrupted")]
    assert [p.name for p in (tmp_path / "run").rglob("*.mp4")] == ["1-a-fox.mp4"]

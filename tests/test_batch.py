"""Sweeps and batches: reuse of the loaded model, prompt files, failures that do not stop the rest."""
import gc
import json
import weakref

import pytest

from wan_opt import reuse
from wan_opt.prepare import compose_config
from wan_opt.batch import ItemResult, gather, read_prompt_file, run_items, summarize, write_results
from wan_opt.errors import WanOptError


@pytest.fixture(autouse=True)
def empty_cache():
    reuse.release()
    yield
    reuse.release()


class Loaded:
    """Stands for a loaded pipeline; counts loads."""

    count = 0

    def __init__(self, cfg):
        Loaded.count += 1


def cfg_with(*overrides):
    return compose_config(list(overrides), hardware="cpu")


@pytest.mark.parametrize("override", ["seed=5", "steps=3", "guidance=2", "guidance_2=1", "size=160*96",
                                      "frames=9", "prompt=another", "fps=4", "model.negative_prompt=none"])
def test_sampling_changes_reuse_the_loaded_model(override):
    Loaded.count = 0
    first, reused_first = reuse.cached_pipeline(cfg_with("prompt=a"), Loaded)
    second, reused_second = reuse.cached_pipeline(cfg_with("prompt=a", override), Loaded)
    assert (Loaded.count, reused_first, reused_second) == (1, False, True) and second is first


@pytest.mark.parametrize("override", ["model.lora.high_noise=/x.safetensors", "hardware.memory.weight_dtype=bfloat16",
                                      "model.ckpt_dir=/elsewhere", "model=wan22_ti2v_5b", "hardware.speed.cfg=batched"])
def test_weight_changes_reload_and_free_the_old_model_first(override):
    Loaded.count = 0
    first, _ = reuse.cached_pipeline(cfg_with(), Loaded)
    gone = weakref.ref(first)
    del first
    freed_before_load = []

    def load(cfg):
        gc.collect()
        freed_before_load.append(gone() is None)
        return Loaded(cfg)

    _, reused = reuse.cached_pipeline(cfg_with(override), load)
    assert not reused and Loaded.count == 2 and freed_before_load == [True]


def test_txt_and_jsonl_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red fox\n\n  a cat on a mat  \n")
    assert read_prompt_file(str(txt)) == [("p.txt:1", {"prompt": "a red fox"}), ("p.txt:3", {"prompt": "a cat on a mat"})]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "fox", "seed": 3, "steps": 2}\nnot json\n{"prompt": "x", "colour": 1}\n[1]\n')
    items = read_prompt_file(str(jsonl))
    assert items[0] == ("p.jsonl:1", {"prompt": "fox", "seed": 3, "steps": 2})
    assert "not valid JSON" in items[1][1] and "colour" in items[2][1] and "not an object" in items[3][1]


@pytest.mark.parametrize("content, message", [(None, "is not a file"), ("\n\n", "no prompts")])
def test_unusable_prompt_files(tmp_path, content, message):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(WanOptError, match=message):
        read_prompt_file(str(path))


def test_a_failed_item_does_not_stop_the_others(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "ok one"}\n{"prompt": "bad", "frames": 10}\nbroken\n{"prompt": "ok two", "seed": 2}\n')
    ran = []

    def run_one(cfg):
        if cfg.frames == 10:
            raise WanOptError("frames=10 is not of the form 4n+1")
        ran.append((cfg.prompt, cfg.seed))
        return tmp_path / f"{cfg.prompt}.mp4"

    results = run_items(cfg_with(f"prompts={jsonl}"), run_one)
    assert ran == [("ok one", 0), ("ok two", 2)]
    assert [r.status for r in results] == ["ok", "failed", "failed", "ok"]
    assert "4n+1" in results[1].error and "not valid JSON" in results[2].error


def test_summary_json_and_gather(tmp_path):
    results = [ItemResult("p:1", "fox", "ok", 1.0, "a.mp4", job="0"),
               ItemResult("p:2", "cat", "failed", 0.0, error="bad", job="1")]
    for job, result in zip("01", results):
        (tmp_path / job).mkdir()
        write_results(tmp_path / job, [result])
    assert gather(tmp_path) == results
    assert not summarize(results, tmp_path / "summary.json", "sweep")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["total"], summary["failed"]) == (2, 1)

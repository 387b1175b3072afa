"""Hostile input, table by table: text that looks like code, numbers at the edges, prompt files from someone
else, overrides that add keys or name code, broken checkpoints and LoRAs.

Every row asserts the exit status, the one sentence (or, inside a batch, its entry in summary.json), that no
traceback was printed, and what is left on disk. Most rows run the real command line in a subprocess with the
tiny model; rows of one prompt file share one process.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tests.checkpoints import write_diffusers_checkpoint, write_original_checkpoint
from wan_opt.batch import run_items
from wan_opt.checks import check_targets
from wan_opt.errors import WanOptError
from wan_opt.loading.tiny import build_tiny_components
from wan_opt.prepare import compose_config, prepare
from wan_opt.request import literal

REPO = Path(__file__).resolve().parent.parent
FAST = ["model=tiny", "hardware=cpu", "steps=1", "frames=1"]  # a tiny run: one step, one frame
pytestmark = pytest.mark.slow


def wan_opt(*args, timeout=300):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "COLUMNS": "1000"}  # the console's lines unwrapped
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_refused(result, sentence: str) -> None:
    """Exit status 2, one line on stderr (`error: ` and the sentence), no traceback anywhere."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and sentence in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def command(*extra: str) -> list[str]:
    """The tiny run's arguments with `extra` in place of any it sets again."""
    keys = {arg.lstrip("+~").split("=")[0].split("@")[0] for arg in extra}
    return [*(arg for arg in [*FAST, "prompt=a fox"] if arg.split("=")[0] not in keys), *extra]


def written(folder: Path) -> list[str]:
    """What a run left in its folder, Hydra's own records (.hydra/, the log) aside."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log")


def sidecars(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in folder.rglob("*.json") if p.with_suffix(".mp4").is_file()}


# -- 1. the command line: one mistake, one sentence, exit 2, nothing written ------------------------------------

REFUSED = [
    # numbers at the edges
    ("guidance-nan", ["guidance=nan"], "guidance=nan is not a number"),
    ("guidance-inf", ["guidance=inf"], "guidance=inf is not a number"),
    ("guidance_2-minus-inf", ["guidance_2=-inf"], "guidance_2=-inf is not a number"),
    ("host-ram-nan", ["hardware.memory.host_ram_gb=nan"], "hardware.memory.host_ram_gb=nan is not a number"),
    ("lora-strength-nan", ["model.lora.high_noise_strength=nan"], "high_noise_strength=nan is not a number"),
    ("seed-negative", ["seed=-1"], "seed=-1 is outside the generator's range"),
    ("seed-2**64", ["seed=18446744073709551616"], "seed=18446744073709551616 is outside the generator's range"),
    ("steps-ten-million", ["steps=10000000"], "steps=10000000 is above 1000"),
    ("frames-a-billion", ["frames=1000000001"], "frames=1000000001 is above 4093"),
    ("size-100000", ["size=100000*100000"], "wider than 16384 pixels"),
    ("size-superscript", ["size='²*128'"], "is not W*H"),
    ("size-5000-digits", ["size=" + "1" * 5000 + "*128"], "is not W*H"),
    ("text-len-huge", ["model.text_len=1000000000"], "model.text_len=1000000000 is outside 1 to 512"),
    ("pixel-grid-zero", ["model.pixel_grid=0"], "model.pixel_grid=0 is not a size"),
    ("shift-negative", ["model.shift=-1"], "model.shift=-1 is not above 0"),
    ("boundary-above-1", ["model.boundary=2"], "model.boundary=2 is not a fraction"),
    ("prompt-control-character", ["prompt='a \x1b[2J fox'"], "holds the control character"),
    # what host memory cannot hold, refused by the CPU plan before anything is allocated
    ("cpu-a14b-plan", ["model=wan22_t2v_a14b", "plan=true", "hardware.memory.host_ram_gb=24"],
     "the model alone needs"),
    # keys the schema does not have, removed settings, and keys by which a config names code
    ("plus-unknown", ["+foo=1"], "There is no setting 'foo'"),
    ("plus-misspelt-model-key", ["+model.stepz=50"], "There is no setting 'model.stepz'"),
    ("plus-misspelt-memory-key", ["+hardware.memory.expert=swap"], "There is no setting 'hardware.memory.expert'"),
    ("plusplus-unknown-in-dict", ["++hardware.memory={expert: swap}"], "There is no setting 'hardware.memory.expert'"),
    ("plusplus-target", ["++hardware._target_=subprocess.call"], "sets _target_"),
    ("pipeline-target", ["pipeline._target_=builtins.print"], "sets _target_"),
    ("target-in-a-dict", ["hardware.memory={_target_: os.system}"], "sets _target_"),
    ("partial-key", ["++pipeline._partial_=true"], "sets _partial_"),
    ("hydra-callback-target", ["+hydra.callbacks.x._target_=shutil.rmtree"], "sets _target_"),
    ("plus-an-existing-setting", ["+seed=3"], "seed is already a setting: set it without the +"),
    ("plus-a-chosen-group", ["+mode=fast"], "The mode group already has a choice"),
    ("delete-prompt", ["~prompt"], "~prompt removes a setting wan-opt needs"),
    ("group-elsewhere", ["hardware@extra=h100"], "drop the @ part"),
]


@pytest.mark.parametrize("args, sentence", [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED])
def test_a_mistake_on_the_command_line_is_one_sentence(tmp_path, args, sentence):
    result = wan_opt(*command(*args), f"hydra.run.dir={tmp_path / 'run'}")
    assert_refused(result, sentence)
    assert written(tmp_path / "run") == []


def test_a_profile_in_a_config_dir_may_not_name_other_code(tmp_path):
    profiles = tmp_path / "conf" / "hardware"
    profiles.mkdir(parents=True)
    (profiles / "mine.yaml").write_text("defaults:\n  - cpu\n  - _self_\nname: mine\nmemory:\n"
                                        "  _target_: shutil.rmtree\n")
    result = wan_opt("--config-dir", str(tmp_path / "conf"), "hardware=mine", *FAST[:1], "prompt=a fox",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert_refused(result, "mine.yaml sets memory._target_=shutil.rmtree, code outside wan-opt")
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder


@pytest.mark.parametrize("override, sentence", [
    ("+foo=1", "There is no setting 'foo'"),
    ("++hardware.speed._target_=os.system", "sets _target_"),
    ("prompt=${oc.env:HOME}", None),  # text, not a mistake: kept as written
])
def test_the_python_api_checks_its_overrides_as_the_command_line_does(override, sentence):
    overrides = ["model=tiny", override]
    cfg = compose_config(overrides, hardware="cpu")
    if sentence is None:
        assert prepare(cfg, overrides).request.prompt == "${oc.env:HOME}"
        return
    with pytest.raises(WanOptError, match=sentence):
        prepare(cfg, overrides)


def test_a_composed_config_builds_only_wan_opt_diffusers_and_transformers_classes():
    cfg = compose_config(["model=tiny"], hardware="cpu")
    check_targets(cfg)  # the schema's own targets pass
    cfg.hardware.speed._target_ = "os.system"
    with pytest.raises(WanOptError, match="hardware.speed._target_=os.system names code outside wan-opt"):
        check_targets(cfg)


# -- 2. text is data: never interpolated, kept as typed in the sidecar, the file name and the console ------------

def test_prompts_are_taken_literally_and_a_sweep_finishes_its_good_jobs(tmp_path):
    """One sweep: two prompts that look like code, each with a good seed and a refused one, written to a
    folder whose name looks like console markup."""
    prompts = ["price ${5}", 'say "hi" and \'bye\' at 50%\nnext line ${oc.env:HOME}']
    quoted = ",".join("'" + p.replace("\\", "\\\\").replace("'", "\\'") + "'" for p in prompts)
    result = wan_opt("-m", *FAST, f"prompt={quoted}", "seed=5,-1", "negative_prompt='${oc.env:PATH} ${0}'",
                     f"output_dir='{tmp_path}/out [/red]'", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert f"Saved {tmp_path}/out [/red]/5-price-5.mp4" in result.stderr
    by_prompt = {s["prompt"]: (name, s) for name, s in sidecars(tmp_path).items()}
    assert sorted(by_prompt) == sorted(prompts)  # as typed: quotes, %, the newline, nothing resolved
    name, sidecar = by_prompt["price ${5}"]
    assert name == "5-price-5" and sidecar["config"]["prompt"] == "price ${5}"
    assert sidecar["negative_prompt"] == "${oc.env:PATH} ${0}" and os.environ["PATH"] not in json.dumps(sidecar)
    summary = json.loads((tmp_path / "summary.json").read_text())  # the sweep's, though jobs failed
    assert [r["status"] for r in summary["results"]] == ["ok", "failed", "ok", "failed"]
    assert all("seed=-1 is outside the generator's range" in r["error"] for r in summary["results"][1::2])
    assert len(list(tmp_path.rglob("*.mp4"))) == 2


@pytest.mark.parametrize("text", ["${", "\\${5}", "\\\\${x}", "$${a}}", "${a:${b}}", "trail \\", "}${", "${now:%Y}"])
def test_literal_text_reads_back_as_written(text):
    cfg = OmegaConf.create({"prompt": "x"})
    cfg.prompt = literal(text)
    assert cfg.prompt == text and OmegaConf.to_container(cfg, resolve=True)["prompt"] == text


# -- 3. a prompt file from someone else: every good line runs, every bad one is its own sentence ---------------

HUGE_NUMBER = "1" * 5000
BATCH = [  # (line as written in the file, status, what its summary entry says)
    ('{"prompt": "${oc.env:HOME} fox", "seed": 1}', "ok", "1-oc-env-home-fox.mp4"),
    ('{"prompt": "price ${5}", "seed": 2}', "ok", "2-price-5.mp4"),
    # JSON escapes for the quotes and the newline; a raw U+2028 inside the string, which ends no line
    ('{"prompt": "50% \\"quoted\\" \'single\'\\nsecond line \u2028 third", "seed": 3}', "ok", "3-50-quoted-single"),
    ('{"prompt": "x", "seed": "abc"}', "failed", '"seed": "abc" is not a whole number'),
    ('{"prompt": "x", "frames": 5.5}', "failed", '"frames": 5.5 is not a whole number'),
    ('{"prompt": "x", "seed": true}', "failed", '"seed": true is not a whole number'),
    ('{"prompt": "x", "guidance": NaN}', "failed", '"guidance": NaN is not a finite number'),
    ('{"prompt": "x", "guidance": 1e400}', "failed", '"guidance": Infinity is not a finite number'),
    ('{"prompt": 5}', "failed", '"prompt": 5 is not text'),
    ('{"prompt": "x", "seed": -1}', "failed", "seed=-1 is outside the generator's range"),
    ('{"prompt": "x", "steps": 1001}', "failed", "steps=1001 is above 1000"),
    ('{"prompt": "x", "frames": 1000000001}', "failed", "frames=1000000001 is above 4093"),
    ('{"prompt": "x", "size": "16384*16384", "frames": 4093}', "failed", "On the CPU, tiny at 16384*16384"),
    ('{"prompt": "x", "size": "[/red] 128*128"}', "failed", "is not W*H"),
    ('{"prompt": "x", "guidance_2": -1}', "failed", "guidance_2=-1.0 is negative"),
    ('{"prompt": "x", "colour": "red"}', "failed", "has colour; a line may set"),
    ('{"prompt": "a \\u001b[2J fox"}', "failed", 'holds the control character "\\u001b"'),
    ("not json at all", "failed", "is not valid JSON"),
    ("[1, 2]", "failed", "(not an object)"),
    ('{"prompt": "x", "seed": ' + HUGE_NUMBER + "}", "failed", "is not JSON wan-opt can read"),
    ("[" * 100000 + "]" * 100000, "failed", "is not JSON wan-opt can read"),
    (b'{"prompt": "caf\xe9"}', "failed", "is not UTF-8 text"),
    ('{"prompt": "the last good line", "seed": 4}', "ok", "4-the-last-good-line.mp4"),
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One run of a .JSONL file (capitals: still JSON lines) holding every row of BATCH, one line each."""
    folder = tmp_path_factory.mktemp("batch")
    lines = [line if isinstance(line, bytes) else line.encode() for line, _, _ in BATCH]
    (folder / "prompts.JSONL").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # a BOM, CRLF
    result = wan_opt(*FAST, f"prompts={folder / 'prompts.JSONL'}", f"hydra.run.dir={folder / 'run'}", timeout=600)
    summary = json.loads((folder / "run" / "summary.json").read_text())
    return result, summary, folder / "run"


def test_a_batch_finishes_its_good_lines_and_exits_1(batch):
    result, summary, run = batch
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert (summary["total"], summary["failed"]) == (len(BATCH), sum(s == "failed" for _, s, _ in BATCH))
    assert len(list(run.glob("*.mp4"))) == sum(s == "ok" for _, s, _ in BATCH)
    assert [p for p in run.rglob("*") if ".partial" in p.name] == []
    errors = [line for line in result.stderr.splitlines() if line.startswith("error (prompts.JSONL:")]
    assert len(errors) == summary["failed"]  # one line per failed item, said as it happens
    assert "prompts.JSONL:1" in result.stdout  # and the table of every item


@pytest.mark.parametrize("number", range(len(BATCH)), ids=[f"line{n + 1}" for n in range(len(BATCH))])
def test_each_line_of_a_hostile_prompt_file(batch, number):
    _, summary, run = batch
    line, status, says = BATCH[number]
    entry = summary["results"][number]
    assert entry["item"] == f"prompts.JSONL:{number + 1}" and entry["status"] == status
    assert entry["traceback"] is None  # nothing here is a bug
    if status == "ok":
        assert Path(entry["output"]).parent == run and says in Path(entry["output"]).name
        sidecar = json.loads(Path(entry["output"]).with_suffix(".json").read_text())
        assert sidecar["prompt"] == json.loads(line)["prompt"]  # exactly as written: nothing resolved
    else:
        assert says in entry["error"] and entry["output"] is None


@pytest.mark.parametrize("name, content, sentence", [
    ("missing.txt", None, "is not a file"),
    ("prompts.json", b'[{"prompt": "a fox"}]', "is a .json file: write one JSON object per line"),
    ("utf16.txt", "a fox\n".encode("utf-16"), "is not a text file"),
    ("blank.jsonl", b"\n  \n\r\n", "has no prompts in it"),
], ids=["missing", "json-not-jsonl", "utf16", "blank"])
def test_an_unusable_prompt_file_exits_2(tmp_path, name, content, sentence):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    result = wan_opt(*FAST, f"prompts={tmp_path / name}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_refused(result, sentence)
    assert [p for p in written(tmp_path / "run") if not p.endswith(".json")] == []  # no video


_INJECT_A_BUG = """
import sys
from wan_opt import app, cli
real = app.run_job
def run_job(cfg, detected=None):
    if cfg.prompt == "boom":
        return {}["a bug"]
    return real(cfg, detected)
app.run_job = run_job
sys.argv = ["wan-opt", *sys.argv[1:]]
cli.main()
"""


def test_a_text_prompt_file_is_taken_literally_and_a_bug_fails_only_its_line(tmp_path):
    """A .txt file through the real command line, with a bug injected for one prompt: the bug's traceback is
    printed and kept in its line's entry, and every other line runs, its text taken as written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"${oc.env:HOME}\r\n\r\nboom\nprice ${5} 50%\n\xff\xfe not text\n")
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "-c", _INJECT_A_BUG, *FAST, f"prompts={prompts}",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert sorted(s["prompt"] for s in sidecars(tmp_path / "run").values()) == ["${oc.env:HOME}", "price ${5} 50%"]
    results = json.loads((tmp_path / "run" / "summary.json").read_text())["results"]
    assert [(r["item"], r["status"]) for r in results] == [
        ("prompts.txt:1", "ok"), ("prompts.txt:3", "failed"), ("prompts.txt:4", "ok"), ("prompts.txt:5", "failed")]
    bug, binary = results[1], results[3]
    assert "a bug in wan-opt (KeyError" in bug["error"] and "KeyError: 'a bug'" in bug["traceback"]
    assert "not UTF-8 text" in binary["error"] and binary["traceback"] is None
    assert result.stderr.count("Traceback") == 1  # the bug's, and only the bug's


@pytest.mark.parametrize("raised, says, traced", [
    (WanOptError("frames=10 is not of the form 4n+1"), "frames=10 is not", False),
    (OSError(28, "No space left on device"), "OSError: [Errno 28] No space left on device", False),
    (MemoryError(), "MemoryError", False),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5 GB"), "can't allocate", False),
    (TypeError("unsupported operand"), "a bug in wan-opt (TypeError: unsupported operand)", True),
])
def test_each_kind_of_failure_fails_one_item_only(tmp_path, raised, says, traced):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")

    def run_one(cfg):
        if cfg.prompt == "two":
            raise raised
        return tmp_path / f"{cfg.prompt}.mp4"

    results = run_items(compose_config([f"prompts={prompts}"], hardware="cpu"), run_one)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert says in results[1].error and (results[1].traceback is not None) == traced


# -- 4. checkpoints and LoRAs: read for what they claim before anything loads ----------------------------------

SHARD = "high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors"
INDEX = "high_noise_model/diffusion_pytorch_model.safetensors.index.json"


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _edit_json(change):
    def edit(path: Path) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


CHECKPOINTS = [  # (id, layout, file, how it is spoiled, the sentence)
    ("shard-cut-short", "original", SHARD, _cut, "is not a whole safetensors file (its header lists"),
    ("shard-of-zeros", "original", SHARD, lambda p: p.write_bytes(b"\0" * 64), "first bytes are not a safetensors"),
    ("index-not-json", "original", INDEX, lambda p: p.write_text("{not json"), "index.json is not readable JSON"),
    ("index-escapes-folder", "original", INDEX, _edit_json(lambda d: d["weight_map"].update(x="../../etc/passwd")),
     "not a file beside it"),
    ("index-lists-absent-tensor", "original", INDEX,
     _edit_json(lambda d: d["weight_map"].update({"blocks.9.x": SHARD.split("/")[1]})), "puts 'blocks.9.x' in"),
    ("config-a-list", "original", "high_noise_model/config.json", lambda p: p.write_text("[1, 2]"),
     "where an object belongs"),
    ("config-other-width", "original", "high_noise_model/config.json", _edit_json(lambda d: d.update(dim=48)),
     "of shape [24] where"),
    ("config-words-for-numbers", "original", "high_noise_model/config.json",
     _edit_json(lambda d: d.update(num_layers="many")), "does not describe a WanTransformer3DModel"),
    ("t5-cut-short", "original", "models_t5_umt5-xxl-enc-bf16.pth", _cut, "is not a readable PyTorch file"),
    ("text-encoder-cut-short", "diffusers", "text_encoder/model.safetensors", _cut, "it was cut short"),
    ("model-index-binary", "diffusers", "model_index.json", lambda p: p.write_bytes(b"\xff\xfe"),
     "model_index.json is not readable JSON"),
    ("vae-config-other-width", "diffusers", "vae/config.json", _edit_json(lambda d: d.update(base_dim=16)),
     "vae holds"),
    ("transformer-config-more-layers", "diffusers", "transformer/config.json",
     _edit_json(lambda d: d.update(num_layers=3)), "lacks the weights of"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    tiny = build_tiny_components(seed=0, family="t2v_a14b")
    return {"original": write_original_checkpoint(root / "original", tiny, "t2v_a14b"),
            "diffusers": write_diffusers_checkpoint(root / "diffusers", tiny, "t2v_a14b")}


def spoiled(checkpoints, tmp_path, layout, file, spoil) -> Path:
    root = shutil.copytree(checkpoints[layout], tmp_path / layout)
    spoil(root / file)
    return root


@pytest.mark.parametrize("layout, file, spoil, sentence", [c[1:] for c in CHECKPOINTS],
                         ids=[c[0] for c in CHECKPOINTS])
def test_a_spoiled_checkpoint_file_is_named_before_loading(checkpoints, tmp_path, layout, file, spoil, sentence):
    root = spoiled(checkpoints, tmp_path, layout, file, spoil)
    cfg = compose_config(["model=wan22_t2v_a14b", f"model.ckpt_dir={root}", "prompt=a fox"], hardware="cpu")
    with pytest.raises(WanOptError, match="re-download|model= matches") as refused:
        prepare(cfg)
    assert sentence in str(refused.value) and str(root) in str(refused.value)


def test_a_cut_shard_on_the_command_line_is_one_sentence(checkpoints, tmp_path):
    root = spoiled(checkpoints, tmp_path, "original", SHARD, _cut)
    result = wan_opt("model=wan22_t2v_a14b", f"model.ckpt_dir={root}", "hardware=cpu", "prompt=a fox",
                     "size=96*64", "frames=5", "steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert_refused(result, f"{root / SHARD} is not a whole safetensors file")
    assert written(tmp_path / "run") == []


@pytest.fixture
def loras(tmp_path):
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4)},
              str(tmp_path / "full_size.safetensors"))
    save_file({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(4, 8)}, str(tmp_path / "sdxl.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"PK\x03\x04 this is no LoRA")
    return tmp_path


def test_a_lora_that_is_not_safetensors_is_named_on_the_command_line(loras):
    result = wan_opt(*FAST, "prompt=a fox", f"model.lora.high_noise={loras / 'garbage.safetensors'}",
                     f"hydra.run.dir={loras / 'run'}")
    assert_refused(result, "garbage.safetensors is not a whole safetensors file")
    assert written(loras / "run") == []


@pytest.mark.parametrize("file, sentence", [
    ("sdxl.safetensors", "sdxl.safetensors: none of its 1 keys match a module of the Wan transformer"),
    ("full_size.safetensors", "gives a delta of shape (5120, 5120), but blocks.0.attn1.to_q.weight has shape (24, 24)"),
], ids=["keys-of-another-model", "shapes-of-the-full-size-model"])
def test_a_lora_that_cannot_fit_is_named_before_loading(loras, file, sentence):
    cfg = compose_config(["model=tiny", "prompt=a fox", f"model.lora.low_noise={loras / file}"], hardware="cpu")
    with pytest.raises(WanOptError) as refused:
        prepare(cfg)
    assert sentence in str(refused.value) and str(loras / file) in str(refused.value)


def test_a_kernel_schedule_that_does_not_exist_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """WAN_OPT_HOPPER_SCHEDULE is read when the Hopper kernels load, mid-run; the checks every entry point runs
    (the command line, the Python API, the benchmark's profiles) refuse a wrong name first."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="needs a Triton with Gluon")
    monkeypatch.setenv("WAN_OPT_HOPPER_SCHEDULE", "pingpong")
    result = wan_opt(*FAST, "prompt=a fox", f"hydra.run.dir={tmp_path}")
    assert_refused(result, "WAN_OPT_HOPPER_SCHEDULE=pingpong is not a schedule: use one of overlap, turns, "
                           "turns+overlap.")
    assert not list(tmp_path.rglob("*.mp4"))

"""Every profile x model composes against the schema; misspelt keys and impossible knobs are errors."""
import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from wan_opt.prepare import compose_config
from wan_opt.checks import check_knobs
from wan_opt.config import CONF_DIR, OFFICIAL_NEGATIVE_PROMPT
from wan_opt.errors import WanOptError

PROFILES = sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
# docs/measured.md, 'Sizes and costs the planner starts from': an A14B expert in bf16 and fp8, 720p activations.
EXPERT_GB = {"bfloat16": 27.4, "float8_e4m3fn": 13.6}
ACTIVATIONS_720P_GB = 7.0


def test_the_required_profiles_and_models_exist():
    assert {"h100", "h200", "a100_80gb", "a100_40gb", "l40s", "rtx4090", "rtx_a6000", "cpu"} <= set(PROFILES)
    assert {"wan22_t2v_a14b", "wan22_ti2v_5b", "tiny"} <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_and_model_compose_and_validate(profile, model):
    cfg = compose_config([f"model={model}"], hardware=profile)
    check_knobs(cfg)
    assert cfg.hardware.name == profile and cfg.model.name == model


@pytest.mark.parametrize("profile", [p for p in PROFILES if p not in ("cpu", "auto")])
def test_gpu_profiles_fit_a14b_on_their_card(profile):
    """The resident part of the A14B denoiser plus 720p activations stays inside the profile's budget."""
    cfg = compose_config([], hardware=profile)
    mem = cfg.hardware.memory
    assert mem.vram_budget_gb < cfg.hardware.gpu.memory_gb
    experts_on_gpu = {"resident": 2, "swap": 1, "offload": 0}[mem.experts]
    need = experts_on_gpu * EXPERT_GB[mem.weight_dtype] + ACTIVATIONS_720P_GB
    assert need <= mem.vram_budget_gb, f"{profile}: {need:.1f} GB > {mem.vram_budget_gb} GB"


def test_no_fp8_profile_on_a_card_without_fp8_tensor_cores():
    """fp8 *storage* dequantizes to bf16 on any GPU (rtx3090 stores its experts so); fp8 *compute* needs Ada or
    Hopper."""
    for profile in PROFILES:
        hw = compose_config([], hardware=profile).hardware
        if hw.speed.fp8_matmul or hw.speed.attention == "fp8":
            assert hw.gpu.capability >= 8.9, profile
        if hw.memory.weight_dtype.startswith("float8") and hw.gpu.capability < 8.9:
            assert profile == "rtx3090" and not hw.speed.fp8_matmul


def test_a14b_defaults_are_the_official_ones():
    model = compose_config(["model=wan22_t2v_a14b"], hardware="cpu").model
    assert (model.steps, model.solver, model.shift, model.guidance, model.guidance_2, model.boundary) == (
        40, "unipc", 12.0, 4.0, 3.0, 0.875)
    assert (model.frames, model.fps, list(model.sizes)) == (81, 16, ["1280*720", "720*1280", "832*480", "480*832"])
    assert model.negative_prompt == OFFICIAL_NEGATIVE_PROMPT


def test_ti2v_defaults_are_the_official_ones():
    model = compose_config(["model=wan22_ti2v_5b"], hardware="cpu").model
    assert (model.steps, model.shift, model.guidance, model.frames, model.fps) == (50, 5.0, 5.0, 121, 24)
    assert list(model.sizes) == ["1280*704", "704*1280"] and model.pixel_grid == 32 and model.boundary is None


def test_a_misspelt_key_on_the_command_line_is_an_error():
    with pytest.raises(WanOptError, match="memroy"):
        compose_config(["hardware.memroy.experts=swap"], hardware="cpu")


def test_a_misspelt_key_in_a_profile_file_is_an_error(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    text = (conf / "hardware" / "h100.yaml").read_text().replace("vae_tiling:", "vae_tilling:")
    (conf / "hardware" / "typo.yaml").write_text(text.replace("name: h100", "name: typo"))
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises((ConfigCompositionException, ConfigKeyError), match="vae_tilling"):
            compose(config_name="config", overrides=["hardware=typo"])


def test_a_value_of_the_wrong_type_is_an_error():
    with pytest.raises(WanOptError):
        compose_config(["hardware.memory.vae_tiling=sometimes"], hardware="cpu")


@pytest.mark.parametrize("override, key", [
    ("hardware.memory.experts=everywhere", "hardware.memory.experts"),
    ("hardware.speed.attention=magic", "hardware.speed.attention"),
    ("hardware.speed.cfg=parallel", "hardware.speed.cfg"),
    ("hardware.memory.weight_dtype=int3", "hardware.memory.weight_dtype"),
])
def test_an_unknown_choice_is_named_with_the_accepted_words(override, key):
    with pytest.raises(WanOptError, match=key):  # the schema refuses it when Hydra composes
        check_knobs(compose_config([override], hardware="cpu"))


@pytest.mark.parametrize("override, says", [
    ("hardware.memory.vram_budget_gb=-3", "vram_budget_gb=-3 is negative"),
    ("hardware.memory.host_ram_gb=0", "host_ram_gb=0 is not a size"),
    ("hardware.memory.offload_blocks_per_group=0", "offload_blocks_per_group=0 is below 1"),
])
def test_a_memory_size_out_of_range_is_named(override, says):
    with pytest.raises(WanOptError, match=says):
        check_knobs(compose_config([override], hardware="h100"))


def test_an_unknown_profile_or_model_is_an_error():
    with pytest.raises(WanOptError, match="h1000"):
        compose_config([], hardware="h1000")
    with pytest.raises(WanOptError, match="wan99"):
        compose_config(["model=wan99"], hardware="cpu")


@pytest.mark.parametrize("argv, expected", [
    (["run.py", "prompt=x"], ["run.py", "hardware=cpu", "prompt=x"]),
    (["run.py", "--cfg", "job", "prompt=x"], ["run.py", "--cfg", "job", "hardware=cpu", "prompt=x"]),
    (["run.py", "-m", "seed=1,2"], ["run.py", "-m", "hardware=cpu", "seed=1,2"]),
    (["run.py", "--info"], ["run.py", "hardware=cpu", "--info"]),
    (["run.py", "hardware=h100", "prompt=x"], ["run.py", "hardware=h100", "prompt=x"]),
    (["run.py", "hardware.memory.experts=swap"], ["run.py", "hardware=cpu", "hardware.memory.experts=swap"]),
    (["run.py", "-m", "hydra/launcher=slurm", "seed=1,2"], ["run.py", "-m", "hardware=auto", "hydra/launcher=slurm",
                                                             "seed=1,2"]),
])
def test_the_detected_profile_joins_the_overrides_unless_one_was_given(monkeypatch, argv, expected):
    from wan_opt import app, hardware

    monkeypatch.setattr(hardware, "detect", lambda: hardware.HardwareChoice("cpu", "no CUDA GPU visible", None))
    assert app.with_detected_hardware(argv)[0] == expected


def test_the_slurm_launcher_composes_with_one_gpu_per_job():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hardware=auto"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert cfg.hardware.name == "auto"


def test_auto_becomes_the_profile_detected_where_the_job_runs(monkeypatch):
    from wan_opt import hardware
    from wan_opt.prepare import prepare, resolve_hardware

    monkeypatch.setattr(hardware, "detect", lambda: hardware.HardwareChoice("a100_40gb", "A100 40GB matches", None))
    overrides = ["hardware.memory.vae_tiling=false"]
    cfg, detected = resolve_hardware(compose_config(overrides, hardware="auto"), overrides)
    assert cfg.hardware.name == "a100_40gb" and cfg.hardware.memory.experts == "swap"
    assert cfg.hardware.memory.vae_tiling is False  # set by hand: kept over the profile's true
    plan = ["plan=true", *overrides]
    assert "auto-detected" in prepare(compose_config(plan, hardware="auto"), plan).hardware_reason


AUTO_CASES = [
    ["mode=fast"],
    ["mode=fast", "hardware.speed.compile=none"],
    ["hardware.memory.vae_tiling=false"],
    ["hardware.speed.attention=cudnn"],
    ["hardware.memory.experts=offload", "hardware.memory.offload_blocks_per_group=2"],
    ["model=wan22_ti2v_5b", "seed=7", "hardware.speed.cfg=batched"],
]


@pytest.mark.parametrize("detected", ["h100", "a100_40gb", "rtx4090"])
@pytest.mark.parametrize("overrides", AUTO_CASES)
def test_auto_gives_exactly_what_naming_the_detected_profile_gives(monkeypatch, detected, overrides):
    """The detected profile's values under the user's choices: a mode and single knobs land over it."""
    from omegaconf import OmegaConf

    from wan_opt import hardware
    from wan_opt.prepare import resolve_hardware

    monkeypatch.setattr(hardware, "detect", lambda: hardware.HardwareChoice(detected, "matches", None))
    auto, _ = resolve_hardware(compose_config(overrides, hardware="auto"), overrides)
    named = compose_config(overrides, hardware=detected)
    assert OmegaConf.to_container(auto) == OmegaConf.to_container(named)


def test_auto_with_mode_fast_keeps_the_fp8_settings_and_passes_its_checks(monkeypatch):
    from wan_opt import hardware
    from wan_opt.prepare import prepare

    monkeypatch.setattr(hardware, "detect", lambda: hardware.HardwareChoice("h100", "H100 matches", None))
    overrides = ["mode=fast", "model=wan22_t2v_a14b", "plan=true", "hardware.memory.host_ram_gb=128"]
    prepared = prepare(compose_config(overrides, hardware="auto"), overrides)
    memory, speed = prepared.cfg.hardware.memory, prepared.cfg.hardware.speed
    assert prepared.cfg.hardware.name == "h100" and prepared.cfg.mode == "fast"
    assert memory.weight_dtype == "float8_e4m3fn" and speed.fp8_matmul and speed.attention == "fp8"


def test_compile_caches_go_to_the_configured_folder(tmp_path, monkeypatch):
    import os

    from wan_opt.optim.speed import SpeedPolicy

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    SpeedPolicy(compile="regional", compile_cache_dir=str(tmp_path / "cache"))._use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    SpeedPolicy(compile="regional", compile_cache_dir=str(tmp_path / "cache"))._use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's own folder wins


def test_attention_auto_takes_flashattention3_on_hopper_in_one_process_where_installed():
    from wan_opt.optim.speed import attention_backend

    assert attention_backend("auto", (9, 0), {"flash3"}) == "_flash_3"
    assert attention_backend("auto", (9, 0), set()) is None  # diffusers' default: SDPA, cuDNN on Hopper
    assert attention_backend("auto", (8, 0), {"flash3"}) is None  # built for Hopper only
    assert attention_backend("auto", (9, 0), {"flash3"}, processes=2) is None  # no context-parallel path
    assert attention_backend("cudnn", (9, 0), {"flash3"}) == "_native_cudnn"  # a named kernel is kept


def test_attention_auto_prefers_flashattention4_on_hopper():
    from wan_opt.optim.speed import attention_backend

    assert attention_backend("auto", (9, 0), {"flash4", "flash3"}) == "flash4"
    assert attention_backend("auto", (9, 0), {"flash4"}, processes=2) == "flash4"  # its processor defers to a split
    assert attention_backend("auto", (8, 9), {"flash4"}) is None  # measured on Hopper only
    assert attention_backend("flash4", (10, 0), set()) == "flash4"


def test_fp8_attention_is_ours_even_where_sageattention_is_installed():
    """mode=fast's attention stays within 3% of exact attention; SageAttention runs only when named."""
    from wan_opt.optim.speed import attention_backend

    assert attention_backend("fp8", (9, 0), {"sage", "flash4", "flash3"}) == "fp8"
    assert attention_backend("fp8", (8, 9), set()) == "fp8"
    assert attention_backend("sage", (9, 0), {"sage"}) == "sage"


@pytest.mark.parametrize("choice, message", [("flash4", "flash-attn-4 package"), ("flash3", "flash_attn_3 package"),
                                             ("sage", "SageAttention")])
def test_an_attention_library_asked_for_and_not_installed_is_named(choice, message, monkeypatch):
    from wan_opt.optim import speed
    from wan_opt.checks import check_device

    monkeypatch.setattr(speed, "installed_attention", lambda device=None: set())
    cfg = compose_config([f"hardware.speed.attention={choice}"], hardware="cpu")
    with pytest.raises(WanOptError, match=f"{message}.*not installed.*attention=auto"):
        check_device(cfg)


def test_the_readmes_hopper_install_names_extras_that_bring_flashattention4():
    """The README's Hopper line installs extras of this package, and each brings FlashAttention-4, the package
    attention=auto looks for on Hopper."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r'pip install -e "\.\[([\w-]+)\]"', (root / "README.md").read_text())
    hopper = [extra for extra in named if extra.startswith("hopper")]
    assert hopper == ["hopper", "hopper-cu12"]
    for extra in hopper:
        assert [r.split("[")[0].split(">")[0] for r in extras[extra]] == ["flash-attn-4"], extras[extra]


def test_flashattention3_off_hopper_is_named(monkeypatch):
    from wan_opt.optim import speed
    from wan_opt.checks import check_attention_library

    monkeypatch.setattr(speed, "installed_attention", lambda device=None: {"flash3"})
    with pytest.raises(WanOptError, match="built for Hopper.*there is no GPU"):
        check_attention_library("flash3", "cpu")


def test_fast_mode_puts_fp8_on_top_of_the_profile_and_a_knob_set_by_hand_still_wins():
    lossless, fast = (compose_config(["model=wan22_t2v_a14b", f"mode={m}"], hardware="h100") for m in ("lossless", "fast"))
    assert lossless == compose_config(["model=wan22_t2v_a14b"], hardware="h100")  # the default mode
    assert (lossless.hardware.memory.weight_dtype, lossless.hardware.speed.attention) == ("bfloat16", "auto")
    assert fast.mode == "fast" and fast.hardware.memory.weight_dtype == "float8_e4m3fn"
    assert fast.hardware.speed.fp8_matmul and fast.hardware.speed.attention == "fp8"
    assert fast.hardware.speed.compile == lossless.hardware.speed.compile  # the rest of the profile stays
    own = compose_config(["model=wan22_t2v_a14b", "mode=fast", "hardware.speed.attention=auto"], hardware="h100")
    assert own.hardware.speed.attention == "auto" and own.hardware.speed.fp8_matmul


def test_fast_mode_without_fp8_tensor_cores_is_refused_naming_the_mode():
    from wan_opt.checks import check_device

    cfg = compose_config(["model=tiny", "mode=fast"], hardware="cpu")
    with pytest.raises(WanOptError, match="mode=fast runs on fp8 tensor cores .* drop mode=fast"):
        check_device(cfg)

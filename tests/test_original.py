"""The Wan team's original checkpoint layout: key mapping (wan_opt.loading.original_names) and the converter CLI (wan_opt.convert).

Tiny models are written in the original layout by tests/checkpoints.py (its own diffusers -> original maps),
read back through wan_opt.loading.original_names, and compared with the models they came from: tensors exactly, and the
T5 and VAE also through a forward pass.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from safetensors.torch import load_file, save_file
from transformers import UMT5EncoderModel

from tests.checkpoints import ORIGINAL_DITS, T5_FILE, TOKENIZER_DIR, VAE_FILES, write_original_checkpoint
from wan_opt import convert
from wan_opt.loading import original_names as original
from wan_opt.loading.original import dtype_for, load_dit
from wan_opt.loading.tiny import build_tiny_components

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ["t2v_a14b", "ti2v_5b"]

DIT_NAMES = ["patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
             "time_projection.1.weight", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.norm_q.weight",
             "blocks.0.cross_attn.norm_k.weight", "blocks.0.cross_attn.o.bias", "blocks.0.norm3.weight",
             "blocks.0.ffn.0.weight", "blocks.1.ffn.2.bias", "blocks.0.modulation", "head.head.weight",
             "head.modulation"]
T5_NAMES = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.attn.o.weight", "blocks.0.norm1.weight",
            "blocks.0.norm2.weight", "blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight", "blocks.1.ffn.fc2.weight",
            "blocks.0.pos_embedding.embedding.weight", "blocks.1.pos_embedding.embedding.weight", "norm.weight"]
VAE_NAMES = {
    "common": ["conv1.weight", "conv2.bias", "encoder.conv1.weight", "encoder.middle.1.to_qkv.weight",
               "decoder.middle.0.residual.0.gamma", "decoder.middle.2.residual.6.weight", "decoder.head.0.gamma",
               "decoder.head.2.weight"],
    # tiny VAEs have one residual block per encoder stage, so resamples sit at flat index 1, 3, 5 (encoder)
    # and 2, 5, 8 (decoder: two residual blocks per stage)
    "t2v_a14b": ["encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.1.resample.1.weight",
                 "encoder.downsamples.3.time_conv.weight", "encoder.downsamples.2.shortcut.weight",
                 "decoder.upsamples.0.residual.2.weight", "decoder.upsamples.2.time_conv.weight",
                 "decoder.upsamples.3.shortcut.weight"],
    "ti2v_5b": ["encoder.downsamples.0.downsamples.0.residual.0.gamma",
                "encoder.downsamples.1.downsamples.1.time_conv.weight",
                "decoder.upsamples.0.upsamples.2.time_conv.weight", "decoder.upsamples.3.upsamples.0.shortcut.weight"],
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny(family) -> dict:
    return build_tiny_components(seed=0, family=family)


@pytest.fixture(scope="module")
def src(family, tiny, tmp_path_factory) -> Path:
    return write_original_checkpoint(tmp_path_factory.mktemp(family) / "original", tiny, family)


def assert_same_tensors(ours: dict, reference: dict) -> None:
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def dit_folders(src: Path, family: str) -> dict[str, Path]:
    return {component: src / folder for folder, component in ORIGINAL_DITS[family].items()}


# ------------------------------------------------------------------------------------- layout

def test_writes_the_release_file_layout(src, family):
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    dits = [f"{folder}/" if folder != "." else "" for folder in ORIGINAL_DITS[family]]
    expected = {f"{d}{name}" for d in dits for name in (
        "config.json", "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")}
    tokenizer = {f"{TOKENIZER_DIR}/tokenizer.json", f"{TOKENIZER_DIR}/tokenizer_config.json"}  # save_pretrained's
    expected |= {T5_FILE, VAE_FILES[family], *tokenizer}
    assert files == expected


def test_original_files_use_the_wan_module_names(src, family):
    for folder in dit_folders(src, family).values():
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert set(DIT_NAMES) <= set(index["weight_map"])
        config = json.loads((folder / "config.json").read_text())
        assert config["_class_name"] == "WanModel"
        assert config["model_type"] == ("ti2v" if family == "ti2v_5b" else "t2v")
    assert set(T5_NAMES) <= set(torch.load(src / T5_FILE))
    assert set(VAE_NAMES["common"] + VAE_NAMES[family]) <= set(torch.load(src / VAE_FILES[family]))


# ------------------------------------------------------------------------------------- DiT

def test_dit_converts_shard_by_shard_to_the_tiny_weights(src, family, tiny):
    for component, folder in dit_folders(src, family).items():
        converted = {}
        for shard in sorted(folder.glob("diffusion_pytorch_model-*.safetensors")):
            converted.update(original.convert_dit_state_dict(load_file(shard)))
        assert_same_tensors(converted, tiny[component].state_dict())
        config = original.dit_config_from_original(json.loads((folder / "config.json").read_text()))
        assert {k: tiny[component].config[k] for k in config} == config


def test_dit_text_dim_defaults_to_umt5_xxl_width():
    config = dict(dim=5120, eps=1e-6, ffn_dim=13824, freq_dim=256, in_dim=16, model_type="t2v", num_heads=40,
                  num_layers=40, out_dim=16, text_len=512)
    kwargs = original.dit_config_from_original(config)
    assert kwargs["text_dim"] == 4096 and kwargs["attention_head_dim"] == 128 and kwargs["patch_size"] == (1, 2, 2)


def test_convert_keeps_the_model_classes_float32_modules(src, family, tiny):
    folder = next(iter(ORIGINAL_DITS[family]))
    model = load_dit(src / folder, family, torch.bfloat16, torch.device("cpu"))
    keep = type(model)._keep_in_fp32_modules
    for name, tensor in model.state_dict().items():
        fp32 = any(part in keep for part in name.split("."))
        assert tensor.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert torch.equal(model.state_dict()["proj_out.weight"],
                       tiny["transformer"].state_dict()["proj_out.weight"].to(torch.bfloat16))


# -------------------------------------------------------------------------------------- T5

def test_t5_converts_to_an_identical_umt5_encoder(src, tiny):
    sd = torch.load(src / T5_FILE)
    config = original.t5_config_from_state_dict(sd)
    reference = tiny["text_encoder"]
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "dense_act_fn"):
        assert getattr(config, field) == getattr(reference.config, field), field
    encoder = UMT5EncoderModel(config).eval()
    encoder.load_state_dict(original.convert_t5_state_dict(sd), strict=True)
    assert_same_tensors(encoder.state_dict(), reference.state_dict())
    ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(ours, expected)


# ------------------------------------------------------------------------------------- VAE

def test_vae_converts_to_an_identical_decoder(src, family, tiny):
    reference = tiny["vae"]
    stats = dict(latents_mean=reference.config.latents_mean, latents_std=reference.config.latents_std)
    sd, kwargs = original.convert_vae_state_dict(torch.load(src / VAE_FILES[family]), **stats)
    assert {k: reference.config[k] for k in kwargs} == kwargs
    vae = AutoencoderKLWan(**kwargs).eval()
    vae.load_state_dict(sd, strict=True)
    latents = torch.randn(1, kwargs["z_dim"], 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, reference.decode(latents).sample)


def test_vae_latent_statistics_default_to_the_released_ones(src, family):
    _, kwargs = original.convert_vae_state_dict(torch.load(src / VAE_FILES[family]))
    if family == "ti2v_5b":
        assert kwargs["latents_mean"] == original.WAN22_LATENTS_MEAN and len(kwargs["latents_std"]) == 48
        assert kwargs["latents_std"][:2] == [0.4765, 1.0364]
    else:
        assert len(kwargs["latents_mean"]) == len(kwargs["latents_std"]) == 16
        assert kwargs["latents_mean"][:2] == [-0.7571, -0.7089] and kwargs["latents_std"][:2] == [2.8184, 1.4541]


# ------------------------------------------------------------------------------ unknown keys

CONVERTERS = {"dit": original.convert_dit_state_dict, "t5": original.convert_t5_state_dict,
              "vae": original.convert_vae_state_dict}


def original_state_dict(src: Path, family: str, what: str) -> dict:
    if what == "dit":
        return load_file(next(dit_folders(src, family)["transformer"].glob("*-00001-of-*.safetensors")))
    return torch.load(src / (T5_FILE if what == "t5" else VAE_FILES[family]))


@pytest.mark.parametrize("what, key", [
    ("dit", "img_emb.proj.0.weight"),  # the CLIP image embedding of Wan 2.1 I2V
    ("dit", "blocks.0.self_attn.q.scale"),
    ("t5", "pos_embedding.embedding.weight"),  # a shared relative bias, which umt5-xxl does not have
    ("vae", "decoder.middle.3.residual.0.gamma"),
])
def test_unknown_keys_are_named(src, family, what, key):
    sd = original_state_dict(src, family, what)
    sd[key] = torch.zeros(1)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        CONVERTERS[what](sd)


# ------------------------------------------------------------------------------------- CLI

def test_cli_writes_a_diffusers_layout_wanpipeline_loads(src, family, tiny, tmp_path):
    dst = tmp_path / "diffusers"
    result = subprocess.run([sys.executable, "-m", "wan_opt.convert", str(src), str(dst), "--dtype", "float32"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers"]  # no temporary folder left behind
    pipe = WanPipeline.from_pretrained(dst)
    for component in ("transformer", "transformer_2", "text_encoder", "vae"):
        if tiny[component] is None:
            assert pipe.transformer_2 is None
            continue
        assert_same_tensors(getattr(pipe, component).state_dict(), tiny[component].state_dict())
    assert pipe.config.boundary_ratio == (0.875 if family == "t2v_a14b" else None)
    assert pipe.config.expand_timesteps == (family == "ti2v_5b")
    assert pipe.scheduler.config.flow_shift == (12.0 if family == "t2v_a14b" else 5.0)
    assert pipe.tokenizer("a fox").input_ids == tiny["tokenizer"]("a fox").input_ids


def run_main(capsys, *args: Path) -> tuple[int, str]:
    code = convert.main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def a14b_copy(tmp_path) -> Path:
    components = build_tiny_components(seed=0, family="t2v_a14b")
    return write_original_checkpoint(tmp_path / "src", components, "t2v_a14b")


def assert_nothing_written(parent: Path) -> None:
    assert sorted(p.name for p in parent.iterdir()) == ["src"]


def test_missing_shard_is_named(a14b_copy, tmp_path, capsys):
    shard = "low_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors"
    (a14b_copy / shard).unlink()
    code, err = run_main(capsys, a14b_copy, tmp_path / "dst")
    assert code == 2 and shard in err and len(err.splitlines()) == 1
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", [T5_FILE, VAE_FILES["t2v_a14b"], f"{TOKENIZER_DIR}/tokenizer_config.json"])
def test_missing_component_file_is_named(a14b_copy, tmp_path, capsys, name):
    (a14b_copy / name).unlink()
    code, err = run_main(capsys, a14b_copy, tmp_path / "dst")
    assert code == 2 and name in err
    assert_nothing_written(tmp_path)


def test_unknown_key_in_a_shard_stops_the_conversion(a14b_copy, tmp_path, capsys):
    folder = a14b_copy / "low_noise_model"
    shard = folder / "diffusion_pytorch_model-00002-of-00002.safetensors"
    save_file({**load_file(shard), "img_emb.proj.1.weight": torch.zeros(2, 2)}, str(shard))
    code, err = run_main(capsys, a14b_copy, tmp_path / "dst")
    assert code == 2 and "img_emb.proj.1.weight" in err
    assert_nothing_written(tmp_path)  # the half-written temporary folder is gone too


def test_not_a_wan_layout(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README.md").write_text("not a checkpoint")
    code, err = run_main(capsys, tmp_path / "src", tmp_path / "dst")
    assert code == 2 and "not a Wan 2.2 checkpoint" in err
    assert_nothing_written(tmp_path)


def test_refuses_a_non_empty_destination(a14b_copy, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    code, err = run_main(capsys, a14b_copy, dst)
    assert code == 2 and "not empty" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_t5_keeps_float32_layers_only_where_transformers_does():
    """transformers keeps UMT5's `wo` in float32 under float16 alone; diffusers keeps its list at any dtype."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=4))
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert dtype_for(t5, wo, torch.bfloat16) == torch.bfloat16
    assert dtype_for(t5, wo, torch.float16) == torch.float32
    assert dtype_for(t5, "shared.weight", torch.float16) == torch.float16
    dit = WanTransformer3DModel
    assert dtype_for(dit, "blocks.0.norm2.weight", torch.bfloat16) == torch.float32
    assert dtype_for(dit, "blocks.0.ffn.net.0.proj.weight", torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("family, shift, boundary, experts", [
    ("t2v_a14b", 12.0, 0.875, 2), ("i2v_a14b", 5.0, 0.9, 2), ("ti2v_5b", 5.0, None, 1)])
def test_a_converted_checkpoint_samples_with_its_preset(tmp_path, family, shift, boundary, experts):
    """The scheduler and model_index.json a conversion writes carry the Wan team's shift and boundary, read from
    the family's model preset, the one place those numbers live."""
    import json

    from transformers import PreTrainedTokenizerFast

    from wan_opt.convert import write_scheduler_and_index

    write_scheduler_and_index(tmp_path, family, PreTrainedTokenizerFast)
    index = json.loads((tmp_path / "model_index.json").read_text())
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["flow_shift"] == shift and index["boundary_ratio"] == boundary
    assert (index["transformer_2"] != [None, None]) == (experts == 2)

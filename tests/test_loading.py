"""Checkpoints in both layouts (written tiny, in the real file and key names) load into the same model."""
import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from tests.checkpoints import write_diffusers_checkpoint, write_original_checkpoint
from wan_opt.pipeline import WanOptPipeline
from wan_opt.prepare import compose_config, prepare
from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import check_checkpoint
from wan_opt.loading.tiny import build_tiny_components

MODELS = {"t2v_a14b": ("wan22_t2v_a14b", 12.0, "96*64"), "ti2v_5b": ("wan22_ti2v_5b", 5.0, "64*64")}
WRITERS = {"diffusers": write_diffusers_checkpoint, "original": write_original_checkpoint}


def generate(pipe, size: str, guidance_2):
    width, height = map(int, size.split("*"))
    return pipe("a red fox", negative_prompt="blurry", height=height, width=width, num_frames=5,
                num_inference_steps=3, guidance_scale=4.0, guidance_scale_2=guidance_2,
                generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("family", ["t2v_a14b", "ti2v_5b"])
def test_both_layouts_load_the_same_model(tmp_path, layout, family):
    model, shift, size = MODELS[family]
    tiny = build_tiny_components(seed=3, family=family, shift=shift)
    root = WRITERS[layout](tmp_path / "ckpt", tiny, family)
    assert check_checkpoint(root, family).layout == layout

    cfg = compose_config([f"model={model}", f"model.ckpt_dir={root}"], hardware="cpu")
    loaded = WanOptPipeline.from_prepared(prepare(cfg, prompt_required=False))
    for role in ("transformer", "transformer_2", "text_encoder", "vae"):
        if tiny[role] is None:
            assert getattr(loaded, role) is None
            continue
        ours = getattr(loaded, role).state_dict()
        for name, tensor in tiny[role].state_dict().items():
            assert torch.equal(ours[name], tensor), f"{role}.{name}"

    reference_pipe = WanPipeline(**tiny, **({"boundary_ratio": 0.875} if family == "t2v_a14b"
                                            else {"expand_timesteps": True}))
    reference_pipe.transformer_2 = tiny["transformer_2"]
    guidance_2 = 3.0 if family == "t2v_a14b" else None
    reference = generate(WanOptPipeline.from_diffusers(reference_pipe), size, guidance_2)
    ours = generate(loaded, size, guidance_2)
    # Same weights, bit for bit; the frames agree to float32 rounding (memory layout can pick other kernels).
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-5


def write(tmp_path, layout="original", family="t2v_a14b"):
    return WRITERS[layout](tmp_path / "ckpt", build_tiny_components(seed=0, family=family), family)


def test_neither_layout_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WanOptError, match="neither a Diffusers checkpoint"):
        check_checkpoint(tmp_path / "empty", "t2v_a14b")


@pytest.mark.parametrize("layout, missing", [
    ("original", "low_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors"),
    ("original", "models_t5_umt5-xxl-enc-bf16.pth"),
    ("original", "Wan2.1_VAE.pth"),
    ("original", "high_noise_model/config.json"),
    ("diffusers", "transformer_2/config.json"),
    ("diffusers", "vae/diffusion_pytorch_model.safetensors"),
    ("diffusers", "scheduler/scheduler_config.json"),
])
def test_a_missing_file_is_named_before_loading(tmp_path, layout, missing):
    root = write(tmp_path, layout)
    (root / missing).unlink()
    cfg = compose_config(["model=wan22_t2v_a14b", f"model.ckpt_dir={root}", "prompt=a fox"], hardware="cpu")
    with pytest.raises(WanOptError, match=missing.replace(".", r"\.")):
        prepare(cfg).request


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    root = write(tmp_path)
    shard = root / "high_noise_model" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(shard))
    cfg = compose_config(["model=wan22_t2v_a14b", f"model.ckpt_dir={root}"], hardware="cpu")
    with pytest.raises(WanOptError, match="shape"):
        WanOptPipeline.from_prepared(prepare(cfg, prompt_required=False))


def test_the_wrong_model_for_the_checkpoint_is_named(tmp_path):
    root = write(tmp_path, "original", "ti2v_5b")
    cfg = compose_config(["model=wan22_t2v_a14b", f"model.ckpt_dir={root}", "prompt=a fox"], hardware="cpu")
    with pytest.raises(WanOptError, match="high_noise_model"):
        prepare(cfg).request


def test_diffusers_index_lists_shards_that_must_exist(tmp_path):
    root = write(tmp_path, "diffusers")
    index = root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    with pytest.raises(WanOptError, match="00001-of-00002"):
        check_checkpoint(root, "t2v_a14b")


def test_python_api_loads_a_checkpoint_under_a_profile(tmp_path):
    root = write(tmp_path, "diffusers")
    pipe = WanOptPipeline.from_pretrained(str(root), model="wan22_t2v_a14b", hardware="cpu",
                                          overrides=["hardware.speed.cfg=batched"])
    assert pipe.speed.batched_cfg and pipe.device.type == "cpu" and pipe.boundary_ratio == 0.875
    frames = generate(pipe, "96*64", 3.0)
    assert frames.shape == (1, 5, 64, 96, 3)

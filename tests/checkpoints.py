"""Write tiny models to disk in the two layouts Wan 2.2 checkpoints come in (test helper).

The original layout mirrors the Wan team's release file by file: expert folders of sharded safetensors with
an index, a WanModel config.json, the T5 encoder and the VAE as torch.save'd state dicts in the Wan module
naming, and the tokenizer under google/umt5-xxl/. The diffusers -> original key maps here are written
independently of wan_opt.loading.original_names, so a round trip through both checks each against the other.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILES = {"t2v_a14b": "Wan2.1_VAE.pth", "i2v_a14b": "Wan2.1_VAE.pth", "ti2v_5b": "Wan2.2_VAE.pth"}
# Which tiny component lands in which original folder: diffusers' transformer is the high-noise expert.
ORIGINAL_DITS = {"t2v_a14b": {"high_noise_model": "transformer", "low_noise_model": "transformer_2"},
                 "i2v_a14b": {"high_noise_model": "transformer", "low_noise_model": "transformer_2"},
                 "ti2v_5b": {".": "transformer"}}
MODEL_TYPES = {"t2v_a14b": "t2v", "i2v_a14b": "i2v", "ti2v_5b": "ti2v"}  # WanModel's model_type
WEIGHTS_STEM = "diffusion_pytorch_model"

# ----------------------------------------------------------------------------------------- DiT

_DIT_RULES = [
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"proj_out\.", "head.head."),
    (r"scale_shift_table", "head.modulation"),
    (r"patch_embedding\.", "patch_embedding."),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"blocks\.(\d+)\.attn1\.to_(q|k|v)\.", r"blocks.\1.self_attn.\2."),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"blocks\.(\d+)\.attn1\.norm_(q|k)\.", r"blocks.\1.self_attn.norm_\2."),
    (r"blocks\.(\d+)\.attn2\.to_(q|k|v)\.", r"blocks.\1.cross_attn.\2."),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"blocks\.(\d+)\.attn2\.norm_(q|k)\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    """Apply the one rule that matches the start of `key`; a key no rule knows is a test failure."""
    for pattern, replacement in rules:
        new, count = re.subn(f"^{pattern}", replacement, key)
        if count:
            return new
    raise KeyError(f"no original name for {key}")


def original_dit_state_dict(model) -> dict[str, torch.Tensor]:
    return {_rename(k, _DIT_RULES): v for k, v in model.state_dict().items()}


def original_dit_config(model, family: str) -> dict:
    """config.json as WanModel.save_pretrained writes it (no patch_size/text_dim: WanModel ignores them)."""
    c = model.config
    config = {
        "_class_name": "WanModel", "_diffusers_version": "0.33.1",
        "dim": c.num_attention_heads * c.attention_head_dim, "eps": c.eps, "ffn_dim": c.ffn_dim,
        "freq_dim": c.freq_dim, "in_dim": c.in_channels, "model_type": MODEL_TYPES[family],
        "num_heads": c.num_attention_heads, "num_layers": c.num_layers, "out_dim": c.out_channels, "text_len": 512,
    }
    # Only a test-size model differs from WanModel's defaults here; from_pretrained accepts these keys.
    if c.text_dim != 4096:
        config["text_dim"] = c.text_dim
    if tuple(c.patch_size) != (1, 2, 2):
        config["patch_size"] = list(c.patch_size)
    return config


def write_sharded(folder: Path, state_dict: dict[str, torch.Tensor], num_shards: int = 2) -> None:
    """Safetensors shards named and indexed as the Wan release names them."""
    keys = sorted(state_dict)
    per_shard = -(-len(keys) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        name = f"{WEIGHTS_STEM}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {k: state_dict[k].contiguous().clone() for k in keys[i * per_shard:(i + 1) * per_shard]}
        save_file(chunk, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ------------------------------------------------------------------------------------------ T5

_T5_RULES = [
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.final_layer_norm\.", "norm."),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
     r"blocks.\1.pos_embedding.embedding."),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.", r"blocks.\1.attn.\2."),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
]


def original_t5_state_dict(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The Wan T5 encoder's state dict; the tied input embedding is stored once, as token_embedding."""
    sd = model.state_dict()
    assert torch.equal(sd.pop("encoder.embed_tokens.weight"), sd["shared.weight"])
    return {_rename(k, _T5_RULES): v.to(dtype).clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------- VAE

_VAE_RESIDUAL = [("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
                 ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")]


def _residual(sub: str) -> str:
    for new, orig in _VAE_RESIDUAL:
        if sub.startswith(new):
            return orig + sub[len(new):]
    raise KeyError(f"no original name for residual parameter {sub}")


def _vae_fixed(key: str) -> str | None:
    fixed = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
             "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
             "decoder.norm_out.": "decoder.head.0.", "encoder.conv_out.": "encoder.head.2.",
             "decoder.conv_out.": "decoder.head.2."}
    for new, orig in fixed.items():
        if key.startswith(new):
            return orig + key[len(new):]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_residual(m[3])}"
    return None


def _vae21(key: str, nrb: int) -> str:
    """Wan 2.1 numbers encoder and decoder blocks in one flat sequence each."""
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.((?:resample|time_conv).+)", key):
        return f"encoder.downsamples.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{_residual(m[2])}"
    group = nrb + 2  # nrb + 1 residual blocks, then the upsample
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.upsamples.{int(m[1]) * group + int(m[2])}.{_residual(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{int(m[1]) * group + nrb + 1}.{m[2]}"
    raise KeyError(f"no original name for {key}")


def _vae22(key: str, nrb: int) -> str:
    """Wan 2.2 nests the blocks of each stage; the resample closes the stage."""
    if m := re.fullmatch(r"(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key) or re.fullmatch(
            r"(decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        inner = "downsamples" if m[1] == "encoder" else "upsamples"
        return f"{m[1]}.{inner}.{m[2]}.{inner}.{m[3]}.{_residual(m[4])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsampler\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.downsamples.{nrb}.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsampler\.(.+)", key):
        return f"decoder.upsamples.{m[1]}.upsamples.{nrb + 1}.{m[2]}"
    raise KeyError(f"no original name for {key}")


def original_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    nrb, blocks = vae.config.num_res_blocks, _vae22 if vae.config.is_residual else _vae21
    return {_vae_fixed(k) or blocks(k, nrb): v.clone() for k, v in vae.state_dict().items()}


# -------------------------------------------------------------------------------------- writers

def write_original_checkpoint(root: Path, components: dict, family: str,
                              t5_dtype: torch.dtype = torch.float32) -> Path:
    """The Wan team's layout of `components` (from build_tiny_components) under `root`.

    The release stores the T5 in bfloat16 (hence its file name); t5_dtype defaults to float32 so a test can
    compare against the float32 tiny encoder exactly.
    """
    root.mkdir(parents=True, exist_ok=True)
    for folder, name in ORIGINAL_DITS[family].items():
        (root / folder).mkdir(exist_ok=True)
        model = components[name]
        (root / folder / "config.json").write_text(json.dumps(original_dit_config(model, family), indent=2))
        write_sharded(root / folder, original_dit_state_dict(model))
    torch.save(original_t5_state_dict(components["text_encoder"], t5_dtype), root / T5_FILE)
    torch.save(original_vae_state_dict(components["vae"]), root / VAE_FILES[family])
    components["tokenizer"].save_pretrained(root / TOKENIZER_DIR)
    return root


def write_diffusers_checkpoint(root: Path, components: dict, family: str) -> Path:
    """The Diffusers layout (model_index.json and one folder per component), as WanPipeline (I2V-A14B:
    WanImageToVideoPipeline, without an image encoder) saves it."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    parts = {k: v for k, v in components.items() if v is not None}
    if family == "i2v_a14b":
        WanImageToVideoPipeline(**parts, boundary_ratio=0.9).save_pretrained(root)
        return root
    extra = {"expand_timesteps": True} if family == "ti2v_5b" else {"boundary_ratio": 0.875}
    WanPipeline(**parts, **extra).save_pretrained(root)
    return root

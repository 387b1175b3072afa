"""The Wan team's original checkpoint naming -> the diffusers/transformers classes this project runs.

Pure mapping of keys, tensors and configs: nothing here reads files. Every mapping is explicit and a key
without a counterpart raises ValueError naming it, so a checkpoint of another variant (I2V image
embedding, a re-packed file with a prefix, ...) fails loudly instead of losing weights.

Original naming, from the Wan2.2 sources (wan/modules/model.py, t5.py, vae2_1.py, vae2_2.py):
  DiT  WanModel: patch_embedding, text_embedding.{0,2}, time_embedding.{0,2}, time_projection.1,
       blocks.N.{self_attn,cross_attn}.{q,k,v,o,norm_q,norm_k}, blocks.N.norm3 (the only affine
       LayerNorm: before cross-attention), blocks.N.ffn.{0,2}, blocks.N.modulation, head.head, head.modulation.
  T5   encoder-only umt5_xxl (shared_pos=False: one relative-bias table per block): token_embedding,
       blocks.N.{norm1,attn.{q,k,v,o},norm2,ffn.{gate.0,fc1,fc2},pos_embedding.embedding}, norm.
  VAE  2.1: encoder.downsamples.I / decoder.upsamples.I are flat sequences of residual and resample blocks;
       2.2: they nest per stage (encoder.downsamples.S.downsamples.J) with a parameter-free average shortcut.
"""
from __future__ import annotations

import inspect
import math
import re

import torch
from diffusers import AutoencoderKLWan
from transformers import UMT5Config

# --------------------------------------------------------------------------------------------- DiT

# WanModel's config.json leaves out patch_size and text_dim (its ignore_for_config), so their defaults apply.
DIT_DEFAULTS = {"patch_size": (1, 2, 2), "text_dim": 4096}

_DIT_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_DIT_TOP_PARAMS = {"head.modulation": "scale_shift_table"}
_DIT_BLOCK_MODULES = {
    **{f"{orig}.{p}": f"{new}.{q}" for orig, new in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for p, q in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                    ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    # WanModel runs norm1 -> self-attn, norm3 -> cross-attn, norm2 -> ffn; diffusers numbers them in call
    # order. Only the cross-attention norm has weights (cross_attn_norm=True), the others are affine-free.
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_DIT_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def dit_config_from_original(cfg: dict) -> dict:
    """WanTransformer3DModel kwargs from a WanModel config.json: Wan 2.2's T2V, I2V (36 input channels, no CLIP
    image cross-attention) and TI2V; Wan 2.1's image cross-attention (img_emb) has no mapping here."""
    cfg = {**DIT_DEFAULTS, **cfg}
    if cfg["dim"] % cfg["num_heads"]:
        raise ValueError(f"config.json has dim={cfg['dim']} not divisible by num_heads={cfg['num_heads']}.")
    return dict(
        patch_size=tuple(cfg["patch_size"]),
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["dim"] // cfg["num_heads"],
        in_channels=cfg["in_dim"],
        out_channels=cfg["out_dim"],
        text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"],
        ffn_dim=cfg["ffn_dim"],
        num_layers=cfg["num_layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg["eps"],
        rope_max_seq_len=1024,  # WanModel's rope tables are fixed at 1024 positions
    )


def convert_dit_key(key: str) -> str:
    """The WanTransformer3DModel name of one original DiT tensor (key-local, so shards convert one by one)."""
    match = _BLOCK_KEY.fullmatch(key)
    prefix, rest = (f"blocks.{match[1]}.", match[2]) if match else ("", key)
    modules, params = (_DIT_BLOCK_MODULES, _DIT_BLOCK_PARAMS) if match else (_DIT_TOP_MODULES, _DIT_TOP_PARAMS)
    if rest in params:
        return prefix + params[rest]
    module, _, param = rest.rpartition(".")
    if module in modules and param in ("weight", "bias"):
        return f"{prefix}{modules[module]}.{param}"
    raise ValueError(f"Unexpected key {key!r} in the Wan DiT checkpoint: it has no counterpart in "
                     f"WanTransformer3DModel (only the T2V and TI2V models are supported).")


def convert_dit_state_dict(sd: dict) -> dict:
    """Rename every tensor of a (possibly partial: one shard) original DiT state dict."""
    return {convert_dit_key(key): value for key, value in sd.items()}


# ---------------------------------------------------------------------------------------------- T5

_T5_TOP = {"token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
           "norm.weight": ("encoder.final_layer_norm.weight",)}
_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan's T5FeedForward is fc2(fc1(x) * gelu_tanh(gate(x))); HF's gated-gelu is wo(wi_1(x) * gelu_new(wi_0(x))).
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def convert_t5_keys(key: str) -> tuple[str, ...]:
    """The UMT5EncoderModel names of one tensor of the Wan T5 encoder (the embedding is tied, hence two)."""
    if key in _T5_TOP:
        return _T5_TOP[key]
    match = _BLOCK_KEY.fullmatch(key)
    if match and match[2] in _T5_BLOCK:
        return (f"encoder.block.{match[1]}.{_T5_BLOCK[match[2]]}",)
    raise ValueError(f"Unexpected key {key!r} in the Wan T5 checkpoint: it has no counterpart in UMT5EncoderModel.")


def convert_t5_state_dict(sd: dict) -> dict:
    """Wan's umt5-xxl encoder state dict -> UMT5EncoderModel's (both tied embedding names share one tensor)."""
    return {new: value for key, value in sd.items() for new in convert_t5_keys(key)}


def _require(sd: dict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"The {what} checkpoint has no {key!r}: it is not a complete Wan {what}.")
    return sd[key]


def t5_config_from_state_dict(sd: dict) -> UMT5Config:
    """A UMT5Config sized from the tensor shapes of an original-naming T5 state dict (works at any size).

    Nothing else needs mapping: both implementations leave attention logits unscaled, use one relative-bias
    table per layer with the same bidirectional bucketing, and RMS norms with eps 1e-6.
    """
    vocab, d_model = _require(sd, "token_embedding.weight", "T5").shape
    buckets, heads = _require(sd, "blocks.0.pos_embedding.embedding.weight", "T5").shape
    inner = _require(sd, "blocks.0.attn.q.weight", "T5").shape[0]
    d_ff = _require(sd, "blocks.0.ffn.fc1.weight", "T5").shape[0]
    layers = len({m[1] for m in map(_BLOCK_KEY.fullmatch, sd) if m})
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,  # T5RelativeEmbedding's max_dist
        feed_forward_proj="gated-gelu",  # tanh-approximated GELU gate, as Wan's T5 GELU
        layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False,  # as google/umt5-xxl's config (no output-embedding tie in UMT5)
    )


# --------------------------------------------------------------------------------------------- VAE

# Latent statistics of the Wan 2.2 VAE (wan/modules/vae2_2.py, Wan2_2_VAE): the pipeline normalises latents
# with them. They are not stored in Wan2.2_VAE.pth, so they live here as data.
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]

_VAE_RESIDUAL = {
    "residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias",
}
_VAE_RESAMPLE = {"resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias"}
_VAE_ATTENTION = {"norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"}
_VAE_FIXED = {
    "conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias",
    **{f"{part}.{orig}": f"{part}.{new}" for part in ("encoder", "decoder") for orig, new in (
        ("conv1.weight", "conv_in.weight"), ("conv1.bias", "conv_in.bias"), ("head.0.gamma", "norm_out.gamma"),
        ("head.2.weight", "conv_out.weight"), ("head.2.bias", "conv_out.bias"))},
}
_VAE_MIDDLE = re.compile(r"(encoder|decoder)\.middle\.(\d)\.(.+)")
_VAE21_STAGE = re.compile(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(.+)")
_VAE22_STAGE = re.compile(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)")


def _unexpected_vae_key(key: str) -> ValueError:
    return ValueError(f"Unexpected key {key!r} in the Wan VAE checkpoint: it has no counterpart in AutoencoderKLWan.")


def _vae_block(key: str, sub: str, resnet: str, resampler: str) -> str:
    """A residual block's or a resample block's tensor under its diffusers module path."""
    if sub in _VAE_RESIDUAL:
        return f"{resnet}.{_VAE_RESIDUAL[sub]}"
    if sub in _VAE_RESAMPLE:
        return f"{resampler}.{sub}"
    raise _unexpected_vae_key(key)


def _vae_middle_key(key: str, match: re.Match) -> str:
    part, index, sub = match.groups()
    if index == "1" and sub in _VAE_ATTENTION:
        return f"{part}.mid_block.attentions.0.{sub}"
    if index in ("0", "2") and sub in _VAE_RESIDUAL:
        return f"{part}.mid_block.resnets.{int(index) // 2}.{_VAE_RESIDUAL[sub]}"
    raise _unexpected_vae_key(key)


def _vae21_key(key: str, match: re.Match, group: int) -> str:
    """Wan 2.1: the encoder keeps its flat numbering; the decoder regroups every `group` blocks into a stage."""
    part, index, sub = match[1], int(match[2]), match[3]
    if part.startswith("encoder"):
        return _vae_block(key, sub, f"encoder.down_blocks.{index}", f"encoder.down_blocks.{index}")
    stage, pos = divmod(index, group)
    resnet = f"decoder.up_blocks.{stage}.resnets.{pos}"
    return _vae_block(key, sub, resnet, f"decoder.up_blocks.{stage}.upsamplers.0")


def _vae22_key(key: str, match: re.Match) -> str:
    """Wan 2.2: stages are already nested; only the names of the stage members change."""
    part, stage, pos, sub = match.groups()
    down = part.startswith("encoder")
    base = f"{'encoder.down_blocks' if down else 'decoder.up_blocks'}.{stage}"
    return _vae_block(key, sub, f"{base}.resnets.{pos}", f"{base}.{'downsampler' if down else 'upsampler'}")


def is_wan22_vae(sd: dict) -> bool:
    """The 2.2 VAE nests its stages (encoder.downsamples.S.downsamples.J); the 2.1 one is flat."""
    return any(_VAE22_STAGE.fullmatch(key) for key in sd)


def _encoder_blocks(sd: dict, wan22: bool) -> list[dict]:
    """The encoder's residual and resample blocks in forward order, each as {sub-key: tensor}."""
    pattern = _VAE22_STAGE if wan22 else _VAE21_STAGE
    blocks: dict[tuple, dict] = {}
    for key, value in sd.items():
        if key.startswith("encoder.") and (match := pattern.fullmatch(key)):
            *index, sub = match.groups()[1:]
            blocks.setdefault(tuple(map(int, index)), {})[sub] = value
    return [blocks[index] for index in sorted(blocks)]


def _encoder_stages(sd: dict, wan22: bool) -> list[dict]:
    """Per encoder stage: its residual blocks' output widths and whether its closing downsample is temporal.

    Both VAE versions close every stage but the last with a resample block, which is all the grouping needs.
    """
    stages = [{"widths": [], "temporal": False}]
    for block in _encoder_blocks(sd, wan22):
        if "resample.1.weight" in block:
            stages[-1]["temporal"] = "time_conv.weight" in block
            stages.append({"widths": [], "temporal": False})
        elif "residual.6.weight" in block:
            stages[-1]["widths"].append(block["residual.6.weight"].shape[0])
    return stages


def vae_config_from_state_dict(sd: dict, latents_mean: list[float] | None = None,
                               latents_std: list[float] | None = None) -> dict:
    """AutoencoderKLWan kwargs sized from the shapes of an original-naming Wan 2.1 or 2.2 VAE state dict."""
    wan22 = is_wan22_vae(sd)
    stages = _encoder_stages(sd, wan22)
    if not all(s["widths"] for s in stages):
        raise ValueError("The VAE checkpoint has an encoder stage without residual blocks: it is not a Wan VAE.")
    base_dim = _require(sd, "encoder.conv1.weight", "VAE").shape[0]
    z_dim = _require(sd, "conv2.weight", "VAE").shape[0]
    nums = {len(s["widths"]) for s in stages}
    if len(nums) != 1:
        raise ValueError("The VAE checkpoint's encoder stages hold different numbers of residual blocks.")
    dim_mult = [s["widths"][-1] // base_dim for s in stages]
    temporal = [s["temporal"] for s in stages[:-1]]
    config = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=nums.pop(), attn_scales=[],
                  temperal_downsample=temporal, dropout=0.0, scale_factor_temporal=2 ** sum(temporal))
    mean, std = _latent_stats(z_dim, latents_mean, latents_std)
    config.update(latents_mean=mean, latents_std=std)
    if not wan22:
        return {**config, "scale_factor_spatial": 2 ** len(temporal)}
    in_channels = sd["encoder.conv1.weight"].shape[1]
    patch = math.isqrt(in_channels // 3)  # RGB patchified 2x2 into 12 channels
    return {**config, "is_residual": True, "in_channels": in_channels,
            "out_channels": _require(sd, "decoder.head.2.weight", "VAE").shape[0], "patch_size": patch,
            "decoder_base_dim": _require(sd, "decoder.head.0.gamma", "VAE").shape[0] // dim_mult[0],
            "scale_factor_spatial": 2 ** len(temporal) * patch}


def _latent_stats(z_dim: int, mean: list[float] | None, std: list[float] | None) -> tuple[list, list]:
    """The given statistics, else the released ones of the VAE with this latent width."""
    if mean is not None or std is not None:
        if mean is None or std is None or not len(mean) == len(std) == z_dim:
            raise ValueError(f"latents_mean and latents_std must both be given, with {z_dim} values each.")
        return list(mean), list(std)
    if z_dim == 48:
        return list(WAN22_LATENTS_MEAN), list(WAN22_LATENTS_STD)
    if z_dim == 16:  # AutoencoderKLWan's defaults are the Wan 2.1 VAE's statistics
        params = inspect.signature(AutoencoderKLWan.__init__).parameters
        return list(params["latents_mean"].default), list(params["latents_std"].default)
    raise ValueError(f"The VAE checkpoint's conv2.weight has {z_dim} latent channels; Wan VAEs have 16 or 48.")


def convert_vae_state_dict(sd: dict, latents_mean: list[float] | None = None,
                           latents_std: list[float] | None = None) -> tuple[dict, dict]:
    """(diffusers state dict, AutoencoderKLWan kwargs) of an original Wan2.1_VAE.pth or Wan2.2_VAE.pth dict.

    latents_mean/std: only for VAEs other than the released ones (test models); the defaults are the real
    statistics of the 2.1 (16 channels) or 2.2 (48 channels) VAE.
    """
    config = vae_config_from_state_dict(sd, latents_mean, latents_std)
    wan22 = config.get("is_residual", False)
    group = config["num_res_blocks"] + 2  # a 2.1 decoder stage: num_res_blocks + 1 residual blocks, 1 upsample
    converted = {}
    for key, value in sd.items():
        converted[_vae_key(key, wan22, group)] = value
    return converted, config


def _vae_key(key: str, wan22: bool, group: int) -> str:
    if key in _VAE_FIXED:
        return _VAE_FIXED[key]
    if match := _VAE_MIDDLE.fullmatch(key):
        return _vae_middle_key(key, match)
    if wan22 and (match := _VAE22_STAGE.fullmatch(key)):
        return _vae22_key(key, match)
    if not wan22 and (match := _VAE21_STAGE.fullmatch(key)):
        return _vae21_key(key, match, group)
    raise _unexpected_vae_key(key)

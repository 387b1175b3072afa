"""A tiny Wan 2.2 with random weights, built from the real diffusers/transformers classes.

Same structure as Wan2.2-T2V-A14B or I2V-A14B (two experts switched at the boundary, a UMT5 encoder, the Wan 2.1 VAE with
8x8 spatial and 4x temporal compression), or as TI2V-5B (one DiT on 48 channels, the Wan 2.2 VAE), at a size that
runs every stage on a CPU in seconds. Its output is noise. The tokenizer works on characters and is built in code,
so nothing is downloaded.
"""
from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from wan_opt.loading.layouts import TINY_SHAPES
from wan_opt.loading.modules import scheduler_for
from wan_opt.loading.original_names import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

TEXT_DIM = 32
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in UMT5

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
TINY_TEXT_ENCODER = dict(
    vocab_size=128, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
)
# I2V-A14B's shape: 16 channels of noise, 4 of the frame mask, 16 of the encoded conditioning video.
TINY_I2V_TRANSFORMER = {**TINY_TRANSFORMER, "in_channels": 36}
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
# TI2V-5B's shape: one DiT on 48 latent channels and the Wan 2.2 VAE (2x2 patchify + 8x8 = 16x16 spatial).
TINY_TI2V_TRANSFORMER = {**TINY_TRANSFORMER, "in_channels": 48, "out_channels": 48}
TINY_TI2V_VAE = dict(
    base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
)


def tiny_dit(family: str) -> dict:
    """The tiny DiT config of a family or of the tiny preset that has its shape."""
    shape = TINY_SHAPES.get(family, family)
    return {"i2v_a14b": TINY_I2V_TRANSFORMER, "ti2v_5b": TINY_TI2V_TRANSFORMER}.get(shape, TINY_TRANSFORMER)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer that appends </s>, as the UMT5 tokenizer does."""
    chars = sorted(set(string.printable) - set(string.whitespace) | {" "})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_tiny_components(seed: int = 0, family: str = "t2v_a14b", shift: float = 12.0) -> dict:
    """Every module of a tiny Wan 2.2 in float32, randomly initialised from `seed` (deterministic on CPU).

    family "t2v_a14b" (or "tiny") gives two experts and the Wan 2.1 VAE; "i2v_a14b" (or "tiny_i2v") the same on
    36 input channels; "ti2v_5b" (or "tiny_ti2v") one DiT and the 2.2 VAE.
    """
    ti2v = TINY_SHAPES.get(family, family) == "ti2v_5b"
    expert = tiny_dit(family)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        components = dict(
            transformer=WanTransformer3DModel(**expert),
            transformer_2=None if ti2v else WanTransformer3DModel(**expert),
            text_encoder=UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER)),
            vae=AutoencoderKLWan(**(TINY_TI2V_VAE if ti2v else TINY_VAE)),
        )
        _perturb_zero_inits(components)
    finally:
        torch.random.set_rng_state(gen_state)
    for module in components.values():
        if module is not None:
            module.eval().requires_grad_(False)
    components["tokenizer"] = tiny_tokenizer()
    components["scheduler"] = scheduler_for(shift)
    return components


def _perturb_zero_inits(components: dict) -> None:
    """Give zero-initialised tensors small random values, so every weight takes part in the output.

    Some layers start at zero (e.g. the DiT's output projection); a test that compares two load paths
    would then pass even if those weights were mapped wrongly.
    """
    for module in filter(None, components.values()):
        for param in module.parameters():
            if param.dim() >= 1 and torch.count_nonzero(param) == 0:
                param.data.normal_(0.0, 0.02)

"""The full-size Wan 2.2 architectures, and random-weight builds of them for benchmarks.

Speed and memory do not depend on weight values, so GPU benchmarks build the real modules at full size
with random weights, directly on the GPU in the target dtype (a 14 B expert in well under a second).
The output of such a model is noise; compare an optimized run with a reference run on the same weights.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from wan_opt.loading import tiny
from wan_opt.loading.layouts import DIFFUSERS_DITS, TINY_SHAPES
from wan_opt.loading.modules import cast_module, scheduler_for
from wan_opt.loading.original_names import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
from wan_opt.loading.verify import params_b, sizes_of
from wan_opt.memory.plan import ModelSizes
from wan_opt.memory.policy import EXPERTS, MemoryPolicy, move_to_pinned, torch_dtype

A14B_EXPERT = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
I2V_A14B_EXPERT = {**A14B_EXPERT, "in_channels": 36}  # noise 16 + frame mask 4 + conditioning latents 16
TI2V_5B_DIT = {**A14B_EXPERT, "num_attention_heads": 24, "in_channels": 48, "out_channels": 48,
               "ffn_dim": 14336, "num_layers": 30}
UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
)
WAN21_VAE: dict = {}  # AutoencoderKLWan's defaults are the Wan 2.1 VAE
WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
    latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
)
DIT_CONFIGS = {"t2v_a14b": A14B_EXPERT, "i2v_a14b": I2V_A14B_EXPERT, "ti2v_5b": TI2V_5B_DIT}
VAE_CONFIGS = {"t2v_a14b": WAN21_VAE, "i2v_a14b": WAN21_VAE, "ti2v_5b": WAN22_VAE}


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_random_expert(family: str, dtype: torch.dtype, device: torch.device):
    """One full-size denoiser of `family` with random weights, initialised on `device` in `dtype`."""

    with _building(device, dtype):
        return cast_module(WanTransformer3DModel(**DIT_CONFIGS[family]), dtype).eval().requires_grad_(False)


def _place(module: torch.nn.Module, name: str, memory: MemoryPolicy, device: torch.device) -> torch.nn.Module:
    """Move a module built on `device` where the policy loads it. One that the policy will keep in pinned host
    memory (a swapped expert, a released encoder) goes straight there: no pageable copy on the way."""
    target = memory.load_device(name, device)
    if device.type == "cuda" and target.type == "cpu" and memory.waits_pinned(name):
        move_to_pinned([*module.parameters(), *module.buffers()])
        return module
    return module.to(target)


def build_random_components(family: str, memory: MemoryPolicy, device: torch.device, shift: float) -> dict:
    """Full-size modules of `family` with random weights, placed as `memory` says.

    Every module is initialised on `device` (a 14 B expert in under a second on a GPU; CPU initialisation of
    the same takes minutes) and then moved where the policy keeps it, one module at a time.
    """

    torch.manual_seed(0)
    components: dict = {"transformer_2": None}
    names = EXPERTS[:len(DIFFUSERS_DITS[family])]
    for name in names:
        components[name] = _place(build_random_expert(family, memory.load_dtype, device), name, memory, device)
    with _building(device, torch_dtype(memory.compute_dtype)):
        encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    components["text_encoder"] = _place(encoder, "text_encoder", memory, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with _building(device, torch.float32):
        vae = AutoencoderKLWan(**VAE_CONFIGS[family])
    components["vae"] = _place(cast_module(vae, torch_dtype(memory.vae_dtype)), "vae", memory, device)
    for module in filter(None, components.values()):
        module.eval().requires_grad_(False)
    components["tokenizer"] = tiny.tiny_tokenizer()  # token ids only; a real vocabulary is not needed for noise
    components["scheduler"] = scheduler_for(shift)
    return components


@functools.cache
def model_sizes(family: str) -> ModelSizes:
    """Counted from the real classes built on the meta device (no memory, no weights)."""
    if family in DIT_CONFIGS:
        dit, vae, te, experts = DIT_CONFIGS[family], VAE_CONFIGS[family], UMT5_XXL, len(DIFFUSERS_DITS[family])
    else:  # the tiny presets' own sizes: two experts of the tiny T2V or I2V shape, or one of TI2V's
        ti2v = TINY_SHAPES[family] == "ti2v_5b"
        dit, vae = tiny.tiny_dit(family), tiny.TINY_TI2V_VAE if ti2v else tiny.TINY_VAE
        te, experts = tiny.TINY_TEXT_ENCODER, 1 if ti2v else 2
    with torch.device("meta"):
        dit_module = WanTransformer3DModel(**dit)
        vae_module = AutoencoderKLWan(**vae)
        encoder = UMT5EncoderModel(UMT5Config(**te))
    return sizes_of(dit_module, experts, family, params_b(encoder),
                    encoder.get_input_embeddings().weight.numel() / 1e9, params_b(vae_module),
                    vae_module.config.scale_factor_spatial, vae_module.config.scale_factor_temporal)

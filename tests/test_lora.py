"""wan_opt.loading.lora on tiny experts: each key layout fuses exactly strength * alpha / rank * up @ down (or the diff).

The LoRA files are written here in each layout's own naming; the expected tensors are computed by hand from
the Wan2.2 module names (wan/modules/model.py), independently of wan_opt.loading.lora and wan_opt.loading.original_names.
"""
import copy
import json
import types

import pytest
import torch
from safetensors.torch import save_file

from wan_opt.errors import WanOptError
from wan_opt.loading.lora import LoraSpec, apply_expert_loras, apply_lora, lora_deltas, read_lora
from wan_opt.loading.tiny import build_tiny_components

RANK = 4
ALPHA = 2.0  # scale alpha / rank = 0.5
BLOCKS = 2
# original Wan module -> diffusers module, per block and at the top
BLOCK_LINEARS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
BLOCK_NORMS = {"self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
               "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
               "norm3": "norm2"}  # Wan's norm3 is the cross-attention norm
TOP_LINEARS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
}


def block_linears():
    return {f"blocks.{i}.{o}": f"blocks.{i}.{d}" for i in range(BLOCKS) for o, d in BLOCK_LINEARS.items()}


def save(tmp_path, sd, name="bad.safetensors"):
    save_file(sd, str(tmp_path / name))
    return str(tmp_path / name)


class Builder:
    """Random LoRA tensors shaped for `model`, and the delta each parameter should receive at strength 1."""

    def __init__(self, model, seed=0):
        self.params = dict(model.named_parameters())
        self.gen = torch.Generator().manual_seed(seed)
        self.sd, self.expected = {}, {}

    def rand(self, *shape):
        return 0.1 * torch.randn(*shape, generator=self.gen)

    def pair(self, down_key, up_key, target, alpha_key=None, alpha=ALPHA):
        out_dim, in_dim = self.params[target].shape
        down, up = self.rand(RANK, in_dim), self.rand(out_dim, RANK)
        self.sd[down_key], self.sd[up_key] = down, up
        scale = 1.0
        if alpha_key:
            self.sd[alpha_key] = torch.tensor(alpha)
            scale = alpha / RANK
        self.expected[target] = scale * (up @ down)

    def diff(self, key, target):
        self.sd[key] = self.rand(*self.params[target].shape)
        self.expected[target] = self.sd[key]

    def save(self, tmp_path, name="lora.safetensors", metadata=None):
        save_file(self.sd, str(tmp_path / name), metadata=metadata)
        return str(tmp_path / name)


def peft(model, seed=0):
    """diffusers/PEFT: transformer.<diffusers module>.lora_A/lora_B.weight (+ lora_B.bias), no alpha."""
    b = Builder(model, seed)
    for name in [*block_linears().values(), *TOP_LINEARS.values(), "proj_out"]:
        b.pair(f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight", f"{name}.weight")
        if name.endswith("to_q"):  # PEFT's lora_bias: what diffusers turns a diff_b into
            b.diff(f"transformer.{name}.lora_B.bias", f"{name}.bias")
    return b


def original(model, seed=0, prefix="diffusion_model.", down="lora_down", up="lora_up", alpha=True):
    """Original Wan module names: Wan2.2-Lightning's high/low_noise_model.safetensors, ComfyUI conversions."""
    b = Builder(model, seed)
    for orig, name in {**block_linears(), **TOP_LINEARS, "head.head": "proj_out"}.items():
        b.pair(f"{prefix}{orig}.{down}.weight", f"{prefix}{orig}.{up}.weight", f"{name}.weight",
               alpha_key=f"{prefix}{orig}.alpha" if alpha else None)
    return b


def lightx2v(model, seed=0):
    """lightx2v distill: pairs for large matrices, .diff/.diff_b/.diff_m full differences for everything else."""
    b = Builder(model, seed)
    p = "diffusion_model."
    for orig, name in {**block_linears(), **TOP_LINEARS}.items():
        b.pair(f"{p}{orig}.lora_down.weight", f"{p}{orig}.lora_up.weight", f"{name}.weight")
        b.diff(f"{p}{orig}.diff_b", f"{name}.bias")
    for i in range(BLOCKS):
        for orig, name in BLOCK_NORMS.items():
            b.diff(f"{p}blocks.{i}.{orig}.diff", f"blocks.{i}.{name}.weight")
        b.diff(f"{p}blocks.{i}.norm3.diff_b", f"blocks.{i}.norm2.bias")
        b.diff(f"{p}blocks.{i}.diff_m", f"blocks.{i}.scale_shift_table")
    for orig, name in (("head.head", "proj_out"), ("patch_embedding", "patch_embedding")):
        b.diff(f"{p}{orig}.diff", f"{name}.weight")
        b.diff(f"{p}{orig}.diff_b", f"{name}.bias")
    b.diff(f"{p}head.diff_m", "scale_shift_table")
    return b


def kohya(model, seed=0):
    """kohya / musubi-tuner: lora_unet_<original name with _ for .>, with alpha; text-encoder keys are skipped."""
    b = Builder(model, seed)
    for orig, name in block_linears().items():
        k = "lora_unet_" + orig.replace(".", "_")
        b.pair(f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{name}.weight", alpha_key=f"{k}.alpha")
    b.sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = b.rand(RANK, 8)
    return b


def peft_header(lora, **config):
    """The lora_adapter_metadata header diffusers' save_lora_weights writes for the transformer."""
    modules = sorted({k[len("transformer."):-len(".lora_A.weight")] for k in lora.sd if k.endswith(".lora_A.weight")})
    header = {"r": RANK, "target_modules": modules, **config}
    return {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in header.items()})}


LAYOUTS = {
    "peft": peft,
    "lightning": original,
    "lightning_no_prefix": lambda m, seed=0: original(m, seed, prefix=""),
    "comfy_lora_A_B_no_alpha": lambda m, seed=0: original(m, seed, down="lora_A", up="lora_B", alpha=False),
    "lightx2v": lightx2v,
    "kohya_musubi": kohya,
}


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


@pytest.fixture
def expert(components):
    return copy.deepcopy(components["transformer"])


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_fused(model, before, expected, strength):
    """Exactly the expected parameters moved, each by strength * its delta; every other one is untouched."""
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param, before[name] + strength * expected[name], atol=1e-6, rtol=0)
        else:
            assert torch.equal(param, before[name]), f"{name} changed"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_each_layout_fuses_exactly_the_expected_delta(expert, tmp_path, layout, strength):
    lora = LAYOUTS[layout](expert)
    before = snapshot(expert)
    changed = apply_lora(expert, LoraSpec(lora.save(tmp_path), strength))
    assert changed == len(lora.expected)
    assert_fused(expert, before, lora.expected, strength)


def test_lightx2v_layout_reaches_every_parameter(expert):
    # norms, modulation, patch embedding and head included: a distill LoRA may change any of them
    assert set(lightx2v(expert).expected) == {name for name, _ in expert.named_parameters()}


def test_strength_zero_changes_nothing(expert, tmp_path):
    before = snapshot(expert)
    assert apply_lora(expert, LoraSpec(lightx2v(expert).save(tmp_path), 0.0)) == 0
    assert_fused(expert, before, {}, 0.0)


def test_strength_is_linear(components, tmp_path):
    path = original(components["transformer"]).save(tmp_path)
    moved = {}
    for strength in (0.5, 1.0, -1.5):
        model = copy.deepcopy(components["transformer"])
        apply_lora(model, LoraSpec(path, strength))
        moved[strength] = model.blocks[1].ffn.net[2].weight - components["transformer"].blocks[1].ffn.net[2].weight
    torch.testing.assert_close(moved[1.0], 2 * moved[0.5], atol=1e-6, rtol=0)
    torch.testing.assert_close(moved[-1.5], -3 * moved[0.5], atol=1e-6, rtol=0)


def test_each_expert_gets_its_own_file(components, tmp_path):
    pipe = types.SimpleNamespace(transformer=copy.deepcopy(components["transformer"]),
                                 transformer_2=copy.deepcopy(components["transformer_2"]))
    high, low = original(pipe.transformer, seed=1), kohya(pipe.transformer_2, seed=2)
    before_high, before_low = snapshot(pipe.transformer), snapshot(pipe.transformer_2)
    counts = apply_expert_loras(pipe, LoraSpec(high.save(tmp_path, "high.safetensors"), 1.0),
                                LoraSpec(low.save(tmp_path, "low.safetensors"), 0.8))
    assert counts == {"transformer": len(high.expected), "transformer_2": len(low.expected)}
    assert_fused(pipe.transformer, before_high, high.expected, 1.0)
    assert_fused(pipe.transformer_2, before_low, low.expected, 0.8)


def test_only_one_expert(components, tmp_path):
    pipe = types.SimpleNamespace(transformer=copy.deepcopy(components["transformer"]),
                                 transformer_2=copy.deepcopy(components["transformer_2"]))
    before_low = snapshot(pipe.transformer_2)
    lora = original(pipe.transformer)
    assert apply_expert_loras(pipe, LoraSpec(lora.save(tmp_path)), None) == {"transformer": len(lora.expected)}
    assert_fused(pipe.transformer_2, before_low, {}, 1.0)


def test_bfloat16_weights_get_the_float32_delta_rounded_once(expert, tmp_path):
    expert.to(torch.bfloat16)
    lora = original(expert)
    before = snapshot(expert)
    apply_lora(expert, LoraSpec(lora.save(tmp_path), 0.7))
    for name, param in expert.named_parameters():
        assert param.dtype == torch.bfloat16
        want = (before[name].float() + 0.7 * lora.expected[name]).to(torch.bfloat16) if name in lora.expected \
            else before[name]
        assert torch.equal(param, want), name


def test_pt_file(expert, tmp_path):
    lora = original(expert)
    torch.save(lora.sd, tmp_path / "lora.pt")
    before = snapshot(expert)
    apply_lora(expert, LoraSpec(str(tmp_path / "lora.pt")))
    assert_fused(expert, before, lora.expected, 1.0)


def test_peft_alpha_from_the_safetensors_header(expert, tmp_path):
    # diffusers' save_lora_weights keeps lora_alpha (and alpha_pattern) in the header, prefixed by component
    lora = peft(expert)
    path = lora.save(tmp_path, metadata=peft_header(lora, lora_alpha=8, alpha_pattern={"attn1.to_q": 2}))
    scale = {name: (2 if ".attn1.to_q." in name else 8) / RANK for name in lora.expected}
    before = snapshot(expert)
    apply_lora(expert, LoraSpec(path))
    assert_fused(expert, before, {n: scale[n] * d for n, d in lora.expected.items()}, 1.0)


def test_lora_deltas_names_diffusers_parameters(expert):
    deltas = lora_deltas(kohya(expert).sd, expert)
    assert "blocks.1.attn2.to_out.0.weight" in deltas and "blocks.0.ffn.net.0.proj.weight" in deltas
    deltas = lora_deltas(original(expert).sd, expert)
    assert {"condition_embedder.text_embedder.linear_1.weight", "proj_out.weight",
            "condition_embedder.time_proj.weight"} <= set(deltas)


# --------------------------------------------------------------------- agreement with diffusers' converters

def diffusers_deltas(converted):
    """parameter -> B @ A (+ lora_B.bias) from a diffusers-format state dict (alpha already folded in)."""
    out = {}
    for key, a in converted.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[f"{module}.weight"] = converted[key.replace("lora_A", "lora_B")].float() @ a.float()
        elif key.endswith(".lora_B.bias"):
            out[key.removeprefix("transformer.").replace(".lora_B.bias", ".bias")] = converted[key]
    return out


def ours(sd, model):
    params = dict(model.named_parameters())
    return {t: sum(d.tensor(params[t].shape, torch.device("cpu")) for d in terms)
            for t, terms in lora_deltas(sd, model).items()}


@pytest.mark.parametrize("layout", ["lightning", "comfy_lora_A_B_no_alpha", "lightx2v", "kohya_musubi"])
def test_agrees_with_diffusers_converters(expert, layout):
    from diffusers.loaders.lora_conversion_utils import (
        _convert_musubi_wan_lora_to_diffusers, _convert_non_diffusers_wan_lora_to_diffusers)

    sd = LAYOUTS[layout](expert).sd
    mine = ours(sd, expert)
    sd = {k: v.clone() for k, v in sd.items()}  # the converter scales some of its input tensors in place
    if layout == "kohya_musubi":
        theirs = diffusers_deltas(_convert_musubi_wan_lora_to_diffusers(
            {k: v for k, v in sd.items() if k.startswith("lora_unet_")}))
    else:  # it takes .alpha only inside blocks (an alpha on text_embedding.0 etc. makes it raise)
        kept = {k: v for k, v in sd.items() if ".blocks." in k or not any(k.endswith(".alpha") for k in sd)}
        theirs = diffusers_deltas(_convert_non_diffusers_wan_lora_to_diffusers(kept))
    # diffusers keeps every low-rank pair and bias difference; lightx2v's norm/modulation/patch diffs it drops
    assert set(theirs) <= set(mine)
    for name, delta in theirs.items():
        torch.testing.assert_close(mine[name], delta.reshape(mine[name].shape), atol=1e-6, rtol=0, msg=name)


def diffusers_fused(components, path, strength):
    """The transformer after diffusers' own path: load_lora_weights (PEFT adapters), fuse_lora, unload."""
    from diffusers import WanPipeline

    pipe = WanPipeline(**{k: copy.deepcopy(v) for k, v in components.items()}, boundary_ratio=0.875)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(components=["transformer"], lora_scale=strength)
    pipe.unload_lora_weights()
    return pipe.transformer


def test_same_output_as_diffusers_load_lora_weights(components, tmp_path):
    pytest.importorskip("peft")
    lora = peft(components["transformer"])
    header = peft_header(lora, lora_alpha=8, alpha_pattern={"attn1.to_q": 2}, lora_bias=True)
    path = lora.save(tmp_path, metadata=header)
    reference = diffusers_fused(components, path, 0.7)
    mine = copy.deepcopy(components["transformer"])
    apply_lora(mine, LoraSpec(path, 0.7))

    gen = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen), timestep=torch.tensor([700]),
                  encoder_hidden_states=torch.randn(1, 12, 32, generator=gen), return_dict=False)
    with torch.no_grad():
        want, got, base = (m(**inputs)[0] for m in (reference, mine, components["transformer"]))
    assert not torch.allclose(want, base, atol=1e-4)  # the LoRA does change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def blocks_only(lora):  # diffusers' converter takes .alpha only inside blocks
    return {k: v for k, v in lora.sd.items() if ".blocks." in k}


def pairs_and_bias_diffs(lora):  # what diffusers keeps of a lightx2v file (it drops norm/modulation/patch diffs)
    return {k: v for k, v in lora.sd.items()
            if "lora_" in k or (k.endswith(".diff_b") and not any(s in k for s in ("norm", "patch", "head")))}


@pytest.mark.parametrize("layout, keep", [
    ("lightning", blocks_only), ("kohya_musubi", lambda lora: {k: v for k, v in lora.sd.items() if "lora_unet" in k}),
    ("lightx2v", pairs_and_bias_diffs), ("comfy_lora_A_B_no_alpha", lambda lora: lora.sd),
])
def test_same_weights_as_diffusers_load_lora_weights(components, tmp_path, layout, keep):
    pytest.importorskip("peft")
    path = save(tmp_path, keep(LAYOUTS[layout](components["transformer"])), "lora.safetensors")
    reference = dict(diffusers_fused(components, path, 1.3).named_parameters())
    mine = copy.deepcopy(components["transformer"])
    assert apply_lora(mine, LoraSpec(path, 1.3)) > 0
    for name, param in mine.named_parameters():
        torch.testing.assert_close(param, reference[name], atol=1e-6, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------------ errors

def test_no_matching_key(expert, tmp_path):
    # a Flux LoRA: diffusers layout, but modules the Wan transformer does not have
    sd = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 24),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(24, RANK)}
    path = save(tmp_path, sd)
    with pytest.raises(WanOptError, match=r"bad.safetensors: none of its 2 keys match a module of the Wan "
                                          r"transformer; is it a Wan 2.2 LoRA\?"):
        apply_lora(expert, LoraSpec(path))


def test_text_encoder_keys_alone_are_not_a_silent_success(expert, tmp_path):
    path = save(tmp_path, {"lora_te_encoder_block_0_q.lora_down.weight": torch.zeros(RANK, 8)})
    with pytest.raises(WanOptError, match="none of its 1 keys"):
        apply_lora(expert, LoraSpec(path))


@pytest.mark.parametrize("extra", [
    "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight",  # a Wan I2V LoRA's image cross-attention
    "diffusion_model.blocks.0.self_attn.q.dora_scale",  # DoRA: not a plain LoRA
    "diffusion_model.blocks.7.self_attn.q.diff_b",  # a block the model does not have
])
def test_partly_matching_keys(expert, tmp_path, extra):
    lora = original(expert)
    lora.sd[extra] = torch.zeros(24)
    before = snapshot(expert)
    with pytest.raises(WanOptError, match=rf"1 of its {len(lora.sd)} keys match no module .*{extra}"):
        apply_lora(expert, LoraSpec(lora.save(tmp_path)))
    assert_fused(expert, before, {}, 1.0)


def test_shape_mismatch_names_the_key_and_both_shapes(expert, tmp_path):
    lora = original(expert)
    lora.sd["diffusion_model.blocks.1.ffn.2.lora_down.weight"] = torch.zeros(RANK, 40)  # ffn_dim is 48
    with pytest.raises(WanOptError, match=r"blocks\.1\.ffn\.2\.lora_up\.weight gives a delta of shape \(24, 40\), "
                                          r"but blocks\.1\.ffn\.net\.2\.weight has shape \(24, 48\)"):
        apply_lora(expert, LoraSpec(lora.save(tmp_path)))
    sd = {"diffusion_model.blocks.0.norm3.diff": torch.zeros(25)}
    with pytest.raises(WanOptError, match=r"norm3\.diff gives a delta of shape \(25,\), but blocks\.0\.norm2\.weight "
                                          r"has shape \(24,\)"):
        apply_lora(expert, LoraSpec(save(tmp_path, sd)))


def test_incomplete_or_mismatched_pair(expert, tmp_path):
    lora = original(expert)
    del lora.sd["diffusion_model.blocks.0.self_attn.k.lora_up.weight"]
    with pytest.raises(WanOptError, match=r"self_attn\.k\.\w+ has no matching"):
        apply_lora(expert, LoraSpec(lora.save(tmp_path)))
    lora = original(expert)
    lora.sd["diffusion_model.blocks.0.self_attn.k.lora_up.weight"] = torch.zeros(24, RANK + 1)
    with pytest.raises(WanOptError, match=r"self_attn\.k\.lora_up\.weight of shape \(24, 5\) does not pair"):
        apply_lora(expert, LoraSpec(lora.save(tmp_path)))


def test_two_layouts_for_one_module(expert, tmp_path):
    lora = original(expert)
    lora.sd["transformer.blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 24)
    with pytest.raises(WanOptError, match="set the same thing"):
        apply_lora(expert, LoraSpec(lora.save(tmp_path)))


def test_missing_and_unreadable_files(expert, tmp_path):
    with pytest.raises(WanOptError, match=r"LoRA file .*nope\.safetensors does not exist\."):
        apply_lora(expert, LoraSpec(str(tmp_path / "nope.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WanOptError, match=r"LoRA file .*junk\.safetensors could not be read"):
        read_lora(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(WanOptError, match=r"LoRA file .*junk\.pt could not be read"):
        read_lora(tmp_path / "junk.pt")


def test_low_noise_lora_needs_a_second_expert(tmp_path):
    parts = build_tiny_components(seed=0, family="ti2v_5b")
    pipe = types.SimpleNamespace(transformer=parts["transformer"], transformer_2=None)
    with pytest.raises(WanOptError, match=r"low-noise LoRA \(.*low\.safetensors\) was given, but this model has a "
                                          r"single transformer"):
        apply_expert_loras(pipe, None, LoraSpec(str(tmp_path / "low.safetensors")))


def test_a_bad_low_noise_file_leaves_both_experts_untouched(components, tmp_path):
    pipe = types.SimpleNamespace(transformer=copy.deepcopy(components["transformer"]),
                                 transformer_2=copy.deepcopy(components["transformer_2"]))
    before = snapshot(pipe.transformer)
    good = original(pipe.transformer).save(tmp_path, "high.safetensors")
    bad = save(tmp_path, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(RANK, 24)})
    with pytest.raises(WanOptError, match="none of its 1 keys"):
        apply_expert_loras(pipe, LoraSpec(good), LoraSpec(bad))
    assert_fused(pipe.transformer, before, {}, 1.0)


def test_refuses_weights_already_cast_to_fp8(expert, tmp_path):
    expert.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(WanOptError, match="before fp8 storage and offloading"):
        apply_lora(expert, LoraSpec(original(expert).save(tmp_path)))


def test_the_cli_config_fuses_a_lora_into_each_expert(tmp_path):
    from wan_opt.pipeline import WanOptPipeline
    from wan_opt.prepare import compose_config, prepare

    tiny = build_tiny_components(seed=0)
    high = original(tiny["transformer"], seed=1).save(tmp_path, "high.safetensors")
    low = original(tiny["transformer_2"], seed=2).save(tmp_path, "low.safetensors")
    cfg = compose_config([f"model.lora.high_noise={high}", f"model.lora.low_noise={low}",
                          "model.lora.low_noise_strength=0.5"], hardware="cpu")
    pipe = WanOptPipeline.from_prepared(prepare(cfg, prompt_required=False))
    for role in ("transformer", "transformer_2"):
        changed = [name for name, p in getattr(pipe, role).state_dict().items()
                   if not torch.equal(p, tiny[role].state_dict()[name])]
        assert changed, role


def test_a_lora_preset_without_its_files_is_rejected_before_loading():
    from wan_opt.prepare import compose_config, prepare

    cfg = compose_config(["model=wan22_t2v_a14b_lightning", "model.random_weights=true", "prompt=x"],
                         hardware="cpu")
    assert (cfg.model.steps, cfg.model.guidance, cfg.model.guidance_2, cfg.model.shift) == (4, 1.0, 1.0, 5.0)
    with pytest.raises(WanOptError, match="model.lora.high_noise=PATH"):
        prepare(cfg).request
    cfg = compose_config(["model.lora.high_noise=/nonexistent.safetensors", "prompt=x"], hardware="cpu")
    with pytest.raises(WanOptError, match="is not a file"):
        prepare(cfg).request

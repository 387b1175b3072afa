"""Image-to-video: WanOptPipeline against diffusers' WanImageToVideoPipeline on tiny random models (float32, CPU),
and the whole path around it: the command line, prompt files, the Python API, checkpoints, LoRAs, knobs."""
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from tests.checkpoints import write_diffusers_checkpoint, write_original_checkpoint
from tests.gloo import as_torchrun_rank, free_port
from wan_opt.bench import reference_pipeline
from wan_opt.conditioning import frame_mask
from wan_opt.errors import WanOptError
from wan_opt.image import sample_picture
from wan_opt.loading.tiny import build_tiny_components
from wan_opt.memory.policy import MemoryPolicy
from wan_opt.optim.speed import SpeedPolicy
from wan_opt.pipeline import WanOptPipeline
from wan_opt.prepare import compose_config, prepare
from wan_opt.bench.report import rel_l2

# 4 steps at shift 5: t = 1000, 938 (high-noise expert), 833, 625 (low-noise expert, below the boundary of 900)
CALL = dict(prompt="a red fox in the snow", negative_prompt="blurry, static", height=48, width=64, num_frames=5,
            num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=3.0, output_type="latent")
TI2V_CALL = {**CALL, "height": 64, "width": 64, "guidance_scale_2": None}
# Of another size and shape than the video: the preprocessing (Lanczos resize, [-1, 1]) is part of the comparison.
IMAGE, LAST = sample_picture(150, 90, seed=3), sample_picture(70, 100, seed=4)


def diffusers_i2v(family: str = "i2v_a14b", seed: int = 1, shift: float = 5.0):
    components = build_tiny_components(seed=seed, family=family, shift=shift)
    if family == "ti2v_5b":
        components.pop("transformer_2")
        return reference_pipeline(components, None, image=True, expand_timesteps=True)
    return reference_pipeline(components, 0.9, image=True)


def run_both(reference, ours, call, **images):
    expected = reference(**call, **images, generator=torch.Generator().manual_seed(7)).frames
    got = ours(**call, **images, generator=torch.Generator().manual_seed(7)).frames
    return expected, got


@pytest.fixture(scope="module")
def a14b():
    return diffusers_i2v()


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_matches_diffusers_image_to_video(a14b, output_type):
    """The decoded frames, and the latents on their own (a decode could hide a difference in them)."""
    expected, got = run_both(a14b, WanOptPipeline.from_diffusers(a14b), {**CALL, "output_type": output_type},
                             image=IMAGE)
    assert got.shape == expected.shape
    assert rel_l2(got, expected) < 1e-5


def test_matches_diffusers_with_a_last_frame(a14b):
    expected, got = run_both(a14b, WanOptPipeline.from_diffusers(a14b), CALL, image=IMAGE, last_image=LAST)
    assert rel_l2(got, expected) < 1e-5
    # ... and the last frame changes the video
    first_only = WanOptPipeline.from_diffusers(a14b)(**CALL, image=IMAGE, generator=torch.Generator().manual_seed(7))
    assert rel_l2(first_only.frames, got) > 1e-3


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_matches_diffusers_ti2v_image_path(output_type):
    reference = diffusers_i2v("ti2v_5b")
    expected, got = run_both(reference, WanOptPipeline.from_diffusers(reference),
                             {**TI2V_CALL, "output_type": output_type}, image=IMAGE)
    assert rel_l2(got, expected) < 1e-5


def test_the_mask_marks_the_given_pixel_frames():
    # 9 frames: latent frame 0 holds frame 0 (4 times), latent frames 1 and 2 hold frames 1-4 and 5-8
    first = frame_mask(9, last=False, temporal=4, height=2, width=3)
    assert first.shape == (1, 4, 3, 2, 3)
    assert first[0, :, :, 0, 0].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]]
    both = frame_mask(9, last=True, temporal=4, height=2, width=3)
    assert both[0, :, :, 0, 0].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]  # frame 8: channel 3


def test_ti2v_image_tokens_denoise_at_timestep_zero_and_keep_the_image():
    pipe = WanOptPipeline.from_diffusers(diffusers_i2v("ti2v_5b"))
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    latents = pipe(**{**TI2V_CALL, "output_type": "latent"}, image=IMAGE, generator=torch.Generator().manual_seed(1))
    per_frame = (64 // 16 // 2) * (64 // 16 // 2)  # tokens of one latent frame: 4 * 4 latents in 2 x 2 patches
    for timestep in seen:
        assert timestep.shape == (1, 2 * per_frame)  # 5 frames: 2 latent frames
        assert (timestep[0, :per_frame] == 0).all() and (timestep[0, per_frame:] > 0).all()
    from wan_opt.conditioning import encode_condition

    condition = encode_condition(pipe, IMAGE, None, 64, 64, 5)
    assert torch.equal(latents.frames[:, :, :1], condition.latents)


def test_an_image_to_video_model_has_36_input_channels_and_one_without_image_is_refused(a14b):
    pipe = WanOptPipeline.from_diffusers(a14b)
    assert pipe.transformer.config.in_channels == 36 and pipe.takes_image == "required"
    with pytest.raises(WanOptError, match="animates an image"):
        pipe(**CALL)
    text = WanOptPipeline.from_diffusers(reference_pipeline(build_tiny_components(seed=1), 0.875, image=False))
    with pytest.raises(WanOptError, match="takes no image"):
        text(**CALL, image=IMAGE)
    ti2v = WanOptPipeline.from_diffusers(diffusers_i2v("ti2v_5b"))
    with pytest.raises(WanOptError, match="first frame only"):
        ti2v(**TI2V_CALL, image=IMAGE, last_image=LAST)


# -- every knob applies ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_latents():
    pipe = WanOptPipeline.from_diffusers(diffusers_i2v())
    return pipe(**CALL, image=IMAGE, generator=torch.Generator().manual_seed(2)).frames


@pytest.mark.parametrize("speed, memory, limit", [
    (SpeedPolicy(cfg="batched"), None, 1e-5),
    (SpeedPolicy(fuse_qkv=True), None, 1e-5),
    (SpeedPolicy(step_cache="first_block", step_cache_threshold=1e-9), None, 1e-5),  # never reuses: exact
    (SpeedPolicy(), MemoryPolicy(weight_dtype="float8_e4m3fn", compute_dtype="float32"), 0.2),
    (SpeedPolicy(cfg_truncation=0.5), None, 0.5),
], ids=["batched-cfg", "fused-qkv", "first-block-cache", "fp8-storage", "cfg-truncation"])
def test_speed_and_memory_knobs_apply_to_image_to_video(speed, memory, limit, plain_latents):
    reference = plain_latents
    pipe = WanOptPipeline.from_diffusers(diffusers_i2v(), memory=memory, speed=speed)
    got = pipe(**CALL, image=IMAGE, generator=torch.Generator().manual_seed(2)).frames
    assert torch.isfinite(got).all() and rel_l2(got, reference) < limit


def test_magcache_calibrates_on_image_to_video_then_skips(tmp_path, plain_latents):
    ratios = tmp_path / "ratios.json"
    speed = SpeedPolicy(step_cache="magcache", step_cache_ratios=str(ratios), step_cache_threshold=10.0,
                        step_cache_interval=2)
    pipe = WanOptPipeline.from_diffusers(diffusers_i2v(), speed=speed)
    calibrating = pipe(**CALL, image=IMAGE, generator=torch.Generator().manual_seed(2)).frames
    assert rel_l2(calibrating, plain_latents) < 1e-5  # the calibrating run computes every step
    assert set(json.loads(ratios.read_text())["ratios"]) == {"high_noise", "low_noise"}
    skipping = pipe(**CALL, image=IMAGE, generator=torch.Generator().manual_seed(2)).frames
    assert torch.isfinite(skipping).all() and rel_l2(skipping, plain_latents) > 1e-6  # steps were reused


def test_compiled_blocks_give_the_same_video(plain_latents):
    reference = plain_latents
    pipe = WanOptPipeline.from_diffusers(diffusers_i2v())
    for expert in pipe.experts():  # what compile=regional does, traced by dynamo (eager backend: no kernels)
        expert.compile_repeated_blocks(fullgraph=True, dynamic=False, backend="eager")
    got = pipe(**CALL, image=IMAGE, generator=torch.Generator().manual_seed(2)).frames
    assert rel_l2(got, reference) < 1e-5


# -- the command line, prompt files, the Python API ----------------------------------------------------------

def run(tmp_path, *overrides):
    from wan_opt.app import run_job

    cfg = compose_config(["model=tiny_i2v", "prompt=a fox turns its head", "steps=2", "frames=5", "size=64*64",
                          f"output_dir={tmp_path / 'out'}", *overrides], hardware="cpu")
    path = run_job(cfg)
    return path, json.loads(path.with_suffix(".json").read_text())


def test_the_command_line_fits_the_image_and_records_it(tmp_path):
    image = Image.new("RGBA", (300, 200), (200, 40, 40, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.save(tmp_path / "card.png")
    path, sidecar = run(tmp_path, f"image={tmp_path / 'card.png'}")
    assert path.suffix == ".mp4" and path.stat().st_size > 0
    # 300:200 fitted into 64*64: sqrt(4096 * 1.5) = 78.4 -> 64, sqrt(4096 / 1.5) = 52.3 -> 48
    assert (sidecar["request"]["width"], sidecar["request"]["height"]) == (64, 48)
    record = sidecar["image"]
    assert record["path"] == str((tmp_path / "card.png").resolve()) and record["format"] == "PNG"
    assert (record["width"], record["height"]) == (300, 200) and len(record["sha256"]) == 64
    assert record["converted"] == ["transparent pixels flattened onto white (1 pixels)"]
    assert record["fit"] == {"rule": "area", "from": [300, 200], "to": [64, 48], "resampling": "Lanczos",
                             "area": "64*64"}
    assert "vae_encode" in sidecar["seconds"] and "vae_encode" in sidecar["memory_plan"]["stages"]


def test_the_command_lines_video_is_diffusers_video_of_the_fitted_image(tmp_path):
    """The tiny_i2v preset run end to end equals diffusers' pipeline given the same fitted image and size."""
    from wan_opt.loading.tiny import build_tiny_components as tiny

    sample_picture(200, 100, seed=5).save(tmp_path / "card.png")
    prepared = prepare(compose_config(["model=tiny_i2v", "prompt=a fox", "steps=2", "frames=5", "size=96*96",
                                       f"image={tmp_path / 'card.png'}"], hardware="cpu"))
    pipe = WanOptPipeline.from_prepared(prepared)
    request = prepared.request
    call = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                width=request.width, num_frames=5, num_inference_steps=2, guidance_scale=3.5, guidance_scale_2=3.5)
    ours = pipe(**call, **prepared.images.call_kwargs(), generator=torch.Generator().manual_seed(0)).frames
    reference = reference_pipeline(tiny(seed=0, family="i2v_a14b", shift=5.0), 0.9, image=True)
    expected = reference(**call, image=prepared.images.image, generator=torch.Generator().manual_seed(0)).frames
    assert (request.width, request.height) == (128, 64)  # 2:1 in 96*96: 135.8 -> 128, 67.9 -> 64
    assert rel_l2(ours, expected) < 1e-5


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "first_frame"])
def test_the_tiny_ti2v_preset_is_diffusers_ti2v_pipeline(tmp_path, with_image):
    """model=tiny_ti2v, TI2V-5B's shape on a CPU: from text, diffusers' WanPipeline with a timestep per token; from
    an image, its WanImageToVideoPipeline on the image cropped to the request's 32-pixel grid."""
    from wan_opt.loading.tiny import build_tiny_components as tiny

    sample_picture(200, 100, seed=5).save(tmp_path / "card.png")
    image = [f"image={tmp_path / 'card.png'}"] if with_image else []
    prepared = prepare(compose_config(["model=tiny_ti2v", "prompt=a fox", "steps=2", "frames=5", "size=128*64",
                                       *image], hardware="cpu"))
    pipe = WanOptPipeline.from_prepared(prepared)
    assert pipe.expand_timesteps and pipe.transformer_2 is None
    request = prepared.request
    call = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                width=request.width, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
    ours = pipe(**call, **(prepared.images.call_kwargs() if with_image else {}),
                generator=torch.Generator().manual_seed(0)).frames
    reference = reference_pipeline(tiny(seed=0, family="ti2v_5b", shift=5.0), None, image=with_image,
                                   expand_timesteps=True)
    picture = {"image": prepared.images.image} if with_image else {}
    expected = reference(**call, **picture, generator=torch.Generator().manual_seed(0)).frames
    assert (request.width, request.height) == (128, 64)
    assert rel_l2(ours, expected) < 1e-5


def test_a_last_frame_on_the_command_line(tmp_path):
    sample_picture(160, 96).save(tmp_path / "a.png")
    sample_picture(100, 100).save(tmp_path / "b.jpg")
    _, sidecar = run(tmp_path, f"image={tmp_path / 'a.png'}", f"last_image={tmp_path / 'b.jpg'}")
    assert sidecar["request"]["last_image"] == str(tmp_path / "b.jpg")
    assert sidecar["last_image"]["format"] == "JPEG" and sidecar["last_image"]["fit"]["rule"] == "crop"


def test_prompt_files_take_an_image_column_relative_to_the_file(tmp_path, monkeypatch):
    from wan_opt.batch import read_prompt_file

    folder = tmp_path / "shots"
    folder.mkdir()
    sample_picture(96, 64).save(folder / "cat.png")
    lines = [{"prompt": "the cat blinks", "image": "cat.png"}, {"prompt": "again", "image": str(folder / "cat.png")},
             {"prompt": "gone", "image": "nosuch.png"}]
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    items = read_prompt_file(str(folder / "prompts.jsonl"))
    assert [entry["image"] for _, entry in items] == [str(folder / "cat.png")] * 2 + [str(folder / "nosuch.png")]

    from wan_opt.app import run as run_batch

    monkeypatch.chdir(tmp_path)  # relative to the file, not to where the command runs
    cfg = compose_config(["model=tiny_i2v", "steps=1", "frames=5", "size=64*64", f"prompts={folder / 'prompts.jsonl'}",
                          f"output_dir={tmp_path / 'out'}"], hardware="cpu")
    assert run_batch(cfg) == 1  # one line failed, the others ran
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["ok", "ok", "failed"]
    assert "nosuch.png does not exist" in summary["results"][2]["error"]
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 2


def test_the_python_api_takes_a_path_and_fits_it_like_the_command_line(tmp_path):
    sample_picture(300, 200).save(tmp_path / "card.png")
    pipe = WanOptPipeline.from_pretrained(model="tiny_i2v", hardware="cpu")
    out = pipe("a fox", image=str(tmp_path / "card.png"), num_frames=5, num_inference_steps=1,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    assert out.frames.shape == (1, 16, 2, 96 // 8, 144 // 8)  # 300:200 fitted to the preset's 128*128: 144*96
    given = pipe("a fox", image=Image.open(tmp_path / "card.png"), height=48, width=48, num_frames=5,
                 num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert given.frames.shape == (1, 5, 48, 48, 3)  # a size given is diffusers' resize
    with pytest.raises(WanOptError, match="does not exist"):
        pipe("a fox", image=str(tmp_path / "nosuch.png"))


def test_compare_works_on_image_to_video_outputs(tmp_path):
    from wan_opt.compare import main as compare

    sample_picture(64, 64).save(tmp_path / "card.png")
    a, _ = run(tmp_path, f"image={tmp_path / 'card.png'}")
    b, _ = run(tmp_path, f"image={tmp_path / 'card.png'}", "hardware.speed.cfg_truncation=0.5")
    assert compare([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    [metrics] = (tmp_path / "cmp").glob("*_metrics.json")
    assert len(json.loads(metrics.read_text())["psnr_db"]) == 5


# -- checkpoints, conversion, LoRAs ------------------------------------------------------------------------

WRITERS = {"diffusers": write_diffusers_checkpoint, "original": write_original_checkpoint}


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_both_layouts_load_the_same_i2v_model(tmp_path, layout):
    from wan_opt.loading.layouts import check_checkpoint

    tiny = build_tiny_components(seed=3, family="i2v_a14b", shift=5.0)
    root = WRITERS[layout](tmp_path / "ckpt", tiny, "i2v_a14b")
    assert check_checkpoint(root, "i2v_a14b").layout == layout
    cfg = compose_config(["model=wan22_i2v_a14b", f"model.ckpt_dir={root}"], hardware="cpu")
    loaded = WanOptPipeline.from_prepared(prepare(cfg, prompt_required=False))
    assert loaded.boundary_ratio == 0.9 and loaded.transformer.config.in_channels == 36
    for role in ("transformer", "transformer_2", "text_encoder", "vae"):
        ours = getattr(loaded, role).state_dict()
        for name, tensor in tiny[role].state_dict().items():
            assert torch.equal(ours[name], tensor), f"{role}.{name}"
    expected, got = run_both(reference_pipeline(tiny, 0.9, image=True), loaded, CALL, image=IMAGE)
    assert rel_l2(got, expected) < 1e-5


def test_an_i2v_checkpoint_converts_and_diffusers_loads_it(tmp_path):
    from diffusers import WanImageToVideoPipeline

    from wan_opt.convert import main as convert

    tiny = build_tiny_components(seed=2, family="i2v_a14b", shift=5.0)
    src = write_original_checkpoint(tmp_path / "src", tiny, "i2v_a14b")
    assert convert([str(src), str(tmp_path / "dst"), "--dtype", "float32"]) == 0
    index = json.loads((tmp_path / "dst" / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["boundary_ratio"] == 0.9
    assert index["image_encoder"] == [None, None]
    reference = WanImageToVideoPipeline.from_pretrained(tmp_path / "dst")
    assert reference.scheduler.config.flow_shift == 5.0
    for role in ("transformer", "transformer_2"):
        for name, tensor in tiny[role].state_dict().items():
            assert torch.equal(getattr(reference, role).state_dict()[name], tensor), f"{role}.{name}"


@pytest.mark.parametrize("given, model, says", [
    ("t2v_a14b", "wan22_i2v_a14b", "holds Wan2.2-T2V-A14B, not the Wan2.2-I2V-A14B this model runs: pass "
                                   "model=wan22_t2v_a14b"),
    ("i2v_a14b", "wan22_t2v_a14b", "holds Wan2.2-I2V-A14B, not the Wan2.2-T2V-A14B"),
])
@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_a_text_checkpoint_for_an_image_model_is_named_before_loading(tmp_path, given, model, says, layout):
    root = WRITERS[layout](tmp_path / "ckpt", build_tiny_components(seed=0, family=given), given)
    sample_picture(96, 64).save(tmp_path / "card.png")
    image = [f"image={tmp_path / 'card.png'}"] if model == "wan22_i2v_a14b" else []
    cfg = compose_config([f"model={model}", f"model.ckpt_dir={root}", "prompt=a fox", *image], hardware="cpu")
    with pytest.raises(WanOptError, match=says):
        prepare(cfg)


@pytest.mark.parametrize("layout", ["lightning", "lightx2v"])
def test_i2v_loras_fuse_into_both_experts_including_the_wide_patch_embedding(tmp_path, layout):
    from tests.test_lora import LAYOUTS, assert_fused, snapshot
    from wan_opt.loading.lora import LoraSpec, apply_expert_loras

    pipe = WanOptPipeline(**build_tiny_components(seed=0, family="i2v_a14b"), boundary_ratio=0.9)
    loras = {name: LAYOUTS[layout](getattr(pipe, name), seed=i) for i, name in enumerate(("transformer",
                                                                                         "transformer_2"))}
    if layout == "lightx2v":
        assert tuple(loras["transformer"].sd["diffusion_model.patch_embedding.diff"].shape) == (24, 36, 1, 2, 2)
    before = {name: snapshot(getattr(pipe, name)) for name in loras}
    paths = {name: lora.save(tmp_path, f"{name}.safetensors") for name, lora in loras.items()}
    changed = apply_expert_loras(pipe, LoraSpec(paths["transformer"]), LoraSpec(paths["transformer_2"]))
    assert changed == {name: len(lora.expected) for name, lora in loras.items()}
    for name, lora in loras.items():
        assert_fused(getattr(pipe, name), before[name], lora.expected, 1.0)


def test_the_distilled_i2v_preset_runs_with_its_loras(tmp_path):
    from tests.test_lora import original

    components = build_tiny_components(seed=0, family="i2v_a14b")
    paths = [original(components[name], seed=i).save(tmp_path, f"{name}.safetensors")
             for i, name in enumerate(("transformer", "transformer_2"))]
    sample_picture(128, 128).save(tmp_path / "card.png")
    cfg = compose_config(["model=wan22_i2v_a14b_lightning", "model.family=tiny_i2v", "prompt=a fox", "frames=5",
                          "size=64*64", f"image={tmp_path / 'card.png'}", f"model.lora.high_noise={paths[0]}",
                          f"model.lora.low_noise={paths[1]}"], hardware="cpu")
    prepared = prepare(cfg)
    assert prepared.request.steps == 4 and prepared.request.guidance == 1.0 and prepared.cfg.model.boundary == 0.9
    pipe = WanOptPipeline.from_prepared(prepared)
    assert pipe.forwards_per_step(4, 1.0, 1.0) == [1, 1, 1, 1]  # one forward a step: no guidance
    frames = pipe(prepared.request.prompt, height=64, width=64, num_frames=5, num_inference_steps=4,
                  guidance_scale=1.0, guidance_scale_2=1.0, generator=torch.Generator().manual_seed(0),
                  **prepared.images.call_kwargs()).frames
    assert np.isfinite(frames).all()


def test_a_t2v_lora_on_the_i2v_experts_is_one_sentence(tmp_path):
    from tests.test_lora import lightx2v
    from wan_opt.loading.lora import LoraSpec, apply_lora

    t2v = build_tiny_components(seed=0)["transformer"]
    path = lightx2v(t2v).save(tmp_path)  # its patch-embedding difference has 16 input channels
    i2v = build_tiny_components(seed=0, family="i2v_a14b")["transformer"]
    with pytest.raises(WanOptError, match=r"patch_embedding.*is the LoRA for another Wan model"):
        apply_lora(i2v, LoraSpec(path))


# -- several processes (gloo on the CPU, as torchrun starts them) --------------------------------------------

def _worker(rank: int, world: int, port: int, cfg_parallel: bool, out: str) -> None:
    as_torchrun_rank(rank, world, port)
    from omegaconf import OmegaConf

    from wan_opt import parallel

    device = parallel.init("cpu")
    pipe = WanOptPipeline.from_diffusers(diffusers_i2v())
    knobs = OmegaConf.create({"gpus": 1, "sequence": "ulysses", "cfg_parallel": cfg_parallel, "shard": False})
    split = parallel.plan_layout(world, knobs, 2, 2 * 3 * 4, True, "tiny_i2v")
    parallel.apply(pipe, split, parallel.build_mesh(split, device))
    frames = pipe(**CALL, image=IMAGE, generator=torch.Generator().manual_seed(3)).frames
    np.save(f"{out}.{rank}.npy", frames)
    torch.distributed.destroy_process_group()


def test_two_processes_give_the_single_process_video(tmp_path):
    """Ulysses: each process holds half of every forward's tokens (the 36-channel input split after patching)."""
    single = WanOptPipeline.from_diffusers(diffusers_i2v())(**CALL, image=IMAGE,
                                                            generator=torch.Generator().manual_seed(3)).frames
    mp.spawn(_worker, args=(2, free_port(), False, str(tmp_path / "frames")), nprocs=2, join=True)
    for rank in range(2):
        assert np.abs(np.load(tmp_path / f"frames.{rank}.npy") - single.numpy()).max() < 1e-5, rank


# -- on a GPU: expert swap, block streaming, a released text encoder and a tiled VAE keep the result --------

def _on_gpu(memory: MemoryPolicy) -> np.ndarray:
    components = build_tiny_components(seed=2, family="i2v_a14b", shift=5.0)
    for name in ("transformer", "transformer_2", "text_encoder", "vae"):
        components[name].to(memory.load_device(name, torch.device("cuda")))
    pipe = WanOptPipeline(**components, boundary_ratio=0.9, memory=memory, device="cuda")
    pipe.apply_policies()
    return pipe(**{**CALL, "output_type": "np"}, image=IMAGE, generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("knobs", [
    dict(experts="swap", text_encoder="gpu_release"),
    dict(experts="swap", swap_overlap=True, text_encoder="gpu_release"),
    dict(experts="offload", text_encoder="cpu"),
    dict(experts="resident", text_encoder="gpu", vae_tiling=True),
])
def test_placement_on_a_gpu_keeps_the_image_to_video_result(knobs):
    resident = _on_gpu(MemoryPolicy(experts="resident", text_encoder="gpu", weight_dtype="float32",
                                    compute_dtype="float32"))
    out = _on_gpu(MemoryPolicy(weight_dtype="float32", compute_dtype="float32", **knobs))
    assert rel_l2(out, resident) < 1e-4

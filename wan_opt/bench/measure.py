"""The benchmark's runs: diffusers' pipeline as people load it, then each profile on the same modules and inputs,
each timed stage by stage; and the command line that checks them all before anything is built."""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from wan_opt import image as images
from wan_opt.bench.detached import collect, detach
from wan_opt.bench.report import chart, markdown, rel_l2, request_steps, summarize, write
from wan_opt.checks import check_device
from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import TINY_SHAPES
from wan_opt.prepare import compose_config, prepare
from wan_opt.request import parse_size, run_guidance

PROMPT, NEGATIVE = "a red fox running through fresh snow", "blurry, static"


def forward_flops(dit: dict, tokens: int, text_tokens: int = 512) -> float:
    """Matmul FLOPs of one DiT forward: projections, FFN, self-attention and cross-attention."""
    d, layers, ffn = dit["num_attention_heads"] * dit["attention_head_dim"], dit["num_layers"], dit["ffn_dim"]
    linear = 2 * tokens * layers * (4 * d * d + 2 * d * d + 2 * d * ffn)
    attention = layers * (4 * tokens * tokens * d + 4 * tokens * text_tokens * d)
    return float(linear + attention)


def timed(fn, device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


# The models the benchmark builds at full size (with random weights), by family: A14B's two and TI2V-5B; under
# --tiny, the tiny preset of the same shape (wan_opt.loading.layouts.TINY_SHAPES)
BENCHED = ("t2v_a14b", "i2v_a14b", "ti2v_5b")


def reference_pipeline(components: dict, boundary: float | None, image: bool, **config):
    """diffusers' pipeline on `components`: WanPipeline, or WanImageToVideoPipeline (Wan 2.2's, no image encoder);
    `config`: the pipeline's other settings (expand_timesteps).

    Where ftfy is not installed, the image pipeline's prompt cleaning (which calls it unconditionally) is
    WanPipeline's, the same steps without ftfy, as wan-opt and diffusers' text pipeline clean prompts there.
    """
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    if not image:
        return WanPipeline(**components, boundary_ratio=boundary, **config)
    if not hasattr(pipeline_wan_i2v, "ftfy"):
        pipeline_wan_i2v.prompt_clean = pipeline_wan.prompt_clean
    return WanImageToVideoPipeline(**components, boundary_ratio=boundary, **config)


def build(args, device: torch.device, model):
    """diffusers' pipeline as people load it: DiT and encoder in bf16 (fp32 on a CPU), VAE in fp32; TI2V-5B's with
    a timestep per token, as its checkpoint's pipeline config sets, image-to-video where the run has a picture."""
    from wan_opt.loading.arch import DIT_CONFIGS, build_random_components
    from wan_opt.loading.layouts import PER_TOKEN_TIMESTEPS
    from wan_opt.loading.tiny import build_tiny_components, tiny_dit
    from wan_opt.memory.policy import MemoryPolicy

    if args.tiny:
        components, dit = build_tiny_components(seed=0, family=model.family, shift=model.shift), tiny_dit(model.family)
    else:
        memory = MemoryPolicy(experts="resident", text_encoder="gpu", vae_dtype="float32")
        components = build_random_components(model.family, memory, device, model.shift)
        dit = DIT_CONFIGS[model.family]
    config = {"expand_timesteps": True} if model.family in PER_TOKEN_TIMESTEPS else {}
    return reference_pipeline(components, model.boundary, args.picture is not None, **config).to(device), dit


def run_request(call, args, device: torch.device, guidance: tuple[float, float], frames: str = "uint8") -> dict:
    """Run one request (from the benchmark's picture, for image-to-video), timing the whole call; decoded, its
    frames come as `frames` ("uint8" as run.py takes wan-opt's, "np" as people take diffusers')."""
    width, height = parse_size(args.size)
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    picture = {"image": args.picture} if args.picture is not None else {}
    out, seconds = timed(lambda: call(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                                      num_frames=args.frames, num_inference_steps=args.steps,
                                      guidance_scale=guidance[0], guidance_scale_2=guidance[1] if args.two_experts
                                      else None,
                                      generator=torch.Generator().manual_seed(0),
                                      output_type=frames if args.decode else "latent", **picture), device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"out": out, "seconds": seconds, "peak_gib": peak}


def baseline(pipe, args, device: torch.device, guidance: tuple[float, float]) -> dict:
    """(a): diffusers' own __call__, steps timed through its step-end callback, stages around them: the text
    encode timed on its own, to take it out of the first step's time; with an image, the VAE encode timed inside
    the call, from the end of its prompt encoding to the end of its prepare_latents, where step 0 starts."""
    marks: list[float] = []

    def on_step_end(_pipe, i, t, kwargs):
        torch.cuda.synchronize() if device.type == "cuda" else None
        marks.append(time.perf_counter())
        return kwargs

    with torch.inference_mode():
        _, encode = timed(lambda: pipe.encode_prompt(PROMPT, NEGATIVE, device=device), device)
    start = [0.0]

    def call(*a, **kw):
        start[0] = time.perf_counter()
        return pipe(*a, callback_on_step_end=on_step_end, **kw).frames

    returned = watch_returns(pipe, ("encode_prompt", "prepare_latents") if args.picture else (), device)
    try:
        result = run_request(call, args, device, guidance, frames="np")
    finally:
        for name in returned:
            pipe.__dict__.pop(name, None)
    if args.picture:
        steps = np.diff([returned["prepare_latents"], *marks]).tolist()
        stages = {"text_encoding": encode, "vae_encode": returned["prepare_latents"] - returned["encode_prompt"]}
    else:
        steps = np.diff([start[0], *marks]).tolist()
        steps[0] = max(steps[0] - encode, 0.0)
        stages = {"text_encoding": encode}
    stages["denoise"] = float(sum(steps))
    if args.decode:
        stages["vae_decode"] = start[0] + result["seconds"] - marks[-1]
    result.update(frames=result.pop("out").float().cpu() if not args.decode else result.pop("out"),
                  step_seconds=steps, stage_seconds=stages, forwards=[2] * args.steps)  # both experts guide
    return result


def with_steps(args, steps: int) -> argparse.Namespace:
    """`args` for a run of `steps` steps: the warm-up's one, or the baseline's --baseline-steps."""
    return argparse.Namespace(**{**vars(args), "steps": steps})


def watch_returns(pipe, names, device: torch.device) -> dict:
    """{name: when pipe.<name> last returned}, for each of `names` (wrapped on the instance until popped)."""
    returned = {}
    for name in names:
        def wrapped(*a, _name=name, _method=getattr(pipe, name), **kw):
            out = _method(*a, **kw)
            torch.cuda.synchronize() if device.type == "cuda" else None
            returned[_name] = time.perf_counter()
            return out

        setattr(pipe, name, wrapped)
    return returned


def run_configs(args) -> dict:
    """Each `--profiles` entry composed and checked before anything is built, in the order they will run.

    An entry is a profile name, optionally followed by overrides for that run alone:
    `h100,hardware.speed.cfg_truncation=0.25`, or `h100,model=wan22_t2v_a14b_lightning` for the distilled
    preset's guidance and step count (the weights stay the benchmark's: a fused LoRA costs no time). Runs
    that rewrite the shared experts in place go last: those that fuse QKV, then those that store them in fp8.
    Rewrites cannot be undone, so runs that need the experts in states no order reaches are refused.
    """
    configs = {}
    for spec in args.profiles:
        profile, *own = spec.split(",")
        configs[spec] = run_config(args, own, profile)

    def rewrites(cfg) -> int:  # 0: leaves the weights alone; 1: fuses QKV; 2: quantizes to fp8; 3: both
        return 2 * cfg.hardware.memory.weight_dtype.startswith("float8") + bool(cfg.hardware.speed.fuse_qkv)

    states = {rewrites(cfg): spec for spec, cfg in configs.items()}
    if 2 in states and (1 in states or 3 in states):
        fused = states.get(1, states.get(3))
        raise WanOptError(f"--profiles: {states[2]} stores unfused fp8 weights and {fused} fuses QKV, and the runs "
                          "share the experts, which cannot be unfused: benchmark them in separate commands.")
    return dict(sorted(configs.items(), key=lambda item: rewrites(item[1])))


def run_config(args, overrides: list[str], profile: str = "cpu", baseline: bool = False):
    """One run's config, prepared as the command line prepares a run (the same checks and memory plan) for the
    benchmark's request: the benchmarked model unless the run names another, with random weights. The
    baseline's is only composed: diffusers' pipeline follows no profile."""
    model = [] if any(o.startswith("model=") for o in overrides) else [f"model={bench_model(args)}"]
    own = [*args.override, *overrides]
    picture = [f"image={args.picture_path}"] if args.picture_path else []
    cfg = compose_config([*model, "model.random_weights=true", f"prompt={PROMPT}", f"size={args.size}",
                          f"frames={args.frames}", *picture, *own], hardware=profile)
    if baseline:
        return cfg
    prepared = prepare(cfg, own, loads=False)  # the benchmark builds the modules on its own device
    if not args.tiny:
        check_device(prepared.cfg)
    return prepared.cfg


def bench_model(args) -> str:
    """The preset benchmarked: --model, or under --tiny the tiny preset of its shape."""
    if not args.tiny:
        return args.model
    family = compose_config([f"model={args.model}"], hardware="cpu").model.family
    return next((tiny for tiny, shape in TINY_SHAPES.items() if family in (tiny, shape)), "tiny")


def guidance_of(cfg) -> tuple[float, float]:
    g, g2 = run_guidance(cfg)
    return float(g), float(g if g2 is None else g2)


def benched_policies(cfg):
    """A profile's memory and speed policies as the benchmark runs them: the plan's knobs from cfg (tiling as a
    run of this request would have it), the placement diffusers' pipeline has, so that the kernels are what
    differ."""
    from hydra.utils import instantiate

    memory, speed = instantiate(cfg.hardware.memory), instantiate(cfg.hardware.speed)
    memory.experts, memory.text_encoder, memory.vae_release = "resident", "gpu", False
    return memory, speed


def profile_run(pipe, cfg, args, device: torch.device, one_forward) -> dict:
    """(b): WanOptPipeline on the same modules under a profile's speed and memory knobs."""
    from wan_opt.loading.modules import cast_module
    from wan_opt.memory.policy import torch_dtype
    from wan_opt.pipeline import WanOptPipeline

    memory, speed = benched_policies(cfg)
    experts = [e for e in (pipe.transformer, pipe.transformer_2) if e is not None]
    # The VAE in the profile's dtype and layout, as a load would give it: a copy, so that (a)'s stays float32.
    shared_vae, pipe.vae = pipe.vae, cast_module(copy.deepcopy(pipe.vae), torch_dtype(memory.vae_dtype))
    # Later runs share these modules: this run's attention processors, backends and cache hooks come off after.
    processors = [(e, e.attn_processors) for e in experts]
    backends = [(p, p._attention_backend) for _, procs in processors for p in procs.values()]
    try:
        ours = WanOptPipeline.from_diffusers(pipe, memory=memory, speed=speed)
        for _ in range(args.warmup):  # compile and autotune outside the timed call
            run_request(ours, with_steps(args, 1), device, guidance_of(cfg))
        result = run_request(ours, args, device, guidance_of(cfg))
        with torch.inference_mode():  # with this run's kernels still in place
            result["forward"] = one_forward()
    finally:  # also after a failed run, so that the next runs get the plain modules
        pipe.vae = shared_vae
        for expert, procs in processors:
            expert.set_attn_processor(procs)
            if expert.is_cache_enabled:
                expert.disable_cache()
        for processor, backend in backends:
            processor._attention_backend = backend
    out = result.pop("out")
    frames = out.frames if args.decode else out.frames.float().cpu()  # latents stay on the GPU otherwise
    guidance = guidance_of(cfg)
    result.update(frames=frames, step_seconds=out.step_seconds, stage_seconds=out.stage_seconds,
                  forwards=ours.forwards_per_step(args.steps, *guidance),
                  request_forwards=sum(ours.forwards_per_step(request_steps(cfg), *guidance)))
    return result


def main(argv: list[str] | None = None) -> int:
    from wan_opt import bench  # the package's docstring is the command's

    parser = argparse.ArgumentParser(prog="python -m wan_opt.bench", description=bench.__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wan22_t2v_a14b",
                        help="the preset benchmarked: wan22_t2v_a14b, wan22_i2v_a14b (image-to-video) or wan22_ti2v_5b")
    parser.add_argument("--image", action="store_true",
                        help="with a model that takes an image or not (wan22_ti2v_5b): image-to-video from the "
                             "benchmark's picture (I2V-A14B always takes one)")
    parser.add_argument("--profiles", nargs="+", default=["h100"],
                        help="profiles to run, each optionally with its own overrides: h100,hardware.speed.step_cache=first_block")
    parser.add_argument("--size", default="1280*720")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=3,
                        help="steps each profile runs; a run whose request has this many steps (and that decodes) "
                             "is also measured end to end")
    parser.add_argument("--baseline-steps", type=int, metavar="N",
                        help="steps diffusers' baseline runs (default: --steps); per-step speedups stay step against "
                             "step, frames of different step counts are not compared")
    parser.add_argument("--warmup", type=int, default=1, help="untimed 1-step runs per profile (compile, autotune)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for every profile")
    parser.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                        help="decode every run's latents (--no-decode: compare latents, skip the VAE's time)")
    parser.add_argument("--baseline-vae-tiling", action="store_true",
                        help="diffusers' baseline decodes in tiles (vae.enable_tiling()), as people run it where its "
                             "whole-frame decode does not fit beside both resident experts (720p on an 80 GB card)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: a smoke test of this code")
    parser.add_argument("--out", default="benchmarks/results")
    once = parser.add_mutually_exclusive_group()
    once.add_argument("--replot", metavar="JSON", help="draw the chart and the table again from a report, run nothing")
    once.add_argument("--detach", action="store_true",
                      help="check the request, then run it in the background, its output to a log in --out beside a "
                           "record of the run; returns at once")
    once.add_argument("--collect", metavar="DIR",
                      help="report each run --detach started with --out DIR: its result's table, or that it still "
                           "runs, or its log's last lines; exit 0 when every run has its result, 3 when one still "
                           "runs, else 1 when one ended without, 2 when DIR holds no record (records stay: they "
                           "are small)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        chart(report, Path(args.replot).with_suffix(".png"))
        Path(args.replot).with_suffix(".md").write_text(markdown(report))
        return 0
    if args.collect:
        return collect(Path(args.collect))
    if args.tiny:
        args.size, args.frames, args.warmup = "96*64", 9, 0
    device = torch.device("cpu" if args.tiny else "cuda")
    try:
        if args.steps < 1 or (args.baseline_steps is not None and args.baseline_steps < 1):
            flag, n = ("--steps", args.steps) if args.steps < 1 else ("--baseline-steps", args.baseline_steps)
            raise WanOptError(f"{flag} {n}: a run needs at least one step.")
        args.baseline_steps = args.baseline_steps or args.steps
        args.picture, args.picture_path = None, None
        configs = {"diffusers": run_config(args, [], baseline=True)}
        family = configs["diffusers"].model.family
        shape = TINY_SHAPES.get(family, family)
        if shape not in BENCHED:
            raise WanOptError(f"--model {args.model}: the benchmark builds {', '.join(BENCHED)} (the wan22_* "
                              f"presets), not {family}.")
        use = images.image_use(family)
        if args.image and use is None:
            raise WanOptError(f"--image: --model {args.model} makes video from text alone; drop --image, or pass "
                              f"--model wan22_i2v_a14b or wan22_ti2v_5b.")
        args.two_experts = configs["diffusers"].model.boundary is not None
        if use is not None and (use.needs == "required" or args.image):
            # the same picture for every run, of the request's size: nothing to fit
            args.picture = images.sample_picture(*parse_size(args.size))
            args.picture_path = Path(tempfile.mkdtemp(prefix="wan-opt-bench-")) / "picture.png"
            args.picture.save(args.picture_path)
        configs.update(run_configs(args))
    except WanOptError as error:  # before anything is built: one sentence, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.detach:  # checked here, in the foreground: a bad request fails now, not in a log read tomorrow
        return detach(argv, Path(args.out))
    torch.manual_seed(0)
    pipe, dit = build(args, device, configs["diffusers"].model)
    width, height = parse_size(args.size)
    # Latent frames and pixels; tokens: the DiT's 2x2 patches of those
    latent = ((args.frames - 1) // pipe.vae_scale_factor_temporal + 1, height // pipe.vae_scale_factor_spatial,
              width // pipe.vae_scale_factor_spatial)
    patch = dit["patch_size"]
    tokens = latent[0] // patch[0] * (latent[1] // patch[1]) * (latent[2] // patch[2])
    step_flops = 2 * forward_flops(dit, tokens)

    # The reference forward: the (high-noise) expert on fixed inputs, before any profile changes its kernels.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, dit["in_channels"], *latent, generator=gen).to(device, pipe.transformer.dtype)
    ctx = torch.randn(1, 512, dit["text_dim"], generator=gen).to(device, pipe.transformer.dtype)
    t = torch.full((1,), 900.0, device=device)

    def one_forward():
        expert = pipe.transformer
        # A run's step cache keeps its hooks on for this forward; in a context of its own it computes in full.
        context = expert.cache_context("reference_forward") if expert.is_cache_enabled else contextlib.nullcontext()
        with context:
            return expert(x, t, ctx, return_dict=False)[0].float().cpu()

    with torch.inference_mode():
        reference_forward = one_forward()

    base_args = with_steps(args, args.baseline_steps)
    if args.baseline_vae_tiling:  # the baseline's alone: the profiles decode as their own plans say
        pipe.vae.enable_tiling()
    try:
        rows = {"diffusers": baseline(pipe, base_args, device, guidance_of(configs["diffusers"]))}
    finally:
        pipe.vae.disable_tiling()
    rows["diffusers"]["request_forwards"] = 2 * request_steps(configs["diffusers"])
    failed = {}
    for name, cfg in list(configs.items())[1:]:
        try:
            result = profile_run(pipe, cfg, args, device, one_forward)
            result["forward_rel_l2"] = rel_l2(result.pop("forward"), reference_forward)
            rows[name] = result
        except Exception as error:  # one broken run must not lose the others' measurements
            traceback.print_exc()
            failed[name] = f"{type(error).__name__}: {error}"
            torch.cuda.empty_cache() if device.type == "cuda" else None
    report = summarize(rows, configs, args, step_flops, device)
    report.update(model=args.model, reference=type(pipe).__name__, baseline_vae_tiling=args.baseline_vae_tiling,
                  # the process-wide kernel switches (WAN_OPT_HOPPER_KERNEL, WAN_OPT_HOPPER_SCHEDULE) it ran under
                  environment={k: v for k, v in sorted(os.environ.items()) if k.startswith("WAN_OPT_")})
    report["failed"] = failed
    write(report, args)
    return 1 if failed else 0

"""WanOptPipeline: Wan 2.2 text- and image-to-video on diffusers' and transformers' modules, with wan-opt's
policies.

With every optimization off it computes what diffusers' `WanPipeline` computes on the same inputs, and with an
image what its `WanImageToVideoPipeline` computes (wan_opt.conditioning); the memory policy decides where
modules live at each stage and the speed policy which kernels run.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from wan_opt import image as images
from wan_opt import parallel
from wan_opt.conditioning import Condition, denormalised, encode_condition
from wan_opt.errors import WanOptError
from wan_opt.loading.components import load_components
from wan_opt.loading.lora import apply_expert_loras, lora_specs
from wan_opt.loading.modules import resolve_device
from wan_opt.memory.policy import MemoryPolicy
from wan_opt.optim.speed import SpeedPolicy
from wan_opt.optim.vae import in_range
from wan_opt.prepare import Prepared, compose_config, prepare

# on_step(step_index, total_steps, expert_label, seconds_of_this_step)
StepCallback = Callable[[int, int, str, float], None]

OUTPUT_TYPES = ("np", "uint8", "pt", "pil", "latent")
FRAMES_PER_COPY = 8  # host_frames' float32 working copy on the device: 8 frames of 720p are 88 MB


@dataclass
class WanOptOutput:
    # np.ndarray (batch, frames, height, width, 3): floats in [0, 1] for output_type="np", 8-bit pixels for "uint8"
    frames: Any
    stage_seconds: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)


class WanOptPipeline:
    def __init__(self, *, transformer, text_encoder, tokenizer, vae, scheduler, transformer_2=None,
                 boundary_ratio: float | None = None, expand_timesteps: bool = False,
                 memory: MemoryPolicy | None = None, speed: SpeedPolicy | None = None,
                 device: torch.device | str | None = None, weight_source=None):
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.text_encoder, self.tokenizer, self.vae, self.scheduler = text_encoder, tokenizer, vae, scheduler
        self.boundary_ratio, self.expand_timesteps = boundary_ratio, expand_timesteps
        self.memory = memory or MemoryPolicy(text_encoder="gpu", weight_dtype="float32", compute_dtype="float32")
        self.speed = speed or SpeedPolicy()
        self.device = torch.device(device) if device is not None else next(transformer.parameters()).device
        self.video_processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
        self.expert_swapper = self.text_encoder_swapper = self.vae_swapper = None  # set by MemoryPolicy.prepare
        self.parallel = None  # set by wan_opt.parallel.apply under torchrun
        self.prepared = None  # the checked request and memory plan it was loaded for (from_prepared)
        self.weight_source = weight_source  # idle_weights=checkpoint: the files modules are read from when needed

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, pipe, memory: MemoryPolicy | None = None, speed: SpeedPolicy | None = None):
        """Wrap an existing diffusers `WanPipeline` or `WanImageToVideoPipeline` (Wan 2.2's, without a CLIP image
        encoder), reusing its modules (nothing is copied or reloaded)."""
        device = pipe._execution_device
        wrapped = cls(transformer=pipe.transformer, transformer_2=pipe.transformer_2, text_encoder=pipe.text_encoder,
                      tokenizer=pipe.tokenizer, vae=pipe.vae, scheduler=pipe.scheduler,
                      boundary_ratio=pipe.config.boundary_ratio, expand_timesteps=pipe.config.expand_timesteps,
                      memory=memory, speed=speed, device=device)
        wrapped.apply_policies()
        return wrapped

    @classmethod
    def from_config(cls, model, memory: MemoryPolicy, speed: SpeedPolicy, device: str | None = None):
        """Load `model` (a ModelConfig) as `memory` says and apply `speed` (the config's `pipeline` target)."""
        device = resolve_device(device)
        memory.configure_allocator(device)  # before the first weights reach the GPU
        components = load_components(model, memory, device)
        pipe = cls(**components, memory=memory, speed=speed, device=device)
        high, low = lora_specs(model.lora)
        if (high or low) and pipe.weight_source is None:  # read from the files, experts are fused as they are read
            apply_expert_loras(pipe, high, low)  # fused into the weights before fp8 storage and offloading
        pipe.apply_policies()
        return pipe

    @classmethod
    def from_prepared(cls, prepared: Prepared):
        """The pipeline a prepared run describes: its memory and speed policies instantiated from the config,
        the model loaded under them, and under torchrun split across the process group."""
        cfg = prepared.cfg
        memory, speed = instantiate(cfg.hardware.memory), instantiate(cfg.hardware.speed)
        device = parallel.init(cfg.hardware.device) if prepared.layout else cfg.hardware.device
        try:
            pipe = instantiate(cfg.pipeline, model=cfg.model, memory=memory, speed=speed, device=str(device),
                               _convert_="object")
        except InstantiationException as exc:
            if isinstance(exc.__cause__, WanOptError):  # a user's mistake found while loading: say it plainly
                raise exc.__cause__ from None
            raise
        if prepared.layout:
            parallel.apply(pipe, prepared.layout, parallel.build_mesh(prepared.layout, device))
        pipe.prepared = prepared
        return pipe

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | None = None, model: str = "wan22_t2v_a14b",
                        hardware: str | None = None, overrides: Sequence[str] = ()):
        """Load a checkpoint under a hardware profile (detected when None), with command-line style overrides.

        The same checks, memory plan and one-sentence errors (WanOptError) as the command line; the plan is
        for the model's default size and frames, and `pipe.prepared` holds it.

            pipe = WanOptPipeline.from_pretrained("/ckpt/Wan2.2-T2V-A14B", overrides=["mode=fast"])
            video = pipe("a red fox running through snow").frames[0]
            pipe = WanOptPipeline.from_pretrained("/ckpt/Wan2.2-I2V-A14B", model="wan22_i2v_a14b")
            video = pipe("the cat turns its head", image="cat.jpg").frames[0]  # 1280*720-class, the image's shape
        """
        user = [f"model={model}", *([f"model.ckpt_dir={ckpt_dir}"] if ckpt_dir else []), *overrides]
        return cls.from_prepared(prepare(compose_config(user, hardware=hardware), user, prompt_required=False))

    def apply_policies(self) -> None:
        self.speed.fuse(self.experts())  # first: fp8 storage and offloading take the weights over
        self.speed.apply_to_vae(self.vae, self.memory)
        self.memory.prepare(self, self.device)
        self.speed.apply(self.experts(), self.device)

    def experts(self) -> list[torch.nn.Module]:
        return [m for m in (self.transformer, self.transformer_2) if m is not None]

    # -- the stages -------------------------------------------------------------------------------------

    def expert_for_timestep(self, t: torch.Tensor, guidance: float, guidance_2: float | None):
        """(expert, guidance, label): the high-noise expert while t >= boundary * 1000, then the low-noise one."""
        if self.transformer_2 is None or self.boundary_ratio is None:
            return self.transformer, guidance, "denoise"
        boundary = self.boundary_ratio * self.scheduler.config.num_train_timesteps
        if t >= boundary:
            return self.transformer, guidance, "high_noise"
        return self.transformer_2, guidance if guidance_2 is None else guidance_2, "low_noise"

    def step_plan(self, i: int, t: torch.Tensor, steps: int, guidance: float, guidance_2: float | None):
        """(expert, guidance, label) of step `i` at timestep `t`: the expert for t, and its guidance after the
        speed policy's CFG truncation."""
        expert, scale, label = self.expert_for_timestep(t, guidance, guidance_2)
        return expert, self.speed.guidance_at(i, steps, scale, label), label

    def forwards_per_step(self, steps: int, guidance: float, guidance_2: float | None = None) -> list[int]:
        """Denoiser passes each step of a `steps`-step request makes: 2 where it guides (in one batch or two), else 1.

        Known before running, so a request's cost can be reckoned from the time of one pass; the step caches'
        savings are not counted here, since they depend on the weights.
        """
        self.scheduler.set_timesteps(steps, device="cpu")
        return [2 if self.step_plan(i, t, steps, guidance, guidance_2)[1] > 1.0 else 1
                for i, t in enumerate(self.scheduler.timesteps)]

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str], max_sequence_length: int, dtype: torch.dtype) -> torch.Tensor:
        """UMT5 embeddings of each prompt, cut to its own length and zero-padded to `max_sequence_length`."""
        inputs = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        with self.memory.encoding(self) as encoder_device:
            hidden = self.text_encoder(inputs.input_ids.to(encoder_device),
                                       inputs.attention_mask.to(encoder_device)).last_hidden_state
        hidden = hidden.to(device=self.device, dtype=dtype)
        keep = inputs.attention_mask.to(self.device).bool().unsqueeze(-1)
        return torch.where(keep, hidden, torch.zeros_like(hidden))

    def denoise(self, expert, latents, timestep, embeds, guidance: float, step: dict | None = None) -> torch.Tensor:
        """One step's noise prediction, with classifier-free guidance when guidance > 1.

        `step` (step_index, sigma, num_inference_steps) is what diffusers' cache hooks need to know where the
        loop is; each branch runs in its own cache context, as in diffusers' WanPipeline.
        """
        cond, uncond = embeds[:1], embeds[1:]

        def forward(name: str, hidden, t, context):
            with expert.cache_context(name, **(step or {})) if expert.is_cache_enabled else contextlib.nullcontext():
                return expert(hidden_states=hidden.to(expert.dtype), timestep=t, encoder_hidden_states=context,
                              return_dict=False)[0]

        if guidance <= 1.0:
            return forward("cond", latents, timestep, cond)
        if self.parallel is not None and self.parallel.layout.cfg > 1:
            # Each half of the GPUs runs one branch; the halves swap predictions.
            mine = ("cond", cond) if self.parallel.cfg_rank == 0 else ("uncond", uncond)
            noise_cond, noise_uncond = self.parallel.gather_branches(forward(mine[0], latents, timestep, mine[1]))
        elif self.speed.batched_cfg:
            both = forward("cond_uncond", torch.cat([latents, latents]), torch.cat([timestep] * 2),
                           torch.cat([cond, uncond]))
            noise_cond, noise_uncond = both.chunk(2)
        else:
            noise_cond = forward("cond", latents, timestep, cond)
            noise_uncond = forward("uncond", latents, timestep, uncond)
        return noise_uncond + guidance * (noise_cond - noise_uncond)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, output_type: str):
        """Undo the VAE's latent normalisation, decode, and convert to frames."""
        vae = self.vae

        def run() -> torch.Tensor:  # in the VAE's dtype when it runs (in_range may change it)
            z = denormalised(vae, latents.to(next(vae.parameters()).device, vae.dtype))
            return vae.decode(z, return_dict=False)[0]

        video = in_range(vae, run, "decode")
        if output_type in ("np", "uint8"):
            return host_frames(video, pixels=output_type == "uint8")
        return self.video_processor.postprocess_video(video, output_type=output_type)

    # -- the call ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, prompt: str, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, num_frames: int = 81, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, guidance_scale_2: float | None = None,
                 generator: torch.Generator | None = None, output_type: str = "np", max_sequence_length: int = 512,
                 on_step: StepCallback | None = None, image=None, last_image=None) -> WanOptOutput:
        """Generate one video; argument names and defaults follow diffusers' `WanPipeline.__call__` and, with
        `image` (and `last_image`: a PIL image or a path), `WanImageToVideoPipeline.__call__`. Without height and
        width: 480x832, or with an image the model's area in the image's shape (wan_opt.image). Besides diffusers'
        output types, "uint8" gives the frames as the 8-bit pixels a video file stores (what run.py writes)."""
        image, last_image, width, height = self._image_inputs(image, last_image, width, height, num_frames)
        self._check_inputs(height, width, num_frames, num_inference_steps, output_type)
        seconds: dict[str, float] = {}
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        dtype = self.transformer.dtype

        # 1. Encode the prompt and the negative prompt (the latter only when some expert uses guidance).
        start = time.perf_counter()
        guided = guidance_scale > 1.0 or (guidance_scale_2 or 0.0) > 1.0
        prompts = [prompt, negative_prompt or ""] if guided else [prompt]
        embeds = self.encode_prompts(prompts, max_sequence_length, dtype)
        sync()
        seconds["text_encoding"] = time.perf_counter() - start

        # 2. Timesteps, with the scheduler's flow shift.
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps

        # 3. Initial noise in float32, drawn from `generator` (a CPU generator gives the same noise everywhere).
        temporal, spatial = self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial
        shape = (1, self.vae.config.z_dim, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

        # 3b. With an image: the conditioning video through the VAE (wan_opt.conditioning).
        condition = None
        if image is not None:
            start = time.perf_counter()
            with self.memory.vae_on_gpu(self):
                condition = encode_condition(self, image, last_image, height, width, num_frames)
            sync()
            seconds["vae_encode"] = time.perf_counter() - start

        # 4. The denoising loop: pick the expert for t, guide, step the solver.
        step_seconds = []
        for expert in self.experts():
            if expert.is_cache_enabled:
                expert._reset_stateful_cache()  # nothing cached by an earlier call leaks into this one
        plan = [self.step_plan(i, t, len(timesteps), guidance_scale, guidance_scale_2) for i, t in enumerate(timesteps)]
        self.speed.begin_request(plan)
        for i, t in enumerate(timesteps):
            step_start = time.perf_counter()
            expert, guidance, label = plan[i]
            self.memory.activate_expert(self, expert)
            hidden = latents if condition is None else condition.model_input(latents)
            timestep = self._timestep_input(t, latents, condition)
            where = {"step_index": i, "sigma": float(self.scheduler.sigmas[i]), "num_inference_steps": len(timesteps)}
            noise = self.denoise(expert, hidden, timestep, embeds, guidance, where)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
            sync()
            step_seconds.append(time.perf_counter() - step_start)
            stage = label if label == "denoise" else f"denoise_{label}"  # one expert: plain "denoise"
            seconds[stage] = seconds.get(stage, 0.0) + step_seconds[-1]
            if on_step is not None:
                on_step(i, len(timesteps), label, step_seconds[-1])
        self.speed.end_request(plan)
        if condition is not None:
            latents = condition.final(latents)

        if output_type == "latent":
            return WanOptOutput(latents, seconds, step_seconds)

        # 5. Decode the latents to frames.
        start = time.perf_counter()
        with self.memory.vae_on_gpu(self):
            frames = self.decode(latents, output_type)
        sync()
        seconds["vae_decode"] = time.perf_counter() - start
        return WanOptOutput(frames, seconds, step_seconds)

    def _timestep_input(self, t: torch.Tensor, latents: torch.Tensor, condition: Condition | None = None):
        """TI2V-5B takes one timestep per latent token (0 for an image's); the A14B experts one per sample."""
        if condition is not None:
            return condition.timestep(t, latents.shape[0], self.transformer.config.patch_size)
        if not self.expand_timesteps:
            return t.expand(latents.shape[0])
        _, p_h, p_w = self.transformer.config.patch_size
        tokens = latents.shape[2] * (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
        return t.to(torch.float32).expand(latents.shape[0], tokens)

    # -- images -----------------------------------------------------------------------------------------

    @property
    def image_use(self) -> images.ImageUse | None:
        """What these modules do with an image (wan_opt.image.IMAGE_USE), told from the modules themselves:
        TI2V-5B's per-token timesteps, or I2V-A14B's denoiser input wider than its latents; None: text only."""
        if self.expand_timesteps:
            return images.IMAGE_USE["ti2v_5b"]
        return images.IMAGE_USE["i2v_a14b"] if self.transformer.config.in_channels > self.vae.config.z_dim else None

    @property
    def takes_image(self) -> str | None:
        """"required" (I2V-A14B), "optional" (TI2V-5B), or None (text only)."""
        return None if self.image_use is None else self.image_use.needs

    def _image_inputs(self, image, last_image, width: int | None, height: int | None, num_frames: int):
        """(image, last_image, width, height) of a call: the images checked and read, the size fitted to the image
        when the call gives none."""
        image, last_image = self._check_images(image, last_image)
        if last_image is not None and num_frames < 5:
            raise ValueError(f"a last frame needs num_frames of 5 or more; got {num_frames}.")
        if height is None or width is None:
            return self.fitted_call(image, last_image, width, height)
        return image, last_image, width, height

    def _check_images(self, image, last_image):
        """The call's images as the pipeline takes them (a path is read and checked as the command line does)."""
        takes = self.takes_image
        if image is None and last_image is not None:
            raise WanOptError("last_image is the video's last frame and needs its first: pass image= too.")
        if image is not None and takes is None:
            raise WanOptError("This model makes video from text alone and takes no image: load "
                              "model=wan22_i2v_a14b or model=wan22_ti2v_5b for image-to-video.")
        if image is None and takes == "required":
            raise WanOptError("This model animates an image: pass image= (a PIL image or the path of a PNG, JPEG "
                              "or WebP).")
        if last_image is not None and not self.image_use.last_frame:
            raise WanOptError("TI2V-5B takes a first frame only (its image path has no last frame): drop last_image.")
        first = None if image is None else images.api_image(image, "image")
        return first, None if last_image is None else images.api_image(last_image, "last_image")

    def fitted_call(self, image, last_image, width: int | None, height: int | None):
        """(image, last_image, width, height) of a call that gave no size: 832x480 (diffusers' default), or with a
        PIL image the area of the loaded model's size (832*480 without one), the frames fitted to it as the
        command line fits them (wan_opt.image); a call that gives the size gets diffusers' plain resize."""
        if width is not None or height is not None:
            raise ValueError("pass both height and width, or neither.")
        if image is None or not hasattr(image, "size"):
            return image, last_image, 832, 480
        request = self.prepared.request if self.prepared is not None else None
        area = 832 * 480 if request is None else request.width * request.height
        grid = self.vae.config.scale_factor_spatial * self.transformer.config.patch_size[1]
        rule = self.image_use.fit
        size = images.fitted_size(image.size[0], image.size[1], area, grid, rule)
        image = images.fit(image, size, rule)[0]
        if last_image is not None and hasattr(last_image, "size"):
            last_image = images.last_frame_fit(last_image, size, rule)[0]
        return image, last_image, *size

    def _check_inputs(self, height: int, width: int, num_frames: int, steps: int, output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}.")
        grid = self.vae.config.scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % grid or width % grid:
            raise ValueError(f"height and width must be multiples of {grid}; got {height}x{width}.")
        if (num_frames - 1) % self.vae.config.scale_factor_temporal:
            raise ValueError(f"num_frames must be 4n+1; got {num_frames}.")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1; got {steps}.")


def host_frames(video: torch.Tensor, pixels: bool) -> np.ndarray:
    """The VAE's video (B, C, F, H, W) in [-1, 1] as frames (B, F, H, W, C) in host memory: floats in [0, 1], as
    diffusers' output_type="np" gives them, or 8-bit pixels, as a video file stores them.

    Converted where the video lies, a few frames at a time, straight into the one host array: diffusers' own
    post-processing copies the whole video to the host in the VAE's dtype and converts it there with strided
    reads into two more copies, seconds of CPU time and 2-3 full-size copies of host memory at 720p."""
    batch, channels, frames, height, width = video.shape
    out = torch.empty((batch, frames, height, width, channels), dtype=torch.uint8 if pixels else torch.float32)
    for first in range(0, frames, FRAMES_PER_COPY):
        part = video[:, :, first:first + FRAMES_PER_COPY].to(torch.float32, copy=True)
        part = part.mul_(0.5).add_(0.5).clamp_(0.0, 1.0)
        if pixels:
            part = part.mul_(255.0).round_().to(torch.uint8)
        out[:, first:first + FRAMES_PER_COPY] = part.permute(0, 2, 3, 4, 1).contiguous()
    return out.numpy()

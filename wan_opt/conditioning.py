"""The first (and last) frame as the denoiser sees it: the conditioning video through the VAE, and how it joins
each step's input. Computes what diffusers' WanImageToVideoPipeline computes (its prepare_latents and loop).

I2V-A14B takes 36 input channels: the 16 noise latents, then 4 mask channels (1 where a pixel frame is given:
each latent frame after the first covers 4 pixel frames, the first one frame repeated 4 times), then the 16
normalised latents of the video [image, zeros ..., (last_image)] that the VAE encodes.
TI2V-5B keeps its 48 channels: the encoded image replaces the first latent frame, whose tokens denoise at
timestep 0 (diffusers' expand_timesteps), and is put back into the latents at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wan_opt.optim.vae import in_range


@dataclass
class Condition:
    """What an image adds to every step: `latents` (A14B: mask and latents, 20 channels; TI2V: the image's latent
    frame) and, for TI2V, `frame_mask` (0 on the given latent frame, 1 elsewhere)."""

    latents: torch.Tensor
    frame_mask: torch.Tensor | None = None

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for `latents` (float32, as the solver keeps them)."""
        if self.frame_mask is None:
            return torch.cat([latents, self.latents], dim=1)
        return (1 - self.frame_mask) * self.latents + self.frame_mask * latents

    def timestep(self, t: torch.Tensor, batch: int, patch: tuple[int, int, int]) -> torch.Tensor:
        """TI2V: one timestep per token, 0 for the image's tokens; A14B: one per sample."""
        if self.frame_mask is None:
            return t.expand(batch)
        per_token = self.frame_mask[0, 0][:, ::patch[1], ::patch[2]] * t
        return per_token.flatten().unsqueeze(0).expand(batch, -1)

    def final(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents to decode: TI2V's first frame is the image's own."""
        return latents if self.frame_mask is None else self.model_input(latents)


def frame_mask(num_frames: int, last: bool, temporal: int, height: int, width: int) -> torch.Tensor:
    """I2V-A14B's 4 mask channels, (1, temporal, latent frames, height, width): a latent frame's channel c is 1
    when the pixel frame it stands for is given (frame 0 fills all of latent frame 0's channels)."""
    given = torch.zeros(num_frames)
    given[0] = 1
    if last:
        given[-1] = 1
    per_latent = torch.cat([given[:1].repeat(temporal), given[1:]]).view(-1, temporal)  # (latent frames, temporal)
    return per_latent.T[None, :, :, None, None].expand(1, temporal, per_latent.shape[0], height, width).contiguous()


def normalised(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents in the denoiser's units: minus the channel means, times one over the channel deviations."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return (latents - mean) * inverse_std


def denormalised(vae, latents: torch.Tensor) -> torch.Tensor:
    """Denoiser latents in the VAE's units, as its decoder takes them: times the channel deviations, plus the
    channel means (the inverse of `normalised`)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    return latents * std + mean


@torch.inference_mode()
def encode_condition(pipe, image, last_image, height: int, width: int, num_frames: int) -> Condition:
    """Preprocess the frame(s) as diffusers does (resize to height x width, scale to [-1, 1]), build the
    conditioning video, encode it with the VAE (the mode of its distribution) and shape it for the denoiser."""
    vae, device = pipe.vae, pipe.device
    vae_device = next(vae.parameters()).device
    first = pipe.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if pipe.expand_timesteps:
        video = first.unsqueeze(2)
    else:
        frames = [first.unsqueeze(2), first.new_zeros(1, 3, num_frames - 1 - (last_image is not None), height, width)]
        if last_image is not None:
            last = pipe.video_processor.preprocess(last_image, height=height, width=width)
            frames.append(last.to(device, torch.float32).unsqueeze(2))
        video = torch.cat(frames, dim=2)
    encoded = in_range(vae, lambda: vae.encode(video.to(vae_device, vae.dtype)).latent_dist.mode(), "encode")
    latents = normalised(vae, encoded.to(device, torch.float32))
    latent_frames, lat_h, lat_w = (num_frames - 1) // temporal + 1, height // spatial, width // spatial
    if pipe.expand_timesteps:
        mask = torch.ones(1, 1, latent_frames, lat_h, lat_w, device=device)
        mask[:, :, 0] = 0
        return Condition(latents, mask)
    mask = frame_mask(num_frames, last_image is not None, temporal, lat_h, lat_w).to(device)
    return Condition(torch.cat([mask, latents], dim=1))

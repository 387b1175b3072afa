"""The VAE decode of a whole 720p video, in every variant wan-opt can run it, against the exact float32 decode.

Each variant is a precision (float32 with or without TF32 convolutions, bf16, float16), a memory layout (channels
first, as diffusers keeps the VAE, or channels last: wan_opt.optim.vae), diffusers' modules or wan-opt's fused
ones (fuse_vae: each norm and its SiLU one kernel, the convolutions padded in place) and the latent frames fed to
the decoder a call (1: diffusers' own decode; more: `decode_chunked` below, which wan-opt does not use: it bought
little for much memory). Each decodes the same random latents with the same random full-size VAE, built on the
GPU; the table gives the seconds (best of --repeats, the first of which includes warm-up), the GPU
memory the decode took beyond the weights and latents, and the frames' deviation from the exact decode (float32,
no TF32, diffusers' decode): relative L2 over the frames in [-1, 1], and the PSNR and largest difference of the
8-bit frames a video file gets. Random weights say nothing of the picture, only of the arithmetic.

    python benchmarks/vae_decode.py --families t2v_a14b ti2v_5b [--variants 1 4 ...] [--suffix _NAME]

writes benchmarks/results/vae_decode_<GPU><suffix>.json and .md with the command and GPU; a float16 variant that
overflowed and ran again in bf16 (wan_opt.optim.vae.in_range) says so.
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_report import gpu_file_name, gpu_report, write_report  # noqa: E402
from wan_opt.bench.report import rel_l2  # noqa: E402
from wan_opt.conditioning import denormalised  # noqa: E402
from wan_opt.loading.arch import VAE_CONFIGS  # noqa: E402
from wan_opt.loading.modules import cast_module  # noqa: E402
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify  # noqa: E402
from wan_opt.optim.vae import fuse_vae, in_range, use_channels_last  # noqa: E402

# family -> (width, height, frames) of the request whose decode is timed: each model's 720p
SIZES = {"t2v_a14b": (1280, 720, 81), "i2v_a14b": (1280, 720, 81), "ti2v_5b": (1280, 704, 121)}


@dataclass(frozen=True)
class Variant:
    dtype: str = "float32"
    tf32: bool = True
    channels_last: bool = False
    chunk: int = 1
    cudnn_benchmark: bool = False
    fused: bool = False

    @property
    def name(self) -> str:
        parts = [self.dtype if self.dtype != "float32" else ("float32, TF32" if self.tf32 else "float32 exact")]
        parts += ["channels last"] if self.channels_last else []
        parts += [f"{self.chunk} frames a call"] if self.chunk > 1 else []
        parts += ["cuDNN autotuned"] if self.cudnn_benchmark else []
        parts += ["fused norms (fuse_vae)"] if self.fused else []
        return ", ".join(parts)


EXACT = Variant(tf32=False)
VARIANTS = (
    EXACT,
    Variant(),  # the float32 profiles' decode before channels last (speed.tf32 on)
    Variant(channels_last=True),
    Variant(channels_last=True, chunk=4),
    Variant(dtype="bfloat16"),
    Variant(dtype="bfloat16", channels_last=True),
    Variant(dtype="bfloat16", channels_last=True, chunk=2),
    Variant(dtype="bfloat16", channels_last=True, chunk=4),
    Variant(dtype="bfloat16", channels_last=True, chunk=7),
    Variant(dtype="bfloat16", channels_last=True, chunk=4, cudnn_benchmark=True),
    Variant(dtype="float16"),
    Variant(dtype="float16", channels_last=True),  # wan-opt's decode in the Hopper profiles
    Variant(dtype="float16", channels_last=True, fused=True),  # with hardware.speed.fuse_vae=true
    Variant(dtype="bfloat16", channels_last=True, fused=True),
)


def decode_chunked(vae, z: torch.Tensor, chunk: int) -> torch.Tensor:
    """diffusers' decode fed the first latent frame alone, then `chunk` a call. The decoder is causal in time and
    its caches carry the last two frames each convolution saw, and its temporal upsampling skips only the first
    latent frame (the first call finds its cache empty): the same frames, up to the order of sums, in fewer and
    larger kernels."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    starts = [0, *range(1, x.shape[2], chunk)]
    out = []
    for start, end in zip(starts, [*starts[1:], x.shape[2]]):
        vae._conv_idx = [0]
        out.append(vae.decoder(x[:, :, start:end], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                               first_chunk=start == 0))
    vae.clear_cache()
    video = torch.cat(out, 2)
    if vae.config.patch_size is not None:
        video = unpatchify(video, patch_size=vae.config.patch_size)
    return video.clamp_(-1.0, 1.0)


def decode(vae, z: torch.Tensor, chunk: int) -> torch.Tensor:
    if chunk > 1:
        return decode_chunked(vae, z, chunk)
    return in_range(vae, lambda: vae.decode(z.to(vae.dtype), return_dict=False)[0], "decode")


def build_vae(family: str, variant: Variant, device: torch.device):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with device:
        vae = AutoencoderKLWan(**VAE_CONFIGS[family])
    vae = cast_module(vae, getattr(torch, variant.dtype)).eval().requires_grad_(False)
    if variant.fused:
        fuse_vae(vae)
    if variant.channels_last:
        use_channels_last(vae)
    return vae


def latents(family: str, vae, device: torch.device) -> torch.Tensor:
    """Random latents of the family's 720p request, de-normalised as the pipeline hands them to the decoder."""
    width, height, frames = SIZES[family]
    config = vae.config
    spatial, temporal = config.scale_factor_spatial, config.scale_factor_temporal
    shape = (1, config.z_dim, (frames - 1) // temporal + 1, height // spatial, width // spatial)
    return denormalised(vae, torch.randn(shape, generator=torch.Generator(device).manual_seed(0), device=device))


def eight_bit(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [-1, 1] as a video file stores them (diffusers' postprocessing: (x + 1) / 2, rounded to 8 bits)."""
    return ((frames.float() / 2 + 0.5).clamp(0, 1) * 255).round()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


class _Warnings(logging.Handler):
    """The warnings wan_opt.optim.vae logs (a float16 decode that ran again in bf16)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def time_variant(family: str, variant: Variant, repeats: int, device: torch.device):
    torch.backends.cudnn.allow_tf32 = variant.tf32
    torch.backends.cuda.matmul.allow_tf32 = variant.tf32
    torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    vae = build_vae(family, variant, device)
    z = latents(family, vae, device).to(vae.dtype)
    seconds, warnings = [], _Warnings()
    logging.getLogger("wan_opt.optim.vae").addHandler(warnings)
    with torch.inference_mode():
        for _ in range(repeats):
            frames = None
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            frames = decode(vae, z, variant.chunk)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
    logging.getLogger("wan_opt.optim.vae").removeHandler(warnings)
    del vae, z
    return frames, seconds, peak, warnings.messages


def run(family: str, variants, repeats: int, device: torch.device) -> dict:
    rows, exact = [], None
    for variant in variants:
        try:
            frames, seconds, peak, warnings = time_variant(family, variant, 1 if variant == EXACT else repeats, device)
        except torch.OutOfMemoryError:
            rows.append({"variant": variant.name, **asdict(variant), "failed": "out of GPU memory"})
            torch.cuda.empty_cache()
            continue
        if variant == EXACT:
            exact = frames.float()
            exact_8bit = eight_bit(exact)
            clamped = (exact.abs() >= 1.0).float().mean().item()
        row = {"variant": variant.name, **asdict(variant), "seconds": round(min(seconds), 3),
               "seconds_each": [round(s, 3) for s in seconds], "peak_gib_beyond_weights": round(peak, 2),
               "warnings": warnings}
        if exact is not None and variant != EXACT:
            mine = eight_bit(frames)
            row.update(frames_rel_l2=rel_l2(frames.float(), exact), psnr_8bit_db=round(psnr(mine, exact_8bit), 2),
                       max_8bit_levels=int((mine - exact_8bit).abs().max().item()))
        rows.append(row)
        print(row, flush=True)
        del frames
        torch.cuda.empty_cache()
    width, height, frames = SIZES[family]
    return {"family": family, "size": f"{width}*{height}", "frames": frames,
            "exact_fraction_clamped": round(clamped, 4) if exact is not None else None, "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"# VAE decode, {report['gpu']}", "", f"`{report['command']}`", ""]
    for result in report["results"]:
        lines += [f"## {result['family']}, {result['size']} x {result['frames']}", "",
                  "| variant | s | GiB beyond weights | frames rel L2 | PSNR, 8-bit | largest 8-bit difference |",
                  "|---|---|---|---|---|---|"]
        for row in result["rows"]:
            if "failed" in row:
                lines.append(f"| {row['variant']} | {row['failed']} | | | | |")
                continue
            deviation = (f"{row['frames_rel_l2']:.2e} | {row['psnr_8bit_db']} dB | {row['max_8bit_levels']}"
                         if "frames_rel_l2" in row else "reference | | ")
            peak = row["peak_gib_beyond_weights"]
            lines.append(f"| {row['variant']} | {row['seconds']:.2f} | {peak} | {deviation} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["t2v_a14b"], choices=sorted(SIZES))
    parser.add_argument("--variants", nargs="+", type=int, help="indices into VARIANTS (0, the exact one, always runs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--suffix", default="", help="appended to the result file's name")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("vae_decode.py times the decode on a GPU; this machine has none.")
    device = torch.device("cuda")
    chosen = VARIANTS if not args.variants else [EXACT, *(VARIANTS[i] for i in args.variants if i)]
    report = gpu_report(results=[run(family, chosen, args.repeats, device) for family in args.families])
    path = write_report(report, Path(args.out) / gpu_file_name("vae_decode", report, args.suffix))
    path.with_suffix(".md").write_text(markdown(report) + "\n")


if __name__ == "__main__":
    main()

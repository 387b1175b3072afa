"""Save a Diffusers-layout copy of a Wan 2.2 checkpoint held in the Wan team's original layout.

    python -m wan_opt.convert SRC DST [--dtype bfloat16|float32]

SRC is a Wan2.2-T2V-A14B, -I2V-A14B or -TI2V-5B download (the model is recognised from its files); DST must not
exist or be empty. Every file is checked before anything is written; each component is loaded tensor by
tensor (wan_opt.loading.original), saved and released before the next, into a temporary sibling of DST that
is renamed into place only once complete. Mistakes are one sentence on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from wan_opt.errors import WanOptError
from wan_opt.loading.layouts import (DIFFUSERS_DITS, PER_TOKEN_TIMESTEPS, T5_FILE, TOKENIZER_DIR, VAE_FILES, Checkpoint,
                                     check_checkpoint, original_family)
from wan_opt.loading.original import load_dit, load_text_encoder, load_vae

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CPU = torch.device("cpu")


def _library_entry(cls: type | None) -> list:
    return [cls.__module__.split(".")[0], cls.__name__] if cls else [None, None]


def write_scheduler_and_index(dst: Path, family: str, tokenizer_cls: type) -> None:
    """The scheduler with the family's flow shift, and model_index.json with its experts' boundary: the Wan team's
    sampling defaults, which the family's model preset (conf/model/wan22_<family>.yaml) is the one place of."""
    from wan_opt.loading.modules import scheduler_for
    from wan_opt.prepare import compose_config

    preset = compose_config([f"model=wan22_{family}"], hardware="cpu").model
    scheduler_for(preset.shift).save_pretrained(dst / "scheduler")
    write_model_index(dst, family, tokenizer_cls, preset.boundary)


def write_model_index(dst: Path, family: str, tokenizer_cls: type, boundary: float | None) -> None:
    """model_index.json as WanPipeline (WanImageToVideoPipeline for I2V-A14B, which has no CLIP image encoder)
    .save_pretrained writes it, without building the pipeline in memory."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    i2v = family == "i2v_a14b"
    index = {
        "_class_name": "WanImageToVideoPipeline" if i2v else "WanPipeline",
        "_diffusers_version": importlib.metadata.version("diffusers"),
        "boundary_ratio": boundary,
        "expand_timesteps": family in PER_TOKEN_TIMESTEPS,
        **({"image_encoder": [None, None], "image_processor": [None, None]} if i2v else {}),
        "scheduler": _library_entry(UniPCMultistepScheduler),
        "text_encoder": _library_entry(UMT5EncoderModel),
        "tokenizer": _library_entry(tokenizer_cls),
        "transformer": _library_entry(WanTransformer3DModel),
        "transformer_2": _library_entry(WanTransformer3DModel if len(DIFFUSERS_DITS[family]) == 2 else None),
        "vae": _library_entry(AutoencoderKLWan),
    }
    (dst / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_all(ckpt: Checkpoint, dst: Path, dtype: torch.dtype) -> None:
    """Each component converted, saved and released before the next, so one model is in memory at a time."""
    from transformers import AutoTokenizer

    for component, folder in zip(DIFFUSERS_DITS[ckpt.family], ckpt.dit_dirs()):
        load_dit(folder, ckpt.family, dtype, CPU).save_pretrained(dst / component)
        print(f"{component}: converted from {folder}", flush=True)
    load_text_encoder(ckpt.root / T5_FILE, dtype, CPU).save_pretrained(dst / "text_encoder")
    print(f"text_encoder: converted from {T5_FILE}", flush=True)
    # The VAE stays float32, as the Wan team runs it.
    load_vae(ckpt.root / VAE_FILES[ckpt.family], torch.float32, CPU).save_pretrained(dst / "vae")
    print(f"vae: converted from {VAE_FILES[ckpt.family]}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.root / TOKENIZER_DIR)
    tokenizer.save_pretrained(dst / "tokenizer")
    write_scheduler_and_index(dst, ckpt.family, type(tokenizer))


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write the Diffusers layout of the original-layout checkpoint `src` to `dst`; returns the family."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise WanOptError(f"{dst} already exists and is not empty: choose a new DST or remove it first.")
    if not src.is_dir():
        raise WanOptError(f"{src} is not a directory: point SRC at a downloaded Wan 2.2 checkpoint.")
    ckpt = check_checkpoint(src, original_family(src))
    if ckpt.layout != "original":
        raise WanOptError(f"{src} is already in the Diffusers layout: nothing to convert.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{dst.name}.tmp-", dir=dst.parent))
    try:
        write_all(ckpt, tmp, dtype)
        os.replace(tmp, dst)  # atomic; replaces DST only if it is an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt.family


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wan_opt.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint in the Wan team's layout (Wan2.2-T2V-A14B, -I2V-A14B or -TI2V-5B)")
    parser.add_argument("dst", help="new directory for the Diffusers layout")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="storage dtype of the DiT and T5 weights (the VAE stays float32)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        family = convert_checkpoint(args.src, args.dst, DTYPES[args.dtype])
    except (WanOptError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Saved the Diffusers layout of the {family} checkpoint to {args.dst}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

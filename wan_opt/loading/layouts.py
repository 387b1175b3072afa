"""Which checkpoint layout a directory holds, and whether every file it needs is there.

Two layouts are in use: the Diffusers one (model_index.json and one folder per component) and the Wan
team's original one (expert folders of sharded safetensors, a T5 .pth, a VAE .pth, a tokenizer folder).
Checked before anything loads, so a missing file is named in one sentence instead of failing mid-load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wan_opt.errors import WanOptError

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILES = {"t2v_a14b": "Wan2.1_VAE.pth", "ti2v_5b": "Wan2.2_VAE.pth"}
# Original layout: the DiT folders of each family, in the order the diffusers names them.
ORIGINAL_DITS = {"t2v_a14b": ("high_noise_model", "low_noise_model"), "ti2v_5b": (".",)}
DIFFUSERS_DITS = {"t2v_a14b": ("transformer", "transformer_2"), "ti2v_5b": ("transformer",)}


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    layout: str  # "diffusers" | "original"
    family: str  # "t2v_a14b" | "ti2v_5b"

    def dit_dirs(self) -> list[Path]:
        names = DIFFUSERS_DITS if self.layout == "diffusers" else ORIGINAL_DITS
        return [self.root / name for name in names[self.family]]


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one model folder: a single file, or the shards its index lists."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if single.is_file():
        return [single]
    found = sorted(folder.glob(f"{stem}*.safetensors"))
    if found:
        raise WanOptError(f"{folder} has safetensors shards but no {index.name} listing them: restore that file.")
    return [single]


def detect_layout(root: str | Path, family: str) -> Checkpoint:
    """Recognise the layout of `root` for a model `family`; raise WanOptError if it is neither."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WanOptError(f"model.ckpt_dir={root} is not a directory: point it at a downloaded Wan 2.2 checkpoint.")
    if (root / "model_index.json").is_file():
        return Checkpoint(root, "diffusers", family)
    if (root / T5_FILE).is_file() or any((root / d).is_dir() for d in ORIGINAL_DITS[family] if d != ".") or (
        root / VAE_FILES[family]
    ).is_file():
        return Checkpoint(root, "original", family)
    raise WanOptError(
        f"{root} holds neither a Diffusers checkpoint (model_index.json) nor the Wan team's layout "
        f"({T5_FILE}, {VAE_FILES[family]}, ...): point model.ckpt_dir at the folder that holds them."
    )


def original_family(root: str | Path) -> str:
    """Which model an original-layout folder holds: the A14B has expert folders, TI2V-5B top-level shards."""
    root = Path(root).expanduser()
    if (root / "high_noise_model").is_dir():
        return "t2v_a14b"
    if any(root.glob("diffusion_pytorch_model*.safetensors")):
        return "ti2v_5b"
    raise WanOptError(
        f"{root} is not a Wan 2.2 checkpoint in the Wan team's layout: it has neither high_noise_model/ "
        f"(T2V-A14B) nor top-level diffusion_pytorch_model shards (TI2V-5B)."
    )


def required_files(ckpt: Checkpoint) -> list[Path]:
    """Every file the checkpoint must provide for its family and layout."""
    root = ckpt.root
    files: list[Path] = []
    if ckpt.layout == "diffusers":
        for dit in ckpt.dit_dirs():
            files += [dit / "config.json", *weight_files(dit, "diffusion_pytorch_model")]
        files += [root / "text_encoder" / "config.json", *weight_files(root / "text_encoder", "model")]
        files += [root / "vae" / "config.json", *weight_files(root / "vae", "diffusion_pytorch_model")]
        files += [root / "scheduler" / "scheduler_config.json", root / "tokenizer" / "tokenizer_config.json"]
        return files
    for dit in ckpt.dit_dirs():
        files += [dit / "config.json", *weight_files(dit, "diffusion_pytorch_model")]
    files += [root / T5_FILE, root / VAE_FILES[ckpt.family], root / TOKENIZER_DIR / "tokenizer_config.json"]
    return files


def check_checkpoint(root: str | Path, family: str) -> Checkpoint:
    """Detect the layout and name the first missing file, before any weights are read."""
    ckpt = detect_layout(root, family)
    for path in required_files(ckpt):
        if not path.is_file():
            rel = path.relative_to(ckpt.root)
            raise WanOptError(
                f"The {ckpt.layout}-layout checkpoint at {ckpt.root} is incomplete: {rel} is missing "
                f"(re-download it, or check that model= matches the checkpoint)."
            )
    return ckpt

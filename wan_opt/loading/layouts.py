"""Which checkpoint layout a directory holds, and whether every file it needs is there.

Two layouts are in use: the Diffusers one (model_index.json and one folder per component) and the Wan
team's original one (expert folders of sharded safetensors, a T5 .pth, a VAE .pth, a tokenizer folder).
Checked before anything loads, so a missing file is named in one sentence instead of failing mid-load:
every file present, every JSON file readable, every safetensors header readable and as long as its file, the
shard index and the shards in agreement, and every tensor of the shape its config.json asks for.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from wan_opt.errors import WanOptError

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILES = {"t2v_a14b": "Wan2.1_VAE.pth", "i2v_a14b": "Wan2.1_VAE.pth", "ti2v_5b": "Wan2.2_VAE.pth"}
# Original layout: the DiT folders of each family, in the order the diffusers names them.
ORIGINAL_DITS = {"t2v_a14b": ("high_noise_model", "low_noise_model"),
                 "i2v_a14b": ("high_noise_model", "low_noise_model"), "ti2v_5b": (".",)}
DIFFUSERS_DITS = {"t2v_a14b": ("transformer", "transformer_2"), "i2v_a14b": ("transformer", "transformer_2"),
                  "ti2v_5b": ("transformer",)}
# What a DiT's config.json says of its family: the original WanModel's model_type, diffusers' input channels.
DIT_MODEL_TYPES = {"t2v_a14b": "t2v", "i2v_a14b": "i2v", "ti2v_5b": "ti2v"}
DIT_IN_CHANNELS = {"t2v_a14b": 16, "i2v_a14b": 36, "ti2v_5b": 48}
# TI2V-5B denoises with a timestep per latent token (diffusers' expand_timesteps), the first frame's at 0.
PER_TOKEN_TIMESTEPS = frozenset({"ti2v_5b", "tiny_ti2v"})
# The tiny presets' families (conf/model/tiny*.yaml, wan_opt.loading.tiny) -> the model each has the shape of
TINY_SHAPES = {"tiny": "t2v_a14b", "tiny_i2v": "i2v_a14b", "tiny_ti2v": "ti2v_5b"}
MODEL_NAMES = {"t2v_a14b": "Wan2.2-T2V-A14B", "i2v_a14b": "Wan2.2-I2V-A14B", "ti2v_5b": "Wan2.2-TI2V-5B"}


# Bytes per element of the safetensors dtypes of whole bytes (others are not size-checked).
SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                     "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


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
        return [folder / shard for shard in sorted(set(weight_map(index).values()))]
    if single.is_file():
        return [single]
    found = sorted(folder.glob(f"{stem}*.safetensors"))
    if found:
        raise WanOptError(f"{folder} has safetensors shards but no {index.name} listing them: restore that file.")
    return [single]


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a file that is not one is a sentence naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = getattr(exc, "msg", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise WanOptError(f"{path} is not readable JSON ({reason}): re-download it.") from None
    if not isinstance(data, dict):
        raise WanOptError(f"{path} holds a JSON {type(data).__name__} where an object belongs: re-download it.")
    return data


def weight_map(index: Path) -> dict[str, str]:
    """A shard index's tensor name -> shard file, each shard a file beside the index."""
    mapping = read_json(index).get("weight_map")
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise WanOptError(f"{index} has no weight_map of tensor names to shard files: re-download it.")
    for shard in set(mapping.values()):
        if Path(shard).name != shard or shard in (".", ".."):
            raise WanOptError(f"{index} names the shard {shard!r}, which is not a file beside it: re-download it.")
    return mapping


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header, read without its tensors. A header
    that cannot be read, or a file shorter or longer than its header says (a cut download), is a sentence."""
    return {name: (dtype, shape) for name, (dtype, shape, _) in safetensors_entries(path)[1].items()}


def safetensors_entries(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]]:
    """Where a safetensors file's tensor data starts, and each tensor's (dtype, shape, (begin, end)) byte range
    from there: its header read and checked against the file as safetensors_header says."""
    def bad(why: str) -> WanOptError:
        return WanOptError(f"{path} is not a whole safetensors file ({why}): re-download it.")

    size = path.stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little") if size >= 8 else 0
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise bad("its first bytes are not a safetensors header")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"the header's entry for {name!r} is malformed") from None
        if not all(type(n) is int and n >= 0 for n in (*shape, begin, stop)) or begin > stop:
            raise bad(f"the header's entry for {name!r} is malformed")
        if dtype in SAFETENSORS_BYTES and stop - begin != math.prod(shape) * SAFETENSORS_BYTES[dtype]:
            raise bad(f"{name!r} has {stop - begin} bytes where its shape {list(shape)} needs "
                      f"{math.prod(shape) * SAFETENSORS_BYTES[dtype]}")
        tensors[name], end = (dtype, shape, (begin, stop)), max(end, stop)
    if end != size - 8 - length:
        raise bad(f"its header lists {end} bytes of tensors and the file holds {size - 8 - length}"
                  + ("; it was cut short" if end > size - 8 - length else ""))
    return 8 + length, tensors


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
    """Which model an original-layout folder holds: the A14B has expert folders (T2V or I2V, as their config.json
    says), TI2V-5B top-level shards."""
    root = Path(root).expanduser()
    if (root / "high_noise_model").is_dir():
        return dit_family(root / "high_noise_model" / "config.json") or "t2v_a14b"
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
    check_family(ckpt)
    return ckpt


def dit_family(config_file: Path) -> str | None:
    """The family a DiT's config.json describes (original `model_type` or diffusers `in_channels`), if readable."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    by_type = {v: k for k, v in DIT_MODEL_TYPES.items()}
    by_channels = {v: k for k, v in DIT_IN_CHANNELS.items()}
    return by_type.get(config.get("model_type")) or by_channels.get(config.get("in_channels") or config.get("in_dim"))


def check_family(ckpt: Checkpoint) -> None:
    """A text-to-video checkpoint given to an image-to-video model (or the reverse) is named before loading."""
    found = dit_family(ckpt.dit_dirs()[0] / "config.json")
    if found is None or found == ckpt.family:
        return
    preset = {"t2v_a14b": "wan22_t2v_a14b", "i2v_a14b": "wan22_i2v_a14b", "ti2v_5b": "wan22_ti2v_5b"}[found]
    raise WanOptError(f"The checkpoint at {ckpt.root} holds {MODEL_NAMES[found]}, not the {MODEL_NAMES[ckpt.family]} "
                      f"this model runs: pass model={preset}, or point model.ckpt_dir at {MODEL_NAMES[ckpt.family]}.")

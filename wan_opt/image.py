"""The conditioning image of image-to-video: read, checked, made 8-bit RGB and fitted to the video, before loading.

Reading takes PNG, JPEG and WebP. What the models cannot take is converted and the sidecar says so: the EXIF
orientation applied, grayscale, palette and CMYK made RGB, 16-bit channels reduced to 8, transparent pixels
flattened onto white, the first frame of an animation. A missing, unreadable, truncated or non-image file, an
image of more than MAX_PIXELS (a decompression bomb) and an aspect ratio beyond MAX_ASPECT are one sentence.

Fitting follows the Wan team's code: with an image, `size=` is an area, and the video keeps the image's aspect
ratio on the model's pixel grid.
  area  (I2V-A14B, wan/image2video.py): each side the largest grid multiple under sqrt(area * its ratio); the
        image is resized to exactly that (a stretch of under one grid step).
  crop  (TI2V-5B, wan/textimage2video.py, best_output_size): the grid size of at most `area` whose ratio is
        nearest the image's; the image is scaled to cover it and centre-cropped.
Resizing is Lanczos, as diffusers' WanImageToVideoPipeline and the Wan team's TI2V do, so that handing the
fitted image to diffusers at the fitted size gives the same pixels wan-opt denoises from.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wan_opt.errors import WanOptError
from wan_opt.request import ROPE_POSITIONS

FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP"}  # MPO: a camera's JPEG with extra frames
MAX_PIXELS = 8192 * 8192  # 67 megapixels: any camera's photo, far from PIL's own 179 MP bomb limit
MAX_ASPECT = 4.0  # 4:1 either way; Wan 2.2 is trained at 16:9 and 9:16
BACKGROUND = (255, 255, 255)  # what transparent pixels are flattened onto
RESAMPLING = "Lanczos"


@dataclass(frozen=True)
class ImageUse:
    """What a model family does with an image."""

    needs: str  # "required" (image-to-video only) | "optional" (text or image)
    fit: str  # "area" | "crop"
    last_frame: bool  # whether a last frame can be given too (diffusers' WanImageToVideoPipeline last_image)
    whole_video: bool  # the VAE encodes a whole video (the image, then zeros) rather than the image alone


# Families not listed make video from text alone. TI2V-5B conditions on the first latent frame only: diffusers'
# image path for it (expand_timesteps) has no place for a last frame.
IMAGE_USE = {
    "i2v_a14b": ImageUse("required", "area", True, True),
    "tiny_i2v": ImageUse("required", "area", True, True),
    "ti2v_5b": ImageUse("optional", "crop", False, False),
    "tiny_ti2v": ImageUse("optional", "crop", False, False),
}
I2V_PRESETS = "model=wan22_i2v_a14b (or model=wan22_ti2v_5b, which takes text or an image)"


@dataclass(frozen=True)
class SourceImage:
    """An image as read: 8-bit RGB, upright, and what was done to make it so."""

    image: Image.Image
    record: dict  # path, sha256, bytes, format, width, height, mode, converted


@dataclass(frozen=True)
class ConditionImages:
    """The fitted first (and last) frame of a request, and the sidecar's record of each."""

    image: Image.Image
    last_image: Image.Image | None = None
    record: dict = field(default_factory=dict)

    def call_kwargs(self) -> dict:
        """The pipeline call's image arguments (diffusers' names)."""
        return {"image": self.image, "last_image": self.last_image}


# -- reading ---------------------------------------------------------------------------------------------


def read_image(path: str | Path, key: str = "image") -> SourceImage:
    """Open, check and fully decode `path` (`key` names the setting in messages) as 8-bit RGB."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WanOptError(f"{key}={path} does not exist: pass the path of a PNG, JPEG or WebP image.")
    if not path.is_file():
        raise WanOptError(f"{key}={path} is not a file: pass the path of a PNG, JPEG or WebP image.")
    try:
        digest = file_digest(path)
    except OSError as error:
        raise WanOptError(f"{key}={path} cannot be read ({error.strerror or error}): check its permissions.") from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # our own limit below is the lower one
        try:
            with Image.open(path) as opened:
                return _decoded(opened, path, key, digest)
        except UnidentifiedImageError:
            raise WanOptError(f"{key}={path} is not an image (PNG, JPEG or WebP): pass an image file.") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_large(path, key, None) from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:  # PIL's decoders raise these for bad data
            raise WanOptError(f"{key}={path} is truncated or corrupt ({_first_line(error)}): pass a complete "
                              f"image file.") from None


def file_digest(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, bytes) of a file, read a megabyte at a time."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _decoded(opened: Image.Image, path: Path, key: str, digest: tuple[str, int]) -> SourceImage:
    if opened.format not in FORMATS:
        raise WanOptError(f"{key}={path} is a {opened.format} image: wan-opt reads PNG, JPEG and WebP, so save it "
                          f"as one of those.")
    if opened.width * opened.height > MAX_PIXELS:  # from the header alone: nothing decoded yet
        raise _too_large(path, key, opened.size)
    converted = []
    frames = getattr(opened, "n_frames", 1)
    if frames > 1:
        converted.append(f"the first of its {frames} frames")
    wide = any(";16" in str(tile[3]) for tile in opened.tile)  # 16-bit channels (the raw mode), read as their high byte
    opened.load()  # decodes everything: a truncated file fails here, before any model loads
    image = _upright(opened, converted)
    image = _rgb(image, converted, wide)
    record = {"path": str(path.resolve()), "sha256": digest[0], "bytes": digest[1],
              "format": FORMATS[opened.format], "width": image.width, "height": image.height,
              "mode": opened.mode, "converted": converted}
    return SourceImage(image, record)


def _too_large(path: Path, key: str, size: tuple[int, int] | None) -> WanOptError:
    pixels = f"{size[0]}*{size[1]} " if size else ""
    return WanOptError(f"{key}={path} is a {pixels}image of more than {MAX_PIXELS // 10**6} megapixels (or claims to "
                       f"be): scale it down first, the video is made at 1280*720 or less.")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _upright(image: Image.Image, converted: list[str]) -> Image.Image:
    """The image as a camera meant it to be seen: its EXIF orientation applied."""
    orientation = image.getexif().get(0x0112, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        converted.append(f"turned upright by its EXIF orientation ({orientation})")
        return ImageOps.exif_transpose(image)
    return image


def as_rgb(image: Image.Image, converted: list[str] | None = None) -> Image.Image:
    """`image` (any PIL image) as 8-bit RGB, each conversion said in `converted`."""
    return _rgb(image, [] if converted is None else converted, False)


def _rgb(image: Image.Image, converted: list[str], wide: bool) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: scaled into 8 bits (PIL's own conversion would clip everything above 255 to white)
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or wide else 255.0
        image = Image.fromarray(np.clip(np.round(values * 255.0 / top), 0, 255).astype(np.uint8))
        converted.append("16-bit grayscale scaled to 8 bits and made RGB")
        return image.convert("RGB")
    if wide:
        converted.append("16-bit channels reduced to 8 bits")
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
        converted.append("palette colours expanded")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            flat = Image.new("RGBA", image.size, (*BACKGROUND, 255))
            flat.alpha_composite(image)
            converted.append(f"transparent pixels flattened onto white ({int((alpha < 255).sum())} pixels)")
            return flat.convert("RGB")
        converted.append("its opaque alpha channel dropped")
        return image.convert("RGB")
    if mode in ("L", "1"):
        converted.append("grayscale made RGB" if mode == "L" else "1-bit black and white made RGB")
        return image.convert("RGB")
    if mode == "CMYK":
        converted.append("CMYK converted to RGB (without colour management)")
        return image.convert("RGB")
    if mode == "YCbCr":
        return image.convert("RGB")
    if mode != "RGB":
        raise WanOptError(f"The image's pixel mode {mode} is not one wan-opt converts: save it as 8-bit RGB.")
    return image


# -- fitting ---------------------------------------------------------------------------------------------


def area_size(width: int, height: int, area: int, grid: int) -> tuple[int, int]:
    """I2V-A14B's rule: each side the largest multiple of `grid` under sqrt(area * that side's share of the ratio)."""
    return (grid * int(math.sqrt(area * width / height) // grid), grid * int(math.sqrt(area * height / width) // grid))


def crop_size(width: int, height: int, area: int, grid: int) -> tuple[int, int]:
    """TI2V-5B's rule: of the two grid sizes within `area` (width rounded down first, or height first), the one
    whose aspect ratio is nearest the image's; the height-first one on a tie."""
    ratio = width / height
    ideal_w = math.sqrt(area * ratio)
    ideal_h = area / ideal_w
    w1 = int(ideal_w // grid * grid)
    by_width = (w1, int(area / w1 // grid * grid)) if w1 else (0, 0)
    h2 = int(ideal_h // grid * grid)
    by_height = (int(area / h2 // grid * grid), h2) if h2 else (0, 0)

    def off(size: tuple[int, int]) -> float:
        return max(ratio / (size[0] / size[1]), (size[0] / size[1]) / ratio) if min(size) else math.inf

    return by_width if off(by_width) < off(by_height) else by_height


def fitted_size(width: int, height: int, area: int, grid: int, rule: str, key: str = "image") -> tuple[int, int]:
    """The video size for an image of `width`*`height` under `rule`; an aspect ratio that cannot fit is refused."""
    if max(width / height, height / width) > MAX_ASPECT:
        shape = f"{width / height:.2f}:1" if width >= height else f"1:{height / width:.2f}"
        raise WanOptError(f"The {key} is {width}*{height} ({shape}), too elongated to fit the {grid}-pixel grid "
                          f"(up to {MAX_ASPECT:g}:1 either way): crop it to a less extreme shape.")
    size = (area_size if rule == "area" else crop_size)(width, height, area, grid)
    if min(size) < grid or max(size) > ROPE_POSITIONS * grid:
        raise WanOptError(f"A {width}*{height} {key} fitted into an area of {area} pixels is {size[0]}*{size[1]}, "
                          f"which the {grid}-pixel grid cannot hold: ask for an area that suits its shape, "
                          f"e.g. size=1280*720.")
    return size


def fit(image: Image.Image, size: tuple[int, int], rule: str) -> tuple[Image.Image, dict]:
    """`image` at exactly `size`: resized (rule "area"), or scaled to cover and centre-cropped (rule "crop")."""
    width, height = size
    record = {"rule": rule, "from": [image.width, image.height], "to": [width, height], "resampling": RESAMPLING}
    if rule == "area":
        return image.resize((width, height), Image.Resampling.LANCZOS), record
    scale = max(width / image.width, height / image.height)
    cover = (round(image.width * scale), round(image.height * scale))
    scaled = image.resize(cover, Image.Resampling.LANCZOS)
    left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
    record.update(scaled_to=list(cover), crop=[left, top, left + width, top + height])
    return scaled.crop((left, top, left + width, top + height)), record


def last_frame_fit(image: Image.Image, size: tuple[int, int], rule: str) -> tuple[Image.Image, dict]:
    """The last frame at the first frame's video size: by the same rule when its shape matches (within a grid
    step's rounding), else scaled to cover and centre-cropped rather than stretched."""
    same_shape = abs(math.log((image.width / image.height) / (size[0] / size[1]))) < 0.03
    return fit(image, size, rule if same_shape else "crop")


# -- the request -------------------------------------------------------------------------------------------


def image_use(family: str) -> ImageUse | None:
    return IMAGE_USE.get(str(family))


def check_image_knobs(model, image: str | None, last_image: str | None, required: bool) -> ImageUse | None:
    """An image given to a text-only model, none to an image-to-video one, or a last frame a model cannot take."""
    use = image_use(model.family)
    if (image or last_image) and use is None:
        given = "image=" if image else "last_image="
        raise WanOptError(f"model={model.name} makes video from text alone and takes no {given}: drop it, or pass "
                          f"{I2V_PRESETS}.")
    if last_image and not use.last_frame:
        raise WanOptError(f"model={model.name} takes a first frame only (its image path has no last frame): drop "
                          f"last_image=, or pass model=wan22_i2v_a14b for first-and-last-frame video.")
    if last_image and not image:
        raise WanOptError("last_image= is the video's last frame and needs its first: pass image=PATH too.")
    if required and use is not None and use.needs == "required" and not image:
        raise WanOptError(f"model={model.name} animates an image: pass image=PATH (a PNG, JPEG or WebP), whose "
                          f"aspect ratio the video keeps.")
    return use


def condition_request(cfg, request, required: bool = True):
    """The request with its image read, checked and fitted: (request at the fitted size, ConditionImages), or
    (request, None) without an image. `required`: whether an image-to-video model must have its image now (not
    for a memory plan, nor for loading through the Python API, where images come per call)."""
    model = cfg.model
    use = check_image_knobs(model, cfg.image, cfg.last_image, required)
    if not cfg.image:
        return request, None
    if cfg.last_image and request.frames < 5:
        raise WanOptError(f"last_image= is the last of the video's frames and frames={request.frames} leaves none "
                          f"between it and the first: pass frames=5 or more.")
    source = read_image(cfg.image, "image")
    area = request.width * request.height
    size = fitted_size(source.image.width, source.image.height, area, model.pixel_grid, use.fit)
    first, how = fit(source.image, size, use.fit)
    record = {"image": {**source.record, "fit": {**how, "area": f"{request.width}*{request.height}"}}}
    last = None
    if cfg.last_image:
        last_source = read_image(cfg.last_image, "last_image")
        last, last_how = last_frame_fit(last_source.image, size, use.fit)
        record["last_image"] = {**last_source.record, "fit": last_how}
    fitted = replace(request, width=size[0], height=size[1], image=str(cfg.image), last_image=cfg.last_image)
    return fitted, ConditionImages(first, last, record)


def api_image(image, key: str = "image") -> Image.Image:
    """A pipeline call's image argument (a path or a PIL image) as 8-bit RGB; tensors pass through as diffusers
    takes them."""
    if isinstance(image, (str, Path)):
        return read_image(image, key).image
    if isinstance(image, Image.Image):
        return as_rgb(image) if image.mode != "RGB" else image
    return image


def sample_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture with structure at every scale (gradients, a grid, noise), for benchmarks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 127 * np.sin(x / max(width, 1) * 6.28 * 3)
    g = 255 * y / max(height - 1, 1)
    b = 255 * (((x // 32) + (y // 32)) % 2)
    pixels = np.stack([r, g, b], -1) * 0.8 + rng.uniform(0, 51, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

"""The conditioning image: read and checked before anything loads, converted where the models cannot take it
(and the sidecar told), fitted to the video by the Wan team's two rules."""
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from wan_opt.errors import WanOptError
from wan_opt.image import (MAX_PIXELS, area_size, crop_size, fit, fitted_size, last_frame_fit, read_image,
                           sample_picture)
from wan_opt.prepare import compose_config, prepare


def picture(path, size=(120, 80), mode="RGB", **save):
    image = sample_picture(*size).convert(mode) if mode != "RGB" else sample_picture(*size)
    image.save(path, **save)
    return path


def png16(path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL writes 16-bit grayscale only): color_type 0 gray, 2 RGB."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


# -- fitting: the Wan team's arithmetic, checked on sizes worked out by hand ---------------------------------

@pytest.mark.parametrize("image, area, expected", [
    ((1280, 720), 1280 * 720, (1280, 720)),    # a 16:9 image at its own area stays as it is
    ((1920, 1080), 1280 * 720, (1280, 720)),
    ((720, 1280), 832 * 480, (464, 832)),      # sqrt(399360 * 9/16) = 474.0 -> 464; sqrt(399360 * 16/9) = 842.6 -> 832
    ((1000, 1000), 1280 * 720, (960, 960)),    # sqrt(921600) = 960 each way
    ((4000, 3000), 832 * 480, (720, 544)),     # sqrt(399360 * 4/3) = 729.7 -> 720; sqrt(399360 * 3/4) = 547.3 -> 544
])
def test_the_a14b_rule_keeps_the_aspect_ratio_on_the_16_pixel_grid(image, area, expected):
    width, height = area_size(*image, area, 16)
    assert (width, height) == expected
    assert width % 16 == 0 and height % 16 == 0 and width * height <= area


@pytest.mark.parametrize("image, expected", [
    ((1280, 704), (1280, 704)),
    ((1280, 720), (1248, 704)),   # width first: 1248 * 704 (ratio 1.773); height first 1280 * 704 (1.818): nearer 1.778
    ((1024, 1024), (960, 928)),   # a tie between 928 * 960 and 960 * 928: the height-first one
    ((704, 1280), (704, 1280)),
])
def test_the_ti2v_rule_picks_the_nearest_ratio_on_the_32_pixel_grid(image, expected):
    assert crop_size(*image, 1280 * 704, 32) == expected


def test_the_crop_rule_covers_then_centre_crops():
    source = sample_picture(300, 100)
    fitted, record = fit(source, (96, 64), "crop")
    assert fitted.size == (96, 64)
    assert record["scaled_to"] == [192, 64] and record["crop"] == [48, 0, 144, 64]
    expected = source.resize((192, 64), Image.Resampling.LANCZOS).crop((48, 0, 144, 64))
    assert np.array_equal(np.asarray(fitted), np.asarray(expected))


def test_the_area_rule_resizes_as_diffusers_would():
    source = sample_picture(300, 100)
    fitted, record = fit(source, (160, 48), "area")
    assert np.array_equal(np.asarray(fitted), np.asarray(source.resize((160, 48), Image.Resampling.LANCZOS)))
    assert record == {"rule": "area", "from": [300, 100], "to": [160, 48], "resampling": "Lanczos"}


def test_a_last_frame_of_another_shape_is_cropped_not_stretched():
    _, same = last_frame_fit(sample_picture(240, 160), (96, 64), "area")
    _, other = last_frame_fit(sample_picture(100, 100), (96, 64), "area")
    assert same["rule"] == "area" and other["rule"] == "crop"


@pytest.mark.parametrize("size, says", [
    ((5000, 1000), "5000*1000 (5.00:1), too elongated"),
    ((100, 500), "100*500 (1:5.00), too elongated"),
])
def test_an_extreme_aspect_ratio_is_refused(size, says):
    with pytest.raises(WanOptError, match=re.escape(says)):
        fitted_size(*size, 1280 * 720, 16, "area")


def test_an_area_too_small_for_the_shape_is_refused():
    with pytest.raises(WanOptError, match="which the 16-pixel grid cannot hold"):
        fitted_size(400, 100, 32 * 16, 16, "area")


# -- reading --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, save", [(".png", {}), (".jpg", {"quality": 95}), (".webp", {"lossless": True})])
def test_png_jpeg_and_webp_are_read_and_recorded(tmp_path, suffix, save):
    path = picture(tmp_path / f"cat{suffix}", **save)
    source = read_image(path)
    assert source.image.mode == "RGB" and source.image.size == (120, 80)
    record = source.record
    assert record["format"] == {".png": "PNG", ".jpg": "JPEG", ".webp": "WebP"}[suffix]
    assert record["width"] == 120 and record["height"] == 80 and record["converted"] == []
    assert record["bytes"] == path.stat().st_size and re.fullmatch(r"[0-9a-f]{64}", record["sha256"])


@pytest.mark.parametrize("mode, says", [
    ("L", "grayscale made RGB"),
    ("P", "palette colours expanded"),
    ("CMYK", "CMYK converted to RGB"),
    ("1", "1-bit black and white made RGB"),
])
def test_other_pixel_modes_are_converted_and_said(tmp_path, mode, says):
    path = picture(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"), mode=mode)
    source = read_image(path)
    assert source.image.mode == "RGB" and says in " ".join(source.record["converted"])


def test_transparent_pixels_are_flattened_onto_white(tmp_path):
    image = Image.new("RGBA", (8, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 255, 0))  # invisible blue
    image.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    image.save(tmp_path / "a.png")
    source = read_image(tmp_path / "a.png")
    pixels = np.asarray(source.image)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 2]) == (255, 0, 0)
    assert abs(int(pixels[0, 1, 0]) - 127) <= 1
    assert source.record["converted"] == ["transparent pixels flattened onto white (2 pixels)"]


def test_an_opaque_alpha_channel_is_dropped(tmp_path):
    Image.new("RGBA", (8, 4), (10, 20, 30, 255)).save(tmp_path / "a.png")
    source = read_image(tmp_path / "a.png")
    assert tuple(np.asarray(source.image)[0, 0]) == (10, 20, 30)
    assert source.record["converted"] == ["its opaque alpha channel dropped"]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    gray = np.full((4, 6), 32768, dtype=np.uint16)  # mid-gray in 16 bits; PIL's own conversion would make it white
    png16(tmp_path / "g.png", gray, 0)
    source = read_image(tmp_path / "g.png")
    assert tuple(np.asarray(source.image)[0, 0]) == (128, 128, 128)
    assert source.record["converted"] == ["16-bit grayscale scaled to 8 bits and made RGB"]
    rgb = np.stack([np.full((4, 6), v, dtype=np.uint16) for v in (65535, 32768, 0)], -1)
    png16(tmp_path / "c.png", rgb, 2)
    source = read_image(tmp_path / "c.png")
    assert tuple(np.asarray(source.image)[0, 0]) == (255, 128, 0)
    assert source.record["converted"] == ["16-bit channels reduced to 8 bits"]


def test_an_exif_rotation_is_applied(tmp_path):
    image = sample_picture(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    source = read_image(tmp_path / "phone.jpg")
    assert source.image.size == (80, 120)
    assert source.record["converted"] == ["turned upright by its EXIF orientation (6)"]


def test_an_animation_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], lossless=True)
    source = read_image(tmp_path / "a.webp")
    assert tuple(np.asarray(source.image)[0, 0]) == (255, 0, 0)
    assert source.record["converted"] == ["the first of its 2 frames"]


def bomb(path):
    """A PNG whose header claims 20000 x 20000 pixels (400 megapixels) in a few hundred bytes."""
    rows = zlib.compress(b"\0" * (1 + 20000) * 16)
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def truncated(path):
    picture(path, size=(400, 300), quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("make, says", [
    (lambda p: p / "missing.png", "does not exist: pass the path of a PNG, JPEG or WebP image."),
    (lambda p: p, "is not a file"),
    (lambda p: (p / "notes.png").write_text("not an image") and p / "notes.png", "is not an image (PNG, JPEG or WebP)"),
    (lambda p: truncated(p / "half.jpg"), "is truncated or corrupt"),
    (lambda p: bomb(p / "bomb.png"), f"of more than {MAX_PIXELS // 10**6} megapixels"),
    (lambda p: picture(p / "x.gif") and p / "x.gif", "is a GIF image: wan-opt reads PNG, JPEG and WebP"),
    (lambda p: picture(p / "x.bmp") and p / "x.bmp", "is a BMP image"),
])
def test_a_file_that_is_no_usable_image_is_one_sentence(tmp_path, make, says):
    with pytest.raises(WanOptError, match=re.escape(says)):
        read_image(make(tmp_path))


# -- before loading: the request's checks ------------------------------------------------------------------

@pytest.mark.parametrize("overrides, says", [
    (["model=tiny", "image={card}"], "model=tiny makes video from text alone and takes no image="),
    (["model=wan22_t2v_a14b", "image={card}"], "model=wan22_t2v_a14b makes video from text alone"),
    (["model=tiny_i2v"], "model=tiny_i2v animates an image: pass image=PATH"),
    (["model=wan22_i2v_a14b"], "model=wan22_i2v_a14b animates an image"),
    (["model=tiny_i2v", "last_image={card}"], "last_image= is the video's last frame and needs its first"),
    (["model=wan22_ti2v_5b", "image={card}", "last_image={card}"], "takes a first frame only"),
    (["model=tiny_i2v", "image={missing}"], "does not exist"),
    (["model=tiny_i2v", "image={card}", "last_image={missing}"], "last_image="),
    (["model=tiny_i2v", "image={wide}"], "too elongated"),
    (["model=tiny_i2v", "image={card}", "last_image={card}", "frames=1"], "pass frames=5 or more"),
    (["model=tiny_i2v", "image={card}", "size=16*16"], "which the 16-pixel grid cannot hold"),
])
def test_image_mistakes_are_one_sentence_before_loading(tmp_path, overrides, says, monkeypatch):
    import wan_opt.loading.components as components

    monkeypatch.setattr(components, "load_components", lambda *a: pytest.fail("loaded before the image was checked"))
    paths = {"card": picture(tmp_path / "card.png"), "missing": tmp_path / "missing.png",
             "wide": picture(tmp_path / "wide.png", size=(500, 50))}
    cfg = compose_config([o.format(**paths) for o in overrides] + ["prompt=a fox"], hardware="cpu")
    with pytest.raises(WanOptError, match=re.escape(says)):
        prepare(cfg)


def test_the_request_takes_the_fitted_size_and_a_plan_needs_no_image(tmp_path):
    card = picture(tmp_path / "card.png", size=(300, 200))
    prepared = prepare(compose_config(["model=tiny_i2v", "prompt=a fox", f"image={card}"], hardware="cpu"))
    request = prepared.request
    assert (request.width, request.height) == area_size(300, 200, 128 * 128, 16) == (144, 96)
    assert request.image == str(card) and prepared.images.image.size == (144, 96)
    assert prepared.images.record["image"]["fit"]["area"] == "128*128"
    assert "vae_encode" in prepared.plan.stages


def test_the_plan_knows_the_vae_encode_and_its_size():
    """The VAE encode's stage: what stays resident (as at the decode), the conditioning video in float32 and in the
    VAE's dtype, and the encoder's working set on a chunk of up to 4 frames at the video's size."""
    from wan_opt.loading.arch import model_sizes
    from wan_opt.memory.plan import DECODE_720P_GIB, DECODE_TILED_GIB, GIB, Mechanisms, Request, predict

    def stages(family, frames_encoded, tiling=False, size=(1280, 720)):
        request = Request(*size, 81, image_frames=frames_encoded)
        return predict(model_sizes(family), request, Mechanisms("resident", "bfloat16", "gpu", tiling),
                       "bfloat16", "float32", 1e9, 1e9).stages

    video = 81 * 1280 * 720 * 3 * 8 / GIB  # 1.67 GiB: float32 twice
    a14b = stages("i2v_a14b", 81)
    assert a14b["vae_encode"] - (a14b["decode"] - DECODE_720P_GIB["float32"]) == pytest.approx(video + 14.0, abs=0.02)
    tiled = stages("i2v_a14b", 81, tiling=True)
    assert tiled["vae_encode"] - (tiled["decode"] - DECODE_TILED_GIB["float32"]) == pytest.approx(video + 1.0, abs=0.02)
    half = stages("i2v_a14b", 81, size=(832, 480))
    assert half["vae_encode"] < a14b["vae_encode"] - 7
    ti2v = stages("ti2v_5b", 1, size=(1280, 704))  # the image alone: a quarter of a 4-frame chunk
    resident = ti2v["decode"] - DECODE_720P_GIB["float32"] * 81 * 1280 * 704 / (81 * 1280 * 720) * 1.5  # 2.2 VAE
    assert ti2v["vae_encode"] - resident == pytest.approx(14.0 * 704 / 720 / 4, abs=0.05)
    assert "vae_encode" not in stages("t2v_a14b", 0)


@pytest.mark.parametrize("model, image, encoded", [
    ("wan22_i2v_a14b", False, True),   # an image-to-video model plans its encode with or without the image
    ("wan22_ti2v_5b", False, False),   # TI2V-5B only when an image is given
    ("wan22_ti2v_5b", True, True),
    ("wan22_t2v_a14b", False, False),
])
def test_plan_true_shows_the_vae_encode_of_image_models(tmp_path, model, image, encoded):
    card = [f"image={picture(tmp_path / 'card.png', size=(1280, 704))}"] if image else []
    cfg = compose_config([f"model={model}", "plan=true", "prompt=x", "hardware.memory.host_ram_gb=512", *card],
                         hardware="h100")
    assert ("vae_encode" in prepare(cfg, loads=False).plan.stages) == encoded

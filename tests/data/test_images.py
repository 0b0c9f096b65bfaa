"""Image preprocessing: mode conversion, LLaVA-1.5 padding, crop, resize, limits, decode failures, and
the tower's own pad colour and normalisation (CLIP's and SigLIP's)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llava_ray.config.model_sources import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, TowerInput
from llava_ray.data.images import (
    WHITE,
    ImageSettings,
    center_crop_square,
    decode_stored_image,
    encode_image,
    fit_aspect,
    normalize_image,
    open_image,
    pad_to_square,
    process_image,
    stored_image_array,
    to_rgb,
)
from llava_ray.utils.skips import Skipped

RED, GREEN, BLUE = (220, 30, 30), (30, 160, 50), (30, 70, 220)
CLIP_MEAN_RGB = (122, 116, 104)  # LLaVA-1.5's pad colour with CLIP (int(mean * 255))
CLIP_64 = TowerInput(size=64, mean=CLIP_MEAN, std=CLIP_STD)
SIGLIP_64 = TowerInput(size=64, mean=SIGLIP_MEAN, std=SIGLIP_STD)


def encoded(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int32)


def colours(image: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(pixel) for pixel in np.asarray(image).reshape(-1, len(image.getbands())).tolist()]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds no image data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


# --- mode conversion ------------------------------------------------------------------------


def test_pad_colour_is_the_towers_mean_as_llava_computes_it() -> None:
    # LLaVA-1.5: tuple(int(x * 255) for x in image_processor.image_mean)
    assert CLIP_64.pad_color == tuple(int(channel * 255) for channel in CLIP_MEAN) == CLIP_MEAN_RGB
    assert SIGLIP_64.pad_color == (127, 127, 127)


def test_rgba_transparency_is_composited_on_the_background() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128)])
    rgb = to_rgb(image, CLIP_MEAN_RGB)
    assert rgb.mode == "RGB"
    transparent, opaque, half = colours(rgb)
    assert transparent == CLIP_MEAN_RGB
    assert opaque == (255, 0, 0)
    assert half == pytest.approx((188, 58, 52), abs=1)  # 50% red over the pad colour


def test_la_and_palette_transparency_use_the_background() -> None:
    grey_alpha = Image.new("LA", (2, 1))
    grey_alpha.putdata([(10, 0), (10, 255)])
    assert colours(to_rgb(grey_alpha, WHITE)) == [WHITE, (10, 10, 10)]

    assert colours(to_rgb(keyed_palette(), CLIP_MEAN_RGB)) == [CLIP_MEAN_RGB, RED]
    # The same through real GIF and PNG files: the colour key survives decoding.
    for image_format in ("GIF", "PNG"):
        decoded = open_image(encoded(keyed_palette(), image_format, transparency=0), max_pixels=100)
        assert colours(to_rgb(decoded, WHITE)) == [WHITE, RED], image_format


def keyed_palette() -> Image.Image:
    """Two pixels: palette index 0 (the transparent colour key) and 1 (red). Made fresh each time:
    Pillow's convert("RGBA") rewrites the palette of the image it converts."""
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, *RED])
    palette.putdata([0, 1])
    palette.info["transparency"] = 0
    return palette


def test_palette_without_transparency_keeps_its_colours() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([*GREEN, *BLUE])
    palette.putdata([0, 1])
    assert colours(to_rgb(palette)) == [GREEN, BLUE]


def test_cmyk_grey_and_bilevel_convert_to_rgb() -> None:
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    jpeg_cmyk = open_image(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100), 1000)
    assert jpeg_cmyk.mode == "CMYK"
    assert to_rgb(jpeg_cmyk).getpixel((4, 4)) == pytest.approx((255, 0, 0), abs=3)


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped() -> None:
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    png = encoded(Image.fromarray(values))
    decoded = open_image(png, max_pixels=100)
    assert decoded.mode.startswith("I")
    assert [red for red, _, _ in colours(to_rgb(decoded))] == [0, 100, 128, 255]
    # Pillow's own convert clips: every value above 255 becomes white.
    assert np.asarray(decoded.convert("L")).ravel().tolist() == [0, 255, 255, 255]


def test_32_bit_integer_mode_is_read_as_16_bit_range() -> None:
    values = np.array([[-5, 0, 257 * 200, 65535, 70000]], dtype=np.int32)
    image = Image.fromarray(values)
    assert image.mode == "I"
    assert [red for red, _, _ in colours(to_rgb(image))] == [0, 0, 200, 255, 255]


# --- aspect: pad, crop, resize --------------------------------------------------------------


def test_pad_centres_a_wide_image_on_the_clip_mean_colour() -> None:
    square = pad_to_square(Image.new("RGB", (41, 20), RED), CLIP_MEAN_RGB)
    assert square.size == (41, 41)
    grid = pixels(square)
    top = (41 - 20) // 2  # LLaVA-1.5 rounds the offset down: 10 rows above, 11 below
    assert (grid[:top] == CLIP_MEAN_RGB).all()
    assert (grid[top : top + 20] == RED).all()
    assert (grid[top + 20 :] == CLIP_MEAN_RGB).all()
    assert len(grid[top + 20 :]) == 11


def test_pad_centres_a_tall_image_horizontally_and_leaves_squares_alone() -> None:
    grid = pixels(pad_to_square(Image.new("RGB", (20, 40), BLUE), CLIP_MEAN_RGB))
    assert grid.shape == (40, 40, 3)
    assert (grid[:, :10] == CLIP_MEAN_RGB).all() and (grid[:, 30:] == CLIP_MEAN_RGB).all()
    assert (grid[:, 10:30] == BLUE).all()
    already = Image.new("RGB", (16, 16), BLUE)
    assert pad_to_square(already, CLIP_MEAN_RGB) is already


def three_stripes(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(GREEN, (width // 3, 0, 2 * width // 3, height))
    image.paste(RED, (2 * width // 3, 0, width, height))
    return image


def test_crop_keeps_the_centre_square() -> None:
    cropped = center_crop_square(three_stripes(60, 20))
    assert cropped.size == (20, 20)
    assert (pixels(cropped) == GREEN).all()
    assert fit_aspect(three_stripes(60, 20), "crop", CLIP_MEAN_RGB).size == (20, 20)


def test_resize_stretches_without_padding_or_cropping() -> None:
    settings = ImageSettings(tower=CLIP_64, aspect="resize", format="png")
    grid = pixels(decode_stored_image(process_image(encoded(three_stripes(60, 20)), settings)))
    assert grid.shape == (64, 64, 3)
    assert (grid[:, :18] == BLUE).all() and (grid[:, 24:40] == GREEN).all() and (grid[:, 46:] == RED).all()


def test_process_pads_then_resizes_exactly_like_llava() -> None:
    source = three_stripes(128, 64)
    settings = ImageSettings(tower=CLIP_64, aspect="pad", format="png")
    stored = decode_stored_image(process_image(encoded(source), settings))
    expected = pad_to_square(source, CLIP_MEAN_RGB).resize((64, 64), Image.Resampling.BICUBIC)
    assert stored.size == (64, 64)
    assert (pixels(stored) == pixels(expected)).all()
    grid = pixels(stored)
    assert (grid[:14] == CLIP_MEAN_RGB).all() and (grid[-14:] == CLIP_MEAN_RGB).all()
    assert (grid[20:44, 2:18] == BLUE).all()


def test_jpeg_storage_is_compact_and_close() -> None:
    source = three_stripes(300, 200)
    settings = ImageSettings(tower=CLIP_64, aspect="pad", format="jpeg", jpeg_quality=95)
    data = process_image(encoded(source), settings)
    assert data[:3] == b"\xff\xd8\xff"
    expected = pad_to_square(source, CLIP_MEAN_RGB).resize((64, 64), Image.Resampling.BICUBIC)
    assert np.abs(pixels(decode_stored_image(data)) - pixels(expected)).mean() < 2.0
    assert encode_image(expected, "jpeg", 95) == data


# --- limits and failures --------------------------------------------------------------------


def test_pixel_limit_is_checked_before_decoding() -> None:
    png = encoded(Image.new("RGB", (100, 100), RED))
    assert open_image(png, max_pixels=10_000).size == (100, 100)
    with pytest.raises(Skipped, match=r"100x100 = 10000 pixels is over data.max_image_pixels=9999") as error:
        open_image(png, max_pixels=9_999)
    assert error.value.reason == "image_too_large"


def test_decompression_bomb_is_a_counted_skip_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = png_header_only(30_000, 30_000)  # 900M pixels declared in a 60-byte file
    # Pillow's own guard (on by default in any process) becomes the same counted skip ...
    with pytest.raises(Skipped, match="could be decompression bomb") as error:
        open_image(bomb, max_pixels=10**12)
    assert error.value.reason == "image_too_large"
    # ... also where it only warns (between 1x and 2x its limit).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with pytest.raises(Skipped, match="could be decompression bomb") as error:
        open_image(encoded(Image.new("RGB", (40, 40))), max_pixels=10**12)
    assert error.value.reason == "image_too_large"
    # Prepare workers turn Pillow's guard off: data.max_image_pixels alone decides, on the header.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(Skipped, match=r"30000x30000 = 900000000 pixels is over") as error:
        open_image(bomb, max_pixels=89_478_485)
    assert error.value.reason == "image_too_large"


@pytest.mark.parametrize(
    ("data", "reason", "message"),
    [
        (b"", "empty_image_file", "the image file is empty"),
        (b"definitely not an image", "corrupt_image", "not a decodable image"),
        (encoded(three_stripes(90, 60), "JPEG")[:400], "truncated_image", "the image file ends early"),
        (encoded(three_stripes(90, 60), "PNG")[:-40], "truncated_image", "the image file ends early"),
    ],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png"],
)
def test_unusable_files_raise_with_their_reason(data: bytes, reason: str, message: str) -> None:
    with pytest.raises(Skipped, match=message) as error:
        open_image(data, max_pixels=10**6)
    assert error.value.reason == reason


def test_corrupt_body_with_a_valid_header_is_corrupt() -> None:
    data = bytearray(encoded(three_stripes(90, 60), "PNG"))
    data[60:90] = bytes(byte ^ 0x55 for byte in data[60:90])
    with pytest.raises(Skipped, match="cannot be decoded") as error:
        open_image(bytes(data), max_pixels=10**6)
    assert error.value.reason == "corrupt_image"


def test_transparency_background_follows_the_aspect() -> None:
    clip_8 = TowerInput(size=8, mean=CLIP_MEAN, std=CLIP_STD)
    assert ImageSettings(tower=clip_8, aspect="pad").background == CLIP_MEAN_RGB
    assert ImageSettings(tower=clip_8, aspect="crop").background == WHITE
    clear = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    stored = decode_stored_image(
        process_image(encoded(clear), ImageSettings(tower=clip_8, aspect="pad", format="png"))
    )
    assert (pixels(stored) == CLIP_MEAN_RGB).all()


# --- the tower's own input: SigLIP is not CLIP ----------------------------------------------


def test_a_siglip_tower_pads_with_its_own_mean_colour_not_clips() -> None:
    """LLaVA-1.5's expand2square with SigLIP's mean (0.5): grey (127, 127, 127) bands, and the same for transparency."""
    source = three_stripes(128, 64)
    for aspect_source in (source, source.convert("RGBA")):
        settings = ImageSettings(tower=SIGLIP_64, aspect="pad", format="png")
        grid = pixels(decode_stored_image(process_image(encoded(aspect_source), settings)))
        assert (grid[:14] == 127).all() and (grid[-14:] == 127).all()
        assert (grid[20:44, 2:18] == BLUE).all()
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    stored = process_image(encoded(clear), ImageSettings(tower=SIGLIP_64, aspect="pad", format="png"))
    assert (pixels(decode_stored_image(stored)) == 127).all()


def test_normalisation_uses_the_towers_mean_and_std() -> None:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 32, 64))  # left half black, right half white
    siglip = normalize_image(image, SIGLIP_64)
    assert siglip.shape == (3, 64, 64) and siglip.dtype == np.float32
    np.testing.assert_allclose(siglip[:, :, :32], -1.0)  # (0 - 0.5) / 0.5
    np.testing.assert_allclose(siglip[:, :, 32:], 1.0)  # (1 - 0.5) / 0.5
    clip = normalize_image(image, CLIP_64)
    expected_white = (1 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(clip[:, 0, 40], expected_white, rtol=1e-6)  # about (1.93, 2.07, 2.15)
    # A stored (prepared) image is read back with the same tower's numbers, at the tower's size.
    np.testing.assert_array_equal(stored_image_array(encoded(image), SIGLIP_64), siglip)
    with pytest.raises(ValueError, match=r"prepared image is 64x64, the vision tower takes 32x32"):
        stored_image_array(encoded(image), TowerInput(size=32, mean=SIGLIP_MEAN, std=SIGLIP_STD))


def test_prepare_takes_a_siglip_towers_settings_from_its_folder(tmp_path) -> None:
    """``prepare``'s settings come from the tower's preprocessor_config.json: SigLIP pads grey, not CLIP-brown."""
    import json

    from transformers import SiglipVisionConfig

    from llava_ray.config import load_config
    from llava_ray.config.presets import TINY_TOKENIZER_DIR
    from llava_ray.conversation.tokenizer import load_tokenizer
    from llava_ray.data.samples import PrepareSettings

    SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
    ).save_pretrained(tmp_path)
    processor = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 64, "width": 64}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    overrides = [f"model.vision_tower={tmp_path}", "model.language_model=unused/lm", "data.image_aspect=pad"]
    config = load_config(None, ["model.preset=tiny", f"model.tokenizer={TINY_TOKENIZER_DIR}", *overrides])
    settings = PrepareSettings.from_config(config, load_tokenizer(config.model))
    assert settings.image.tower == SIGLIP_64
    assert settings.image.background == (127, 127, 127)
    assert settings.image_positions == 16  # SigLIP has no CLS token

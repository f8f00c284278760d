"""Image loading, preprocessing geometry and heatmap mapping (audit/images.py).

Every image is generated here; the expected numbers are computed by hand in the comments.
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models import VGG16_Weights

from audit import images
from audit.errors import ImageError
from audit.images import Geometry, Preprocessing, cam_to_original, load_image

torch.set_num_threads(1)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` pixels, with a tiny IDAT: a decompression bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------ modes
def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), "L").save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (2, 2)
    assert np.asarray(image)[1, 0].tolist() == [200, 200, 200]


def test_gray_with_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "la.png"
    la = np.zeros((1, 2, 2), dtype=np.uint8).reshape(1, 2, 2)
    la[0, 0] = (0, 255)   # opaque black
    la[0, 1] = (0, 0)     # fully transparent black
    Image.fromarray(la, "LA").save(path)
    assert np.asarray(load_image(path))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_rgba_half_transparent_is_blended_with_white(tmp_path):
    path = tmp_path / "rgba.png"
    Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], dtype=np.uint8),
                    "RGBA").save(path)
    pixels = np.asarray(load_image(path))[0]
    assert pixels[0].tolist() == [255, 0, 0]
    assert pixels[1].tolist() == [255, 255, 255]
    assert np.abs(pixels[2].astype(int) - 127).max() <= 1  # black at alpha 128 over white


def test_palette_transparency_shows_white(tmp_path):
    path = tmp_path / "p.png"
    image = Image.new("P", (2, 1))
    image.putpalette([0, 255, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    assert np.asarray(load_image(path))[0].tolist() == [[255, 255, 255], [10, 20, 30]]


def test_palette_with_alpha_mode_pa_is_composited(tmp_path):
    image = Image.new("PA", (1, 1))
    image.putpalette([40, 50, 60] + [0] * 765)
    image.putpixel((0, 0), (0, 0))
    assert np.asarray(load_image(image))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_is_converted_to_rgb(tmp_path):
    path = tmp_path / "cmyk.tiff"
    Image.fromarray(np.array([[[0, 255, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8), "CMYK").save(path)
    assert Image.open(path).mode == "CMYK"
    assert np.asarray(load_image(path))[0].tolist() == [[255, 0, 0], [0, 0, 0]]


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    # 0 -> 0, 25700/257 = 100, 32768/257 = 127.5 -> 128, 65535 -> 255 (clipping would give 255 for all but 0)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 100, 128, 255]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_modes_in_memory_are_scaled(mode):
    image = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).convert(mode) if mode == "I;16" else \
        Image.frombytes("I;16B", (2, 1), np.array([0, 65535], dtype=">u2").tobytes())
    assert image.mode == mode
    assert np.asarray(load_image(image))[0, :, 1].tolist() == [0, 255]


def test_32bit_integer_image_in_8bit_range_keeps_values():
    image = Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32), "I")
    assert np.asarray(load_image(image))[0, :, 2].tolist() == [0, 7, 255]


def test_float_image_in_unit_range_is_scaled(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_one_bit_image_is_black_and_white(tmp_path):
    path = tmp_path / "bw.png"
    image = Image.new("1", (2, 1))
    image.putpixel((1, 0), 1)
    image.save(path)
    assert np.asarray(load_image(path))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_exif_orientation_6_is_turned_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    stored = np.full((40, 80, 3), 255, dtype=np.uint8)   # stored landscape: 80 wide, 40 high
    stored[:10, :10] = (255, 0, 0)                        # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (40, 80)                         # width and height swapped
    pixels = np.asarray(image).astype(int)
    # turning clockwise moves the top-left corner to the top-right
    assert np.abs(pixels[4, 35] - (255, 0, 0)).max() < 40
    assert np.abs(pixels[4, 4] - (255, 255, 255)).max() < 40


def test_result_is_a_new_decoded_image_not_tied_to_the_file(tmp_path):
    path = tmp_path / "a.png"
    original = _noise(5, 4)
    original.save(path)
    image = load_image(path)
    path.unlink()
    assert np.array_equal(np.asarray(image), np.asarray(original))
    assert load_image(original) is not original


def test_one_pixel_image_loads():
    assert load_image(Image.new("RGB", (1, 1), (1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)


def test_very_elongated_image_loads(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("L", (10000, 10), 90).save(path)
    assert load_image(path).size == (10000, 10)


# ------------------------------------------------------------------------------------- bad files
def _reason(path) -> str:
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.path == Path(path)
    assert str(path) in str(info.value)
    return info.value.reason


def test_missing_file_is_reported(tmp_path):
    assert _reason(tmp_path / "nope.png") == "file not found"


def test_directory_is_reported(tmp_path):
    assert _reason(tmp_path) == "is a directory, not an image file"


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert _reason(path) == "file is empty (0 bytes)"


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert _reason(path) == "not an image PIL can read"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_reported(tmp_path, fmt):
    buffer = io.BytesIO()
    _noise(64, 64).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert _reason(path) == "truncated or corrupt image data"


def test_truncated_images_stay_refused_globally(tmp_path):
    from PIL import ImageFile
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 50000, 50000)
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    assert _reason(path) == "image too large: 2,500,000,000 pixels exceeds the 100,000,000 pixel limit"
    assert Image.MAX_IMAGE_PIXELS == limit_before and warnings.filters == filters_before


def test_image_over_max_pixels_is_refused_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    path = _png_header_only(tmp_path / "big.png", 100, 50)  # header only: decoding would fail
    assert _reason(path) == "image too large: 100x50 pixels exceeds the 1,000 pixel limit"


def test_pil_image_over_max_pixels_is_refused(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 99)
    with pytest.raises(ImageError, match=r"image too large: 10x10 pixels exceeds the 99 pixel limit"):
        load_image(Image.new("RGB", (10, 10)))


# ---------------------------------------------------------------------------------- preprocessing
def test_squash_equals_the_classic_notebook_pipeline():
    image = _noise(300, 200)
    classic = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                                  transforms.Normalize(MEAN, STD)])
    tensor, geometry = Preprocessing("squash", 224, mean=MEAN, std=STD).to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 224, 224)
    assert torch.equal(tensor, classic(image))
    assert geometry == Geometry((300, 200), (224, 224), (0.0, 0.0, 300.0, 200.0))
    assert not geometry.crops


@pytest.mark.parametrize("size", [(640, 480), (333, 517), (256, 256)])
def test_weights_mode_equals_torchvision_weights_transforms(size):
    image = _noise(*size, seed=1)
    weights = VGG16_Weights.IMAGENET1K_V1
    prep = Preprocessing.from_weights(weights)
    assert (prep.mode, prep.size, prep.resize, prep.interpolation) == ("weights", 224, 256, "bilinear")
    assert prep.mean == pytest.approx(MEAN) and prep.std == pytest.approx(STD)
    tensor, _ = prep.to_tensor(image)
    assert torch.equal(tensor, weights.transforms()(image))


def test_seen_box_of_centre_crop_is_hand_computed():
    # 640x480 -> shorter side 256: 341x256 (int(256 * 640 / 480) = 341). Crop 224:
    # left = round((341 - 224) / 2) = round(58.5) = 58 (round half to even), top = round(16.0) = 16.
    # Back to the original: x scale 640/341, y scale 480/256 = 1.875.
    _, geometry = Preprocessing("weights", 224, resize=256).to_tensor(Image.new("RGB", (640, 480)))
    assert geometry.original_size == (640, 480) and geometry.input_size == (224, 224)
    assert geometry.seen_box == pytest.approx((58 * 640 / 341, 30.0, 282 * 640 / 341, 450.0))
    assert geometry.crops


def test_seen_box_of_portrait_image_crops_top_and_bottom():
    # 480x640 -> 256x341; left 16, top 58; x scale 1.875, y scale 640/341
    _, geometry = Preprocessing("weights", 224, resize=256).to_tensor(Image.new("RGB", (480, 640)))
    assert geometry.seen_box == pytest.approx((30.0, 58 * 640 / 341, 450.0, 282 * 640 / 341))


def test_crop_the_size_of_the_image_sees_everything():
    _, geometry = Preprocessing("weights", 224, resize=224).to_tensor(Image.new("RGB", (224, 224)))
    assert geometry.seen_box == (0.0, 0.0, 224.0, 224.0) and not geometry.crops


def test_preprocessing_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="resize >= size"):
        Preprocessing("weights", 224, resize=200)
    with pytest.raises(ValueError, match="'squash' or 'weights'"):
        Preprocessing("stretch", 224)
    with pytest.raises(ValueError, match="RGB PIL image"):
        Preprocessing("squash", 8).to_tensor(Image.new("L", (4, 4)))


# ---------------------------------------------------------------------------------------- heatmaps
def test_cam_on_squash_is_a_plain_bilinear_resize():
    lowres = np.random.default_rng(2).random((7, 7)).astype(np.float32)
    geometry = Geometry((90, 60), (224, 224), (0.0, 0.0, 90.0, 60.0))
    heat = cam_to_original(lowres, geometry)
    assert heat.dtype == np.float32 and heat.shape == (60, 90)
    assert np.array_equal(heat, cv2.resize(lowres, (90, 60), interpolation=cv2.INTER_LINEAR))


def test_cam_on_centre_crop_lies_in_the_seen_box_only():
    _, geometry = Preprocessing("weights", 224, resize=256).to_tensor(Image.new("RGB", (640, 480)))
    heat = cam_to_original(np.ones((14, 14), dtype=np.float32), geometry)
    assert heat.shape == (480, 640)
    # seen box (108.86, 30, 529.27, 450) rounds to columns 109..528 and rows 30..449
    rows, cols = np.nonzero(heat)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (30, 449, 109, 528)
    assert np.all(heat[30:450, 109:529] == 1.0)


def test_cam_hot_spot_lands_at_the_matching_place():
    lowres = np.zeros((4, 4), dtype=np.float32)
    lowres[0, 3] = 1.0  # top-right cell of the crop
    _, geometry = Preprocessing("weights", 224, resize=256).to_tensor(Image.new("RGB", (640, 480)))
    heat = cam_to_original(lowres, geometry)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 30 <= y < 30 + 420 / 4 and 529 - 420 / 4 <= x < 529


def test_cam_all_zero_stays_zero_and_values_are_clipped():
    geometry = Geometry((10, 10), (224, 224), (0.0, 0.0, 10.0, 10.0))
    assert not cam_to_original(np.zeros((3, 3)), geometry).any()
    heat = cam_to_original(np.array([[2.0, -1.0], [np.nan, 0.5]]), geometry)
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and not np.isnan(heat).any()


def test_cam_rejects_a_map_that_is_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        cam_to_original(np.zeros((1, 3, 3)), Geometry((4, 4), (4, 4), (0.0, 0.0, 4.0, 4.0)))


def test_preprocessing_is_plain_data_for_reports_and_baselines():
    from dataclasses import asdict
    prep = Preprocessing.from_weights(VGG16_Weights.IMAGENET1K_V1)
    assert asdict(prep) == {"mode": "weights", "size": 224, "resize": 256, "mean": MEAN, "std": STD,
                            "interpolation": "bilinear"}

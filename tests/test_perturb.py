"""The perturbations behind the invariance check: what each one changes, and that nothing else moves."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from audit import perturb
from audit.perturb import PerturbError


def _image(w: int = 32, h: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _box_mask(w: int, h: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_every_spec_transform_is_registered():
    assert set(perturb.TRANSFORMS) == {"occlude", "paste", "hflip", "jpeg", "gaussian_blur", "brightness",
                                       "corruption"}
    assert [n for n, t in perturb.TRANSFORMS.items() if t.geometric] == ["hflip"]


@pytest.mark.parametrize("fill", perturb.FILLS)
def test_occlude_changes_only_the_region(fill):
    img = _image()
    mask = _box_mask(32, 24, (4, 5, 12, 11))
    out = np.asarray(perturb.occlude(img, mask, fill=fill).image)
    src = np.asarray(img)
    assert out.shape == src.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], src[~mask])
    assert not np.array_equal(out[mask], src[mask])


def test_occlude_black_and_mean_fill_values_by_hand():
    pixels = np.full((10, 10, 3), 200, np.uint8)
    pixels[0:2, :] = 10           # far away: outside the 3 px ring of the region below
    mask = _box_mask(10, 10, (4, 6, 6, 8))
    img = Image.fromarray(pixels)
    black = np.asarray(perturb.occlude(img, mask, fill="black").image)
    assert (black[mask] == 0).all()
    mean = np.asarray(perturb.occlude(img, mask, fill="mean").image)
    # the ring (rows 3..10, cols 1..8 minus the region) is all 200: the far rows do not leak in
    assert (mean[mask] == 200).all()


def test_inpaint_hides_a_marker_with_its_surroundings():
    """A saturated patch on a smooth background is replaced by pixels close to the background."""
    yy, xx = np.mgrid[0:64, 0:64]
    background = np.stack([80 + xx, 90 + yy, np.full_like(xx, 120)], axis=-1).astype(np.uint8)
    marked = background.copy()
    marked[2:8, 2:8] = (230, 25, 25)
    mask = _box_mask(64, 64, (2, 2, 8, 8))
    out = np.asarray(perturb.occlude(Image.fromarray(marked), mask).image).astype(int)
    assert np.abs(out[mask] - background[mask].astype(int)).max() <= 12
    assert perturb.DEFAULT_FILL == "inpaint"


def test_noise_fill_is_deterministic_per_seed():
    img, mask = _image(), _box_mask(32, 24, (0, 0, 10, 10))
    a = np.asarray(perturb.occlude(img, mask, fill="noise", seed=3).image)
    b = np.asarray(perturb.occlude(img, mask, fill="noise", seed=3).image)
    c = np.asarray(perturb.occlude(img, mask, fill="noise", seed=4).image)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_occlude_an_empty_region_is_a_clear_error():
    with pytest.raises(PerturbError, match="contains no pixel"):
        perturb.occlude(_image(), np.zeros((24, 32), bool), what="the avoid region")


def test_occlude_unknown_fill_lists_the_fills():
    with pytest.raises(PerturbError, match="inpaint, mean, blur, noise, black"):
        perturb.occlude(_image(), _box_mask(32, 24, (0, 0, 2, 2)), fill="zeros")


def test_occlude_describes_what_was_done():
    applied = perturb.occlude(_image(), _box_mask(32, 24, (0, 0, 2, 2)), what="the avoid region")
    assert applied.describe == "the avoid region is inpainted"
    assert applied.meta["pixels"] == 4 and not applied.geometric


def test_paste_puts_the_patch_at_x_y():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    patch = Image.new("RGB", (3, 2), (255, 0, 0))
    out = np.asarray(perturb.paste(img, patch, (5, 7)).image)
    assert (out[7:9, 5:8] == (255, 0, 0)).all()
    assert out.sum() == 255 * 6          # nothing else changed


def test_paste_composites_transparency():
    img = Image.new("RGB", (4, 4), (0, 0, 200))
    patch = Image.new("RGBA", (2, 1), (255, 255, 255, 0))
    patch.putpixel((0, 0), (255, 255, 255, 255))
    out = np.asarray(perturb.paste(img, patch, (1, 1)).image)
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[1, 2]) == (0, 0, 200)


def test_paste_outside_the_image_names_the_sizes():
    with pytest.raises(PerturbError, match=r"\(3x2\) pasted at \[18, 0\] goes outside the 20x10 image"):
        perturb.paste(Image.new("RGB", (20, 10)), Image.new("RGB", (3, 2)), (18, 0), name="patch")


def test_hflip_mirrors_pixels_and_maps_heat():
    img = _image()
    applied = perturb.hflip(img)
    np.testing.assert_array_equal(np.asarray(applied.image), np.asarray(img)[:, ::-1])
    assert applied.geometric
    heat = np.zeros((24, 32), np.float32)
    heat[3, 1] = 1.0
    assert applied.map_heat(heat)[3, 30] == 1.0


def test_jpeg_equals_pil_round_trip():
    img = _image(64, 64)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(perturb.jpeg(img, 40).image), expected)


@pytest.mark.parametrize("bad", [0, 96, 40.5, True, "40"])
def test_jpeg_quality_out_of_range_is_refused(bad):
    with pytest.raises(PerturbError, match="1..95"):
        perturb.jpeg(_image(), bad)


def test_gaussian_blur_equals_opencv():
    img = _image(40, 30)
    expected = cv2.GaussianBlur(np.asarray(img), (0, 0), 1.5, sigmaY=1.5, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_array_equal(np.asarray(perturb.gaussian_blur(img, 1.5).image), expected)


def test_brightness_equals_pil_enhance():
    img = _image()
    expected = np.asarray(ImageEnhance.Brightness(img).enhance(0.7))
    out = perturb.brightness(img, 0.7)
    np.testing.assert_array_equal(np.asarray(out.image), expected)
    assert out.describe == "the brightness is scaled by 0.7"


def test_corruption_runs_the_imagenet_c_set_deterministically_and_restores_numpy_rng():
    img = _image(64, 64)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = np.asarray(perturb.corruption(img, "gaussian_noise", 2, seed=7).image)
    b = np.asarray(perturb.corruption(img, "gaussian_noise", 2, seed=7).image)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.asarray(img))
    np.testing.assert_array_equal(np.random.get_state()[1], before)   # caller's global RNG untouched
    assert "pkg_resources" not in __import__("sys").modules or __import__("importlib").util.find_spec(
        "pkg_resources") is not None                                    # no stand-in left behind


def test_corruption_matches_the_library_at_the_same_seed():
    imagecorruptions = perturb._imagecorruptions()
    img = _image(64, 64)
    np.random.seed(5)
    expected = imagecorruptions.corrupt(np.asarray(img), corruption_name="shot_noise", severity=3)
    np.testing.assert_array_equal(np.asarray(perturb.corruption(img, "shot_noise", 3, seed=5).image), expected)


def test_unknown_corruption_suggests_names():
    with pytest.raises(PerturbError, match="did you mean: 'gaussian_noise'"):
        perturb.corruption(_image(), "gausian_noise", 2)


def test_corruption_severity_must_be_1_to_5():
    with pytest.raises(PerturbError, match="1..5"):
        perturb.corruption(_image(), "gaussian_noise", 6)


def test_corruption_broken_in_the_installed_library_is_a_clear_error():
    """imagecorruptions 1.1.2's glass_blur calls scikit-image's removed `multichannel=`."""
    try:
        perturb.corruption(_image(64, 64), "glass_blur", 1)
    except PerturbError as exc:
        assert "does not run with the installed imagecorruptions" in str(exc)
        assert "gaussian_noise" in str(exc)

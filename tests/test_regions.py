"""Pins the pixel rule of every region kind, with hand-drawn expected masks on non-square images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from audit.errors import SpecError
from audit.regions import describe, region_mask, region_outline


def grid(rows: list[str]) -> np.ndarray:
    """'#' = inside; one string per image row (y), one character per column (x)."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


# -------------------------------------------------------------------------------------------- boxes

def test_box_selects_columns_by_x_and_rows_by_y_with_exclusive_end():
    # image 7 wide (x) x 4 high (y); box x in [1, 5), y in [2, 3): one row, four columns
    mask = region_mask({"box": [1, 2, 5, 3]}, (7, 4), ".")
    assert mask.shape == (4, 7)
    assert (mask == grid([".......",
                          ".......",
                          ".####..",
                          "......."])).all()


def test_box_covering_the_whole_image_selects_every_pixel():
    assert region_mask({"box": [0, 0, 7, 4]}, (7, 4), ".").all()


def test_fractional_box_takes_pixels_whose_centre_is_inside():
    # x in [0.6, 2.5): centres 0.5 out, 1.5 in, 2.5 out (exclusive); y in [0, 1.5): centre 0.5 in, 1.5 out
    mask = region_mask({"box": [0.6, 0, 2.5, 1.5]}, (5, 3), ".")
    assert (mask == grid([".#...",
                          ".....",
                          "....."])).all()


def test_box_rel_is_fractions_of_width_and_height():
    # 10 wide x 4 high: [0.2, 0.5, 0.6, 1.0] -> x in [2, 6), y in [2, 4)
    mask = region_mask({"box_rel": [0.2, 0.5, 0.6, 1.0]}, (10, 4), ".")
    assert (mask == grid(["..........",
                          "..........",
                          "..####....",
                          "..####...."])).all()


def test_box_rel_with_fractional_pixels_uses_centres():
    # 0.15 * 20 = 3 -> x in [0, 3); 0.15 * 10 = 1.5 -> y in [0, 1.5): row 0 only
    mask = region_mask({"box_rel": [0, 0, 0.15, 0.15]}, (20, 10), ".")
    assert mask.sum() == 3 and mask[0, :3].all()


# ----------------------------------------------------------------------------------------- polygons

def test_triangle_contains_exactly_the_pixel_centres_inside_it():
    # hypotenuse x/5 + y/4 = 1; row y=0 (centre 0.5): x < 4.375 -> centres 0.5..3.5;
    # y=1 (1.5): x < 3.125 -> 0.5..2.5; y=2 (2.5): x < 1.875 -> 0.5, 1.5; y=3 (3.5): x < 0.625 -> 0.5
    mask = region_mask({"polygon": [[0, 0], [5, 0], [0, 4]]}, (6, 5), ".")
    assert (mask == grid(["####..",
                          "###...",
                          "##....",
                          "#.....",
                          "......"])).all()


def test_rectangle_polygon_selects_the_same_pixels_as_the_box():
    for box in ([1, 2, 5, 3], [0.6, 0.2, 3.5, 2.5], [0, 0, 7, 4]):
        x0, y0, x1, y1 = box
        poly = region_mask({"polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}, (7, 4), ".")
        assert (poly == region_mask({"box": box}, (7, 4), ".")).all(), box


def test_polygons_sharing_an_edge_never_both_claim_a_pixel():
    # the diagonal x = y passes through centres (0.5, 0.5), (1.5, 1.5), ...: exactly one side gets them
    lower = region_mask({"polygon": [[0, 0], [4, 4], [0, 4]]}, (4, 4), ".")
    upper = region_mask({"polygon": [[0, 0], [4, 0], [4, 4]]}, (4, 4), ".")
    assert not (lower & upper).any()
    assert (lower | upper).all()


def test_polygon_on_a_non_square_image_keeps_x_and_y_apart():
    # thin horizontal triangle in a 8 wide x 3 high image: only row 1 (centre y=1.5) is inside
    mask = region_mask({"polygon": [[0, 1], [8, 1.5], [0, 2]]}, (8, 3), ".")
    assert mask[1].sum() > 0 and mask[0].sum() == 0 and mask[2].sum() == 0


# --------------------------------------------------------------------------------------------- masks

def test_mask_file_non_zero_pixels_are_inside(tmp_path):
    pixels = np.zeros((3, 5), dtype=np.uint8)  # 5 wide x 3 high
    pixels[0, 4] = 255
    pixels[2, 1] = 1
    Image.fromarray(pixels).save(tmp_path / "m.png")
    mask = region_mask({"mask": "m.png"}, (5, 3), tmp_path)
    assert (mask == grid(["....#",
                          ".....",
                          ".#..."])).all()


def test_rgba_mask_counts_any_non_zero_channel(tmp_path):
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[1, 2, 3] = 255  # only alpha set
    Image.fromarray(pixels, "RGBA").save(tmp_path / "m.png")
    assert (region_mask({"mask": "m.png"}, (3, 2), tmp_path) == grid(["...", "..#"])).all()


def test_mask_of_wrong_size_names_both_sizes(tmp_path):
    Image.fromarray(np.full((3, 5), 255, np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(SpecError, match=r"mask m\.png is 5x3 but the image is 3x5"):
        region_mask({"mask": "m.png"}, (3, 5), tmp_path)


def test_missing_mask_file_says_where_it_looked(tmp_path):
    with pytest.raises(SpecError, match=r"mask file nope\.png not found") as info:
        region_mask({"mask": "nope.png"}, (3, 5), tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unreadable_mask_file_is_a_spec_error(tmp_path):
    (tmp_path / "m.png").write_bytes(b"not a png at all")
    with pytest.raises(SpecError, match=r"mask file m\.png cannot be read"):
        region_mask({"mask": "m.png"}, (3, 5), tmp_path)


def test_all_black_mask_is_an_empty_region(tmp_path):
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(SpecError, match=r"region mask m\.png is empty"):
        region_mask({"mask": "m.png"}, (5, 3), tmp_path)


# --------------------------------------------------------------------------------------------- unions

def test_list_of_regions_is_their_union(tmp_path):
    Image.fromarray(np.eye(3, 6, 3, dtype=np.uint8) * 255).save(tmp_path / "m.png")  # (0,3),(1,4),(2,5)
    region = [{"box": [0, 0, 2, 1]}, {"box_rel": [0, 2 / 3, 1 / 6, 1]}, {"mask": "m.png"}]
    assert (region_mask(region, (6, 3), tmp_path) == grid(["##.#..",
                                                           "....#.",
                                                           "#....#"])).all()


def test_union_rejects_a_bad_part_even_when_the_rest_is_fine():
    with pytest.raises(SpecError, match="goes outside"):
        region_mask([{"box": [0, 0, 2, 2]}, {"box": [0, 0, 9, 2]}], (5, 5), ".")


# --------------------------------------------------------------------------------------------- errors

def test_zero_width_box_is_empty():
    with pytest.raises(SpecError, match=r"^region box \[5, 5, 5, 9\] is empty$"):
        region_mask({"box": [5, 5, 5, 9]}, (224, 224), ".")


def test_box_between_pixel_centres_is_empty():
    with pytest.raises(SpecError, match=r"box \[5.1, 5, 5.4, 9\] is empty"):
        region_mask({"box": [5.1, 5, 5.4, 9]}, (224, 224), ".")


def test_swapped_box_corners_are_refused():
    with pytest.raises(SpecError, match=r"box \[9, 5, 5, 9\] has its corners swapped"):
        region_mask({"box": [9, 5, 5, 9]}, (224, 224), ".")


@pytest.mark.parametrize("box", [[0, 0, 300, 50], [-1, 0, 10, 10], [250, 250, 260, 260]])
def test_box_partly_or_wholly_outside_the_image_is_refused(box):
    with pytest.raises(SpecError, match=r"goes outside the 224x224 image"):
        region_mask({"box": box}, (224, 224), ".")


def test_outside_message_gives_width_then_height():
    with pytest.raises(SpecError, match=r"^box \[0, 0, 300, 50\] goes outside the 320x40 image"):
        region_mask({"box": [0, 0, 300, 50]}, (320, 40), ".")


def test_box_rel_beyond_one_is_outside():
    with pytest.raises(SpecError, match=r"box_rel \[0, 0, 1.2, 0.5\] goes outside the image"):
        region_mask({"box_rel": [0, 0, 1.2, 0.5]}, (10, 10), ".")


def test_polygon_point_outside_the_image_is_refused():
    with pytest.raises(SpecError, match=r"polygon \(3 points\) goes outside the 10x8 image: point \[11, 2\]"):
        region_mask({"polygon": [[0, 0], [11, 2], [0, 5]]}, (10, 8), ".")


def test_degenerate_polygon_is_empty():
    with pytest.raises(SpecError, match=r"polygon \(3 points\) is empty"):
        region_mask({"polygon": [[0, 0], [5, 0], [9, 0]]}, (10, 8), ".")


def test_unknown_region_kind_suggests_the_closest():
    with pytest.raises(SpecError, match=r"unknown region kind 'boxx'.*did you mean 'box'"):
        region_mask({"boxx": [0, 0, 1, 1]}, (10, 8), ".")


def test_two_kinds_in_one_mapping_are_refused():
    with pytest.raises(SpecError, match="exactly one kind"):
        region_mask({"box": [0, 0, 1, 1], "polygon": [[0, 0], [1, 0], [0, 1]]}, (10, 8), ".")


@pytest.mark.parametrize("box", [[0, 0, 1], ["a", 0, 1, 1], [0, 0, True, 1], [0, 0, float("nan"), 1]])
def test_box_must_be_four_numbers(box):
    with pytest.raises(SpecError, match=r"box \[x0, y0, x1, y1\] must be 4 numbers"):
        region_mask({"box": box}, (10, 8), ".")


def test_empty_region_list_is_refused():
    with pytest.raises(SpecError, match="region list is empty"):
        region_mask([], (10, 8), ".")


def test_spec_errors_carry_no_location():
    with pytest.raises(SpecError) as info:
        region_mask({"box": [5, 5, 5, 9]}, (224, 224), ".")
    assert info.value.path is None and info.value.line is None


# ------------------------------------------------------------------------------------ describe/outline

@pytest.mark.parametrize("region, text", [
    ({"box": [12, 20, 40, 48]}, "box [12, 20, 40, 48]"),
    ({"box": [12.0, 20.5, 40, 48]}, "box [12, 20.5, 40, 48]"),
    ({"box_rel": [0, 0, 0.15, 0.15]}, "box_rel [0, 0, 0.15, 0.15]"),
    ({"polygon": [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0.5]]}, "polygon (5 points)"),
    ({"mask": "m.png"}, "mask m.png"),
    ([{"box": [0, 0, 1, 1]}, {"mask": "m.png"}], "box [0, 0, 1, 1] \u222a mask m.png"),
])
def test_describe_gives_short_text(region, text):
    assert describe(region) == text


def test_describe_never_raises_on_bad_input():
    assert describe({"boxx": [1]}) == "region {boxx: [1]}"
    assert describe(42) == "region 42"


def test_outline_of_box_is_its_corners_on_pixel_edges():
    assert region_outline({"box": [1, 2, 5, 3]}, (7, 4), ".") == [[(1, 2), (5, 2), (5, 3), (1, 3)]]
    assert region_outline({"box_rel": [0, 0, 0.5, 1]}, (8, 4), ".") == [[(0, 0), (4, 0), (4, 4), (0, 4)]]


def test_outline_of_polygon_is_its_points_and_of_mask_its_contour(tmp_path):
    pixels = np.zeros((6, 8), np.uint8)
    pixels[1:4, 2:6] = 255  # x 2..5, y 1..3
    Image.fromarray(pixels).save(tmp_path / "m.png")
    outlines = region_outline([{"polygon": [[0, 0], [5, 0], [0, 4]]}, {"mask": "m.png"}], (8, 6), tmp_path)
    assert outlines[0] == [(0.0, 0.0), (5.0, 0.0), (0.0, 4.0)]
    xs = [p[0] for p in outlines[1]]
    ys = [p[1] for p in outlines[1]]
    assert (min(xs), max(xs), min(ys), max(ys)) == (2.5, 5.5, 1.5, 3.5)


def test_outline_validates_like_the_mask():
    with pytest.raises(SpecError, match="goes outside"):
        region_outline({"box": [0, 0, 300, 50]}, (224, 224), ".")

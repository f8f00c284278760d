"""Golden-set readers: COCO, VOC/ILSVRC, ImageFolder, CSV/JSONL, checked against the drawn truth,
pycocotools' own COCO API and torchvision's ImageFolder."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from audit.errors import SpecError
from audit.regions import region_mask
from audit.sources.readers import (RLEMask, read_coco, read_folder, read_manifest, read_voc, sample,
                                   stable_hash)
from audit.zoo.make_dataset import main as make_dataset_main
from audit.zoo.make_dataset import write_dataset
from audit.zoo.scenes import CLASSES, SEED_RANGES, make_scene

SEED = SEED_RANGES["tests"][0] + 700_000  # scenes no other test draws


def _truth(out: Path) -> dict:
    return json.loads((out / "truth.json").read_text())["images"]


def _region_pixels(region, size=(64, 64)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for part in region:
        mask |= part.array() if isinstance(part, RLEMask) else region_mask(part, size, ".")
    return mask


# ------------------------------------------------------------------------------------- make_dataset

@pytest.mark.parametrize("fmt", ["coco", "voc", "csv", "jsonl"])
def test_every_format_reads_back_one_case_per_image_with_the_drawn_box(tmp_path, fmt):
    target = write_dataset(tmp_path, 14, fmt, first_seed=SEED)
    read = {"coco": lambda: read_coco(target, tmp_path / "images", region="bbox"),
            "voc": lambda: read_voc(target),
            "csv": lambda: read_manifest(target),
            "jsonl": lambda: read_manifest(target)}[fmt]()
    truth = _truth(tmp_path)
    assert len(read.cases) == len(truth) == 14
    for case in read.cases:
        rel = case.image.relative_to(tmp_path).as_posix()
        assert case.label == truth[rel]["label"]
        assert case.region == [{"box": truth[rel]["box"]}]
        assert case.image.is_file()
        scene = make_scene(truth[rel]["seed"], label=CLASSES.index(case.label))
        assert case.region[0]["box"] == list(scene.box)


def test_coco_segmentation_is_the_exact_drawn_mask(tmp_path):
    target = write_dataset(tmp_path, 8, "coco", first_seed=SEED)
    read = read_coco(target, tmp_path / "images")
    truth = _truth(tmp_path)
    for case in read.cases:
        (part,) = case.region
        scene = make_scene(truth[f"images/{case.image.name}"]["seed"], label=CLASSES.index(case.label))
        assert np.array_equal(part.array(), scene.mask)


def test_folder_format_matches_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder
    write_dataset(tmp_path, 13, "folder", first_seed=SEED)
    read = read_folder(tmp_path)
    oracle = ImageFolder(str(tmp_path))
    assert read.categories == tuple(oracle.classes)
    assert [(str(c.image), oracle.class_to_idx[c.label]) for c in read.cases] == oracle.samples
    assert all(c.annotations == {} and c.region is None for c in read.cases)


def test_same_arguments_write_the_same_bytes(tmp_path):
    a = write_dataset(tmp_path / "a", 6, "coco", first_seed=SEED, marker=True)
    b = write_dataset(tmp_path / "b", 6, "coco", first_seed=SEED, marker=True)
    assert a.read_bytes() == b.read_bytes()
    for png in (tmp_path / "a" / "images").iterdir():
        assert png.read_bytes() == (tmp_path / "b" / "images" / png.name).read_bytes()


def test_marker_option_draws_the_class_coded_marker(tmp_path):
    write_dataset(tmp_path, 6, "csv", first_seed=SEED, marker=True)
    truth = _truth(tmp_path)
    for rel, entry in truth.items():
        scene = make_scene(entry["seed"], marker=True, label=CLASSES.index(entry["label"]))
        assert (tmp_path / rel).read_bytes() and entry["marker_box"] == list(scene.marker_box)
        from PIL import Image
        assert np.array_equal(np.asarray(Image.open(tmp_path / rel)), np.asarray(scene.image))


def test_make_dataset_command_writes_a_readable_set(tmp_path, capsys):
    assert make_dataset_main(["--n", "6", "--format", "voc", "--first-seed", str(SEED), str(tmp_path)]) == 0
    assert "wrote 6 scenes (voc)" in capsys.readouterr().out
    assert len(read_voc(tmp_path / "Annotations").cases) == 6


# --------------------------------------------------------------------------------------------- COCO

def _coco(tmp_path: Path, annotations: list[dict], images=None, categories=None) -> Path:
    doc = {"images": images or [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10},
                                {"id": 2, "file_name": "sub/b.png", "width": 20, "height": 10}],
           "annotations": annotations,
           "categories": categories or [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' oracle
def test_coco_region_is_the_union_of_every_instance_of_the_class(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((2, 3), np.uint8), ((6, 2), (15, 2)))))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
         "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [15, 6, 3, 2],
         "segmentation": {"size": [10, 20], "counts": rle["counts"].decode()}},
        # crowd, uncompressed column-major RLE: x=8 and x=9, rows 0..1
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [8, 0, 2, 2], "iscrowd": 1,
         "segmentation": {"size": [10, 20], "counts": [80, 2, 8, 2, 108]}},
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [10, 5, 3, 3]},
    ]
    path = _coco(tmp_path, anns)
    (case,) = [c for c in read_coco(path, tmp_path).cases if c.id == "a"]
    oracle = COCO(str(path))
    expected = np.zeros((10, 20), dtype=bool)
    for ann in oracle.loadAnns(oracle.getAnnIds(imgIds=[1], catIds=[1])):
        expected |= oracle.annToMask(ann).astype(bool)
    got = _region_pixels(case.region, (20, 10))
    assert np.array_equal(got, expected) and got.sum() == 16 + 6 + 4
    assert case.annotations["dog"] == [{"box": [10, 5, 13, 8]}]  # no segmentation: its bbox


def test_coco_bbox_mode_keeps_every_instance_box(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10.5, 2, 3, 2.25]}]
    case = read_coco(_coco(tmp_path, anns), tmp_path, region="bbox").cases[0]
    assert case.region == [{"box": [1, 1, 5, 5]}, {"box": [10.5, 2, 13.5, 4.25]}]


def test_coco_label_is_the_class_with_the_largest_area_and_labels_map_restricts_it(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [5, 0, 4, 4]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 3, 3]}]
    path = _coco(tmp_path, anns)
    read = read_coco(path, tmp_path)
    assert [(c.id, c.label, c.model_labels) for c in read.cases] == [("a", "dog", ("dog",)),
                                                                     ("sub.b", "cat", ("cat",))]
    mapped = read_coco(path, tmp_path, labels_map={"cat": ["tabby", "tiger cat"]})
    assert [(c.id, c.label, c.model_labels) for c in mapped.cases] == [
        ("a", "cat", ("tabby", "tiger cat")), ("sub.b", "cat", ("tabby", "tiger cat"))]
    only_dog = read_coco(path, tmp_path, labels_map={"dog": "dog"})
    assert [c.id for c in only_dog.cases] == ["a"]
    assert only_dog.skipped == ("image 2 (sub/b.png): none of its classes (cat) is in labels_map",)


def test_coco_image_without_annotation_is_listed_as_skipped(tmp_path):
    read = read_coco(_coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]),
                     tmp_path)
    assert [c.id for c in read.cases] == ["a"]
    assert read.skipped == ("image 2 (sub/b.png): no annotation, so no label",)


@pytest.mark.parametrize("ann, message", [
    ({"bbox": [1, 1, -3, 2]}, "annotation 1234: bbox has negative width"),
    ({"bbox": [1, 1, 3, -2]}, "annotation 1234: bbox has negative height"),
    ({"bbox": [1, 1, 0, 2]}, "annotation 1234: bbox [1, 1, 0, 2] is empty (width or height 0)"),
    ({"bbox": [1, 1, 3]}, "annotation 1234: bbox must be 4 numbers [x, y, width, height], got [1, 1, 3]"),
    ({"bbox": [15, 1, 8, 2]}, "annotation 1234: bbox [15, 1, 8, 2] goes outside the 20x10 image"),
    ({"bbox": [1, 1, 3, 2], "category_id": 7}, "annotation 1234: category_id 7 is not in categories"),
    ({"bbox": [1, 1, 3, 2], "segmentation": [[1, 1, 4, 1]]},
     "annotation 1234: segmentation polygon 0 must be a flat list of at least 3 x, y pairs"),
    ({"bbox": [1, 1, 3, 2], "segmentation": [[1, 1, 40, 1, 4, 4]]},
     "annotation 1234: segmentation polygon 0 goes outside the 20x10 image"),
    ({"bbox": [1, 1, 3, 2], "segmentation": {"size": [20, 10], "counts": "abc"}},
     "annotation 1234: segmentation RLE size [20, 10] is not the image's [height, width] [10, 20]"),
    ({"bbox": [1, 1, 3, 2], "segmentation": {"size": [10, 20], "counts": [5, 5]}},
     "annotation 1234: uncompressed RLE counts must be non-negative integers summing to 200"),
])
def test_coco_bad_annotation_is_an_error_of_its_image_case_naming_the_file_and_the_record(tmp_path, ann, message):
    good = {"id": 1, "image_id": 2, "category_id": 2, "bbox": [0, 0, 2, 2]}
    path = _coco(tmp_path, [{"id": 1234, "image_id": 1, "category_id": 1, **ann}, good])
    read = read_coco(path, tmp_path)
    bad, fine = read.cases
    assert (bad.id, fine.id, fine.error, fine.label) == ("a", "sub.b", None, "dog")
    assert isinstance(bad.error, SpecError) and str(bad.error).startswith(f"{path}: {message}")
    assert bad.image == tmp_path / "a.jpg" and bad.annotations == {}
    assert bad.label == ("cat" if "category_id" not in ann else None)


def test_coco_annotation_of_no_image_is_an_error_of_the_file(tmp_path):
    path = _coco(tmp_path, [{"id": 1234, "image_id": 9, "category_id": 1, "bbox": [1, 1, 3, 2]}])
    with pytest.raises(SpecError) as info:
        read_coco(path, tmp_path)
    assert str(info.value).startswith(f"{path}: annotation 1234: image_id 9 is not in images")


def test_coco_bad_image_record_errors_its_case_and_labels_map_still_skips_unaudited_images(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 10},
              {"id": 2, "file_name": "sub/b.png", "width": 20, "height": 10},
              {"id": 3, "file_name": "c.png", "width": 20, "height": 10}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, -2, 2]},   # a dog: not audited below
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [0, 0, 2, 2]}]
    path = _coco(tmp_path, anns, images=images)
    read = read_coco(path, tmp_path, labels_map={"cat": "tabby"})
    assert [(c.id, c.label, c.error is not None) for c in read.cases] == [("a", "cat", True), ("c", "cat", False)]
    assert "image 1: width and height must be positive integers, got 0 x 10" in str(read.cases[0].error)
    assert read.skipped == ("image 2 (sub/b.png): none of its classes (dog) is in labels_map",)


def test_coco_tiny_float_overshoot_is_clipped_to_the_image(tmp_path):
    case = read_coco(_coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [16, 7, 4.4, 3.2]}]),
                     tmp_path).cases[0]
    assert case.region == [{"box": [16, 7, 20, 10]}]


def test_coco_duplicate_file_stems_are_an_error(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10},
              {"id": 2, "file_name": "a.png", "width": 20, "height": 10}]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2]} for i in (1, 2)]
    with pytest.raises(SpecError, match=r"image 2 \(a.png\): case id 'a' \(from the file name\) is used twice"):
        read_coco(_coco(tmp_path, anns, images=images), tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON: line 1 column 2"),
    ("[]", "a COCO instances file is a JSON object"),
    ('{"images": [], "annotations": []}', "has no 'categories' list: not a COCO instances file"),
])
def test_coco_unusable_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "instances.json"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        read_coco(path, tmp_path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_labels_map_with_an_unknown_class_suggests_the_closest(tmp_path):
    path = _coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}])
    with pytest.raises(SpecError, match=r"labels_map: 'cta' is not a class of instances.json; did you mean: 'cat'"):
        read_coco(path, tmp_path, labels_map={"cta": "tabby"})


# ---------------------------------------------------------------------------------------------- VOC

def _voc(folder: Path, name: str, objects: list[tuple[str, tuple]], filename=None, size=(20, 10)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    objs = "".join(f"<object><name>{cls}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for cls, b in objects)
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    path = folder / f"{name}.xml"
    path.write_text(f"<annotation><filename>{filename or name + '.jpg'}</filename>{size_xml}{objs}</annotation>")
    return path


def test_voc_boxes_are_one_based_inclusive_and_instances_are_joined(tmp_path):
    ann = tmp_path / "Annotations"
    _voc(ann, "x1", [("dog", (1, 1, 4, 3)), ("cat", (2, 2, 3, 3)), ("dog", (10, 5, 20, 10))])
    (case,) = read_voc(ann).cases
    assert case.id == "x1" and case.label == "dog"
    assert case.image == tmp_path / "JPEGImages" / "x1.jpg"
    assert case.region == [{"box": [0, 0, 4, 3]}, {"box": [9, 4, 20, 10]}]
    # pixel (0, 0) is VOC's pixel 1: the first box covers pixels 0..3 x 0..2 = 12 pixels
    assert region_mask(case.region[0], (20, 10), ".").sum() == 12
    assert case.annotations["cat"] == [{"box": [1, 1, 3, 3]}]


def test_ilsvrc_file_names_without_suffix_find_the_jpeg(tmp_path):
    ann, images = tmp_path / "val", tmp_path / "images"
    images.mkdir()
    (images / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    _voc(ann, "ILSVRC2012_val_00000001", [("n01751748", (1, 1, 5, 5))], filename="ILSVRC2012_val_00000001")
    (case,) = read_voc(ann, images).cases
    assert case.image == images / "ILSVRC2012_val_00000001.JPEG"
    assert (case.id, case.label) == ("ILSVRC2012_val_00000001", "n01751748")


@pytest.mark.parametrize("box, message", [
    ((0, 1, 4, 4), "object 1 (dog): bndbox xmin 0, ymin 1: VOC boxes are 1-based"),
    ((5, 1, 4, 4), "object 1 (dog): bndbox has its corners swapped"),
    ((1, 1, 21, 4), "object 1 (dog): bndbox xmax 21, ymax 4 goes outside the 20x10 image"),
    ((1, "x", 4, 4), "object 1 (dog): <ymin> must be a number, got 'x'"),
])
def test_voc_bad_object_is_an_error_of_its_case_naming_the_xml_file_and_the_object(tmp_path, box, message):
    path = _voc(tmp_path / "ann", "img7", [("dog", box)], filename="photo7.jpg")
    _voc(tmp_path / "ann", "img8", [("cat", (1, 1, 4, 4))])
    bad, fine = read_voc(tmp_path / "ann").cases
    assert (bad.id, bad.label, bad.image.name, fine.id, fine.error) == ("photo7", "dog", "photo7.jpg", "img8", None)
    assert str(bad.error).startswith(f"{path}: {message}")


def test_voc_malformed_xml_is_one_line_on_its_case(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "bad.xml").write_text("<annotation><filename>")
    _voc(tmp_path / "ann", "good", [("cat", (1, 1, 4, 4))])
    bad, fine = read_voc(tmp_path / "ann").cases
    assert (bad.id, bad.label, fine.error) == ("bad", None, None)
    assert re.match(r".*bad.xml: not well-formed XML: no element found", str(bad.error))
    assert "\n" not in str(bad.error)


# -------------------------------------------------------------------------------------- manifests

def test_csv_rows_of_one_image_join_their_boxes(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("path,label,x0,y0,x1,y1,split\n"
                    "img/a.png,cat,1,2,5,6,val\n"
                    "img/b.png,dog,,,,,val\n"
                    "img/a.png,cat,10,2,12.5,6,val\n")
    read = read_manifest(path)
    assert [(c.id, c.label, c.region) for c in read.cases] == [
        ("img.a", "cat", [{"box": [1, 2, 5, 6]}, {"box": [10, 2, 12.5, 6]}]), ("img.b", "dog", None)]
    assert read.cases[0].image == tmp_path / "img" / "a.png"


@pytest.mark.parametrize("text, message", [
    ("path,lable\na.png,cat\n", "line 1: the header has no 'label' column (did you mean 'lable'?)"),
    ("path,label,x0,y0,x1\na.png,cat,1,2,3\n", "line 1: box columns need all of x0,y0,x1,y1; missing y1"),
    ("path,label\n,cat\n", "line 2: path and label must not be empty"),
])
def test_csv_errors_of_the_file_name_the_line(tmp_path, text, message):
    path = tmp_path / "cases.csv"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        read_manifest(path)
    assert str(info.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("text, bad_id, message", [
    ("path,label,x0,y0,x1,y1\na.png,cat,1,2,3,4\nb.png,dog,5,2,3,4\n", "b",
     "line 3: box [5, 2, 3, 4] is empty or has its corners swapped"),
    ("path,label,x0,y0,x1,y1\na.png,cat,1,2,,4\nb.png,dog,1,2,3,4\n", "a", "line 2: give all of x0,y0,x1,y1 or none"),
    ("path,label\na.png,cat\na.png,dog\nb.png,dog\n", "a", "line 3: a.png is labelled 'dog' here but 'cat' on line 2"),
    ("path,label\na.png,\nb.png,dog\n", "a", "line 2: path and label must not be empty"),
])
def test_csv_bad_row_is_an_error_of_its_image_case_naming_the_line(tmp_path, text, bad_id, message):
    path = tmp_path / "cases.csv"
    path.write_text(text)
    cases = {c.id: c for c in read_manifest(path).cases}
    assert sorted(cases) == ["a", "b"] and sum(c.error is not None for c in cases.values()) == 1
    assert str(cases[bad_id].error).startswith(f"{path}: {message}")


def test_jsonl_bad_row_is_an_error_of_its_image_case(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"path": "a.png", "label": "cat", "box": [3, 3, 1, 1]}\n'
                    '{"path": "b.png", "label": "dog"}\n'
                    '{"path": "c.png", "label": ""}\n')
    a, b, c = read_manifest(path).cases
    assert (a.label, b.error, c.label) == ("cat", None, None)
    assert str(a.error).startswith(f"{path}: line 1: box [3, 3, 1, 1] is empty or has its corners swapped")
    assert str(c.error).startswith(f"{path}: line 3: label must be a non-empty string, got ''")


def test_jsonl_manifest_with_ids_and_several_boxes(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"path": "a.png", "label": "cat", "id": "first", "boxes": [[0, 0, 2, 2], [3, 3, 4, 4]]}\n'
                    "\n"
                    '{"path": "b.png", "label": "dog", "box": [1, 1, 3, 3]}\n')
    read = read_manifest(path, images=tmp_path / "pics")
    assert [(c.id, c.image.name, c.record) for c in read.cases] == [("first", "a.png", "line 1"),
                                                                    ("b", "b.png", "line 3")]
    assert read.cases[0].region == [{"box": [0, 0, 2, 2]}, {"box": [3, 3, 4, 4]}]
    assert read.cases[1].image.parent == tmp_path / "pics"


def test_jsonl_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"path": "a.png", "label": "cat", "bxo": [0, 0, 2, 2]}\n')
    with pytest.raises(SpecError, match=r"line 1: unknown key 'bxo' \(did you mean 'box'\?\)"):
        read_manifest(path)


# ------------------------------------------------------------------------------------------- sample

def test_sample_is_deterministic_in_file_order_and_stable_when_the_set_grows(tmp_path):
    path = tmp_path / "cases.csv"
    rows = [f"img/{i:04d}.png,c{i % 3}" for i in range(300)]
    path.write_text("path,label\n" + "\n".join(rows) + "\n")
    cases = read_manifest(path).cases
    picked = sample(cases, 40)
    assert len(picked) == 40 and picked == sample(cases, 40)
    assert [c.id for c in picked] == sorted(c.id for c in picked)  # file order kept
    assert {c.label for c in picked} == {"c0", "c1", "c2"}
    # a case sampled from the grown set was sampled from the smaller one too: it can only be outranked
    smaller = sample(cases[:200], 40)
    ranked = sorted(cases, key=lambda c: stable_hash(c.id))[:40]
    assert {c.id for c in picked} == {c.id for c in ranked}
    assert {c.id for c in picked if c in cases[:200]} <= {c.id for c in smaller}
    assert sample(cases, None) == cases and sample(cases, 10_000) == cases


def test_case_ids_from_paths_are_node_id_safe(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("path,label\nval/n01/my cat:1.JPEG,cat\nval/n01/x.y.png,cat\n")
    assert [c.id for c in read_manifest(path).cases] == ["val.n01.my_cat_1", "val.n01.x.y"]
    path.write_text("path,label\na/b.png,cat\na.b.jpg,cat\n")
    with pytest.raises(SpecError, match=r"line 3: case id 'a.b' is used twice \(also line 2\)"):
        read_manifest(path)

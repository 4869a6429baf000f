"""preproc/: the format scripts on tiny raw-format fixtures, and the observed-label sampling.

Expected arrays are written out by hand from the fixtures; the observed-label stream is
re-derived here from numpy's RandomState with an explicit loop.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preproc import format_coco, format_cub, format_nuswide, format_pascal, generate_observed_labels
from preproc.generate_observed_labels import generate_observed, partial_tag, simulate_fpc, simulate_rps

REPO = Path(__file__).resolve().parents[1]


def load(folder, phase):
    images = np.load(folder / f"formatted_{phase}_images.npy", allow_pickle=False)
    labels = np.load(folder / f"formatted_{phase}_labels.npy", allow_pickle=False)
    return images, labels


def rows(num_classes, *positives):
    """Label matrix with a 1 at each listed column of each row."""
    matrix = np.zeros((len(positives), num_classes))
    for r, cols in enumerate(positives):
        matrix[r, list(cols)] = 1.0
    return matrix


def assert_cli_error(capsys, main, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def run_format(module, raw, out, *extra):
    assert module.main(["--load-path", str(raw), "--save-path", str(out), *extra]) == 0


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- PASCAL VOC

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]

# phase -> listed image ids (file order) and the labels that are not -1: {(image, class): 0 or 1}
VOC = {
    "train": (["2009_000001", "2008_000010", "2008_000002", "2008_000100", "2008_000003"], {
        ("2009_000001", "dog"): 1, ("2009_000001", "person"): 1,
        ("2008_000010", "aeroplane"): 1,
        ("2008_000002", "tvmonitor"): 1, ("2008_000002", "chair"): 1, ("2008_000002", "sofa"): 0,
        ("2008_000100", "cat"): 0,  # only "difficult": no positive, left out
        ("2008_000003", "person"): 1, ("2008_000003", "bicycle"): 0,
    }),
    "val": (["2010_000005", "2007_000033", "2011_000001"], {
        ("2010_000005", "bird"): 1,
        ("2007_000033", "aeroplane"): 1, ("2007_000033", "tvmonitor"): 1,
        ("2011_000001", "horse"): 0,
    }),
}


@pytest.fixture
def voc_root(tmp_path):
    main = tmp_path / "raw" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for phase, (ids, labels) in VOC.items():
        for name in VOC_CLASSES:
            # VOC writes "<id> -1" with one space and "<id>  1" / "<id>  0" with two.
            lines = [f"{i} -1" if labels.get((i, name), -1) == -1 else f"{i}  {labels[(i, name)]}"
                     for i in ids]
            (main / f"{name}_{phase}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "raw"


def test_format_pascal(voc_root, tmp_path, capsys):
    out = tmp_path / "out"
    run_format(format_pascal, voc_root, out)
    assert "1 without a positive label left out" in capsys.readouterr().out
    images, labels = load(out, "train")
    assert images.dtype.kind == "U"
    assert images.tolist() == ["2008_000002.jpg", "2008_000003.jpg", "2008_000010.jpg", "2009_000001.jpg"]
    # chair 8, tvmonitor 19 | person 14 | aeroplane 0 | dog 11, person 14
    np.testing.assert_array_equal(labels, rows(20, [8, 19], [14], [0], [11, 14]))
    assert labels.dtype == np.float64
    images, labels = load(out, "val")
    assert images.tolist() == ["2007_000033.jpg", "2010_000005.jpg"]
    np.testing.assert_array_equal(labels, rows(20, [0, 19], [2]))
    assert sorted(p.name for p in out.iterdir()) == [
        "formatted_train_images.npy", "formatted_train_labels.npy",
        "formatted_val_images.npy", "formatted_val_labels.npy"]


def test_formatting_again_removes_what_the_new_labels_make_stale(voc_root, tmp_path, capsys):
    """Observed-label files are sampled from the formatted labels: formatting other labels into the
    folder removes them (and an ignore mask this format does not write) and says so; formatting the
    same raw files again keeps them."""
    out = tmp_path / "out"
    run_format(format_pascal, voc_root, out)
    capsys.readouterr()
    derived = ("formatted_train_labels_obs.npy", "formatted_val_labels_obs.npy",
               "formatted_train_labels_obs_rps0.5.npy")
    for name in derived:
        np.save(out / name, np.zeros((1, 20)))
    np.save(out / "formatted_val_ignore.npy", np.zeros((2, 20), dtype=bool))  # e.g. from a VOC2007 run
    run_format(format_pascal, voc_root, out)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"removed 1 file(s) of {out}") and "formatted_val_ignore.npy" in line
    assert all((out / name).is_file() for name in derived)  # same labels: still theirs
    listing = voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "dog_train.txt"
    listing.write_text(listing.read_text().replace("2008_000010 -1", "2008_000010  1"))
    run_format(format_pascal, voc_root, out)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"removed 3 file(s) of {out}") and all(name in line for name in derived)
    assert "generate_observed_labels.py" in line
    assert sorted(p.name for p in out.iterdir()) == [
        "formatted_train_images.npy", "formatted_train_labels.npy",
        "formatted_val_images.npy", "formatted_val_labels.npy"]


def test_format_pascal_runs_as_script(voc_root, tmp_path):
    out = tmp_path / "script-out"
    result = subprocess.run([sys.executable, "preproc/format_pascal.py", "--load-path", str(voc_root),
                             "--save-path", str(out)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert load(out, "val")[0].tolist() == ["2007_000033.jpg", "2010_000005.jpg"]
    result = subprocess.run([sys.executable, "preproc/format_pascal.py", "--load-path",
                             str(tmp_path / "nothing")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "VOCtrainval_11-May-2012.tar" in result.stderr


def test_format_pascal_bad_input(voc_root, tmp_path, capsys):
    argv = ["--load-path", str(voc_root), "--save-path", str(tmp_path / "out")]
    main_dir = voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    assert format_pascal.main(argv) == 0
    capsys.readouterr()
    good = snapshot(tmp_path / "out")

    cow = main_dir / "cow_val.txt"
    cow.write_text("2010_000005 -1\n2007_000033  2\n2011_000001 -1\n")
    assert_cli_error(capsys, format_pascal.main, argv, f"{cow}:2", "not one of [-1, 0, 1]")
    cow.write_text("2010_000005 -1\n2007_000033 -1 extra\n2011_000001 -1\n")
    assert_cli_error(capsys, format_pascal.main, argv, f"{cow}:2", "malformed line")
    cow.write_text("2010_000005 -1\n2007_000033 -1\n")
    assert_cli_error(capsys, format_pascal.main, argv, str(cow), "not the same")
    cow.unlink()
    assert_cli_error(capsys, format_pascal.main, argv, f"{cow} not found", "VOCtrainval_11-May-2012.tar")
    cow.write_text("2010_000005 -1\n2007_000033 -1\n2011_000001 -1\n")
    saved = {name: (main_dir / f"{name}_val.txt").read_text() for name in VOC_CLASSES}
    for name in VOC_CLASSES:  # no val image with a positive label: an empty split, refused (QA round 2)
        (main_dir / f"{name}_val.txt").write_text("".join(f"{i} -1\n" for i in VOC["val"][0]))
    assert_cli_error(capsys, format_pascal.main, argv, f"{main_dir / '*_val.txt'} leaves no val image to write",
                     "VOCtrainval_11-May-2012.tar", "nothing was written")
    for name, text in saved.items():
        (main_dir / f"{name}_val.txt").write_text(text)
    # the failed runs left the earlier output untouched, with no temporary files
    assert snapshot(tmp_path / "out") == good


# ---------------------------------------------------------------- VOC 2007 (SGRE's rule)

# list -> [(image id, [(class, difficult), ...])], in list order (not sorted: the order is kept)
VOC2007 = {
    "trainval": [
        ("000012", [("car", 0)]),
        ("000005", [("chair", 0), ("chair", 1), ("diningtable", 1), ("Pottedplant", 0)]),  # table: only difficult
        ("000007", [("dog", 1), ("dog", 1)]),  # every object difficult: an all-zero row, kept
        ("000009", [("horse", 0), ("person", None)]),  # no <difficult> tag: not difficult
    ],
    "test": [
        ("000001", [("dog", 0), ("person", 1)]),  # person only difficult: 0 and ignored
        ("000004", [("car", 1), ("car", 0), ("sofa", 1), ("tvmonitor", 0)]),
        ("000002", [("train", 1)]),  # only difficult: all-zero row, train ignored
    ],
}


def voc_xml(image_id, objects):
    parts = [f"<annotation>\n  <folder>VOC2007</folder>\n  <filename>{image_id}.jpg</filename>\n"
             "  <size><width>500</width><height>375</height><depth>3</depth></size>\n"]
    for name, difficult in objects:
        tag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        parts.append(f"  <object>\n    <name>{name}</name>\n    <pose>Left</pose>\n    <truncated>0</truncated>\n"
                     f"    {tag}\n    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>\n"
                     "  </object>\n")
    return "".join(parts) + "</annotation>\n"


@pytest.fixture
def voc2007_root(tmp_path):
    voc = tmp_path / "raw" / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    for list_name, images in VOC2007.items():
        (voc / "ImageSets" / "Main" / f"{list_name}.txt").write_text("".join(f"{i}\n" for i, _ in images))
        for image_id, objects in images:
            (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, objects))
    return tmp_path / "raw"


def test_format_voc2007_follows_sgre(voc2007_root, tmp_path, capsys):
    out = tmp_path / "out"
    run_format(format_pascal, voc2007_root, out, "--year", "2007")
    report = capsys.readouterr().out.splitlines()
    assert "4 images" in report[0] and "1 without a positive label kept" in report[0]
    assert "2 image-class pairs with only difficult objects negative" in report[0]  # diningtable, dog
    assert "3 image-class pairs with only difficult objects ignored in evaluation" in report[1]
    c = {name: k for k, name in enumerate(VOC_CLASSES)}
    images, labels = load(out, "train")
    assert images.tolist() == ["000012.jpg", "000005.jpg", "000007.jpg", "000009.jpg"]
    np.testing.assert_array_equal(labels, rows(20, [c["car"]], [c["chair"], c["pottedplant"]], [],
                                               [c["horse"], c["person"]]))
    assert labels.dtype == np.float64
    images, labels = load(out, "val")
    assert images.tolist() == ["000001.jpg", "000004.jpg", "000002.jpg"]
    np.testing.assert_array_equal(labels, rows(20, [c["dog"]], [c["car"], c["tvmonitor"]], []))
    ignore = np.load(out / "formatted_val_ignore.npy", allow_pickle=False)
    assert ignore.dtype == np.bool_
    np.testing.assert_array_equal(ignore, rows(20, [c["person"]], [c["sofa"]], [c["train"]]) == 1)
    assert sorted(p.name for p in out.iterdir()) == [
        "formatted_train_images.npy", "formatted_train_labels.npy", "formatted_val_ignore.npy",
        "formatted_val_images.npy", "formatted_val_labels.npy"]


def test_format_pascal_2012_output_unchanged_by_year_flag(voc_root, tmp_path):
    run_format(format_pascal, voc_root, tmp_path / "default")
    run_format(format_pascal, voc_root, tmp_path / "2012", "--year", "2012")
    assert snapshot(tmp_path / "default") == snapshot(tmp_path / "2012")


def test_format_voc2007_bad_input(voc2007_root, tmp_path, capsys):
    argv = ["--load-path", str(voc2007_root), "--save-path", str(tmp_path / "out"), "--year", "2007"]
    voc = voc2007_root / "VOCdevkit" / "VOC2007"
    xml = voc / "Annotations" / "000004.xml"
    good = xml.read_text()
    xml.write_text(good.replace("<name>sofa</name>", "<name>couch</name>"))
    assert_cli_error(capsys, format_pascal.main, argv, str(xml), "object 3", "'couch'")
    xml.write_text(good.replace("<difficult>0</difficult>", "<difficult>maybe</difficult>"))
    assert_cli_error(capsys, format_pascal.main, argv, str(xml), "<difficult>maybe</difficult>")
    xml.write_text(good[:40])
    assert_cli_error(capsys, format_pascal.main, argv, str(xml), "not a readable VOC annotation")
    xml.unlink()
    assert_cli_error(capsys, format_pascal.main, argv, f"{xml} not found", "VOCtest_06-Nov-2007.tar")
    xml.write_text(good)
    test_list = voc / "ImageSets" / "Main" / "test.txt"
    test_list.write_text("000001\n000004\n000002\n000005\n")
    assert_cli_error(capsys, format_pascal.main, argv, "in both trainval.txt and test.txt", "000005.jpg")
    test_list.write_text("000001\n000004\n000001\n")
    assert_cli_error(capsys, format_pascal.main, argv, str(test_list), "image 000001 twice")
    test_list.write_text("")  # an empty test list: an empty split, refused (QA round 2)
    assert_cli_error(capsys, format_pascal.main, argv, f"{test_list} leaves no val image to write")
    assert not (tmp_path / "out").exists()
    assert_cli_error(capsys, format_pascal.main, ["--year", "2007", "--load-path", str(tmp_path / "none")],
                     "VOCdevkit/VOC2007 not found", "VOCtrainval_06-Nov-2007.tar")


# ---------------------------------------------------------------- COCO

def classnames(dataset):
    return (REPO / "text_features" / f"{dataset}_classnames.txt").read_text(encoding="utf-8").splitlines()


# The official categories list: the 80 COCO categories sorted by id (ids 1..90 with gaps), named as
# text_features/coco_classnames.txt. Class index = position: id 1 (person) -> 0, 5 (airplane) -> 4,
# 90 (toothbrush) -> 79.
COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
            *range(84, 91)]
COCO_CATEGORIES = [{"id": i, "name": n} for i, n in zip(COCO_IDS, classnames("coco"), strict=True)]


def coco_json(image_ids, annotations, categories=COCO_CATEGORIES):
    return {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in image_ids],
            "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": [0, 0, 1, 1]}
                            for n, (i, c) in enumerate(annotations)],
            "categories": categories}


@pytest.fixture
def coco_root(tmp_path):
    ann = tmp_path / "raw" / "annotations"
    ann.mkdir(parents=True)
    # image 7 has no annotation; 100 sorts before 25 and 9 as a string
    train = coco_json([25, 100, 7, 9], [(25, 1), (100, 90), (100, 1), (9, 5), (100, 1)])
    val = coco_json([3, 1000], [(1000, 5), (3, 90)])
    (ann / "instances_train2014.json").write_text(json.dumps(train))
    (ann / "instances_val2014.json").write_text(json.dumps(val))
    return tmp_path / "raw"


def test_format_coco(coco_root, tmp_path, capsys):
    out = tmp_path / "out"
    run_format(format_coco, coco_root, out)
    assert "1 listed images without annotation left out" in capsys.readouterr().out
    images, labels = load(out, "train")
    assert images.tolist() == ["train2014/COCO_train2014_000000000100.jpg",
                               "train2014/COCO_train2014_000000000025.jpg",
                               "train2014/COCO_train2014_000000000009.jpg"]
    np.testing.assert_array_equal(labels, rows(80, [0, 79], [0], [4]))
    images, labels = load(out, "val")
    assert images.tolist() == ["val2014/COCO_val2014_000000001000.jpg",
                               "val2014/COCO_val2014_000000000003.jpg"]
    np.testing.assert_array_equal(labels, rows(80, [4], [79]))


def test_format_coco_bad_input(coco_root, tmp_path, capsys):
    argv = ["--load-path", str(coco_root), "--save-path", str(tmp_path / "out")]
    val = coco_root / "annotations" / "instances_val2014.json"
    val.write_text(json.dumps(coco_json([3], [(3, 90)], COCO_CATEGORIES[::-1])))
    assert_cli_error(capsys, format_coco.main, argv, str(val), "categories list differs")
    val.write_text(json.dumps(coco_json([3], [(3, 12)])))  # 12: no COCO category has it
    assert_cli_error(capsys, format_coco.main, argv, str(val), "annotations[0]", "category_id 12")
    val.write_text(json.dumps(coco_json([3], [(4, 90)])))
    assert_cli_error(capsys, format_coco.main, argv, "refers to image 4")
    val.write_text(json.dumps(coco_json([3], [])))  # no annotation: no val image left (QA round 2)
    assert_cli_error(capsys, format_coco.main, argv, f"{val} leaves no val image to write")
    val.write_text('{"categories": [],\n "annotations": [,]}')
    assert_cli_error(capsys, format_coco.main, argv, f"{val}:2", "not valid JSON")
    val.unlink()
    assert_cli_error(capsys, format_coco.main, argv, f"{val} not found", "annotations_trainval2014.zip")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (lambda cats: [cats[1], cats[0]] + cats[2:], "lists the classes in another order: its class 0 is 'bicycle'"),
    (lambda cats: cats[:2] + [{"id": 3, "name": "automobile"}] + cats[3:], "names a class differently: its class 2 "
                                                                             "is 'automobile'"),
    (lambda cats: cats + [{"id": 91, "name": "hair brush"}], "lists 81 classes, but coco has the 80"),
    (lambda cats: cats[:-1], "lists 79 classes, but coco has the 80"),
], ids=["order", "renamed", "81st", "missing"])
def test_format_coco_checks_every_column_name(coco_root, tmp_path, capsys, change, message):
    """Issue 29: the class of column k is named by line k+1 of text_features/coco_classnames.txt, which
    CLIP's prompts read; a categories list in another order, with a renamed or an extra category, was
    formatted silently (CLIP then prompted for the wrong class). Both files carry the same list, so only
    the check of the names can refuse it; nothing is written."""
    for phase in ("train", "val"):
        path = coco_root / "annotations" / f"instances_{phase}2014.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps(data | {"categories": change(data["categories"])}))
    err = assert_cli_error(capsys, format_coco.main, ["--load-path", str(coco_root), "--save-path",
                                                      str(tmp_path / "out")],
                           "instances_train2014.json", message, "coco_classnames.txt")
    assert "annotations_trainval2014.zip" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- CUB

CUB_IMAGES = [  # id, path, is_train, is_present of the first 4 attributes (the other 308 are 0)
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, [1, 0, 0, 1]),
    (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 0, [0, 0, 0, 0]),
    (3, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 1, [0, 1, 1, 0]),
    (4, "200.Common_Yellowthroat/Common_Yellowthroat_0003_190521.jpg", 0, [1, 1, 1, 1]),
    (5, "002.Laysan_Albatross/Laysan_Albatross_0001_545.jpg", 1, [0, 0, 1, 0]),
]


@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / "raw"
    cub = root / "CUB_200_2011"
    (cub / "attributes").mkdir(parents=True)
    (root / "attributes.txt").write_text("".join(f"{a} {name}\n" for a, name in enumerate(classnames("cub"), 1)))
    (cub / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in CUB_IMAGES))
    (cub / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, _ in CUB_IMAGES))
    lines = [f"{i} {a + 1} {v} 3 {2.5 + a}" for i, _, _, vs in CUB_IMAGES for a, v in enumerate(vs + [0] * 308)]
    lines[6] += " 0"  # the real file has a few lines with extra fields
    (cub / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def test_format_cub(cub_root, tmp_path):
    out = tmp_path / "out"
    run_format(format_cub, cub_root, out)
    images, labels = load(out, "train")
    assert images.tolist() == ["001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg",
                               "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg",
                               "002.Laysan_Albatross/Laysan_Albatross_0001_545.jpg"]
    np.testing.assert_array_equal(labels, np.pad([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 1, 0]], ((0, 0), (0, 308))))
    images, labels = load(out, "val")
    assert images.tolist() == ["001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg",
                               "200.Common_Yellowthroat/Common_Yellowthroat_0003_190521.jpg"]
    np.testing.assert_array_equal(labels, np.pad([[0, 0, 0, 0], [1, 1, 1, 1]], ((0, 0), (0, 308))))


def test_format_cub_bad_input(cub_root, tmp_path, capsys):
    argv = ["--load-path", str(cub_root), "--save-path", str(tmp_path / "out")]
    labels_file = cub_root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    good_labels = labels_file.read_text()
    lines = good_labels.splitlines()
    labels_file.write_text("\n".join(lines[:-1]) + "\n")
    assert_cli_error(capsys, format_cub.main, argv, "no label for image 5 attribute 312")
    labels_file.write_text("\n".join(lines[:3] + ["1 4 yes 3 1.0"] + lines[4:]) + "\n")
    assert_cli_error(capsys, format_cub.main, argv, f"{labels_file}:4", "expected integers")
    labels_file.write_text("\n".join(lines + ["5 4 1 3 9.0"]) + "\n")
    assert_cli_error(capsys, format_cub.main, argv, f"{labels_file}:1561", "labelled twice")
    labels_file.write_text(good_labels)
    split_file = cub_root / "CUB_200_2011" / "train_test_split.txt"
    good_split = split_file.read_text()
    split_file.write_text("1 1\n2 0\n3 1\n4 0\n")
    assert_cli_error(capsys, format_cub.main, argv, str(split_file), "covers 4 images", "lists 5")
    split_file.write_text("1 1\n2 1\n3 1\n4 1\n5 1\n")  # every image in train: no test split (QA round 2)
    assert_cli_error(capsys, format_cub.main, argv, f"{split_file} leaves no val image to write")
    split_file.write_text(good_split)
    # the names of attributes.txt are those of text_features/cub_classnames.txt, in order (issue 29)
    names = cub_root / "attributes.txt"
    good_names = names.read_text()
    names.write_text(good_names.replace("has_bill_shape::dagger", "has_bill_shape::sword"))
    assert_cli_error(capsys, format_cub.main, argv, str(names), "its class 1 is 'has_bill_shape::sword'",
                     "cub_classnames.txt")
    names.write_text(good_names + "313 has_tail::none\n")
    assert_cli_error(capsys, format_cub.main, argv, str(names), "lists 313 classes")
    names.write_text(good_names)
    # attributes.txt belongs at the archive root, beside CUB_200_2011/
    (cub_root / "attributes.txt").rename(cub_root / "CUB_200_2011" / "attributes.txt")
    assert_cli_error(capsys, format_cub.main, argv, f"{cub_root / 'attributes.txt'} not found",
                     "beside CUB_200_2011/")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- NUS-WIDE

NUS_CONCEPTS = classnames("nuswide")  # Concepts81.txt: the 81 concepts, alphabetically
NUS_USED = [NUS_CONCEPTS.index(c) for c in ("animal", "sky", "water")]  # the other 78 are 0 everywhere
NUS = {  # list name -> (list line, on disk, labels of animal, sky, water)
    "Train": [("actor\\0001_2124494179.jpg", True, [1, 0, 1]),
              ("actor\\0002_174174086.jpg", True, [0, 0, 0]),
              ("beach\\0003_1.jpg", False, [0, 1, 0]),
              ("beach\\0004_2.jpg", True, [0, 0, 1])],
    "Test": [("sunset\\0001_9.jpg", True, [0, 1, 0]),
             ("sunset\\0002_8.jpg", True, [0, 0, 0])],
}


def nus_columns(used):
    """(N, 81) labels with the given columns of animal, sky and water and 0 elsewhere."""
    matrix = np.zeros((len(used), 81))
    matrix[:, NUS_USED] = used
    return matrix


@pytest.fixture
def nus_root(tmp_path):
    root = tmp_path / "raw"
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth" / "TrainTestLabels").mkdir(parents=True)
    # NUS-WIDE's files come from Windows: CRLF line ends
    (root / "Concepts81.txt").write_bytes("".join(c + "\r\n" for c in NUS_CONCEPTS).encode())
    for name, entries in NUS.items():
        (root / "ImageList" / f"{name}Imagelist.txt").write_bytes(
            "".join(line + "\r\n" for line, _, _ in entries).encode())
        for concept in NUS_CONCEPTS:
            k = NUS_USED.index(NUS_CONCEPTS.index(concept)) if concept in ("animal", "sky", "water") else None
            (root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{name}.txt").write_bytes(
                "".join(f"{0 if k is None else labels[k]}\r\n" for _, _, labels in entries).encode())
        for line, on_disk, _ in entries:
            if on_disk:
                path = root / "Flickr" / line.replace("\\", "/")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"jpeg")
    return root


def test_format_nuswide_default_drops_missing_and_unlabelled(nus_root, tmp_path, capsys):
    out = tmp_path / "out"
    run_format(format_nuswide, nus_root, out)
    report = capsys.readouterr().out.splitlines()
    assert "4 listed, 1 missing" in report[0] and "1 with no label (left out)" in report[0]
    assert "2 listed, 0 missing" in report[1] and "1 with no label (left out)" in report[1]
    images, labels = load(out, "train")
    assert images.tolist() == ["actor/0001_2124494179.jpg", "beach/0004_2.jpg"]
    np.testing.assert_array_equal(labels, nus_columns([[1, 0, 1], [0, 0, 1]]))
    images, labels = load(out, "val")
    assert images.tolist() == ["sunset/0001_9.jpg"]
    np.testing.assert_array_equal(labels, nus_columns([[0, 1, 0]]))


def test_format_nuswide_keep_unlabelled(nus_root, tmp_path, capsys):
    out = tmp_path / "out"
    run_format(format_nuswide, nus_root, out, "--no-label", "keep")
    assert "1 with no label (kept)" in capsys.readouterr().out
    images, labels = load(out, "train")
    assert images.tolist() == ["actor/0001_2124494179.jpg", "actor/0002_174174086.jpg", "beach/0004_2.jpg"]
    np.testing.assert_array_equal(labels, nus_columns([[1, 0, 1], [0, 0, 0], [0, 0, 1]]))
    images, labels = load(out, "val")
    assert images.tolist() == ["sunset/0001_9.jpg", "sunset/0002_8.jpg"]
    np.testing.assert_array_equal(labels, nus_columns([[0, 1, 0], [0, 0, 0]]))


def test_format_nuswide_bad_input(nus_root, tmp_path, capsys):
    argv = ["--load-path", str(nus_root), "--save-path", str(tmp_path / "out")]
    assert_cli_error(capsys, format_nuswide.main, argv + ["--missing-images", "error"],
                     "1 images of", "TrainImagelist.txt", "beach/0003_1.jpg", "--missing-images drop")
    concepts = nus_root / "Concepts81.txt"
    good = concepts.read_bytes()
    concepts.write_bytes(good.replace(b"animal\r\nbeach", b"beach\r\nanimal"))  # issue 29: order checked
    assert_cli_error(capsys, format_nuswide.main, argv, str(concepts), "another order: its class 1 is 'beach'",
                     "nuswide_classnames.txt")
    concepts.write_bytes(good.replace(b"zebra\r\n", b"zebra\r\nzoo\r\n"))
    assert_cli_error(capsys, format_nuswide.main, argv, str(concepts), "lists 82 classes", "'zoo'")
    concepts.write_bytes(good)
    # an image listed twice, or in both lists, as format_pascal refuses (QA round 2)
    train_list, test_list = (nus_root / "ImageList" / f"{name}Imagelist.txt" for name in ("Train", "Test"))
    good_train, good_test = train_list.read_bytes(), test_list.read_bytes()
    train_list.write_bytes(good_train.replace(b"beach\\0004_2.jpg", b"actor\\0001_2124494179.jpg"))
    assert_cli_error(capsys, format_nuswide.main, argv, f"{train_list}:4", "actor/0001_2124494179.jpg",
                     "second time (first on line 1)")
    train_list.write_bytes(good_train)
    test_list.write_bytes(good_test.replace(b"sunset\\0002_8.jpg", b"beach\\0004_2.jpg"))
    assert_cli_error(capsys, format_nuswide.main, argv, "1 images (e.g. beach/0004_2.jpg) are in both",
                     "Train and Test")
    test_list.write_bytes(good_test)
    sky = nus_root / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Test.txt"
    sky.write_text("1\n2\n")
    assert_cli_error(capsys, format_nuswide.main, argv, f"{sky}:2", "not one of [0, 1]")
    sky.write_text("1\n0\n0\n")
    assert_cli_error(capsys, format_nuswide.main, argv, str(sky), "has 3 labels", "has 2 images")
    sky.unlink()
    assert_cli_error(capsys, format_nuswide.main, argv, f"{sky} not found")
    assert not (tmp_path / "out").exists()


def test_format_nuswide_needs_images(nus_root, tmp_path, capsys):
    import shutil
    shutil.rmtree(nus_root / "Flickr")
    argv = ["--load-path", str(nus_root), "--save-path", str(tmp_path / "out")]
    assert_cli_error(capsys, format_nuswide.main, argv, f"{nus_root / 'Flickr'} not found", "Flickr.zip")


# ---------------------------------------------------------------- observed labels

def observed_by_loop(labels, num_pos, num_neg, seed):
    """docs/original-vlpl.md section 3 written independently: permutation(n) consumes the same draws as shuffling n items."""
    rng = np.random.RandomState(seed)
    out = np.zeros(labels.shape)
    for i in range(labels.shape[0]):
        pos = [k for k in range(labels.shape[1]) if labels[i, k] == 1]
        pos = [pos[j] for j in rng.permutation(len(pos))]
        neg = [k for k in range(labels.shape[1]) if labels[i, k] == 0]
        neg = [neg[j] for j in rng.permutation(len(neg))]
        for k in (pos if num_pos == -1 else pos[:num_pos]):
            out[i, k] = 1
        for k in (neg if num_neg == -1 else neg[:num_neg]):
            out[i, k] = -1
    return out


@pytest.fixture
def label_matrix():
    labels = (np.random.RandomState(7).rand(40, 9) < 0.35).astype(np.float64)
    labels[3] = 0  # a row without positives
    labels[5] = 1  # a row without negatives
    return labels


@pytest.mark.parametrize("num_pos, num_neg, seed", [(1, 0, 1200), (2, 1, 1200), (-1, -1, 3), (0, 3, 1200)])
def test_generate_observed_matches_randomstate(label_matrix, num_pos, num_neg, seed):
    observed = generate_observed(label_matrix, num_pos, num_neg, seed)
    assert observed.dtype == np.float32
    np.testing.assert_array_equal(observed, observed_by_loop(label_matrix, num_pos, num_neg, seed))


def test_generate_observed_single_positive(label_matrix):
    observed = generate_observed(label_matrix)
    has_positive = label_matrix.sum(axis=1) > 0
    np.testing.assert_array_equal((observed == 1).sum(axis=1), has_positive.astype(int))
    assert (observed >= 0).all() and (label_matrix[observed == 1] == 1).all()
    # the negatives are shuffled even for num_neg=0: skipping that draw gives another stream
    rng = np.random.RandomState(1200)
    skipping = np.zeros_like(observed)
    for i, row in enumerate(label_matrix):
        pos = np.flatnonzero(row == 1)
        if len(pos):
            skipping[i, pos[rng.permutation(len(pos))[0]]] = 1
    assert not np.array_equal(observed, skipping)


def test_generate_observed_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        generate_observed(np.array([[1, -1]]))
    with pytest.raises(ValueError, match="num_neg"):
        generate_observed(np.array([[1, 0]]), 1, -2)


def test_generate_observed_labels_cli(tmp_path, capsys):
    folder = tmp_path / "pascal"
    folder.mkdir()
    rng = np.random.RandomState(11)
    train = (rng.rand(12, 20) < 0.2).astype(np.float64)
    val = (rng.rand(6, 20) < 0.2).astype(np.float64)
    np.save(folder / "formatted_train_labels.npy", train)
    np.save(folder / "formatted_val_labels.npy", val)
    argv = ["--dataset", "pascal", "--data-root", str(tmp_path)]
    assert generate_observed_labels.main(argv) == 0
    assert "pascal train: 12 images" in capsys.readouterr().out
    for phase, labels in (("train", train), ("val", val)):
        observed = np.load(folder / f"formatted_{phase}_labels_obs.npy", allow_pickle=False)
        assert observed.dtype == np.float64  # the labels' dtype, as the original writes
        # a fresh RandomState(1200) per phase
        np.testing.assert_array_equal(observed, observed_by_loop(labels, 1, 0, 1200))

    assert generate_observed_labels.main(argv + ["--num-pos", "-1", "--num-neg", "2", "--seed", "5", "--overwrite"]) == 0
    observed = np.load(folder / "formatted_val_labels_obs.npy", allow_pickle=False)
    np.testing.assert_array_equal(observed, observed_by_loop(val, -1, 2, 5))

    good = snapshot(folder)
    np.save(folder / "formatted_val_labels.npy", np.zeros((6, 19)))
    assert_cli_error(capsys, generate_observed_labels.main, argv, "formatted_val_labels.npy", "(N, 20)")
    (folder / "formatted_val_labels.npy").unlink()
    assert_cli_error(capsys, generate_observed_labels.main, argv, "formatted_val_labels.npy not found",
                     "format_pascal.py")
    del good["formatted_val_labels.npy"]
    assert snapshot(folder) == good  # train observations were not rewritten by the failed runs
    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--num-neg", "-3"], "--num-neg")
    # QA round 2: a file no run could train on is not written; a seed RandomState cannot take is a flag error
    np.save(folder / "formatted_val_labels.npy", val)
    good = snapshot(folder)
    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--num-pos", "0", "--overwrite"],
                     f"{folder / 'formatted_train_labels_obs.npy'} would hold no observed positive")
    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--scheme", "rps", "--drop-prob", "1"],
                     "formatted_train_labels_obs_rps1.0.npy would hold no observed positive")
    assert snapshot(folder) == good
    for seed, message in (("-1", "must be >= 0, got -1"), ("4294967296", "must be <= 4294967295")):
        with pytest.raises(SystemExit):
            generate_observed_labels.main(argv + ["--seed", seed])
        assert f"argument --seed: {message}" in capsys.readouterr().err


def test_generate_observed_labels_runs_as_script(tmp_path):
    (tmp_path / "demo").mkdir()
    result = subprocess.run([sys.executable, "preproc/generate_observed_labels.py", "--dataset", "demo",
                             "--data-root", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "python main_clip.py -d demo" in result.stderr


# ---------------------------------------------------------------- partial annotations (CSL's RPS / FPC)

def rps_by_loop(labels, drop_prob, seed):
    """coco_simulation.simulate_coco (rps) restated: one uniform per entry, row-major, drop if < P."""
    uniform = np.random.RandomState(seed).random_sample(labels.shape)
    out = np.zeros(labels.shape)
    for i in range(labels.shape[0]):
        for k in range(labels.shape[1]):
            if not uniform[i, k] < drop_prob:
                out[i, k] = 1 if labels[i, k] == 1 else -1
    return out


def fpc_by_loop(labels, per_class, seed):
    """coco_simulation.simulate_coco (fpc) restated; RandomState.choice(a, m, replace=False) is
    a[permutation(len(a))[:m]], positives then negatives, class by class."""
    rng = np.random.RandomState(seed)
    out = np.zeros(labels.shape)
    for k in range(labels.shape[1]):
        for value, mark in ((1, 1), (0, -1)):
            rows = [i for i in range(labels.shape[0]) if labels[i, k] == value]
            for j in rng.permutation(len(rows))[:min(per_class, len(rows))]:
                out[rows[j], k] = mark
    return out


@pytest.fixture
def big_labels():
    labels = (np.random.RandomState(8).rand(2000, 12) < 0.15).astype(np.float64)
    labels[:, 4] = 0  # a class without positives
    labels[:, 7] = 1  # a class without negatives
    return labels


@pytest.mark.parametrize("drop_prob", [0.0, 0.3, 0.5, 1.0])
def test_rps_keeps_one_minus_p_and_never_contradicts(big_labels, drop_prob):
    observed = simulate_rps(big_labels, drop_prob, seed=3)
    assert observed.dtype == np.float32 and observed.shape == big_labels.shape
    np.testing.assert_array_equal(observed, rps_by_loop(big_labels, drop_prob, 3))
    assert (big_labels[observed == 1] == 1).all() and (big_labels[observed == -1] == 0).all()
    kept = (observed != 0).mean()
    # 24000 Bernoulli(1-P) draws: the standard deviation of the kept fraction is <= 0.0033
    assert abs(kept - (1 - drop_prob)) < 0.015
    # positives and negatives are dropped alike
    for value in (0, 1):
        assert abs((observed[big_labels == value] != 0).mean() - (1 - drop_prob)) < 0.05
    assert not np.array_equal(observed, simulate_rps(big_labels, drop_prob, seed=4)) or drop_prob in (0, 1)


@pytest.mark.parametrize("per_class", [0, 5, 300, 5000])
def test_fpc_keeps_at_most_n_per_class_and_never_contradicts(big_labels, per_class):
    observed = simulate_fpc(big_labels, per_class, seed=3)
    assert observed.dtype == np.float32
    np.testing.assert_array_equal(observed, fpc_by_loop(big_labels, per_class, 3))
    assert (big_labels[observed == 1] == 1).all() and (big_labels[observed == -1] == 0).all()
    np.testing.assert_array_equal((observed == 1).sum(0), np.minimum(per_class, big_labels.sum(0)))
    np.testing.assert_array_equal((observed == -1).sum(0), np.minimum(per_class, (1 - big_labels).sum(0)))


def test_partial_simulation_rejects_bad_input():
    with pytest.raises(ValueError, match="drop_prob"):
        simulate_rps(np.zeros((2, 3)), 1.5)
    with pytest.raises(ValueError, match="per_class"):
        simulate_fpc(np.zeros((2, 3)), -1)
    with pytest.raises(ValueError, match="0/1"):
        simulate_fpc(np.array([[1, -1]]), 3)
    assert partial_tag("rps", 0.5) == "rps0.5" and partial_tag("fpc", 1000) == "fpc1000"
    assert partial_tag("rps", 1) == "rps1.0" and partial_tag("rps", 0.25) == "rps0.25"


def test_generate_observed_labels_partial_cli(tmp_path, capsys):
    folder = tmp_path / "pascal"
    folder.mkdir()
    train = (np.random.RandomState(11).rand(30, 20) < 0.2).astype(np.float64)
    np.save(folder / "formatted_train_labels.npy", train)  # rps / fpc need no val file
    argv = ["--dataset", "pascal", "--data-root", str(tmp_path)]
    assert generate_observed_labels.main(argv + ["--scheme", "rps"]) == 0  # CSL's RPS(0.5)
    assert "formatted_train_labels_obs_rps0.5.npy" in capsys.readouterr().out
    observed = np.load(folder / "formatted_train_labels_obs_rps0.5.npy", allow_pickle=False)
    assert observed.dtype == np.float64
    np.testing.assert_array_equal(observed, rps_by_loop(train, 0.5, 1200))
    assert generate_observed_labels.main(argv + ["--scheme", "rps", "--drop-prob", "0.25", "--seed", "2"]) == 0
    np.testing.assert_array_equal(np.load(folder / "formatted_train_labels_obs_rps0.25.npy"),
                                  rps_by_loop(train, 0.25, 2))
    assert generate_observed_labels.main(argv + ["--scheme", "fpc", "--per-class", "3"]) == 0
    np.testing.assert_array_equal(np.load(folder / "formatted_train_labels_obs_fpc3.npy"),
                                  fpc_by_loop(train, 3, 1200))
    assert generate_observed_labels.main(argv + ["--scheme", "fpc"]) == 0
    np.testing.assert_array_equal(np.load(folder / "formatted_train_labels_obs_fpc1000.npy"),
                                  fpc_by_loop(train, 1000, 1200))
    capsys.readouterr()
    assert not (folder / "formatted_train_labels_obs.npy").exists()  # the single-positive file is separate

    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--scheme", "rps", "--drop-prob", "2"],
                     "--drop-prob must be in [0, 1]")
    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--scheme", "fpc", "--per-class", "-1"],
                     "--per-class must be >= 0")
    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--scheme", "fpc", "--drop-prob", "0.5"],
                     "--drop-prob does not apply to --scheme fpc")
    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--num-pos", "2", "--scheme", "rps"],
                     "--num-pos does not apply to --scheme rps")
    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--per-class", "2"],
                     "--per-class does not apply to --scheme single")
    (folder / "formatted_train_labels.npy").unlink()
    assert_cli_error(capsys, generate_observed_labels.main, argv + ["--scheme", "fpc"],
                     "formatted_train_labels.npy not found", "format_pascal.py")


# ---------------------------------------------------------------- shared helpers

def test_save_arrays_keeps_old_files_when_a_write_fails(tmp_path, monkeypatch):
    from preproc import _common
    _common.save_arrays(tmp_path, {"a.npy": np.arange(3), "b.npy": np.ones(2)})
    good = snapshot(tmp_path)
    real_save, calls = np.save, []

    def failing_save(f, array, **kwargs):
        calls.append(array)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(f, array, **kwargs)

    monkeypatch.setattr(_common.np, "save", failing_save)
    with pytest.raises(_common.PreprocError, match="No space left on device"):
        _common.save_arrays(tmp_path, {"a.npy": np.arange(5), "b.npy": np.zeros(2)})
    assert snapshot(tmp_path) == good  # a.npy not replaced, no temporary file left


@pytest.mark.parametrize("module, dataset", [(format_pascal, "pascal"), (format_coco, "coco"),
                                             (format_cub, "cub"), (format_nuswide, "nuswide")])
def test_format_help_names_defaults(module, dataset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.count(f"(default: data/{dataset})") == 2

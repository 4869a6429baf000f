"""Format PASCAL VOC 2012 (as the original VLPL does) or VOC 2007 (as SGRE does) into formatted_*.npy.

--year 2012 (default; `-d pascal`), docs/original-vlpl.md section 2 (faithful): for each phase and
each class in CLASSES order, VOCdevkit/VOC2012/ImageSets/Main/<class>_<phase>.txt lists
`<image id> <label>` with label in {-1, 0, 1}; only 1 is positive (0 marks "difficult"). An image
enters the list with its first positive label, so images without any positive are left out; the
list of `<image id>.jpg` names is sorted as strings and row r of the (N, 20) float 0/1 label matrix
belongs to the r-th name.

--year 2007 (`-d voc2007`), the rule of SGRE's VOC2007 script (github.com/jasonseu/SGRE,
scripts/voc2007.py; Query2Label publishes no VOC code): VOCdevkit/VOC2007/ImageSets/Main/trainval.txt
becomes "train" and test.txt "val" (our test set), every listed image in list order. For each image,
Annotations/<id>.xml gives its objects (name, difficult). A class is positive (1) when at least one
of its objects is not difficult. A class whose objects are all difficult is negative (0) in
trainval; in test it is 0 in the labels and True in formatted_val_ignore.npy ((N, 20) bool), the
entries SGRE's ignore.npy leaves out of the class's AP. An image without any positive is kept
(all-zero row), as SGRE lists it.
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/format_pascal.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from preproc._common import (PreprocError, dataset_parser, parse_int, read_rows, require,
                             run_cli, save_formatted, save_formatted_arrays)

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
           "train", "tvmonitor"]
PHASES = ("train", "val")
ANNOTATION_DIR = Path("VOCdevkit", "VOC2012", "ImageSets", "Main")
DOWNLOAD = ("download VOCtrainval_11-May-2012.tar and extract it into the --load-path folder "
            "(see data/pascal/README.md)")


def read_phase(main_dir: Path, phase: str) -> tuple[list[str], np.ndarray, int]:
    """Return (sorted image file names, (N, 20) float64 labels, number of images left out)."""
    positives: dict[str, list[int]] = {}
    first_file, first_ids = None, None
    for k, name in enumerate(CLASSES):
        path = require(main_dir / f"{name}_{phase}.txt", DOWNLOAD)
        ids: set[str] = set()
        for lineno, (image_id, label) in read_rows(path, 2, 2):
            if image_id in ids:
                raise PreprocError(f"{path}:{lineno}: image {image_id} is listed twice")
            ids.add(image_id)
            if parse_int(path, lineno, label, {-1, 0, 1}) == 1:
                positives.setdefault(f"{image_id}.jpg", []).append(k)
        # Every class file of a phase lists the same images; a difference means a broken download.
        if first_ids is None:
            first_file, first_ids = path, ids
        elif ids != first_ids:
            raise PreprocError(f"{path} lists {len(ids)} images, not the same {len(first_ids)} as "
                               f"{first_file}: re-extract VOCtrainval_11-May-2012.tar")
    images = sorted(positives)
    labels = np.zeros((len(images), len(CLASSES)))
    for row, image in enumerate(images):
        labels[row, positives[image]] = 1.0
    return images, labels, len(first_ids) - len(images)


def format_pascal(load_path: Path, save_path: Path) -> list[str]:
    """Read the raw VOC annotations under load_path, save the formatted files; return a report."""
    main_dir = require(load_path / ANNOTATION_DIR, DOWNLOAD)
    phases = {phase: read_phase(main_dir, phase) for phase in PHASES}
    shared = set(phases["train"][0]) & set(phases["val"][0])
    if shared:
        raise PreprocError(f"{main_dir}: {len(shared)} images (e.g. {min(shared)}) are in both the "
                           f"train and the val lists: re-extract VOCtrainval_11-May-2012.tar")
    removed = save_formatted(save_path, {phase: (images, labels) for phase, (images, labels, _) in phases.items()},
                             {phase: main_dir / f"*_{phase}.txt" for phase in phases}, DOWNLOAD)
    return [f"pascal {phase}: {len(images)} images written to {save_path} "
            f"({dropped} without a positive label left out)"
            for phase, (images, _, dropped) in phases.items()] + removed


# ------------------------------------------------------------------------------------------ VOC 2007

VOC2007_DIR = Path("VOCdevkit", "VOC2007")
PHASES_2007 = (("trainval", "train"), ("test", "val"))  # (VOC image list, our phase)
DOWNLOAD_2007 = ("download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar and extract both into the "
                 "--load-path folder (see data/voc2007/README.md)")


def read_objects(path: Path) -> list[tuple[str, int]]:
    """(class name, difficult) of every <object> of a VOC annotation file, in file order. The name is
    lower-cased, as SGRE reads it; an object without <difficult> is not difficult."""
    try:
        root = ElementTree.parse(require(path, DOWNLOAD_2007)).getroot()
    except ElementTree.ParseError as err:
        raise PreprocError(f"{path} is not a readable VOC annotation ({err}): {DOWNLOAD_2007}") from None
    except OSError as err:
        raise PreprocError(f"cannot read {path}: {err.strerror or err}") from None
    objects = []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in CLASSES:
            raise PreprocError(f"{path}: object {i + 1} has class {name!r}, which is not one of the 20 VOC "
                               f"classes: {DOWNLOAD_2007}")
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise PreprocError(f"{path}: object {i + 1} has <difficult>{difficult}</difficult>, expected 0 or 1")
        objects.append((name, int(difficult)))
    return objects


def read_image_ids(path: Path) -> list[str]:
    """The image ids of a VOC image list (ImageSets/Main/<list>.txt), in file order."""
    ids = [fields[0] for _, fields in read_rows(require(path, DOWNLOAD_2007), 1, 1)]
    if len(set(ids)) != len(ids):
        first = next(i for i in ids if ids.count(i) > 1)
        raise PreprocError(f"{path} lists image {first} twice: {DOWNLOAD_2007}")
    return ids


def read_phase_2007(voc_dir: Path, list_name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image file names, (N, 20) float64 labels, (N, 20) bool all-difficult entries) of one list."""
    ids = read_image_ids(voc_dir / "ImageSets" / "Main" / f"{list_name}.txt")
    labels = np.zeros((len(ids), len(CLASSES)))
    difficult_only = np.zeros((len(ids), len(CLASSES)), dtype=bool)
    column = {name: k for k, name in enumerate(CLASSES)}
    for row, image_id in enumerate(ids):
        seen, clear = set(), set()
        for name, difficult in read_objects(voc_dir / "Annotations" / f"{image_id}.xml"):
            seen.add(column[name])
            if not difficult:
                clear.add(column[name])
        labels[row, sorted(clear)] = 1.0
        difficult_only[row, sorted(seen - clear)] = True
    return [f"{image_id}.jpg" for image_id in ids], labels, difficult_only


def format_voc2007(load_path: Path, save_path: Path) -> list[str]:
    """Read the raw VOC 2007 files under load_path, save the formatted files and the test split's
    ignore mask; return a report."""
    voc_dir = require(load_path / VOC2007_DIR, DOWNLOAD_2007)
    phases = {phase: read_phase_2007(voc_dir, list_name) for list_name, phase in PHASES_2007}
    shared = set(phases["train"][0]) & set(phases["val"][0])
    if shared:
        raise PreprocError(f"{voc_dir / 'ImageSets' / 'Main'}: {len(shared)} images (e.g. {min(shared)}) are in "
                           f"both trainval.txt and test.txt: {DOWNLOAD_2007}")
    arrays = {}
    for phase, (images, labels, _) in phases.items():
        arrays[f"formatted_{phase}_images.npy"] = np.array(images, dtype=str)
        arrays[f"formatted_{phase}_labels.npy"] = labels
    arrays["formatted_val_ignore.npy"] = phases["val"][2]  # trainval's all-difficult entries are negatives
    removed = save_formatted_arrays(save_path, arrays, {phase: voc_dir / "ImageSets" / "Main" / f"{list_name}.txt"
                                                        for list_name, phase in PHASES_2007}, DOWNLOAD_2007)
    report = []
    for (list_name, phase) in PHASES_2007:
        images, labels, difficult_only = phases[phase]
        rule = ("ignored in evaluation (formatted_val_ignore.npy)" if phase == "val" else "negative")
        report.append(f"voc2007 {phase} ({list_name}): {len(images)} images written to {save_path}, "
                      f"{int((labels.sum(1) == 0).sum())} without a positive label kept; "
                      f"{int(difficult_only.sum())} image-class pairs with only difficult objects {rule}")
    return report + removed


YEARS = {"2012": ("pascal", format_pascal), "2007": ("voc2007", format_voc2007)}  # year -> (dataset, formatter)


def main(argv: list[str] | None = None) -> int:
    parser = dataset_parser("format_pascal.py", "pascal", __doc__.splitlines()[0])
    parser.add_argument("--year", choices=sorted(YEARS), default="2012",
                        help="2012: VOC2012 train/val as the original VLPL (-d pascal); 2007: VOC2007 "
                             "trainval/test with SGRE's rule for difficult objects (-d voc2007; --load-path "
                             "and --save-path then default to data/voc2007) (default: 2012)")
    parser.set_defaults(load_path=None, save_path=None)

    def body(args):
        dataset, formatter = YEARS[args.year]
        default = Path("data", dataset)
        return formatter(Path(args.load_path or default), Path(args.save_path or default))

    return run_cli(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())

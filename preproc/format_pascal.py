"""Format PASCAL VOC 2012 into formatted_{train,val}_{images,labels}.npy as the original VLPL does.

docs/original-vlpl.md section 2 (faithful).

For each phase and each class in CLASSES order, VOCdevkit/VOC2012/ImageSets/Main/<class>_<phase>.txt
lists `<image id> <label>` with label in {-1, 0, 1}; only 1 is positive (0 marks "difficult").
An image enters the list with its first positive label, so images without any positive are left
out; the list of `<image id>.jpg` names is sorted as strings and row r of the (N, 20) float 0/1
label matrix belongs to the r-th name.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/format_pascal.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from preproc._common import (PreprocError, dataset_parser, parse_int, read_rows, require,
                             run_cli, save_formatted)

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
    save_formatted(save_path, {phase: (images, labels) for phase, (images, labels, _) in phases.items()})
    return [f"pascal {phase}: {len(images)} images written to {save_path} "
            f"({dropped} without a positive label left out)"
            for phase, (images, _, dropped) in phases.items()]


def main(argv: list[str] | None = None) -> int:
    parser = dataset_parser("format_pascal.py", "pascal", __doc__.splitlines()[0])
    return run_cli(parser, lambda args: format_pascal(Path(args.load_path), Path(args.save_path)), argv)


if __name__ == "__main__":
    sys.exit(main())

"""Format CUB-200-2011 into formatted_{train,val}_{images,labels}.npy as the original VLPL does.

docs/original-vlpl.md section 2 (faithful).

The 312 binary attributes are the labels. Files (paths relative to the extracted archive):
attributes.txt (`<attr id> <name>`, at the archive root beside CUB_200_2011/; the names are checked
against text_features/cub_classnames.txt),
CUB_200_2011/images.txt (`<image id> <path>`), CUB_200_2011/train_test_split.txt
(`<image id> <is_train>`) and CUB_200_2011/attributes/image_attribute_labels.txt
(`<image id> <attr id> <is_present> <certainty> <time>`; a few lines of the real file carry extra
fields, only the first three are read). Label of image i, column a-1 = is_present of attribute a.
Rows keep images.txt order; is_train 1 goes to "train", 0 to "val".
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/format_cub.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from preproc._common import (PreprocError, check_class_names, dataset_parser, parse_int, read_rows,
                             require, run_cli, save_formatted)

DOWNLOAD = ("download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
            "and extract the whole archive into the --load-path folder (attributes.txt sits at its "
            "root, beside CUB_200_2011/; see data/cub/README.md)")


def read_attribute_count(path: Path) -> int:
    """Number of attributes; their ids must run 1, 2, ... in file order (id a is column a-1), and
    their names must be, in that order, those of text_features/cub_classnames.txt."""
    names = []
    for lineno, (attr_id, name) in read_rows(require(path, DOWNLOAD), 2, 2):
        names.append(name)
        if parse_int(path, lineno, attr_id) != len(names):
            raise PreprocError(f"{path}:{lineno}: attribute id {attr_id}, expected {len(names)} "
                               f"(ids must run 1, 2, ... in order)")
    if not names:
        raise PreprocError(f"{path} lists no attributes: {DOWNLOAD}")
    check_class_names("cub", names, path, f"CUB's file lists its 312 attributes by id; {DOWNLOAD}")
    return len(names)


def read_images(path: Path) -> dict[int, str]:
    """Image id -> relative path, in images.txt order."""
    images: dict[int, str] = {}
    for lineno, (image_id, image_path) in read_rows(require(path, DOWNLOAD), 2, 2):
        key = parse_int(path, lineno, image_id)
        if key in images:
            raise PreprocError(f"{path}:{lineno}: image id {key} is listed twice")
        images[key] = image_path
    if not images:
        raise PreprocError(f"{path} lists no images: {DOWNLOAD}")
    return images


def read_split(path: Path, images: dict[int, str]) -> dict[int, int]:
    """Image id -> is_train, for exactly the ids of images.txt."""
    is_train: dict[int, int] = {}
    for lineno, (image_id, flag) in read_rows(require(path, DOWNLOAD), 2, 2):
        key = parse_int(path, lineno, image_id)
        if key not in images or key in is_train:
            raise PreprocError(f"{path}:{lineno}: image id {key} is unknown to images.txt or "
                               f"listed twice")
        is_train[key] = parse_int(path, lineno, flag, {0, 1})
    if len(is_train) != len(images):
        raise PreprocError(f"{path} covers {len(is_train)} images but images.txt lists "
                           f"{len(images)}: re-extract CUB_200_2011.tgz")
    return is_train


def read_attribute_labels(path: Path, images: dict[int, str], num_attributes: int) -> np.ndarray:
    """(N, A) float64 is_present matrix, rows in images.txt order; every pair exactly once."""
    row_of = {image_id: row for row, image_id in enumerate(images)}
    labels = np.full((len(images), num_attributes), -1.0)
    for lineno, fields in read_rows(require(path, DOWNLOAD), 3):
        try:
            image_id, attr_id, present = int(fields[0]), int(fields[1]), int(fields[2])
        except ValueError:
            raise PreprocError(f"{path}:{lineno}: expected integers <image id> <attribute id> "
                               f"<is_present> ...") from None
        row = row_of.get(image_id)
        if row is None or not 1 <= attr_id <= num_attributes or present not in (0, 1):
            raise PreprocError(f"{path}:{lineno}: image {image_id} / attribute {attr_id} / "
                               f"is_present {present} out of range ({len(images)} images in "
                               f"images.txt, {num_attributes} attributes in attributes.txt)")
        if labels[row, attr_id - 1] != -1:
            raise PreprocError(f"{path}:{lineno}: image {image_id} attribute {attr_id} is labelled twice")
        labels[row, attr_id - 1] = present
    missing = np.argwhere(labels == -1)
    if len(missing):
        row, col = missing[0]
        raise PreprocError(f"{path} has no label for image {list(images)[row]} attribute {col + 1} "
                           f"({len(missing)} labels missing): re-extract CUB_200_2011.tgz")
    return labels


def format_cub(load_path: Path, save_path: Path) -> list[str]:
    """Read the raw CUB files under load_path, save the formatted files; return a report."""
    cub_dir = require(load_path / "CUB_200_2011", DOWNLOAD)
    num_attributes = read_attribute_count(load_path / "attributes.txt")
    images = read_images(cub_dir / "images.txt")
    is_train = read_split(cub_dir / "train_test_split.txt", images)
    labels = read_attribute_labels(cub_dir / "attributes" / "image_attribute_labels.txt",
                                   images, num_attributes)
    train_mask = np.array([is_train[image_id] == 1 for image_id in images])
    paths = list(images.values())
    phases = {phase: ([p for p, keep in zip(paths, mask) if keep], labels[mask])
              for phase, mask in (("train", train_mask), ("val", ~train_mask))}
    removed = save_formatted(save_path, phases, dict.fromkeys(phases, cub_dir / "train_test_split.txt"), DOWNLOAD)
    return [f"cub {phase}: {len(rows)} images, {num_attributes} attributes written to {save_path}"
            for phase, (rows, _) in phases.items()] + removed


def main(argv: list[str] | None = None) -> int:
    parser = dataset_parser("format_cub.py", "cub", __doc__.splitlines()[0])
    return run_cli(parser, lambda args: format_cub(Path(args.load_path), Path(args.save_path)), argv)


if __name__ == "__main__":
    sys.exit(main())

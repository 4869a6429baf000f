"""Format NUS-WIDE from its raw download into formatted_{train,val}_{images,labels}.npy.

The original VLPL ships only pre-formatted files for NUS-WIDE; this script builds them from the
raw download (load-path relative):
  Concepts81.txt                                   one concept per line; line order = class order
                                                   (checked against text_features/nuswide_classnames.txt)
  ImageList/TrainImagelist.txt, TestImagelist.txt  one image per line, e.g. `actor\\0001_2124494179.jpg`
  Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt / _Test.txt
                                                   one 0/1 per line, aligned with the image list
  Flickr/<folder>/<file>.jpg                       the images
The Train list becomes "train", the Test list "val" (the test set). Rows keep list order; image
paths are relative to Flickr/ with forward slashes. Images missing on disk and images with none of
the concepts (about 22% of NUS-WIDE) are counted and reported; by default both are left out
(--missing-images, --no-label).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/format_nuswide.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from preproc._common import (PreprocError, add_missing_images_flag, check_class_names, dataset_parser, parse_int,
                             read_rows, require, run_cli, save_formatted)

PHASES = (("Train", "train"), ("Test", "val"))  # (NUS-WIDE list name, our phase)
DOWNLOAD = ("download the NUS-WIDE image lists, ground truth and Concepts81.txt and extract them "
            "into the --load-path folder (see data/nuswide/README.md)")
DOWNLOAD_IMAGES = ("download Flickr.zip (the NUS-WIDE images) and extract it into the --load-path "
                   "folder (see data/nuswide/README.md)")


def read_concepts(path: Path) -> list[str]:
    concepts = [fields[0] for _, fields in read_rows(require(path, DOWNLOAD), 1, 1)]
    if not concepts or len(set(concepts)) != len(concepts):
        raise PreprocError(f"{path} is empty or repeats a concept: {DOWNLOAD}")
    check_class_names("nuswide", concepts, path, f"NUS-WIDE's file lists the 81 concepts alphabetically; {DOWNLOAD}")
    return concepts


def read_image_list(path: Path) -> list[str]:
    """Image paths relative to Flickr/, Windows backslashes turned into forward slashes; an image
    listed twice is refused (its rows would be one picture counted twice, in training or in the test mAP)."""
    images, seen = [], {}
    for lineno, fields in read_rows(require(path, DOWNLOAD), 1, 1):
        image = fields[0].replace("\\", "/")
        if image in seen:
            raise PreprocError(f"{path}:{lineno}: image {image} is listed a second time (first on line "
                               f"{seen[image]}): {DOWNLOAD}")
        seen[image] = lineno
        images.append(image)
    return images


def read_label_column(path: Path, num_rows: int) -> np.ndarray:
    """(num_rows,) bool column of one concept; every non-blank line holds exactly 0 or 1."""
    require(path, DOWNLOAD)
    try:
        tokens = np.array(path.read_text(encoding="utf-8-sig").split())
    except (OSError, UnicodeDecodeError) as err:
        raise PreprocError(f"cannot read {path}: {err}") from None
    if len(tokens) == num_rows and np.isin(tokens, ("0", "1")).all():
        return tokens == "1"
    # Slow pass only to name the offending line.
    count = 0
    for lineno, (value,) in read_rows(path, 1, 1):
        parse_int(path, lineno, value, {0, 1})
        count += 1
    raise PreprocError(f"{path} has {count} labels but the image list has {num_rows} images: "
                       f"re-extract the NUS-WIDE ground truth")


def image_list_path(load_path: Path, list_name: str) -> Path:
    return load_path / "ImageList" / f"{list_name}Imagelist.txt"


def read_phase(load_path: Path, concepts: list[str], list_name: str, images: list[str], *, drop_missing: bool,
               drop_unlabelled: bool) -> tuple[list[str], np.ndarray, str]:
    """Return (image paths, (N, K) float64 labels, report text) for one NUS-WIDE list, whose
    images (read_image_list) are given."""
    list_path = image_list_path(load_path, list_name)
    label_dir = load_path / "Groundtruth" / "TrainTestLabels"
    labels = np.zeros((len(images), len(concepts)))
    for k, concept in enumerate(concepts):
        labels[:, k] = read_label_column(label_dir / f"Labels_{concept}_{list_name}.txt", len(images))

    flickr = require(load_path / "Flickr", DOWNLOAD_IMAGES)
    on_disk = np.array([(flickr / image).is_file() for image in images], dtype=bool)
    labelled = labels.any(axis=1)
    num_missing = int((~on_disk).sum())
    if num_missing and not drop_missing:
        first = images[int(np.argmin(on_disk))]
        raise PreprocError(f"{num_missing} images of {list_path} are missing under {flickr} "
                           f"(first: {first}): {DOWNLOAD_IMAGES}, or pass --missing-images drop")
    keep = np.ones(len(images), dtype=bool)
    if drop_missing:
        keep &= on_disk
    if drop_unlabelled:
        keep &= labelled
    report = (f"{len(images)} listed, {num_missing} missing under {flickr}"
              f"{' (left out)' if num_missing else ''}, {int((~labelled).sum())} with no label "
              f"({'left out' if drop_unlabelled else 'kept'})")
    return [image for image, k in zip(images, keep) if k], labels[keep], report


def format_nuswide(load_path: Path, save_path: Path, *, missing_images: str = "drop",
                   no_label: str = "drop") -> list[str]:
    """Read the raw NUS-WIDE files under load_path, save the formatted files; return a report."""
    concepts = read_concepts(load_path / "Concepts81.txt")
    lists = {list_name: read_image_list(image_list_path(load_path, list_name)) for list_name, _ in PHASES}
    shared = set(lists["Train"]).intersection(lists["Test"])
    if shared:
        raise PreprocError(f"{len(shared)} images (e.g. {min(shared)}) are in both the Train and Test lists of "
                           f"{load_path / 'ImageList'}: a test image would be trained on; {DOWNLOAD}")
    phases, reports = {}, []
    for list_name, phase in PHASES:
        images, labels, report = read_phase(load_path, concepts, list_name, lists[list_name],
                                            drop_missing=missing_images == "drop",
                                            drop_unlabelled=no_label == "drop")
        if not images:
            raise PreprocError(f"no {list_name} image of {load_path} is left to write ({report})")
        phases[phase] = (images, labels)
        reports.append(f"nuswide {phase} ({list_name} list): {report}; {len(images)} images, "
                       f"{len(concepts)} classes written to {save_path}")
    sources = {phase: image_list_path(load_path, list_name) for list_name, phase in PHASES}
    return reports + save_formatted(save_path, phases, sources, DOWNLOAD)


def main(argv: list[str] | None = None) -> int:
    parser = dataset_parser("format_nuswide.py", "nuswide", __doc__.splitlines()[0])
    parser.add_argument("--no-label", choices=("drop", "keep"), default="drop",
                        help="images that carry none of the 81 concepts (about 22%% of NUS-WIDE): "
                             "'drop' leaves them out, like the pre-formatted files the original "
                             "was run on, where every image has a label; 'keep' writes them with "
                             "an all-zero label row (they never get an observed positive) "
                             "(default: drop)")
    add_missing_images_flag(parser, "listed images absent under Flickr/")

    def body(args):
        return format_nuswide(Path(args.load_path), Path(args.save_path),
                              missing_images=args.missing_images, no_label=args.no_label)

    return run_cli(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())

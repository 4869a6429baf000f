"""Format OpenImages V6 with its human-verified partial annotations into int8 annotation tables.

Reads (paths relative to --load-path, default data/openimages; every name can be changed by a flag):
  oidv6-class-descriptions.csv   LabelName,DisplayName: the name of every class MID (19,994 in the copy
                                 PartialLabelingCSL ships in data/)
  oidv6-classes-trainable.txt    one MID per line: the classes, in this order (9,605 in V6)
  oidv6-train-annotations-human-imagelabels.csv, test-annotations-human-imagelabels.csv
  (validation-annotations-human-imagelabels.csv with --validation train)
                                 ImageID,Source,LabelName,Confidence: one human verification per row,
                                 Confidence 1 = the class is present, 0 = it is absent
  train/<ImageID>.jpg, test/<ImageID>.jpg (validation/...)   the images: PartialLabelingCSL's resized
                                 archive (OpenImages.md) or the official images

Writes (--save-path, default data/openimages), through one atomic replace:
  formatted_train_images.npy, formatted_train_labels.npy   the official train split (main_clip cuts our
                                 train and val splits from it, as for every dataset)
  formatted_val_images.npy, formatted_val_labels.npy       the official test split: our test set
  classnames.txt, class_ids.txt  the display names and MIDs of the classes, one per line, in class order

Each labels file is an (N, K) int8 table of annotation states (label_tables.py): 1 positive
(Confidence 1), -1 annotated negative (Confidence 0), 0 unannotated (no row). Nothing is
simulated: the observed labels are the annotations. Rows are the images in order of first
appearance in the CSV (the official files are sorted by ImageID); image paths are relative to
--load-path. Left out, and counted in the report: images missing from their folder, and images
whose rows name no trainable class (or only classes whose verifications contradict each other).
Rows on classes outside the trainable list are ignored (counted); a repeated (image, class)
verification is kept once, and an (image, class) verified both present and absent is left
unannotated (counted).

Scale: the CSVs are streamed (csv module), the annotations kept as compact (row, class, state)
triplets, and each table written in blocks of rows; no dense matrix, int8 or float, is ever held
whole (bench/bench_openimages_labels.py measures the peak memory).
"""
from __future__ import annotations

import array
import csv
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/format_openimages.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from files import replace_all
from preproc._common import PreprocError, add_missing_images_flag, dataset_parser, require, run_cli

DOWNLOAD = ("download the OpenImages V6 class descriptions, the trainable class list and the human-verified "
            "image-level label CSVs into the --load-path folder (see data/openimages/README.md)")
COLUMNS = ("ImageID", "LabelName", "Confidence")
WRITE_ROWS = 4096  # rows of a table written at a time


def _rows(path: Path):
    """(line number, fields) of a CSV file, streamed; one-line errors name the file."""
    require(path, DOWNLOAD)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for lineno, fields in enumerate(csv.reader(handle), start=1):
                if fields:
                    yield lineno, fields
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PreprocError(f"cannot read {path}: {err}") from None


def read_descriptions(path: Path) -> dict[str, str]:
    """MID -> display name (a header row LabelName,DisplayName is skipped). A name is written as one
    line of classnames.txt: any run of white space in it (a quoted line break, a tab) becomes one
    space, and a name left empty is no name (the class keeps its MID, as one without a description)."""
    names = {}
    for lineno, fields in _rows(path):
        if lineno == 1 and fields[:2] == ["LabelName", "DisplayName"]:
            continue
        if len(fields) < 2:
            raise PreprocError(f"{path}:{lineno}: expected LabelName,DisplayName, got {','.join(fields)[:80]!r}")
        name = " ".join(fields[1].split())
        if name:
            names.setdefault(fields[0].strip(), name)
    return names


MID = re.compile(r"/[a-z]+/[0-9A-Za-z_]+")  # Freebase / Knowledge Graph ids: /m/011k07, /g/11bc5p4lb3


def read_trainable(path: Path) -> list[str]:
    """The class MIDs in file order; a line that is not a MID (an error page saved under the file's
    name), a repeated MID or an empty list is an error."""
    mids = []
    for lineno, fields in _rows(path):
        mid = fields[0].strip()
        if mid and not MID.fullmatch(mid):
            raise PreprocError(f"{path}:{lineno}: {mid[:60]!r} is not a class MID (such as /m/011k07): is this the "
                               f"official file? {DOWNLOAD}")
        if mid:
            mids.append(mid)
    if not mids:
        raise PreprocError(f"{path} lists no class: {DOWNLOAD}")
    if len(set(mids)) != len(mids):
        raise PreprocError(f"{path} repeats a class MID")
    return mids


def _confidence(path: Path, lineno: int, text: str) -> int:
    """State of a Confidence value: 1 -> 1 (positive), 0 -> -1 (annotated negative)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value == 1.0:
        return 1
    if value == 0.0:
        return -1
    raise PreprocError(f"{path}:{lineno}: Confidence {text!r} is neither 0 nor 1 (is this a machine-generated "
                       "label file? use the human-verified one)")


def read_annotations(path: Path, class_index: dict[str, int], folder: str, ids: dict, images: list[str],
                     triplets: tuple, counts: dict) -> None:
    """Stream one label CSV: every row on a trainable class becomes a (row, class, state) triplet;
    row = the image's position among `images` (paths folder/<ImageID>.jpg, added in order of first
    appearance). counts['other_classes'] counts the rows on other classes."""
    rows, classes, states = triplets
    position = None
    for lineno, fields in _rows(path):
        if position is None:  # the header
            missing = [name for name in COLUMNS if name not in fields]
            if missing:
                raise PreprocError(f"{path}:{lineno}: the header lacks {', '.join(missing)} (expected "
                                   f"ImageID,Source,LabelName,Confidence): {DOWNLOAD}")
            position = [fields.index(name) for name in COLUMNS]
            header_fields = len(fields)
            continue
        try:
            image_id, mid, confidence = (fields[i] for i in position)
        except IndexError:
            raise PreprocError(f"{path}:{lineno}: expected {header_fields} fields as in the header, "
                               f"got {len(fields)}: {','.join(fields)[:80]!r}") from None
        state = _confidence(path, lineno, confidence)
        image = f"{folder}/{image_id}.jpg"
        row = ids.get(image)
        if row is None:
            row = ids[image] = len(images)
            images.append(image)
        k = class_index.get(mid)
        if k is None:
            counts["other_classes"] += 1
            continue
        rows.append(row)
        classes.append(k)
        states.append(state)
    if position is None:
        raise PreprocError(f"{path} is empty: {DOWNLOAD}")


def resolve(rows: np.ndarray, classes: np.ndarray, states: np.ndarray, num_classes: int):
    """Triplets sorted by (row, class), one per pair: a repeated verification kept once, a pair
    verified both present and absent made 0 (unannotated). Returns (rows, classes, states, rows
    repeating a verification, pairs verified both ways)."""
    key = rows.astype(np.int64) * num_classes + classes
    order = np.argsort(key, kind="stable")
    key, states = key[order], states[order]
    del order
    if not len(key):
        return key, key, states, 0, 0
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    low, high = np.minimum.reduceat(states, starts), np.maximum.reduceat(states, starts)
    conflicting = low != high
    repeats = np.diff(np.r_[starts, len(key)]) - 1
    key = key[starts]
    return (key // num_classes, key % num_classes, np.where(conflicting, 0, low).astype(np.int8),
            int(repeats[~conflicting].sum()), int(conflicting.sum()))


def present_files(folder: Path) -> set[str]:
    """Names of the files in one image folder (read once: a stat per image is slow on millions)."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries}
    except OSError as err:
        raise PreprocError(f"cannot list image folder {folder}: {err.strerror or err}") from None


def table_writer(rows: np.ndarray, classes: np.ndarray, states: np.ndarray, num_rows: int, num_classes: int):
    """write(handle) of the (num_rows, num_classes) int8 .npy, block by block from sorted triplets."""
    def write(handle):
        np.lib.format.write_array_header_1_0(
            handle, {"descr": np.dtype(np.int8).str, "fortran_order": False, "shape": (num_rows, num_classes)})
        bounds = np.searchsorted(rows, np.arange(0, num_rows + WRITE_ROWS, WRITE_ROWS))
        for b, r0 in enumerate(range(0, num_rows, WRITE_ROWS)):
            block = np.zeros((min(WRITE_ROWS, num_rows - r0), num_classes), dtype=np.int8)
            a, z = bounds[b], bounds[b + 1]
            block[rows[a:z] - r0, classes[a:z]] = states[a:z]
            handle.write(block.tobytes())
    return write


def format_phase(load_path: Path, sources: list[tuple[Path, str]], class_index: dict[str, int], *,
                 drop_missing: bool) -> tuple[np.ndarray, dict, list[str]]:
    """The image paths, the writer of the annotation table and the report of one formatted phase.
    sources: (label CSV, image folder relative to load_path) pairs, read in order."""
    num_classes = len(class_index)
    ids: dict[str, int] = {}
    images: list[str] = []
    triplets = (array.array("q"), array.array("i"), array.array("b"))
    counts = {"other_classes": 0}
    for csv_path, folder in sources:
        read_annotations(csv_path, class_index, folder, ids, images, triplets, counts)
    del ids
    rows, classes, states = (np.frombuffer(t, dtype=d) if len(t) else np.zeros(0, d)
                             for t, d in zip(triplets, (np.int64, np.int32, np.int8)))
    rows, classes, states, repeated, conflicting = resolve(rows, classes, states, num_classes)
    del triplets

    on_disk = np.ones(len(images), dtype=bool)
    for _, folder in sources:
        root = require(load_path / folder, "extract the images there (see data/openimages/README.md)")
        names = present_files(root)
        prefix = len(folder) + 1
        for i, image in enumerate(images):
            if image.startswith(folder + "/") and image[prefix:] not in names:
                on_disk[i] = False
    annotated = np.zeros(len(images), dtype=bool)
    annotated[rows[states != 0]] = True
    num_missing = int((~on_disk).sum())
    if num_missing and not drop_missing:
        first = images[int(np.argmin(on_disk))]
        raise PreprocError(f"{num_missing} images of {', '.join(str(p) for p, _ in sources)} are missing under "
                           f"{load_path} (first: {first}): extract the images, or pass --missing-images drop")
    keep = annotated & on_disk
    new_row = np.cumsum(keep) - 1
    kept = keep[rows] & (states != 0)
    rows, classes, states = new_row[rows[kept]], classes[kept], states[kept]
    paths = np.array([image for image, k in zip(images, keep) if k], dtype=str)
    n = len(paths)
    report = {"images": len(images), "missing": num_missing, "unannotated": int((on_disk & ~annotated).sum()),
              "kept": n, "positives": int((states == 1).sum()), "negatives": int((states == -1).sum()),
              "other_classes": counts["other_classes"], "repeated": repeated, "conflicting": conflicting}
    return paths, table_writer(rows, classes, states, n, num_classes), report


def _report_line(phase: str, sources: list[tuple[Path, str]], r: dict, num_classes: int) -> str:
    n = max(r["kept"], 1)
    names = " + ".join(p.name for p, _ in sources)
    return (f"openimages {phase} ({names}): {r['images']:,} images with labels; {r['missing']:,} missing from "
            f"their folder (left out); {r['unannotated']:,} without an annotation on a trainable class (left "
            f"out); {r['kept']:,} images x {num_classes:,} classes, {r['positives'] / n:.2f} positives and "
            f"{r['negatives'] / n:.2f} annotated negatives per image; {r['other_classes']:,} rows on other "
            f"classes ignored, {r['repeated']:,} repeated verifications merged, {r['conflicting']:,} pairs "
            "verified both present and absent left unannotated")


def format_openimages(load_path: Path, save_path: Path, *, descriptions: str, classes: str, train_labels: str,
                      test_labels: str, validation_labels: str, train_images: str, test_images: str,
                      validation_images: str, validation: str = "skip", missing_images: str = "drop") -> list[str]:
    """Read the official files under load_path, write the formatted files to save_path; return the report."""
    names = read_descriptions(load_path / descriptions)
    mids = read_trainable(load_path / classes)
    unnamed = [mid for mid in mids if mid not in names]
    class_index = {mid: k for k, mid in enumerate(mids)}
    phases = {"train": [(load_path / train_labels, train_images)], "val": [(load_path / test_labels, test_images)]}
    if validation == "train":
        phases["train"].append((load_path / validation_labels, validation_images))
    reports = [f"openimages classes: {len(mids):,} trainable ({classes}) of {len(names):,} described "
               f"({descriptions}){f'; {len(unnamed)} without a description keep their MID as name' if unnamed else ''}"]
    writers = {}
    for phase, sources in phases.items():
        paths, write_table, report = format_phase(load_path, sources, class_index,
                                                  drop_missing=missing_images == "drop")
        if not len(paths):
            raise PreprocError(f"no {phase} image of {load_path} is left to write "
                               f"({report['images']} with labels, {report['missing']} missing)")
        writers[save_path / f"formatted_{phase}_images.npy"] = (
            lambda handle, paths=paths: np.save(handle, paths, allow_pickle=False))
        writers[save_path / f"formatted_{phase}_labels.npy"] = write_table
        reports.append(_report_line(phase if phase == "train" else "test (the val files)", sources, report,
                                    len(mids)))
    for name, lines in (("classnames.txt", [names.get(mid, mid) for mid in mids]), ("class_ids.txt", mids)):
        text = "".join(line + "\n" for line in lines).encode("utf-8")
        writers[save_path / name] = lambda handle, text=text: handle.write(text)
    try:
        save_path.mkdir(parents=True, exist_ok=True)
        replace_all(writers)
    except OSError as err:
        raise PreprocError(f"cannot write {save_path}: {err.strerror or err}") from None
    reports.append(f"written to {save_path}: formatted_{{train,val}}_{{images,labels}}.npy, classnames.txt, "
                   "class_ids.txt")
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = dataset_parser("format_openimages.py", "openimages", __doc__.splitlines()[0])
    parser.add_argument("--descriptions", default="oidv6-class-descriptions.csv",
                        help="class MIDs and display names, relative to --load-path (default: %(default)s)")
    parser.add_argument("--classes", default="oidv6-classes-trainable.txt",
                        help="the class list, one MID per line (default: %(default)s)")
    parser.add_argument("--train-labels", default="oidv6-train-annotations-human-imagelabels.csv",
                        help="human-verified train labels (default: %(default)s)")
    parser.add_argument("--test-labels", default="test-annotations-human-imagelabels.csv",
                        help="human-verified test labels: the test set (default: %(default)s)")
    parser.add_argument("--validation-labels", default="validation-annotations-human-imagelabels.csv",
                        help="human-verified validation labels, read with --validation train (default: %(default)s)")
    parser.add_argument("--train-images", default="train", help="folder of the train images (default: %(default)s)")
    parser.add_argument("--test-images", default="test", help="folder of the test images (default: %(default)s)")
    parser.add_argument("--validation-images", default="validation",
                        help="folder of the validation images (default: %(default)s)")
    parser.add_argument("--validation", choices=("skip", "train"), default="skip",
                        help="the official validation split: 'skip' leaves it out (PartialLabelingCSL's archive "
                             "has train and test only; our val split is cut from train, as for every dataset), "
                             "'train' adds it to the train split (default: skip)")
    add_missing_images_flag(parser, "labelled images absent from their folder")

    def body(args):
        return format_openimages(
            Path(args.load_path), Path(args.save_path), descriptions=args.descriptions, classes=args.classes,
            train_labels=args.train_labels, test_labels=args.test_labels, validation_labels=args.validation_labels,
            train_images=args.train_images, test_images=args.test_images, validation_images=args.validation_images,
            validation=args.validation, missing_images=args.missing_images)

    return run_cli(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())

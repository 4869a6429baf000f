"""Format MS-COCO 2014 into formatted_{train,val}_{images,labels}.npy as the original VLPL does.

docs/original-vlpl.md section 2 (faithful).

For phase in (train, val), annotations/instances_<phase>2014.json is read. Class index = position
of the category in the file's `categories` list (both files must list the same categories in the
same order, and their names must be, in that order, those of text_features/coco_classnames.txt). Rows are the distinct image ids with at least one annotation, sorted as decimal
strings ("100" before "25"); label 1 for every category annotated in the image. Image path:
`<phase>2014/COCO_<phase>2014_<image id zero-padded to 12 digits>.jpg`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/format_coco.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from preproc._common import PreprocError, check_class_names, dataset_parser, require, run_cli, save_formatted

PHASES = ("train", "val")
DOWNLOAD = ("download annotations_trainval2014.zip from https://cocodataset.org and extract it into "
            "the --load-path folder (see data/coco/README.md)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_instances(path: Path) -> dict:
    """The parsed JSON file, checked to hold `categories` and `annotations` lists."""
    require(path, DOWNLOAD)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise PreprocError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); {DOWNLOAD}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PreprocError(f"cannot read {path}: {err}") from None
    if not (isinstance(data, dict) and isinstance(data.get("categories"), list)
            and isinstance(data.get("annotations"), list)):
        raise PreprocError(f"{path} is not a COCO instances file (it needs 'categories' and "
                           f"'annotations' lists)")
    return data


def read_categories(path: Path, data: dict) -> list[tuple[int, str]]:
    """(category id, name) in file order; the position is the class index."""
    categories = []
    for i, category in enumerate(data["categories"]):
        if not (isinstance(category, dict) and _is_int(category.get("id"))
                and isinstance(category.get("name"), str)):
            raise PreprocError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name'")
        categories.append((category["id"], category["name"]))
    ids = [cat_id for cat_id, _ in categories]
    if not categories or len(set(ids)) != len(ids):
        raise PreprocError(f"{path}: the categories list is empty or repeats an id")
    return categories


def read_phase(path: Path, data: dict, phase: str,
               class_of: dict[int, int]) -> tuple[list[str], np.ndarray, int]:
    """Return (image paths, (N, K) float64 labels, number of listed images without annotation)."""
    listed = None
    if isinstance(data.get("images"), list):
        listed = {image.get("id") for image in data["images"] if isinstance(image, dict)}
    rows, cols = [], []
    for j, ann in enumerate(data["annotations"]):
        if not (isinstance(ann, dict) and _is_int(ann.get("image_id")) and ann["image_id"] >= 0
                and _is_int(ann.get("category_id"))):
            raise PreprocError(f"{path}: annotations[{j}] needs a non-negative integer 'image_id' "
                               f"and an integer 'category_id'")
        if ann["category_id"] not in class_of:
            raise PreprocError(f"{path}: annotations[{j}] has category_id {ann['category_id']}, "
                               f"which is not in the categories list")
        if listed is not None and ann["image_id"] not in listed:
            raise PreprocError(f"{path}: annotations[{j}] refers to image {ann['image_id']}, "
                               f"which is not in the images list")
        rows.append(ann["image_id"])
        cols.append(class_of[ann["category_id"]])
    # Sorting the ids as strings keeps the original's row order.
    ids = sorted({str(image_id) for image_id in rows})
    row_of = {int(image_id): r for r, image_id in enumerate(ids)}
    labels = np.zeros((len(ids), len(class_of)))
    labels[np.array([row_of[image_id] for image_id in rows], dtype=np.intp),
           np.array(cols, dtype=np.intp)] = 1.0
    images = [f"{phase}2014/COCO_{phase}2014_{int(image_id):012d}.jpg" for image_id in ids]
    unannotated = 0 if listed is None else len(listed) - len(ids)
    return images, labels, unannotated


def format_coco(load_path: Path, save_path: Path) -> list[str]:
    """Read the raw COCO annotation files under load_path, save the formatted files; return a report."""
    paths = {phase: load_path / "annotations" / f"instances_{phase}2014.json" for phase in PHASES}
    for path in paths.values():
        require(path, DOWNLOAD)
    phases, categories = {}, None
    for phase, path in paths.items():
        data = read_instances(path)
        if categories is None:
            categories = read_categories(path, data)
            check_class_names("coco", [name for _, name in categories], path,
                              "the official file lists the 80 COCO categories sorted by id; re-extract "
                              "annotations_trainval2014.zip")
            class_of = {cat_id: k for k, (cat_id, _) in enumerate(categories)}
        elif read_categories(path, data) != categories:
            raise PreprocError(f"{path}: its categories list differs from the one in "
                               f"{paths['train']} (ids, names or order): re-extract "
                               f"annotations_trainval2014.zip")
        phases[phase] = read_phase(path, data, phase, class_of)
        del data  # the train file is large; free it before reading the next one
    removed = save_formatted(save_path, {phase: (images, labels) for phase, (images, labels, _) in phases.items()},
                             paths, DOWNLOAD)
    return [f"coco {phase}: {len(images)} images, {len(categories)} classes written to {save_path} "
            f"({unannotated} listed images without annotation left out)"
            for phase, (images, _, unannotated) in phases.items()] + removed


def main(argv: list[str] | None = None) -> int:
    parser = dataset_parser("format_coco.py", "coco", __doc__.splitlines()[0])
    return run_cli(parser, lambda args: format_coco(Path(args.load_path), Path(args.save_path)), argv)


if __name__ == "__main__":
    sys.exit(main())

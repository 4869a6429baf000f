"""Formatted multi-label datasets: loading, checking and the train/val/test split.

Every dataset lives in ``<data_root>/<name>/`` as six numpy files written by ``preproc/``
(docs/original-vlpl.md section 2): ``formatted_{train,val}_images.npy`` (1-D unicode paths relative to the
dataset's image folder), ``formatted_{train,val}_labels.npy`` ((N, K) 0/1 ground truth) and
``formatted_{train,val}_labels_obs.npy`` ((N, K) observed labels in {-1, 0, 1}).
The official "val" split is our test set; the official train split is cut into train and val.

A dataset may add ``formatted_{train,val}_ignore.npy``: an (N, K) bool mask of the entries that no
metric counts (SGRE's ``ignore.npy``, github.com/jasonseu/SGRE scripts/voc2007.py: a VOC2007 test
image whose objects of a class are all "difficult"); their label in ``formatted_*_labels.npy`` is 0.
Without the file every entry counts.

An image file is read by image_io.py; the images of a split as a torch Dataset are image_dataset.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import fingerprint
import label_tables
from config import DATASETS, DEFAULT_DIRS, DatasetInfo, VLPLError  # DATASETS: each dataset's facts in one row

SPLIT_SEED = 1200
VAL_FRACTION = 0.2


class DataError(VLPLError):
    """A missing or inconsistent data file; the message names the file and what to do."""


@dataclass
class Split:
    """labels_true and labels_obs are float32 numpy arrays, or, for a dataset of real partial
    annotations (DatasetInfo.annotated), one and the same label_tables.Annotations table (int8
    states read lazily; the observed labels are the annotations)."""
    images: np.ndarray  # (N,) str, relative to the image folder
    labels_true: np.ndarray  # (N, K) float32 in {0, 1}
    labels_obs: np.ndarray  # (N, K) float32 in {-1, 0, 1}
    ignore: np.ndarray | None = None  # (N, K) bool: entries no metric counts (formatted_*_ignore.npy)
    _stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.images)

    def counted(self, rows=slice(None)) -> np.ndarray | None:
        """The (n, K) bool mask of the entries of `rows` that metrics count (metrics' `mask`), or
        None when every entry counts."""
        return None if self.ignore is None else ~self.ignore[rows]

    def stats(self, root: Path) -> np.ndarray:
        """(N, 2) int64 size and modification time of each image under root (fingerprint.image_stats),
        taken once: the existence check, the input fingerprint and the pack checks share them."""
        key = str(root)
        if key not in self._stats:
            self._stats[key] = fingerprint.image_stats(root, self.images)
        return self._stats[key]


def _spec(dataset: str) -> DatasetInfo:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}") from None


def image_root(data_root: str | Path, dataset: str) -> Path:
    """Folder that the paths in formatted_*_images.npy are relative to."""
    return Path(data_root) / dataset / _spec(dataset).image_dir


def split_indices(num_rows: int, val_fraction: float = VAL_FRACTION,
                  seed: int = SPLIT_SEED, max_val: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut the official train split into (train, val) row indices, both sorted (docs/original-vlpl.md section 4).

    ``n_val = int(np.round(val_fraction * num_rows))``; ``perm = RandomState(seed).permutation(num_rows)``;
    train = ``sort(perm[:num_rows - n_val])``, val = ``sort(perm[num_rows - n_val:])``.
    The original takes ``perm[-n_val:]``, which is the whole permutation when n_val is 0; here val is
    then empty (identical for every n_val > 0). max_val: n_val is at most this (DatasetInfo.max_val_images).
    """
    n_val = int(np.round(val_fraction * num_rows))
    if max_val is not None:
        n_val = min(n_val, max_val)
    n_train = num_rows - n_val
    perm = np.random.RandomState(seed).permutation(num_rows)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def metric_rows(num_rows: int, limit: int | None, seed: int = SPLIT_SEED) -> np.ndarray | None:
    """The sorted rows of a train split whose predictions the train phase keeps for its metrics line
    (DatasetInfo.train_metric_rows): `limit` rows drawn by RandomState(seed), or None (every row) when
    there is no limit or the split is not larger."""
    if limit is None or num_rows <= limit:
        return None
    return np.sort(np.random.RandomState(seed).permutation(num_rows)[:limit])


def _data_root_flag(data_root: str | Path | None) -> str:
    """' --data-root X' for a hint's command, '' for the default data folder (or when not known)."""
    if data_root is None or Path(data_root).resolve() == Path(DEFAULT_DIRS["data"]).resolve():
        return ""
    return f" --data-root {data_root}"


def demo_hint(data_root: str | Path | None = None) -> str:
    return f"run `python main_clip.py -d demo{_data_root_flag(data_root)}` (it creates the demo data)"


def observed_labels_hint(dataset: str, data_root: str | Path | None = None) -> str:
    """What to run when formatted_*_labels_obs.npy is missing (with --data-root where it is not the default)."""
    if dataset == "demo":
        return demo_hint(data_root)
    return f"run `python preproc/generate_observed_labels.py --dataset {dataset}{_data_root_flag(data_root)}`"


# Partial annotations (docs/partial-labels.md): formatted_train_labels_obs_<TAG>.npy, TAG rps<P> or
# fpc<N>, written by preproc/generate_observed_labels.py --scheme rps|fpc (train split only).
_TAG_PATTERN = re.compile(r"(rps)(\d+(?:\.\d*)?|\.\d+)|(fpc)(\d+)")


def observed_file_name(tag: str | None, phase: str = "train") -> str:
    """formatted_<phase>_labels_obs.npy (single positive, tag None) or ..._obs_<tag>.npy."""
    return f"formatted_{phase}_labels_obs.npy" if tag is None else f"formatted_{phase}_labels_obs_{tag}.npy"


# --observed full: every training label observed (1 positive, -1 negative), made from
# formatted_train_labels.npy itself (no file); an entry of formatted_train_ignore.npy stays unknown (0).
FULL_OBSERVED = "full"


def full_observed(labels: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """Observed labels (N, K) float32 of fully labelled training: 1 where labels is 1, -1 where it is
    0, and 0 (unknown) at the ignored entries."""
    observed = np.where(labels == 1, 1.0, -1.0).astype(np.float32)
    if ignore is not None:
        observed[ignore] = 0.0
    return observed


def parse_observed_tag(tag: str) -> tuple[str, float | int] | None:
    """('rps', P) for 'rps<P>', ('fpc', N) for 'fpc<N>', None for any other tag."""
    match = _TAG_PATTERN.fullmatch(tag)
    if match is None:
        return None
    return ("rps", float(match.group(2))) if match.group(1) else ("fpc", int(match.group(4)))


def canonical_observed_tag(scheme: str, param: float | int) -> str:
    """The tag generate_observed_labels.py writes: rps<P> with P as Python prints the float, fpc<N>."""
    return f"rps{float(param)!r}" if scheme == "rps" else f"fpc{int(param)}"


def observed_tag_hint(dataset: str, tag: str, data_root: str | Path = "data") -> str:
    """What to run when formatted_train_labels_obs_<tag>.npy is missing (one line)."""
    parsed = parse_observed_tag(tag)
    if parsed is None:
        return ("tags are rps<P> (each annotation dropped with probability P) or fpc<N> (N positives and N "
                "negatives kept per class), written by `python preproc/generate_observed_labels.py --dataset "
                f"{dataset} --scheme rps --drop-prob 0.5` (tag rps0.5) or `--scheme fpc --per-class 1000` (tag fpc1000)")
    scheme, param = parsed
    canonical = canonical_observed_tag(scheme, param)
    flag = f"--drop-prob {param!r}" if scheme == "rps" else f"--per-class {param}"
    root = _data_root_flag(data_root)
    command = (f"run `python preproc/generate_observed_labels.py --dataset {dataset}{root} --scheme {scheme} "
               f"{flag}`")
    return command if canonical == tag else f"{command}, then pass --observed {canonical}"


def source_files(observed: str | None = None, clean_train_labels: bool = False,
                 unlabelled: bool = False) -> dict[str, dict[str, str]]:
    """The formatted file each array of load_splits' splits comes from: {phase: {field: file name}}
    (val's labels_obs is its labels_true; --observed full and the clean labels come from the labels;
    unlabelled: train's labels_obs are zeros from no file, and val is the test split)."""
    from_labels = clean_train_labels or observed == FULL_OBSERVED
    train_obs = "formatted_train_labels.npy" if from_labels else observed_file_name(observed)
    test = {"images": "formatted_val_images.npy", "labels_true": "formatted_val_labels.npy",
            "ignore": "formatted_val_ignore.npy"}
    if unlabelled:
        return {"train": {"images": "formatted_train_images.npy", "labels_true": "formatted_train_labels.npy",
                          "ignore": "formatted_train_ignore.npy"}, "val": test, "test": test}
    return {"train": {"images": "formatted_train_images.npy", "labels_true": "formatted_train_labels.npy",
                      "labels_obs": train_obs, "ignore": "formatted_train_ignore.npy"},
            "val": {"images": "formatted_train_images.npy", "labels_true": "formatted_train_labels.npy",
                    "ignore": "formatted_train_ignore.npy"},
            "test": test}


def formatting_hint(dataset: str, data_root: str | Path | None = None) -> str:
    """What to run when formatted_*_{images,labels}.npy are missing (writing them under data_root)."""
    if dataset == "demo":
        return demo_hint(data_root)
    save = f" --save-path {Path(data_root) / dataset}" if _data_root_flag(data_root) else ""
    command = DATASETS[dataset].formatter if dataset in DATASETS else f"preproc/format_{dataset}.py"
    return f"see data/{dataset}/README.md and run `python {command}{save}`"


def load_array(path: Path, how_to_create: str) -> np.ndarray:
    """np.load without pickles; DataError naming the file and how_to_create if it is missing or broken."""
    if not path.is_file():
        raise DataError(f"{path} not found: {how_to_create}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable numpy array ({err}): {how_to_create} again") from None


def check_labels(path: Path, labels: np.ndarray, num_classes: int, allowed: tuple[int, ...],
                 num_rows: int | None = None) -> np.ndarray:
    """labels itself if it is (num_rows, num_classes) with values in allowed, else DataError."""
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise DataError(f"{path} has shape {labels.shape}, expected (N, {num_classes}) "
                        f"for {num_classes} classes")
    if num_rows is not None and labels.shape[0] != num_rows:
        raise DataError(f"{path} has {labels.shape[0]} rows but the image list has {num_rows}")
    if not np.isin(labels, allowed).all():
        raise DataError(f"{path} holds values other than {allowed}")
    return labels


def load_ignore(folder: Path, dataset: str, phase: str, num_rows: int, num_classes: int) -> np.ndarray | None:
    """The (N, K) bool mask of formatted_<phase>_ignore.npy (True: no metric counts the entry), or None
    when the dataset has no such file."""
    path = folder / f"formatted_{phase}_ignore.npy"
    if not path.is_file():
        return None
    mask = check_labels(path, load_array(path, formatting_hint(dataset, folder.parent)), num_classes, (0, 1), num_rows)
    return mask.astype(bool)  # bool, or 0/1 as SGRE's ignore.npy


def _load_phase(folder: Path, dataset: str, phase: str, num_classes: int, with_observed: bool,
                observed_tag: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    hint = formatting_hint(dataset, folder.parent)
    images_path = folder / f"formatted_{phase}_images.npy"
    images = load_array(images_path, hint)
    if images.ndim != 1 or images.dtype.kind != "U":
        raise DataError(f"{images_path} must be a 1-D array of strings, got {images.dtype} {images.shape}")
    labels_path = folder / f"formatted_{phase}_labels.npy"
    labels = check_labels(labels_path, load_array(labels_path, hint), num_classes, (0, 1), len(images))
    observed = None
    if with_observed:
        obs_path = folder / observed_file_name(observed_tag, phase)
        hint = (observed_labels_hint(dataset, folder.parent) if observed_tag is None
                else observed_tag_hint(dataset, observed_tag, folder.parent))
        observed = check_labels(obs_path, load_array(obs_path, hint),
                                num_classes, (-1, 0, 1), len(images)).astype(np.float32)
        if not (observed == 1).any():  # e.g. --observed rps1.0: every annotation dropped; nothing to learn from
            raise DataError(f"{obs_path} holds no observed positive at all: nothing to train on; "
                            + ("choose a tag that keeps some (rps<P> with P < 1, fpc<N> with N >= 1)"
                               if observed_tag is not None else f"{hint} again"))
    return images, labels.astype(np.float32), observed


def _check_agrees(path: Path, observed: np.ndarray, labels: np.ndarray, how_to_create: str) -> None:
    """An observed-label file (single positive or partial annotations) is sampled from the true labels:
    an observed positive on a true negative, or an observed negative on a true positive, means it was
    made from other labels (e.g. before the dataset was formatted again)."""
    wrong = int(((observed == 1) & (labels == 0)).sum() + ((observed == -1) & (labels == 1)).sum())
    if wrong:
        redo = (f"{how_to_create} again with --overwrite" if how_to_create.startswith("run `python preproc/generate")
                else how_to_create)  # the demo's hint is a main_clip.py command, which remakes stale demo data
        raise DataError(f"{path} contradicts formatted_train_labels.npy in {wrong} entries (made from other "
                        f"labels?): {redo}")


def load_splits(data_root: str | Path, dataset: str, *, clean_train_labels: bool = False,
                observed: str | None = None, unlabelled: bool = False) -> dict[str, Split]:
    """Load the formatted files and return the 'train', 'val' and 'test' splits (docs/original-vlpl.md section 4).

    train/val are rows of the official train split chosen by :func:`split_indices`; test is the
    official val split. Train carries the observed labels as ``labels_obs`` (the clean labels when
    ``clean_train_labels``, as the original does for the ``bce`` loss); val and test always carry
    the clean labels as ``labels_obs``. Only the train observed-label file is read:
    formatted_train_labels_obs.npy (single positive), or formatted_train_labels_obs_<observed>.npy
    for a partial-annotation tag such as 'rps0.5' (docs/partial-labels.md); ``observed='full'``
    reads none: every label is observed (`full_observed`). Each split carries its rows of
    formatted_*_ignore.npy as ``ignore`` when the dataset has one.

    unlabelled: a method that reads no training label (-l CCD, docs/ccd.md): no observed-label file is
    read (``labels_obs`` of train is zeros), train is the whole official train split (a val split cut from
    it would be selected on labels of the same file), and val is the official val split, the test split
    itself (the same Split object), as CCD's datasets.py makes them. ``labels_true`` of train is read
    for the displays that compare with it (train mAP, pseudo-label quality) and enters nothing else.
    """
    spec = _spec(dataset)
    folder = Path(data_root) / dataset
    if not folder.is_dir():
        raise DataError(f"{folder} not found: {formatting_hint(dataset, data_root)}")
    if spec.annotated:
        return _load_annotated_splits(folder, dataset, spec.num_classes, spec.max_val_images)
    full = observed == FULL_OBSERVED
    images, labels, train_observed = _load_phase(folder, dataset, "train", spec.num_classes,
                                                 with_observed=not (clean_train_labels or full or unlabelled),
                                                 observed_tag=observed)
    test_images, test_labels, _ = _load_phase(folder, dataset, "val", spec.num_classes,
                                              with_observed=False)
    ignore = load_ignore(folder, dataset, "train", len(images), spec.num_classes)
    test_ignore = load_ignore(folder, dataset, "val", len(test_images), spec.num_classes)
    test = Split(test_images, test_labels, test_labels.copy(), test_ignore)
    if unlabelled:
        return {"train": Split(images, labels, np.zeros_like(labels), ignore), "val": test, "test": test}
    train_idx, val_idx = split_indices(len(images))
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"{folder / 'formatted_train_images.npy'} has only {len(images)} rows, too few "
                        f"to cut a train and a val split: {formatting_hint(dataset, data_root)}")
    if full:
        train_observed = full_observed(labels, ignore)
    elif train_observed is not None:  # the single-positive file too: a re-formatted dataset leaves it stale
        _check_agrees(folder / observed_file_name(observed), train_observed, labels,
                      observed_labels_hint(dataset, data_root) if observed is None
                      else observed_tag_hint(dataset, observed, data_root))
    train_obs = labels if train_observed is None else train_observed

    def rows(mask, idx):
        return None if mask is None else mask[idx]
    # Separate arrays for labels_obs, so that updating observed labels (APL) never edits the truth.
    return {
        "train": Split(images[train_idx], labels[train_idx], train_obs[train_idx], rows(ignore, train_idx)),
        "val": Split(images[val_idx], labels[val_idx], labels[val_idx], rows(ignore, val_idx)),
        "test": test,
    }


def _load_annotated_splits(folder: Path, dataset: str, num_classes: int | None,
                           max_val: int | None) -> dict[str, Split]:
    """load_splits of a dataset of real partial annotations: formatted_{train,val}_labels.npy are
    int8 annotation states (label_tables.py), memory-mapped and read lazily; the train/val cut is a
    row selection of the train table, and each split's observed labels are its annotations."""
    hint = formatting_hint(dataset, folder.parent)
    tables = {}
    for phase in ("train", "val"):
        images_path = folder / f"formatted_{phase}_images.npy"
        images = load_array(images_path, hint)
        if images.ndim != 1 or images.dtype.kind != "U":
            raise DataError(f"{images_path} must be a 1-D array of strings, got {images.dtype} {images.shape}")
        labels_path = folder / f"formatted_{phase}_labels.npy"
        if not labels_path.is_file():
            raise DataError(f"{labels_path} not found: {hint}")
        try:
            labels = label_tables.load(labels_path, len(images), num_classes)
        except label_tables.AnnotationError as err:
            raise DataError(f"{err}: {hint}") from None
        if num_classes is None:
            num_classes = labels.shape[1]  # the val file must then have as many
        tables[phase] = images, labels
    images, labels = tables["train"]
    train_idx, val_idx = split_indices(len(images), max_val=max_val)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"{folder / 'formatted_train_images.npy'} has only {len(images)} rows, too few "
                        f"to cut a train and a val split: {hint}")
    splits = {}
    for phase, rows in (("train", train_idx), ("val", val_idx)):
        table = labels.take(rows)
        splits[phase] = Split(images[rows], table, table)
    test_images, test_labels = tables["val"]
    splits["test"] = Split(test_images, test_labels, test_labels)
    return splits


def check_images(root: Path, split: Split, phase: str, dataset: str, skip_bad: bool,
                 data_root: str | Path | None = None) -> list[str]:
    """The image files of a split that do not exist, found before any expensive work.

    Missing files stop the run unless skip_bad; even then a split that is mostly missing (more than
    half) stops it, since that is a wrong image folder rather than a few bad files.
    """
    if not root.is_dir():
        raise DataError(f"image folder {root} of dataset {dataset} not found: check --data-root "
                        f"({formatting_hint(dataset, data_root)})")
    stats = split.stats(root)  # one stat per image, kept for the input fingerprint
    missing = [str(split.images[i]) for i in np.flatnonzero(stats[:, 0] == fingerprint.MISSING)]
    if not missing:
        return []
    what = f"{len(missing)} of {len(split)} {phase} images of dataset {dataset} are missing under {root} " \
           f"(first: {missing[0]})"
    if not skip_bad:
        raise DataError(f"{what}: fix the image folder (--data-root) or pass --skip-bad-images")
    if len(missing) > len(split) // 2:
        raise DataError(f"{what}: wrong image folder? (--data-root); --skip-bad-images skips a few bad "
                        "images, not most of a split")
    return missing

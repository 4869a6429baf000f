"""Sample observed labels from the full labels: single positive (VLPL) or partial (CSL's RPS / FPC).

Observed labels are in {1, 0, -1}: 1 an observed positive, -1 an observed (annotated) negative,
0 unannotated.

--scheme single (default), docs/original-vlpl.md section 3, bit for bit: for phase in (train, val),
formatted_<phase>_labels.npy -> formatted_<phase>_labels_obs.npy in <data-root>/<dataset>/, each
phase with a fresh numpy RandomState(seed).

--scheme rps / fpc: the partial-annotation simulations of PartialLabelingCSL
(Alibaba-MIIL/PartialLabelingCSL, src/helper_functions/coco_simulation.py, simulate_coco), for
the train split only (CSL keeps its validation labels complete; so does this project, whose val
split is cut from the train file with clean labels). formatted_train_labels.npy ->
formatted_train_labels_obs_<tag>.npy, tag rps<P> or fpc<N> (partial_tag), e.g.
formatted_train_labels_obs_rps0.5.npy, formatted_train_labels_obs_fpc1000.npy.

Seeding. CSL draws from numpy's global generator and never seeds it (train.py), so its
simulation is not reproducible. Here the same rule draws the same calls, in the same order, from
a fresh RandomState(--seed): with --seed s the result equals CSL's simulate_coco run right after
np.random.seed(s) on the same label matrix (rows in file order), converted to this convention.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/generate_observed_labels.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import numpy as np

from config import number
from datasets import (DATASETS, DataError, canonical_observed_tag, check_labels, formatting_hint, load_array,
                      observed_file_name)
from preproc._common import PreprocError, run_cli, save_arrays

PHASES = ("train", "val")
SCHEMES = ("single", "rps", "fpc")
CSL_DROP_PROB = 0.5  # README of PartialLabelingCSL: RPS(0.5)
CSL_PER_CLASS = 1000  # README of PartialLabelingCSL: FPC(1000)


def generate_observed(labels: np.ndarray, num_pos: int = 1, num_neg: int = 0,
                      seed: int = 1200) -> np.ndarray:
    """Observed labels (N, K) float32 in {-1, 0, 1} for 0/1 labels (N, K).

    With ``rng = RandomState(seed)`` created here, for each row in order: shuffle the indices of
    its positives with rng and observe the first num_pos as +1; then shuffle the indices of its
    negatives with rng and observe the first num_neg as -1 (-1 = all). The negatives are shuffled
    even when num_neg is 0: the original does, and the draw moves the random stream.
    """
    labels = _check_binary(labels)
    for name, count in (("num_pos", num_pos), ("num_neg", num_neg)):
        if count < -1:
            raise ValueError(f"{name} must be -1 (all) or >= 0, got {count}")
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.float32)
    for row, obs in zip(labels, observed):
        pos = np.nonzero(row == 1)[0]
        rng.shuffle(pos)
        neg = np.nonzero(row == 0)[0]
        rng.shuffle(neg)
        obs[_first(pos, num_pos)] = 1.0
        obs[_first(neg, num_neg)] = -1.0
    return observed


def _first(indices: np.ndarray, count: int) -> np.ndarray:
    return indices if count == -1 else indices[:count]


def _check_binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be an (N, K) array of 0/1, got shape {labels.shape}")
    return labels


def simulate_rps(labels: np.ndarray, drop_prob: float, seed: int = 1200) -> np.ndarray:
    """Random per sample (CSL's RPS): observed labels (N, K) float32 in {-1, 0, 1} for 0/1 labels.

    Every annotation, positive or negative, is dropped independently with probability drop_prob:
    with ``rng = RandomState(seed)``, entry (i, k) is unannotated (0) where
    ``rng.random_sample((N, K))[i, k] < drop_prob``, else it keeps its true label (1 -> 1,
    0 -> -1). One draw for the whole matrix in row-major order, as
    ``np.random.random(S.shape) < param`` in coco_simulation.simulate_coco.
    """
    labels = _check_binary(labels)
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
    dropped = np.random.RandomState(seed).random_sample(labels.shape) < drop_prob
    observed = np.where(labels == 1, 1.0, -1.0).astype(np.float32)
    observed[dropped] = 0.0
    return observed


def simulate_fpc(labels: np.ndarray, per_class: int, seed: int = 1200) -> np.ndarray:
    """Fixed per class (CSL's FPC): observed labels (N, K) float32 in {-1, 0, 1} for 0/1 labels.

    Everything starts unannotated (0). With ``rng = RandomState(seed)``, for k = 0..K-1 in order:
    ``rng.choice(rows with label 1 in column k, min(per_class, their number), replace=False)``
    become 1, then the same draw among the rows with label 0 become -1. So each class keeps at
    most per_class positives and per_class negatives, and many images keep no annotation
    (coco_simulation.simulate_coco, mode fpc; its add_one_label branch is off there).
    """
    labels = _check_binary(labels)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.float32)
    for k in range(labels.shape[1]):
        for value, observed_value in ((1, 1.0), (0, -1.0)):
            rows = np.nonzero(labels[:, k] == value)[0]
            chosen = rng.choice(rows, min(per_class, len(rows)), replace=False)
            observed[chosen, k] = observed_value
    return observed


def partial_tag(scheme: str, param: float) -> str:
    """File tag of a partial scheme: rps<P> with P as Python writes the float (rps0.5), fpc<N>;
    main_clip.py --observed TAG reads formatted_train_labels_obs_<TAG>.npy."""
    if scheme not in ("rps", "fpc"):
        raise ValueError(f"scheme must be rps or fpc, got {scheme!r}")
    return canonical_observed_tag(scheme, param)


def _as_written(observed: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # Same dtype as the labels (float64 from the format scripts), as the original writes.
    return observed.astype(labels.dtype) if labels.dtype.kind == "f" else observed


def _summary(dataset: str, phase: str, observed: np.ndarray, folder: Path, name: str) -> str:
    return (f"{dataset} {phase}: {len(observed)} images, {int((observed == 1).sum())} observed positives, "
            f"{int((observed == -1).sum())} observed negatives, {int((observed == 0).sum())} unannotated "
            f"written to {folder / name}")


class OtherObservedLabels(PreprocError):
    """An observed-label file exists and holds other labels than those to be written (`path`):
    replacing it is the user's decision (`flag`, the caller's option that grants it)."""

    def __init__(self, path: Path, flag: str = "--overwrite"):
        self.path = path
        super().__init__(f"{path} exists and holds other observed labels (other settings or seed, or other labels): "
                         f"pass {flag} to replace it (runs that used it can then no longer be resumed), or choose "
                         "another --data-root")


def _save_new(folder: Path, outputs: dict[str, np.ndarray], overwrite: bool) -> dict[str, str]:
    """Write outputs {file name: array} into folder; returns {file name: 'written' or 'unchanged'}.

    A file that already holds exactly that array is left as it is. One that holds other labels is
    replaced only with `overwrite` (else OtherObservedLabels, nothing written): runs may have trained
    on it, and a run resumed on a file that changed under it stops (fingerprint.py), so replacing it
    is a decision, not a side effect."""
    for name, array in outputs.items():  # main_clip.py refuses such a file; so does its writer, before writing
        if name.startswith("formatted_train_") and not (array == 1).any():
            raise PreprocError(f"{folder / name} would hold no observed positive (--num-pos 0, every annotation "
                               f"dropped, or labels without a positive): no run can train on it; choose settings "
                               f"that keep some (--num-pos >= 1, --drop-prob < 1, --per-class >= 1)")
    status = {}
    for name, array in outputs.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            old = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            old = None  # unreadable: other labels as far as anyone can tell
        if old is not None and old.shape == array.shape and np.array_equal(old, array):  # values: runs read float32
            status[name] = "unchanged"
        elif not overwrite:
            raise OtherObservedLabels(path)
    save_arrays(folder, {name: a for name, a in outputs.items() if name not in status})
    return {name: status.get(name, "written") for name in outputs}


def _run_single(args):
    num_pos = 1 if args.num_pos is None else args.num_pos
    num_neg = 0 if args.num_neg is None else args.num_neg
    for flag, count in (("--num-pos", num_pos), ("--num-neg", num_neg)):
        if count < -1:
            raise PreprocError(f"{flag} must be -1 (all) or >= 0, got {count}")
    return write_single(args.data_root, args.dataset, num_pos, num_neg, args.seed, overwrite=args.overwrite)


def write_single(data_root: str | Path, dataset: str, num_pos: int = 1, num_neg: int = 0, seed: int = 1200, *,
                 overwrite: bool = False) -> list[str]:
    """Sample --scheme single for train and val of <data_root>/<dataset> and write
    formatted_<phase>_labels_obs.npy; returns one summary line per phase. A file of other labels is
    replaced only with `overwrite` (_save_new: OtherObservedLabels). prepare.py's observed step."""
    folder = Path(data_root) / dataset
    outputs, report = {}, []
    for phase in PHASES:
        labels = _load_labels(dataset, folder, phase, DATASETS[dataset].num_classes)
        observed = generate_observed(labels, num_pos, num_neg, seed)
        name = f"formatted_{phase}_labels_obs.npy"
        outputs[name] = _as_written(observed, labels)
        report.append((name, _summary(dataset, phase, observed, folder, name)))
    status = _save_new(folder, outputs, overwrite)
    return [_with_status(line, status[name]) for name, line in report]


def _with_status(line: str, status: str) -> str:
    return line if status == "written" else line.replace(" written to ", " already in ") + " (unchanged)"

def _run_partial(args):
    if args.scheme == "rps":
        param = CSL_DROP_PROB if args.drop_prob is None else args.drop_prob
        if not 0.0 <= param <= 1.0:
            raise PreprocError(f"--drop-prob must be in [0, 1], got {param}")
    else:
        param = CSL_PER_CLASS if args.per_class is None else args.per_class
        if param < 0:
            raise PreprocError(f"--per-class must be >= 0, got {param}")
    return [write_partial(args.data_root, args.dataset, args.scheme, param, args.seed, overwrite=args.overwrite)]


def write_partial(data_root: str | Path, dataset: str, scheme: str, param: float, seed: int = 1200, *,
                  overwrite: bool = False) -> str:
    """Simulate scheme (rps / fpc) with param on <data_root>/<dataset>/formatted_train_labels.npy and
    write formatted_train_labels_obs_<partial_tag>.npy next to it; returns the one-line summary.
    A file of other labels is replaced only with `overwrite` (_save_new). main_clip.py calls it for
    `-d demo --observed TAG` when the demo lacks the file or was regenerated since."""
    folder = Path(data_root) / dataset
    labels = _load_labels(dataset, folder, "train", DATASETS[dataset].num_classes)
    simulate = simulate_rps if scheme == "rps" else simulate_fpc
    observed = simulate(labels, param, seed)
    name = observed_file_name(partial_tag(scheme, param))
    status = _save_new(folder, {name: _as_written(observed, labels)}, overwrite)
    return _with_status(_summary(dataset, "train", observed, folder, name), status[name])


def _load_labels(dataset: str, folder: Path, phase: str, num_classes: int) -> np.ndarray:
    path = folder / f"formatted_{phase}_labels.npy"
    return check_labels(path, load_array(path, formatting_hint(dataset, folder.parent)), num_classes, (0, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generate_observed_labels.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(n for n, d in DATASETS.items() if not d.annotated),
                        help="dataset folder under --data-root (required; no default)")
    parser.add_argument("--scheme", choices=SCHEMES, default="single",
                        help="single: --num-pos positives and --num-neg negatives per image, train and "
                             "val (VLPL); rps: drop each annotation with probability --drop-prob; fpc: "
                             "keep --per-class positives and negatives per class (PartialLabelingCSL); "
                             "rps and fpc write the train file only (default: single)")
    parser.add_argument("--num-pos", type=int, default=None,
                        help="single: observed positives per image, -1 for all (default: 1)")
    parser.add_argument("--num-neg", type=int, default=None,
                        help="single: observed negatives per image, -1 for all (default: 0)")
    parser.add_argument("--drop-prob", type=float, default=None,
                        help=f"rps: probability of dropping each annotation, in [0, 1] "
                             f"(default: {CSL_DROP_PROB}, CSL's README)")
    parser.add_argument("--per-class", type=int, default=None,
                        help=f"fpc: positives and negatives kept per class (default: {CSL_PER_CLASS}, "
                             f"CSL's README)")
    parser.add_argument("--seed", type=number(int, low=0, high=2 ** 32 - 1), default=1200,  # RandomState's range
                        help="seed of the RandomState created for each phase; CSL itself never "
                             "seeds its simulation (default: 1200)")
    parser.add_argument("--data-root", default="data",
                        help="folder holding one sub-folder per dataset (default: data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace observed-label files that hold other labels (default: refuse; a file that "
                             "already holds exactly these labels is left as it is)")

    def body(args):
        scheme_flags = {"single": ("--num-pos", "--num-neg"), "rps": ("--drop-prob",), "fpc": ("--per-class",)}
        for flag in ("--num-pos", "--num-neg", "--drop-prob", "--per-class"):
            if getattr(args, flag[2:].replace("-", "_")) is not None and flag not in scheme_flags[args.scheme]:
                raise PreprocError(f"{flag} does not apply to --scheme {args.scheme}; drop it")
        if args.scheme == "single":
            return _run_single(args)
        return _run_partial(args)

    return run_cli(parser, body, argv, errors=(PreprocError, DataError))


if __name__ == "__main__":
    sys.exit(main())

"""Sample the observed (single-positive) labels from the full labels, as the original VLPL does.

docs/original-vlpl.md section 3 (bit for bit).

For phase in (train, val): formatted_<phase>_labels.npy -> formatted_<phase>_labels_obs.npy in
<data-root>/<dataset>/, each phase with a fresh numpy RandomState(seed).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/generate_observed_labels.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import numpy as np

from datasets import DATASETS, DataError, check_labels, formatting_hint, load_array
from preproc._common import PreprocError, run_cli, save_arrays

PHASES = ("train", "val")


def generate_observed(labels: np.ndarray, num_pos: int = 1, num_neg: int = 0,
                      seed: int = 1200) -> np.ndarray:
    """Observed labels (N, K) float32 in {-1, 0, 1} for 0/1 labels (N, K).

    With ``rng = RandomState(seed)`` created here, for each row in order: shuffle the indices of
    its positives with rng and observe the first num_pos as +1; then shuffle the indices of its
    negatives with rng and observe the first num_neg as -1 (-1 = all). The negatives are shuffled
    even when num_neg is 0: the original does, and the draw moves the random stream.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be an (N, K) array of 0/1, got shape {labels.shape}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generate_observed_labels.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS),
                        help="dataset folder under --data-root (required; no default)")
    parser.add_argument("--num-pos", type=int, default=1,
                        help="observed positives per image, -1 for all (default: 1)")
    parser.add_argument("--num-neg", type=int, default=0,
                        help="observed negatives per image, -1 for all (default: 0)")
    parser.add_argument("--seed", type=int, default=1200,
                        help="seed of the RandomState created for each phase (default: 1200)")
    parser.add_argument("--data-root", default="data",
                        help="folder holding one sub-folder per dataset (default: data)")

    def body(args):
        for flag, count in (("--num-pos", args.num_pos), ("--num-neg", args.num_neg)):
            if count < -1:
                raise PreprocError(f"{flag} must be -1 (all) or >= 0, got {count}")
        folder = Path(args.data_root) / args.dataset
        num_classes = DATASETS[args.dataset].num_classes
        outputs, report = {}, []
        for phase in PHASES:
            path = folder / f"formatted_{phase}_labels.npy"
            labels = check_labels(path, load_array(path, formatting_hint(args.dataset)),
                                  num_classes, (0, 1))
            observed = generate_observed(labels, args.num_pos, args.num_neg, args.seed)
            # Same dtype as the labels (float64 from the format scripts), as the original writes.
            if labels.dtype.kind == "f":
                observed = observed.astype(labels.dtype)
            outputs[f"formatted_{phase}_labels_obs.npy"] = observed
            report.append(f"{args.dataset} {phase}: {len(labels)} images, "
                          f"{int((observed == 1).sum())} observed positives, "
                          f"{int((observed == -1).sum())} observed negatives written to {folder}")
        save_arrays(folder, outputs)
        return report

    return run_cli(parser, body, argv, errors=(PreprocError, DataError))


if __name__ == "__main__":
    sys.exit(main())

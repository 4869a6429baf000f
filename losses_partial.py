"""Losses for partial annotations, as PartialLabelingCSL computes them.

Ben-Baruch et al., "Multi-label Classification with Partial Annotations using Class-aware
Selective Loss" (arXiv 2110.10955), code: github.com/Alibaba-MIIL/PartialLabelingCSL. Three
pieces, each equal to the original for the same inputs (float32, CPU: bit for bit, see
tests/test_losses_partial.py):

- `asymmetric_loss`: ASL, `AsymmetricLoss.forward` in src/loss_functions/losses.py.
- `partial_selective_loss`: P-ASL with the class-aware selective weights,
  `PartialSelectiveLoss.forward` and `edit_targets_parital_labels` in
  src/loss_functions/partial_asymmetric_loss.py.
- `ClassPriorEstimator`: the running class prior, `ComputePrior` in the same file, and
  `read_prior_csv` / `prior_csv_text` for its CSV file.

Label conventions. This project's observed labels are o in {1, 0, -1}: 1 observed positive,
-1 annotated negative, 0 unannotated. CSL's targets are t in {1, 0, -1} with 0 and -1 the other
way round: 1 positive, 0 annotated negative, -1 unannotated. `partial_selective_loss` takes this
project's observed labels and converts them with `csl_targets`; `asymmetric_loss` takes 0/1
targets, as the original does (pass `(observed == 1).float()`: annotated negatives and
unannotated entries are then both negatives, CSL's "Negative, ASL" setting).

Notation: x logits (B x K), p = sigmoid(x), q = 1 - p, q_m = min(q + clip, 1) when clip > 0
(else q), log_e(z) = log(max(z, eps)).

Quirks of the original kept on purpose (each can be changed by a flag where it matters):
- Both losses return a *sum* over the B x K entries, not a mean, so the loss and the gradient
  grow with the batch size and the number of classes (CSL trains with Adam, which largely
  cancels a constant scale). `reduction='mean'` divides that sum by B*K.
- ASL's focusing weight w is detached by default (`disable_torch_grad_focal_loss=True`,
  `AsymmetricLoss`'s default); `AsymmetricLossOptimized` and the commented-out criterion of CSL's
  train.py use False, and then the gradient also flows through w. The two give equal losses and
  different gradients. The original switches grad mode off and back *on* around w (so after a
  call inside torch.no_grad() grad mode stayed on, and `torch._C.set_grad_enabled` no longer
  exists on torch 2); here w is computed under `torch.no_grad()`, which leaves the caller's mode
  alone. Numbers are unchanged.
- P-ASL's focusing weight is always detached (the original computes it under no_grad).
- The selective top-k is one budget for the whole batch (likelihood_topk * B entries), not per
  image, and it also counts entries the prior step already ignored.
- Ties in the top-k order (saturated probabilities: q_m exactly 0 or 1 in float32) are broken by
  torch's default (unstable) argsort, the call the original makes, so the same entries are chosen
  as by the original on the same device and torch version. Which tied entries is unspecified;
  the loss depends on it (their log terms differ), the number of entries chosen does not.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

MODES = ("negative", "ignore", "ignore_normalize_classes", "selective")

# AsymmetricLoss.__init__ defaults (src/loss_functions/losses.py); the README's
# "Negative, ASL (4,1)" rows are gamma_neg=4, gamma_pos=1.
ASL_DEFAULTS = dict(gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8, disable_torch_grad_focal_loss=True)

# CSL's published settings: the README's example commands ("Example of training with RPS / FPC
# simulation"; the resulting rows "CSL - Selective, P-ASL" of "Typical Training Results").
# alpha_* and clip are train.py's defaults, which those commands keep. The prior the README
# passes (--prior_path) is outputs/priors/prior_fpc_1000.csv, for both schemes.
# (The README tables call the runs P-ASL(4,3,1) and P-ASL(4,1,1), which reads as gamma_pos=1;
# the commands say --gamma_pos=0, and the commands are what we follow.)
CSL_RECIPES = {
    "rps": dict(mode="selective", gamma_pos=0.0, gamma_neg=1.0, gamma_unann=4.0, alpha_pos=1.0,
                alpha_neg=1.0, alpha_unann=1.0, clip=0.0, likelihood_topk=5, prior_threshold=0.5),
    "fpc": dict(mode="selective", gamma_pos=0.0, gamma_neg=3.0, gamma_unann=4.0, alpha_pos=1.0,
                alpha_neg=1.0, alpha_unann=1.0, clip=0.0, likelihood_topk=5, prior_threshold=0.5),
}
# Default of this module: the RPS command (gamma_neg=1 is also train.py's default; gamma_neg
# plays no part when there are no annotated negatives, as with single positives).
CSL_DEFAULTS = dict(CSL_RECIPES["rps"])
# train.py's argparse defaults, for reference (mode negative; gamma_unann 2; threshold 0.05).
CSL_TRAIN_PY_DEFAULTS = dict(mode="negative", gamma_pos=0.0, gamma_neg=1.0, gamma_unann=2.0, alpha_pos=1.0,
                             alpha_neg=1.0, alpha_unann=1.0, clip=0.0, likelihood_topk=5, prior_threshold=0.05)

LOG_CLAMP = 1e-8  # PartialSelectiveLoss clamps p and q_m at 1e-8 before the log (fixed, not a parameter)


class PriorFileError(ValueError):
    """A prior CSV file that cannot be used; the message is one line naming the file."""


def csl_targets(observed: Tensor, validate: bool = True) -> Tensor:
    """CSL's int64 targets (B x K) from this project's observed labels (B x K) in {1, 0, -1}:
    1 -> 1 (positive), -1 -> 0 (annotated negative), 0 -> -1 (unannotated). validate=False skips
    the value check (a host sync), for callers that checked the whole matrix once."""
    if validate and not torch.isin(observed, torch.tensor([-1, 0, 1], dtype=observed.dtype, device=observed.device)).all():
        raise ValueError("observed labels must be in {-1, 0, 1} for the partial-label losses "
                         "(1 positive, -1 annotated negative, 0 unannotated)")
    return torch.where(observed == 1, 1, torch.where(observed == -1, 0, -1)).long()


def observed_from_csl(targets: Tensor) -> Tensor:
    """Inverse of `csl_targets`: float32 observed labels (B x K) from CSL's targets."""
    return torch.where(targets == 1, 1.0, torch.where(targets == 0, -1.0, 0.0))


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return -loss.sum()
    if reduction == "mean":
        return -loss.sum() / loss.numel()
    raise ValueError(f"reduction must be 'sum' (CSL) or 'mean', got {reduction!r}")


def asymmetric_loss(logits: Tensor, targets: Tensor, *, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                    clip: float = 0.05, eps: float = 1e-8, disable_torch_grad_focal_loss: bool = True,
                    reduction: str = "sum") -> Tensor:
    """ASL (AsymmetricLoss.forward, src/loss_functions/losses.py). logits, targets: B x K; targets
    0/1 (soft values work as in the original).

        L = -sum_ij [ y log_e(p) + (1 - y) log_e(q_m) ] * w,
        w = (1 - (p y + q_m (1 - y))) ^ (gamma_pos y + gamma_neg (1 - y))

    w is applied only when gamma_neg > 0 or gamma_pos > 0, and is detached when
    disable_torch_grad_focal_loss (the original's default). reduction='mean' divides by B*K.
    """
    _check_pair(logits, targets)
    xs_pos = torch.sigmoid(logits)
    xs_neg = 1 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = targets * torch.log(xs_pos.clamp(min=eps)) + (1 - targets) * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not disable_torch_grad_focal_loss):
            pt = xs_pos * targets + xs_neg * (1 - targets)
            weight = torch.pow(1 - pt, gamma_pos * targets + gamma_neg * (1 - targets))
        loss = loss * weight
    return _reduce(loss, reduction)


def partial_weights(targets: Tensor, xs_neg: Tensor, *, mode: str, likelihood_topk: int = 5,
                    prior: Tensor | None = None, prior_threshold: float | None = 0.5) -> Tensor | None:
    """Per-entry weights W (B x K float32) of P-ASL for CSL targets (1, 0 annotated, -1 unannotated),
    or None for W = 1 (edit_targets_parital_labels, src/loss_functions/partial_asymmetric_loss.py).

    - negative: None (every unannotated entry is a negative, with gamma_unann / alpha_unann).
    - ignore: 0 on unannotated entries, 1 elsewhere.
    - ignore_normalize_classes: 1/(1 + number of annotated entries of the row) + 1, 0 on unannotated.
    - selective: start from 1. If a prior (K,) is given and prior_threshold is truthy (0 / None skip
      this step, as in the original), unannotated entries of the classes with prior > threshold get 0.
      Then, among all unannotated entries of the batch (whatever their weight so far), the
      likelihood_topk * B with the smallest q_m (the most likely positives) get 0. The rest stay 1
      and act as negatives.
    xs_neg is q_m (after the clip), the probability the selection ranks by.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    unannotated = targets == -1
    if mode == "negative":
        return None
    if mode == "ignore":
        return (~unannotated).float()
    if mode == "ignore_normalize_classes":
        n_annotated = 1 + (~unannotated).sum(dim=1)  # 1 + ... avoids dividing by 0, as the original
        weights = (1 * (1 / n_annotated) + 1)[:, None].expand(targets.shape).clone()
        weights[unannotated] = 0
        return weights
    weights = torch.ones(targets.shape, device=targets.device)
    if prior is not None and prior_threshold:
        if prior.shape != (targets.shape[1],):
            raise ValueError(f"prior must have shape ({targets.shape[1]},), got {tuple(prior.shape)}")
        # float32 as the original's torch.tensor(list of floats); NaN priors are never frequent
        frequent = prior.to(targets.device, torch.float32) > prior_threshold
        weights[:, frequent] = 0
        weights[~unannotated] = 1
    with torch.no_grad():
        candidates = torch.nonzero(unannotated.flatten()).squeeze(1)
        order = torch.argsort(xs_neg.detach().flatten()[candidates])  # unstable, as the original
        weights.view(-1)[candidates[order[:int(likelihood_topk) * targets.shape[0]]]] = 0
    return weights


def partial_selective_loss(logits: Tensor, observed: Tensor, *, mode: str = CSL_DEFAULTS["mode"],
                           gamma_pos: float = CSL_DEFAULTS["gamma_pos"], gamma_neg: float = CSL_DEFAULTS["gamma_neg"],
                           gamma_unann: float = CSL_DEFAULTS["gamma_unann"],
                           alpha_pos: float = CSL_DEFAULTS["alpha_pos"], alpha_neg: float = CSL_DEFAULTS["alpha_neg"],
                           alpha_unann: float = CSL_DEFAULTS["alpha_unann"], clip: float = CSL_DEFAULTS["clip"],
                           likelihood_topk: int = CSL_DEFAULTS["likelihood_topk"], prior: Tensor | None = None,
                           prior_threshold: float | None = CSL_DEFAULTS["prior_threshold"],
                           reduction: str = "sum", validate: bool = True) -> Tensor:
    """P-ASL with CSL's partial-label weights (PartialSelectiveLoss.forward).

    logits: B x K float; observed: B x K in {1, 0, -1} in *this project's* convention (1 positive,
    -1 annotated negative, 0 unannotated), converted with `csl_targets`. With T+, T0, Tu the masks
    of positives, annotated negatives and unannotated entries:

        L = -sum_ij W_ij w_ij [ a+ T+ log_e(p) + a- T0 log_e(q_m) + a_u Tu log_e(q_m) ],
        w = (1 - p T+ - q_m (T0 + Tu)) ^ (g+ T+ + g- T0 + g_u Tu)   (detached),

    eps = 1e-8, W from `partial_weights` (mode, likelihood_topk, prior (K,), prior_threshold).
    The defaults are CSL_DEFAULTS; the prior is what the original reads from --prior_path.
    """
    _check_pair(logits, observed)
    targets = csl_targets(observed, validate)
    positive = (targets == 1).float()
    negative = (targets == 0).float()
    unannotated = (targets == -1).float()
    xs_pos = torch.sigmoid(logits)
    xs_neg = 1.0 - xs_pos
    if clip is not None and clip > 0:
        xs_neg.add_(clip).clamp_(max=1)  # in place, as the original (same values and gradient)
    weights = partial_weights(targets, xs_neg, mode=mode, likelihood_topk=likelihood_topk, prior=prior,
                              prior_threshold=prior_threshold)
    log_neg = torch.log(torch.clamp(xs_neg, min=LOG_CLAMP))
    loss = (alpha_pos * positive * torch.log(torch.clamp(xs_pos, min=LOG_CLAMP))
            + alpha_neg * negative * log_neg
            + alpha_unann * unannotated * log_neg)
    with torch.no_grad():
        focusing = torch.pow(1 - xs_pos * positive - xs_neg * (negative + unannotated),
                             gamma_pos * positive + gamma_neg * negative + gamma_unann * unannotated)
    loss = loss * focusing
    if weights is not None:
        loss = loss * weights
    return _reduce(loss, reduction)


def _check_pair(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2 or labels.shape != logits.shape:
        raise ValueError(f"logits and labels must both be B x K, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")


class ClassPriorEstimator:
    """Running class prior: the mean of sigmoid(logits) over every image seen so far (ComputePrior,
    src/loss_functions/partial_asymmetric_loss.py, its train side).

    CSL calls `update` on every training step with that step's fp32 logits (train mode, augmented
    images, the forward of the step, after the optimiser step) and never resets it, so after
    epoch e the prior averages all e epochs; it writes the CSV after every epoch. The state is
    the per-class sum (float32, summed batch by batch as the original) and the image count.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.sum_pred = torch.zeros(num_classes, device=device)
        self.count = 0.0

    @torch.no_grad()
    def update(self, logits: Tensor) -> None:
        """Add one batch of logits (B x K)."""
        if logits.ndim != 2 or logits.shape[1] != self.sum_pred.shape[0]:
            raise ValueError(f"logits must be B x {self.sum_pred.shape[0]}, got {tuple(logits.shape)}")
        self.sum_pred += torch.sum(torch.sigmoid(logits.detach()).to(self.sum_pred.device), dim=0)
        self.count += logits.shape[0]

    @property
    def prior(self) -> Tensor | None:
        """(K,) float32 average prediction, None before the first update."""
        return None if self.count == 0 else self.sum_pred / self.count

    def state_dict(self) -> dict:
        return {"sum_pred": self.sum_pred.detach().cpu().clone(), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        sum_pred = torch.as_tensor(state["sum_pred"], dtype=torch.float32)
        if sum_pred.shape != self.sum_pred.shape:
            raise ValueError(f"prior state has {tuple(sum_pred.shape)} classes, expected {tuple(self.sum_pred.shape)}")
        self.sum_pred = sum_pred.to(self.sum_pred.device).clone()
        self.count = float(state["count"])


def prior_csv_text(class_names: Sequence[str], prior: Tensor | np.ndarray) -> str:
    """The CSV CSL's ComputePrior.save_prior writes (train_avg_preds.csv): header
    `Classes,avg_pred`, one row per class in model output order, float32 values written as the
    shortest text that reads back to the same float32 (as pandas writes a float32 column)."""
    values = np.asarray(prior.detach().cpu() if torch.is_tensor(prior) else prior, dtype=np.float32)
    if values.shape != (len(class_names),):
        raise ValueError(f"{len(class_names)} class names but prior of shape {values.shape}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Classes", "avg_pred"])
    writer.writerows([name, str(value)] for name, value in zip(class_names, values))
    return out.getvalue()


def read_prior_csv(path: str | os.PathLike, num_classes: int | None = None) -> tuple[list[str], Tensor]:
    """(class names, prior (K,) float32) from a prior CSV, read as CSL reads `--prior_path`.

    CSL: `pd.read_csv`, then `dict(zip(first column, second column))` and `torch.tensor` of the
    values: a header line, rows in file order (model output order), a repeated class name keeps
    its first position and its last value, a missing value is NaN (never above a threshold).
    Trailing rows without a value are dropped here (CSL's shipped prior_fpc_1000.csv ends with a
    stray line `1542867`, which pandas reads as an 81st class with prior NaN), so that the length
    can be checked against num_classes.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if any(field.strip() for field in row)]
    except FileNotFoundError:
        raise PriorFileError(f"prior file {path} not found: give a CSV with columns Classes,avg_pred "
                             f"(one row per class)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PriorFileError(f"cannot read prior file {path}: {err}") from None
    priors: dict[str, float] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        text = row[1].strip() if len(row) > 1 else ""
        try:
            priors[row[0]] = float(text) if text else math.nan
        except ValueError:
            raise PriorFileError(f"{path}: row {lineno}: prior {text[:40]!r} is not a number") from None
    names, values = list(priors), list(priors.values())
    while values and math.isnan(values[-1]):
        names.pop()
        values.pop()
    if num_classes is not None and len(values) != num_classes:
        raise PriorFileError(f"prior file {path} has {len(values)} classes, the model has {num_classes}")
    return names, torch.tensor(values, dtype=torch.float32)

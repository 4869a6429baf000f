"""Single-positive multi-label losses of the original code base (REFERENCE.md section 8).

Notation (every docstring below): p = sigmoid outputs (B x K) in [0, 1]; o = observed labels
(B x K) in [-1, 1] (+1 positive, 0 unknown, -1 negative, other negative values are soft
negatives written by `apl_update`); neglog(x) = -log(x + 1e-5);
H(p) = p neglog(p) + (1 - p) neglog(1 - p).

Each loss is a pure function `(preds, observed, *, <what it needs>) -> (loss_mtx, reg)`:
loss_mtx is the B x K matrix (0 where no rule applies), reg a scalar regulariser or None.
Its keyword-only parameters are exactly what it reads; `compute_batch_loss` fills them from
the hparams mapping (original names) and from its own keyword arguments, so no function
reads a shared dictionary. The batch loss is sum(loss_mtx / (B*K)) + reg.

Differences from the original (documented defects or deliberate choices):
- `role` is not provided: it needs a learnable per-image label estimator (Cole et al.), which
  the original VLPL never builds, so selecting it there cannot work. Asking for it raises a
  ValueError that says so.
- `bce` and `bce_ls` take the clean labels explicitly (`true_labels`); the original read them
  through the observed-label slot when its train set variant was 'clean'. The numbers are the
  same; the observed matrix is then only shape-checked.
- `EM_PL_ASL` does not compute the clipped negative probability the original computed and
  never used.
- The original asserted `min(o) >= 0` for most losses; here an observed negative simply gets
  no term in losses without a rule for it (a documented 0), rather than crashing.
- Invalid input raises ValueError (the original used assert).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
from torch import Tensor

LOG_EPSILON = 1e-5

# Expected number of positives per image (epr regulariser; Cole et al.). demo: the mean
# number of objects of preproc/make_demo.py's generator (3.41 measured on its train split).
EXPECTED_NUM_POS = {'pascal': 1.5, 'coco': 2.9, 'nuswide': 1.9, 'cub': 31.4, 'demo': 3.4}

LossOutput = tuple[Tensor, Tensor | None]


def neglog(x: Tensor) -> Tensor:
    """neglog(x) = -log(x + 1e-5); finite (and with finite gradient) at x = 0."""
    return -torch.log(x + LOG_EPSILON)


def binary_entropy(p: Tensor) -> Tensor:
    """H(p) = p neglog(p) + (1 - p) neglog(1 - p)."""
    return p * neglog(p) + (1.0 - p) * neglog(1.0 - p)


def _smoothed(p: Tensor, positive: Tensor, ls_coef: float) -> Tensor:
    """Label-smoothed BCE: positive: (1-c) neglog(p) + c neglog(1-p); else the mirror image."""
    return torch.where(positive,
                       (1.0 - ls_coef) * neglog(p) + ls_coef * neglog(1.0 - p),
                       (1.0 - ls_coef) * neglog(1.0 - p) + ls_coef * neglog(p))


# --- losses ------------------------------------------------------------------------------

def loss_bce(preds: Tensor, observed: Tensor, *, true_labels: Tensor) -> LossOutput:
    """Full-label BCE on the clean labels t: t=1: neglog(p); t=0: neglog(1-p)."""
    return torch.where(true_labels == 1, neglog(preds), neglog(1.0 - preds)), None


def loss_bce_ls(preds: Tensor, observed: Tensor, *, true_labels: Tensor, ls_coef: float) -> LossOutput:
    """BCE with label smoothing c on the clean labels t:
    t=1: (1-c) neglog(p) + c neglog(1-p); t=0: (1-c) neglog(1-p) + c neglog(p)."""
    return _smoothed(preds, true_labels == 1, ls_coef), None


def loss_iun(preds: Tensor, observed: Tensor, *, true_labels: Tensor) -> LossOutput:
    """Ignore unobserved, but use the true negatives: o=1: neglog(p); t=0: neglog(1-p).

    Where both apply (inconsistent input) the true-negative rule wins, as in the original.
    """
    mtx = torch.where(observed == 1, neglog(preds), 0.0)
    return torch.where(true_labels == 0, neglog(1.0 - preds), mtx), None


def loss_iu(preds: Tensor, observed: Tensor) -> LossOutput:
    """Ignore unobserved: o=1: neglog(p); o=-1: neglog(1-p)."""
    mtx = torch.where(observed == 1, neglog(preds), 0.0)
    return torch.where(observed == -1, neglog(1.0 - preds), mtx), None


def loss_pr(preds: Tensor, observed: Tensor) -> LossOutput:
    """Pairwise ranking: at each observed positive i of an image,
    sum over the unobserved classes j (o_j = 0) of max(0, 1 - p_i + p_j)."""
    unobserved = (observed == 0).to(preds.dtype)                            # B x K (j)
    margins = torch.clamp(1.0 - preds.unsqueeze(2) + preds.unsqueeze(1), min=0.0)  # B x K(i) x K(j)
    per_positive = (margins * unobserved.unsqueeze(1)).sum(dim=2)          # B x K (i)
    return torch.where(observed == 1, per_positive, 0.0), None


def loss_an(preds: Tensor, observed: Tensor) -> LossOutput:
    """Assume negative: o=1: neglog(p); o=0: neglog(1-p)."""
    mtx = torch.where(observed == 1, neglog(preds), 0.0)
    return torch.where(observed == 0, neglog(1.0 - preds), mtx), None


def loss_an_ls(preds: Tensor, observed: Tensor, *, ls_coef: float) -> LossOutput:
    """Assume negative with label smoothing c:
    o=1: (1-c) neglog(p) + c neglog(1-p); o=0: (1-c) neglog(1-p) + c neglog(p)."""
    return torch.where((observed == 1) | (observed == 0), _smoothed(preds, observed == 1, ls_coef), 0.0), None


def loss_wan(preds: Tensor, observed: Tensor) -> LossOutput:
    """Weak assume negative: o=1: neglog(p); o=0: neglog(1-p) / (K-1)."""
    num_classes = preds.shape[1]
    mtx = torch.where(observed == 1, neglog(preds), 0.0)
    return torch.where(observed == 0, neglog(1.0 - preds) / float(num_classes - 1), mtx), None


def loss_epr(preds: Tensor, observed: Tensor, *, expected_num_pos: float) -> LossOutput:
    """Expected positive regularisation: o=1: neglog(p);
    regulariser (mean over the batch of sum_k p_k - expected_num_pos)^2 / K^2."""
    num_classes = preds.shape[1]
    reg = (preds.sum(dim=1).mean(dim=0) - expected_num_pos) ** 2 / (num_classes ** 2)
    return torch.where(observed == 1, neglog(preds), 0.0), reg


def loss_EM(preds: Tensor, observed: Tensor, *, alpha: float) -> LossOutput:
    """Entropy maximisation: o=1: neglog(p); o=0: -alpha H(p)."""
    mtx = torch.where(observed == 1, neglog(preds), 0.0)
    return torch.where(observed == 0, -alpha * binary_entropy(preds), mtx), None


def loss_EM_APL(preds: Tensor, observed: Tensor, *, alpha: float, beta: float) -> LossOutput:
    """EM plus asymmetric pseudo-labels: o=1: neglog(p); o=0: -alpha H(p);
    o<0 (soft negative with soft label s = -o): beta (s neglog(p) + (1-s) neglog(1-p)).

    As in the original, a hard o = -1 is read as s = 1 by the last rule; `apl_update`
    writes o = -p_old (small), so the soft label is the old prediction.
    """
    mtx, _ = loss_EM(preds, observed, alpha=alpha)
    soft = -observed
    soft_term = beta * (soft * neglog(preds) + (1.0 - soft) * neglog(1.0 - preds))
    return torch.where(observed < 0, soft_term, mtx), None


def loss_EM_PL(preds: Tensor, observed: Tensor, *, pseudo_labels: Tensor, alpha: float, beta_pos: float,
               epoch: int, warmup_epoch: int) -> LossOutput:
    """VLPL loss. epoch <= warmup_epoch: EM. Otherwise, with f = o where o != 0 else pl:
    o=1: neglog(p); f=0: -alpha H(p);
    o=0 and pl=1: beta_pos (0.9 neglog(p) + 0.1 neglog(1-p));
    o=0 and pl=-1: 0 (negative pseudo-labels only leave the entropy term; beta_neg is unused,
    the original's negative pseudo-label term is commented out)."""
    if epoch <= warmup_epoch:
        return loss_EM(preds, observed, alpha=alpha)
    final = torch.where(observed == 0, pseudo_labels, observed)
    mtx = torch.where(observed == 1, neglog(preds), 0.0)
    mtx = torch.where(final == 0, -alpha * binary_entropy(preds), mtx)
    pseudo_pos = (observed == 0) & (pseudo_labels == 1)
    return torch.where(pseudo_pos, beta_pos * (0.9 * neglog(preds) + 0.1 * neglog(1.0 - preds)), mtx), None


def loss_EM_PL_ASL(preds: Tensor, observed: Tensor, *, pseudo_labels: Tensor, alpha: float,
                   positive: float, negative: float, unknown: float,
                   epoch: int, warmup_epoch: int) -> LossOutput:
    """VLPL loss with asymmetric focusing (gp = positive, gn = negative, gu = unknown).
    epoch <= warmup_epoch: EM (with alpha). Otherwise, with f = o where o != 0 else pl:
    o=1: (1-p)^gp neglog(p); f=0: -(1-p)^gu H(p); o=0 and pl=1: (1-p)^gp neglog(p);
    o=0 and pl=-1: p^gn neglog(1-p). No alpha or beta weights after warmup."""
    if epoch <= warmup_epoch:
        return loss_EM(preds, observed, alpha=alpha)
    final = torch.where(observed == 0, pseudo_labels, observed)
    focal_pos = torch.pow(1.0 - preds, positive) * neglog(preds)
    mtx = torch.where(observed == 1, focal_pos, 0.0)
    mtx = torch.where(final == 0, -torch.pow(1.0 - preds, unknown) * binary_entropy(preds), mtx)
    unknown_obs = observed == 0
    mtx = torch.where(unknown_obs & (pseudo_labels == 1), focal_pos, mtx)
    focal_neg = torch.pow(preds, negative) * neglog(1.0 - preds)
    return torch.where(unknown_obs & (pseudo_labels == -1), focal_neg, mtx), None


LOSSES: dict[str, Callable[..., LossOutput]] = {
    'bce': loss_bce,
    'bce_ls': loss_bce_ls,
    'iun': loss_iun,
    'iu': loss_iu,
    'pr': loss_pr,
    'an': loss_an,
    'an_ls': loss_an_ls,
    'wan': loss_wan,
    'epr': loss_epr,
    'EM': loss_EM,
    'EM_APL': loss_EM_APL,
    'EM_PL': loss_EM_PL,
    'EM_PL_ASL': loss_EM_PL_ASL,
}

# Inputs that compute_batch_loss supplies itself rather than taking from hparams.
_CALL_INPUTS = ('true_labels', 'pseudo_labels', 'epoch')


@functools.cache
def _keyword_inputs(fn: Callable) -> tuple[str, ...]:
    return tuple(name for name, param in inspect.signature(fn).parameters.items()
                 if param.kind is inspect.Parameter.KEYWORD_ONLY)


def loss_hparams(name: str) -> tuple[str, ...]:
    """The hparams keys that loss `name` reads (e.g. ('alpha', 'beta') for EM_APL)."""
    return tuple(key for key in _keyword_inputs(_get_loss(name)) if key not in _CALL_INPUTS)


NEEDS_TRUE_LABELS = frozenset(n for n, f in LOSSES.items() if 'true_labels' in _keyword_inputs(f))
NEEDS_PSEUDO_LABELS = frozenset(n for n, f in LOSSES.items() if 'pseudo_labels' in _keyword_inputs(f))


def _get_loss(name: str) -> Callable[..., LossOutput]:
    if name in LOSSES:
        return LOSSES[name]
    if name == 'role':
        raise ValueError("loss 'role' is not available: it needs a learnable per-image label estimator "
                         "(Cole et al.) that VLPL never builds, so the original cannot run it either; "
                         f"choose one of {', '.join(LOSSES)}")
    raise ValueError(f'unknown loss {name!r}; valid losses: {", ".join(LOSSES)}')


def _check_shapes(preds, observed, extra: dict[str, Tensor]) -> None:
    if not isinstance(preds, Tensor) or not isinstance(observed, Tensor):
        raise ValueError('preds and observed must be torch tensors')
    if preds.dim() != 2:
        raise ValueError(f'preds must be B x K, got shape {tuple(preds.shape)}')
    if not preds.is_floating_point():
        raise ValueError(f'preds must be floating point sigmoid outputs, got dtype {preds.dtype}')
    for label_name, tensor in (('observed', observed), *extra.items()):
        if not isinstance(tensor, Tensor):
            raise ValueError(f'{label_name} must be a torch tensor')
        if tensor.shape != preds.shape:
            raise ValueError(f'{label_name} has shape {tuple(tensor.shape)} but preds has '
                             f'{tuple(preds.shape)}; they must match (B x K)')


def _check_values(preds: Tensor, observed: Tensor, extra: dict[str, Tensor]) -> None:
    """All range checks reduced on the device and read back with a single sync."""
    checks = {
        'preds must lie in [0, 1] (sigmoid outputs, no NaN)': (preds >= 0) & (preds <= 1),
        'observed labels must lie in [-1, 1]': (observed >= -1) & (observed <= 1),
    }
    if 'true_labels' in extra:
        t = extra['true_labels']
        checks['true_labels must be 0/1'] = (t == 0) | (t == 1)
    if 'pseudo_labels' in extra:
        pl = extra['pseudo_labels']
        checks['pseudo_labels must be in {-1, 0, 1}'] = (pl == -1) | (pl == 0) | (pl == 1)
    oks = torch.stack([ok.all() for ok in checks.values()])
    if bool(oks.all()):
        return
    failed = [msg for msg, ok in zip(checks, oks.tolist()) if not ok]
    raise ValueError('invalid loss input: ' + '; '.join(failed))


def compute_batch_loss(name: str, preds: Tensor, observed: Tensor, hparams: Mapping, *,
                       true_labels: Tensor | None = None, pseudo_labels: Tensor | None = None,
                       epoch: int = 1, validate: bool = True) -> Tensor:
    """Batch loss of loss `name`: sum(loss_mtx / (B*K)) + regulariser (epr only).

    preds: B x K sigmoid outputs in [0, 1]; observed: B x K in [-1, 1];
    true_labels: B x K clean 0/1 labels (bce, bce_ls, iun); pseudo_labels: B x K in
    {-1, 0, 1} (EM_PL, EM_PL_ASL); epoch: current epoch, counted from 1 (warmup rule
    `epoch <= warmup_epoch`); hparams: mapping with the original's names, of which the loss
    reads `loss_hparams(name)`; if it holds 'num_classes' that must equal K.
    validate=False skips the value-range checks (one device sync per call); shapes and
    names are always checked. Raises ValueError for any invalid input.
    """
    fn = _get_loss(name)
    needed = _keyword_inputs(fn)
    extra = {}
    for key, value in (('true_labels', true_labels), ('pseudo_labels', pseudo_labels)):
        if key in needed:
            if value is None:
                raise ValueError(f'loss {name!r} needs {key}=... (B x K); none was given')
            extra[key] = value
    _check_shapes(preds, observed, extra)
    num_classes = preds.shape[1]
    if 'num_classes' in hparams and int(hparams['num_classes']) != num_classes:
        raise ValueError(f"hparams['num_classes'] = {hparams['num_classes']} but preds has K = {num_classes}")
    missing = [key for key in needed if key not in _CALL_INPUTS and key not in hparams]
    if missing:
        raise ValueError(f'loss {name!r} needs hparams {missing} (missing)')
    if validate:
        _check_values(preds, observed, extra)
    kwargs = {key: (epoch if key == 'epoch' else extra[key] if key in extra else hparams[key])
              for key in needed}
    loss_mtx, reg = fn(preds, observed, **kwargs)
    # Divide before summing, as the original does, so the float rounding matches.
    loss = (loss_mtx / float(preds.shape[0] * num_classes)).sum()
    return loss if reg is None else loss + reg


# --- asymmetric pseudo-labelling (EM_APL) -------------------------------------------------

def count_unknowns(observed) -> np.ndarray:
    """U_c = number of unknown (o = 0) entries of every class c; call it once on the initial
    observed training matrix (N x K). Returns (K,) int64."""
    observed = np.asarray(observed)
    if observed.ndim != 2:
        raise ValueError(f'observed must be N x K, got shape {observed.shape}')
    return (observed == 0).sum(axis=0).astype(np.int64)


def apl_update(preds, observed, unknown_counts, *, epoch: int, num_epochs: int, warmup_epoch: int,
               neg_proportion: float = 0.9) -> np.ndarray:
    """One asymmetric pseudo-labelling step of SPML-AckTheUnknown (numpy in, numpy out).

    Called after the training phase of each epoch; acts when epoch >= warmup_epoch (else it
    returns an unchanged copy). For every class c, of the entries still unknown (o = 0) the
    n_c = int(neg_proportion * U_c / (num_epochs - warmup_epoch)) with the lowest prediction
    get o = -prediction (a soft negative; EM_APL then uses s = -o). U_c is the count from
    `count_unknowns` on the initial matrix. Ties in the prediction are taken in row order
    (stable sort; the original's order among ties depended on the shuffled loader). If
    fewer than n_c unknowns remain, all of them are set. A prediction of exactly 0 gives
    o = 0, i.e. the entry stays unknown, as in the original.

    preds: (N, K) predictions in [0, 1] for every training row (row order of observed);
    observed: (N, K) current observed matrix in [-1, 1]; unknown_counts: (K,).
    Returns a new float array (observed's float dtype, float32 for integer input).
    """
    preds = np.asarray(preds)
    observed = np.asarray(observed)
    unknown_counts = np.asarray(unknown_counts)
    if preds.ndim != 2 or preds.shape != observed.shape:
        raise ValueError(f'apl_update: preds {preds.shape} and observed {observed.shape} must both be N x K')
    if unknown_counts.shape != (preds.shape[1],):
        raise ValueError(f'apl_update: unknown_counts must have shape ({preds.shape[1]},), '
                         f'got {unknown_counts.shape}')
    if num_epochs <= warmup_epoch:
        raise ValueError(f'apl_update: num_epochs ({num_epochs}) must exceed warmup_epoch ({warmup_epoch})')
    if not ((preds >= 0) & (preds <= 1)).all():
        raise ValueError('apl_update: preds must lie in [0, 1] (sigmoid outputs, no NaN)')
    if not ((observed >= -1) & (observed <= 1)).all():
        raise ValueError('apl_update: observed labels must lie in [-1, 1]')
    if (unknown_counts < 0).any():
        raise ValueError('apl_update: unknown_counts must be non-negative')

    out_dtype = observed.dtype if np.issubdtype(observed.dtype, np.floating) else np.float32
    new = observed.astype(out_dtype, copy=True)
    if epoch < warmup_epoch:
        return new
    num_rows = preds.shape[0]
    num_new = np.floor(neg_proportion * unknown_counts.astype(np.float64)
                       / float(num_epochs - warmup_epoch)).astype(np.int64)       # (K,)
    unknown = observed == 0
    # Known entries sort last, so the first ranks of every column are its unknowns.
    order = np.argsort(np.where(unknown, preds, np.inf), axis=0, kind='stable')
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(num_rows)[:, None], order.shape), axis=0)
    selected = unknown & (rank < num_new[None, :])
    new[selected] = -preds[selected]
    return new

"""Losses and schedules of the single-positive peer methods, computed as their original code computes them.

Methods and their original code (the authority for every number here):
- ROLE (Cole et al., CVPR 2021): elijahcole/single-positive-multi-label, losses.py `loss_role` and
  `compute_batch_loss`, models.py `LabelEstimator`, train.py `initialize_training_run`.
- LL-R / LL-Ct / LL-Cp (Kim et al., CVPR 2022): snucml/LargeLossMatters, losses.py `compute_batch_loss`,
  train.py `run_train`, config.py `set_follow_up_configs`.
- BoostLU (Kim et al., CVPR 2023): youngwk/BridgeGapExplanationPAMC, models.py `ImageClassifier.forward`;
  its own copy of the LL losses (losses.py `compute_batch_loss`) differs from LargeLossMatters in two ways
  that change numbers (see `ll_loss`).
- GR-Loss (Chen et al., IJCAI 2024): yan4xi1/GRLoss, losses.py `GR_loss`, models.py `KFunction`,
  `VFunction`, train.py `run_train` (schedules).
- AEVLP (Tran et al., ICCV 2025): Fsoft-AIC/AEVLP, losses.py `GPR_loss`, utils.py `get_pseudo_labels`,
  train.py `run_train` (schedules, identical to GR's).

Notation: p = sigmoid(logits) (B x K); y = observed labels (B x K; 1 = observed positive, 0 = unknown,
-1 = observed negative); epochs are 1-based, as in every original's `for epoch in range(1, T + 1)`
(Cole's loop is 0-based but ROLE has no epoch schedule).

Every function is pure (nothing outside it is modified) and keyword-only. Where an original builds a
B x K loss matrix by boolean-mask assignment, so does the function here: evaluating an elementwise op
on the gathered entries rather than on the whole matrix is what makes the float32 CPU results and
gradients bit-identical to the original (vectorised CPU kernels of pow/log may round the tail of an
array differently from its body). Boolean indexing synchronises a GPU with the host once per mask;
at these sizes that costs microseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from config import DATASETS

# =============================================================================================
# ROLE (elijahcole/single-positive-multi-label)
# =============================================================================================

ROLE_LOG_EPSILON = 1e-5     # losses.py LOG_EPSILON
ROLE_LR_MULT = 10.0         # train.py __main__: P['lr_mult'], the estimator's learning-rate multiplier
ROLE_INIT_WIDTH = 0.1       # models.py LabelEstimator: w, unobserved estimates start in [0.5 - w, 0.5 + w]
ROLE_INIT_POS = 0.995       # models.py LabelEstimator: estimate of an observed positive at init
ROLE_INIT_NEG = 0.005       # models.py LabelEstimator: estimate of an observed negative at init


def _neg_log(x: Tensor, eps: float) -> Tensor:
    """-log(x + eps): Cole's and GR's `neg_log` (eps inside the log, no clamp)."""
    return -torch.log(x + eps)


def _inverse_sigmoid_np(p):
    """models.py `inverse_sigmoid`: log(p / (1 - p)) after clipping p to [1e-5, 1 - 1e-5], in numpy."""
    epsilon = 1e-5
    p = np.minimum(p, 1 - epsilon)
    p = np.maximum(p, epsilon)
    return np.log(p / (1 - p))


def expected_positive_regularizer(preds: Tensor, *, expected_num_pos: float) -> Tensor:
    """R(q) = (mean_i sum_k q_ik - expected_num_pos)^2 / K^2.

    Cole's losses.py `expected_positive_regularizer(..., norm='2')` divided by num_classes ** 2 as its
    callers do (`loss_epr`, `loss_role`; AEVLP's losses.py folds the division into the function)."""
    return (preds.sum(1).mean(0) - expected_num_pos) ** 2 / (preds.shape[1] ** 2)


def role_loss(*, preds: Tensor, estimates: Tensor, observed: Tensor, expected_num_pos: float) -> Tensor:
    """ROLE's batch loss: Cole's `compute_batch_loss` with `loss_role`.

    preds p = sigmoid(f(x)) (B x K); estimates e = sigmoid(theta[index]) (B x K), the label estimator's
    rows for this batch; observed y in {0, 1}. With M = [y == 1], nl(z) = -log(z + 1e-5), sg = detach:
        L = sum_ij ( 0.5 (M nl(p) + M nl(e)) + 0.5 (c1 + c2) )_ij / (B K) + 0.5 (R(p) + R(e))
        c1 = sg(e) nl(p) + (1 - sg(e)) nl(1 - p)     (the classifier learns from the estimator)
        c2 = sg(p) nl(e) + (1 - sg(p)) nl(1 - e)     (the estimator learns from the classifier)
    R = `expected_positive_regularizer`. p receives gradient from M nl(p), c1 and R(p) only; e from
    M nl(e), c2 and R(e) only. As the original, the matrix is divided elementwise by B*K and then
    summed (not `.mean()`, which rounds differently).
    """
    if torch.min(observed) < 0:
        raise ValueError('role_loss: observed labels must be in {0, 1} (the original asserts min >= 0)')
    pos = observed == 1
    eps = ROLE_LOG_EPSILON
    # classifier side
    pos_1 = torch.zeros_like(preds)
    pos_1[pos] = _neg_log(preds[pos], eps)
    est_fixed = estimates.detach()
    cross_1 = est_fixed * _neg_log(preds, eps) + (1.0 - est_fixed) * _neg_log(1.0 - preds, eps)
    reg_1 = expected_positive_regularizer(preds, expected_num_pos=expected_num_pos)
    # estimator side
    pos_2 = torch.zeros_like(estimates)
    pos_2[pos] = _neg_log(estimates[pos], eps)
    preds_fixed = preds.detach()
    cross_2 = preds_fixed * _neg_log(estimates, eps) + (1.0 - preds_fixed) * _neg_log(1.0 - estimates, eps)
    reg_2 = expected_positive_regularizer(estimates, expected_num_pos=expected_num_pos)

    reg = 0.5 * (reg_1 + reg_2)
    loss_mtx = 0.5 * (pos_1 + pos_2) + 0.5 * (cross_1 + cross_2)
    batch_size, num_classes = preds.shape
    denom = (num_classes * batch_size) * torch.ones_like(preds)
    return (loss_mtx / denom).sum() + reg


def role_init_logits(*, observed, generator: torch.Generator | None = None) -> Tensor:
    """The label estimator's parameter theta (N x K float32) for a new run (models.py LabelEstimator).

    Unknown entries: logit(0.6) * (2 U(0, 1) - 1), so sigmoid(theta) starts in [0.4, 0.6]; observed
    positives logit(0.995); observed negatives (-1) logit(0.005). U comes from `torch.rand(N, K)`, drawn
    from `generator` (None = torch's global generator, which is what the original uses, unseeded)."""
    observed = np.asarray(observed)
    num_examples, num_classes = observed.shape
    observed = observed.astype(np.int8)
    q = _inverse_sigmoid_np(0.5 + ROLE_INIT_WIDTH)
    theta = q * (2 * torch.rand(num_examples, num_classes, generator=generator) - 1)
    theta[torch.from_numpy(observed == 1)] = float(_inverse_sigmoid_np(ROLE_INIT_POS))
    theta[torch.from_numpy(observed == -1)] = float(_inverse_sigmoid_np(ROLE_INIT_NEG))
    return theta


def role_logits_from_estimates(estimates) -> Tensor:
    """theta = logit(clip(e, 1e-5, 1 - 1e-5)) in float32: LinearInit's phase 2 starts the estimator from
    phase 1's best estimates (models.py LabelEstimator with `estimated_labels`, computed by numpy on the
    float32 values as there)."""
    e = torch.as_tensor(np.asarray(estimates), dtype=torch.float32).numpy()
    return torch.from_numpy(np.ascontiguousarray(_inverse_sigmoid_np(e), dtype=np.float32))


# =============================================================================================
# LL-R / LL-Ct / LL-Cp (snucml/LargeLossMatters; BridgeGap's copy in youngwk/BridgeGapExplanationPAMC)
# =============================================================================================

LL_SCHEMES = ('LL-R', 'LL-Ct', 'LL-Cp')


def ll_delta_rel(percent: float) -> float:
    """The per-epoch rate from the command-line value in percent: config.py `set_follow_up_configs`
    divides a nonzero `--delta_rel` by 100 (so 0.2 means 0.2 % per epoch)."""
    return percent / 100 if percent != 0 else percent


def ll_clean_rate(*, epoch: int, delta_rel: float) -> float:
    """The clean rate used during 1-based `epoch`: the int 1 in epoch 1, then `clean_rate -= delta_rel`
    once after every epoch (train.py `run_train`, after the val phase). Computed by the same repeated
    float subtraction, not as 1 - (epoch - 1) * delta_rel, which rounds differently (and changes k)."""
    if epoch < 1:
        raise ValueError(f'll_clean_rate: epoch is 1-based, got {epoch}')
    clean_rate = 1
    for _ in range(epoch - 1):
        clean_rate -= delta_rel
    return clean_rate


def ll_num_large(*, batch_size: int, num_classes: int, clean_rate: float, delta_rel: float, scheme: str,
                 llcp_as_released: bool = False) -> int | None:
    """k, the number of large losses modified in a batch; None while clean_rate == 1 (epoch 1: plain AN).

    k = ceil(B K (1 - clean_rate)) for LL-R and LL-Ct (and for LL-Cp as released); k = ceil(B K delta_rel)
    for LL-Cp as intended. B is the real size of this batch; the count is over all B K entries."""
    if scheme not in LL_SCHEMES:
        raise ValueError(f'll scheme must be one of {", ".join(LL_SCHEMES)}, got {scheme!r}')
    if clean_rate == 1:
        return None
    if scheme == 'LL-Cp' and not llcp_as_released:
        k = math.ceil(batch_size * num_classes * delta_rel)
    else:
        k = math.ceil(batch_size * num_classes * (1 - clean_rate))
    if not 1 <= k <= batch_size * num_classes:
        raise ValueError(f'LL: delta_rel {delta_rel} and clean rate {clean_rate} ask to modify {k} of the '
                         f'{batch_size * num_classes} losses of a batch; lower --ll-delta-rel')
    return k


def ll_loss(*, logits: Tensor, observed: Tensor, clean_rate: float, delta_rel: float, scheme: str,
            llcp_as_released: bool = False, flips_include_threshold: bool = False
            ) -> tuple[Tensor, Tensor | None]:
    """Large-loss rejection / correction (LargeLossMatters losses.py `compute_batch_loss`).

    l = BCEWithLogits(x, max(y, 0)), l' = BCEWithLogits(x, not max(y, 0)) (elementwise), u = [y == 0] l.
    clean_rate == 1 (epoch 1): L = mean(l). Otherwise k = `ll_num_large(...)`, tau = the k-th largest u
    (`torch.topk(u.flatten(), k).values[-1]`), and over all B K entries:
        LL-R:  L = mean( l  where u < tau, else 0  )
        LL-Ct, LL-Cp:  L = mean( l  where u < tau, else l' )
    Returns (L, flips). flips (bool B x K) is given only for LL-Cp as intended: the entries the original
    sets to 1.0 permanently in the training set's observed labels after the step. LargeLossMatters
    flips u > tau (k - 1 entries without ties: its `correction_idx` is strict while the loss uses >=);
    BridgeGap's copy flips u >= tau (k entries): `flips_include_threshold=True`.
    `llcp_as_released=True` reproduces LargeLossMatters as released, where `mod_scheme is 'LL-Cp'` is
    never true, so LL-Cp runs as LL-Ct (k from the clean rate, no flips). BridgeGap compares with ==,
    so its LL-Cp is the intended one.
    """
    batch_size, num_classes = logits.shape
    unobserved = observed == 0
    target = observed.clip(0)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction='none')
    corrected = F.binary_cross_entropy_with_logits(logits, torch.logical_not(target).to(logits.dtype),
                                                   reduction='none')
    k = ll_num_large(batch_size=batch_size, num_classes=num_classes, clean_rate=clean_rate,
                     delta_rel=delta_rel, scheme=scheme, llcp_as_released=llcp_as_released)
    if k is None:
        return loss.mean(), None
    unobserved_loss = unobserved.bool() * loss
    threshold = torch.topk(unobserved_loss.flatten(), k).values[-1]
    keep = unobserved_loss < threshold
    if scheme == 'LL-R':
        final = torch.where(keep, loss, torch.zeros_like(loss))
    else:
        final = torch.where(keep, loss, corrected)
    flips = None
    if scheme == 'LL-Cp' and not llcp_as_released:
        flips = (unobserved_loss >= threshold) if flips_include_threshold else (unobserved_loss > threshold)
    return final.mean(), flips


# =============================================================================================
# BoostLU (youngwk/BridgeGapExplanationPAMC)
# =============================================================================================

def boostlu_logits(*, cam: Tensor, alpha: float) -> Tensor:
    """BoostLU's logits from a class activation map (models.py `ImageClassifier.forward`).

    cam: B x K x h x w, the classifier applied at every position (the original's 1x1 conv on the
    layer-4 map). Positive CAM values are multiplied by alpha, then the map is averaged over h x w:
        logit_bk = mean_hw( alpha * CAM_bkhw if CAM_bkhw > 0 else CAM_bkhw )
    Applied in training and in inference. alpha = 1 gives plain CAM + global average pooling."""
    boosted = torch.where(cam > 0, cam * alpha, cam)
    return F.adaptive_avg_pool2d(boosted, 1).squeeze(-1).squeeze(-1)


# =============================================================================================
# GR-Loss (yan4xi1/GRLoss) and AEVLP's GPR-Loss (Fsoft-AIC/AEVLP)
# =============================================================================================

GR_LOG_EPSILON = 1e-7       # GRLoss and AEVLP losses.py LOG_EPSILON


class GRSchedule(NamedTuple):
    """The epoch's parameters of the soft pseudo-label k(p) (w, b) and of the re-weight v(p) (mu, sigma)."""
    w: float
    b: float
    mu: float
    sigma: float


def gr_schedule(*, epoch: int, num_epochs: int, beta, alpha, linear_init: int = 0) -> GRSchedule:
    """(w, b, mu, sigma) for 1-based `epoch` (GRLoss train.py `run_train`; AEVLP's train.py is the same).

    beta = [w0, wT, b0, bT], alpha = [mu0, sigma0, muT, sigmaT], n = linear_init, T = num_epochs:
        w = w0 + (wT - w0) max(e - n - 1, 0) / (T - n)      b likewise
        mu = mu0 + (muT - mu0) max(e - n, 0) / (T - n)      sigma likewise
    Note the off-by-one between the two: (w, b) start at (w0, b0) and never reach (wT, bT); (mu, sigma)
    are one step along already in epoch 1 and reach (muT, sigmaT) in the last epoch."""
    n = linear_init
    w_0, w_max, b_0, b_max = beta
    w = w_0 + (w_max - w_0) * max((epoch - n - 1), 0) / (num_epochs - n)
    b = b_0 + (b_max - b_0) * max((epoch - n - 1), 0) / (num_epochs - n)
    mu_0, sigma_0, mu_max, sigma_max = alpha
    mu = mu_0 + (mu_max - mu_0) * max((epoch - n), 0) / (num_epochs - n)
    sigma = sigma_0 + (sigma_max - sigma_0) * max((epoch - n), 0) / (num_epochs - n)
    return GRSchedule(w, b, mu, sigma)


def gr_soft_label(preds: Tensor, *, w: float, b: float) -> Tensor:
    """k(p) = 1 / (1 + exp(-(w p + b))) (models.py `KFunction`, written out rather than torch.sigmoid)."""
    return 1 / (1 + torch.exp(-(w * preds + b)))


def gr_weight(preds: Tensor, *, mu: float, sigma: float) -> Tensor:
    """v(p) = exp(-0.5 ((p - mu) / sigma)^2), no normalising constant (models.py `VFunction`)."""
    return torch.exp(-0.5 * ((preds - mu) / sigma) ** 2)


def _gce_pos(x: Tensor, q: float) -> Tensor:
    """L1(p; q) = (1 - p^q) / q (losses.py `loss1`)."""
    return (1 - torch.pow(x, q)) / q


def _gce_neg(x: Tensor, q: float) -> Tensor:
    """L2(p; q) = (1 - (1 - p)^q) / q (losses.py `loss2`)."""
    return (1 - torch.pow(1 - x, q)) / q


def gr_loss(*, preds: Tensor, observed: Tensor, w: float, b: float, mu: float, sigma: float,
            q2: float, q3: float) -> Tensor:
    """GR-Loss (GRLoss losses.py `GR_loss` with K = `KFunction(w, b)`, V = `VFunction(mu, sigma)` of
    the detached predictions, as train.py computes them).

    With k = k(sg(p)), v = v(sg(p)) (`gr_soft_label`, `gr_weight`; constants for autograd):
        y = 1:  -log(p + 1e-7)
        y = 0:  v (k L1(p; q2) + (1 - k) L2(p; q3))
    and 0 elsewhere; L = mean over all B K entries (positives count in the denominator). No clamp: an
    unknown entry with p == 0 exactly (fp32 logit below about -88) gives a NaN gradient, as in the
    original."""
    fixed = preds.detach()
    k = gr_soft_label(fixed, w=w, b=b)
    v = gr_weight(fixed, mu=mu, sigma=sigma)
    pos = observed == 1
    unk = observed == 0
    loss_mtx = torch.zeros_like(preds)
    loss_mtx[pos] = _neg_log(preds[pos], GR_LOG_EPSILON)
    loss_mtx[unk] = v[unk] * (k[unk] * _gce_pos(preds[unk], q2) + (1 - k[unk]) * _gce_neg(preds[unk], q3))
    return loss_mtx.mean()


def aevlp_loss(*, preds: Tensor, observed: Tensor, pseudo_labels: Tensor, w: float, b: float, mu: float,
               sigma: float, q2: float, q3: float, lam1: float, lam2: float, rho: float, reg: float,
               expected_num_pos: float, use_pl: bool = True) -> Tensor:
    """AEVLP's GPR-Loss (AEVLP losses.py `GPR_loss`; K, V from the detached predictions as train.py).

    preds = sigmoid(logits) (the original takes logits and applies the same sigmoid). pseudo_labels PL
    (B x K) from `aevlp_pseudo_labels` (values in {0, 1}). final = PL where y == 0, else y. With k, v as
    in `gr_loss`:
        y = 1:                  -log(p + 1e-7)
        final = 0:              v (k L1(p; q2) + (1 - k) L2(p; q3))
        y = 0 and PL = 1:       (1 - v~) (rho (-log(p + 1e-7)) + (1 - rho) (-log(1 - p + 1e-7))),
                                v~ = v clamped to [1 - lam1, 1 - lam2]              (only if use_pl)
        final = -1:             v (-log(1 - p + 1e-7))   (only if use_pl; AEVLP's own pseudo-labels
                                never hold -1, so this branch is dead there)
    L = mean over all B K entries + reg (mean_i sum_k p_ik - expected_num_pos)^2 / K^2.
    Entries matching no rule (y = 0 with PL = 1 when use_pl is False, soft values) contribute 0."""
    fixed = preds.detach()
    k = gr_soft_label(fixed, w=w, b=b)
    v = gr_weight(fixed, mu=mu, sigma=sigma)
    final = torch.where(observed == 0, pseudo_labels, observed)
    pos = observed == 1
    neg_like = final == 0
    eps = GR_LOG_EPSILON
    loss_mtx = torch.zeros_like(preds)
    loss_mtx[pos] = _neg_log(preds[pos], eps)
    loss_mtx[neg_like] = v[neg_like] * (k[neg_like] * _gce_pos(preds[neg_like], q2)
                                        + (1 - k[neg_like]) * _gce_neg(preds[neg_like], q3))
    if use_pl:
        pseudo_pos = (observed == 0) & (pseudo_labels == 1)
        v = v.clone()
        v[pseudo_pos] = torch.where(v[pseudo_pos] > 1 - lam1, v[pseudo_pos], 1 - lam1)
        v[pseudo_pos] = torch.where(v[pseudo_pos] < 1 - lam2, v[pseudo_pos], 1 - lam2)
        loss_mtx[pseudo_pos] = (1 - v[pseudo_pos]) * (rho * _neg_log(preds[pseudo_pos], eps)
                                                      + (1 - rho) * _neg_log(1 - preds[pseudo_pos], eps))
        pseudo_neg = final == -1
        loss_mtx[pseudo_neg] = v[pseudo_neg] * _neg_log(1 - preds[pseudo_neg], eps)
    regulariser = (preds.sum(1).mean(0) - expected_num_pos) ** 2 / (preds.shape[1] ** 2)
    return loss_mtx.mean() + reg * regulariser


def aevlp_pseudo_labels(*, clip_logits: Tensor, observed: Tensor, grid_size: int, temp: float, eta: float,
                        top_k: int, threshold: float, negative_ratio: float) -> Tensor:
    """AEVLP's pseudo-labels for a batch (utils.py `get_pseudo_labels`, its second return value), int32 B x K.

    clip_logits: (B (G^2 + 1)) x K CLIP cosines laid out [global x B | tile 0 x B | tile 1 x B | ...]
    (the original's dtype, fp16, changes the result: pass what the scorer produced). observed: B x K.
    S = softmax(clip_logits / temp) per row; S_g = global rows; a, m, avg = max, min, mean over tiles.
    eta_i = min(max_k S_g[i, k] y[i, k], eta); s = (S_g + (a if a > eta_i else m)) / 2 elementwise.
    PL = 1 on the top_k classes of s whose value is >= threshold, else 0. Then the int(negative_ratio K)
    lowest classes of (S_g + avg) / 2 are set to 0 (not -1: the original's "negative pseudo-labels" only
    clear positives)."""
    device = clip_logits.device
    num_classes = clip_logits.shape[1]
    tiles = grid_size * grid_size
    batch_size = int(clip_logits.shape[0]) // (tiles + 1)
    sim = F.softmax(clip_logits / temp, dim=-1)
    sim_global = sim[0:batch_size]
    sim_locals = torch.stack(torch.chunk(sim[batch_size:], tiles, dim=0), dim=0).permute(1, 0, 2)
    local_max = torch.max(sim_locals, dim=1)[0]
    local_min = torch.min(sim_locals, dim=1)[0]
    local_avg = torch.mean(sim_locals, dim=1)
    positive_score = torch.max(sim_global * observed, dim=1)[0]
    eta_row = torch.minimum(positive_score, torch.tensor(eta)).unsqueeze(1).repeat(1, num_classes)
    use_max = torch.where(local_max > eta_row, torch.tensor(1).to(device), torch.tensor(0).to(device))
    sim_agg = local_max * use_max + local_min * (1 - use_max)
    score = 1 / 2 * (sim_global + sim_agg)
    score_neg = 1 / 2 * (sim_global + local_avg)
    values, indices = torch.topk(score, k=top_k, dim=1)
    labels = torch.zeros_like(score, dtype=torch.int)
    labels.scatter_(1, indices, (values >= threshold).int())
    num_negatives = int(negative_ratio * num_classes)
    if num_negatives > 0:
        _, neg_indices = torch.topk(score_neg, k=num_negatives, largest=False, dim=1)
        labels.scatter_(-1, neg_indices, torch.zeros_like(neg_indices, dtype=torch.int))
    return labels


# =============================================================================================
# Published hyperparameters
# =============================================================================================

@dataclass(frozen=True)
class Hp:
    """One hyperparameter value, where it comes from, and whether the authors published it
    (published=False: not in the paper's repository; `source` says which documented default was chosen)."""
    value: object
    source: str
    published: bool = True


_COLE = 'elijahcole/single-positive-multi-label train.py __main__'
_LL = 'snucml/LargeLossMatters config.py get_configs defaults'
_BG = 'youngwk/BridgeGapExplanationPAMC config.py'
_GR = 'yan4xi1/GRLoss config.py defaults'
_AE = 'Fsoft-AIC/AEVLP configs/{}.json'
_AE_LOOKUP = 'Fsoft-AIC/AEVLP config.py _LOOKUP'
_DATASETS = ('pascal', 'coco', 'nuswide', 'cub')
_EXPECTED_NUM_POS = {'pascal': 1.5, 'coco': 2.9, 'nuswide': 1.9, 'cub': 31.4}


def _role(ds: str) -> dict[str, Hp]:
    lin_bsize = 8 if ds == 'cub' else 16
    return {
        'expected_num_pos': Hp(_EXPECTED_NUM_POS[ds], f"{_COLE} lookup['expected_num_pos']"),
        'lr_mult': Hp(ROLE_LR_MULT, f"{_COLE} P['lr_mult'] (estimator lr = lr_mult * lr, its own Adam group)"),
        'num_epochs': Hp(10, f"{_COLE} end_to_end num_epochs"),
        'lr': Hp(1e-5, 'not published: the original grid-searches lr in {1e-2, 1e-3, 1e-4, 1e-5} (train.py '
                       '__main__) and keeps no winners; 1e-5 is the lr its forks (LargeLossMatters, GRLoss, '
                       'AEVLP) use end to end', published=False),
        'bsize': Hp(8, 'not published: grid {8, 16} (train.py __main__); 8 chosen', published=False),
        'linear_init_lr': Hp(1e-3, f"{_COLE} lookup['linear_init_params']['role']"),
        'linear_init_bsize': Hp(lin_bsize, f"{_COLE} lookup['linear_init_params']['role']"),
        'linear_init_epochs': Hp(25, f"{_COLE} linear_init num_epochs"),
    }


_LL_ISSUE = ("the authors' own per-dataset optimiser, lr and delta_rel are in snucml/LargeLossMatters issue 4 "
             "(`--recipe original`, recipes/LL-*.toml)")


def _ll(ds: str) -> dict[str, Hp]:
    delta = {'LL-R': 0.5, 'LL-Ct': 0.2, 'LL-Cp': 0.1}
    tuned = ds in ('pascal', 'cub')  # issue 4: pascal SGD 5e-3, cub Adam 7.5e-5; coco and nuswide Adam 1e-5
    out = {
        'lr': Hp(1e-5, f'{_LL}' + (f'; not the authors\' value for {ds}: {_LL_ISSUE}' if tuned else ''), not tuned),
        'lr_mult': Hp(10, _LL), 'bsize': Hp(16, _LL), 'num_epochs': Hp(10, _LL),
        'early_stop_map_drop': Hp(3, 'snucml/LargeLossMatters train.py run_train (val mAP points)'),
    }
    for scheme, value in delta.items():
        out[f'delta_rel_percent[{scheme}]'] = Hp(
            value, f"not in LargeLossMatters' code (README: grid {{0.1, ..., 0.5}}; {_LL_ISSUE}); {_BG} "
                   f"_LOOKUP['delta_rel'] (same first author, same value for every dataset)", published=False)
    return out


def _boostlu(ds: str) -> dict[str, Hp]:
    out = {
        'alpha': Hp(5.0, f"{_BG} --alpha default; README command --alpha 5"),
        'lr': Hp(1e-5, f'{_BG} --lr default; README command --lr 1e-5'),
        'lr_mult': Hp(10, f'{_BG} set_default_configs'), 'bsize': Hp(16, f'{_BG} --bsize default'),
        'num_epochs': Hp(10, f'{_BG} --num_epochs default'),
    }
    for scheme, value in {'LL-R': 0.5, 'LL-Ct': 0.2, 'LL-Cp': 0.1}.items():
        out[f'delta_rel_percent[{scheme}]'] = Hp(value, f"{_BG} _LOOKUP['delta_rel'] (all datasets)")
    return out


def _gr(ds: str) -> dict[str, Hp]:
    ae = _AE.format(ds)
    if ds == 'pascal':
        src, pub = f'{_GR} (equal to {ae})', True
    else:
        src, pub = (f'not published by GRLoss (one set of defaults, no per-dataset configs); taken from {ae} '
                    '(same code lineage)'), False
    cfg = _AEVLP_JSON[ds]
    return {
        'beta': Hp(cfg['beta'], src, pub), 'alpha': Hp(cfg['alpha'], src, pub), 'q2q3': Hp(cfg['q2q3'], src, pub),
        'num_epochs': Hp(cfg['num_epochs'], src, pub), 'bsize': Hp(cfg['bsize'], src, pub),
        'lr': Hp(1e-5, _GR), 'lr_mult': Hp(10, _GR), 'linear_init': Hp(0, _GR),
        'early_stop_map_drop': Hp(2, 'yan4xi1/GRLoss train.py run_train (val mAP points)'),
    }


_AEVLP_JSON = {   # Fsoft-AIC/AEVLP configs/<dataset>.json (the keys the loss and pseudo-labels read)
    'pascal': dict(num_epochs=8, bsize=8, beta=[0, 2, -2, -2], alpha=[0.5, 2, 0.8, 0.5], q2q3=[0.01, 1],
                   lam=[0.7, 0.4], rho=0.9, reg=0.05, temp=0.01, eta=0.0, threshold=0.5, grid_size=4,
                   negative_ratio=0.2),
    'coco': dict(num_epochs=8, bsize=16, beta=[0, 10, -2, -8], alpha=[0.5, 2, 0.8, 0.5], q2q3=[0.01, 1],
                 lam=[0.7, 0.5], rho=0.9, reg=0.001, temp=0.01, eta=0.3, threshold=0.5, grid_size=4,
                 negative_ratio=0.3),
    'nuswide': dict(num_epochs=10, bsize=16, beta=[0, 10, -2, -8], alpha=[0.5, 2, 0.8, 0.5], q2q3=[0.01, 1],
                    lam=[0.7, 0.5], rho=0.9, reg=0.001, temp=0.01, eta=0.3, threshold=0.6, grid_size=4,
                    negative_ratio=0.2),
    'cub': dict(num_epochs=10, bsize=8, beta=[0, 10, -2, -8], alpha=[0.5, 2, 0.8, 0.5], q2q3=[0.01, 1.5],
                lam=[0.8, 0.2], rho=0.9, reg=0.01, temp=0.1, eta=0.005, threshold=0.005, grid_size=5,
                negative_ratio=0.2),
}
_AEVLP_TOP_K = {'pascal': 3, 'coco': 3, 'nuswide': 3, 'cub': 32}
_AEVLP_GRAPH = {'pascal': (20, 0.2), 'coco': (62, 0.2), 'nuswide': (50, 0.2), 'cub': (312, 0.2)}  # sparse_topk, reweight_p


def _aevlp(ds: str) -> dict[str, Hp]:
    ae = _AE.format(ds)
    out = {key: Hp(value, ae) for key, value in _AEVLP_JSON[ds].items()}
    out['top_k'] = Hp(_AEVLP_TOP_K[ds], f"{_AE_LOOKUP}['top_k'] (overrides the JSON)")
    out['expected_num_pos'] = Hp(_EXPECTED_NUM_POS[ds], f"{_AE_LOOKUP}['expected_num_pos']")
    out['lr'] = Hp(1e-5, ae)
    out['lr_mult'] = Hp(10, ae)
    out['early_stop_map_drop'] = Hp(2, 'Fsoft-AIC/AEVLP train.py (also stops after 2 epochs without improvement)')
    out['sparse_topk'] = Hp(_AEVLP_GRAPH[ds][0], f"{_AE_LOOKUP}['sparse_topk'] (models.py get_relation)")
    out['reweight_p'] = Hp(_AEVLP_GRAPH[ds][1], f"{_AE_LOOKUP}['reweight_p'] (models.py get_relation)")
    return out


PEER_DEFAULTS: dict[str, dict[str, dict[str, Hp]]] = {
    method: {ds: build(ds) for ds in _DATASETS}
    for method, build in (('role', _role), ('LL', _ll), ('boostlu', _boostlu), ('GR', _gr), ('AEVLP', _aevlp))
}
# The demo dataset of this CLI has no published values: each method uses its VOC (pascal) row with the
# demo's own expected number of positives (config.DATASETS['demo'].expected_num_pos, measured on its train split).
for _method, _rows in PEER_DEFAULTS.items():
    _demo = {key: Hp(hp.value, f'demo: pascal value ({hp.source})', False) for key, hp in _rows['pascal'].items()}
    if 'expected_num_pos' in _demo:
        _demo['expected_num_pos'] = Hp(DATASETS['demo'].expected_num_pos, "demo: the generator's mean number of "
                                       "positives per image (config.DATASETS['demo'])", False)
    _rows['demo'] = _demo


def peer_hparams(method: str, dataset: str) -> dict[str, object]:
    """The default values of `method` on `dataset` (PEER_DEFAULTS without the sources)."""
    if method not in PEER_DEFAULTS:
        raise ValueError(f'unknown peer method {method!r}; one of {", ".join(PEER_DEFAULTS)}')
    rows = PEER_DEFAULTS[method]
    if dataset not in rows:
        raise ValueError(f'no {method} defaults for dataset {dataset!r}; one of {", ".join(rows)}')
    return {key: hp.value for key, hp in rows[dataset].items()}

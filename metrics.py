"""Evaluation metrics of the original code base (docs/original-vlpl.md section 9), vectorised.

The original computes these with a Python loop over images (14.4 s for one 40,137 x 80
evaluation); here the per-image metrics are whole-array numpy operations and the average
precision loops over classes only (K iterations of vectorised work).
"""
from __future__ import annotations

import numpy as np

TOP_KS = (1, 3, 5)

METRIC_KEYS = ('map',) + tuple(
    f'{name}_at_{k}' for name in ('prec', 'rec') for k in TOP_KS) + tuple(f'top_{k}' for k in TOP_KS)


def _validate(preds, labels, name: str = 'compute_metrics') -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if preds.ndim != 2 or labels.ndim != 2:
        raise ValueError(f'{name}: preds and labels must be 2-D (N x K), got shapes '
                         f'{preds.shape} and {labels.shape}')
    if preds.shape != labels.shape:
        raise ValueError(f'{name}: preds {preds.shape} and labels {labels.shape} must have '
                         f'the same shape')
    if preds.shape[0] == 0 or preds.shape[1] == 0:
        raise ValueError(f'{name}: need at least one image and one class, got shape {preds.shape}')
    if not (np.issubdtype(preds.dtype, np.floating) or np.issubdtype(preds.dtype, np.integer)):
        raise ValueError(f'{name}: preds must be numeric, got dtype {preds.dtype}')
    if not np.isfinite(preds).all():
        raise ValueError(f'{name}: preds contain NaN or infinite values')
    if labels.dtype != np.bool_:
        if not ((labels == 0) | (labels == 1)).all():
            bad = np.unique(labels[(labels != 0) & (labels != 1)])[:5]
            raise ValueError(f'{name}: labels must be 0/1 (convert observed labels with '
                             f'labels == 1 first), found values such as {bad.tolist()}')
        labels = labels == 1
    return preds, labels


def _validate_mask(mask, shape: tuple, name: str = 'compute_metrics') -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape or mask.dtype != np.bool_:
        raise ValueError(f'{name}: mask must be a bool array of shape {shape}, got {mask.dtype} {mask.shape}')
    return mask


def average_precision_per_class(preds: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Average precision of every column, as scikit-learn's `average_precision_score`.

    AP_c = sum over thresholds t (the distinct scores, descending) of (R_t - R_{t-1}) * P_t,
    where P_t and R_t are precision and recall of "score >= t". Equal scores form one
    threshold, exactly as in scikit-learn. Every positive i contributes
    P(s_i) / n_pos with P(s) = #{positives with score >= s} / #{images with score >= s},
    which is the same sum grouped by positive. AP is 0 for a class with no positive.

    preds: (N, K) finite scores; labels: (N, K) bool; mask: (N, K) bool, True where an entry counts
    (None: every entry). The AP of class c then covers only the rows counted in column c, as SGRE's
    VOCmAP drops the ignored rows of each class (github.com/jasonseu/SGRE lib/metrics.py). Returns
    (K,) float64.
    """
    if mask is not None:
        # An entry left out scores below every counted score and is no positive: it adds to no
        # count above, exactly as if its row were dropped from the column.
        preds, labels = np.where(mask, preds, -np.inf), labels & mask
    num_images, num_classes = preds.shape
    scores = np.ascontiguousarray(preds.T)           # K x N
    positive = np.ascontiguousarray(labels.T)        # K x N
    scores_sorted = np.sort(scores, axis=1)
    ap = np.zeros(num_classes, dtype=np.float64)
    for c in range(num_classes):
        pos_scores = np.sort(scores[c][positive[c]])
        num_pos = pos_scores.size
        if num_pos == 0:
            continue
        num_at_or_above = num_images - np.searchsorted(scores_sorted[c], pos_scores, side='left')
        pos_at_or_above = num_pos - np.searchsorted(pos_scores, pos_scores, side='left')
        ap[c] = np.sum(pos_at_or_above / num_at_or_above) / num_pos
    return ap


def top_k_hits(preds: np.ndarray, labels: np.ndarray, ks=TOP_KS) -> dict[int, np.ndarray]:
    """Number of positives among the k highest-scored classes of every image, for each k.

    Tie rule: the original ranks with `np.argsort(preds)[::-1][:k]`, so among equal scores the
    higher class index comes first whenever numpy's sort is stable (always for K <= 16; for
    larger K numpy's default sort may break ties either way). We fix that rule for every K:
    the ranking is `np.argsort(preds, kind='stable')[::-1]`, i.e. descending score, ties
    broken towards the higher class index. For k > K the top-k list holds all K classes.

    Returns {k: (N,) int64}.
    """
    num_images, num_classes = preds.shape
    rows = np.arange(num_images)
    # Reversed columns: argmax returns the first maximum, i.e. the highest original index.
    remaining = preds[:, ::-1].astype(np.float64, copy=True)
    labels_rev = labels[:, ::-1]
    hits = np.zeros(num_images, dtype=np.int64)
    out = {}
    for rank in range(1, max(ks) + 1):
        if rank <= num_classes:
            best = remaining.argmax(axis=1)
            hits += labels_rev[rows, best]
            remaining[rows, best] = -np.inf  # finite inputs are validated, so -inf ranks last
        if rank in ks:
            out[rank] = hits.copy()
    return out


def compute_metrics(preds, labels, mask=None) -> dict[str, float]:
    """Metrics of section 9 for predictions `preds` (N x K scores) and 0/1 `labels` (N x K).

    - 'map': 100 * mean over classes of the average precision (scikit-learn's definition,
      ties included; 0 for a class without positives, which still counts in the mean).
    - For k in 1, 3, 5, with hits_k(i) = |top-k classes of image i that are positive| (tie
      rule: see `top_k_hits`):
      'prec_at_k' = mean_i hits_k(i) / k (k, not min(k, K), as in the original);
      'rec_at_k'  = mean_i hits_k(i) / |positives of i|;
      both are 0 for an image without positives (which still counts in the mean);
      'top_k' = share of images with hits_k(i) > 0.
    prec/rec/top values are fractions in [0, 1]; only 'map' is in percent.

    labels may be bool or numeric 0/1 (observed labels must be mapped with `== 1` first).
    mask: (N, K) bool, True where an entry counts (None: all): 'map' leaves the other entries out of
    each class's AP (`average_precision_per_class`); the per-image metrics rank every class, and an
    entry left out, whose label is 0, is no hit.
    Raises ValueError for non-2-D or mismatched shapes, empty input, non-finite preds,
    labels other than 0/1 or a mask that is not bool of the same shape.
    """
    preds, labels = _validate(preds, labels)
    mask = _validate_mask(mask, preds.shape)
    results = {'map': 100.0 * float(np.mean(average_precision_per_class(preds, labels, mask)))}
    num_pos = labels.sum(axis=1)
    hits = top_k_hits(preds, labels)
    for k in TOP_KS:
        h = hits[k]  # already 0 for an image without positives
        results[f'prec_at_{k}'] = float(np.mean(h / k))
        results[f'rec_at_{k}'] = float(np.mean(h / np.maximum(num_pos, 1)))
        results[f'top_{k}'] = float(np.mean(h > 0))
    return {key: results[key] for key in METRIC_KEYS}


def choose_thresholds(preds, labels, *, default: float = 0.5) -> np.ndarray:
    """Per-class decision thresholds that maximise the F1 score on held-out predictions.

    preds: (N, K) finite scores (e.g. the val split's sigmoid outputs; drop the NaN rows of
    skipped images first); labels: (N, K) 0/1 or bool. Returns (K,) float64 thresholds t_c,
    to be used with the rule "class c is predicted when score >= t_c".

    For class c the candidates are its distinct scores s; with TP(s) = #positives with score >= s
    and P(s) = #images with score >= s, F1(s) = 2 TP(s) / (P(s) + n_pos). Rules:
    - ties in F1: the highest threshold wins (fewest predicted positives);
    - equal scores form one candidate (all of them are predicted together);
    - a class without positives has F1 = 0 at every threshold: it gets `default`.
    Vectorised: one sort per column and cumulative sums, no loop over classes or thresholds.
    """
    preds, labels = _validate(preds, labels, 'choose_thresholds')
    num_images, num_classes = preds.shape
    order = np.argsort(-preds, axis=0, kind='stable')           # N x K, descending score
    scores = np.take_along_axis(preds, order, axis=0).astype(np.float64)
    hits = np.cumsum(np.take_along_axis(labels, order, axis=0), axis=0)   # TP(s) at each position
    num_pos = labels.sum(axis=0)                                 # (K,)
    predicted = np.arange(1, num_images + 1)[:, None]            # P(s) at each position
    # Only the last position of a run of equal scores is a threshold: "score >= s" takes the whole run.
    last_of_run = np.ones((num_images, num_classes), dtype=bool)
    last_of_run[:-1] = scores[:-1] != scores[1:]
    f1 = np.where(last_of_run, 2.0 * hits / (predicted + num_pos), -1.0)
    best = np.argmax(f1, axis=0)                                 # first maximum = highest threshold
    thresholds = scores[best, np.arange(num_classes)]
    thresholds[num_pos == 0] = float(default)
    return thresholds


def compute_metrics_loop(preds, labels) -> dict[str, float]:
    """Slow reference with the original's structure: scikit-learn AP per class and a Python
    loop over images (`np.argsort(..., kind='stable')[::-1][:k]` and `np.intersect1d`).

    Same definition and tie rule as `compute_metrics`; kept only to verify it and to time it
    (bench/bench_metrics.py). Never use it in training.
    """
    from sklearn.metrics import average_precision_score

    preds, labels = _validate(preds, labels)
    num_images, num_classes = labels.shape
    aps = [average_precision_score(labels[:, c], preds[:, c]) if labels[:, c].any() else 0.0
           for c in range(num_classes)]
    results = {'map': 100.0 * float(np.mean(aps))}
    for k in TOP_KS:
        prec, rec = np.zeros(num_images), np.zeros(num_images)
        for i in range(num_images):
            relevant = np.flatnonzero(labels[i])
            if len(relevant) == 0:
                continue
            hits = len(np.intersect1d(np.argsort(preds[i], kind='stable')[::-1][:k], relevant))
            prec[i] = hits / k
            rec[i] = hits / len(relevant)
        results[f'prec_at_{k}'] = float(np.mean(prec))
        results[f'rec_at_{k}'] = float(np.mean(rec))
        results[f'top_{k}'] = float(np.mean(prec > 0))
    return {key: results[key] for key in METRIC_KEYS}

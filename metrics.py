"""Evaluation metrics of the original code base (docs/original-vlpl.md section 9), vectorised.

The original computes these with a Python loop over images (14.4 s for one 40,137 x 80
evaluation); here the per-image metrics are whole-array numpy operations and the average
precision loops over classes only (K iterations of vectorised work).
"""
from __future__ import annotations

import numpy as np

from label_tables import Annotations

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
        if pos_scores.size:
            ap[c] = _average_precision(scores_sorted[c], pos_scores)
    return ap


def _average_precision(scores_sorted: np.ndarray, pos_scores_sorted: np.ndarray) -> float:
    """AP of one class from all its scores and its positives' scores, both sorted ascending (at
    least one positive): sum over positives of P(s_i), divided by the number of positives."""
    num_pos = pos_scores_sorted.size
    num_at_or_above = scores_sorted.size - np.searchsorted(scores_sorted, pos_scores_sorted, side='left')
    pos_at_or_above = num_pos - np.searchsorted(pos_scores_sorted, pos_scores_sorted, side='left')
    return np.sum(pos_at_or_above / num_at_or_above) / num_pos


def top_k_hits(preds: np.ndarray, labels: np.ndarray, ks=TOP_KS) -> dict[int, np.ndarray]:
    """Number of positives among the k highest-scored classes of every image, for each k.

    Tie rule: the original ranks with `np.argsort(preds)[::-1][:k]`, so among equal scores the
    higher class index comes first whenever numpy's sort is stable (always for K <= 16; for
    larger K numpy's default sort may break ties either way). We fix that rule for every K:
    the ranking is `np.argsort(preds, kind='stable')[::-1]`, i.e. descending score, ties
    broken towards the higher class index. For k > K the top-k list holds all K classes.

    Returns {k: (N,) int64}.
    """
    # Reversed columns: argmax returns the first maximum, i.e. the highest original index.
    return _top_k_hits_reversed(preds[:, ::-1].astype(np.float64, copy=True), labels[:, ::-1], ks)


def _top_k_hits_reversed(remaining: np.ndarray, labels_rev: np.ndarray, ks,
                         available: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """top_k_hits on float64 scores and labels with reversed columns; `remaining` is overwritten.
    available: (N,) number of entries of each row that may be ranked (the others are -inf in
    `remaining` and are never counted); None: every entry."""
    num_images, num_classes = remaining.shape
    rows = np.arange(num_images)
    hits = np.zeros(num_images, dtype=np.int64)
    out = {}
    for rank in range(1, max(ks) + 1):
        if rank <= num_classes:
            best = remaining.argmax(axis=1)
            hits += labels_rev[rows, best] if available is None else labels_rev[rows, best] * (rank <= available)
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
    labels other than 0/1 or a mask that is not bool of the same shape. A `label_tables.Annotations`
    table (partial annotations: only the annotated entries count, CSL's protocol) is evaluated by
    `compute_metrics_annotated`: its zeros are its mask.
    """
    if isinstance(labels, Annotations):
        if mask is not None:
            raise ValueError('compute_metrics: an Annotations table counts its annotated entries; pass no mask')
        return compute_metrics_annotated(preds, labels)
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


# ----------------------------------------------------------------------------------------------
# Partial annotations: only the annotated entries count


def _annotated_block(preds, labels, rows=slice(None), columns=slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """(scores, states) of one block, checked: finite scores, states in {-1, 0, 1}."""
    scores = np.asarray(preds[rows, columns])
    states = np.asarray(labels[rows, columns])
    if not np.isfinite(scores).all():
        raise ValueError('preds contain NaN or infinite values')
    if not isinstance(labels, Annotations) and states.size and (states.min() < -1 or states.max() > 1):
        raise ValueError('annotation states must be -1, 0 or 1')
    return scores, states


def _check_annotated(preds, labels, name: str) -> None:
    if len(preds.shape) != 2 or tuple(preds.shape) != tuple(labels.shape) or 0 in preds.shape:
        raise ValueError(f'{name}: preds {tuple(preds.shape)} and annotations {tuple(labels.shape)} must be '
                         'the same non-empty N x K shape')


BLOCK_ENTRIES = 2 ** 25  # entries of a block of classes (N x C) read at a time: 32 MB of int8 states
ROW_BLOCK_ENTRIES = 2 ** 22  # entries of a block of rows (R x K) ranked at a time: 48 MB of work arrays


def _class_segments(preds, labels, class_block: int | None):
    """For each block of classes: (c0, number of classes C, segment bounds (C + 1,), scores and
    states of the annotated entries, class-major). The entries of class c0 + j are
    [bounds[j], bounds[j + 1]), in row order. class_block None: as many classes as fit BLOCK_ENTRIES."""
    num_images, num_classes = labels.shape
    class_block = class_block or max(1, min(num_classes, BLOCK_ENTRIES // max(num_images, 1)))
    for c0 in range(0, num_classes, class_block):
        c1 = min(c0 + class_block, num_classes)
        scores, states = _annotated_block(preds, labels, columns=slice(c0, c1))
        rows, columns = np.nonzero(states)  # row-major (contiguous, fast); then class-major, rows in order
        order = np.argsort(columns, kind='stable')
        rows, columns = rows[order], columns[order]
        bounds = np.searchsorted(columns, np.arange(c1 - c0 + 1))
        yield c0, c1 - c0, bounds, scores[rows, columns], states[rows, columns]


SKIPPED = ('no_annotation', 'no_positive', 'no_negative')


def average_precision_annotated(preds, labels, *, class_block: int | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Per-class AP over the annotated entries only, as CSL evaluates OpenImages
    (PartialLabelingCSL, src/helper_functions/helper_functions.py, `AP_partial`).

    preds: N x K finite scores (an array, or anything read by [:, c0:c1]); labels: N x K annotation
    states, 1 positive, -1 annotated negative, 0 not counted (a label_tables.Annotations table, or
    an int array: e.g. a VOC2007 'difficult' entry as 0). For class c the AP (`average_precision_per_class`'s
    definition, scikit-learn's, ties grouped) is taken over the entries with a state != 0. A class
    is skipped, and counted, when it has no annotated entry ('no_annotation'), else no positive
    ('no_positive'), else no annotated negative ('no_negative'): CSL's three counts, in its order.
    The table is read in blocks of `class_block` classes (None: BLOCK_ENTRIES entries a block):
    memory beyond the inputs is one block.

    Returns (ap (K,) float64 with NaN for skipped classes, {'no_annotation', 'no_positive',
    'no_negative': counts}). With every entry annotated and every class holding both a positive
    and a negative, ap equals average_precision_per_class bit for bit.
    """
    _check_annotated(preds, labels, 'average_precision_annotated')
    ap = np.full(labels.shape[1], np.nan)
    skipped = dict.fromkeys(SKIPPED, 0)
    for c0, width, bounds, scores, states in _class_segments(preds, labels, class_block):
        for j in range(width):
            a, b = bounds[j], bounds[j + 1]
            positive = states[a:b] == 1
            num_pos = int(positive.sum())
            reason = 'no_annotation' if a == b else 'no_positive' if num_pos == 0 else \
                'no_negative' if num_pos == b - a else None
            if reason:
                skipped[reason] += 1
                continue
            segment = scores[a:b]
            ap[c0 + j] = _average_precision(np.sort(segment), np.sort(segment[positive]))
    return ap, skipped


def compute_metrics_annotated(preds, labels, *, class_block: int | None = None,
                              row_block: int | None = None) -> dict[str, float]:
    """compute_metrics over the annotated entries only (labels: annotation states, see
    `average_precision_annotated`).

    - 'map': 100 * mean AP over the classes that have an annotated positive and an annotated
      negative (the others are skipped, as CSL's mAP over its valid classes; NaN if none is left).
    - prec/rec/top at k: each image ranks only its annotated entries (tie rule of `top_k_hits`);
      hits are annotated positives among its k best; prec = hits / k, rec = hits / positives.
    Read in blocks of classes (AP) and of rows (top-k): never a dense N x K copy.
    """
    ap, _ = average_precision_annotated(preds, labels, class_block=class_block)
    evaluated = ap[~np.isnan(ap)]
    results = {'map': 100.0 * float(np.mean(evaluated)) if evaluated.size else float('nan')}
    hits = {k: [] for k in TOP_KS}
    num_pos = []
    row_block = row_block or max(1, ROW_BLOCK_ENTRIES // labels.shape[1])
    for r0 in range(0, labels.shape[0], row_block):
        scores, states = _annotated_block(preds, labels, rows=slice(r0, r0 + row_block))
        counted = states[:, ::-1] != 0
        remaining = np.where(counted, scores[:, ::-1], -np.inf).astype(np.float64)
        block_hits = _top_k_hits_reversed(remaining, states[:, ::-1] == 1, TOP_KS, available=counted.sum(axis=1))
        for k in TOP_KS:
            hits[k].append(block_hits[k])
        num_pos.append((states == 1).sum(axis=1))
    num_pos = np.concatenate(num_pos)
    for k in TOP_KS:
        h = np.concatenate(hits[k])
        results[f'prec_at_{k}'] = float(np.mean(h / k))
        results[f'rec_at_{k}'] = float(np.mean(h / np.maximum(num_pos, 1)))
        results[f'top_{k}'] = float(np.mean(h > 0))
    return {key: results[key] for key in METRIC_KEYS}


def choose_thresholds_annotated(preds, labels, *, default: float = 0.5, class_block: int | None = None) -> np.ndarray:
    """choose_thresholds over the annotated entries only (labels: annotation states): for class c,
    the F1-maximising threshold among its annotated entries, with choose_thresholds' rules (equal
    scores one candidate, highest threshold on ties, `default` for a class without an annotated
    positive). With every entry annotated it equals choose_thresholds bit for bit."""
    _check_annotated(preds, labels, 'choose_thresholds_annotated')
    thresholds = np.full(labels.shape[1], float(default))
    for c0, width, bounds, scores, states in _class_segments(preds, labels, class_block):
        for j in range(width):
            a, b = bounds[j], bounds[j + 1]
            positive = states[a:b] == 1
            num_pos = int(positive.sum())
            if num_pos == 0:
                continue
            order = np.argsort(-scores[a:b], kind='stable')
            ranked = scores[a:b][order].astype(np.float64)
            hits = np.cumsum(positive[order])
            last_of_run = np.ones(b - a, dtype=bool)
            last_of_run[:-1] = ranked[:-1] != ranked[1:]
            f1 = np.where(last_of_run, 2.0 * hits / (np.arange(1, b - a + 1) + num_pos), -1.0)
            thresholds[c0 + j] = ranked[np.argmax(f1)]
    return thresholds


def per_class_ap(preds, labels, mask=None) -> np.ndarray:
    """(K,) AP in [0, 1] of every class: `average_precision_per_class` against 0/1 labels (mask: the
    entries that count), or `average_precision_annotated` against an Annotations table (NaN for
    skipped classes)."""
    if isinstance(labels, Annotations):
        return average_precision_annotated(preds, labels)[0]
    return average_precision_per_class(np.asarray(preds), np.asarray(labels) == 1, mask)


def per_class_thresholds(preds, labels) -> np.ndarray:
    """`choose_thresholds`, or `choose_thresholds_annotated` against an Annotations table."""
    if isinstance(labels, Annotations):
        return choose_thresholds_annotated(preds, labels)
    return choose_thresholds(preds, labels)


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

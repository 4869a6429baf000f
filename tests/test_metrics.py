"""compute_metrics against compute_metrics_loop (scikit-learn AP per class and the original's
per-image loop), and hand-made corner cases."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from metrics import METRIC_KEYS, average_precision_per_class, compute_metrics, compute_metrics_loop


def assert_same(got, expected):
    assert list(got) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_against_sklearn_and_loop(seed):
    rng = np.random.default_rng(seed)
    preds = rng.random((300, 12)).astype(np.float32)
    labels = (rng.random((300, 12)) < 0.2).astype(np.float32)
    labels[:, 4] = 0                      # a class without positives
    labels[:7] = 0                        # images without positives
    assert_same(compute_metrics(preds, labels), compute_metrics_loop(preds, labels))


@pytest.mark.parametrize('seed', [0, 1])
def test_many_ties_against_sklearn_and_loop(seed):
    rng = np.random.default_rng(seed)
    preds = np.round(rng.random((200, 20)), 1)   # 11 distinct values: ties everywhere
    labels = (rng.random((200, 20)) < 0.3).astype(np.int64)
    assert_same(compute_metrics(preds, labels), compute_metrics_loop(preds, labels))


@pytest.mark.parametrize('seed', [0, 1])
def test_masked_ap_equals_dropping_each_columns_rows(seed):
    """A mask leaves entries out of their class's AP exactly as SGRE's VOCmAP drops the ignored rows of
    each class (lib/metrics.py _voc_mAP: target[ignore != 1]); here against scikit-learn on the kept
    rows, ties included. Masked entries may score anything, even above every positive."""
    rng = np.random.default_rng(seed)
    preds = np.round(rng.random((150, 9)), 1)
    labels = (rng.random((150, 9)) < 0.3)
    mask = rng.random((150, 9)) < 0.8
    preds[~mask] = 1.0  # left out: must not count as false positives
    mask[:, 3] &= ~labels[:, 3]  # class 3: every positive left out -> AP 0
    expected = [average_precision_score(labels[mask[:, c], c], preds[mask[:, c], c]) if labels[mask[:, c], c].any()
                else 0.0 for c in range(9)]
    np.testing.assert_allclose(average_precision_per_class(preds, labels, mask), expected, rtol=1e-12)
    assert compute_metrics(preds, labels, mask)['map'] == pytest.approx(100 * np.mean(expected), rel=1e-12)
    # the per-image metrics do not change; without a mask nothing does
    unmasked = compute_metrics(preds, labels)
    assert {k: v for k, v in compute_metrics(preds, labels, mask).items() if k != 'map'} == \
        {k: v for k, v in unmasked.items() if k != 'map'}
    assert_same(unmasked, compute_metrics_loop(preds, labels))
    np.testing.assert_array_equal(average_precision_per_class(preds, labels, np.ones_like(mask)),
                                  average_precision_per_class(preds, labels))
    with pytest.raises(ValueError, match='mask must be a bool array of shape'):
        compute_metrics(preds, labels, mask[:, :8])
    with pytest.raises(ValueError, match='mask must be a bool array'):
        compute_metrics(preds, labels, mask.astype(int))


def test_hand_made_small_k():
    preds = np.array([[0.9, 0.8, 0.1],
                      [0.2, 0.7, 0.6],
                      [0.5, 0.5, 0.5]])
    labels = np.array([[1, 0, 0],
                       [0, 1, 0],
                       [0, 0, 0]])       # class 2 and image 2 have no positive
    got = compute_metrics(preds, labels)
    # AP: class 0 -> 1, class 1 -> positive ranked 2nd -> 1/2, class 2 -> 0
    assert got['map'] == pytest.approx(50.0)
    assert got['prec_at_1'] == pytest.approx(2 / 3)
    assert got['prec_at_3'] == pytest.approx(2 / 9)     # 1/3 + 1/3 + 0 over 3 images
    assert got['prec_at_5'] == pytest.approx(2 / 15)    # divided by k = 5 although K = 3
    for k in (1, 3, 5):
        assert got[f'rec_at_{k}'] == pytest.approx(2 / 3)
        assert got[f'top_{k}'] == pytest.approx(2 / 3)


def test_ap_with_tied_scores():
    # threshold 0.5: 1 of 3 correct, recall 1/2; threshold 0.2: 2 of 4, recall 1 -> 1/6 + 1/4
    preds = np.array([[0.5], [0.5], [0.5], [0.2]])
    labels = np.array([[1], [0], [0], [1]])
    assert compute_metrics(preds, labels)['map'] == pytest.approx(100 * 5 / 12)
    assert average_precision_score(labels[:, 0], preds[:, 0]) == pytest.approx(5 / 12)


def test_top_k_tie_rule_prefers_higher_class_index():
    preds = np.array([[0.5, 0.5, 0.5, 0.1]])
    low = compute_metrics(preds, np.array([[1, 0, 0, 0]]))
    assert low['prec_at_1'] == 0.0 and low['prec_at_3'] == pytest.approx(1 / 3)
    high = compute_metrics(preds, np.array([[0, 0, 1, 0]]))
    assert high['prec_at_1'] == 1.0


def test_single_class_and_bool_labels():
    preds = np.array([[0.3], [0.8], [0.1]])
    labels = np.array([[False], [True], [False]])
    got = compute_metrics(preds, labels)
    assert got['map'] == pytest.approx(100.0)
    assert got['prec_at_1'] == pytest.approx(1 / 3)   # one image with a positive, hit at rank 1
    assert got['prec_at_5'] == pytest.approx(1 / 15)
    assert got['rec_at_5'] == pytest.approx(1 / 3)


def test_invalid_input():
    good = np.zeros((4, 3))
    with pytest.raises(ValueError, match='same shape'):
        compute_metrics(good, np.zeros((4, 2)))
    with pytest.raises(ValueError, match='2-D'):
        compute_metrics(good[0], good[0])
    with pytest.raises(ValueError, match='NaN or infinite'):
        compute_metrics(np.full((4, 3), np.nan), good)
    with pytest.raises(ValueError, match='0/1'):
        compute_metrics(good, good - 1)
    with pytest.raises(ValueError, match='at least one image'):
        compute_metrics(np.zeros((0, 3)), np.zeros((0, 3)))


def _thresholds_loop(preds, labels, default=0.5):
    """Reference for choose_thresholds: every class, every distinct score as threshold, scikit-learn's
    F1 of 'score >= t'; the highest threshold among the best F1 values."""
    from sklearn.metrics import f1_score

    out = []
    for c in range(preds.shape[1]):
        if labels[:, c].sum() == 0:
            out.append(default)
            continue
        best_t, best_f1 = None, -1.0
        for t in sorted(set(preds[:, c].tolist()), reverse=True):
            f1 = f1_score(labels[:, c], preds[:, c] >= t)
            if f1 > best_f1 + 1e-12:
                best_t, best_f1 = t, f1
        out.append(best_t)
    return np.array(out)


def test_choose_thresholds_matches_loop_reference():
    from metrics import choose_thresholds

    rng = np.random.RandomState(0)
    for n, k in ((30, 5), (57, 9)):
        labels = (rng.rand(n, k) < 0.3).astype(np.float32)
        labels[:, 0] = 0                                          # a class without positives
        preds = np.round(rng.rand(n, k) * 0.6 + 0.4 * labels, 1)  # rounding makes many ties
        got = choose_thresholds(preds, labels, default=0.5)
        np.testing.assert_array_equal(got, _thresholds_loop(preds, labels))
        assert got[0] == 0.5


def test_choose_thresholds_hand_computed():
    from metrics import choose_thresholds

    preds = np.array([[0.9, 0.2], [0.8, 0.2], [0.3, 0.7], [0.6, 0.2]])
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    # class 0: t=0.9 F1 2/3, t=0.8 F1 1, t=0.6 F1 0.8 -> 0.8. class 1: t=0.7 F1 1.
    np.testing.assert_array_equal(choose_thresholds(preds, labels), [0.8, 0.7])
    # equal F1 at t=0.9 (P=1, TP=1 -> 2/3) and t=0.3 (P=4, TP=2 -> 2/3): the higher one wins
    preds = np.array([[0.9], [0.5], [0.5], [0.3]])
    labels = np.array([[1], [0], [0], [1]])
    assert choose_thresholds(preds, labels)[0] == 0.9
    with pytest.raises(ValueError, match='choose_thresholds: preds contain NaN'):
        choose_thresholds(np.array([[np.nan]]), np.array([[1]]))

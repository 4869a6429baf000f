"""Every loss against hand-computed numbers and an independent per-element reference."""
import math

import numpy as np
import pytest
import torch

import losses
from losses import LOSSES, apl_update, compute_batch_loss, count_unknowns

EPS = 1e-5
HP = dict(alpha=0.2, beta=0.3, beta_pos=0.7, beta_neg=0.0, positive=2, negative=4, unknown=4,
          warmup_epoch=0, ls_coef=0.1, expected_num_pos=1.5, num_classes=4)

# p exactly 0 and 1 included; row 1 is unknown-only; (0, 3) is an observed negative.
P = [[0.9, 0.2, 0.0, 0.6],
     [0.3, 1.0, 0.5, 0.1],
     [0.7, 0.4, 0.8, 1.0]]
O = [[1, 0, 0, -1],
     [0, 0, 0, 0],
     [0, 1, 0, 0]]
T = [[1, 0, 0, 0],
     [0, 1, 1, 0],
     [1, 1, 0, 0]]
PL = [[0, 1, -1, 0],
      [1, 0, -1, 0],
      [-1, 0, 1, -1]]
# Soft negatives as written by apl_update, plus a hard -1.
O_APL = [[1, -0.3, 0, -1],
         [0, -0.05, 0, 0],
         [-0.2, 1, 0, 0]]


def nl(x):
    return -math.log(x + EPS)


def ent(p):
    return p * nl(p) + (1 - p) * nl(1 - p)


def ref_element(name, p, o, t, pl, hp, epoch):
    """The rules table of docs/original-vlpl.md section 8 for one entry, written independently."""
    c, a = hp['ls_coef'], hp['alpha']
    f = o if o != 0 else pl
    if name in ('EM_PL', 'EM_PL_ASL') and epoch <= hp['warmup_epoch']:
        name = 'EM'
    # Partial annotations (docs/partial-labels.md): the original has no -1 entries; here an annotated
    # negative is a certain negative, whatever the pseudo-label says.
    if o == -1 and name in ('an', 'wan', 'epr', 'EM', 'EM_APL', 'EM_PL'):
        return nl(1 - p)
    if o == -1 and name == 'an_ls':
        return (1 - c) * nl(1 - p) + c * nl(p)
    if o == -1 and name == 'EM_PL_ASL':
        return p ** hp['negative'] * nl(1 - p)
    if name == 'bce':
        return nl(p) if t == 1 else nl(1 - p)
    if name == 'bce_ls':
        return (1 - c) * nl(p) + c * nl(1 - p) if t == 1 else (1 - c) * nl(1 - p) + c * nl(p)
    if name == 'iun':
        return nl(1 - p) if t == 0 else (nl(p) if o == 1 else 0.0)
    if name == 'iu':
        return nl(p) if o == 1 else (nl(1 - p) if o == -1 else 0.0)
    if name == 'an':
        return nl(p) if o == 1 else (nl(1 - p) if o == 0 else 0.0)
    if name == 'an_ls':
        if o == 1:
            return (1 - c) * nl(p) + c * nl(1 - p)
        return (1 - c) * nl(1 - p) + c * nl(p) if o == 0 else 0.0
    if name == 'wan':
        return nl(p) if o == 1 else (nl(1 - p) / (hp['num_classes'] - 1) if o == 0 else 0.0)
    if name == 'epr':
        return nl(p) if o == 1 else 0.0
    if name == 'EM':
        return nl(p) if o == 1 else (-a * ent(p) if o == 0 else 0.0)
    if name == 'EM_APL':
        if o == 1:
            return nl(p)
        if o == 0:
            return -a * ent(p)
        s = -o
        return hp['beta'] * (s * nl(p) + (1 - s) * nl(1 - p))
    if name == 'EM_PL':
        if o == 1:
            return nl(p)
        if o == 0 and pl == 1:
            return hp['beta_pos'] * (0.9 * nl(p) + 0.1 * nl(1 - p))
        return -a * ent(p) if f == 0 else 0.0
    if name == 'EM_PL_ASL':
        gp, gn, gu = hp['positive'], hp['negative'], hp['unknown']
        if o == 1 or (o == 0 and pl == 1):
            return (1 - p) ** gp * nl(p)
        if o == 0 and pl == -1:
            return p ** gn * nl(1 - p)
        return -(1 - p) ** gu * ent(p) if f == 0 else 0.0
    raise KeyError(name)


def ref_loss(name, preds, obs, true, pl, hp, epoch=1):
    B, K = len(preds), len(preds[0])
    if name == 'pr':
        total = 0.0
        for b in range(B):
            for i in range(K):
                if obs[b][i] == 1:
                    total += sum(max(0.0, 1 - preds[b][i] + preds[b][j]) for j in range(K) if obs[b][j] in (0, -1))
        return total / (B * K)
    total = sum(ref_element(name, preds[b][k], obs[b][k], true[b][k], pl[b][k], hp, epoch)
                for b in range(B) for k in range(K)) / (B * K)
    if name == 'epr':
        mean_sum = sum(sum(row) for row in preds) / B
        total += (mean_sum - hp['expected_num_pos']) ** 2 / K ** 2
    return total


def batch_loss(name, preds, obs, true=T, pl=PL, hp=None, epoch=1, dtype=torch.float64):
    hp = dict(HP, num_classes=len(preds[0])) if hp is None else hp
    kwargs = {}
    if name in losses.NEEDS_TRUE_LABELS:
        kwargs['true_labels'] = torch.tensor(true, dtype=dtype)
    if name in losses.NEEDS_PSEUDO_LABELS:
        kwargs['pseudo_labels'] = torch.tensor(pl, dtype=dtype)
    return compute_batch_loss(name, torch.tensor(preds, dtype=dtype), torch.tensor(obs, dtype=dtype), hp,
                              epoch=epoch, **kwargs)


def test_registry_and_needs():
    assert set(LOSSES) == {'bce', 'bce_ls', 'iun', 'iu', 'pr', 'an', 'an_ls', 'wan', 'epr',
                           'EM', 'EM_APL', 'EM_PL', 'EM_PL_ASL'}
    assert losses.NEEDS_TRUE_LABELS == {'bce', 'bce_ls', 'iun'}
    assert losses.NEEDS_PSEUDO_LABELS == {'EM_PL', 'EM_PL_ASL'}
    assert losses.loss_hparams('EM_APL') == ('alpha', 'beta')
    assert losses.loss_hparams('EM_PL') == ('alpha', 'beta_pos', 'warmup_epoch')
    assert losses.loss_hparams('an') == ()
    from config import DATASETS
    assert {d.name: d.expected_num_pos for d in DATASETS.values()} == {
        'pascal': 1.5, 'voc2007': 1.5, 'coco': 2.9, 'nuswide': 1.9, 'cub': 31.4, 'demo': 3.4,
        'openimages': None}  # not known: -l epr is refused there


@pytest.mark.parametrize('name', sorted(set(LOSSES) - {'EM_APL'}))
def test_loss_matches_reference(name):
    got = batch_loss(name, P, O).item()
    assert got == pytest.approx(ref_loss(name, P, O, T, PL, HP), rel=1e-12, abs=1e-12)


def test_em_apl_soft_negatives_match_reference():
    got = batch_loss('EM_APL', P, O_APL).item()
    assert got == pytest.approx(ref_loss('EM_APL', P, O_APL, T, PL, HP), rel=1e-12)


def test_hand_values():
    half = -math.log(0.5 + EPS)
    # an: one positive and one assumed negative at p = 0.5
    assert batch_loss('an', [[0.5, 0.5]], [[1, 0]]).item() == pytest.approx(half, rel=1e-12)
    # wan with K = 3: (neglog(.5) + 2 * neglog(.5) / 2) / 3
    assert batch_loss('wan', [[0.5, 0.5, 0.5]], [[1, 0, 0]], hp={}).item() == pytest.approx(2 * half / 3, rel=1e-12)
    # EM: unknown at p = 0.5 contributes -alpha * 2 * 0.5 * neglog(.5)
    assert batch_loss('EM', [[0.5, 0.5]], [[1, 0]]).item() == pytest.approx((half - 0.2 * half) / 2, rel=1e-12)
    # iu: the unknown entry contributes nothing, the observed negative neglog(1 - 0.25)
    assert batch_loss('iu', [[0.5, 0.5, 0.25]], [[1, 0, -1]]).item() == pytest.approx(
        (half + -math.log(0.75 + EPS)) / 3, rel=1e-12)
    # epr: B=2, K=2, sums 1.0 and 0.6 -> mean 0.8, reg (0.8 - 1.5)^2 / 4 = 0.1225
    got = batch_loss('epr', [[0.5, 0.5], [0.5, 0.1]], [[1, 0], [0, 0]]).item()
    assert got == pytest.approx(half / 4 + 0.1225, rel=1e-12)


def test_pr_hand_values():
    # unobserved j = 1, 3 and observed negative j = 2: (1 - .9 + .2) + (1 - .9 + .5) + (1 - .9 + 0) = 1.0,
    # over B*K = 4
    assert batch_loss('pr', [[0.9, 0.2, 0.5, 0.0]], [[1, 0, -1, 0]]).item() == pytest.approx(0.25, abs=1e-12)
    # two positives: 0.6 + 0.1 and 1.3 + 0.8 -> 2.8 / 4
    assert batch_loss('pr', [[0.9, 0.2, 0.5, 0.0]], [[1, 1, 0, 0]]).item() == pytest.approx(0.7, abs=1e-12)
    # margins clip at 0: p_i = 1, p_j = 0 -> max(0, 0) = 0; a row without positives adds nothing
    assert batch_loss('pr', [[1.0, 0.0], [0.3, 0.6]], [[1, 0], [0, 0]]).item() == 0.0


def test_bce_uses_true_labels_and_ignores_observed():
    a = batch_loss('bce', P, O)
    b = batch_loss('bce', P, [[0] * 4] * 3)
    assert a.item() == b.item()


@pytest.mark.parametrize('name', ['EM_PL', 'EM_PL_ASL'])
def test_warmup_epochs_fall_back_to_em(name):
    hp = dict(HP, warmup_epoch=2)
    em = batch_loss('EM', P, O, hp=hp).item()
    for epoch in (1, 2):
        assert batch_loss(name, P, O, hp=hp, epoch=epoch).item() == em
    after = batch_loss(name, P, O, hp=hp, epoch=3).item()
    assert after != em
    assert after == pytest.approx(ref_loss(name, P, O, T, PL, hp, epoch=3), rel=1e-12)


def test_em_pl_hand_value():
    # o=1 at p=.8; pl=1 at p=.5; pl=-1 at p=.3 (nothing); unknown at p=.6
    got = batch_loss('EM_PL', [[0.8, 0.5, 0.3, 0.6]], [[1, 0, 0, 0]], pl=[[1, 1, -1, 0]]).item()
    expected = (nl(0.8) + 0.7 * (0.9 * nl(0.5) + 0.1 * nl(0.5)) + 0.0 - 0.2 * ent(0.6)) / 4
    assert got == pytest.approx(expected, rel=1e-12)


def test_em_pl_asl_hand_value():
    got = batch_loss('EM_PL_ASL', [[0.8, 0.5, 0.3, 0.6]], [[1, 0, 0, 0]], pl=[[1, 1, -1, 0]]).item()
    expected = (0.2 ** 2 * nl(0.8) + 0.5 ** 2 * nl(0.5) + 0.3 ** 4 * nl(0.7) - 0.4 ** 4 * ent(0.6)) / 4
    assert got == pytest.approx(expected, rel=1e-12)


def test_em_apl_hand_value():
    got = batch_loss('EM_APL', [[0.8, 0.1, 0.6]], [[1, -0.25, 0]]).item()
    expected = (nl(0.8) + 0.3 * (0.25 * nl(0.1) + 0.75 * nl(0.9)) - 0.2 * ent(0.6)) / 3
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('name', sorted(LOSSES))
def test_gradients_finite_at_saturated_outputs(name):
    # sigmoid(+-200) is exactly 1 / 0 in float32
    logits = torch.tensor([[200.0, -200.0, 0.0, 3.0], [-200.0, 200.0, -1.0, 200.0], [0.5, -200.0, 200.0, -3.0]],
                          requires_grad=True)
    preds = torch.sigmoid(logits)
    assert preds.min().item() == 0.0 and preds.max().item() == 1.0
    obs = O_APL if name == 'EM_APL' else O
    kwargs = {}
    if name in losses.NEEDS_TRUE_LABELS:
        kwargs['true_labels'] = torch.tensor(T, dtype=torch.float32)
    if name in losses.NEEDS_PSEUDO_LABELS:
        kwargs['pseudo_labels'] = torch.tensor(PL, dtype=torch.float32)
    loss = compute_batch_loss(name, preds, torch.tensor(obs, dtype=torch.float32), HP, epoch=1, **kwargs)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # and directly with respect to p at exactly 0 and 1
    p = torch.tensor(P, requires_grad=True)
    compute_batch_loss(name, p, torch.tensor(obs, dtype=torch.float32), HP, epoch=1, **kwargs).backward()
    assert torch.isfinite(p.grad).all()


def test_invalid_input_raises():
    p, o = torch.tensor(P), torch.tensor(O, dtype=torch.float32)
    with pytest.raises(ValueError, match=r'preds must lie in \[0, 1\]'):
        compute_batch_loss('an', p * 1.5, o, HP)
    with pytest.raises(ValueError, match='preds must lie'):
        compute_batch_loss('an', p - 0.5, o, HP)
    with pytest.raises(ValueError, match='preds must lie'):
        compute_batch_loss('an', torch.full_like(p, float('nan')), o, HP)
    with pytest.raises(ValueError, match=r'observed labels must lie in \[-1, 1\]'):
        compute_batch_loss('an', p, o * 2, HP)
    with pytest.raises(ValueError, match='shape'):
        compute_batch_loss('an', p, o[:, :3], HP)
    with pytest.raises(ValueError, match='B x K'):
        compute_batch_loss('an', p[0], o[0], HP)
    with pytest.raises(ValueError, match="unknown loss 'nope'; valid losses: bce, bce_ls"):
        compute_batch_loss('nope', p, o, HP)
    with pytest.raises(ValueError, match='label estimator'):
        compute_batch_loss('role', p, o, HP)
    with pytest.raises(ValueError, match='needs true_labels'):
        compute_batch_loss('iun', p, o, HP)
    with pytest.raises(ValueError, match='needs pseudo_labels'):
        compute_batch_loss('EM_PL', p, o, HP)
    with pytest.raises(ValueError, match='true_labels must be 0/1'):
        compute_batch_loss('bce', p, o, HP, true_labels=o)
    with pytest.raises(ValueError, match='pseudo_labels must be'):
        compute_batch_loss('EM_PL', p, o, HP, pseudo_labels=o * 0.5)
    with pytest.raises(ValueError, match="hparams \\['alpha'\\]"):
        compute_batch_loss('EM', p, o, {})
    with pytest.raises(ValueError, match='num_classes'):
        compute_batch_loss('an', p, o, dict(HP, num_classes=5))
    # validate=False skips only the value checks
    compute_batch_loss('an', p, o * 2, HP, validate=False)


def test_apl_update_hand_worked():
    obs = np.array([[1, 0], [0, 0], [0, 0], [0, 0], [0, 0]], dtype=np.float32)
    preds = np.array([[0.9, 0.5], [0.3, 0.05], [0.1, 0.6], [0.2, 0.0], [0.1, 0.2]], dtype=np.float32)
    counts = count_unknowns(obs)
    np.testing.assert_array_equal(counts, [4, 5])
    # num_epochs - warmup = 2: n = int(0.9 * 4 / 2) = 1 and int(0.9 * 5 / 2) = 2
    settings = dict(num_epochs=6, warmup_epoch=4)
    unchanged = apl_update(preds, obs, counts, epoch=3, **settings)
    np.testing.assert_array_equal(unchanged, obs)
    assert unchanged is not obs
    first = apl_update(preds, obs, counts, epoch=4, **settings)
    # class 0: tie at 0.1 (rows 2 and 4) -> row 2; class 1: rows 3 (p=0 stays 0) and 1
    expected = obs.copy()
    expected[2, 0] = -0.1
    expected[1, 1] = -0.05
    np.testing.assert_array_equal(first, expected)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(obs[:, 1], 0)  # input untouched
    second = apl_update(preds, first, counts, epoch=5, **settings)
    expected[4, 0] = -0.1   # remaining unknowns of class 0: rows 1, 3, 4
    expected[4, 1] = -0.2   # class 1: row 3 (p=0, stays unknown) and row 4
    np.testing.assert_array_equal(second, expected)


def test_apl_update_matches_per_class_loop():
    rng = np.random.default_rng(3)
    obs = np.where(rng.random((60, 5)) < 0.15, 1.0, 0.0).astype(np.float32)
    obs[rng.random((60, 5)) < 0.1] = -1
    preds = rng.random((60, 5)).astype(np.float32)
    counts = count_unknowns(obs)
    got = apl_update(preds, obs, counts, epoch=6, num_epochs=10, warmup_epoch=5, neg_proportion=0.9)
    expected = obs.copy()
    for c in range(5):
        rows = np.flatnonzero(obs[:, c] == 0)
        n = int(0.9 * counts[c] / (10 - 5))
        chosen = rows[np.argsort(preds[rows, c], kind='stable')[:n]]
        expected[chosen, c] = -preds[chosen, c]
    np.testing.assert_array_equal(got, expected)
    assert (got < 0).sum() > (obs < 0).sum()


def test_apl_update_invalid_input():
    obs = np.zeros((3, 2), dtype=np.int8)
    preds = np.full((3, 2), 0.5)
    out = apl_update(preds, obs, count_unknowns(obs), epoch=1, num_epochs=2, warmup_epoch=0)
    assert out.dtype == np.float32  # integer input gets a float result for the soft labels
    with pytest.raises(ValueError, match='must exceed warmup_epoch'):
        apl_update(preds, obs, [3, 3], epoch=5, num_epochs=5, warmup_epoch=5)
    with pytest.raises(ValueError, match='unknown_counts'):
        apl_update(preds, obs, [3], epoch=1, num_epochs=2, warmup_epoch=0)
    with pytest.raises(ValueError, match=r'preds must lie in \[0, 1\]'):
        apl_update(preds + 1, obs, [3, 3], epoch=1, num_epochs=2, warmup_epoch=0)
    with pytest.raises(ValueError, match='N x K'):
        apl_update(preds[:2], obs, [3, 3], epoch=1, num_epochs=2, warmup_epoch=0)

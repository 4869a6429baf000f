"""losses_peers: bit-exact against values computed by the original code (tests/fixtures/peers_reference.npz:
inputs and outputs of the original functions run on seeded random inputs with torch 2.13 on CPU, at the
commits the file records; see docs/peer-methods.md), against a loop-by-loop transcription of each
original formula written here (float64, loss and gradient), and on hand-computed cases."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses_peers as lp

FIXTURE = Path(__file__).parent / 'fixtures' / 'peers_reference.npz'


@pytest.fixture(scope='module')
def ref():
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def cases(ref, prefix):
    return sorted({key.split('/')[1] for key in ref if key.startswith(prefix + '/') and key.count('/') >= 2},
                  key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def t(a):
    return torch.from_numpy(np.array(a))


def same(a, b):
    """Bitwise equality of values (NaN == NaN), as float32 arrays."""
    a = a.detach().numpy() if torch.is_tensor(a) else np.asarray(a)
    return np.array_equal(a, np.asarray(b), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# against the original code (fixture), float32 on CPU, bitwise
# ---------------------------------------------------------------------------------------------

def test_role_matches_original(ref):
    for case in cases(ref, 'role'):
        if not case.isdigit():
            continue
        p = f'role/{case}/'
        logits = t(ref[p + 'logits']).requires_grad_()
        theta = t(ref[p + 'theta']).requires_grad_()
        estimates = torch.sigmoid(theta[t(ref[p + 'idx'])])
        loss = lp.role_loss(preds=torch.sigmoid(logits), estimates=estimates, observed=t(ref[p + 'obs']),
                            expected_num_pos=float(ref[p + 'epn']))
        loss.backward()
        assert same(loss, ref[p + 'loss']), case
        assert same(logits.grad, ref[p + 'grad_logits']), case
        assert same(theta.grad, ref[p + 'grad_theta']), case


def test_role_init_and_warm_start_match_original(ref):
    torch.manual_seed(0)
    assert same(lp.role_init_logits(observed=ref['role/init_obs']), ref['role/init_theta'])
    gen = torch.Generator().manual_seed(0)
    assert same(lp.role_init_logits(observed=ref['role/init_obs'], generator=gen), ref['role/init_theta'])
    assert same(lp.role_logits_from_estimates(ref['role/warm_est']), ref['role/warm_theta'])


def test_ll_matches_original(ref):
    n = 0
    for case in cases(ref, 'll'):
        if not case.isdigit():
            continue
        p = f'll/{case}/'
        meta = json.loads(str(ref[p + 'meta']))
        inputs = f"llin/{meta['input']}/"
        logits = t(ref[inputs + 'logits']).requires_grad_()
        released = meta['code'] == 'll' and meta['scheme'] == 'LL-Cp'
        loss, flips = lp.ll_loss(logits=logits, observed=t(ref[inputs + 'obs']), clean_rate=meta['clean_rate'],
                                 delta_rel=meta['delta_rel'], scheme=meta['scheme'], llcp_as_released=released,
                                 flips_include_threshold=meta['code'] == 'bg')
        loss.backward()
        assert same(loss, ref[p + 'loss']), meta
        assert same(logits.grad, ref[p + 'grad']), meta
        if meta['scheme'] == 'LL-Cp' and meta['code'] != 'll':      # the intended LL-Cp's permanent flips
            if meta['epoch'] == 1:
                assert flips is None
            else:
                assert np.array_equal(flips.numpy(), ref[p + 'correction']), meta
                n += int(flips.sum())
        else:
            assert flips is None
    assert n > 0
    loss, _ = lp.ll_loss(logits=t(ref['llin/3/logits']), observed=t(ref['llin/3/obs']),
                         clean_rate=0.0, delta_rel=0.1, scheme='LL-R')
    assert same(loss, ref['ll/degenerate/loss']) and float(loss) == 0.0


def test_gr_matches_original(ref):
    for case in cases(ref, 'gr'):
        p = f'gr/{case}/'
        meta = json.loads(str(ref[p + 'meta']))
        sched = lp.gr_schedule(epoch=meta['epoch'], num_epochs=meta['T'], beta=meta['beta'],
                               alpha=[0.5, 2, 0.8, 0.5])
        assert tuple(sched) == (meta['w'], meta['b'], meta['mu'], meta['sigma'])
        logits = t(ref[p + 'logits']).requires_grad_()
        loss = lp.gr_loss(preds=torch.sigmoid(logits), observed=t(ref[p + 'obs']), **sched._asdict(),
                          q2=meta['q'][0], q3=meta['q'][1])
        loss.backward()
        assert same(loss, ref[p + 'loss']), case
        assert same(logits.grad, ref[p + 'grad']), case
    assert np.isnan(ref['gr/0/grad']).any()     # the p == 0 case: NaN gradient, in both


def test_aevlp_loss_matches_original(ref):
    for case in cases(ref, 'ae'):
        p = f'ae/{case}/'
        meta = json.loads(str(ref[p + 'meta']))
        hp = lp.peer_hparams('AEVLP', meta['dataset'])
        logits = t(ref[p + 'logits']).requires_grad_()
        loss = lp.aevlp_loss(preds=torch.sigmoid(logits), observed=t(ref[p + 'obs']), pseudo_labels=t(ref[p + 'pl']),
                             w=meta['w'], b=meta['b'], mu=meta['mu'], sigma=meta['sigma'], q2=hp['q2q3'][0],
                             q3=hp['q2q3'][1], lam1=hp['lam'][0], lam2=hp['lam'][1], rho=hp['rho'], reg=hp['reg'],
                             expected_num_pos=hp['expected_num_pos'], use_pl=meta['use_pl'])
        loss.backward()
        assert same(loss, ref[p + 'loss']), meta
        assert same(logits.grad, ref[p + 'grad']), meta


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_aevlp_pseudo_labels_match_original(ref, dtype):
    for ds in ('pascal', 'coco', 'nuswide', 'cub'):
        hp = lp.peer_hparams('AEVLP', ds)
        p = f'aepl/{ds}/{dtype}/'
        pl = lp.aevlp_pseudo_labels(clip_logits=t(ref[p + 'cl']), observed=t(ref[p + 'obs']),
                                    grid_size=hp['grid_size'], temp=hp['temp'], eta=hp['eta'], top_k=hp['top_k'],
                                    threshold=hp['threshold'], negative_ratio=hp['negative_ratio'])
        assert pl.dtype == torch.int32
        assert np.array_equal(pl.numpy(), ref[p + 'pl']), ds
        assert pl.sum() > 0


def test_boostlu_matches_original(ref):
    for case in cases(ref, 'boostlu'):
        p = f'boostlu/{case}/'
        feats = t(ref[p + 'feats']).requires_grad_()
        cam = F.conv2d(feats, t(ref[p + 'weight']), t(ref[p + 'bias']))
        logits = lp.boostlu_logits(cam=cam, alpha=float(ref[p + 'alpha']))
        (logits * t(ref[p + 'upstream'])).sum().backward()
        assert same(logits, ref[p + 'logits']), case
        assert same(feats.grad, ref[p + 'grad_feats']), case


# ---------------------------------------------------------------------------------------------
# against a loop-by-loop transcription of each original formula, float64, loss and gradient
# ---------------------------------------------------------------------------------------------

def _nl(z, eps):
    return -torch.log(z + eps)


def role_transcribed(p, e, y, k):
    B, K = p.shape
    total = 0
    for i in range(B):
        for j in range(K):
            pos1 = _nl(p[i, j], 1e-5) if y[i, j] == 1 else 0
            pos2 = _nl(e[i, j], 1e-5) if y[i, j] == 1 else 0
            ed, pd = e[i, j].detach(), p[i, j].detach()
            c1 = ed * _nl(p[i, j], 1e-5) + (1 - ed) * _nl(1 - p[i, j], 1e-5)
            c2 = pd * _nl(e[i, j], 1e-5) + (1 - pd) * _nl(1 - e[i, j], 1e-5)
            total = total + (0.5 * (pos1 + pos2) + 0.5 * (c1 + c2)) / (B * K)
    reg = [(sum(q[i, j] for i in range(B) for j in range(K)) / B - k) ** 2 / K ** 2 for q in (p, e)]
    return total + 0.5 * (reg[0] + reg[1])


def _grads(fn, *tensors):
    tensors = [x.clone().requires_grad_() for x in tensors]
    out = fn(*tensors)
    if isinstance(out, tuple):
        out = out[0]
    out.backward()
    return out.detach(), [x.grad for x in tensors]


def _one_positive(gen, b, k):
    y = torch.zeros(b, k, dtype=torch.float64)
    y[torch.arange(b), torch.randint(0, k, (b,), generator=gen)] = 1
    return y


def test_role_equals_transcription():
    gen = torch.Generator().manual_seed(5)
    x, th = 2 * torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    y = _one_positive(gen, 4, 6)
    a = _grads(lambda x, th: lp.role_loss(preds=torch.sigmoid(x), estimates=torch.sigmoid(th), observed=y,
                                          expected_num_pos=1.5), x, th)
    b = _grads(lambda x, th: role_transcribed(torch.sigmoid(x), torch.sigmoid(th), y, 1.5), x, th)
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-14)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)


def _softplus(v):
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def ll_transcribed(x, y, *, clean_rate, delta_rel, scheme, intended_cp=True, geq=False):
    """Elementwise: l = BCE(x, max(y, 0)), l' = BCE(x, 1 - max(y, 0)); k-th largest unobserved loss."""
    B, K = x.shape
    xs = x.detach().tolist()
    tgt = [[1.0 if y[i, j] > 0 else 0.0 for j in range(K)] for i in range(B)]
    u = [[_softplus(xs[i][j]) - xs[i][j] * tgt[i][j] if y[i, j] == 0 else 0.0 for j in range(K)] for i in range(B)]
    if clean_rate == 1:
        modify = [[False] * K for _ in range(B)]
        flips = None
    else:
        rate = delta_rel if (scheme == 'LL-Cp' and intended_cp) else 1 - clean_rate
        k = math.ceil(B * K * rate)
        tau = sorted((v for row in u for v in row), reverse=True)[k - 1]
        modify = [[u[i][j] >= tau for j in range(K)] for i in range(B)]
        flips = ([[(u[i][j] >= tau) if geq else (u[i][j] > tau) for j in range(K)] for i in range(B)]
                 if scheme == 'LL-Cp' and intended_cp else None)
    total = 0
    for i in range(B):
        for j in range(K):
            if not modify[i][j]:
                total = total + F.binary_cross_entropy_with_logits(x[i, j], torch.tensor(tgt[i][j], dtype=x.dtype))
            elif scheme != 'LL-R':
                total = total + F.binary_cross_entropy_with_logits(x[i, j], torch.tensor(1 - tgt[i][j], dtype=x.dtype))
    return total / (B * K), flips


@pytest.mark.parametrize('scheme,intended,geq', [('LL-R', True, False), ('LL-Ct', True, False),
                                                 ('LL-Cp', True, False), ('LL-Cp', True, True),
                                                 ('LL-Cp', False, False)])
def test_ll_equals_transcription(scheme, intended, geq):
    gen = torch.Generator().manual_seed(6)
    x = 3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)
    y = _one_positive(gen, 5, 7)
    y[0, (int(y[0].argmax()) + 1) % 7] = -1
    for epoch in (1, 2, 4):
        cr = lp.ll_clean_rate(epoch=epoch, delta_rel=0.05)
        kw = dict(clean_rate=cr, delta_rel=0.05, scheme=scheme)
        (la, ga), (lb, gb) = [_grads(fn, x) for fn in (
            lambda x: lp.ll_loss(logits=x, observed=y, llcp_as_released=not intended,
                                 flips_include_threshold=geq, **kw),
            lambda x: ll_transcribed(x, y, intended_cp=intended, geq=geq, **kw))]
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ga[0], gb[0], rtol=1e-10, atol=1e-14)
        fa = lp.ll_loss(logits=x, observed=y, llcp_as_released=not intended, flips_include_threshold=geq, **kw)[1]
        fb = ll_transcribed(x, y, intended_cp=intended, geq=geq, **kw)[1]
        assert (fa is None) == (fb is None)
        if fa is not None:
            assert fa.tolist() == fb


def gr_terms(p, y, pl, k, v, q2, q3, eps=1e-7):
    """Per-entry GR loss of y in {0, 1} with pl (None for GR): returns the entry's loss."""
    return -torch.log(p + eps) if y == 1 else v * (k * (1 - p ** q2) / q2 + (1 - k) * (1 - (1 - p) ** q3) / q3)


def gr_transcribed(x, y, s, q2, q3):
    B, K = x.shape
    total = 0
    for i in range(B):
        for j in range(K):
            p = torch.sigmoid(x[i, j])
            pd = p.detach()
            k = 1 / (1 + math.exp(-(s.w * float(pd) + s.b)))
            v = math.exp(-0.5 * ((float(pd) - s.mu) / s.sigma) ** 2)
            if y[i, j] in (0, 1):
                total = total + gr_terms(p, y[i, j], None, k, v, q2, q3)
    return total / (B * K)


def test_gr_equals_transcription():
    gen = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(4, 6, generator=gen, dtype=torch.float64) - 1
    y = _one_positive(gen, 4, 6)
    for epoch in (1, 3, 8):
        s = lp.gr_schedule(epoch=epoch, num_epochs=8, beta=[0, 10, -2, -8], alpha=[0.5, 2, 0.8, 0.5])
        (la, ga), (lb, gb) = [_grads(fn, x) for fn in (
            lambda x: lp.gr_loss(preds=torch.sigmoid(x), observed=y, **s._asdict(), q2=0.01, q3=1.5),
            lambda x: gr_transcribed(x, y, s, 0.01, 1.5))]
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ga[0], gb[0], rtol=1e-10, atol=1e-14)


def aevlp_transcribed(x, y, pl, s, hp, use_pl):
    B, K = x.shape
    eps = 1e-7
    total = 0
    for i in range(B):
        for j in range(K):
            p = torch.sigmoid(x[i, j])
            pd = float(p.detach())
            k = 1 / (1 + math.exp(-(s.w * pd + s.b)))
            v = math.exp(-0.5 * ((pd - s.mu) / s.sigma) ** 2)
            final = pl[i, j] if y[i, j] == 0 else y[i, j]
            if y[i, j] == 1:
                total = total + -torch.log(p + eps)
            elif final == 0:
                total = total + v * (k * (1 - p ** hp['q2q3'][0]) / hp['q2q3'][0]
                                     + (1 - k) * (1 - (1 - p) ** hp['q2q3'][1]) / hp['q2q3'][1])
            elif use_pl and y[i, j] == 0 and pl[i, j] == 1:
                vt = min(max(v, 1 - hp['lam'][0]), 1 - hp['lam'][1])
                total = total + (1 - vt) * (hp['rho'] * -torch.log(p + eps) + (1 - hp['rho']) * -torch.log(1 - p + eps))
            elif use_pl and final == -1:
                total = total + v * -torch.log(1 - p + eps)
    ps = torch.sigmoid(x)
    reg = (sum(ps[i, j] for i in range(B) for j in range(K)) / B - hp['expected_num_pos']) ** 2 / K ** 2
    return total / (B * K) + hp['reg'] * reg


@pytest.mark.parametrize('use_pl', [True, False])
def test_aevlp_loss_equals_transcription(use_pl):
    gen = torch.Generator().manual_seed(8)
    hp = lp.peer_hparams('AEVLP', 'cub')
    x = 3 * torch.randn(4, 9, generator=gen, dtype=torch.float64) - 1
    y = _one_positive(gen, 4, 9)
    y[1, (int(y[1].argmax()) + 1) % 9] = -1
    pl = (torch.rand(4, 9, generator=gen) < 0.4).int()
    pl[2, int(y[2].argmax())] = 1
    pl[3, (int(y[3].argmax()) + 2) % 9] = -1          # a negative pseudo-label (the dead branch)
    s = lp.gr_schedule(epoch=4, num_epochs=10, beta=hp['beta'], alpha=hp['alpha'])
    kw = dict(q2=hp['q2q3'][0], q3=hp['q2q3'][1], lam1=hp['lam'][0], lam2=hp['lam'][1], rho=hp['rho'],
              reg=hp['reg'], expected_num_pos=hp['expected_num_pos'], use_pl=use_pl)
    (la, ga), (lb, gb) = [_grads(fn, x) for fn in (
        lambda x: lp.aevlp_loss(preds=torch.sigmoid(x), observed=y, pseudo_labels=pl, **s._asdict(), **kw),
        lambda x: aevlp_transcribed(x, y, pl, s, hp, use_pl))]
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga[0], gb[0], rtol=1e-10, atol=1e-14)


def pseudo_labels_transcribed(cl, y, *, grid, temp, eta, top_k, threshold, negative_ratio):
    n_tiles = grid * grid
    B, K = y.shape
    S = torch.softmax(cl / temp, dim=1)
    out = torch.zeros(B, K, dtype=torch.int32)
    for i in range(B):
        g = S[i]
        tiles = [S[(r + 1) * B + i] for r in range(n_tiles)]
        eta_i = min(max(float(g[j] * y[i, j]) for j in range(K)), eta)
        score, score_neg = [], []
        for j in range(K):
            a = max(float(tl[j]) for tl in tiles)
            m = min(float(tl[j]) for tl in tiles)
            avg = sum(float(tl[j]) for tl in tiles) / n_tiles
            score.append((float(g[j]) + (a if a > eta_i else m)) / 2)
            score_neg.append((float(g[j]) + avg) / 2)
        for j in sorted(range(K), key=lambda j: -score[j])[:top_k]:
            out[i, j] = int(score[j] >= threshold)
        for j in sorted(range(K), key=lambda j: score_neg[j])[:int(negative_ratio * K)]:
            out[i, j] = 0
    return out


def test_aevlp_pseudo_labels_equal_transcription():
    gen = torch.Generator().manual_seed(9)
    B, K, G = 3, 10, 2
    cl = 0.2 + 0.05 * torch.randn(B * (G * G + 1), K, generator=gen, dtype=torch.float64)
    y = _one_positive(gen, B, K)
    for eta, threshold in ((0.0, 0.1), (0.3, 0.12), (0.05, 0.0)):
        kw = dict(temp=0.05, eta=eta, top_k=3, threshold=threshold, negative_ratio=0.3)
        a = lp.aevlp_pseudo_labels(clip_logits=cl, observed=y, grid_size=G, **kw)
        b = pseudo_labels_transcribed(cl, y, grid=G, **kw)
        assert torch.equal(a, b)


def test_boostlu_equals_transcription():
    gen = torch.Generator().manual_seed(10)
    cam = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    out = lp.boostlu_logits(cam=cam, alpha=5.0)
    for b in range(2):
        for k in range(3):
            vals = [5.0 * c if c > 0 else c for c in cam[b, k].flatten().tolist()]
            assert out[b, k].item() == pytest.approx(sum(vals) / len(vals), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# hand-computed cases and schedules
# ---------------------------------------------------------------------------------------------

def test_ll_hand_computed():
    x = torch.tensor([[0.0, 2.0, -1.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    sp = _softplus
    an = (sp(0.0) + sp(2.0) + sp(-1.0) + sp(3.0)) / 4      # y=1 at x=0: softplus(-0) = log 2
    assert lp.ll_loss(logits=x, observed=y, clean_rate=1, delta_rel=0.5, scheme='LL-R')[0].item() == pytest.approx(an)
    # clean rate 0.5: k = 2, tau = softplus(2); the entries with u >= tau are x = 2 and x = 3
    r = lp.ll_loss(logits=x, observed=y, clean_rate=0.5, delta_rel=0.5, scheme='LL-R')[0].item()
    assert r == pytest.approx((math.log(2) + sp(-1.0)) / 4)
    ct = lp.ll_loss(logits=x, observed=y, clean_rate=0.5, delta_rel=0.5, scheme='LL-Ct')[0].item()
    assert ct == pytest.approx((math.log(2) + sp(-2.0) + sp(-1.0) + sp(-3.0)) / 4)
    # intended LL-Cp, delta_rel 0.25: k = 1 (only x = 3 corrected); strict flips: none; BridgeGap's: x = 3
    loss, flips = lp.ll_loss(logits=x, observed=y, clean_rate=0.75, delta_rel=0.25, scheme='LL-Cp')
    assert loss.item() == pytest.approx((math.log(2) + sp(2.0) + sp(-1.0) + sp(-3.0)) / 4)
    assert not flips.any()
    flips = lp.ll_loss(logits=x, observed=y, clean_rate=0.75, delta_rel=0.25, scheme='LL-Cp',
                       flips_include_threshold=True)[1]
    assert flips.tolist() == [[False, False, False, True]]
    # as released, LL-Cp is LL-Ct with the clean rate's k, and flips nothing
    loss, flips = lp.ll_loss(logits=x, observed=y, clean_rate=0.5, delta_rel=0.25, scheme='LL-Cp',
                             llcp_as_released=True)
    assert loss.item() == ct and flips is None


def test_ll_schedule_quirks():
    assert lp.ll_delta_rel(0.2) == 0.002 and lp.ll_delta_rel(0) == 0
    assert lp.ll_clean_rate(epoch=1, delta_rel=0.002) == 1
    cr = lp.ll_clean_rate(epoch=2, delta_rel=0.002)
    assert 1 - cr == 0.0020000000000000018                  # float64 subtraction, not exactly 0.002
    assert lp.ll_num_large(batch_size=25, num_classes=20, clean_rate=cr, delta_rel=0.002, scheme='LL-R') == 2
    cr3 = lp.ll_clean_rate(epoch=4, delta_rel=0.1)
    assert cr3 == ((1 - 0.1) - 0.1) - 0.1 and cr3 != 1 - 3 * 0.1
    # VOC, batch 16: the intended LL-Cp modifies k = 1 loss per batch and flips k - 1 = 0 labels
    assert lp.ll_num_large(batch_size=16, num_classes=20, clean_rate=cr, delta_rel=0.002, scheme='LL-Cp') == 1
    assert lp.ll_num_large(batch_size=16, num_classes=80, clean_rate=cr, delta_rel=0.002, scheme='LL-Cp') == 3
    assert lp.ll_num_large(batch_size=16, num_classes=20, clean_rate=1, delta_rel=0.002, scheme='LL-R') is None
    with pytest.raises(ValueError, match='delta'):
        lp.ll_num_large(batch_size=4, num_classes=5, clean_rate=-0.5, delta_rel=0.5, scheme='LL-R')
    with pytest.raises(ValueError, match='scheme'):
        lp.ll_num_large(batch_size=4, num_classes=5, clean_rate=0.5, delta_rel=0.5, scheme='LL-X')
    with pytest.raises(ValueError, match='1-based'):
        lp.ll_clean_rate(epoch=0, delta_rel=0.1)


def test_role_hand_computed():
    p = torch.tensor([[0.8, 0.3]], dtype=torch.float64)
    e = torch.tensor([[0.9, 0.4]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    nl = lambda z: -math.log(z + 1e-5)
    mtx = [0.5 * (nl(0.8) + nl(0.9)) + 0.5 * ((0.9 * nl(0.8) + 0.1 * nl(0.2)) + (0.8 * nl(0.9) + 0.2 * nl(0.1))),
           0.5 * ((0.4 * nl(0.3) + 0.6 * nl(0.7)) + (0.3 * nl(0.4) + 0.7 * nl(0.6)))]
    reg = 0.5 * ((1.1 - 1.0) ** 2 / 4 + (1.3 - 1.0) ** 2 / 4)
    got = lp.role_loss(preds=p, estimates=e, observed=y, expected_num_pos=1.0).item()
    assert got == pytest.approx(sum(mtx) / 2 + reg, rel=1e-12)
    with pytest.raises(ValueError, match='observed'):
        lp.role_loss(preds=p, estimates=e, observed=-y, expected_num_pos=1.0)


def test_role_init_values():
    obs = np.array([[1, 0, -1, 0]] * 50)
    theta = lp.role_init_logits(observed=obs, generator=torch.Generator().manual_seed(1))
    assert theta.dtype == torch.float32 and theta.shape == (50, 4)
    assert (theta[:, 0] == np.float32(math.log(0.995 / 0.005))).all()
    assert (theta[:, 2] == np.float32(math.log(0.005 / 0.995))).all()
    e = torch.sigmoid(theta[:, [1, 3]])
    assert e.min() >= 0.4 - 1e-6 and e.max() <= 0.6 + 1e-6 and e.std() > 0.03
    back = torch.sigmoid(lp.role_logits_from_estimates(torch.sigmoid(theta).numpy()))
    torch.testing.assert_close(back, torch.sigmoid(theta), atol=1e-6, rtol=0)


def test_gr_hand_computed_and_schedule_table():
    x = torch.linspace(-6, 6, 80, dtype=torch.float64).reshape(4, 20)
    y = torch.zeros(4, 20, dtype=torch.float64)
    y[:, 0] = 1
    loss = lp.gr_loss(preds=torch.sigmoid(x), observed=y, w=0, b=-2, mu=0.5375, sigma=1.8125, q2=0.01, q3=1)
    assert loss.item() == pytest.approx(0.7088375641969893, abs=1e-12)   # the original GR_loss on this input
    table = {  # (T, beta): {epoch: (w, b, mu, sigma)}
        (8, (0, 2, -2, -2)): {1: (0, -2, .5375, 1.8125), 2: (.25, -2, .575, 1.625), 8: (1.75, -2, .8, .5)},
        (8, (0, 10, -2, -8)): {1: (0, -2, .5375, 1.8125), 2: (1.25, -2.75, .575, 1.625), 8: (8.75, -7.25, .8, .5)},
        (10, (0, 10, -2, -8)): {1: (0, -2, .53, 1.85), 2: (1, -2.6, .56, 1.7), 10: (9, -7.4, .8, .5)},
    }
    for (T, beta), rows in table.items():
        for epoch, want in rows.items():
            got = lp.gr_schedule(epoch=epoch, num_epochs=T, beta=list(beta), alpha=[0.5, 2, 0.8, 0.5])
            assert tuple(got) == pytest.approx(want, abs=1e-12)


def test_boostlu_hand_computed():
    cam = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]]])
    assert lp.boostlu_logits(cam=cam, alpha=5.0).tolist() == [[3.5]]
    assert lp.boostlu_logits(cam=cam, alpha=1.0).tolist() == [[-0.5]]


def test_peer_defaults_table():
    for method, rows in lp.PEER_DEFAULTS.items():
        assert set(rows) == {'pascal', 'coco', 'nuswide', 'cub', 'demo'}
        for ds, row in rows.items():
            for key, hp in row.items():
                assert hp.source, (method, ds, key)
                assert ds != 'demo' or not hp.published
    assert lp.peer_hparams('role', 'coco')['expected_num_pos'] == 2.9
    assert not lp.PEER_DEFAULTS['LL']['coco']['delta_rel_percent[LL-R]'].published
    assert lp.PEER_DEFAULTS['boostlu']['cub']['delta_rel_percent[LL-Cp]'].value == 0.1
    assert not lp.PEER_DEFAULTS['role']['pascal']['lr'].published
    assert lp.peer_hparams('AEVLP', 'cub')['top_k'] == 32
    assert lp.peer_hparams('GR', 'cub')['q2q3'] == [0.01, 1.5]
    with pytest.raises(ValueError, match='unknown peer method'):
        lp.peer_hparams('nope', 'coco')
    with pytest.raises(ValueError, match='dataset'):
        lp.peer_hparams('GR', 'imagenet')

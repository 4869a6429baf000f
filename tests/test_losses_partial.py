"""losses_partial: ASL and CSL's partial selective loss against a transcription of
Alibaba-MIIL/PartialLabelingCSL (loss and gradient, bit for bit in float32 on CPU), hand-computed
values, and the class-prior estimator and its CSV file.

The transcription below restates the original's computation step by step: its weights with
Python loops, its loss with the same tensor operations in the same order (the loss of the original
is already elementwise torch code; a per-element Python loop would call other kernels and could
differ in the last bit, which would test the kernels, not the formula).
"""
import math

import pytest
import torch

import losses_partial as lp
from losses_partial import (ASL_DEFAULTS, CSL_DEFAULTS, CSL_RECIPES, ClassPriorEstimator, PriorFileError,
                            asymmetric_loss, csl_targets, observed_from_csl, partial_selective_loss,
                            partial_weights, prior_csv_text, read_prior_csv)


# ---------------------------------------------------------------- transcription of the original

def ref_weights(t, q, mode, topk, prior, threshold):
    """edit_targets_parital_labels (partial_asymmetric_loss.py) entry by entry; None means 1."""
    B, K = t.shape
    t, q = t.tolist(), q.tolist()
    if mode == "negative":
        return None
    w = [[1.0] * K for _ in range(B)]
    if mode == "ignore":
        w = [[0.0 if t[i][k] == -1 else 1.0 for k in range(K)] for i in range(B)]
    elif mode == "ignore_normalize_classes":
        for i in range(B):
            g = 1 * (1 / torch.tensor(1 + sum(v != -1 for v in t[i]))) + 1  # int tensor division, as there
            w[i] = [0.0 if t[i][k] == -1 else g.item() for k in range(K)]
    elif mode == "selective":
        if prior is not None and threshold:
            for k in range(K):
                if prior[k] > threshold:
                    for i in range(B):
                        w[i][k] = 0.0
            w = [[float(w[i][k] + (t[i][k] != -1) != 0) for k in range(K)] for i in range(B)]
        unannotated = [(q[i][k], i * K + k) for i in range(B) for k in range(K) if t[i][k] == -1]
        for _, flat in sorted(unannotated)[:topk * B]:  # smallest q first (ties broken by position)
            w[flat // K][flat % K] = 0.0
    return torch.tensor(w)


def ref_partial_selective_loss(logits, t, *, mode, gamma_pos, gamma_neg, gamma_unann, alpha_pos=1.0,
                               alpha_neg=1.0, alpha_unann=1.0, clip=0.0, topk=5, prior=None, threshold=0.5):
    """PartialSelectiveLoss.forward with CSL targets t (1 positive, 0 annotated negative, -1 unannotated)."""
    targets_pos = (t == 1).float()
    targets_neg = (t == 0).float()
    targets_unann = (t == -1).float()
    xs_pos = torch.sigmoid(logits)
    xs_neg = 1.0 - xs_pos
    if clip > 0:
        xs_neg.add_(clip).clamp_(max=1)
    weights = ref_weights(t, xs_neg.detach(), mode, topk, prior, threshold)
    bce_pos = alpha_pos * targets_pos * torch.log(torch.clamp(xs_pos, min=1e-8))
    bce_neg = alpha_neg * targets_neg * torch.log(torch.clamp(xs_neg, min=1e-8))
    bce_unann = alpha_unann * targets_unann * torch.log(torch.clamp(xs_neg, min=1e-8))
    bce = bce_pos + bce_neg + bce_unann
    with torch.no_grad():
        w = torch.pow(1 - xs_pos * targets_pos - xs_neg * (targets_neg + targets_unann),
                      gamma_pos * targets_pos + gamma_neg * targets_neg + gamma_unann * targets_unann)
    bce *= w
    if weights is not None:
        bce *= weights
    return -bce.sum()


def ref_asl(x, y, *, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-8, disable_torch_grad_focal_loss=True):
    """AsymmetricLoss.forward (losses.py); its set_grad_enabled pair written as a no_grad block."""
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.set_grad_enabled(not disable_torch_grad_focal_loss):
            pt = xs_pos * y + xs_neg * (1 - y)
            w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
        loss *= w
    return -loss.sum()


def loss_and_grad(fn, logits, *args, **kwargs):
    x = logits.clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


def random_case(seed, B, K, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, K, generator=g)
    t = torch.randint(-1, 2, (B, K), generator=g)
    prior = torch.rand(K, generator=g)
    return logits, t, prior


# ---------------------------------------------------------------- P-ASL / CSL

@pytest.mark.parametrize("seed, B, K", [(0, 16, 80), (1, 7, 20), (2, 3, 312), (3, 1, 5)])
@pytest.mark.parametrize("mode", lp.MODES)
@pytest.mark.parametrize("clip, gamma_pos, use_prior", [(0.0, 0.0, False), (0.05, 1.0, True)])
def test_partial_selective_loss_equals_transcription(seed, B, K, mode, clip, gamma_pos, use_prior):
    logits, t, prior = random_case(seed, B, K)
    hp = dict(mode=mode, gamma_pos=gamma_pos, gamma_neg=3.0, gamma_unann=4.0, alpha_pos=0.7, alpha_neg=0.3,
              alpha_unann=1.3, clip=clip)
    prior = prior if use_prior else None
    want = loss_and_grad(ref_partial_selective_loss, logits, t, topk=2, prior=prior, threshold=0.5, **hp)
    got = loss_and_grad(partial_selective_loss, logits, observed_from_csl(t), likelihood_topk=2, prior=prior,
                        prior_threshold=0.5, **hp)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1]), (got[1] - want[1]).abs().max()


def spec_case():
    """The random input the CSL equivalence check was run on (seed 0, 16 x 80, 5 % positives, half dropped)."""
    torch.manual_seed(0)
    logits = 2 * torch.randn(16, 80)
    full = (torch.rand(16, 80) < 0.05).long()
    t = full.clone()
    t[torch.rand(16, 80) < 0.5] = -1
    return logits, t


# Losses PartialSelectiveLoss itself returned on spec_case (CPU, torch 2.x; .cuda() removed):
# clip 0, gamma_pos 0, gamma_neg 3, gamma_unann 4, alphas 1, likelihood_topk 5.
ORIGINAL_LOSSES = [("selective", {}, 577.7008), ("negative", {}, 824.9381), ("ignore", {}, 466.7180),
                   ("ignore_normalize_classes", {}, 478.3491), ("selective", dict(clip=0.05, gamma_pos=1.0), 374.1769)]


@pytest.mark.parametrize("mode, extra, value", ORIGINAL_LOSSES)
def test_partial_selective_loss_reproduces_the_original_numbers(mode, extra, value):
    logits, t = spec_case()
    hp = {**dict(mode=mode, gamma_pos=0.0, gamma_neg=3.0, gamma_unann=4.0, likelihood_topk=5), **extra}
    loss = partial_selective_loss(logits, observed_from_csl(t), **hp)
    assert loss.item() == pytest.approx(value, abs=1e-4)


def test_partial_selective_loss_by_hand():
    """One image, K = 4: a positive, an annotated negative, two unannotated entries."""
    logits = torch.tensor([[0.5, -1.0, 2.0, -3.0]])
    observed = torch.tensor([[1.0, -1.0, 0.0, 0.0]])  # this project's convention
    p = [1 / (1 + math.exp(-v)) for v in (0.5, -1.0, 2.0, -3.0)]
    gp, gn, gu, an, au = 1.0, 2.0, 4.0, 0.5, 1.5
    pos = (1 - p[0]) ** gp * math.log(p[0])
    neg = an * p[1] ** gn * math.log(1 - p[1])
    unann = [au * p[k] ** gu * math.log(1 - p[k]) for k in (2, 3)]
    hp = dict(gamma_pos=gp, gamma_neg=gn, gamma_unann=gu, alpha_neg=an, alpha_unann=au, clip=0.0)
    negative = partial_selective_loss(logits, observed, mode="negative", **hp)
    assert negative.item() == pytest.approx(-(pos + neg + sum(unann)), rel=1e-6)
    ignore = partial_selective_loss(logits, observed, mode="ignore", **hp)
    assert ignore.item() == pytest.approx(-(pos + neg), rel=1e-6)
    # 1 x (1 annotated... 2 annotated) -> weight 1/3 + 1 on the annotated entries
    normalized = partial_selective_loss(logits, observed, mode="ignore_normalize_classes", **hp)
    assert normalized.item() == pytest.approx(-(pos + neg) * (1 / 3 + 1), rel=1e-6)
    # selective, top-1 per image: the most likely unannotated entry (class 2, p = 0.88) is ignored
    selective = partial_selective_loss(logits, observed, mode="selective", likelihood_topk=1, **hp)
    assert selective.item() == pytest.approx(-(pos + neg + unann[1]), rel=1e-6)
    # prior above the threshold for class 3: ignored as well; top-1 still spends its budget on class 2
    prior = torch.tensor([0.9, 0.9, 0.1, 0.6])
    both = partial_selective_loss(logits, observed, mode="selective", likelihood_topk=1, prior=prior,
                                  prior_threshold=0.5, **hp)
    assert both.item() == pytest.approx(-(pos + neg), rel=1e-6)  # annotated entries of classes 0, 1 kept
    for off in (0, None):  # a falsy threshold skips the prior step, as in the original
        skipped = partial_selective_loss(logits, observed, mode="selective", likelihood_topk=1, prior=prior,
                                         prior_threshold=off, **hp)
        assert skipped.item() == selective.item()
    # clip: q_m = min(1 - p + clip, 1)
    clipped = partial_selective_loss(logits, observed, mode="ignore", **{**hp, "clip": 0.3})
    qm = min(1 - p[1] + 0.3, 1)
    assert clipped.item() == pytest.approx(-(pos + an * (1 - qm) ** gn * math.log(qm)), rel=1e-6)
    mean = partial_selective_loss(logits, observed, mode="ignore", reduction="mean", **hp)
    assert mean.item() == pytest.approx(ignore.item() / 4, rel=1e-6)


def test_label_conventions():
    observed = torch.tensor([[1.0, -1.0, 0.0]])
    assert csl_targets(observed).tolist() == [[1, 0, -1]]
    assert csl_targets(observed).dtype == torch.int64
    assert torch.equal(observed_from_csl(csl_targets(observed)), observed)
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        csl_targets(torch.tensor([[1.0, -0.3]]))  # a soft negative (APL) is not a partial label
    with pytest.raises(ValueError, match="B x K"):
        partial_selective_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mode"):
        partial_selective_loss(torch.zeros(2, 3), torch.zeros(2, 3), mode="selctive")
    with pytest.raises(ValueError, match=r"prior must have shape \(3,\)"):
        partial_selective_loss(torch.zeros(2, 3), torch.zeros(2, 3), prior=torch.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        partial_selective_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="none")


def test_selective_budget_is_per_batch_and_prior_ignores_only_unannotated():
    logits, t, _ = random_case(5, 6, 10)
    q = 1 - torch.sigmoid(logits)
    w = partial_weights(t, q, mode="selective", likelihood_topk=2)
    unannotated = t == -1
    assert (w[~unannotated] == 1).all()
    assert int((w == 0).sum()) == min(2 * 6, int(unannotated.sum()))  # 2 per image, spent across the batch
    # the zeroed entries are the unannotated ones with the largest p
    assert q[unannotated & (w == 0)].max() <= q[unannotated & (w == 1)].min()
    prior = torch.zeros(10)
    prior[[1, 4]] = 0.9
    prior[7] = float("nan")  # a NaN prior is never above the threshold
    w = partial_weights(t, q, mode="selective", likelihood_topk=0, prior=prior, prior_threshold=0.5)
    expected = torch.ones(6, 10)
    expected[:, [1, 4]] = (~unannotated[:, [1, 4]]).float()
    assert torch.equal(w, expected)
    # saturated logits tie in q; the number chosen is still exactly the budget
    tied = partial_weights(torch.full((4, 5), -1), torch.zeros(4, 5), mode="selective", likelihood_topk=3)
    assert int((tied == 0).sum()) == 12
    assert partial_weights(t, q, mode="negative") is None


def test_csl_defaults_are_the_readme_commands():
    assert CSL_DEFAULTS == CSL_RECIPES["rps"]
    assert CSL_RECIPES["rps"]["gamma_neg"] == 1.0 and CSL_RECIPES["fpc"]["gamma_neg"] == 3.0
    for recipe in CSL_RECIPES.values():
        assert recipe["mode"] == "selective" and recipe["gamma_pos"] == 0.0 and recipe["gamma_unann"] == 4.0
        assert recipe["likelihood_topk"] == 5 and recipe["prior_threshold"] == 0.5 and recipe["clip"] == 0.0
    assert ASL_DEFAULTS == dict(gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8, disable_torch_grad_focal_loss=True)


# ---------------------------------------------------------------- ASL

@pytest.mark.parametrize("seed, B, K", [(0, 16, 80), (1, 5, 20)])
@pytest.mark.parametrize("hp", [{}, dict(disable_torch_grad_focal_loss=False), dict(gamma_neg=0, gamma_pos=0, clip=0),
                                dict(gamma_neg=2, gamma_pos=0, clip=0.2, eps=1e-4)])
@pytest.mark.parametrize("soft", [False, True])
def test_asymmetric_loss_equals_transcription(seed, B, K, hp, soft):
    logits, _, _ = random_case(seed, B, K, scale=4.0)
    g = torch.Generator().manual_seed(seed + 100)
    y = torch.rand(B, K, generator=g) if soft else (torch.rand(B, K, generator=g) < 0.2).float()
    want = loss_and_grad(ref_asl, logits, y, **hp)
    got = loss_and_grad(asymmetric_loss, logits, y, **hp)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1]), (got[1] - want[1]).abs().max()


def test_asymmetric_loss_by_hand_and_the_gradient_switch():
    logits = torch.tensor([[1.0, -0.5]])
    y = torch.tensor([[1.0, 0.0]])
    p = [1 / (1 + math.exp(-v)) for v in (1.0, -0.5)]
    qm = min(1 - p[1] + 0.05, 1)
    want = -((1 - p[0]) * math.log(p[0]) + (1 - qm) ** 4 * math.log(qm))
    assert asymmetric_loss(logits, y).item() == pytest.approx(want, rel=1e-6)
    assert asymmetric_loss(logits, y, reduction="mean").item() == pytest.approx(want / 2, rel=1e-6)
    detached = loss_and_grad(asymmetric_loss, logits, y)
    through = loss_and_grad(asymmetric_loss, logits, y, disable_torch_grad_focal_loss=False)
    assert torch.equal(detached[0], through[0]) and not torch.allclose(detached[1], through[1])
    # d/dx of -(1-p) log p with (1-p) detached: -(1-p)(1-p) = -(1-p)^2
    assert detached[1][0, 0].item() == pytest.approx(-(1 - p[0]) ** 2, rel=1e-6)
    with torch.no_grad():  # the original turned grad mode back on here; this must not
        asymmetric_loss(logits, y)
        assert not torch.is_grad_enabled()


# ---------------------------------------------------------------- class prior

def test_prior_estimator_is_a_cumulative_average_and_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 6, generator=g) for b in (4, 4, 3, 5)]
    estimator = ClassPriorEstimator(6)
    assert estimator.prior is None
    total = torch.zeros(6)
    for logits in batches:
        estimator.update(logits.requires_grad_())
        total += torch.sum(torch.sigmoid(logits.detach()), dim=0)  # ComputePrior.update
    assert estimator.count == 16.0
    assert torch.equal(estimator.prior, total / 16.0)
    assert torch.allclose(estimator.prior, torch.sigmoid(torch.cat(batches)).mean(0).detach())

    resumed = ClassPriorEstimator(6)
    halfway = ClassPriorEstimator(6)
    for logits in batches[:2]:
        halfway.update(logits)
    resumed.load_state_dict(halfway.state_dict())
    for logits in batches[2:]:
        resumed.update(logits)
    assert torch.equal(resumed.prior, estimator.prior) and resumed.count == estimator.count
    with pytest.raises(ValueError, match="classes"):
        ClassPriorEstimator(5).load_state_dict(estimator.state_dict())
    with pytest.raises(ValueError, match="B x 6"):
        estimator.update(torch.zeros(2, 5))


def test_prior_csv_round_trip_and_pandas_reading_rules(tmp_path):
    prior = torch.tensor([0.542279, 1 / 3, 0.2, 1e-7], dtype=torch.float32)
    names = ["person", "traffic light", "a, b", "toothbrush"]
    text = prior_csv_text(names, prior)
    assert text.splitlines()[:2] == ["Classes,avg_pred", "person,0.542279"]
    path = tmp_path / "train_avg_preds.csv"
    path.write_text(text)
    got_names, got = read_prior_csv(path, 4)
    assert got_names == names and torch.equal(got, prior)

    # CSL's shipped prior ends with a stray line read as a class with prior NaN; a repeated
    # name keeps its first place and its last value (dict(zip(...))); blank lines are skipped.
    path.write_text("Classes,avg_pred\nperson,0.5\ncar,0.25\n\nperson,0.75\nbus,\ndog,0.125\n1542867\n")
    got_names, got = read_prior_csv(path)
    assert got_names == ["person", "car", "bus", "dog"]
    assert got[[0, 1, 3]].tolist() == [0.75, 0.25, 0.125] and math.isnan(got[2])


def test_prior_csv_errors_are_one_line(tmp_path):
    path = tmp_path / "prior.csv"
    for content, match in [(None, "not found"), ("Classes,avg_pred\nperson,high\n", "row 2"),
                           ("Classes,avg_pred\nperson,0.5\n", "has 1 classes, the model has 3")]:
        if content is not None:
            path.write_text(content)
        with pytest.raises(PriorFileError, match=match) as info:
            read_prior_csv(path, 3)
        assert "\n" not in str(info.value) and str(path) in str(info.value)

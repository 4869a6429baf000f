"""methods_peers: the peer methods train end to end, resume exactly, compute the pure functions' losses
(losses_peers, which tests/test_losses_peers.py compares with the original code), and refuse bad flags."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import losses_peers as lp
import main_clip
import methods
import methods_peers  # noqa: F401  (registers the methods)
import models
from conftest import interrupt_after, tiny_run_args


def run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, flags, epochs):
    """tiny_run_args for `flags`; AEVLP encodes its own prompts, so it gets no --text-features."""
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=epochs)
    if 'AEVLP' in flags:
        at = args.index('--text-features')
        del args[at:at + 2]
    return args + flags


@pytest.mark.parametrize('flags', [
    ['-l', 'role'], ['-l', 'LL-R'], ['-l', 'LL-Ct'], ['-l', 'LL-Cp', '--ll-delta-rel', '2'],
    ['-l', 'LL-Cp', '--llcp-as-released'], ['-l', 'GR'], ['-l', 'LL-R', '--boostlu'],
    ['-l', 'role', '--linear-init', '1'], ['-l', 'GR', '--linear-init', '1'],
    ['-l', 'AEVLP', '--linear-init', '1'],
    ['-l', 'AEVLP', '--aevlp-gcn', 'none', '--aevlp-precision', 'fp16', '--aevlp-grid', '2'],
])
def test_peer_methods_train_end_to_end(flags, tiny_pascal, tmp_path, tiny_clip, tiny_text_features):
    args = run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, flags, 2) + ['--run-name', 'r']
    assert main_clip.main(args) == 0
    log = json.loads((tmp_path / 'results' / 'r' / 'log.json').read_text())
    assert log['values']
    ckpt = torch.load(tmp_path / 'results' / 'r' / 'last.pt', weights_only=True)
    assert ckpt['epoch'] == 2
    # --evaluate rebuilds the same network (BoostLU included) from the saved command line
    path = tmp_path / 'results' / 'r' / 'best.pt'
    best = torch.load(path, weights_only=True)
    cfg = main_clip.config_from_checkpoint(best, [], path, None)
    assert main_clip.evaluate(cfg, best) == pytest.approx(best['test_map'], abs=1e-9)


@pytest.mark.parametrize('flags, epochs, stop', [
    (['-l', 'role'], 2, 1),
    (['-l', 'LL-Cp', '--ll-delta-rel', '2'], 3, 2),  # flips from epoch 2 on: the resumed epoch 3 needs them
    (['-l', 'AEVLP'], 2, 1),  # the views' flips of epoch 2 come from the restored sampler
])
def test_resume_is_exact(flags, epochs, stop, tiny_pascal, tmp_path, tiny_clip, tiny_text_features, monkeypatch):
    args = run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, flags, epochs)
    assert main_clip.main(args + ['--run-name', 'full']) == 0
    with monkeypatch.context() as m:
        interrupt_after(m, stop)
        assert main_clip.main(args + ['--run-name', 'cut']) == 130
    cut = tmp_path / 'results' / 'cut'
    state = torch.load(cut / 'last.pt', weights_only=True)
    assert state['epoch'] == stop
    if flags[1] == 'role':
        assert state['method']['estimator'].shape == (state['method']['rows'], 20)
        # the estimator's Adam moments are in the optimiser's state (the last group)
        groups = state['optimizer']['param_groups']
        assert groups[-1]['lr'] == pytest.approx(10 * 1e-3)
        assert state['optimizer']['state'][groups[-1]['params'][0]]['exp_avg'].shape == state['method']['estimator'].shape
    elif flags[1] == 'AEVLP':  # no method state beyond the labels; the sampler holds the view flips
        assert state['method']['observed'].shape[1] == 20
    else:  # LL-Cp: permanent flips are in the checkpoint
        initial = np.load(tiny_pascal / 'pascal' / 'formatted_train_labels_obs.npy')
        assert (state['method']['observed'] == 1).sum() > (initial == 1).sum()
    assert main_clip.main(['--resume', str(cut)]) == 0
    full = json.loads((tmp_path / 'results' / 'full' / 'log.json').read_text())
    again = json.loads((cut / 'log.json').read_text())
    assert full['values'] == again['values']
    assert np.array_equal(np.load(tmp_path / 'results' / 'full' / 'test_preds_best.npy'),
                          np.load(cut / 'test_preds_best.npy'))


def _method(flags, tiny_pascal, tmp_path, tiny_clip, tiny_text_features, observed):
    cfg, _ = main_clip.parse_args(run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, flags, 4))
    return cfg, methods.build_method(cfg, observed, torch.device('cpu'))


def _batch(observed, index):
    obs = torch.as_tensor(observed)[index]
    return dict(index=index, observed=obs, true=obs.clip(0), pseudo_labels=None)


def _observed(n=32, k=20, seed=0):
    rng = np.random.RandomState(seed)
    obs = np.zeros((n, k), np.float32)
    obs[np.arange(n), rng.randint(0, k, n)] = 1
    return obs


def test_one_step_losses_equal_the_pure_functions(tiny_pascal, tmp_path, tiny_clip, tiny_text_features):
    obs = _observed()
    index = torch.arange(4, 12)
    torch.manual_seed(3)
    logits = 3 * torch.randn(8, 20)
    preds = torch.sigmoid(logits)

    torch.manual_seed(0)
    cfg, role = _method(['-l', 'role'], tiny_pascal, tmp_path, tiny_clip, tiny_text_features, obs)
    torch.manual_seed(0)
    theta = lp.role_init_logits(observed=obs)
    assert torch.equal(role.estimator.logits.detach(), theta)
    got = role.loss(logits, preds, _batch(obs, index), epoch=1, step=0)
    want = lp.role_loss(preds=preds, estimates=torch.sigmoid(theta[index]), observed=torch.as_tensor(obs)[index],
                        expected_num_pos=1.5)
    assert torch.equal(got, want)
    group, = role.param_groups(cfg.lr)
    assert group['lr'] == 10 * cfg.lr and group['params'][0] is role.estimator.logits
    got.backward()  # dense gradient: the whole table, zero outside the batch rows
    grad = role.estimator.logits.grad
    assert grad.shape == (32, 20) and grad[index].abs().sum() > 0 and grad[:4].abs().sum() == 0

    for scheme in ('LL-R', 'LL-Ct', 'LL-Cp'):
        cfg, ll = _method(['-l', scheme, '--ll-delta-rel', '3'], tiny_pascal, tmp_path, tiny_clip,
                          tiny_text_features, obs)
        before = ll.observed.clone()
        got = ll.loss(logits, preds, _batch(obs, index), epoch=3, step=0)
        clean_rate = 1 - 0.03 - 0.03
        want, flips = lp.ll_loss(logits=logits, observed=torch.as_tensor(obs)[index], clean_rate=clean_rate,
                                 delta_rel=0.03, scheme=scheme)
        assert torch.equal(got, want)
        if scheme == 'LL-Cp':
            assert flips.sum() == int(np.ceil(160 * 0.03)) - 1  # k - 1 permanent flips, as LargeLossMatters
            expected = before.clone()
            expected[index] = torch.where(flips, 1.0, before[index])
            assert torch.equal(ll.observed, expected)
        else:
            assert torch.equal(ll.observed, before)

    cfg, gr = _method(['-l', 'GR'], tiny_pascal, tmp_path, tiny_clip, tiny_text_features, obs)
    s = lp.gr_schedule(epoch=2, num_epochs=4, beta=[0, 2, -2, -2], alpha=[0.5, 2, 0.8, 0.5])
    want = lp.gr_loss(preds=preds, observed=torch.as_tensor(obs)[index], w=s.w, b=s.b, mu=s.mu, sigma=s.sigma,
                      q2=0.01, q3=1.0)
    assert torch.equal(gr.loss(logits, preds, _batch(obs, index), epoch=2, step=0), want)

    # AEVLP: GPR-Loss with GR's schedule of the epoch and pascal's configs/pascal.json values
    cfg, ae = _method(['-l', 'AEVLP'], tiny_pascal, tmp_path, tiny_clip, None, obs)
    pl = (torch.rand(8, 20, generator=torch.Generator().manual_seed(1)) < 0.2).float()
    batch = dict(_batch(obs, index), pseudo_labels=pl)
    want = lp.aevlp_loss(preds=preds, observed=torch.as_tensor(obs)[index], pseudo_labels=pl, w=s.w, b=s.b, mu=s.mu,
                         sigma=s.sigma, q2=0.01, q3=1.0, lam1=0.7, lam2=0.4, rho=0.9, reg=0.05,
                         expected_num_pos=1.5)
    assert torch.equal(ae.loss(logits, preds, batch, epoch=2, step=0), want)
    cfg, ae = _method(['-l', 'AEVLP', '--linear-init', '1'], tiny_pascal, tmp_path, tiny_clip, None, obs)
    s = lp.gr_schedule(epoch=2, num_epochs=4, beta=[0, 2, -2, -2], alpha=[0.5, 2, 0.8, 0.5], linear_init=1)
    want = lp.aevlp_loss(preds=preds, observed=torch.as_tensor(obs)[index], pseudo_labels=pl, w=s.w, b=s.b, mu=s.mu,
                         sigma=s.sigma, q2=0.01, q3=1.0, lam1=0.7, lam2=0.4, rho=0.9, reg=0.05,
                         expected_num_pos=1.5)
    assert torch.equal(ae.loss(logits, preds, batch, epoch=2, step=0), want)  # the schedules shifted by 1
    assert ae.schedule_uses_epochs and gr.schedule_uses_epochs


def test_boostlu_logits_are_the_boosted_cam():
    torch.manual_seed(0)
    plain = models.build_classifier('small_cnn', 5, pretrained=False)
    boosted = models.build_classifier('small_cnn', 5, pretrained=False, cam_boost=5.0)
    boosted.load_state_dict(plain.state_dict())  # the same parameters: BoostLU adds none
    images = torch.randn(2, 3, 32, 32)
    plain.eval(), boosted.eval()
    features = plain.forward_features(images)
    want = lp.boostlu_logits(cam=plain.class_activation_maps(features), alpha=5.0)
    assert torch.equal(boosted(images), want)
    one = models.build_classifier('small_cnn', 5, pretrained=False, cam_boost=1.0)
    one.load_state_dict(plain.state_dict())
    one.eval()
    assert torch.allclose(one(images), plain(images), atol=1e-5)  # alpha 1: CAM + GAP = linear(GAP)


def test_linear_init_freezes_the_trunk():
    model = models.build_classifier('small_cnn', 5, pretrained=False)
    model.set_trunk_frozen(True)
    model.train()
    assert not model.trunk.training and model.head.training
    assert not any(p.requires_grad for p in model.trunk.parameters())
    model.set_trunk_frozen(False)
    assert model.trunk.training and all(p.requires_grad for p in model.trunk.parameters())


@pytest.mark.parametrize('flags, names', [
    (['-l', 'an', '--ll-delta-rel', '0.2'], '--ll-delta-rel'),
    (['-l', 'LL-R', '--ll-delta-rel', '0'], '--ll-delta-rel'),
    (['-l', 'LL-R', '--ll-delta-rel', '20', '--epochs', '10'], '--ll-delta-rel'),
    (['-l', 'LL-R', '--llcp-as-released'], '--llcp-as-released'),
    (['-l', 'EM_PL', '--role-lr-mult', '5'], '--role-lr-mult'),
    (['-l', 'role', '--role-lr-mult', '0'], '--role-lr-mult'),
    (['-l', 'GR', '--gr-q', '0', '1'], '--gr-q'),
    (['-l', 'GR', '--gr-alpha', '0.5', '0', '0.8', '0.5'], '--gr-alpha'),
    (['-l', 'an', '--gr-beta', '0', '2', '-2', '-2'], '--gr-beta'),
    (['-l', 'an', '--boostlu-alpha', '3'], '--boostlu-alpha'),
    (['-l', 'LL-R', '--boostlu', '--boostlu-alpha', '0'], '--boostlu-alpha'),
    (['-l', 'LL-R', '--boostlu', '-m', 'clip_vision'], '--boostlu'),
    (['-l', 'EM_PL', '--linear-init', '1'], '--linear-init'),
    (['-l', 'role', '--linear-init', '10', '--epochs', '10'], '--linear-init'),
    (['-l', 'an', '--head-lr-mult', '0'], '--head-lr-mult'),
    (['-l', 'GR', '--aevlp-grid', '2'], '--aevlp-grid'),
    (['-l', 'EM_PL', '--aevlp-gcn', 'none'], '--aevlp-gcn'),
    (['-l', 'AEVLP', '--aevlp-lam', '0.3', '0.5'], '--aevlp-lam'),
    (['-l', 'AEVLP', '--aevlp-top-k', '21'], '--aevlp-top-k'),
    (['-l', 'AEVLP', '--aevlp-sparse-topk', '21'], '--aevlp-sparse-topk'),
    (['-l', 'AEVLP', '--aevlp-threshold', '1.5'], '--aevlp-threshold'),
    (['-l', 'AEVLP', '--aevlp-temp', 'nan'], '--aevlp-temp'),
    (['-l', 'AEVLP', '--aevlp-relation', 'no/such/relation.npy'], '--aevlp-relation'),
    (['-l', 'AEVLP', '--aevlp-gcn', 'no/such/weights.pt'], '--aevlp-gcn'),
    (['-l', 'AEVLP', '--text-features', 'x.npy'], '--text-features'),
    (['-l', 'AEVLP', '--pl-debias'], '--pl-debias'),
    (['-l', 'AEVLP', '--data-format', 'packed'], 'AEVLP'),
])
def test_bad_peer_flags_are_refused_in_one_line(flags, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main_clip.parse_args(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert names in err


def test_paper_defaults_fill_the_run_settings():
    cfg, _ = main_clip.parse_args(['-d', 'coco', '-l', 'GR'])
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.head_lr_mult) == (16, 1e-5, 8, 10.0)
    assert cfg.gr_beta == (0, 10, -2, -8) and cfg.gr_q == (0.01, 1)
    cfg, _ = main_clip.parse_args(['-d', 'pascal', '-l', 'LL-Ct'])
    assert (cfg.batch_size, cfg.ll_delta_rel, cfg.head_lr_mult) == (16, 0.2, 10.0)
    cfg, _ = main_clip.parse_args(['-d', 'cub', '-l', 'role'])
    assert (cfg.batch_size, cfg.lr, cfg.role_lr_mult, cfg.head_lr_mult) == (8, 1e-5, 10.0, 1.0)
    cfg, _ = main_clip.parse_args(['-d', 'demo', '-l', 'LL-R', '--boostlu'])
    assert (cfg.batch_size, cfg.lr, cfg.boostlu_alpha) == (32, 1e-3, 5.0)  # the demo keeps its training settings
    assert cfg.run_dir.endswith('demo_LL-R+boostlu_small_cnn_s0')

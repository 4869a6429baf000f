"""Partial annotations end to end: --observed TAG, observed negatives in the losses, -l ASL / -l CSL,
the class prior as method state (resumed exactly), and the one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import losses
import losses_partial as lp
import main_clip
import methods
import methods_partial
import run_data
from conftest import interrupt_after, write_pascal_like
from preproc import generate_observed_labels

K = 20  # pascal-shaped fixture


@pytest.fixture(scope='module')
def rps_pascal(tmp_path_factory) -> Path:
    """A tiny pascal-shaped dataset with its rps0.5 and fpc5 files, made by the preproc command."""
    root = write_pascal_like(tmp_path_factory.mktemp('partial'), num_train=40, num_val=15, seed=3)
    for flags in (['--scheme', 'rps', '--drop-prob', '0.5'], ['--scheme', 'fpc', '--per-class', '5']):
        assert generate_observed_labels.main(['--dataset', 'pascal', '--data-root', str(root)] + flags) == 0
    return root


def run_args(data_root, tmp_path, *extra, epochs=2):
    return ['-d', 'pascal', '--data-root', str(data_root), '--results-dir', str(tmp_path / 'results'),
            '--cache-dir', str(tmp_path / 'cache'), '-m', 'small_cnn', '--no-pretrained', '--image-size', '32',
            '--epochs', str(epochs), '--batch-size', '8', '--lr', '1e-3', '--num-workers', '0',
            '--device', 'cpu', *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    return err


# --- loading ---------------------------------------------------------------------------------

def test_load_splits_reads_the_tag_file(rps_pascal):
    single = datasets.load_splits(rps_pascal, 'pascal')
    rps = datasets.load_splits(rps_pascal, 'pascal', observed='rps0.5')
    obs = rps['train'].labels_obs
    assert set(np.unique(obs)) == {-1.0, 0.0, 1.0}
    assert not (single['train'].labels_obs == -1).any()
    # the same rows, the same truth; val and test keep their clean labels
    assert np.array_equal(single['train'].images, rps['train'].images)
    assert np.array_equal(rps['val'].labels_obs, rps['val'].labels_true)
    full = np.load(rps_pascal / 'pascal' / 'formatted_train_labels_obs_rps0.5.npy')
    train_idx, _ = datasets.split_indices(len(full))
    assert np.array_equal(obs, full[train_idx].astype(np.float32))


@pytest.mark.parametrize('tag, wanted', [
    ('rps0.4', '--scheme rps --drop-prob 0.4`'),
    ('fpc7', '--scheme fpc --per-class 7`'),
    ('rps.5', '--drop-prob 0.5`, then pass --observed rps0.5'),
])  # a tag that is neither is refused by the parser (tests/test_hostile_runs.py)
def test_a_tag_without_file_names_the_command(rps_pascal, tmp_path, capsys, tag, wanted):
    assert main_clip.main(run_args(rps_pascal, tmp_path, '-l', 'CSL', '--observed', tag)) == 2
    err = one_line_error(capsys)
    assert f'formatted_train_labels_obs_{tag}.npy not found' in err and wanted in err
    assert 'generate_observed_labels.py --dataset pascal' in err


@pytest.mark.parametrize('bad, message', [
    (lambda o: np.where(o == 1, 0.5, o), "holds values other than (-1, 0, 1)"),
    (lambda o: o[:, :5], 'has shape'),
    (lambda o: o[:-3], 'rows but the image list has'),
    (lambda o: -o, 'contradicts formatted_train_labels.npy'),
])
def test_bad_observed_files_are_refused_in_one_line(tmp_path, capsys, bad, message):
    root = write_pascal_like(tmp_path / 'data', num_train=12, num_val=4, seed=5)
    labels = np.load(root / 'pascal' / 'formatted_train_labels.npy')
    np.save(root / 'pascal' / 'formatted_train_labels_obs_rps0.5.npy', bad(np.where(labels == 1, 1.0, -1.0)))
    assert main_clip.main(run_args(root, tmp_path, '-l', 'an', '--observed', 'rps0.5')) == 2
    assert message in one_line_error(capsys)


@pytest.mark.parametrize('flags, message', [
    (['-l', 'ASL', '--gamma-unann', '2'], '--gamma-unann applies to -l CSL only, not -l ASL'),
    (['-l', 'CSL', '--asl-focal-grad'], '--asl-focal-grad applies to -l ASL only'),
    (['-l', 'an', '--prior-file', 'x.csv'], '--prior-file applies to -l CSL only'),
    (['-l', 'an', '--gamma-pos', '0'], '--gamma-pos applies to -l ASL and -l CSL only'),
    (['-l', 'CSL', '--gamma-neg', '-1'], 'argument --gamma-neg: must be >= 0'),
    (['-l', 'ASL', '--asl-clip', '1'], '--asl-clip must be in [0, 1)'),
    (['-l', 'bce', '--observed', 'rps0.5'], '--observed does nothing with -l bce'),
])
def test_partial_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        main_clip.parse_args(flags)
    assert message in capsys.readouterr().err


def test_defaults_are_csls_published_settings():
    cfg, _ = main_clip.parse_args(['-l', 'CSL', '--observed', 'rps0.5'])
    assert (cfg.csl_mode, cfg.gamma_pos, cfg.gamma_neg, cfg.gamma_unann, cfg.asl_clip, cfg.likelihood_topk,
            cfg.prior_threshold, cfg.prior_file) == ('selective', 0.0, 1.0, 4.0, 0.0, 5, 0.5, None)
    assert main_clip.parse_args(['-l', 'CSL', '--observed', 'fpc1000'])[0].gamma_neg == 3.0
    cfg = main_clip.parse_args(['-l', 'ASL', '--gamma-pos', '0'])[0]
    assert (cfg.gamma_pos, cfg.gamma_neg, cfg.asl_clip, cfg.gamma_unann) == (0.0, 4.0, 0.05, None)
    cfg = main_clip.parse_args(['-l', 'an', '--observed', 'rps0.5'])[0]
    assert cfg.gamma_pos is None and cfg.run_dir.endswith('pascal-rps0.5_an_resnet50_s0')
    assert 'Partial labels: ASL / CSL' in main_clip.build_parser().format_help()


# --- observed negatives in the losses --------------------------------------------------------

@pytest.mark.parametrize('name', ['EM_PL', 'EM_PL_ASL'])
def test_an_observed_negative_is_never_overwritten_by_a_positive_pseudo_label(name):
    hp = dict(alpha=0.2, beta_pos=0.7, positive=2, negative=4, unknown=4, warmup_epoch=0, num_classes=3)
    preds = torch.tensor([[0.3, 0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    observed = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    for pl in ([[1.0, 0.0, 0.0]], [[-1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]):  # whatever the pseudo-label says
        loss = losses.compute_batch_loss(name, preds, observed, hp, pseudo_labels=torch.tensor(pl, dtype=torch.float64),
                                         epoch=2)
        grad, = torch.autograd.grad(loss, preds)
        assert grad[0, 0] > 0  # pushed down: a negative
        neg = -np.log(1 - 0.3 + 1e-5) * (0.3 ** 4 if name == 'EM_PL_ASL' else 1.0)
        rest = losses.compute_batch_loss(name, preds[:, 1:], observed[:, 1:], dict(hp, num_classes=2),
                                         pseudo_labels=torch.zeros(1, 2, dtype=torch.float64), epoch=2)
        assert loss.item() == pytest.approx((neg + rest.item() * 2) / 3, rel=1e-12)


def test_em_apl_keeps_annotated_negatives():
    observed = np.array([[1, -1, 0, 0], [0, -1, 0, 0], [0, 0, 0, -1]], dtype=np.float32)
    preds = np.full(observed.shape, 0.1, dtype=np.float32)
    new = losses.apl_update(preds, observed, losses.count_unknowns(observed), epoch=1, num_epochs=2,
                            warmup_epoch=0)
    assert np.array_equal(new[observed != 0], observed[observed != 0])


# --- the methods ------------------------------------------------------------------------------

def _cfg(*flags):
    return main_clip.parse_args(['-d', 'pascal', '--device', 'cpu', *flags])[0]


def test_asl_method_is_csls_asl_on_observed_positives():
    torch.manual_seed(0)
    observed = torch.tensor(np.random.RandomState(0).choice([-1.0, 0.0, 1.0], size=(6, K)), dtype=torch.float32)
    method = methods.build_method(_cfg('-l', 'ASL'), observed.numpy(), 'cpu')
    logits = torch.randn(6, K)
    got = method.loss(logits, torch.sigmoid(logits), dict(observed=observed), epoch=1, step=0)
    want = lp.asymmetric_loss(logits, (observed == 1).float(), gamma_neg=4, gamma_pos=1, clip=0.05)
    assert torch.equal(got, want)


def test_csl_prior_is_method_state_and_resumes_exactly(tmp_path):
    rng = np.random.RandomState(1)
    observed = rng.choice([-1.0, 0.0, 1.0], size=(16, K)).astype(np.float32)
    cfg = _cfg('-l', 'CSL', '--observed', 'rps0.5', '--run-name', 'x', '--results-dir', str(tmp_path),
               '--prior-threshold', '0.45')
    torch.manual_seed(0)
    batches = [torch.randn(8, K) + 0.3 * i for i in range(6)]

    def step(method, i, epoch):
        index = torch.arange(8) + 8 * (i % 2)
        return method.loss(batches[i], torch.sigmoid(batches[i]), dict(observed=method.observed[index]),
                           epoch=epoch, step=i % 2)

    def epoch_end(method, epoch):
        method.end_epoch(epoch, lambda: None)

    full = methods.build_method(cfg, observed, 'cpu')
    assert full.prior() is None  # epoch 1: no prior yet, only the likelihood top-k
    losses_full = []
    for epoch, pair in ((1, (0, 1)), (2, (2, 3)), (3, (4, 5))):
        losses_full += [step(full, i, epoch) for i in pair]
        epoch_end(full, epoch)
        if epoch == 1:
            saved = torch.load(_roundtrip(full.state_dict(), tmp_path), weights_only=True)
    # the online prior is the running mean of every step's sigmoid outputs, frozen at the epoch end
    assert torch.allclose(full.prior(), torch.sigmoid(torch.cat(batches)).mean(0), atol=1e-6)
    written = lp.read_prior_csv(Path(cfg.run_dir) / methods_partial.PRIOR_CSV, K)[1]
    assert torch.equal(written, full.prior())

    resumed = methods.build_method(cfg, observed, 'cpu')
    resumed.load_state_dict(saved)
    again = []
    for epoch, pair in ((2, (2, 3)), (3, (4, 5))):
        again += [step(resumed, i, epoch) for i in pair]
        epoch_end(resumed, epoch)
    assert all(torch.equal(a, b) for a, b in zip(losses_full[2:], again))
    for key, value in full.state_dict()['prior_estimator'].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.state_dict()['prior_estimator'][key]))
    assert torch.equal(full.prior(), resumed.prior())
    # and the prior changes the loss (some class is above 0.45 here)
    assert (full.prior() > 0.45).any()
    unprimed = methods.build_method(cfg, observed, 'cpu')
    assert not torch.equal(step(unprimed, 4, 3), step(full, 4, 3))


def _roundtrip(state, tmp_path):
    path = tmp_path / 'state.pt'
    torch.save(state, path)
    return path


def test_prior_file_is_read_once_checked_and_kept_in_the_checkpoint(tmp_path, capsys):
    names = main_clip.class_text_features.read_classnames('pascal')
    prior = torch.linspace(0.05, 0.9, K)
    path = tmp_path / 'prior.csv'
    path.write_text(lp.prior_csv_text(names, prior))
    cfg = _cfg('-l', 'CSL', '--prior-file', str(path), '--results-dir', str(tmp_path))
    method = methods.build_method(cfg, np.zeros((4, K), np.float32), 'cpu')
    assert torch.equal(method.prior(), prior)
    state = method.state_dict()
    path.write_text(lp.prior_csv_text(names, prior.flip(0)))  # a later edit does not reach a resumed run
    resumed = methods.build_method(cfg, np.zeros((4, K), np.float32), 'cpu')
    resumed.load_state_dict(state)
    assert torch.equal(resumed.prior(), prior)

    path.write_text(lp.prior_csv_text(names[::-1], prior))
    with pytest.raises(main_clip.UserError, match='not in the class order of pascal'):
        methods.build_method(cfg, np.zeros((4, K), np.float32), 'cpu').prior()
    path.write_text(lp.prior_csv_text(names[:5], prior[:5]))
    with pytest.raises(main_clip.UserError, match='has 5 classes, the model has 20'):
        methods.build_method(cfg, np.zeros((4, K), np.float32), 'cpu').prior()


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize('loss, tag', [('CSL', 'rps0.5'), ('ASL', 'fpc5'), ('EM', 'rps0.5')])
def test_train_end_to_end_with_a_tag(rps_pascal, tmp_path, capsys, loss, tag):
    assert main_clip.main(run_args(rps_pascal, tmp_path, '-l', loss, '--observed', tag)) == 0
    out = capsys.readouterr().out
    assert f'observed negatives / image ({tag})' in out
    run_dir = tmp_path / 'results' / f'pascal-{tag}_{loss}_small_cnn_s0'
    last = torch.load(run_dir / 'last.pt', weights_only=True)
    assert last['epoch'] == 2 and (last['method']['observed'] == -1).any()
    assert json.loads((run_dir / 'config.json').read_text())['observed'] == tag
    if loss == 'CSL':
        assert 'CSL class prior after epoch 2 (64 images, used from the next epoch)' in out
        assert set(last['method']) == {'observed', 'prior_estimator', 'online_prior'}
        # CSL's protocol: the prior file of this run feeds a second run
        csv = run_dir / methods_partial.PRIOR_CSV
        assert main_clip.main(run_args(rps_pascal, tmp_path, '-l', 'CSL', '--observed', tag, '--prior-file', str(csv),
                                       '--run-name', 'second', epochs=1)) == 0
        assert 'written only (--prior-file is used)' in capsys.readouterr().out


def test_resume_reproduces_an_uninterrupted_csl_run(rps_pascal, tmp_path, monkeypatch):
    args = run_args(rps_pascal, tmp_path, '-l', 'CSL', '--observed', 'rps0.5', '--prior-threshold', '0.3', epochs=2)
    assert main_clip.main(args + ['--run-name', 'full']) == 0
    undo = interrupt_after(monkeypatch, 1)
    assert main_clip.main(args + ['--run-name', 'cut']) == 130
    undo()
    cut = tmp_path / 'results' / 'cut'
    assert main_clip.main(['--resume', str(cut)]) == 0
    full = tmp_path / 'results' / 'full'
    assert json.loads((full / 'log.json').read_text())['values'] == json.loads((cut / 'log.json').read_text())['values']
    states = [torch.load(d / 'last.pt', weights_only=True) for d in (full, cut)]
    for a, b in zip(states[0]['method']['prior_estimator'].values(), states[1]['method']['prior_estimator'].values()):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert torch.equal(states[0]['method']['online_prior'], states[1]['method']['online_prior'])
    assert all(torch.equal(states[0]['model'][k], states[1]['model'][k]) for k in states[0]['model'])
    assert (full / methods_partial.PRIOR_CSV).read_text() == (cut / methods_partial.PRIOR_CSV).read_text()


def test_the_demo_makes_its_own_tag_file(tmp_path):
    """ensure_demo_observed: written when missing or older than the labels, else left alone."""
    folder = tmp_path / 'demo'
    folder.mkdir()
    labels = (np.random.RandomState(0).rand(40, 30) < 0.3).astype(np.float64)
    np.save(folder / 'formatted_train_labels.npy', labels)
    cfg = main_clip.parse_args(['-d', 'demo', '--data-root', str(tmp_path), '--observed', 'fpc3', '-l', 'CSL'])[0]
    run_data.ensure_demo_observed(cfg)
    path = folder / 'formatted_train_labels_obs_fpc3.npy'
    made = np.load(path)
    assert np.array_equal(made, generate_observed_labels.simulate_fpc(labels, 3, 1200))
    assert ((made == 1).sum(0) <= 3).all() and ((made == -1).sum(0) <= 3).all()
    stamp = path.stat().st_mtime_ns
    run_data.ensure_demo_observed(cfg)
    assert path.stat().st_mtime_ns == stamp
    # a tag that keeps no positive (rps1.0) is a one-line data error, not an unexpected one (QA round 2)
    cfg = main_clip.parse_args(['-d', 'demo', '--data-root', str(tmp_path), '--observed', 'rps1.0', '-l', 'CSL'])[0]
    with pytest.raises(datasets.DataError, match=r'--observed rps1\.0: .*rps1\.0\.npy would hold no observed positive'):
        run_data.ensure_demo_observed(cfg)
    assert not (folder / 'formatted_train_labels_obs_rps1.0.npy').exists()

"""End-to-end tests of main_clip.py on CPU: a tiny pascal-shaped dataset and a tiny random CLIP."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import losses
import main_clip
from conftest import kill_during_epoch_after, tiny_run_args, write_pascal_like

REPO = Path(__file__).resolve().parents[1]


CLI_LOSSES = sorted(main_clip.build_parser()._option_string_actions['--loss'].choices)
PEER_METHODS = {'role', 'LL-R', 'LL-Ct', 'LL-Cp', 'GR', 'AEVLP'}  # methods_peers.py; tests/test_methods_peers.py
SYSTEMS = {'CCD'}  # methods_ccd.py, its own prompts and settings: tests/test_methods_ccd.py


def test_every_loss_of_the_library_is_on_the_command_line():
    assert set(CLI_LOSSES) == set(losses.LOSSES) | PEER_METHODS | SYSTEMS | {'ASL', 'CSL'}  # + methods_partial's
    assert {'bce', 'iun', 'an', 'EM', 'EM_APL', 'EM_PL', 'EM_PL_ASL'} <= set(CLI_LOSSES)


@pytest.mark.parametrize('loss', sorted(set(CLI_LOSSES) - PEER_METHODS - SYSTEMS))
def test_two_epochs_with_each_loss(loss, tiny_pascal, tmp_path, tiny_clip, tiny_text_features, capsys):
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features) + ['-l', loss]
    if loss == 'EM_APL':
        args += ['--warmup-epoch', '1']  # its pseudo-labelling step then runs in epoch 1 and 2
    assert main_clip.main(args) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / 'results' / f'pascal_{loss}_small_cnn_s0'
    log = json.loads((run_dir / 'log.json').read_text())
    assert log['best_epoch'] in (1, 2)
    lines = out.strip().splitlines()[-3:]
    assert lines[0] == f'Best epoch: {log["best_epoch"]}'
    assert lines[1].startswith('Best epoch validation score: ')
    test_map = float(lines[2].removeprefix('Best epoch test score: '))
    assert math.isfinite(test_map) and 0 < test_map <= 100
    assert test_map == pytest.approx(log['best_test_map'], abs=0.005)

    best = torch.load(run_dir / 'best.pt', weights_only=True, map_location='cpu')
    assert best['epoch'] == log['best_epoch']
    assert (run_dir / 'test_preds_best.npy').exists()
    last = torch.load(run_dir / 'last.pt', weights_only=True, map_location='cpu')
    assert last['epoch'] == 2
    if loss == 'EM_APL':  # the pseudo-labelling step turned some unknowns into soft negatives
        assert (last['method']['observed'] < 0).any()
    else:
        assert (last['method']['observed'] >= 0).all()

    # --evaluate on the best checkpoint reproduces the logged test mAP
    capsys.readouterr()
    assert main_clip.main(['--evaluate', str(run_dir / 'best.pt')]) == 0
    evaluated = float(capsys.readouterr().out.strip().split()[-1])
    assert evaluated == pytest.approx(log['best_test_map'], abs=0.005)


def test_cached_and_online_clip_give_identical_runs(tiny_pascal, tmp_path, tiny_clip, tiny_text_features):
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features) + ['-l', 'EM_PL']
    cached = main_clip.main(args + ['--run-name', 'cached'])
    online = main_clip.main(args + ['--run-name', 'online', '--clip-mode', 'online'])
    assert cached == online == 0
    logs = [json.loads((tmp_path / 'results' / n / 'log.json').read_text()) for n in ('cached', 'online')]
    assert logs[0]['values'] == logs[1]['values']
    assert list((tmp_path / 'cache').glob('*.npy'))  # the cache was written


def test_same_seed_repeats_and_another_seed_differs(tiny_pascal, tmp_path, tiny_clip, tiny_text_features):
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=1) + ['-l', 'EM_PL']
    for name, seed in (('a', '0'), ('b', '0'), ('c', '1')):
        assert main_clip.main(args + ['--run-name', name, '-s', seed]) == 0
    preds = {n: np.load(tmp_path / 'results' / n / 'test_preds_best.npy') for n in 'abc'}
    assert np.array_equal(preds['a'], preds['b'])
    assert not np.array_equal(preds['a'], preds['c'])


SIGKILL_CASES = [
    pytest.param(['-l', 'EM_PL'], id='EM_PL'),
    # The stateful methods and the EMA head: their state must survive a SIGKILL too.
    pytest.param(['-l', 'role'], id='role', marks=pytest.mark.slow),
    pytest.param(['-l', 'LL-Cp', '--ll-delta-rel', '2'], id='LL-Cp', marks=pytest.mark.slow),
    pytest.param(['-l', 'EM_PL', '--head', 'q2l', '--ema-decay', '0.9', '--q2l-hidden', '32', '--q2l-heads', '4',
                  '--q2l-ffn', '64'], id='q2l-ema', marks=pytest.mark.slow),
]


@pytest.mark.parametrize('flags', SIGKILL_CASES)
def test_resume_after_sigkill_matches_an_uninterrupted_run(flags, tmp_path, tiny_clip, tiny_text_features):
    data = write_pascal_like(tmp_path / 'data', num_train=400, num_val=40, seed=1)
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=3) + flags
    cmd = [sys.executable, '-u', str(REPO / 'main_clip.py')] + args
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    straight = subprocess.run(cmd + ['--run-name', 'full'], cwd=REPO, env=env, check=True, capture_output=True,
                              text=True)

    kill_during_epoch_after(cmd + ['--run-name', 'killed'], 1, cwd=REPO, env=env)
    killed = tmp_path / 'results' / 'killed'
    assert torch.load(killed / 'last.pt', weights_only=True)['epoch'] == 1
    resumed = subprocess.run([sys.executable, str(REPO / 'main_clip.py'), '--resume', str(killed),
                              '--num-workers', '0'], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert 'Resuming' in resumed.stdout
    assert resumed.stdout.splitlines()[-3:] == straight.stdout.splitlines()[-3:]  # the closing lines
    assert resumed.stdout.splitlines()[-1].startswith('Best epoch test score: ')
    full = json.loads((tmp_path / 'results' / 'full' / 'log.json').read_text())
    again = json.loads((killed / 'log.json').read_text())
    assert full['values'] == again['values']
    assert np.array_equal(np.load(tmp_path / 'results' / 'full' / 'test_preds_best.npy'),
                          np.load(killed / 'test_preds_best.npy'))


def test_resume_refuses_changed_settings_and_finished_runs(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, capsys):
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=1) + ['-l', 'an']
    assert main_clip.main(args) == 0
    run_dir = tmp_path / 'results' / 'pascal_an_small_cnn_s0'
    capsys.readouterr()
    assert main_clip.main(args) == 2  # the same command again would overwrite the run
    assert '--resume' in capsys.readouterr().err
    assert main_clip.main(['--resume', str(run_dir), '--lr', '0.5']) == 2
    err = capsys.readouterr().err
    assert 'lr' in err and '\n' not in err.strip()
    assert main_clip.main(['--resume', str(run_dir)]) == 2
    assert 'finished' in capsys.readouterr().err


def test_bad_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'not a checkpoint at all')
    assert main_clip.main(['--evaluate', str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(junk) in err and '\n' not in err
    malicious = tmp_path / 'pickle.pt'
    torch.save({'model': {}, 'config': {}, 'epoch': 1, 'payload': object()}, malicious)
    assert main_clip.main(['--evaluate', str(malicious)]) == 2  # weights_only refuses arbitrary objects
    assert str(malicious) in capsys.readouterr().err


def test_missing_data_names_the_command_to_run(tmp_path, capsys):
    assert main_clip.main(['-d', 'coco', '--data-root', str(tmp_path), '-l', 'an', '--results-dir',
                           str(tmp_path / 'r')]) == 2
    err = capsys.readouterr().err.strip()
    assert 'format_coco.py' in err and '\n' not in err


@pytest.mark.parametrize('flags, reason', [
    (['-th', '1.5'], 'threshold'), (['-th', '0'], 'threshold'), (['-t', '0'], 'temp'),
    (['-p', '1.0'], 'partial'), (['-p', '-0.1'], 'partial'), (['--epochs', '0'], 'epochs'),
    (['-l', 'nope'], 'loss'), (['-l', 'EM_PL', '--warmup-epoch', '10'], 'warmup'),
])
def test_parser_refuses_out_of_range_flags(flags, reason, capsys):
    with pytest.raises(SystemExit) as exc:
        main_clip.parse_args(flags)
    assert exc.value.code == 2
    assert reason in capsys.readouterr().err


def test_nonfinite_loss_stops_with_epoch_and_batch(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, capsys):
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=1) + ['-l', 'an', '--lr', '1e30']
    assert main_clip.main(args) == 2
    err = capsys.readouterr().err
    assert 'non-finite loss at epoch 1, batch' in err


@pytest.mark.parametrize('backbone', ['resnet50', 'clip_vision'])
def test_real_backbones_train_and_evaluate(backbone, tiny_pascal, tmp_path, tiny_clip, tiny_text_features, capsys):
    """ResNet-50 (random init) and the trainable copy of the (tiny) CLIP image tower, end to end."""
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=1) + ['-l', 'EM_PL']
    args[args.index('small_cnn')] = backbone
    if backbone == 'clip_vision':
        args.remove('--no-pretrained')  # its weights come from --clip-pretrained
    assert main_clip.main(args) == 0
    run_dir = tmp_path / 'results' / f'pascal_EM_PL_{backbone}_s0'
    log = json.loads((run_dir / 'log.json').read_text())
    assert math.isfinite(log['best_test_map'])
    capsys.readouterr()
    assert main_clip.main(['--evaluate', str(run_dir / 'best.pt')]) == 0
    assert float(capsys.readouterr().out.strip().split()[-1]) == pytest.approx(log['best_test_map'], abs=0.005)

"""Faults a long run meets: Ctrl-C, unreadable images, unwritable folders, inconsistent labels."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main_clip
from conftest import tiny_run_args, write_pascal_like

REPO = Path(__file__).resolve().parents[1]


def args_for(data_root, tmp_path, tiny_clip, tiny_text_features, *, epochs=1, workers=0) -> list[str]:
    return tiny_run_args(data_root, tmp_path, tiny_clip, tiny_text_features, epochs=epochs, workers=workers) + ['-l', 'EM_PL']


def corrupt_one_train_image(data_root: Path) -> str:
    folder = data_root / 'pascal'
    name = str(np.load(folder / 'formatted_train_images.npy')[3])
    path = folder / 'VOCdevkit' / 'VOC2012' / 'JPEGImages' / name
    path.write_bytes(path.read_bytes()[:40])  # truncated file
    return name


@pytest.mark.parametrize('workers', [0, 1])
def test_unreadable_image_is_named_in_one_line(tmp_path, tiny_clip, tiny_text_features, capsys, workers):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=5)
    name = corrupt_one_train_image(data)
    assert main_clip.main(args_for(data, tmp_path, tiny_clip, tiny_text_features, workers=workers)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in err
    assert name in errors[0] and 'dataset pascal' in errors[0] and '--skip-bad-images' in errors[0]


def test_skip_bad_images_trains_on_the_rest_and_reports(tmp_path, tiny_clip, tiny_text_features, capsys):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=5)
    corrupt_one_train_image(data)
    args = args_for(data, tmp_path, tiny_clip, tiny_text_features) + ['--skip-bad-images']
    assert main_clip.main(args) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if 'skipped 1 unreadable images' in line]
    assert skipped and skipped[0].startswith('train')
    log = json.loads((tmp_path / 'results' / 'pascal_EM_PL_small_cnn_s0' / 'log.json').read_text())
    assert log['best_epoch'] == 1 and np.isfinite(log['best_test_map'])


def test_labels_that_disagree_with_the_image_list_are_refused_before_training(tmp_path, tiny_clip,
                                                                              tiny_text_features, capsys):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=5)
    labels = np.load(data / 'pascal' / 'formatted_train_labels.npy')
    np.save(data / 'pascal' / 'formatted_train_labels.npy', labels[:-2])
    assert main_clip.main(args_for(data, tmp_path, tiny_clip, tiny_text_features)) == 2
    captured = capsys.readouterr()
    assert 'formatted_train_labels.npy' in captured.err and '\n' not in captured.err.strip()
    assert '[train]' not in captured.out
    assert not (tmp_path / 'results' / 'pascal_EM_PL_small_cnn_s0' / 'last.pt').exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write to read-only folders')
def test_unwritable_results_folder_is_refused_before_training(tmp_path, tiny_pascal, tiny_clip, tiny_text_features,
                                                              capsys):
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        args = args_for(tiny_pascal, tmp_path, tiny_clip, tiny_text_features) + ['--results-dir', str(locked)]
        assert main_clip.main(args) == 2
        err = capsys.readouterr().err
        assert str(locked) in err and '--results-dir' in err
    finally:
        locked.chmod(0o700)


def test_results_path_that_is_a_file_is_refused_before_training(tmp_path, tiny_pascal, tiny_clip, tiny_text_features,
                                                                capsys):
    blocker = tmp_path / 'results_file'
    blocker.write_text('not a folder')
    args = args_for(tiny_pascal, tmp_path, tiny_clip, tiny_text_features) + ['--results-dir', str(blocker)]
    assert main_clip.main(args) == 2
    captured = capsys.readouterr()
    assert str(blocker) in captured.err and '--results-dir' in captured.err
    assert '[train]' not in captured.out
    assert blocker.read_text() == 'not a folder'


def test_ctrl_c_keeps_the_last_checkpoint_usable(tmp_path, tiny_clip, tiny_text_features):
    data = write_pascal_like(tmp_path / 'data', num_train=400, num_val=40, seed=2)
    args = args_for(data, tmp_path, tiny_clip, tiny_text_features, epochs=3)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, '-u', str(REPO / 'main_clip.py')] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith('checkpoint: ') and line.rstrip().endswith('(epoch 1)'):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert 'interrupted' in err and '--resume' in err and 'Traceback' not in err
    run_dir = tmp_path / 'results' / 'pascal_EM_PL_small_cnn_s0'
    assert not list(run_dir.glob('.*.tmp'))
    assert torch.load(run_dir / 'last.pt', weights_only=True)['epoch'] in (1, 2)
    assert main_clip.main(['--resume', str(run_dir), '--num-workers', '0']) == 0
    assert torch.load(run_dir / 'last.pt', weights_only=True)['epoch'] == 3

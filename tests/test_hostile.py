"""Hostile inputs: every bad value refused before work starts, in one line, with nothing lost."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import main_clip
from config import build_config
from conftest import tiny_run_args, write_pascal_like

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_args(tmp_path, tiny_pascal, tiny_clip, tiny_text_features):
    def make(*extra, epochs=1):
        return tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=epochs) + list(extra)
    return make


def run_dir(tmp_path, loss='EM_PL') -> Path:
    return tmp_path / 'results' / f'pascal_{loss}_small_cnn_s0'


def one_error_line(err: str, *needles: str) -> str:
    """The single 'error:' line of stderr (progress bars aside), checked for its needles."""
    lines = [line.split('\r')[-1] for line in err.splitlines() if 'error:' in line]
    assert len(lines) == 1 and 'Traceback' not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize('flags, needle', [
    (['-t', 'nan'], '-t/--temp'), (['-t', '0'], '-t/--temp'), (['--lr', 'nan'], '--lr'), (['--lr', 'inf'], '--lr'),
    (['--alpha', 'nan'], '--alpha'), (['--alpha', '-1'], '--alpha'), (['--beta-pos', 'inf'], '--beta-pos'),
    (['-th', '1'], '-th/--threshold'), (['-th', 'nan'], '-th/--threshold'), (['-p', '-0.1'], '-p/--partial'),
    (['--epochs', '0'], '--epochs'), (['--batch-size', 'x'], '--batch-size'), (['--num-workers', '-1'], '--num-workers'),
    (['--evaluate', 'a.pt', '--resume', 'r'], 'exclude each other'),
    (['--resume', 'r', '--init-from', 'a.pt'], 'exclude each other'),
    (['--no-pretrained', '--backbone-weights', 'w.pt'], 'exclude each other'),
])
def test_bad_values_are_refused_by_the_parser_in_one_line(flags, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main_clip.parse_args(['-d', 'pascal', '--results-dir', str(tmp_path / 'results')] + flags)
    assert exit_.value.code == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / 'results').exists()


def test_default_folders_are_the_repository_s_wherever_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, args = main_clip.parse_args(['-d', 'demo'])
    assert Path(cfg.data_root) == REPO / 'data' and Path(cfg.cache_dir) == REPO / 'cache'
    assert Path(cfg.run_dir).parent == REPO / 'results' and Path(cfg.text_features_dir) == REPO / 'text_features'
    assert cfg.clip_pretrained == str(REPO / 'data' / 'demo' / 'clip' / 'vlpl-demo-tiny.pt')
    cfg, _ = main_clip.parse_args(['-d', 'demo', '--data-root', 'elsewhere'])  # a given path: the working directory's
    assert cfg.data_root == 'elsewhere'


def test_text_features_of_another_width_end_in_one_line(tmp_path, run_args, capsys):
    wrong = tmp_path / 'wide.npy'
    np.save(wrong, np.random.RandomState(0).randn(20, 48).astype(np.float32))  # the tiny CLIP embeds in 32
    args = [a if a != run_args()[-1] else str(wrong) for a in run_args()]
    assert main_clip.main(args) == 2
    one_error_line(capsys.readouterr().err, 'wide.npy', '48', '32', '--text-features')
    assert not run_dir(tmp_path).exists()


def test_a_failed_start_leaves_no_run_folder_and_the_same_command_then_runs(tmp_path, tiny_clip, tiny_text_features,
                                                                         capsys):
    data = tmp_path / 'data'
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=1)
    assert main_clip.main(args) == 2
    one_error_line(capsys.readouterr().err, 'pascal')
    assert not run_dir(tmp_path).exists()
    write_pascal_like(data, num_train=20, num_val=5)
    assert main_clip.main(args) == 0
    assert (run_dir(tmp_path) / 'last.pt').exists()


def test_a_full_disk_while_saving_keeps_the_last_epoch_and_says_so(tmp_path, run_args, capsys, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, handle, *a, **k):
        if 'optimizer' in obj:
            calls.append(obj['epoch'])
            if obj['epoch'] == 2:  # torch.save reports a full disk as RuntimeError
                raise RuntimeError('[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing '
                                   'file data/0: file write failed')
        return real_save(obj, handle, *a, **k)

    monkeypatch.setattr(torch, 'save', save)
    assert main_clip.main(run_args(epochs=2)) == 1
    line = one_error_line(capsys.readouterr().err, 'last.pt', 'the last complete epoch is kept', '--resume')
    assert 'Traceback' not in line
    assert torch.load(run_dir(tmp_path) / 'last.pt', weights_only=True)['epoch'] == 1
    assert sorted(p.name for p in run_dir(tmp_path).iterdir() if p.name.startswith('.')) == []


def test_a_failure_before_the_first_checkpoint_says_nothing_was_kept(tmp_path, run_args, capsys):
    assert main_clip.main(run_args('--lr', '1e30', '-l', 'an')) == 2
    one_error_line(capsys.readouterr().err, 'non-finite loss', 'nothing was kept')
    assert not run_dir(tmp_path, 'an').exists()


def test_a_foreign_checkpoint_gets_a_true_message(tmp_path, capsys):
    path = tmp_path / 'evil.pt'
    torch.save({'model': {}, 'config': {}, 'epoch': 1, 'payload': Path('x')}, path)  # a pickled object
    assert main_clip.main(['--evaluate', str(path)]) == 2
    line = one_error_line(capsys.readouterr().err, 'evil.pt', 'not a VLPL checkpoint', 'no code in it ran')
    assert 'weights_only' not in line


def test_a_second_run_of_the_same_folder_is_refused_while_the_first_runs(tmp_path, run_args, capsys):
    folder = run_dir(tmp_path)
    folder.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, '-c', (
        'import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import checkpoints; '
        'f = checkpoints.RunFolder(Path(sys.argv[2]), resuming=False).__enter__(); print("locked", flush=True); '
        'time.sleep(60)'), str(REPO), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        assert main_clip.main(run_args()) == 2
        one_error_line(capsys.readouterr().err, 'in use by another run', f'pid {holder.pid}')
    finally:
        holder.kill()
        holder.wait()
    assert main_clip.main(run_args()) == 0  # the lock died with its process


def test_a_wrong_image_folder_is_refused_before_training_even_with_skip_bad_images(tmp_path, tiny_clip,
                                                                                    tiny_text_features, capsys):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=5)
    images = data / 'pascal' / 'VOCdevkit' / 'VOC2012' / 'JPEGImages'
    for path in sorted(images.glob('train_*'))[:15]:
        path.unlink()
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=1)
    assert main_clip.main(args + ['--skip-bad-images']) == 2
    one_error_line(capsys.readouterr().err, 'missing under', str(images), 'wrong image folder')
    assert main_clip.main(args) == 2
    one_error_line(capsys.readouterr().err, 'missing under', '--skip-bad-images')
    assert not run_dir(tmp_path).exists()


def test_skip_bad_images_names_each_skipped_file_once(tmp_path, tiny_clip, tiny_text_features, capsys):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=5)
    folder = data / 'pascal' / 'VOCdevkit' / 'VOC2012' / 'JPEGImages'
    name = str(np.load(data / 'pascal' / 'formatted_train_images.npy')[2])
    (folder / name).write_bytes(b'truncated')
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=2) + ['--skip-bad-images']
    assert main_clip.main(args) == 0
    named = [line for line in capsys.readouterr().err.splitlines() if 'skipped unreadable image' in line]
    assert len(named) == 1 and name in named[0]


def test_backbone_weights_are_checked_before_clip_is_loaded(tmp_path, run_args, capsys, monkeypatch):
    import clip_loading

    def no_clip(*args, **kwargs):
        raise AssertionError('CLIP was loaded before the inputs were checked')

    monkeypatch.setattr(clip_loading, 'load_clip', no_clip)
    args = [a for a in run_args() if a != '--no-pretrained'] + ['--backbone-weights', str(tmp_path / 'no.pth')]
    assert main_clip.main(args) == 2
    one_error_line(capsys.readouterr().err, '--backbone-weights', 'no.pth')


def test_resume_for_more_epochs_init_from_and_overwrite(tmp_path, run_args, capsys):
    assert main_clip.main(run_args(epochs=1)) == 0
    folder = run_dir(tmp_path)
    assert main_clip.main(['--resume', str(folder)]) == 2
    one_error_line(capsys.readouterr().err, 'already finished all 1 epochs', '--epochs')
    assert main_clip.main(['--resume', str(folder), '--epochs', '2']) == 0
    log = json.loads((folder / 'log.json').read_text())
    assert log['num_epochs'] == 2 and torch.load(folder / 'last.pt', weights_only=True)['epoch'] == 2

    # the same run, uninterrupted, gives the same numbers (wall times aside)
    other = tmp_path / 'straight'
    assert main_clip.main(run_args(epochs=2) + ['--results-dir', str(other)]) == 0
    straight = json.loads((other / folder.name / 'log.json').read_text())
    assert straight['values'] == log['values'] and straight['best_test_map'] == log['best_test_map']

    assert main_clip.main(run_args(epochs=1)) == 2  # the folder holds a run
    one_error_line(capsys.readouterr().err, 'already holds a run', '--overwrite')
    best = folder / 'best.pt'
    assert main_clip.main(run_args('--init-from', str(best), '--run-name', 'warm')) == 0
    warm = json.loads((tmp_path / 'results' / 'warm' / 'config.json').read_text())
    assert warm['init_from'] == str(best) and (tmp_path / 'results' / 'warm' / 'last.pt').exists()

    before = (folder / 'log.json').read_text()
    assert main_clip.main(run_args('--overwrite', '--lr', '1e30', '-l', 'EM_PL')) == 2  # fails before a checkpoint
    assert (folder / 'log.json').read_text() == before  # the replaced run came back
    capsys.readouterr()
    assert main_clip.main(run_args('--overwrite')) == 0
    assert torch.load(folder / 'last.pt', weights_only=True)['epoch'] == 1
    assert not list(folder.parent.glob('.*replaced'))


def test_init_from_a_checkpoint_of_another_shape_is_one_line(tmp_path, run_args, capsys):
    path = tmp_path / 'other.pt'
    torch.save({'model': {'head.weight': torch.zeros(3, 3)}, 'config': {}, 'epoch': 1}, path)
    assert main_clip.main(run_args('--init-from', str(path))) == 2
    one_error_line(capsys.readouterr().err, '--init-from', 'does not fit')
    assert not run_dir(tmp_path).exists()


def test_apl_refuses_more_epochs_with_the_reason(tmp_path, tiny_pascal):
    cfg = build_config(dataset='pascal', loss='EM_APL', epochs=6, data_root=str(tiny_pascal))
    longer = build_config(dataset='pascal', loss='EM_APL', epochs=8, data_root=str(tiny_pascal))
    import dataclasses
    assert checkpoints.config_differences(dataclasses.asdict(cfg), longer, more_epochs_ok=False) == ['epochs: 6 -> 8']
    assert checkpoints.config_differences(dataclasses.asdict(cfg), longer, more_epochs_ok=True) == []


def test_a_moved_demo_data_folder_keeps_its_run_resumable():
    import dataclasses
    old = build_config(dataset='demo', loss='EM_PL', data_root='/old/data')
    new = build_config(dataset='demo', loss='EM_PL', data_root='/new/data')
    assert old.clip_pretrained != new.clip_pretrained
    assert checkpoints.config_differences(dataclasses.asdict(old), new) == []
    other = dataclasses.replace(new, clip_pretrained='/somewhere/else.pt')
    assert checkpoints.config_differences(dataclasses.asdict(old), other)

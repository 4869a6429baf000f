"""Hostile runs (issue 29): a run killed at the wrong moment, a report over unfinished runs, a
checkpoint in the wrong place; each ends in one true line, and nothing finished is lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_clip
import report
from conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_args(tmp_path, tiny_pascal, tiny_clip, tiny_text_features):
    def make(*extra, epochs=1):
        return tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=epochs) + list(extra)
    return make


def run_dir(tmp_path, loss='EM_PL') -> Path:
    return tmp_path / 'results' / f'pascal_{loss}_small_cnn_s0'


def one_error_line(err: str, *needles: str) -> str:
    lines = [line.split('\r')[-1] for line in err.splitlines() if 'error:' in line]
    assert len(lines) == 1 and 'Traceback' not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def killed_at_first_checkpoint(args: list[str]) -> None:
    """main_clip.py in a process that SIGKILLs itself where it would write its first checkpoint: what a
    kill (OOM killer, scancel, power loss) during epoch 1 leaves on disk."""
    code = ('import os, signal, sys; sys.path.insert(0, sys.argv[1]); import records; '
            'records.save_epoch = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); '
            'import main_clip; main_clip.main(sys.argv[2:])')
    proc = subprocess.run([sys.executable, '-c', code, str(REPO)] + args, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == -signal.SIGKILL, proc.stderr


# ------------------------------------------------------------------------------ item 4, item 12

def test_an_overwrite_killed_before_its_first_checkpoint_loses_nothing(tmp_path, run_args, capsys):
    """Item 4: the replaced run waits in .NAME.replaced; the next start puts it back (a second
    --overwrite that fails used to delete it for good), and report.py never lists the hidden copy."""
    folder = run_dir(tmp_path)
    assert main_clip.main(run_args()) == 0
    finished = (folder / 'log.json').read_text()
    killed_at_first_checkpoint(run_args('--overwrite'))
    hidden = folder.with_name(f'.{folder.name}.replaced')
    assert (hidden / 'log.json').read_text() == finished and not (folder / 'last.pt').exists()
    assert report.find_run_folders([str(folder.parent)]) == [folder]  # not the hidden copy

    capsys.readouterr()
    assert main_clip.main(run_args('--overwrite', '--lr', '1e30')) == 2  # a second --overwrite that fails
    err = capsys.readouterr().err
    assert f'restored {folder}' in err
    one_error_line(err, 'non-finite loss')
    assert (folder / 'log.json').read_text() == finished and not hidden.exists()

    killed_at_first_checkpoint(run_args('--overwrite'))
    assert main_clip.main(run_args()) == 2  # without --overwrite: put back, and refused as a finished run
    one_error_line(capsys.readouterr().err, 'already holds a run')
    assert (folder / 'log.json').read_text() == finished and not hidden.exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_names_the_command(tmp_path, run_args, capsys):
    """Item 12: there is nothing to resume; the same command without --resume starts it again."""
    killed_at_first_checkpoint(run_args())
    folder = run_dir(tmp_path)
    assert (folder / 'config.json').exists() and not (folder / 'last.pt').exists()
    assert main_clip.main(['--resume', str(folder)]) == 2
    one_error_line(capsys.readouterr().err, f'--resume {folder}', 'before its first checkpoint',
                   'the same command without --resume')
    assert main_clip.main(run_args()) == 0 and (folder / 'last.pt').exists()


def test_a_run_that_never_started_leaves_no_lock_file(tmp_path, run_args, capsys):
    """Item 12: a failed start leaves neither a run folder nor results/.NAME.lock."""
    assert main_clip.main(run_args('--lr', '1e30')) == 2
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / 'results').iterdir()) == []
    assert main_clip.main(run_args()) == 0
    assert sorted(p.name for p in (tmp_path / 'results').iterdir()) == [f'.{run_dir(tmp_path).name}.lock',
                                                                       run_dir(tmp_path).name]

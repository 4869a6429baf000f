"""sweep.py: a grid of tiny runs (the tests' tiny pascal-shaped data and tiny CLIP) expands to stably
named runs; the debug executor runs them in process; a sweep killed in the middle of a run, run
again, finishes without repeating a finished run and gives the same table as an uninterrupted
sweep; a folder of another configuration is refused; the SLURM submission is the sbatch script
submitit writes (a fake sbatch catches it); a preempted task is checkpointed and requeued the way
submitit does it and resumes from its last.pt. Also the provenance records and report.py --paper."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import records
import report
import sweep
import sweep_executors
import sweep_grid
import sweep_state
from config import REPO_ROOT

METHODS = ('an', 'EM', 'EM_PL')


def write_grid(path: Path, results: Path, data_root, tiny_clip, text_features, *, methods=METHODS, seeds=(0, 1),
               epochs: int = 2, extra: str = '') -> Path:
    """A grid of tiny CPU runs: the pascal recipes of the originals, overridden to the tiny data."""
    path.write_text(f'''
methods = {json.dumps(list(methods))}
datasets = ["pascal"]
seeds = {json.dumps(list(seeds))}
recipe = "original"
results-dir = "{results}"
[overrides]
data-root = "{data_root}"
cache-dir = "{results.parent / 'cache'}"
model = "small_cnn"
no-pretrained = true
image-size = 32
epochs = {epochs}
batch-size = 8
lr = 1e-3
num-workers = 0
device = "cpu"
clip-model = "{tiny_clip['config']}"
clip-pretrained = "{tiny_clip['checkpoint']}"
text-features = "{text_features}"
{extra}''')
    return path


@pytest.fixture
def grid(tmp_path, tiny_pascal, tiny_clip, tiny_text_features):
    return write_grid(tmp_path / 'table.toml', tmp_path / 'runs', tiny_pascal, tiny_clip, tiny_text_features)


def logs_of(results: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(results.glob('*/log.json'))}


class Killed(BaseException):
    """Stands for SIGKILL of the sweep process: nothing in the sweep or the run catches it."""


# ----------------------------------------------------------------------------------------------
# The grid


def test_grid_expands_to_stable_names(grid):
    g = sweep_grid.read_grid(grid)
    specs = sweep_grid.expand(g)
    assert [s.name for s in specs] == [f'pascal_{m}_original_s{s}' for m in METHODS for s in (0, 1)]
    first = specs[0]
    assert first.argv[:8] == ('-d', 'pascal', '-l', 'an', '-s', '0', '--recipe', 'original')
    assert first.argv[-4:] == ('--results-dir', str(g.results_dir), '--run-name', 'pascal_an_original_s0')
    assert '--no-pretrained' in first.argv and first.cell == 'an'
    assert sweep_grid.expand(sweep_grid.read_grid(grid)) == specs  # the same names and arguments every time


def test_recipe_variants_and_per_method_overrides(tmp_path):
    path = tmp_path / 'g.toml'
    path.write_text('methods = ["LL-R", "LL-R:boostlu"]\ndatasets = ["coco"]\nseeds = [2]\nrecipe = "original"\n'
                    '[overrides]\nepochs = 1\n[overrides."LL-R"]\nlr = 0.5\n[overrides.coco]\nbatch-size = 4\n')
    specs = sweep_grid.expand(sweep_grid.read_grid(path, str(tmp_path / 'r')))
    assert [s.name for s in specs] == ['coco_LL-R_original_s2', 'coco_LL-R_boostlu_s2']
    assert [s.cell for s in specs] == ['LL-R', 'LL-R:boostlu']
    assert '--recipe boostlu' in ' '.join(specs[1].argv)
    assert ' --epochs 1 --batch-size 4 --lr 0.5 ' in ' '.join(specs[1].argv)


@pytest.mark.parametrize('text, message', [
    ('methods = ["an"]\ndatasets = ["pascal"]\n', 'seeds must be a non-empty list'),
    ('methods = ["nope"]\ndatasets = ["pascal"]\nseeds = [0]\n', "unknown method 'nope'"),
    ('methods = ["an"]\ndatasets = ["voc"]\nseeds = [0]\n', "unknown dataset 'voc'"),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\nepochs = 3\n', "unknown keys ['epochs']"),
    ('methods = ["an", "an"]\ndatasets = ["pascal"]\nseeds = [0]\n', 'names some runs twice'),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides]\n"--lr" = 1\n', 'without dashes'),
    ('methods = [an]\n', 'not a readable TOML grid'),
    # What the sweep sets itself: an override ran every seed as seed 7 and the table showed n=2, +- 0.00.
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0, 1]\n[overrides]\nseed = 7\n', "overrides.seed: not an override, the grid's seeds set it"),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides]\ndataset = "coco"\n', "the grid's datasets set it"),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides.an]\nloss = "EM"\n', "overrides.an.loss: not an override, the grid's methods set it"),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides]\nrun-name = "x"\n', 'the sweep names each run'),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides]\nresults-dir = "x"\n', "the grid's results-dir sets it"),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides]\npytorch_seed = 3\n', "the grid's seeds set it"),
    # A table inside a sub-table was dropped without a word (EM ran with the top-level epochs).
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides.pascal.an]\nepochs = 5\n',
     'overrides.pascal.an: sub-tables go one level deep'),
    # Values of the wrong type were tracebacks.
    ('methods = ["an"]\ndatasets = [["pascal"]]\nseeds = [0]\n', 'datasets must be a list of names'),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\nresults-dir = 5\n', 'results-dir must be a string'),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\nrecipe = 5\n', 'recipe must be a string'),
    # QA round 3: false for a flag that takes a value was dropped (the run trained the default 10 epochs).
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides]\nepochs = false\n',
     'overrides.epochs = false: --epochs takes a value, not true or false'),
    ('methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\n[overrides.an]\nepoch = true\n',
     'overrides.an.epoch = true: --epoch takes a value'),
])
def test_a_bad_grid_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / 'g.toml'
    path.write_text(text)
    assert sweep.main([str(path), '--dry-run']) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Running, killing, running again


def test_debug_sweep_killed_mid_run_then_rerun_equals_an_uninterrupted_sweep(grid, tmp_path, monkeypatch, capsys):
    # Uninterrupted: the same grid into another folder.
    straight = write_grid(tmp_path / 'straight.toml', tmp_path / 'straight', *_grid_inputs(grid))
    assert sweep.main([str(straight), '--executor', 'debug']) == 0
    assert 'summary: 0 done, 0 resumed, 6 started, 0 failed' in capsys.readouterr().out

    # Killed during epoch 2 of the third run (after its epoch-1 checkpoint).
    save = records.save_epoch
    calls = []

    def save_then_die(run_dir, epoch, *args, **kwargs):
        save(run_dir, epoch, *args, **kwargs)
        calls.append((Path(run_dir).name, epoch))
        if len(calls) == 5:
            raise Killed
    monkeypatch.setattr(records, 'save_epoch', save_then_die)
    with pytest.raises(Killed):
        sweep.main([str(grid), '--executor', 'debug'])
    monkeypatch.setattr(records, 'save_epoch', save)
    results = tmp_path / 'runs'
    assert calls[-1] == ('pascal_EM_original_s0', 1)
    assert records.run_status(results / 'pascal_an_original_s1').finished
    assert records.run_status(results / 'pascal_EM_original_s0').state == 'interrupted'
    finished_before = {name: (results / name / 'log.json').stat().st_mtime_ns
                       for name in ('pascal_an_original_s0', 'pascal_an_original_s1')}
    capsys.readouterr()

    # The same command again: the finished runs are skipped, the interrupted one resumes.
    assert sweep.main([str(grid), '--executor', 'debug']) == 0
    out = capsys.readouterr().out
    assert 'summary: 2 done, 1 resumed, 3 started, 0 failed' in out
    assert 'start pascal_an_original' not in out
    for name, mtime in finished_before.items():  # not repeated
        assert (results / name / 'log.json').stat().st_mtime_ns == mtime
    assert logs_of(results) == logs_of(tmp_path / 'straight')

    # The same table as the uninterrupted sweep; a third call does nothing.
    assert report.main(['--paper', str(results), '--out', str(tmp_path / 'p1')]) == 0
    assert report.main(['--paper', str(tmp_path / 'straight'), '--out', str(tmp_path / 'p2')]) == 0
    assert (tmp_path / 'p1' / 'paper.csv').read_text() == (tmp_path / 'p2' / 'paper.csv').read_text()
    capsys.readouterr()
    assert sweep.main([str(grid), '--executor', 'debug']) == 0
    assert 'summary: 6 done, 0 resumed, 0 started, 0 failed' in capsys.readouterr().out


def _grid_inputs(grid: Path):
    """(data root, tiny CLIP dict, text features) of a grid written by write_grid."""
    import tomllib

    o = tomllib.loads(grid.read_text())['overrides']
    return Path(o['data-root']), {'config': o['clip-model'], 'checkpoint': o['clip-pretrained']}, o['text-features']


def test_another_config_is_refused_and_a_failure_named(grid, tmp_path, capsys):
    g = write_grid(tmp_path / 'small.toml', tmp_path / 'runs', *_grid_inputs(grid), methods=('an',), seeds=(0,),
                   epochs=1)
    assert sweep.main([str(g), '--executor', 'debug']) == 0
    capsys.readouterr()
    changed = write_grid(tmp_path / 'changed.toml', tmp_path / 'runs', *_grid_inputs(grid), methods=('an', 'EM'),
                         seeds=(0,), epochs=1, extra='[overrides.an]\nalpha = 0.5\nlr = 0.01\n')
    (tmp_path / 'runs' / 'pascal_EM_original_s0').mkdir()
    (tmp_path / 'runs' / 'pascal_EM_original_s0' / 'config.json').write_text('{"epochs": 1, "loss": "EM"')  # damaged
    rc = sweep.main([str(changed), '--executor', 'debug'])
    out = capsys.readouterr().out
    assert rc == 1
    assert 'refused pascal_an_original_s0: ' in out and 'holds another config (lr: 0.001 -> 0.01; alpha: 0.2 -> 0.5)' in out
    assert 'summary: 0 done, 0 resumed, 1 started, 1 failed (1 refused)' in out  # EM starts over a folder without an epoch
    assert records.run_status(tmp_path / 'runs' / 'pascal_EM_original_s0').finished


def test_a_second_sweep_on_the_same_results_is_refused(grid, tmp_path, capsys):
    """Two sweeps on one results folder each reported the other's runs (locked by it) as failed, with
    a progress bar as the 'error': the second now stops at once, in one line, touching nothing."""
    results = tmp_path / 'runs'
    results.mkdir()
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import fcntl, sys, time; h = open(sys.argv[1], "a+"); '
         'fcntl.lockf(h, fcntl.LOCK_EX); h.write("pid 4242 on node7"); h.flush(); print("locked", flush=True); '
         'time.sleep(60)', str(results / '.sweep.lock')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        assert sweep.main([str(grid), '--executor', 'debug']) == 2
        err = capsys.readouterr().err.strip()
        assert f'{results} is in use by another sweep (pid 4242 on node7)' in err and len(err.splitlines()) == 1
        assert sorted(p.name for p in results.iterdir()) == ['.sweep.lock']
    finally:
        holder.kill()
        holder.wait()


def test_damaged_files_of_a_sweep_are_one_line(grid, tmp_path, capsys):
    """A truncated config.json in a run folder was a JSONDecodeError traceback in --dry-run and a
    misleading 'already finished' at run time; a damaged sweep.json a KeyError in report.py --paper."""
    results = tmp_path / 'runs'
    (results / 'pascal_an_original_s0').mkdir(parents=True)
    (results / 'pascal_an_original_s0' / 'config.json').write_text('{"dataset": "pas')
    (results / 'pascal_an_original_s0' / 'log.json').write_text('{"epochs": []}')  # it had trained
    assert sweep.main([str(grid), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'refuse  pascal_an_original_s0' in out or 'refuse pascal_an_original_s0' in out, out
    assert 'config.json is damaged (not a JSON object)' in out
    for text in ('{"runs": 5}', '{"runs": [{"name": "x"}]}'):
        (results / 'sweep.json').write_text(text)
        assert report.main(['--paper', str(results), '--out', str(tmp_path / 'rep')]) == 2
        err = capsys.readouterr().err.strip()
        assert 'sweep.json: damaged' in err and len(err.splitlines()) == 1, err


def test_a_failing_run_gives_its_last_error_line(grid, tmp_path, capsys):
    g = write_grid(tmp_path / 'g.toml', tmp_path / 'runs', *_grid_inputs(grid), methods=('an', 'EM'), seeds=(0,),
                   epochs=1, extra=f'[overrides.an]\ndata-root = "{tmp_path / "nowhere"}"\n')
    assert sweep.main([str(g), '--executor', 'debug']) == 1
    out = capsys.readouterr().out
    assert 'summary: 0 done, 0 resumed, 1 started, 1 failed' in out
    failed = [line for line in out.splitlines() if line.startswith('  failed pascal_an_original_s0: error: ')]
    assert len(failed) == 1 and 'nowhere' in failed[0], out


def test_dry_run_prints_plan_and_cost_from_measured_epochs(grid, tmp_path, capsys):
    g = write_grid(tmp_path / 'g.toml', tmp_path / 'runs', *_grid_inputs(grid), methods=('an',), seeds=(0, 1),
                   epochs=1)
    assert sweep.main([str(g), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'start   pascal_an_original_s0' in out and 'cost unknown' in out
    assert 'python main_clip.py -d pascal -l an -s 0 --recipe original' in out
    assert not (tmp_path / 'runs').exists()  # a dry run writes nothing
    assert sweep.main([str(g), '--executor', 'debug']) == 0
    g2 = write_grid(tmp_path / 'g.toml', tmp_path / 'runs', *_grid_inputs(grid), methods=('an',), seeds=(0, 1, 2),
                    epochs=1)
    capsys.readouterr()
    assert sweep.main([str(g2), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'done    pascal_an_original_s0' in out and 'start   pascal_an_original_s2' in out
    assert 'measured: 2 epochs of this sweep' in out and '2 finished, 0 to resume, 1 to start' in out


def test_cost_from_bench_figures(tmp_path):
    folder = tmp_path / 'data' / 'coco'
    folder.mkdir(parents=True)
    np.save(folder / 'formatted_train_images.npy', np.array(['a'] * 100))
    np.save(folder / 'formatted_val_images.npy', np.array(['b'] * 30))
    cfg, _ = sweep_state.parse_run_argv(['-d', 'coco', '-l', 'an', '--data-root', str(tmp_path / 'data'),
                                         '--device', 'cpu'])
    figures = [{'device': 'cpu', 'model': 'resnet50', 'image_size': 448, 'train_s_per_image': 2.0,
                'eval_s_per_image': 0.5, 'command': 'python bench/bench_speed.py'}]
    seconds, where = sweep.epoch_seconds(cfg, tmp_path / 'runs', figures)
    assert seconds == 80 * 2.0 + (20 + 30) * 0.5 and 'bench/bench_speed.py' in where
    assert sweep.load_figures()[0]['model'] == 'resnet50'  # bench/figures.json is readable


def test_local_executor_runs_one_group_of_gpus_per_run_at_once(tmp_path, monkeypatch):
    """Four visible GPUs, two per run: two runs at a time, each a torchrun group on its own pair
    (a stand-in for python records what it was given and how long it ran)."""
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\necho "GPUS=$CUDA_VISIBLE_DEVICES START=$(date +%s.%N) ARGS=$*"\nsleep 1\n'
                    'echo "END=$(date +%s.%N)"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sweep_executors, 'visible_gpus', lambda: ['0', '1', '2', '3'])
    specs = [sweep_grid.RunSpec(f'r{i}', 'an', None, 'pascal', i, ('-d', 'pascal', '-s', str(i)),
                                str(tmp_path / f'r{i}')) for i in range(3)]
    outcomes = sweep_executors.execute_local([(s, sweep_state.Action('start')) for s in specs], tmp_path,
                                             gpus_per_run=2, python=str(fake), say=lambda line: None)
    assert [o.kind for o in outcomes] == ['started'] * 3
    logs = {s.name: (tmp_path / 'logs' / f'{s.name}.log').read_text() for s in specs}
    assert 'GPUS=0,1 ' in logs['r0'] and 'GPUS=2,3 ' in logs['r1'] and 'GPUS=0,1 ' in logs['r2']
    assert '-m torch.distributed.run --standalone --nproc_per_node=2 ' + str(REPO_ROOT / 'main_clip.py') in logs['r0']
    times = {n: (float(log.split('START=')[1].split()[0]), float(log.split('END=')[1].split()[0])) for n, log in logs.items()}
    assert times['r1'][0] < times['r0'][1]       # r0 and r1 ran together
    assert times['r2'][0] >= times['r0'][1] - 0.05 or times['r2'][0] >= times['r1'][1] - 0.05  # r2 waited for a pair


@pytest.mark.slow
def test_local_sweep_sigkill_then_rerun(grid, tmp_path):
    """The local executor as a user runs it: sweep.py in its own process, SIGKILL in the middle of
    the third run, the same command again; the table equals an uninterrupted sweep's."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    # The victim (EM, the third run) trains 6 epochs, so that the kill, sent when its epoch-1 checkpoint
    # appears, lands while it runs: with 2 tiny epochs a loaded machine let it finish first.
    longer = '[overrides.EM]\nepochs = 6\n'
    straight = write_grid(tmp_path / 'straight.toml', tmp_path / 'straight', *_grid_inputs(grid), extra=longer)
    grid = write_grid(grid, tmp_path / 'runs', *_grid_inputs(grid), extra=longer)
    done = subprocess.run([sys.executable, 'sweep.py', str(straight)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    results = tmp_path / 'runs'
    victim = results / 'pascal_EM_original_s0'
    process = subprocess.Popen([sys.executable, 'sweep.py', str(grid)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (victim / 'last.pt').exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(2)  # the orphaned run gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and exits
    assert records.run_status(victim).state == 'interrupted'
    finished = {n: (results / n / 'log.json').stat().st_mtime_ns for n in ('pascal_an_original_s0', 'pascal_an_original_s1')}
    again = subprocess.run([sys.executable, 'sweep.py', str(grid)], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert 'summary: 2 done, 1 resumed, 3 started, 0 failed' in again.stdout
    assert {n: (results / n / 'log.json').stat().st_mtime_ns for n in finished} == finished
    assert logs_of(results) == logs_of(tmp_path / 'straight')
    for out, folder in (('p1', results), ('p2', tmp_path / 'straight')):
        assert subprocess.run([sys.executable, 'report.py', '--paper', str(folder), '--out', str(tmp_path / out)],
                              cwd=REPO_ROOT, capture_output=True).returncode == 0
    assert (tmp_path / 'p1' / 'paper.csv').read_text() == (tmp_path / 'p2' / 'paper.csv').read_text()


# ----------------------------------------------------------------------------------------------
# SLURM through submitit (no cluster here: a fake sbatch catches the script submitit writes)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'sbatch').write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "Submitted batch job 4242"\n')
    (bin_dir / 'srun').write_text('#!/bin/sh\nexit 0\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('SBATCH_CAPTURE', str(tmp_path / 'submitted.sh'))
    return tmp_path / 'submitted.sh'


def test_slurm_submission_is_one_requeueable_job_array(grid, tmp_path, fake_slurm, capsys):
    rc = sweep.main([str(grid), '--executor', 'slurm', '--partition', 'gpu', '--time', '720', '--gpus-per-node', '2',
                     '--cpus-per-task', '16', '--mem-gb', '64', '--array-parallelism', '3', '--account', 'lab',
                     '--slurm-setup', 'source .venv/bin/activate'])
    assert rc == 0
    out = capsys.readouterr().out
    assert 'submitted job array 4242: 6 tasks' in out and 'summary: 0 done, 0 resumed, 0 started, 0 failed, 6 submitted' in out
    script = fake_slurm.read_text()
    for line in ('#SBATCH --array=0-5%3', '#SBATCH --partition=gpu', '#SBATCH --time=720', '#SBATCH --gpus-per-node=2',
                 '#SBATCH --ntasks-per-node=2', '#SBATCH --cpus-per-task=16', '#SBATCH --mem=64GB',
                 '#SBATCH --account=lab', '#SBATCH --requeue', '#SBATCH --signal=USR2@90', '#SBATCH --job-name=table',
                 'source .venv/bin/activate', f'export PYTHONPATH={REPO_ROOT}' + '${PYTHONPATH:+:$PYTHONPATH}',
                 'export SUBMITIT_EXECUTOR=slurm'):
        assert line in script.splitlines(), line
    assert ' -m submitit.core._submit ' in script and script.splitlines()[-1].startswith('srun ')
    # each array task is the pickled call SweepTask()(spec) of one run, in grid order
    folder = tmp_path / 'runs' / 'slurm'
    from submitit.core.utils import DelayedSubmission

    delayed = [DelayedSubmission.load(folder / f'4242_{i}_submitted.pkl') for i in range(6)]
    assert all(type(d.function).__module__ == 'sweep_executors' and type(d.function).__name__ == 'SweepTask'
               for d in delayed)
    assert [d.args[0].name for d in delayed] == [s.name for s in sweep_grid.expand(sweep_grid.read_grid(grid))]
    assert json.loads((tmp_path / 'runs' / 'sweep.json').read_text())['runs'][5]['name'] == 'pascal_EM_PL_original_s1'


@pytest.mark.parametrize('flags, wanted', [([], ['#SBATCH --gpus-per-node=1', '#SBATCH --ntasks-per-node=1']),
                                           (['--gpus-per-run', '2'], ['#SBATCH --gpus-per-node=2']),
                                           (['--gpus-per-node', '0'], ['#SBATCH --ntasks-per-node=1'])])
def test_slurm_tasks_ask_for_gpus_from_a_node_without_one(grid, tmp_path, fake_slurm, monkeypatch, flags, wanted):
    """A login node has no GPU: the tasks still ask for --gpus-per-run of them (the default once
    depended on the submitting node's GPUs, so a sweep from a login node trained on CPUs); 0 asks for none."""
    monkeypatch.setattr(sweep, 'visible_gpus', lambda: [])
    assert sweep.main([str(grid), '--executor', 'slurm', *flags]) == 0
    lines = fake_slurm.read_text().splitlines()
    assert all(line in lines for line in wanted), lines
    assert any(line.startswith('#SBATCH --gpus-per-node') for line in lines) == (flags[-1:] != ['0'])


def test_dry_run_costs_from_official_sizes_on_the_device_of_the_runs(tmp_path, monkeypatch, capsys):
    """Before any dataset is formatted, --dry-run counts the official files' rows (config.DATASETS
    official_rows); a SLURM array that asks for GPUs is costed with the GPU figures even from a
    node without one."""
    monkeypatch.setattr(sweep, 'visible_gpus', lambda: [])
    monkeypatch.setattr(sweep, 'load_figures', lambda: [
        {'device': 'cpu', 'model': 'resnet50', 'image_size': 448, 'train_s_per_image': 2.0, 'eval_s_per_image': 0.5,
         'command': 'cpu bench'},
        {'device': 'cuda', 'model': 'resnet50', 'image_size': 448, 'train_s_per_image': 0.02, 'eval_s_per_image': 0.005,
         'command': 'gpu bench'}])
    grid = tmp_path / 'plan.toml'
    runs, no_data = tmp_path / 'runs', tmp_path / 'no-data'
    grid.write_text(f'methods = ["an"]\ndatasets = ["pascal"]\nseeds = [0]\nresults-dir = "{runs}"\n'
                    f'[overrides]\ndata-root = "{no_data}"\n')
    train, val, test = 5717 - 1143, 1143, 5823  # pascal: data/pascal/README.md
    for flags, seconds, bench in (([], train * 2.0 + (val + test) * 0.5, 'cpu bench'),
                                  (['--executor', 'slurm'], train * 0.02 + (val + test) * 0.005, 'gpu bench')):
        assert sweep.main([str(grid), '--dry-run', *flags]) == 0
        first = capsys.readouterr().out.splitlines()[1]
        assert f'x {sweep._hours(seconds)} = ' in first and bench in first, first
        assert 'official sizes: dataset files not found' in first
    assert not (tmp_path / 'runs').exists()


def test_preempted_task_is_checkpointed_requeued_and_resumes(grid, tmp_path, monkeypatch):
    """submitit's own preemption path (SignalHandler.checkpoint_and_try_requeue, as bound to SIGUSR2
    in the job): it calls the task's checkpoint, pickles the DelayedSubmission it returns, requeues
    the job; the requeued task resumes the run from its last.pt, to the numbers of a straight run."""
    import submitit
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths

    from conftest import interrupt_after

    spec = [s for s in sweep_grid.expand(sweep_grid.read_grid(grid)) if s.name == 'pascal_EM_PL_original_s0'][0]
    straight_spec = sweep_grid.expand(sweep_grid.read_grid(grid, str(tmp_path / 'straight')))[4]
    assert sweep_executors.SweepTask()(straight_spec)['outcome'] == 'started'

    task = sweep_executors.SweepTask()
    undo = interrupt_after(monkeypatch, 1)  # the job dies after epoch 1's checkpoint
    assert task(spec)['outcome'] == 'failed'
    undo()
    assert records.run_status(spec.run_dir).state == 'interrupted'

    for name, value in dict(SUBMITIT_EXECUTOR='slurm', SLURM_JOB_ID='4243', SLURM_ARRAY_JOB_ID='4242',
                            SLURM_ARRAY_TASK_ID='4', SLURM_PROCID='0', SLURM_NTASKS='1', SLURM_LOCALID='0',
                            SLURM_NODEID='0', SLURM_JOB_NUM_NODES='1').items():
        monkeypatch.setenv(name, value)
    env = submitit.JobEnvironment()
    requeued, exited = [], []
    monkeypatch.setattr(type(env), '_requeue', lambda self, countdown: requeued.append((self.job_id, countdown)))
    paths = JobPaths(tmp_path / 'slurm', job_id=env.job_id, task_id=0)
    paths.folder.mkdir(parents=True)
    delayed = DelayedSubmission(task, spec)
    delayed.set_timeout(720, 3)
    handler = SignalHandler(env, paths, delayed)
    monkeypatch.setattr(handler, '_exit', lambda: exited.append(True))
    handler.checkpoint_and_try_requeue(signal.SIGUSR2, None)
    assert requeued == [('4242_4', 3)] and exited == [True]  # preempted, not timed out: the countdown is kept

    again = DelayedSubmission.load(paths.submitted_pickle)  # what the requeued job runs
    assert again.args == (spec,)
    assert again.result() == {'run': spec.name, 'outcome': 'resumed', 'error': ''}
    assert json.loads(Path(spec.run_dir, 'log.json').read_text()) == \
        json.loads(Path(straight_spec.run_dir, 'log.json').read_text())
    assert DelayedSubmission.load(paths.submitted_pickle).result()['outcome'] == 'done'  # once more: nothing to do


# ----------------------------------------------------------------------------------------------
# Provenance and run status


def test_sha256_cache_hashes_once_and_notices_a_change(tmp_path, monkeypatch):
    import hashlib

    f = tmp_path / 'weights.bin'
    f.write_bytes(b'a' * 1000)
    cache = tmp_path / 'cache'
    assert records.sha256_file(f, cache) == hashlib.sha256(b'a' * 1000).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr('builtins.open', lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    assert records.sha256_file(f, cache) == hashlib.sha256(b'a' * 1000).hexdigest()
    assert str(f.resolve()) not in opened  # the cache answered
    monkeypatch.undo()
    f.write_bytes(b'b' * 1001)
    assert records.sha256_file(f, cache) == hashlib.sha256(b'b' * 1001).hexdigest()


def test_provenance_of_a_run(grid, tmp_path):
    g = write_grid(tmp_path / 'g.toml', tmp_path / 'runs', *_grid_inputs(grid), methods=('EM_PL',), seeds=(0,), epochs=1)
    assert sweep.main([str(g), '--executor', 'debug']) == 0
    p = json.loads((tmp_path / 'runs' / 'pascal_EM_PL_original_s0' / 'config.json').read_text())['record']['provenance']
    data_root, clip, text_features = _grid_inputs(grid)
    labels = data_root / 'pascal' / 'formatted_train_labels.npy'
    assert p['data_files']['formatted_train_labels.npy'] == records.sha256_file(labels)
    assert set(p['data_files']) == {'formatted_train_images.npy', 'formatted_train_labels.npy',
                                    'formatted_val_images.npy', 'formatted_val_labels.npy', 'formatted_train_labels_obs.npy'}
    assert p['clip_weights']['sha256'] == records.sha256_file(clip['checkpoint'])
    assert p['input_files']['text_features']['sha256'] == records.sha256_file(text_features)
    assert p['backbone_weights']['name'].startswith('random initialisation')
    assert (p['image_size'], p['split_seed'], p['numpy_seed'], p['recipe']) == (32, 1200, 1200, 'original')
    assert '--image-size 32' in p['recipe_overrides'] and p['git_dirty'] in (True, False)
    assert set(p['versions']) >= {'torch', 'torchvision', 'timm', 'open_clip'} and p['device_name']
    assert json.loads((tmp_path / 'cache' / records.SHA256_CACHE).read_text())  # hashes cached for the next run


def test_pretrained_weights_are_named_and_hashed_from_the_torch_cache(tmp_path, monkeypatch):
    import torch
    import torchvision

    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    assert records.published_weights_file('backbone', 'resnet50') is None
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cached = tmp_path / 'hub' / 'checkpoints' / Path(url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'weights')
    assert records.published_weights_file('backbone', 'resnet50') == str(cached)


def test_run_status(tmp_path):
    folder = tmp_path / 'run'
    assert records.run_status(folder).state == 'missing'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({'epochs': 2}))
    assert records.run_status(folder).state == 'empty'
    log = {'num_epochs': 2, 'logged': {p: [True, False] for p in ('train', 'val', 'test')}, 'best_epoch': 1,
           'best_val_map': 50.0, 'best_test_map': 40.0}
    (folder / 'log.json').write_text(json.dumps(log))
    assert records.run_status(folder) == records.RunStatus('interrupted', 1, 2, f'{folder}: 1 of 2 epochs logged')
    log['logged'] = {p: [True, True] for p in ('train', 'val', 'test')}
    (folder / 'log.json').write_text(json.dumps(log | {'best_test_map': None}))
    assert records.run_status(folder).state == 'no finite mAP'
    (folder / 'log.json').write_text(json.dumps(log))
    assert records.run_status(folder).finished
    assert records.status_of(json.loads((folder / 'config.json').read_text()), log).finished  # report.py's Run holds both
    (folder / 'config.json').write_text(json.dumps({'epochs': 3}))  # resumed for more epochs, not yet done
    assert records.run_status(folder).state == 'interrupted'


# ----------------------------------------------------------------------------------------------
# report.py --paper


def _fake_run(folder: Path, seed: int, test_map: float, provenance: dict):
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text(json.dumps({'epochs': 1, 'seed': seed, 'record': {'provenance': provenance}}))
    (folder / 'log.json').write_text(json.dumps({'num_epochs': 1, 'logged': {p: [True] for p in ('train', 'val', 'test')},
                                                 'best_epoch': 1, 'best_val_map': 1.0, 'best_test_map': test_map}))


def test_paper_table_marks_differences_missing_seeds_and_provenance(tmp_path):
    sweep_dir = tmp_path / 'table'
    runs = []
    values = {('EM_PL', 'pascal'): [89.0, 89.4, None], ('LL-R:boostlu', 'coco'): [70.0, 71.0, 72.0]}
    for (cell, dataset), maps in values.items():
        method, _, recipe = cell.partition(':')
        for seed, value in enumerate(maps):
            name = f'{dataset}_{method}_{recipe or "original"}_s{seed}'
            runs.append({'name': name, 'cell': cell, 'method': method, 'recipe': recipe or 'original',
                         'dataset': dataset, 'seed': seed})  # no argv: not compared with the grid's config
            if value is not None:
                _fake_run(sweep_dir / name, seed, value, {'git_commit': 'abc', 'data_files': {'l.npy': 'x' if seed else 'y'}})
    (sweep_dir / 'sweep.json').write_text(json.dumps({'runs': runs}))
    (sweep_dir / 'coco_LL-R_boostlu_s2' / 'log.json').write_text(json.dumps(
        {'num_epochs': 1, 'logged': {p: [False] for p in ('train', 'val', 'test')}}))  # not finished: not counted
    assert report.main(['--paper', str(sweep_dir), '--out', str(tmp_path / 'out'), '--tolerance', '1.0']) == 0
    md = (tmp_path / 'out' / 'paper.md').read_text()
    assert '| EM_PL | 89.20 ± 0.28 (n=2), missing seed 2 | 89.10 | +0.10 | — | — | — |' in md
    assert '| LL-R:boostlu | — | — | — | 70.50 ± 0.71 (n=2), missing seed 2 | 72.89 | -2.39 (!) |' in md
    assert 'coco, seed 2: interrupted (0/1 epochs)' in md
    assert '- EM_PL on pascal: `data_files.l.npy`: seed 0: y; seed 1: x' in md
    rows = {r.split(',')[0] + r.split(',')[3]: r for r in (tmp_path / 'out' / 'paper.csv').read_text().splitlines()[1:]}
    assert rows['LL-R:boostlucoco'].startswith('LL-R:boostlu,LL-R,boostlu,coco,3,2,0 1,2,70.5,0.7071')
    assert ',72.89,-2.39' in rows['LL-R:boostlucoco'] and ',1,"youngwk/BridgeGapExplanationPAMC@' in rows['LL-R:boostlucoco']
    assert (tmp_path / 'out' / 'paper.png').stat().st_size > 10_000
    assert report.main(['--paper', str(sweep_dir), '--out', str(tmp_path / 'out2'), '--tolerance', '3']) == 0
    assert '-2.39 |' in (tmp_path / 'out2' / 'paper.md').read_text()  # within 3 points: not marked


def test_paper_counts_no_run_of_another_config_than_the_grids(tmp_path, tiny_pascal, tiny_clip, tiny_text_features):
    """QA round 3: after the grid was edited, the sweep refuses the old runs, but report.py --paper
    counted them, and mixed them with new ones in one cell (lr 0.5 and 1e-3 averaged as two seeds)."""
    runs = tmp_path / 'runs'
    grid = write_grid(tmp_path / 'g.toml', runs, tiny_pascal, tiny_clip, tiny_text_features, methods=['an'],
                      seeds=[0, 1], epochs=1)
    assert sweep.main([str(grid), '--executor', 'debug']) == 0
    grid.write_text(grid.read_text().replace('lr = 1e-3', 'lr = 0.5'))
    shutil.move(runs / 'pascal_an_original_s0', tmp_path / 'moved')  # as the refusal says: s0 runs again
    assert sweep.main([str(grid), '--executor', 'debug']) == 1  # s1 refused: another config
    assert report.main(['--paper', str(runs), '--out', str(tmp_path / 'out')]) == 0
    md = (tmp_path / 'out' / 'paper.md').read_text()
    assert '# runs: 1 of 2 runs finished' in md
    assert '(n=1), missing seed 1' in md and 'pascal, seed 1: ' in md
    line = next(line for line in md.splitlines() if line.startswith('- an on pascal, seed 1: '))
    assert 'is not the run the grid asks for (lr: 0.001 -> 0.5)' in line and 'move the folder away' in line


def test_paper_compares_only_cells_that_follow_a_recipe(tmp_path):
    """A grid without a recipe runs this project's defaults: its cells get no published number
    (they were compared with the original's and marked (!))."""
    sweep_dir = tmp_path / 'table'
    _fake_run(sweep_dir / 'pascal_LL-R_defaults_s0', 0, 25.0, {})
    (sweep_dir / 'sweep.json').write_text(json.dumps({'runs': [
        {'name': 'pascal_LL-R_defaults_s0', 'cell': 'LL-R', 'method': 'LL-R', 'recipe': None, 'dataset': 'pascal',
         'seed': 0}]}))
    assert report.main(['--paper', str(sweep_dir), '--out', str(tmp_path / 'out')]) == 0
    md = (tmp_path / 'out' / 'paper.md').read_text()
    assert '| LL-R | 25.00 (n=1) | n/a | n/a |' in md  # was: | 89.20 | -64.20 (!) |
    assert 'not_applied' not in md
    config = sweep_dir / 'pascal_LL-R_defaults_s0' / 'config.json'
    config.write_text(json.dumps({**json.loads(config.read_text()), 'record': None}))  # edited by hand: was a traceback
    assert report.main(['--paper', str(sweep_dir), '--out', str(tmp_path / 'out')]) == 0


def test_paper_of_a_sweep_with_no_finished_run_draws_without_warnings(tmp_path, recwarn):
    """matplotlib warned 'No artists with labels' when the first row had nothing to draw."""
    sweep_dir = tmp_path / 'table'
    sweep_dir.mkdir()
    (sweep_dir / 'sweep.json').write_text(json.dumps({'runs': [
        {'name': 'demo_an_defaults_s0', 'cell': 'an', 'method': 'an', 'recipe': None, 'dataset': 'demo', 'seed': 0}]}))
    assert report.main(['--paper', str(sweep_dir), '--out', str(tmp_path / 'out')]) == 0
    assert 'demo, seed 0: missing' in (tmp_path / 'out' / 'paper.md').read_text()
    assert [str(w.message) for w in recwarn if 'artists' in str(w.message)] == []


def test_paper_without_a_sweep_is_one_line(tmp_path, capsys):
    assert report.main(['--paper', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert 'no sweep.json' in err and len(err.splitlines()) == 1


@pytest.mark.parametrize('value, message', [('nan', "'nan' is not a finite number"), ('-5', 'must be >= 0, got -5')])
def test_paper_tolerance_is_a_finite_number_at_least_zero(tmp_path, capsys, value, message):
    """QA round 3: nan marked nothing ('(!) beyond nan points') and a negative value marked every cell."""
    with pytest.raises(SystemExit) as exit_:
        report.main(['--paper', str(tmp_path), '--tolerance', value])
    assert exit_.value.code == 2 and f'argument --tolerance: {message}' in capsys.readouterr().err


def test_paths_in_the_way_are_one_line(grid, tmp_path, capsys):
    """QA round 3: a file as the results folder, or a file where the sweep writes a folder (logs/),
    or a folder where it writes a file (sweep.json), were tracebacks."""
    as_file = tmp_path / 'results-file'
    as_file.write_text('')
    for extra in (['--dry-run'], []):
        assert sweep.main([str(grid), '--results-dir', str(as_file), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and f'{as_file} is a file' in err
    for name, make in (('logs', lambda p: p.write_text('')), ('sweep.json', lambda p: p.mkdir())):
        results = tmp_path / f'r-{name}'
        results.mkdir()
        make(results / name)
        assert sweep.main([str(grid), '--results-dir', str(results), '--executor', 'local']) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith(f'error: {results / name}: ') and 'Traceback' not in err


def test_ctrl_c_stops_the_whole_sweep_in_one_line(grid, monkeypatch, capsys):
    """QA round 3: Ctrl-C was a traceback (local) or stopped only the current run (debug: the sweep
    went on with the next one, one Ctrl-C per run)."""
    calls = []

    def interrupted(argv):
        calls.append(argv)
        return 130, 'interrupted'
    monkeypatch.setattr(sweep_executors, 'run_in_process', interrupted)
    assert sweep.main([str(grid), '--executor', 'debug']) == 130
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert err == 'interrupted: run the same command again (finished runs are skipped, the others resumed)\n'

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep, 'execute_local', ctrl_c)
    assert sweep.main([str(grid), '--executor', 'local']) == 130
    assert capsys.readouterr().err.startswith('interrupted: ')

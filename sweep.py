"""Run a table of experiments: methods x datasets x seeds, one run folder each, on this machine or
on SLURM through submitit. The sweep only names runs, starts or resumes them with main_clip.py
and reads their folders; it is not a scheduler.

    python sweep.py grids/table1.toml --dry-run            # the plan, what is finished, the cost
    python sweep.py grids/table1.toml                      # here: one run after another, or one per GPU
    python sweep.py grids/table1.toml --executor slurm --partition gpu --gpus-per-node 1 --time 720
    python report.py --paper results/table1                # the table beside the published numbers

GRID is a TOML file (docs/sweeps.md):

    methods = ["an", "EM", "EM_PL", "LL-R", "LL-R:boostlu", "role:linear-init"]   # -l[:recipe]
    datasets = ["pascal", "coco", "nuswide", "cub"]
    seeds = [0, 1, 2]
    recipe = "original"            # recipes/<METHOD>.toml; "" = this project's defaults
    results-dir = "results/table1" # default: results/<GRID file name>
    [overrides]                    # main_clip.py flags for every run (no dashes); a table named
    num-workers = 8                # after a dataset or method holds flags for those runs only

Every run is `main_clip.py -d D -l M -s S [--recipe R] <overrides> --results-dir DIR --run-name
D_M_R_sS`. Running the same sweep again skips finished runs (records.run_status, and their
config equal to the grid's), resumes interrupted ones from their last.pt (--resume), and refuses
a folder that holds another configuration; the summary counts done, resumed, started, failed.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from config import DATASETS, REPO_ROOT, UserError, VLPLError, one_line
from files import save_json

EXECUTORS = ('local', 'slurm', 'debug')
GRID_KEYS = {'methods', 'datasets', 'seeds', 'recipe', 'results-dir', 'overrides'}
SWEEP_FILE = 'sweep.json'      # the plan, in the results folder: report.py --paper reads it
FIGURES = REPO_ROOT / 'bench' / 'figures.json'


class SweepError(UserError):
    """A bad grid or sweep flag (one line naming the file or flag)."""


# ----------------------------------------------------------------------------------------------
# The grid and its runs


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: its stable name and its main_clip.py arguments."""
    name: str
    method: str
    recipe: Optional[str]
    dataset: str
    seed: int
    argv: tuple
    run_dir: str

    @property
    def cell(self) -> str:
        """The table row: the method, and the recipe when it is not the grid's plain 'original'."""
        return self.method if self.recipe in (None, 'original') else f'{self.method}:{self.recipe}'


@dataclass
class Grid:
    methods: list
    datasets: list
    seeds: list
    recipe: Optional[str]
    results_dir: Path
    overrides: dict
    file: Path


def _flags(table: dict, where: str) -> list[str]:
    """main_clip.py arguments from a table of flag values (recipes' format: true = the bare flag)."""
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            continue
        if key.startswith('-'):
            raise SweepError(f'{where}: write flags without dashes ({key!r} -> {key.lstrip("-")!r})')
        if value is True:
            out.append(f'--{key}')
        elif value is False:
            continue
        elif isinstance(value, list):
            out += [f'--{key}', *map(str, value)]
        else:
            out += [f'--{key}', str(value)]
    return out


def read_grid(path, results_dir: Optional[str] = None) -> Grid:
    """The grid file, checked: SweepError names the file and the key of anything wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f'{path}: no such grid file (docs/sweeps.md shows one)') from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SweepError(f'{path}: not a readable TOML grid ({one_line(e)})') from None
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise SweepError(f'{path}: unknown keys {unknown}; a grid has {", ".join(sorted(GRID_KEYS))}')
    for key in ('methods', 'datasets', 'seeds'):
        if not isinstance(data.get(key), list) or not data[key]:
            raise SweepError(f'{path}: {key} must be a non-empty list')
    import methods as methods_module
    import main_clip  # noqa: F401  registers every method

    for m in data['methods']:
        name = str(m).split(':', 1)[0]
        if name not in methods_module.METHODS:
            raise SweepError(f'{path}: methods: unknown method {name!r} (main_clip.py --help lists them)')
    for d in data['datasets']:
        if d not in DATASETS:
            raise SweepError(f'{path}: datasets: unknown dataset {d!r}; one of {", ".join(DATASETS)}')
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in data['seeds']):
        raise SweepError(f'{path}: seeds must be integers')
    overrides = data.get('overrides', {})
    if not isinstance(overrides, dict):
        raise SweepError(f'{path}: overrides must be a table of main_clip.py flags')
    for key, value in overrides.items():
        if isinstance(value, dict) and key not in DATASETS and key not in methods_module.METHODS:
            raise SweepError(f'{path}: overrides.{key}: a sub-table must be named after a dataset or a method')
    folder = results_dir or data.get('results-dir') or str(REPO_ROOT / 'results' / path.stem)
    recipe = data.get('recipe') or None
    return Grid(list(data['methods']), list(data['datasets']), list(data['seeds']), recipe, Path(folder),
                overrides, path)


def expand(grid: Grid) -> list[RunSpec]:
    """Every (method, dataset, seed) of the grid as a RunSpec, in grid order; the name
    <dataset>_<method>_<recipe or 'defaults'>_s<seed> is stable across invocations."""
    specs = []
    for entry in grid.methods:
        method, _, recipe = str(entry).partition(':')
        recipe = recipe or grid.recipe
        for dataset in grid.datasets:
            extra = (_flags(grid.overrides, f'{grid.file} overrides')
                     + _flags(grid.overrides.get(dataset, {}), f'{grid.file} overrides.{dataset}')
                     + _flags(grid.overrides.get(method, {}), f'{grid.file} overrides.{method}'))
            for seed in grid.seeds:
                name = f'{dataset}_{method}_{recipe or "defaults"}_s{seed}'
                argv = ['-d', dataset, '-l', method, '-s', str(seed)] + (['--recipe', recipe] if recipe else [])
                argv += extra + ['--results-dir', str(grid.results_dir), '--run-name', name]
                specs.append(RunSpec(name, method, recipe, dataset, int(seed), tuple(argv),
                                     str(grid.results_dir / name)))
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SweepError(f'{grid.file}: the grid names some runs twice ({", ".join(twice[:3])}): '
                         'list each method, dataset and seed once')
    return specs


# ----------------------------------------------------------------------------------------------
# What to do with each run


@dataclass
class Action:
    """kind: 'done' (finished, same config), 'resume' (last.pt, same config), 'start', 'refuse'
    (the folder holds another config, or the flags are wrong); why: one line."""
    kind: str
    why: str = ''
    epochs_done: int = 0
    epochs: Optional[int] = None


def _parse(argv) -> tuple:
    """main_clip.parse_args without its exit: (Config, None) or (None, the one-line error)."""
    import main_clip

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg, _ = main_clip.parse_args(list(argv))
        return cfg, None
    except SystemExit:
        text = err.getvalue().strip().splitlines()
        return None, (text[-1] if text else 'main_clip.py refused the flags').replace('main_clip.py: error: ', '')
    except VLPLError as e:
        return None, one_line(e)


def _tuples(value):
    """JSON lists back to the tuples Config holds (config.json stores them as lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def plan(spec: RunSpec) -> Action:
    """What the sweep does with one run, from its folder alone (records.run_status)."""
    import records
    from checkpoints import config_differences

    cfg, problem = _parse(spec.argv)
    if problem:
        return Action('refuse', f'{spec.name}: {problem}')
    folder = Path(cfg.run_dir)
    status = records.run_status(folder)
    if status.state == 'missing':
        return Action('start', epochs=cfg.epochs)
    saved = records.json_or_none(folder / 'config.json')
    if saved is not None:
        diffs = config_differences({k: _tuples(v) for k, v in saved.items() if k != 'record'}, cfg)
        if diffs:
            return Action('refuse', f'{folder} holds another config ({"; ".join(diffs)[:300]}): move it away or '
                                    'change the grid', status.epochs_done, status.epochs)
    if status.finished:
        return Action('done', epochs_done=status.epochs_done, epochs=cfg.epochs)
    if (folder / 'last.pt').is_file():
        return Action('resume', f'after epoch {status.epochs_done}', status.epochs_done, cfg.epochs)
    return Action('start', 'its folder holds no complete epoch', 0, cfg.epochs)


def run_argv(spec: RunSpec, action: Action) -> list[str]:
    """main_clip.py arguments of the run: the grid's flags, and --resume for an interrupted one."""
    return list(spec.argv) + (['--resume', spec.run_dir] if action.kind == 'resume' else [])


# ----------------------------------------------------------------------------------------------
# Executors


@dataclass
class Outcome:
    spec: RunSpec
    kind: str            # 'done', 'resumed', 'started', 'failed', 'refused', 'submitted'
    error: str = ''      # the failed run's last error line


class _ErrorLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines = []

    def emit(self, record):
        self.lines += [line for line in self.format(record).splitlines() if line.strip()]


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """main_clip.main in this process; (exit status, its last error line)."""
    import main_clip
    from distributed import log

    catcher = _ErrorLines()
    log.addHandler(catcher)
    try:
        rc = main_clip.main(list(argv))
    finally:
        log.removeHandler(catcher)
    return rc, (catcher.lines[-1] if catcher.lines else '')


def last_error_line(log_path: Path, start: int = 0) -> str:
    """The last 'error:' line a run printed after byte `start` of its log (else its last line)."""
    try:
        with open(log_path, 'rb') as handle:
            handle.seek(start)
            text = handle.read().decode('utf-8', 'replace')
    except OSError:
        return ''
    lines = [line.strip() for line in text.replace('\r', '\n').splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:') or 'Error' in line.split(':')[0]]
    return (errors or lines or [''])[-1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the sweep process dies, however it dies (Linux
    prctl PR_SET_PDEATHSIG), so that a killed sweep leaves no run behind holding its folder."""
    try:
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (CUDA_VISIBLE_DEVICES order), [] without CUDA."""
    env = os.environ.get('CUDA_VISIBLE_DEVICES')
    if env is not None:
        return [g.strip() for g in env.split(',') if g.strip() and g.strip() != '-1']
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def local_command(argv: list[str], gpus_per_run: int, python: str) -> list[str]:
    script = str(REPO_ROOT / 'main_clip.py')
    if gpus_per_run > 1:  # one process group per run (docs/distributed.md)
        return [python, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={gpus_per_run}',
                script, *argv]
    return [python, script, *argv]


def execute_local(work: list, sweep_dir: Path, *, gpus_per_run: int = 1, python: str = sys.executable,
                  say=print) -> list[Outcome]:
    """Each run a main_clip.py process, its output in <sweep_dir>/logs/<name>.log; one at a time,
    or one per group of gpus_per_run visible GPUs at once."""
    gpus = visible_gpus()
    slots = [gpus[i:i + gpus_per_run] for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)] or [None]
    logs = sweep_dir / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, outcomes = list(work), {}, []
    while pending or running:
        free = [i for i in range(len(slots)) if i not in running]
        while pending and free:
            spec, action = pending.pop(0)
            slot = free.pop(0)
            env = dict(os.environ)
            if slots[slot] is not None:
                env['CUDA_VISIBLE_DEVICES'] = ','.join(slots[slot])
            log_path = logs / f'{spec.name}.log'
            handle = open(log_path, 'ab')
            start = handle.tell()
            command = local_command(run_argv(spec, action), gpus_per_run, python)
            handle.write(f'\n$ {shlex.join(command)}\n'.encode())
            handle.flush()
            say(f'{"resume" if action.kind == "resume" else "start"} {spec.name}'
                + (f' on GPU {",".join(slots[slot])}' if slots[slot] else '') + f' (log: {log_path})')
            try:
                process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                           preexec_fn=_die_with_parent if sys.platform.startswith('linux') else None)
            except OSError as e:  # the interpreter or torchrun cannot be started
                handle.close()
                outcomes.append(Outcome(spec, 'failed', f'cannot start {command[0]}: {e.strerror or e}'))
                continue
            running[slot] = (spec, action, process, handle, log_path, start)
        time.sleep(0.2)
        for slot, (spec, action, process, handle, log_path, start) in list(running.items()):
            if process.poll() is None:
                continue
            handle.close()
            del running[slot]
            if process.returncode == 0:
                outcomes.append(Outcome(spec, 'resumed' if action.kind == 'resume' else 'started'))
            else:
                outcomes.append(Outcome(spec, 'failed', last_error_line(log_path, start)
                                        or f'exit status {process.returncode}'))
            say(f'{outcomes[-1].kind} {spec.name}' + (f': {outcomes[-1].error}' if outcomes[-1].error else ''))
    return outcomes


def execute_debug(work: list, sweep_dir: Path, say=print) -> list[Outcome]:
    """Each run in this process, one after another (for tests and debugging)."""
    outcomes = []
    for spec, action in work:
        say(f'{"resume" if action.kind == "resume" else "start"} {spec.name} (in process)')
        rc, error = run_in_process(run_argv(spec, action))
        kind = 'failed' if rc != 0 else ('resumed' if action.kind == 'resume' else 'started')
        outcomes.append(Outcome(spec, kind, error or (f'exit status {rc}' if rc else '')))
        say(f'{kind} {spec.name}' + (f': {outcomes[-1].error}' if kind == 'failed' else ''))
    return outcomes


class SweepTask:
    """What one SLURM array task runs: the run of its RunSpec, decided from its folder at the time
    the task starts (so a requeued task resumes from its own last.pt, and a finished one is
    skipped). submitit calls `checkpoint` on preemption or timeout (SIGUSR2) and requeues the
    DelayedSubmission it returns: the same task, which then finds last.pt and resumes."""

    def __call__(self, spec: RunSpec) -> dict:
        if os.environ.get('SUBMITIT_EXECUTOR') == 'slurm' and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
            # A multi-GPU cell: one srun task per GPU, joined into one process group through the
            # address submitit derives from the job (main_clip reads SLURM_PROCID / SLURM_NTASKS).
            import submitit.helpers

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        action = plan(spec)
        if action.kind == 'done':
            return {'run': spec.name, 'outcome': 'done', 'error': ''}
        if action.kind == 'refuse':
            return {'run': spec.name, 'outcome': 'refused', 'error': action.why}
        rc, error = run_in_process(run_argv(spec, action))
        outcome = 'failed' if rc else ('resumed' if action.kind == 'resume' else 'started')
        return {'run': spec.name, 'outcome': outcome, 'error': error or (f'exit status {rc}' if rc else '')}

    def checkpoint(self, spec: RunSpec):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, spec)  # the run's own last.pt is the checkpoint


SLURM_FLAGS = {  # sweep.py flag -> submitit SlurmExecutor parameter
    'partition': 'partition', 'time': 'time', 'gpus_per_node': 'gpus_per_node', 'cpus_per_task': 'cpus_per_task',
    'mem_gb': 'mem', 'nodes': 'nodes', 'account': 'account', 'qos': 'qos', 'constraint': 'constraint',
    'exclude': 'exclude', 'array_parallelism': 'array_parallelism', 'job_name': 'job_name',
}


def slurm_executor(args, folder: Path):
    """submitit's SlurmExecutor with the sweep's flags: one job array, `--requeue` so that a
    preempted or timed-out task goes back to the queue, and one srun task per GPU of a cell."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=args.max_requeues)
    params = {target: getattr(args, name) for name, target in SLURM_FLAGS.items() if getattr(args, name) is not None}
    if 'mem' in params:  # sbatch --mem takes a unit
        gb = float(params['mem'])
        params['mem'] = f'{int(gb)}GB' if gb.is_integer() else f'{int(gb * 1024)}MB'
    gpus = params.get('gpus_per_node') or 0
    params['ntasks_per_node'] = max(1, gpus)   # each task one process of the run's group (srun)
    params['additional_parameters'] = {'requeue': True}
    # The job unpickles sweep.SweepTask: the repository must be importable wherever it starts.
    params['setup'] = list(args.slurm_setup or []) + [f'export PYTHONPATH={shlex.quote(str(REPO_ROOT))}'
                                                      '${PYTHONPATH:+:$PYTHONPATH}']
    executor.update_parameters(**params)
    return executor


def execute_slurm(work: list, sweep_dir: Path, args, say=print) -> list[Outcome]:
    """One job array of every run that is not finished; with --wait, the tasks' outcomes."""
    folder = Path(args.slurm_folder or sweep_dir / 'slurm')
    executor = slurm_executor(args, folder)
    specs = [spec for spec, _ in work]
    jobs = executor.map_array(SweepTask(), specs)
    array_id = jobs[0].job_id.split('_')[0] if jobs else '?'
    say(f'submitted job array {array_id}: {len(jobs)} tasks (sbatch script and logs in {folder})')
    if not args.wait:
        return [Outcome(spec, 'submitted') for spec in specs]
    outcomes = []
    for spec, job in zip(specs, jobs):
        try:
            result = job.result()
            outcomes.append(Outcome(spec, result['outcome'], result.get('error', '')))
        except Exception as e:  # the task died: submitit's error names it
            outcomes.append(Outcome(spec, 'failed', one_line(e)[:300]))
    return outcomes


# ----------------------------------------------------------------------------------------------
# Cost estimate


def _train_val_test_sizes(data_root: str, dataset: str) -> Optional[tuple[int, int, int]]:
    """(train, val, test) image counts of a formatted dataset, from its files (memory-mapped)."""
    import numpy as np
    import datasets

    folder = Path(data_root) / dataset
    try:
        n_train = np.load(folder / 'formatted_train_images.npy', mmap_mode='r', allow_pickle=False).shape[0]
        n_test = np.load(folder / 'formatted_val_images.npy', mmap_mode='r', allow_pickle=False).shape[0]
    except (OSError, ValueError):
        return None
    n_val = int(round(datasets.VAL_FRACTION * n_train))
    return n_train - n_val, n_val, n_test


def load_figures(path: Path = FIGURES) -> list[dict]:
    try:
        return json.loads(Path(path).read_text()).get('figures', [])
    except (OSError, ValueError, AttributeError):
        return []


def epoch_seconds(cfg, sweep_dir: Path, figures: list[dict]) -> tuple[Optional[float], str]:
    """Seconds per epoch of a run and where the figure comes from: the measured epochs of runs of
    this sweep with the same dataset, method, backbone, input size and batch (config.json's
    record), else the bench figures (seconds per image of a backbone at a size, bench/figures.json)
    times the dataset's image counts."""
    measured = []
    for other in sorted(sweep_dir.glob('*/config.json')):
        saved = json.loads(other.read_text()) if other.is_file() else {}
        same = all(saved.get(k) == getattr(cfg, k) for k in ('dataset', 'loss', 'model', 'image_size', 'batch_size',
                                                              'head', 'recipe'))
        seconds = saved.get('record', {}).get('epoch_seconds', {})
        if same and seconds:
            measured += [float(v) for v in seconds.values()]
    if measured:
        return sum(measured) / len(measured), f'measured: {len(measured)} epochs of this sweep'
    sizes = _train_val_test_sizes(cfg.data_root, cfg.dataset)
    device = 'cuda' if visible_gpus() and cfg.device != 'cpu' else 'cpu'
    for fig in figures:
        if (fig.get('device') == device and fig.get('model') == cfg.model and fig.get('image_size') == cfg.image_size
                and sizes is not None):
            train, val, test = sizes
            seconds = train * fig['train_s_per_image'] + (val + test) * fig['eval_s_per_image']
            return seconds, f'bench: {fig["command"]} ({fig.get("machine", "")})'
    return None, ('no figure: run one epoch first, or add a bench/figures.json row for '
                  f'{device} {cfg.model} at {cfg.image_size} px' + ('' if sizes else ' (dataset files not found)'))


def _hours(seconds: float) -> str:
    return f'{seconds / 3600:.1f} h' if seconds >= 3600 else f'{seconds / 60:.1f} min'


# ----------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='Run methods x datasets x seeds (a GRID file, docs/sweeps.md) with main_clip.py: finished runs '
                    'are skipped, interrupted ones resumed; local processes, SLURM (submitit) or in process.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('grid', metavar='GRID', help='TOML file: methods, datasets, seeds, recipe, overrides')
    p.add_argument('--executor', default='local', choices=EXECUTORS,
                   help='local: main_clip.py processes here, one at a time or one per visible GPU; slurm: one '
                        'job array through submitit; debug: in this process, one after another')
    p.add_argument('--dry-run', action='store_true',
                   help='print the plan, the finished runs and the estimated cost, and run nothing')
    p.add_argument('--results-dir', default=None, help="the sweep's folder of run folders (default: the grid's "
                                                        'results-dir, else results/<GRID name>)')
    p.add_argument('--gpus-per-run', type=int, default=1,
                   help='GPUs of one run (local: torchrun --nproc_per_node; slurm: --gpus-per-node)')
    g = p.add_argument_group('slurm (passed to submitit\'s SlurmExecutor)')
    g.add_argument('--partition', default=None)
    g.add_argument('--time', type=int, default=None, help='minutes per task')
    g.add_argument('--gpus-per-node', type=int, default=None, help='GPUs per task (default: --gpus-per-run)')
    g.add_argument('--cpus-per-task', type=int, default=None)
    g.add_argument('--mem-gb', type=float, default=None)
    g.add_argument('--nodes', type=int, default=None)
    g.add_argument('--account', default=None)
    g.add_argument('--qos', default=None)
    g.add_argument('--constraint', default=None)
    g.add_argument('--exclude', default=None)
    g.add_argument('--job-name', default=None, help='default: the grid file name')
    g.add_argument('--array-parallelism', type=int, default=None, help='tasks of the array running at once')
    g.add_argument('--max-requeues', type=int, default=3, help='requeues after timeouts (preemptions do not count)')
    g.add_argument('--slurm-setup', action='append', default=None, metavar='COMMAND',
                   help='a shell line run before srun in the sbatch script (e.g. "source .venv/bin/activate")')
    g.add_argument('--slurm-folder', default=None, help='sbatch scripts, pickles and logs (default: <results>/slurm)')
    g.add_argument('--wait', action='store_true', help='wait for the array and print the summary')
    return p


def summary(outcomes: list[Outcome], done: int, refused: list[tuple[RunSpec, Action]]) -> list[str]:
    counts = {k: sum(o.kind == k for o in outcomes) for k in ('resumed', 'started', 'failed', 'submitted')}
    done += sum(o.kind == 'done' for o in outcomes)
    refused_n = len(refused) + sum(o.kind == 'refused' for o in outcomes)
    head = (f'summary: {done} done, {counts["resumed"]} resumed, {counts["started"]} started, '
            f'{counts["failed"] + refused_n} failed' + (f' ({refused_n} refused)' if refused_n else ''))
    if counts['submitted']:
        head += f', {counts["submitted"]} submitted'
    lines = [head]
    lines += [f'  refused {spec.name}: {action.why}' for spec, action in refused]
    lines += [f'  failed {o.spec.name}: {o.error}' for o in outcomes if o.kind in ('failed', 'refused')]
    return lines


def write_plan(grid: Grid, specs: list[RunSpec]) -> None:
    """<results>/sweep.json: the grid and every run's name, cell and arguments (report.py --paper)."""
    save_json(grid.results_dir / SWEEP_FILE, {
        'grid': str(grid.file), 'recipe': grid.recipe, 'methods': grid.methods, 'datasets': grid.datasets,
        'seeds': grid.seeds,
        'runs': [{'name': s.name, 'cell': s.cell, 'method': s.method, 'recipe': s.recipe, 'dataset': s.dataset,
                  'seed': s.seed, 'argv': list(s.argv)} for s in specs]})


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.gpus_per_run < 1:
            raise SweepError('--gpus-per-run must be >= 1')
        if args.gpus_per_node is None and args.executor == 'slurm':
            args.gpus_per_node = args.gpus_per_run if visible_gpus() or args.gpus_per_run > 1 else None
        if args.job_name is None:
            args.job_name = Path(args.grid).stem
        grid = read_grid(args.grid, args.results_dir)
        specs = expand(grid)
        plans = [(spec, plan(spec)) for spec in specs]
        done = [(s, a) for s, a in plans if a.kind == 'done']
        refused = [(s, a) for s, a in plans if a.kind == 'refuse']
        work = [(s, a) for s, a in plans if a.kind in ('start', 'resume')]
        if args.dry_run:
            return dry_run(grid, plans)
        grid.results_dir.mkdir(parents=True, exist_ok=True)
        write_plan(grid, specs)
        for spec, action in refused:
            print(f'refused {spec.name}: {action.why}')
        print(f'{len(specs)} runs in {grid.results_dir}: {len(done)} finished, {len(work)} to run '
              f'({sum(a.kind == "resume" for _, a in work)} to resume), {len(refused)} refused')
        if args.executor == 'debug':
            outcomes = execute_debug(work, grid.results_dir)
        elif args.executor == 'local':
            outcomes = execute_local(work, grid.results_dir, gpus_per_run=args.gpus_per_run)
        else:
            outcomes = execute_slurm(work, grid.results_dir, args) if work else []
        lines = summary(outcomes, len(done), refused)
        print('\n'.join(lines))
        if any(o.kind == 'submitted' for o in outcomes):
            print('run the same command again when the array has ended: finished runs are skipped, the others '
                  'resumed; then python report.py --paper ' + shlex.quote(str(grid.results_dir)))
        return 0 if not refused and not any(o.kind in ('failed', 'refused') for o in outcomes) else 1
    except VLPLError as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 2


def dry_run(grid: Grid, plans: list) -> int:
    """The plan: every run with what would happen to it, and the cost of what is left."""
    figures = load_figures()
    total, unknown = 0.0, 0
    print(f'sweep {grid.file} -> {grid.results_dir}: {len(plans)} runs')
    for spec, action in plans:
        line = f'  {action.kind:7s} {spec.name}'
        if action.kind in ('start', 'resume'):
            cfg, _ = _parse(spec.argv)
            seconds, where = epoch_seconds(cfg, grid.results_dir, figures)
            left = (cfg.epochs - action.epochs_done)
            if seconds is None:
                unknown += 1
                line += f'  ({left} epochs; cost unknown: {where})'
            else:
                total += seconds * left
                line += f'  ({left} epochs x {_hours(seconds)} = {_hours(seconds * left)}; {where})'
            if action.kind == 'resume':
                line += f'  [{action.why}]'
        elif action.why:
            line += f'  [{action.why}]'
        print(line)
        if action.kind in ('start', 'resume'):
            print('      python main_clip.py ' + shlex.join(run_argv(spec, action)))
    kinds = [a.kind for _, a in plans]
    print(f'{kinds.count("done")} finished, {kinds.count("resume")} to resume, {kinds.count("start")} to start, '
          f'{kinds.count("refuse")} refused')
    left = sum(a.kind in ('start', 'resume') for _, a in plans)
    if left and unknown == left:
        print(f'estimated cost of what is left: unknown (no figure for any of the {left} runs)')
    else:
        print(f'estimated cost of what is left: {_hours(total)} of one device'
              + (f' (+ {unknown} runs without a figure)' if unknown else ''))
    return 0


if __name__ == '__main__':
    # Run as the module `sweep`, not `__main__`, so that the tasks submitit pickles refer to
    # sweep.SweepTask and sweep.RunSpec, which the job imports from the repository.
    import sweep

    sys.exit(sweep.main())

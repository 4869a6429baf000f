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
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

from config import DATASETS, REPO_ROOT, VLPLError, one_line
from files import claim_lock, try_lock
from sweep_executors import execute_debug, execute_local, execute_slurm, visible_gpus
from sweep_grid import Grid, SweepError, expand, read_grid, write_plan
from sweep_state import parse_run_argv, plan, run_argv, summary

EXECUTORS = ('local', 'slurm', 'debug')
FIGURES = REPO_ROOT / 'bench' / 'figures.json'


# ----------------------------------------------------------------------------------------------
# Cost estimate


def _train_val_test_sizes(data_root: str, dataset: str) -> tuple[Optional[tuple[int, int, int]], str]:
    """(train, val, test) image counts of a dataset and where they come from: its formatted files
    (memory-mapped), else the official files' counts (config.DATASETS official_rows); None if neither."""
    import numpy as np
    import datasets

    folder = Path(data_root) / dataset
    try:
        n_train = np.load(folder / 'formatted_train_images.npy', mmap_mode='r', allow_pickle=False).shape[0]
        n_test = np.load(folder / 'formatted_val_images.npy', mmap_mode='r', allow_pickle=False).shape[0]
        source = 'its files'
    except (OSError, ValueError):
        row = DATASETS.get(dataset)
        if row is None or row.official_rows is None:
            return None, 'dataset files not found'
        (n_train, n_test), source = row.official_rows, 'official sizes: dataset files not found'
    n_val = int(round(datasets.VAL_FRACTION * n_train))
    return (n_train - n_val, n_val, n_test), source


def load_figures(path: Path = FIGURES) -> list[dict]:
    try:
        return json.loads(Path(path).read_text()).get('figures', [])
    except (OSError, ValueError, AttributeError):
        return []


def epoch_seconds(cfg, sweep_dir: Path, figures: list[dict], device: Optional[str] = None
                  ) -> tuple[Optional[float], str]:
    """Seconds per epoch of a run and where the figure comes from: the measured epochs of runs of
    this sweep with the same dataset, method, backbone, input size and batch (config.json's
    record), else the bench figures (seconds per image of a backbone at a size, bench/figures.json)
    times the dataset's image counts. device: where the runs will train ('cuda' for a SLURM array
    that asks for GPUs); default: here ('cuda' if a GPU is visible and the run does not ask for cpu)."""
    import records

    measured = []
    for other in sorted(sweep_dir.glob('*/config.json')):
        saved = records.json_or_none(other) or {}  # a damaged one is named by that run's own plan line
        same = all(saved.get(k) == getattr(cfg, k) for k in ('dataset', 'loss', 'model', 'image_size', 'batch_size',
                                                              'head', 'recipe'))
        record = saved.get('record')
        seconds = record.get('epoch_seconds') if isinstance(record, dict) else None
        if same and isinstance(seconds, dict) and seconds:
            measured += [float(v) for v in seconds.values()]
    if measured:
        return sum(measured) / len(measured), f'measured: {len(measured)} epochs of this sweep'
    sizes, counted = _train_val_test_sizes(cfg.data_root, cfg.dataset)
    if cfg.device == 'cpu':
        device = 'cpu'
    elif device is None:
        device = 'cuda' if visible_gpus() else 'cpu'
    for fig in figures:
        if (fig.get('device') == device and fig.get('model') == cfg.model and fig.get('image_size') == cfg.image_size
                and sizes is not None):
            train, val, test = sizes
            seconds = train * fig['train_s_per_image'] + (val + test) * fig['eval_s_per_image']
            images = '' if counted == 'its files' else f'; {counted}'
            return seconds, f'bench: {fig["command"]} ({fig.get("machine", "")}{images})'
    return None, ('no figure: run one epoch first, or add a bench/figures.json row for '
                  f'{device} {cfg.model} at {cfg.image_size} px' + ('' if sizes else f' ({counted})'))


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
    g.add_argument('--gpus-per-node', type=int, default=None,
                   help='GPUs per task (default: --gpus-per-run; 0: no GPU, on a CPU-only cluster)')
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


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.gpus_per_run < 1:
            raise SweepError('--gpus-per-run must be >= 1')
        if args.gpus_per_node is None and args.executor == 'slurm':
            # The runs train on GPUs, whether or not the submitting (login) node has one; a CPU-only
            # cluster says --gpus-per-node 0.
            args.gpus_per_node = args.gpus_per_run
        if args.gpus_per_node is not None and args.gpus_per_node < 0:
            raise SweepError('--gpus-per-node must be >= 0 (0: the tasks ask for no GPU)')
        if args.job_name is None:
            args.job_name = Path(args.grid).stem
        grid = read_grid(args.grid, args.results_dir)
        if grid.results_dir.exists() and not grid.results_dir.is_dir():
            raise SweepError(f'{grid.results_dir} is a file: the results folder (--results-dir, or the grid\'s '
                             'results-dir) holds the run folders; name another')
        specs = expand(grid)
        plans = [(spec, plan(spec)) for spec in specs]
        done = [(s, a) for s, a in plans if a.kind == 'done']
        refused = [(s, a) for s, a in plans if a.kind == 'refuse']
        work = [(s, a) for s, a in plans if a.kind in ('start', 'resume')]
        if args.dry_run:
            device = None if args.executor != 'slurm' else ('cuda' if args.gpus_per_node else 'cpu')
            return dry_run(grid, plans, device)
        grid.results_dir.mkdir(parents=True, exist_ok=True)
        with _lock_sweep(grid.results_dir):
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
    except OSError as e:  # e.g. a file where the sweep writes a folder (logs/) or a folder where it writes a file
        path = e.filename2 or e.filename  # os.replace(temporary, target) names the target second
        where = f'{path}: ' if path else ''
        print(f'error: {where}{e.strerror or one_line(e)}: move what is in the way, then run the same command '
              'again (finished runs are skipped)', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted: run the same command again (finished runs are skipped, the others resumed)',
              file=sys.stderr)
        return 130


def _lock_sweep(results_dir: Path):
    """One sweep at a time per results folder: two would start the same runs, and each would report
    the other's run, locked by it, as failed. A POSIX lock on <results>/.sweep.lock (released by the
    kernel when the process ends, however it ends; it holds across the nodes of a shared file system)."""
    handle, holder = try_lock(results_dir / '.sweep.lock')
    if handle is None:
        raise SweepError(f'{results_dir} is in use by another sweep ({holder}): wait for it to end, then run the '
                         'same command again (finished runs are skipped)')
    claim_lock(handle)
    return handle  # a context manager: closing it releases the lock


def dry_run(grid: Grid, plans: list, device: Optional[str] = None) -> int:
    """The plan: every run with what would happen to it, and the cost of what is left (on `device`,
    epoch_seconds)."""
    figures = load_figures()
    total, unknown = 0.0, 0
    print(f'sweep {grid.file} -> {grid.results_dir}: {len(plans)} runs')
    for spec, action in plans:
        line = f'  {action.kind:7s} {spec.name}'
        if action.kind in ('start', 'resume'):
            cfg, _ = parse_run_argv(spec.argv)
            seconds, where = epoch_seconds(cfg, grid.results_dir, figures, device)
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
    sys.exit(main())

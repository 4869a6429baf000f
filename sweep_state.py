"""The state of each run of a sweep, read from its folder alone (records.run_status): finished with
the grid's config (done), interrupted (resume from its last.pt), not begun (start), or holding another
config (refuse) (`plan`, `Action`); what became of it (`Outcome`), and the sweep's summary line.
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from config import VLPLError, one_line
from sweep_grid import RunSpec


@dataclass
class Action:
    """kind: 'done' (finished, same config), 'resume' (last.pt, same config), 'start', 'refuse'
    (the folder holds another config, or the flags are wrong); why: one line."""
    kind: str
    why: str = ''
    epochs_done: int = 0
    epochs: Optional[int] = None


def parse_run_argv(argv) -> tuple:
    """main_clip.parse_args without its exit: (Config, None) or (None, the one-line error)."""
    import main_clip

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg, _ = main_clip.parse_args(list(argv))
        return cfg, None
    except SystemExit:
        text = err.getvalue().strip().splitlines()
        # argparse names the program it was started as (sweep.py, in a sweep): drop that prefix
        return None, re.sub(r'^\S+: error: ', '', text[-1] if text else 'main_clip.py refused the flags')
    except VLPLError as e:
        return None, one_line(e)


def _tuples(value):
    """JSON lists back to the tuples Config holds (config.json stores them as lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def plan(spec: RunSpec) -> Action:
    """What the sweep does with one run, from its folder alone (records.run_status)."""
    import records

    cfg, problem = parse_run_argv(spec.argv)
    if problem:
        return Action('refuse', f'{spec.name}: {problem}')
    folder = Path(cfg.run_dir)
    status = records.run_status(folder)
    if status.state == 'missing':
        return Action('start', epochs=cfg.epochs)
    saved = records.json_or_none(folder / 'config.json')
    if saved is None and (folder / 'config.json').exists() and any(
            (folder / f).exists() for f in ('log.json', 'last.pt')):  # without an epoch it just starts over
        return Action('refuse', f'{folder / "config.json"} is damaged (not a JSON object): restore it, or move the '
                                'run folder away to run it again', status.epochs_done, status.epochs)
    if saved is not None:
        diffs = grid_differences(saved, cfg)
        if diffs:
            return Action('refuse', f'{folder} holds another config ({"; ".join(diffs)[:300]}): move it away or '
                                    'change the grid', status.epochs_done, status.epochs)
    if status.finished:
        return Action('done', epochs_done=status.epochs_done, epochs=cfg.epochs)
    if (folder / 'last.pt').is_file():
        return Action('resume', f'after epoch {status.epochs_done}', status.epochs_done, cfg.epochs)
    return Action('start', 'its folder holds no complete epoch', 0, cfg.epochs)


def grid_differences(saved: dict, cfg) -> list[str]:
    """'name: old -> new' for each setting in which a run folder's config.json (`saved`) differs from
    the run the grid asks for (`cfg`, parse_run_argv of its arguments): the sweep refuses such a
    folder, and report.py --paper does not count it."""
    from checkpoints import config_differences

    return config_differences({k: _tuples(v) for k, v in saved.items() if k != 'record'}, cfg)


def run_argv(spec: RunSpec, action: Action) -> list[str]:
    """main_clip.py arguments of the run: the grid's flags, and --resume for an interrupted one."""
    return list(spec.argv) + (['--resume', spec.run_dir] if action.kind == 'resume' else [])


@dataclass
class Outcome:
    spec: RunSpec
    kind: str            # 'done', 'resumed', 'started', 'failed', 'refused', 'submitted'
    error: str = ''      # the failed run's last error line


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

"""Compare training runs: a table of runs, seeds grouped as mean ± std, per-class AP and plots.

    python report.py results/demo_EM_PL_small_cnn_s0 results/demo_EM_PL_small_cnn_s1
    python report.py results --out report          # every run folder inside results/

Reads what a run folder holds (config.json, log.json, and per_class_ap.json or test_preds_best.npy
when present) and writes into --out:

    report.md          the tables below, with the plots embedded
    runs.csv           one row per run: dataset, method (loss), backbone, head, seed, best epoch,
                       val and test mAP of the best epoch (the values of log.json, full precision),
                       status (complete, or incomplete (e/E epochs): stopped or still running, or no
                       finite mAP) and whether the run is in its group's mean (and why not)
    groups.csv         runs that differ only by seed: n, seeds, mean and sample std (n - 1) of the mAPs
                       of the complete runs, one per seed (--include-incomplete: the incomplete too);
                       the runs left out, named
    per_class_ap.csv   run, class, val and test AP (%) of the best epoch, when available
    curves_<group>.png per-epoch mAP (train/val/test), loss, and the pseudo-label precision/recall
                       when logged; one thin line per seed, the mean thick
    map_by_group.png   val and test mAP of every group, mean ± std
    per_class_ap_<group>.png  test AP per class of the best epoch, sorted

Files of an earlier report in the same --out that this one does not write (plots of groups that are
gone) are removed (REPORT_FILES), so the folder describes these runs only.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from config import RESUMABLE_CHANGES, VLPLError

REPO_ROOT = Path(__file__).resolve().parent

# Config entries that do not define the experiment: runs differing only in these (and in seed) are
# one group. Entries whose value is a JSON object (e.g. library versions, timings) are records,
# not settings, and are ignored as well.
# Settings that do not split a group: those a resumed run may change (they do not change results,
# config.RESUMABLE_CHANGES), the seed, and records. config.json's 'record' (a JSON object) is ignored too.
IGNORED_SETTINGS = RESUMABLE_CHANGES | frozenset({'seed', 'channels_last', 'argv', 'init_from'})
TABLE_COLUMNS = ('dataset', 'method', 'backbone', 'head')
PER_CLASS_PLOT_MAX = 60  # more classes: the plot shows the lowest and highest PER_CLASS_PLOT_MAX / 2
# What a report writes into --out (glob patterns): an earlier report's files that this one does not
# write again are removed.
REPORT_FILES = ('report.md', 'runs.csv', 'groups.csv', 'per_class_ap.csv', 'map_by_group.png', 'curves_*.png',
                'per_class_ap_*.png')


class ReportError(Exception):
    """A problem the user can fix; printed as one line (`error: ...`), exit status 2."""


# ----------------------------------------------------------------------------------------------
# Reading run folders


@dataclass
class Run:
    folder: Path
    name: str
    config: dict
    log: dict
    per_class: dict | None = None     # {'classnames': [...], 'val': [...] or None, 'test': [...]} in %
    per_class_note: str = ''          # why per_class is missing, or where it came from
    left_out: str = ''                # why the run is not in its group's means ('' = it is; select_runs)

    @property
    def row(self) -> dict:
        """The table row: identity columns from config.json, results from log.json."""
        c = self.config
        return {'dataset': c.get('dataset'), 'method': c.get('loss'), 'backbone': c.get('model'),
                'head': c.get('head', 'linear'), 'seed': c.get('seed'), 'best_epoch': self.log.get('best_epoch'),
                'val_map': self.log.get('best_val_map'), 'test_map': self.log.get('best_test_map'),
                'run': self.name, 'status': self.status}

    @property
    def status(self) -> str:
        """'complete' (records.status_of: the one definition of a finished run, which sweep.py uses to
        skip it); 'incomplete (e/E epochs)' for a run stopped or still running; 'no finite mAP'."""
        import records  # torch comes with it: imported when a report reads its first run

        s = records.status_of(self.config, self.log, str(self.folder))
        if s.finished:
            return 'complete'
        if s.state == 'no finite mAP' or not all(_finite(self.log.get(k)) for k in ('best_val_map', 'best_test_map')):
            return 'no finite mAP'
        return f'incomplete ({s.epochs_done}/{s.epochs} epochs)'

    def series(self, phase: str, name: str) -> np.ndarray:
        """(epochs,) float array of log.json values[phase][name] or extra[phase][name]; NaN where not
        logged, all NaN when absent."""
        values = (self.log.get('values', {}).get(phase, {}).get(name)
                  or self.log.get('extra', {}).get(phase, {}).get(name))
        if values is None:
            return np.full(int(self.log.get('num_epochs', 0)), np.nan)
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def find_run_folders(paths: list[str]) -> list[Path]:
    """Each path is a run folder (it holds config.json) or a folder of run folders; hidden folders inside
    (.NAME.replaced: a run that --overwrite is replacing) are not runs of their own. A folder named twice
    (or through another path) counts once."""
    folders, seen = [], set()
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f'{p}: no such folder (pass run folders such as results/<run> or results/)')
        if (p / 'config.json').is_file():
            inside = [p]
        else:
            inside = sorted(q.parent for q in p.glob('*/config.json') if not q.parent.name.startswith('.'))
        if not inside:
            raise ReportError(f'{p}: neither a run folder (no config.json) nor a folder of run folders')
        for folder in inside:
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                folders.append(folder)
    return folders


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f'{path}: not readable JSON ({str(e).splitlines()[0]})') from None
    if not isinstance(data, dict):
        raise ReportError(f'{path}: expected a JSON object')
    return data


def load_run(folder: Path) -> Run:
    """A run from its folder; ReportError when config.json or log.json is missing or damaged."""
    if not (folder / 'log.json').is_file():
        raise ReportError(f'{folder}: no log.json (no epoch has finished)')
    run = Run(folder, folder.name, _read_json(folder / 'config.json'), _read_json(folder / 'log.json'))
    run.per_class, run.per_class_note = per_class_ap(run)
    return run


def _as_percent(values, reference_map: float | None) -> np.ndarray:
    """AP values in percent. Fractions (as metrics.average_precision_per_class gives) are scaled by 100;
    which scale was used is decided by the run's mAP when known, else by max <= 1."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(np.nanmean(values)) if values.size else 0.0
    if reference_map is not None:
        return values * 100.0 if abs(100.0 * mean - reference_map) < abs(mean - reference_map) else values
    return values * 100.0 if np.nanmax(values, initial=0.0) <= 1.0 else values


def per_class_ap(run: Run) -> tuple[dict | None, str]:
    """Per-class AP of the best epoch: per_class_ap.json {'classnames', 'val', 'test'} when training wrote it,
    else the test AP recomputed from test_preds_best.npy and the dataset's test labels when both are
    at hand, else None with the reason."""
    path = run.folder / 'per_class_ap.json'
    if path.is_file():
        data = _read_json(path)
        names = [str(n) for n in data.get('classnames', [])]
        out = {'classnames': names}
        for phase in ('val', 'test'):
            values = data.get(phase)
            if values is not None and len(values) != len(names):
                raise ReportError(f'{path}: {phase} has {len(values)} values for {len(names)} classes')
            out[phase] = None if values is None else _as_percent(values, run.log.get(f'best_{phase}_map'))
        return out, 'per_class_ap.json'
    preds_path = run.folder / 'test_preds_best.npy'
    if not preds_path.is_file():
        return None, 'no per_class_ap.json or test_preds_best.npy in the run folder'
    try:
        import class_text_features
        import datasets  # torch is imported only for this fallback
        from label_tables import take_rows
        from metrics import per_class_ap as test_ap

        data_root = Path(run.config.get('data_root', 'data'))
        if not data_root.is_absolute() and not data_root.is_dir():
            data_root = REPO_ROOT / data_root
        splits = datasets.load_splits(data_root, run.config['dataset'], observed=run.config.get('observed'))
        labels = splits['test'].labels_true
        preds = np.load(preds_path, allow_pickle=False)
        seen = ~np.isnan(preds).any(axis=1)  # rows of images skipped in training are NaN
        ap = 100.0 * test_ap(preds[seen], take_rows(labels, seen), splits['test'].counted(seen))  # NaN: skipped
        names = class_text_features.read_classnames(run.config['dataset'], data_root=str(data_root))
    except Exception as e:  # data not on this machine, other labels, ...: the report goes on without it
        return None, f'no per_class_ap.json, and test AP could not be recomputed ({str(e).splitlines()[0][:120]})'
    if len(names) != ap.size:
        return None, 'no per_class_ap.json, and the class names do not match test_preds_best.npy'
    return {'classnames': names, 'val': None, 'test': ap}, 'recomputed from test_preds_best.npy'


# ----------------------------------------------------------------------------------------------
# Groups of seeds


@dataclass
class Group:
    runs: list[Run]
    name: str = ''
    settings: str = ''   # what tells it apart from groups with the same table columns
    key: tuple = field(default_factory=tuple)

    @property
    def identity(self) -> dict:
        return {k: self.runs[0].row[k] for k in TABLE_COLUMNS}

    @property
    def counted(self) -> list[Run]:
        """The runs of the group's means (select_runs)."""
        return [r for r in self.runs if not r.left_out]


def _settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in IGNORED_SETTINGS and not isinstance(v, dict)}


def select_runs(groups: list['Group'], include_incomplete: bool = False) -> None:
    """Mark the runs left out of their group's means (Run.left_out): no finite mAP; incomplete (stopped
    or still running: its best epoch is that of fewer epochs) unless include_incomplete; and a seed
    already counted in the group (a copy or a resumed copy of a run is not an independent sample).
    Each seed is represented by its first complete run in folder order; with include_incomplete, an
    incomplete run represents its seed only when the seed has no complete run (a killed copy must not
    displace the finished run whatever the folders are called)."""
    for g in groups:
        kept: dict = {}
        eligible = []
        for run in g.runs:
            status = run.status
            if status == 'no finite mAP':
                run.left_out = status
            elif status != 'complete' and not include_incomplete:
                run.left_out = status.split(' ')[0]
            else:
                eligible.append(run)
        complete_first = [r for r in eligible if r.status == 'complete'] + [r for r in eligible if r.status != 'complete']
        for run in complete_first:
            seed = run.row['seed']
            if seed in kept:
                run.left_out = f'repeats seed {seed} of {kept[seed].name}'
            else:
                run.left_out = ''
                kept[seed] = run


def left_out_line(runs: list[Run], include_incomplete: bool) -> str:
    """One line on the runs left out of the group means ('' when none is)."""
    out = [r for r in runs if r.left_out]
    if not out:
        return ''
    kinds: dict = {}
    for r in out:
        kind = 'repeated seed' if r.left_out.startswith('repeats') else r.left_out
        kinds[kind] = kinds.get(kind, 0) + 1
    flag = '' if include_incomplete or 'incomplete' not in kinds else '; --include-incomplete counts the incomplete'
    return (f'Left out of the group means: {len(out)} run{"s" if len(out) > 1 else ""} ('
            + ', '.join(f'{n} {kind}' for kind, n in kinds.items()) + f'): '
            + ', '.join(r.name for r in out) + flag + '.')


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs whose configurations are equal except for IGNORED_SETTINGS (seed, folders, device, ...),
    in the order of their first run. Each group gets a file-name-safe name and, where groups share
    dataset/method/backbone/head, the settings that differ."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(_settings(run.config), sort_keys=True, default=str)
        groups.setdefault(key, Group([], key=(key,))).runs.append(run)
    out = list(groups.values())
    for g in out:
        same = [h for h in out if h.identity == g.identity]
        if len(same) > 1:
            mine = _settings(g.runs[0].config)
            differing = sorted(k for k in mine if any(_settings(h.runs[0].config).get(k) != mine[k] for h in same))
            g.settings = ', '.join(f'{k}={mine[k]}' for k in differing)
    used = set()
    for g in out:
        base = '_'.join(str(g.identity[k]) for k in ('dataset', 'method', 'backbone'))
        if g.identity['head'] != 'linear':
            base += f'_{g.identity["head"]}'
        base = re.sub(r'[^A-Za-z0-9_.-]+', '-', base)
        name, i = base, 2
        while name in used:
            name, i = f'{base}_{i}', i + 1
        used.add(name)
        g.name = name
    return out


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1) of the values that are not None; std is None
    for fewer than two values, mean None for none."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def _fmt(value, spec='.2f') -> str:
    return 'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fmt_mean_std(mean, std) -> str:
    if mean is None:
        return 'n/a'
    return f'{mean:.2f} ± {std:.2f}' if std is not None else f'{mean:.2f}'


# ----------------------------------------------------------------------------------------------
# Tables


def group_summary(g: Group) -> dict:
    runs = g.counted
    val = mean_std([r.row['val_map'] for r in runs])
    test = mean_std([r.row['test_map'] for r in runs])
    return {**g.identity, 'settings': g.settings, 'n': len(runs),
            'seeds': ' '.join(str(r.row['seed']) for r in runs),
            'best_epochs': ' '.join(str(r.row['best_epoch']) for r in runs),
            'val_map_mean': val[0], 'val_map_std': val[1], 'test_map_mean': test[0], 'test_map_std': test[1],
            'left_out': '; '.join(f'{r.name} ({r.left_out})' for r in g.runs if r.left_out)}


def _csv(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(header)
    writer.writerows([['' if v is None else v for v in row] for row in rows])
    return out.getvalue()


def _markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join('---:' if a == 'r' else '---' for a in align) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def runs_table(runs: list[Run]) -> tuple[str, str]:
    """(Markdown, CSV) of one row per run."""
    keys = ['dataset', 'method', 'backbone', 'head', 'seed', 'best_epoch', 'val_map', 'test_map', 'run', 'status']
    md = _markdown_table(['dataset', 'method', 'backbone', 'head', 'seed', 'best epoch', 'val mAP', 'test mAP', 'run',
                          'status'],
                         [[r.row['dataset'], r.row['method'], r.row['backbone'], r.row['head'], r.row['seed'],
                           r.row['best_epoch'], _fmt(r.row['val_map']), _fmt(r.row['test_map']), r.name,
                           r.row['status'] + (f'; not in the mean ({r.left_out})' if r.left_out
                                              and not r.left_out.startswith(('incomplete', 'no finite')) else '')]
                          for r in runs], 'lllllrrrll')
    return md, _csv(keys + ['in_group_mean', 'left_out', 'folder'],
                    [[r.row[k] for k in keys] + [not r.left_out, r.left_out, str(r.folder)] for r in runs])


def groups_table(groups: list[Group]) -> tuple[str, str]:
    """(Markdown, CSV) of one row per group of seeds."""
    rows = [group_summary(g) for g in groups]
    md = _markdown_table(['dataset', 'method', 'backbone', 'head', 'settings', 'n', 'seeds', 'best epochs',
                          'val mAP', 'test mAP', 'left out'],
                         [[s['dataset'], s['method'], s['backbone'], s['head'], s['settings'] or '—', s['n'],
                           s['seeds'], s['best_epochs'], _fmt_mean_std(s['val_map_mean'], s['val_map_std']),
                           _fmt_mean_std(s['test_map_mean'], s['test_map_std']), s['left_out'] or '—']
                          for s in rows], 'llllllllrrl')
    keys = list(rows[0]) if rows else []
    return md, _csv(keys, [[s[k] for k in keys] for s in rows])


def group_per_class(g: Group) -> dict | None:
    """Per-class AP of a group: class names and (n_runs x K) val/test arrays (NaN rows where missing)."""
    have = [r.per_class for r in g.counted if r.per_class is not None]
    if not have:
        return None
    names = have[0]['classnames']
    if any(p['classnames'] != names for p in have):
        return None
    out = {'classnames': names}
    for phase in ('val', 'test'):
        rows = [p[phase] for p in have if p[phase] is not None]
        out[phase] = np.stack(rows) if rows else None
    return out


def per_class_markdown(g: Group, pc: dict) -> str:
    def cell(array, c):
        if array is None:
            return 'n/a'
        m, s = mean_std([float(x) for x in array[:, c]])
        return _fmt_mean_std(m, s)
    rows = [[name, cell(pc['test'], c), cell(pc['val'], c)] for c, name in enumerate(pc['classnames'])]
    return _markdown_table(['class', 'test AP', 'val AP'], rows, 'lrr')


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no display needed)


PHASE_COLORS = {'train': '#1f77b4', 'val': '#ff7f0e', 'test': '#2ca02c'}


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plt.rcParams.update({'font.size': 11, 'axes.grid': True, 'grid.alpha': 0.3, 'axes.titlesize': 12})
    return plt


def _plot_series(ax, runs: list[Run], phase: str, name: str, label: str, color: str) -> bool:
    """Thin line per run, thick mean over runs (the only line for one run); False if nothing logged."""
    series = [r.series(phase, name) for r in runs]
    length = max((s.size for s in series), default=0)
    if length == 0 or all(np.isnan(s).all() for s in series):
        return False
    stack = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        stack[i, :s.size] = s
    epochs = np.arange(1, length + 1)
    if len(runs) > 1:
        for s in stack:
            ax.plot(epochs, s, color=color, alpha=0.35, linewidth=1)
    with np.errstate(all='ignore'):
        mean = np.nanmean(stack, axis=0) if len(runs) > 1 else stack[0]
    ax.plot(epochs, mean, color=color, linewidth=2.2, marker='o', markersize=4,
            label=label + (f' (mean of {len(runs)})' if len(runs) > 1 else ''))
    return True


def plot_curves(g: Group, path: Path) -> None:
    """Per-epoch clean mAP of train/val/test with the best epochs marked, the loss, and the
    pseudo-label precision and recall of the train phase when the log has them."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    runs = g.counted or g.runs  # the runs of the group's means; all of them when none is
    has_pl = any(not np.isnan(r.series('train', n)).all() for r in runs for n in ('pl_precision', 'pl_recall'))
    panels = 3 if has_pl else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), constrained_layout=True)
    ax = axes[0]
    for phase in ('train', 'val', 'test'):
        _plot_series(ax, runs, phase, 'map_clean', f'{phase} mAP', PHASE_COLORS[phase])
    for r in runs:
        best = r.log.get('best_epoch')
        if best:
            val = r.series('val', 'map_clean')
            ax.axvline(best, color=PHASE_COLORS['val'], linestyle=':', linewidth=1)
            ax.plot([best], [val[best - 1]], marker='*', markersize=14, color=PHASE_COLORS['val'],
                    markeredgecolor='black', linestyle='none')
    ax.plot([], [], marker='*', markersize=12, color=PHASE_COLORS['val'], markeredgecolor='black',
            linestyle='none', label='best epoch (val)')
    ax.set(title='mAP on clean labels (%)', xlabel='epoch', ylabel='mAP (%)')
    ax.legend(loc='lower right', fontsize=9)
    ax = axes[1]
    drawn = [_plot_series(ax, runs, phase, 'loss', f'{phase} loss', PHASE_COLORS[phase]) for phase in PHASE_COLORS]
    ax.set(title='loss' + (' (negative for the EM losses: entropy term)' if str(g.identity['method']).startswith('EM')
                           else ''), xlabel='epoch', ylabel='loss')
    if any(drawn):
        ax.legend(fontsize=9)
    if has_pl:
        ax = axes[2]
        _plot_series(ax, runs, 'train', 'pl_precision', 'precision', '#9467bd')
        _plot_series(ax, runs, 'train', 'pl_recall', 'recall', '#8c564b')
        ax.set(title='pseudo-labels on unknown entries (train)', xlabel='epoch', ylim=(0, 1.02))
        ax.legend(fontsize=9)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    seeds = ', '.join(str(r.row['seed']) for r in runs)
    fig.suptitle(f'{_group_title(g)}  (seed{"s" if len(runs) > 1 else ""} {seeds})', fontsize=13)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group_title(g: Group) -> str:
    i = g.identity
    title = f'{i["dataset"]} · {i["method"]} · {i["backbone"]}'
    if i['head'] != 'linear':
        title += f' · {i["head"]} head'
    return title + (f' · {g.settings}' if g.settings else '')


def plot_map_by_group(groups: list[Group], path: Path) -> None:
    """Val and test mAP of every group: mean as a dot, sample std as error bar, seeds as small
    crosses; the axis is zoomed to the values so that close results stay apart."""
    plt = _pyplot()
    rows = [group_summary(g) for g in groups]
    labels = [f'{_group_title(g)}  (n={len(g.counted)})' for g in groups]
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.8 * len(groups)), constrained_layout=True)
    values = []
    for offset, phase in ((-0.15, 'val'), (0.15, 'test')):
        for y, (g, s) in enumerate(zip(groups, rows)):
            mean, std = s[f'{phase}_map_mean'], s[f'{phase}_map_std']
            if mean is None:
                continue
            seeds = [r.row[f'{phase}_map'] for r in g.counted if r.row[f'{phase}_map'] is not None]
            values += seeds
            ax.plot(seeds, [y + offset] * len(seeds), 'x', color=PHASE_COLORS[phase], alpha=0.6, markersize=6)
            ax.errorbar(mean, y + offset, xerr=std or 0.0, fmt='o', color=PHASE_COLORS[phase], capsize=4,
                        markersize=8, label=f'{phase} mAP' if y == 0 else None)
            ax.annotate(_fmt_mean_std(mean, std), (mean + (std or 0.0), y + offset), xytext=(8, 0),
                        textcoords='offset points', va='center', fontsize=9, color=PHASE_COLORS[phase])
    low, high = (min(values), max(values)) if values else (0.0, 100.0)
    pad = max(1.0, 0.15 * (high - low))
    ax.set_xlim(max(0.0, low - pad), min(100.0, high + pad) + 3.5 * pad)  # room for the labels
    ax.set_ylim(len(groups) - 0.5, -0.5)
    ax.set_yticks(range(len(groups)), labels)
    ax.set(xlabel='mAP of the best epoch (%): dot = mean, bar = sample std, x = one seed',
           title='mAP by group of seeds')
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.32 if len(groups) < 3 else -0.12), ncol=2, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class(g: Group, pc: dict, path: Path) -> None:
    """Test AP of every class at the best epoch, highest first; mean ± std over seeds for several
    runs. Beyond PER_CLASS_PLOT_MAX classes only the lowest and the highest half of that number are shown."""
    plt = _pyplot()
    phase = 'test' if pc['test'] is not None else 'val'
    stack = pc[phase]
    several = stack.shape[0] > 1
    with warnings.catch_warnings():  # a class partial annotations cannot evaluate is NaN in every run
        warnings.simplefilter('ignore', RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
        std = np.nanstd(stack, axis=0, ddof=1) if several else np.zeros_like(mean)
    order = np.argsort(-mean, kind='stable')
    title = f'{phase} AP per class at the best epoch (mAP {np.nanmean(mean):.2f})\n{_group_title(g)}'
    if order.size > PER_CLASS_PLOT_MAX:
        half = PER_CLASS_PLOT_MAX // 2
        title += f' — highest and lowest {half} of {order.size} classes'
        order = np.concatenate([order[:half], order[-half:]])
    hidden = mean.size - order.size
    names = [pc['classnames'][c] for c in order]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.3 * len(order)), constrained_layout=True)
    if hidden:
        ax.axhline(PER_CLASS_PLOT_MAX // 2 - 0.5, color='black', linestyle='--', linewidth=1)
        ax.text(99, PER_CLASS_PLOT_MAX // 2 - 0.5, f'{hidden} classes not shown', ha='right', va='center',
                fontsize=8, backgroundcolor='white')
    y = np.arange(len(order))
    ax.barh(y, mean[order], xerr=std[order] if several else None, capsize=2, color=PHASE_COLORS[phase],
            error_kw={'elinewidth': 1, 'ecolor': '#333333'})
    for yi, c in zip(y, order):
        text = f'{mean[c]:.1f}' + (f' ± {std[c]:.1f}' if several else '')
        if mean[c] >= 25:   # inside the bar, at its left end
            ax.text(1, yi, text, va='center', ha='left', fontsize=8, color='white', fontweight='bold')
        else:
            ax.text(mean[c] + std[c] + 1, yi, text, va='center', ha='left', fontsize=8)
    ax.set_yticks(y, names, fontsize=9)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set(xlim=(0, 100), xlabel='AP (%)' + (f', mean ± sample std of {stack.shape[0]} seeds' if several else ''),
           title=title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The report


def write_report(runs: list[Run], out: Path, include_incomplete: bool = False) -> list[Path]:
    """Write tables, CSVs and PNGs into `out`; returns the files written. Files of an earlier report there
    that this one does not write are removed (REPORT_FILES)."""
    out.mkdir(parents=True, exist_ok=True)
    earlier = {path for pattern in REPORT_FILES for path in out.glob(pattern)}
    groups = group_runs(runs)
    select_runs(groups, include_incomplete)
    written = []

    def write(name: str, text: str) -> None:
        (out / name).write_text(text)
        written.append(out / name)

    runs_md, runs_csv = runs_table(runs)
    groups_md, groups_csv = groups_table(groups)
    write('runs.csv', runs_csv)
    write('groups.csv', groups_csv)
    md = [f'# Report of {len(runs)} run{"s" if len(runs) != 1 else ""}\n',
          'mAP in percent, of the best epoch (highest val mAP, first on ties), as log.json records it.\n',
          '## Runs\n', runs_md,
          '## Groups of seeds\n',
          'Runs whose configurations differ only by seed (and folders, device, workers). '
          'Values: mean ± sample standard deviation (n − 1 in the denominator); one run shows its value alone. '
          + ('Incomplete runs are counted (--include-incomplete); ' if include_incomplete else
             'Only complete runs are counted; ') + 'one run per seed.\n',
          (left_out_line(runs, include_incomplete) + '\n') if left_out_line(runs, include_incomplete) else '',
          groups_md]

    plot_map_by_group(groups, out / 'map_by_group.png')
    written.append(out / 'map_by_group.png')
    md += ['\n![mAP by group](map_by_group.png)\n', '## Training curves\n']
    for g in groups:
        name = f'curves_{g.name}.png'
        plot_curves(g, out / name)
        written.append(out / name)
        md.append(f'![{_group_title(g)}]({name})\n')

    md.append('## Per-class AP of the best epoch\n')
    per_class_rows = []
    for g in groups:
        pc = group_per_class(g)
        md.append(f'### {_group_title(g)}\n')
        if pc is None:
            notes = sorted({r.per_class_note for r in g.counted if r.per_class is None})
            md.append(f'Not available: {"; ".join(notes) or "class names differ between seeds"}.\n')
            continue
        sources = sorted({r.per_class_note for r in g.counted if r.per_class is not None})
        md.append(f'Source: {", ".join(sources)}; AP in percent, mean ± sample std over seeds.\n')
        name = f'per_class_ap_{g.name}.png'
        plot_per_class(g, pc, out / name)
        written.append(out / name)
        md += [f'![per-class AP]({name})\n', '<details><summary>table</summary>\n\n',
               per_class_markdown(g, pc), '\n</details>\n']
    for r in runs:
        if r.per_class is None:
            continue
        for c, cls in enumerate(r.per_class['classnames']):
            val, test = r.per_class['val'], r.per_class['test']
            per_class_rows.append([r.name, cls, None if val is None else float(val[c]),
                                   None if test is None else float(test[c])])
    if per_class_rows:
        write('per_class_ap.csv', _csv(['run', 'class', 'val_ap', 'test_ap'], per_class_rows))
    write('report.md', '\n'.join(md))
    for path in earlier - set(written):  # e.g. the plots of a group that is not in this report
        path.unlink(missing_ok=True)
    return written


# ----------------------------------------------------------------------------------------------
# The paper table of a sweep (--paper SWEEP_DIR)


PAPER_TOLERANCE = 1.0  # mAP points: a larger difference from the published number is marked


@dataclass
class PaperCell:
    """One (method[:recipe], dataset) cell of a sweep: its planned seeds, the finished runs' test mAP,
    the published number, and the provenance of its runs."""
    cell: str
    method: str
    recipe: str | None
    dataset: str
    planned: list = field(default_factory=list)    # seeds
    results: dict = field(default_factory=dict)    # seed -> test mAP of the best val epoch (finished runs)
    why_missing: dict = field(default_factory=dict)  # seed -> why the run does not count
    provenance: dict = field(default_factory=dict)  # seed -> config.json record.provenance
    published: object = None                        # paper_recipes.Entry or None
    title: str = ''
    not_applied: dict = field(default_factory=dict)

    @property
    def missing(self) -> list:
        return [s for s in self.planned if s not in self.results]

    @property
    def mean_std(self) -> tuple:
        return mean_std([self.results[s] for s in sorted(self.results)])

    @property
    def difference(self) -> float | None:
        mean = self.mean_std[0]
        return None if mean is None or self.published is None else mean - float(self.published.value)


def paper_cells(sweep_dir: Path) -> list[PaperCell]:
    """The cells of a sweep from its sweep.json (written by sweep.py), each run counted only when
    finished (records.run_status, the definition sweep.py uses)."""
    import paper_recipes
    import records
    from sweep_grid import SWEEP_FILE

    plan_path = sweep_dir / SWEEP_FILE
    if not plan_path.is_file():
        raise ReportError(f'{sweep_dir}: no {SWEEP_FILE}; --paper reads the folder of a sweep (python sweep.py GRID)')
    plan = _read_json(plan_path)
    cells: dict[tuple, PaperCell] = {}
    for run in plan.get('runs', []):
        key = (run['cell'], run['dataset'])
        if key not in cells:
            recipe = run.get('recipe')
            cells[key] = PaperCell(run['cell'], run['method'], recipe, run['dataset'])
            try:
                r = paper_recipes.find(recipe or 'original', run['method'], run['dataset'])
                cells[key].published, cells[key].title, cells[key].not_applied = r.published, r.title, r.not_applied
            except VLPLError:  # no recipe for this cell: no published number to compare with
                pass
        cell = cells[key]
        seed = run['seed']
        cell.planned.append(seed)
        folder = sweep_dir / run['name']
        status = records.run_status(folder)
        if not status.finished:
            cell.why_missing[seed] = status.state + (f' ({status.epochs_done}/{status.epochs} epochs)'
                                                     if status.state == 'interrupted' else '')
            continue
        log = _read_json(folder / 'log.json')
        config = _read_json(folder / 'config.json')
        cell.results[seed] = log.get('best_test_map')
        record = config.get('record', {})  # provenance, and the data's fingerprint (fingerprint.summary)
        cell.provenance[seed] = record.get('provenance', {}) | ({'inputs': record['inputs']} if 'inputs' in record else {})
    return list(cells.values())


def _flatten(value, prefix: str = '') -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f'{prefix}.{k}' if prefix else str(k)))
        return out
    return {prefix: json.dumps(value, sort_keys=True) if isinstance(value, (list, tuple)) else value}


def provenance_differences(cell: PaperCell) -> list[tuple[str, dict]]:
    """(key, {seed: value}) for every provenance entry that is not the same in all finished runs of the cell."""
    flat = {seed: _flatten(p) for seed, p in cell.provenance.items()}
    keys = sorted({k for f in flat.values() for k in f})
    out = []
    for key in keys:
        values = {seed: f.get(key) for seed, f in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            out.append((key, values))
    return out


def _cell_text(cell: PaperCell) -> str:
    mean, std = cell.mean_std
    if mean is None:
        return 'no finished run'
    text = _fmt_mean_std(mean, std) + f' (n={len(cell.results)})'
    if cell.missing:
        text += ', missing seed' + ('s ' if len(cell.missing) > 1 else ' ') + ' '.join(map(str, cell.missing))
    return text


def paper_table(cells: list[PaperCell], tolerance: float) -> tuple[str, str]:
    """(Markdown, CSV) of the sweep's table: per row a method (and recipe), per dataset ours as mean ±
    sample std over the finished seeds, the published number and the difference, marked (!) beyond
    `tolerance` mAP points."""
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    rows = list(dict.fromkeys(c.cell for c in cells))
    by_key = {(c.cell, c.dataset): c for c in cells}
    header = ['method'] + [f'{d} {what}' for d in datasets for what in ('ours', 'paper', 'diff')]
    md_rows = []
    for row in rows:
        line = [row]
        for d in datasets:
            c = by_key.get((row, d))
            if c is None:
                line += ['—', '—', '—']
                continue
            diff = c.difference
            line += [_cell_text(c), _fmt(None if c.published is None else float(c.published.value)),
                     'n/a' if diff is None else f'{diff:+.2f}' + (' (!)' if abs(diff) > tolerance else '')]
        md_rows.append(line)
    md = _markdown_table(header, md_rows, 'l' + 'rrr' * len(datasets))
    csv_rows = []
    for c in cells:
        mean, std = c.mean_std
        diff = c.difference
        csv_rows.append([c.cell, c.method, c.recipe or '', c.dataset, len(c.planned), len(c.results),
                         ' '.join(map(str, sorted(c.results))), ' '.join(map(str, c.missing)), mean, std,
                         None if c.published is None else float(c.published.value),
                         None if diff is None else diff, None if diff is None else int(abs(diff) > tolerance),
                         '' if c.published is None else c.published.source])
    csv_text = _csv(['cell', 'method', 'recipe', 'dataset', 'seeds_planned', 'seeds_finished', 'seeds', 'missing_seeds',
                     'test_map_mean', 'test_map_std', 'published', 'difference', 'beyond_tolerance',
                     'published_source'], csv_rows)
    return md, csv_text


def plot_paper(cells: list[PaperCell], path: Path, tolerance: float) -> None:
    """One panel per dataset: ours (mean, sample std as error bar, seeds as crosses) beside the
    published number (black diamond); a row whose difference exceeds the tolerance in red."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    rows = list(dict.fromkeys(c.cell for c in cells))
    by_key = {(c.cell, c.dataset): c for c in cells}
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(6.5, 4.6 * len(datasets)), 1.6 + 0.55 * len(rows)),
                             constrained_layout=True, squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for y, row in enumerate(rows):
            c = by_key.get((row, d))
            if c is None:
                continue
            mean, std = c.mean_std
            diff = c.difference
            color = '#d62728' if diff is not None and abs(diff) > tolerance else PHASE_COLORS['test']
            if mean is not None:
                ax.errorbar(mean, y, xerr=std or 0.0, fmt='o', color=color, capsize=4, markersize=7,
                            label='ours (mean ± std)' if y == 0 else None)
                ax.plot(list(c.results.values()), [y] * len(c.results), 'x', color=color, alpha=0.6)
            if c.published is not None:
                ax.plot([float(c.published.value)], [y], 'D', color='black', markersize=6,
                        label='published' if y == 0 else None)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [''] * len(rows))
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set(title=d, xlabel='test mAP (%)')
    axes[0][0].legend(loc='upper left', bbox_to_anchor=(0.0, -0.22), ncol=2, fontsize=8)
    fig.suptitle(f'test mAP beside the published numbers\n(red: more than {tolerance:g} points apart)', fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_paper(sweep_dir: Path, out: Path, tolerance: float = PAPER_TOLERANCE) -> list[Path]:
    """paper.md, paper.csv and paper.png of a sweep folder into `out`."""
    cells = paper_cells(sweep_dir)
    if not cells:
        raise ReportError(f'{sweep_dir}: its sweep.json plans no run')
    out.mkdir(parents=True, exist_ok=True)
    md_table, csv_text = paper_table(cells, tolerance)
    finished = sum(len(c.results) for c in cells)
    planned = sum(len(c.planned) for c in cells)
    md = [f'# {sweep_dir.name}: {finished} of {planned} runs finished', '',
          'Test mAP (%) at the best val epoch, mean ± sample standard deviation over the finished seeds (n); '
          'missing seeds are named. "paper": the published number of the original (recipes/*.toml, with its '
          f'source in paper.csv); "diff": ours minus paper, (!) beyond {tolerance:g} points.', '', md_table,
          '![table](paper.png)', '']
    missing = [(c, s) for c in cells for s in c.missing]
    if missing:
        md += ['## Runs that do not count', '']
        md += [f'- {c.cell} on {c.dataset}, seed {s}: {c.why_missing.get(s, "not finished")}' for c, s in missing]
        md.append('')
    md += ['## Provenance that differs between the runs of a cell', '']
    lines = [f'- {c.cell} on {c.dataset}: `{key}`: ' + '; '.join(f'seed {s}: {v}' for s, v in sorted(values.items()))
             for c in cells for key, values in provenance_differences(c)]
    md += lines or ['None: within every cell the runs share code commit and tree state, libraries, device, weights '
                    'and their sha256, input size, split seed, label files, recipe and overrides.']
    md.append('')
    notes = {(c.cell, key): entry for c in cells for key, entry in c.not_applied.items()}
    if notes:
        md += ["## What the originals did that these runs do not (the recipes' not_applied)", '']
        md += [f'- {cell}: {key} = {entry.value} ({entry.source}): {entry.why}' for (cell, key), entry in notes.items()]
        md.append('')
    written = []
    for name, text in (('paper.md', '\n'.join(md)), ('paper.csv', csv_text)):
        (out / name).write_text(text)
        written.append(out / name)
    plot_paper(cells, out / 'paper.png', tolerance)
    written.append(out / 'paper.png')
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='Compare training runs: tables (Markdown, CSV) of best-epoch mAP, seeds grouped as '
                    'mean ± sample std, per-class AP and PNG plots.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('runs', nargs='*', metavar='RUN_DIR',
                   help='run folders (holding config.json and log.json), or folders of run folders')
    p.add_argument('--out', default='report', help='folder for report.md, the CSV files and the plots')
    p.add_argument('--paper', default=None, metavar='SWEEP_DIR',
                   help='the table of a sweep (sweep.py) beside the published numbers: paper.md, paper.csv, paper.png')
    p.add_argument('--tolerance', type=float, default=PAPER_TOLERANCE,
                   help='--paper: mark a difference from the published number larger than this (mAP points)')
    p.add_argument('--include-incomplete', action='store_true',
                   help='count runs that stopped (or are still running) before their last epoch in the group '
                        'means (default: listed, marked incomplete, left out of the means)')
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.runs and args.paper is None:
        parser.error('give RUN_DIR folders, or --paper SWEEP_DIR')
    try:
        if args.paper is not None:
            written = write_paper(Path(args.paper), Path(args.out), args.tolerance)
            print(f'{Path(args.paper)} -> {written[0]} ({len(written)} files)')
            return 0
        runs = []
        for folder in find_run_folders(args.runs):
            try:
                runs.append(load_run(folder))
            except ReportError as e:
                print(f'skipped {e}', file=sys.stderr)
        if not runs:
            raise ReportError('no run with a log.json among the given folders; train one with main_clip.py first')
        names = [r.name for r in runs]
        for r in runs:  # the same run name under two results folders: tell them apart
            if names.count(r.name) > 1:
                r.name = f'{r.folder.parent.name}/{r.name}'
        written = write_report(runs, Path(args.out), args.include_incomplete)
    except ReportError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:
        print(f'error: cannot write to {args.out} ({e.strerror or e}); choose another --out', file=sys.stderr)
        return 2
    print(f'{len(runs)} runs -> {Path(args.out) / "report.md"} ({len(written)} files)')
    if left_out_line(runs, args.include_incomplete):
        print(left_out_line(runs, args.include_incomplete))
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""The tables of a report, Markdown and CSV: one row per run, one per group of seeds (mean ± sample
std), per-class AP of a group; the formatting of values that the plots and the paper table share.
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np

from report_runs import Group, Run, mean_std


def fmt(value, spec='.2f') -> str:
    return 'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def fmt_mean_std(mean, std) -> str:
    if mean is None:
        return 'n/a'
    return f'{mean:.2f} ± {std:.2f}' if std is not None else f'{mean:.2f}'


def group_summary(g: Group) -> dict:
    runs = g.counted
    val = mean_std([r.row['val_map'] for r in runs])
    test = mean_std([r.row['test_map'] for r in runs])
    return {**g.identity, 'settings': g.settings, 'n': len(runs),
            'seeds': ' '.join(str(r.row['seed']) for r in runs),
            'best_epochs': ' '.join(str(r.row['best_epoch']) for r in runs),
            'val_map_mean': val[0], 'val_map_std': val[1], 'test_map_mean': test[0], 'test_map_std': test[1],
            'left_out': '; '.join(f'{r.name} ({r.left_out})' for r in g.runs if r.left_out)}


def csv_table(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(header)
    writer.writerows([['' if v is None else v for v in row] for row in rows])
    return out.getvalue()


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join('---:' if a == 'r' else '---' for a in align) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def runs_table(runs: list[Run]) -> tuple[str, str]:
    """(Markdown, CSV) of one row per run."""
    keys = ['dataset', 'method', 'backbone', 'head', 'seed', 'best_epoch', 'val_map', 'test_map', 'run', 'status']
    md = markdown_table(['dataset', 'method', 'backbone', 'head', 'seed', 'best epoch', 'val mAP', 'test mAP', 'run',
                          'status'],
                         [[r.row['dataset'], r.row['method'], r.row['backbone'], r.row['head'], r.row['seed'],
                           r.row['best_epoch'], fmt(r.row['val_map']), fmt(r.row['test_map']), r.name,
                           r.row['status'] + (f'; not in the mean ({r.left_out})' if r.left_out
                                              and not r.left_out.startswith(('incomplete', 'no finite')) else '')]
                          for r in runs], 'lllllrrrll')
    return md, csv_table(keys + ['in_group_mean', 'left_out', 'folder'],
                    [[r.row[k] for k in keys] + [not r.left_out, r.left_out, str(r.folder)] for r in runs])


def groups_table(groups: list[Group]) -> tuple[str, str]:
    """(Markdown, CSV) of one row per group of seeds."""
    rows = [group_summary(g) for g in groups]
    md = markdown_table(['dataset', 'method', 'backbone', 'head', 'settings', 'n', 'seeds', 'best epochs',
                          'val mAP', 'test mAP', 'left out'],
                         [[s['dataset'], s['method'], s['backbone'], s['head'], s['settings'] or '—', s['n'],
                           s['seeds'], s['best_epochs'], fmt_mean_std(s['val_map_mean'], s['val_map_std']),
                           fmt_mean_std(s['test_map_mean'], s['test_map_std']), s['left_out'] or '—']
                          for s in rows], 'llllllllrrl')
    keys = list(rows[0]) if rows else []
    return md, csv_table(keys, [[s[k] for k in keys] for s in rows])


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
        return fmt_mean_std(m, s)
    rows = [[name, cell(pc['test'], c), cell(pc['val'], c)] for c, name in enumerate(pc['classnames'])]
    return markdown_table(['class', 'test AP', 'val AP'], rows, 'lrr')

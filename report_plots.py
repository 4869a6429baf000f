"""The plots of a report (matplotlib, Agg backend: no display needed): a group's training curves,
the mAP of every group, a group's per-class AP.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from report_runs import Group, Run
from report_tables import fmt_mean_std, group_summary

PER_CLASS_PLOT_MAX = 60  # more classes: the plot shows the lowest and highest PER_CLASS_PLOT_MAX / 2
PHASE_COLORS = {'train': '#1f77b4', 'val': '#ff7f0e', 'test': '#2ca02c'}


def pyplot():
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

    plt = pyplot()
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
    fig.suptitle(f'{group_title(g)}  (seed{"s" if len(runs) > 1 else ""} {seeds})', fontsize=13)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def group_title(g: Group) -> str:
    i = g.identity
    title = f'{i["dataset"]} · {i["method"]} · {i["backbone"]}'
    if i['head'] != 'linear':
        title += f' · {i["head"]} head'
    return title + (f' · {g.settings}' if g.settings else '')


def plot_map_by_group(groups: list[Group], path: Path) -> None:
    """Val and test mAP of every group: mean as a dot, sample std as error bar, seeds as small
    crosses; the axis is zoomed to the values so that close results stay apart."""
    plt = pyplot()
    rows = [group_summary(g) for g in groups]
    labels = [f'{group_title(g)}  (n={len(g.counted)})' for g in groups]
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
            ax.annotate(fmt_mean_std(mean, std), (mean + (std or 0.0), y + offset), xytext=(8, 0),
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
    plt = pyplot()
    phase = 'test' if pc['test'] is not None else 'val'
    stack = pc[phase]
    several = stack.shape[0] > 1
    with warnings.catch_warnings():  # a class partial annotations cannot evaluate is NaN in every run
        warnings.simplefilter('ignore', RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
        std = np.nanstd(stack, axis=0, ddof=1) if several else np.zeros_like(mean)
    order = np.argsort(-mean, kind='stable')
    title = f'{phase} AP per class at the best epoch (mAP {np.nanmean(mean):.2f})\n{group_title(g)}'
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

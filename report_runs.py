"""The runs a report reads and their groups: a run folder's config.json, log.json and per-class AP
(`Run`, `find_run_folders`, `load_run`, `per_class_ap`), runs that differ only by seed as one group
(`group_runs`), which runs a group's means count (`select_runs`), and the mean and sample std of a
group's values (`mean_std`). report.py's docstring says what a report holds.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from config import RESUMABLE_CHANGES

REPO_ROOT = Path(__file__).resolve().parent

# Config entries that do not define the experiment: runs differing only in these (and in seed) are
# one group. Entries whose value is a JSON object (e.g. library versions, timings) are records,
# not settings, and are ignored as well.
# Settings that do not split a group: those a resumed run may change (they do not change results,
# config.RESUMABLE_CHANGES), the seed, and records. config.json's 'record' (a JSON object) is ignored too.
# init_from only counts as set or not (_settings): its path may differ per seed.
IGNORED_SETTINGS = RESUMABLE_CHANGES | frozenset({'seed', 'channels_last', 'argv', 'init_from'})
TABLE_COLUMNS = ('dataset', 'method', 'backbone', 'head')


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
            what = ('a file, not a folder' + ('; a sweep\'s table: report.py --paper RESULTS_DIR' if p.suffix == '.toml'
                                             else '') if p.exists() else 'no such folder')
            raise ReportError(f'{p}: {what} (pass run folders such as results/<run> or results/)')
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


def read_json(path: Path) -> dict:
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
    run = Run(folder, folder.name, read_json(folder / 'config.json'), read_json(folder / 'log.json'))
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
        data = read_json(path)
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
    settings = {k: v for k, v in config.items() if k not in IGNORED_SETTINGS and not isinstance(v, dict)}
    if config.get('init_from'):  # the path may differ per seed; starting from trained weights splits a group
        settings['init_from'] = 'a checkpoint'
    return settings


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

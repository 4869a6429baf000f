"""The grid of a sweep (sweep.py GRID, docs/sweeps.md): the TOML file read and checked (`read_grid`),
expanded into named runs of main_clip.py (`expand`, `RunSpec`), and the plan every run of it is
listed in, <results>/sweep.json (`write_plan`), which report.py --paper reads.
"""
from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from config import DATASETS, REPO_ROOT, UserError, one_line
from files import save_json

GRID_KEYS = {'methods', 'datasets', 'seeds', 'recipe', 'results-dir', 'overrides'}
SWEEP_FILE = 'sweep.json'      # the plan, in the results folder: report.py --paper reads it


class SweepError(UserError):
    """A bad grid or sweep flag (one line naming the file or flag)."""


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


# What the sweep itself gives each run (its cell, its seed, its folder) or does to it (resume): an
# override of one would run every seed of a cell as the same run, or write runs into folders named
# after other settings, and the table would average copies. Refused in the grid, by argparse dest.
SWEEP_OWNS = {
    'dataset': 'the grid\'s datasets set it', 'loss': 'the grid\'s methods set it', 'seed': 'the grid\'s seeds set it',
    'recipe': 'the grid\'s recipe (or method:recipe) sets it', 'results_dir': 'the grid\'s results-dir sets it',
    'run_name': 'the sweep names each run', 'resume': 'the sweep resumes interrupted runs itself',
    'overwrite': 'the sweep never replaces a run (move a folder away instead)', 'evaluate': 'a sweep trains'}


def _action_of(key: str):
    """The main_clip.py argparse action of `--key`, as argparse resolves it (prefixes included);
    None for a flag it does not know (main_clip.py refuses that itself, in one line)."""
    actions = _option_actions()
    flag = f'--{key}'
    if flag in actions:
        return actions[flag]
    matches = {id(action): action for opt, action in actions.items() if opt.startswith(flag)}
    return matches.popitem()[1] if len(matches) == 1 else None


@functools.lru_cache(maxsize=1)
def _option_actions() -> dict:
    """main_clip.py's option strings -> their argparse actions."""
    import main_clip

    return {opt: action for action in main_clip.build_parser()._actions for opt in action.option_strings}


def _check_overrides(path: Path, table: dict, where: str, nested_ok: bool) -> None:
    import methods as methods_module

    for key, value in table.items():
        if isinstance(value, dict):
            if not nested_ok:
                raise SweepError(f'{path}: {where}.{key}: sub-tables go one level deep, [overrides.<dataset>] '
                                 'or [overrides.<method>]; a run takes the dataset\'s and then the method\'s')
            if key not in DATASETS and key not in methods_module.METHODS:
                raise SweepError(f'{path}: {where}.{key}: a sub-table must be named after a dataset or a method')
            _check_overrides(path, value, f'{where}.{key}', False)
            continue
        if not isinstance(key, str) or key.startswith('-'):
            continue  # _flags names it
        action = _action_of(key)
        dest = None if action is None else action.dest
        if isinstance(value, bool) and action is not None and action.nargs != 0:  # false was dropped silently
            raise SweepError(f'{path}: {where}.{key} = {str(value).lower()}: --{key} takes a value, not true or '
                             'false (true/false are for on/off flags such as no-pretrained)')
        if dest in SWEEP_OWNS:
            raise SweepError(f'{path}: {where}.{key}: not an override, {SWEEP_OWNS[dest]} (as an override every '
                             'run of a cell could be the same run under another name)')
        if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            raise SweepError(f'{path}: {where}.{key}: a list of plain values only')


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

    for key in ('methods', 'datasets'):
        if not all(isinstance(v, str) for v in data[key]):
            raise SweepError(f'{path}: {key} must be a list of names (strings)')
    for key in ('recipe', 'results-dir'):
        if key in data and not isinstance(data[key], str):
            raise SweepError(f'{path}: {key} must be a string')
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
    _check_overrides(path, overrides, 'overrides', True)
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


def write_plan(grid: Grid, specs: list[RunSpec]) -> None:
    """<results>/sweep.json: the grid and every run's name, cell and arguments (report.py --paper)."""
    save_json(grid.results_dir / SWEEP_FILE, {
        'grid': str(grid.file), 'recipe': grid.recipe, 'methods': grid.methods, 'datasets': grid.datasets,
        'seeds': grid.seeds,
        'runs': [{'name': s.name, 'cell': s.cell, 'method': s.method, 'recipe': s.recipe, 'dataset': s.dataset,
                  'seed': s.seed, 'argv': list(s.argv)} for s in specs]})

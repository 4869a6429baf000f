"""The originals' own settings and published numbers, read from recipes/*.toml (`--recipe NAME`).

A recipe is what the authors of a method ran for one dataset: optimiser, learning rate, batch,
epochs, image size, backbone and weights, the method's hyper-parameters; each value carries its
source (repository@commit file:line, or the issue thread that gives it), and a value that no
original publishes says so and names this project's choice. The same file holds the published
test mAP of that (method, recipe, dataset) cell, with its source. docs/sweeps.md describes the
files; `python main_clip.py -d coco -l LL-R --recipe original` applies one.

A file `recipes/<METHOD>.toml` (METHOD = the -l name; `method = "*"` for recipes that apply to
every method, e.g. the transformer heads' training recipes) holds, per recipe NAME:

    [NAME]                     title, code (informative)
    [NAME.all]                 entries shared by every dataset of the recipe
    [NAME.<dataset>]           entries of one dataset (a DATASETS key), and `published`
    [NAME.<dataset>.not_applied]   what the original did that this project does not do, and why

An entry is `key = { value = ..., source = "..." }`. Its key is either a long flag of main_clip.py
without the dashes (`lr`, `batch-size`, `gr-beta`, `boostlu`, ...: applied as that flag), or one of
FACTS (what this project fixes without a flag: weights version, split seed, ...; a test checks the
project's value equals the original's). Flags given on the command line win over the recipe's and
are recorded in the run's config as overrides.
"""
from __future__ import annotations

import argparse
import functools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from config import DATASETS, NUMPY_SEED, REPO_ROOT, RESUMABLE_CHANGES, UserError

RECIPES_DIR = REPO_ROOT / 'recipes'
ANY_METHOD = '*'
TOP_LEVEL = ('title', 'code')  # informative entries of a recipe table


@dataclass(frozen=True)
class Entry:
    """One value of an original and where it comes from."""
    value: object
    source: str
    why: str = ''  # not_applied entries: why this project does not apply it


@dataclass(frozen=True)
class Recipe:
    """The settings of `method` under recipe `name` on `dataset`."""
    method: str
    name: str
    dataset: str
    title: str
    settings: dict = field(default_factory=dict)     # flag name (no dashes) -> Entry
    facts: dict = field(default_factory=dict)        # FACTS key -> Entry
    published: Entry | None = None                   # test mAP of the paper, in percent
    not_applied: dict = field(default_factory=dict)  # key -> Entry (with why)
    file: str = ''

    @property
    def cell(self) -> str:
        return f'{self.method}:{self.name}' if self.name != 'original' else self.method


def _fact(module: str, expression: Callable) -> Callable[[str, str], object]:
    """A FACTS value read from a project module at check time (keeps this module free of torch)."""
    return lambda model, ds: expression(__import__(module), model, ds)


def _default(module: str, function: str, parameter: str):
    """The default value of a keyword of a project function (the value every run uses)."""
    import importlib
    import inspect

    return inspect.signature(getattr(importlib.import_module(module), function)).parameters[parameter].default


# What this project fixes without a flag: key -> function(model, dataset) giving its value here.
FACTS: dict[str, Callable[[str, str], object]] = {
    'backbone-weights': _fact('backbones', lambda m, model, ds: m.pretrained_weights(model)),
    'split-seed': _fact('datasets', lambda m, model, ds: m.SPLIT_SEED),
    'val-fraction': _fact('datasets', lambda m, model, ds: m.VAL_FRACTION),
    'numpy-seed': lambda model, ds: NUMPY_SEED,
    'observed-labels-seed': lambda model, ds: _default('preproc.generate_observed_labels', 'generate_observed', 'seed'),
    'expected-num-pos': lambda model, ds: DATASETS[ds].expected_num_pos,
    'apl-beta': lambda model, ds: DATASETS[ds].apl_beta,
    'apl-neg-proportion': lambda model, ds: _default('losses', 'apl_update', 'neg_proportion'),
}


class RecipeFileError(UserError):
    """A recipes/*.toml file that does not follow the layout above (names the file and key)."""


def _entry(path: Path, where: str, raw, *, not_applied: bool = False) -> Entry:
    if not isinstance(raw, dict) or 'value' not in raw or not str(raw.get('source', '')).strip():
        raise RecipeFileError(f'{path}: {where} must be {{ value = ..., source = "..." }} with a non-empty source')
    extra = set(raw) - {'value', 'source', 'why'}
    if extra:
        raise RecipeFileError(f'{path}: {where} has unknown fields {sorted(extra)}')
    if not_applied and not str(raw.get('why', '')).strip():
        raise RecipeFileError(f'{path}: {where} (not_applied) needs a "why"')
    return Entry(raw['value'], str(raw['source']).strip(), str(raw.get('why', '')).strip())


def _read_part(path: Path, where: str, table: dict, flags) -> tuple[dict, dict, Entry | None, dict]:
    settings, facts, not_applied, published = {}, {}, {}, None
    for key, raw in table.items():
        here = f'{where}.{key}'
        if key == 'not_applied':
            if not isinstance(raw, dict):
                raise RecipeFileError(f'{path}: {here} must be a table')
            not_applied = {k: _entry(path, f'{here}.{k}', v, not_applied=True) for k, v in raw.items()}
        elif key == 'published':
            published = _entry(path, here, raw)
            if not isinstance(published.value, (int, float)) or not 0 <= published.value <= 100:
                raise RecipeFileError(f'{path}: {here} must be a mAP in percent, got {published.value!r}')
        elif key in FACTS:
            facts[key] = _entry(path, here, raw)
        elif flags is None or key in flags:
            settings[key] = _entry(path, here, raw)
        else:
            raise RecipeFileError(f'{path}: {here}: neither a main_clip.py flag (--{key}) nor one of '
                                  f'{", ".join(FACTS)}')
    return settings, facts, published, not_applied


def long_flags(parser: argparse.ArgumentParser) -> frozenset:
    """The long flags of a parser without their dashes: the keys a recipe may set."""
    return frozenset(opt[2:] for action in parser._actions for opt in action.option_strings if opt.startswith('--'))


def load_file(path: Path, flags: frozenset | None = None) -> list[Recipe]:
    """Every (recipe, dataset) of one file; RecipeFileError names the file and key of a bad entry.
    flags: main_clip.py's long flags (long_flags); a key that is neither one of them nor a fact is
    refused. None: every key that is not a fact counts as a setting (for readers of published
    numbers, which need no parser)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise RecipeFileError(f'{path}: not a readable TOML file ({e})') from None
    method = data.get('method')
    if not isinstance(method, str) or not method:
        raise RecipeFileError(f'{path}: needs method = "<the -l name>" (or "*")')
    out = []
    for name, table in data.items():
        if name == 'method':
            continue
        if not isinstance(table, dict):
            raise RecipeFileError(f'{path}: {name} must be a table of a recipe')
        common = table.get('all', {})
        shared = _read_part(path, f'{name}.all', common, flags)
        datasets = [k for k in table if k not in TOP_LEVEL and k != 'all']
        for ds in datasets:
            if ds not in DATASETS:
                raise RecipeFileError(f'{path}: {name}.{ds}: unknown dataset (one of {", ".join(DATASETS)})')
            own = _read_part(path, f'{name}.{ds}', table[ds], flags)
            for kind, mine, theirs in (('setting', own[0], shared[0]), ('fact', own[1], shared[1])):
                twice = sorted(set(mine) & set(theirs))
                if twice:
                    raise RecipeFileError(f'{path}: {name}.{ds} repeats the {kind}s {twice} of {name}.all')
            out.append(Recipe(method=method, name=name, dataset=ds, title=str(table.get('title', name)),
                              settings={**shared[0], **own[0]}, facts={**shared[1], **own[1]}, published=own[2],
                              not_applied={**shared[3], **own[3]}, file=str(path)))
    return out


def load_all(folder: Path = RECIPES_DIR, flags: frozenset | None = None) -> list[Recipe]:
    recipes = []
    for path in sorted(Path(folder).glob('*.toml')):
        recipes += load_file(path, flags)
    return recipes


@functools.lru_cache(maxsize=None)
def _cached_all(folder: str, flags: frozenset | None) -> tuple:
    return tuple(load_all(Path(folder), flags))


def find(name: str, method: str, dataset: str, flags: frozenset | None = None, folder: Path = RECIPES_DIR) -> Recipe:
    """The recipe NAME of -l METHOD on DATASET (the method's own file first, then the files for
    every method); UserError naming what exists otherwise. flags: as load_file."""
    every = _cached_all(str(folder), flags)
    for wanted in (method, ANY_METHOD):
        for r in every:
            if r.method == wanted and r.name == name and r.dataset == dataset:
                return r
    names = sorted({r.name for r in every if r.method in (method, ANY_METHOD)})
    datasets_with = sorted({r.dataset for r in every if r.method in (method, ANY_METHOD) and r.name == name})
    if name in names:
        raise UserError(f'--recipe {name}: -l {method} has it for {", ".join(datasets_with)}, not -d {dataset} '
                        f'(recipes/{method}.toml)')
    raise UserError(f'--recipe {name}: no such recipe for -l {method} (recipes: {", ".join(names) or "none"}; '
                    f'see recipes/)')


# ----------------------------------------------------------------------------------------------
# A recipe as command-line flags


def _number_text(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return repr(value) if isinstance(value, float) else str(value)


def as_flags(recipe: Recipe) -> list[str]:
    """The recipe's settings as main_clip.py arguments (placed before the user's, which win)."""
    argv = []
    for key, entry in recipe.settings.items():
        value = entry.value
        if value is True:
            argv.append(f'--{key}')
        elif value is False:
            continue  # a store_true flag left off
        elif isinstance(value, list):
            argv += [f'--{key}', *(_number_text(v) for v in value)]
        else:
            argv += [f'--{key}', _number_text(value)]
    return argv


# Namespace entries that are not recipe settings: where and how the run goes, and its seed.
LAUNCH_DESTS = frozenset(RESUMABLE_CHANGES | {'gpu', 'run_name', 'resume', 'evaluate', 'overwrite', 'no_sync_bn',
                                              'recipe', 'compile', 'tensorboard', 'seed'})


def overrides(parser: argparse.ArgumentParser, recipe_argv: list[str], given: argparse.Namespace) -> tuple:
    """'--flag value' for every setting the command line changed from what the recipe (and the
    defaults) give, sorted: what config.json records as the run's overrides."""
    base = vars(parser.parse_args(recipe_argv + ['-d', given.dataset, '-l', given.loss]))
    flag_of = {a.dest: next((o for o in a.option_strings if o.startswith('--')), a.option_strings[0])
               for a in parser._actions if a.option_strings}
    out = []
    for dest, value in sorted(vars(given).items()):
        if dest in LAUNCH_DESTS or base.get(dest) == value:
            continue
        flag = flag_of.get(dest, dest)
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out.append(' '.join([flag, *map(str, value)]))
        else:
            out.append(f'{flag} {value}')
    return tuple(out)


def published_cells(folder: Path = RECIPES_DIR) -> dict[tuple[str, str, str], Entry]:
    """{(method, recipe name, dataset): published Entry} of every recipe that has one."""
    return {(r.method, r.name, r.dataset): r.published for r in _cached_all(str(folder), None) if r.published}


def close(a, b) -> bool:
    """Equality of recipe values and the project's, with float tolerance (1e-12 relative)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b

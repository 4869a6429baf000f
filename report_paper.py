"""The paper table of a sweep (report.py --paper SWEEP_DIR): each cell's finished seeds as mean ±
sample std beside the published number (recipes/*.toml), the runs that do not count, the provenance
that differs between a cell's runs; paper.md, paper.csv and paper.png.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from config import VLPLError
from report_plots import PHASE_COLORS, pyplot
from report_runs import ReportError, mean_std, read_json
from report_tables import csv_table, fmt, fmt_mean_std, markdown_table

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
    finished (records.run_status, the definition sweep.py uses) with the config its grid asks for
    (sweep_state.grid_differences: a folder trained before the grid was edited does not count). A
    cell has a published number only when its runs follow a recipe: without one they run this
    project's defaults, not the original's settings."""
    import paper_recipes
    import records
    from sweep_grid import SWEEP_FILE
    from sweep_state import grid_differences, parse_run_argv

    plan_path = sweep_dir / SWEEP_FILE
    if not plan_path.is_file():
        raise ReportError(f'{sweep_dir}: no {SWEEP_FILE}; --paper reads the folder of a sweep (python sweep.py GRID)')
    plan = read_json(plan_path)
    runs = plan.get('runs', [])
    needed = ('name', 'cell', 'method', 'dataset', 'seed')
    if not isinstance(runs, list) or not all(isinstance(r, dict) and all(k in r for k in needed) for r in runs):
        raise ReportError(f'{plan_path}: damaged (each of its runs needs {", ".join(needed)}): run the sweep again '
                          '(python sweep.py GRID: it rewrites the file and skips finished runs)')
    cells: dict[tuple, PaperCell] = {}
    for run in runs:
        key = (run['cell'], run['dataset'])
        if key not in cells:
            recipe = run.get('recipe')
            cells[key] = PaperCell(run['cell'], run['method'], recipe, run['dataset'])
            try:
                if recipe is not None:
                    r = paper_recipes.find(recipe, run['method'], run['dataset'])
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
        log = read_json(folder / 'log.json')
        config = read_json(folder / 'config.json')
        if isinstance(run.get('argv'), list):
            wanted, problem = parse_run_argv(run['argv'])
            diffs = [problem] if wanted is None else grid_differences(config, wanted)
            if diffs:
                cell.why_missing[seed] = (f'{folder / "config.json"} is not the run the grid asks for '
                                          f'({"; ".join(diffs)[:300]}): move the folder away and run the sweep again')
                continue
        cell.results[seed] = log.get('best_test_map')
        record = config.get('record')  # provenance, and the data's fingerprint (fingerprint.summary)
        record = record if isinstance(record, dict) else {}
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
    text = fmt_mean_std(mean, std) + f' (n={len(cell.results)})'
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
            line += [_cell_text(c), fmt(None if c.published is None else float(c.published.value)),
                     'n/a' if diff is None else f'{diff:+.2f}' + (' (!)' if abs(diff) > tolerance else '')]
        md_rows.append(line)
    md = markdown_table(header, md_rows, 'l' + 'rrr' * len(datasets))
    csv_rows = []
    for c in cells:
        mean, std = c.mean_std
        diff = c.difference
        csv_rows.append([c.cell, c.method, c.recipe or '', c.dataset, len(c.planned), len(c.results),
                         ' '.join(map(str, sorted(c.results))), ' '.join(map(str, c.missing)), mean, std,
                         None if c.published is None else float(c.published.value),
                         None if diff is None else diff, None if diff is None else int(abs(diff) > tolerance),
                         '' if c.published is None else c.published.source])
    csv_text = csv_table(['cell', 'method', 'recipe', 'dataset', 'seeds_planned', 'seeds_finished', 'seeds', 'missing_seeds',
                     'test_map_mean', 'test_map_std', 'published', 'difference', 'beyond_tolerance',
                     'published_source'], csv_rows)
    return md, csv_text


def plot_paper(cells: list[PaperCell], path: Path, tolerance: float) -> None:
    """One panel per dataset: ours (mean, sample std as error bar, seeds as crosses) beside the
    published number (black diamond); a row whose difference exceeds the tolerance in red."""
    plt = pyplot()
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    rows = list(dict.fromkeys(c.cell for c in cells))
    by_key = {(c.cell, c.dataset): c for c in cells}
    labelled: set = set()

    def first(label: str):
        if label in labelled:
            return None
        labelled.add(label)
        return label
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
                            label=first('ours (mean ± std)'))
                ax.plot(list(c.results.values()), [y] * len(c.results), 'x', color=color, alpha=0.6)
            if c.published is not None:
                ax.plot([float(c.published.value)], [y], 'D', color='black', markersize=6,
                        label=first('published'))
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [''] * len(rows))
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set(title=d, xlabel='test mAP (%)')
    if labelled:  # the first marker of each kind, whichever row or panel has it (none: no legend)
        fig.legend(loc='outside lower left', ncol=2, fontsize=8)
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
          f'source in paper.csv); "diff": ours minus paper, (!) beyond {tolerance:g} points. A cell without a '
          'recipe ran this project\'s defaults and is not compared (set recipe = "original" in the grid).', '',
          md_table,
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

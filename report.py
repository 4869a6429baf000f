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
import sys
from pathlib import Path

from config import number
from report_paper import PAPER_TOLERANCE, write_paper
from report_plots import group_title, plot_curves, plot_map_by_group, plot_per_class
from report_runs import ReportError, Run, find_run_folders, group_runs, left_out_line, load_run, select_runs
from report_tables import csv_table, group_per_class, groups_table, per_class_markdown, runs_table

# What a report writes into --out (glob patterns): an earlier report's files that this one does not
# write again are removed.
REPORT_FILES = ('report.md', 'runs.csv', 'groups.csv', 'per_class_ap.csv', 'map_by_group.png', 'curves_*.png',
                'per_class_ap_*.png')


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
        md.append(f'![{group_title(g)}]({name})\n')

    md.append('## Per-class AP of the best epoch\n')
    per_class_rows = []
    for g in groups:
        pc = group_per_class(g)
        md.append(f'### {group_title(g)}\n')
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
        write('per_class_ap.csv', csv_table(['run', 'class', 'val_ap', 'test_ap'], per_class_rows))
    write('report.md', '\n'.join(md))
    for path in earlier - set(written):  # e.g. the plots of a group that is not in this report
        path.unlink(missing_ok=True)
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
    p.add_argument('--tolerance', type=number(float, low=0), default=PAPER_TOLERANCE,
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
        runs, skipped = [], 0
        for folder in find_run_folders(args.runs):
            try:
                runs.append(load_run(folder))
            except ReportError as e:
                skipped += 1
                print(f'skipped {e}', file=sys.stderr)
        if not runs:
            raise ReportError(f'none of the {skipped} run folders found could be read (see the lines above)' if skipped
                              else 'no run with a log.json among the given folders; train one with main_clip.py first')
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

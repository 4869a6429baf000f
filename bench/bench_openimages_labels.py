"""Peak memory and time of OpenImages-scale label handling: formatting, one epoch's label reads, evaluation.

Run from the repository root: python bench/bench_openimages_labels.py
Defaults: a synthetic 200,000 x 9,600 train label set in the official layout (oidv6 CSVs, about 9
human verifications per image, a third of them positive, classes drawn with Zipf-like popularity,
empty image files) and a 20,000-image test set, written to a temporary folder that is removed at
the end (about 2.2 GB). Each measurement runs in its own process, which reports its peak resident
memory (ru_maxrss, memory-mapped file pages included) and its resident memory after the imports:

  format     preproc/format_openimages.py on the CSVs (the int8 tables written in blocks of rows)
  epoch      datasets.load_splits + the CSL method + every training batch's observed and true rows
             (method.observed[index], train_true[index]: what engine.train_one_epoch reads), one epoch
             of batches of 64 in FlipSampler order
  eval       metrics.compute_metrics_annotated over the whole 200,000 x 9,600 table against scores
             computed on demand from (row, class) (a stand-in for predictions: the run holds its own
             N x K float32 predictions, 7.7 GB at this size, which no label code copies)
  old/new    on the first --compare-images rows, with the scores as an in-memory float32 array: the
             current dense metrics.compute_metrics (every entry counts, labels == 1) and the masked
             compute_metrics_annotated, side by side; the dense one's figures at the full size are
             extrapolated linearly in N (labelled as such)
  fingerprint  the label part of a run's start-up fingerprint (fingerprint.of_run, what --resume
             compares), side by side in one process: as it was (every split's label arrays hashed as
             loaded: train's labels_true and labels_obs, val, test), then as it is with an empty cache
             dir (each table file's sha256 once) and with that cache warm (a later start, or --resume)

--stages NAME,... runs only those (format always runs first: the others read its files).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 2 ** 20


def rss_now_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# --------------------------------------------------------------------------- synthetic data

def zipf_weights(num_classes: int) -> np.ndarray:
    w = 1.0 / (np.arange(num_classes) + 10.0)
    return w / w.sum()


def write_official(folder: Path, num_classes: int, phases: dict, per_image: int, seed: int) -> None:
    """oidv6 class files, one label CSV per phase and an empty file per image."""
    rng = np.random.default_rng(seed)
    mids = [f'/m/0b{k:05d}' for k in range(num_classes)]
    (folder / 'oidv6-classes-trainable.txt').write_text(''.join(m + '\n' for m in mids))
    with open(folder / 'oidv6-class-descriptions.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['LabelName', 'DisplayName'])
        w.writerows([m, f'class {k}'] for k, m in enumerate(mids))
    weights = zipf_weights(num_classes)
    for (csv_name, split), n in phases.items():
        (folder / split).mkdir()
        ids = [f'{x:016x}' for x in rng.integers(0, 2 ** 62, size=n)]
        classes = rng.choice(num_classes, size=(n, per_image), p=weights)
        positive = (np.arange(n)[:, None] * 31 + classes * 17) % 3 == 0  # a function of (image, class)
        with open(folder / csv_name, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['ImageID', 'Source', 'LabelName', 'Confidence'])
            for i, image_id in enumerate(ids):
                w.writerows((image_id, 'verification', mids[c], int(p)) for c, p in zip(classes[i], positive[i]))
        for image_id in ids:
            open(folder / split / f'{image_id}.jpg', 'wb').close()


class HashedScores:
    """N x K float32 scores in [0, 1) computed on demand from (row, class) by a multiplicative hash:
    read by [rows, columns] slices like an array (in blocks of rows, so the hash's temporaries stay
    small), never held whole."""

    ROWS = 512

    def __init__(self, num_rows: int, num_classes: int):
        self.shape = (num_rows, num_classes)

    def __getitem__(self, key) -> np.ndarray:
        rows, columns = key
        r = np.arange(self.shape[0], dtype=np.uint64)[rows]
        c = np.arange(self.shape[1], dtype=np.uint64)[columns]
        out = np.empty((len(r), len(c)), dtype=np.float32)
        for a in range(0, len(r), self.ROWS):
            x = r[a:a + self.ROWS, None] * np.uint64(self.shape[1]) + c[None, :]
            x *= np.uint64(0x9E3779B97F4A7C15)
            x ^= x >> np.uint64(29)
            x *= np.uint64(0xBF58476D1CE4E5B9)
            np.multiply(x >> np.uint64(40), 2.0 ** -24, out=out[a:a + self.ROWS], casting='unsafe')
        return out


# --------------------------------------------------------------------------- stages (one process each)

def stage_format(work: Path, args) -> dict:
    from preproc import format_openimages

    base = rss_now_mb()
    start = time.perf_counter()
    report = format_openimages.format_openimages(
        work / 'openimages', work / 'openimages', descriptions='oidv6-class-descriptions.csv',
        classes='oidv6-classes-trainable.txt', train_labels='oidv6-train-annotations-human-imagelabels.csv',
        test_labels='test-annotations-human-imagelabels.csv', validation_labels='', train_images='train',
        test_images='test', validation_images='')
    return dict(seconds=time.perf_counter() - start, baseline_rss_mb=base, report=report)


def stage_epoch(work: Path, args) -> dict:
    import torch

    torch.set_num_threads(1)  # the 2-core machine is shared: conversions on more threads only contend
    import datasets
    import image_dataset
    import label_tables
    import methods
    import methods_partial  # noqa: F401 - registers -l CSL
    from config import build_config

    base = rss_now_mb()
    start = time.perf_counter()
    cfg = methods_partial.resolve(build_config(dataset='openimages', loss='CSL', data_root=str(work),
                                               results_dir=str(work / 'results')))
    splits = datasets.load_splits(work, 'openimages')
    method = methods.build_method(cfg, splits['train'].labels_obs, torch.device('cpu'))
    train_true = label_tables.on_device(splits['train'].labels_true, torch.device('cpu'), copy=False)
    sampler = image_dataset.FlipSampler(len(splits['train']), seed=0)
    order = torch.tensor([row for row, _ in sampler])
    rows = 0
    for b in range(0, len(order), args.batch_size):
        index = order[b:b + args.batch_size]
        observed, true = method.observed[index], train_true[index]  # B x K float32, as the engine reads them
        rows += len(observed) + len(true)
    return dict(seconds=time.perf_counter() - start, baseline_rss_mb=base, rows=rows // 2)


def stage_eval(work: Path, args) -> dict:
    import label_tables
    from metrics import BLOCK_ENTRIES, ROW_BLOCK_ENTRIES, compute_metrics_annotated

    path = work / 'openimages' / 'formatted_train_labels.npy'
    table = label_tables.load(path, np.load(path, mmap_mode='r').shape[0], None)
    scores = HashedScores(*table.shape)
    base = rss_now_mb()
    start = time.perf_counter()
    result = compute_metrics_annotated(scores, table)
    seconds = time.perf_counter() - start
    # The same reads of the on-demand scores without the metrics: their share of the time.
    start = time.perf_counter()
    n, k = table.shape
    class_block = max(1, min(k, BLOCK_ENTRIES // n))
    for c0 in range(0, k, class_block):
        scores[:, c0:c0 + class_block]
    row_block = max(1, ROW_BLOCK_ENTRIES // k)
    for r0 in range(0, n, row_block):
        scores[r0:r0 + row_block, :]
    return dict(seconds=seconds, scores_seconds=time.perf_counter() - start, baseline_rss_mb=base,
                map=result['map'], scores_block_mb=n * class_block * 4 / MB)


def _compare_inputs(work: Path, args):
    import label_tables

    path = work / 'openimages' / 'formatted_train_labels.npy'
    full = np.load(path, mmap_mode='r')
    table = label_tables.Annotations(full, np.arange(args.compare_images), source=path)
    preds = HashedScores(args.compare_images, full.shape[1])[:, :]
    return preds, table


def stage_new(work: Path, args) -> dict:
    from metrics import compute_metrics_annotated

    preds, table = _compare_inputs(work, args)
    base = rss_now_mb()
    start = time.perf_counter()
    result = compute_metrics_annotated(preds, table)
    return dict(seconds=time.perf_counter() - start, baseline_rss_mb=base, map=result['map'],
                inputs_mb=preds.nbytes / MB)


def stage_old(work: Path, args) -> dict:
    from metrics import compute_metrics

    preds, table = _compare_inputs(work, args)
    labels = np.asarray(table) == 1  # what the dense code takes: every entry counts, unannotated = negative
    base = rss_now_mb()
    start = time.perf_counter()
    result = compute_metrics(preds, labels)
    return dict(seconds=time.perf_counter() - start, baseline_rss_mb=base, map=result['map'],
                inputs_mb=(preds.nbytes + labels.nbytes) / MB)


def stage_fingerprint(work: Path, args) -> dict:
    import datasets
    import fingerprint
    import methods_partial  # noqa: F401 - registers -l CSL
    from config import build_config

    cfg = methods_partial.resolve(build_config(dataset='openimages', loss='CSL', data_root=str(work),
                                               results_dir=str(work / 'results')))
    splits = datasets.load_splits(work, 'openimages')
    sources = datasets.source_files(cfg.observed)
    stats = {phase: np.zeros((len(split), 2), np.int64) for phase, split in splits.items()}  # no image is read
    base = rss_now_mb()
    start = time.perf_counter()
    before = {f'{phase}/{field}': fingerprint.digest(getattr(splits[phase], field))  # of_run until this change
              for phase, fields in sources.items() for field in fields if getattr(splits[phase], field) is not None}
    times = {'before': time.perf_counter() - start}
    cache = work / 'cache'
    cache.mkdir()
    for name in ('cold', 'warm'):
        start = time.perf_counter()
        fingerprint.of_run(splits, stats, sources, cache)
        times[name] = time.perf_counter() - start
    tables = sum(1 for key in before if '/labels' in key)
    return dict(seconds=times['before'], cold_seconds=times['cold'], warm_seconds=times['warm'],
                baseline_rss_mb=base, label_arrays=tables)


STAGES = {'format': stage_format, 'epoch': stage_epoch, 'eval': stage_eval, 'new': stage_new, 'old': stage_old,
          'fingerprint': stage_fingerprint}


def run_stage(name: str, work: Path, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, '--stage', name, '--work', str(work), *argv],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f'stage {name} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=200_000, help='train images (default: 200000)')
    parser.add_argument('--test-images', type=int, default=20_000, help='test images (default: 20000)')
    parser.add_argument('--classes', type=int, default=9_600, help='trainable classes (default: 9600)')
    parser.add_argument('--per-image', type=int, default=9, help='verifications per image (default: 9)')
    parser.add_argument('--batch-size', type=int, default=64, help='training batch size (default: 64)')
    parser.add_argument('--compare-images', type=int, default=20_000,
                        help='rows of the side-by-side comparison with the dense metrics (default: 20000)')
    parser.add_argument('--workdir', default=tempfile.gettempdir(), help='parent of the temporary folder')
    parser.add_argument('--stages', default=','.join(STAGES),
                        help=f'comma-separated stages to run (default: all, {",".join(STAGES)}); format always runs')
    parser.add_argument('--stage', choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument('--work', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        result = STAGES[args.stage](Path(args.work), args)
        result['peak_rss_mb'] = peak_rss_mb()
        print(json.dumps(result))
        return 0

    passed = [f'--{k.replace("_", "-")}={v}' for k, v in vars(args).items()
              if k in ('images', 'test_images', 'classes', 'per_image', 'batch_size', 'compare_images')]
    work = Path(tempfile.mkdtemp(prefix='bench_openimages_', dir=args.workdir))
    try:
        folder = work / 'openimages'
        folder.mkdir()
        start = time.perf_counter()
        write_official(folder, args.classes, {('oidv6-train-annotations-human-imagelabels.csv', 'train'): args.images,
                                              ('test-annotations-human-imagelabels.csv', 'test'): args.test_images},
                       args.per_image, seed=0)
        rows = sum(1 for _ in open(folder / 'oidv6-train-annotations-human-imagelabels.csv')) - 1
        print(f'synthetic data: {args.images:,} train x {args.classes:,} classes ({rows:,} CSV rows), '
              f'{args.test_images:,} test images; written in {time.perf_counter() - start:.0f} s')
        print(f'load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (uptime), '
              f'{os.cpu_count()} CPUs')
        int8_mb = args.images * args.classes / MB
        print(f'the int8 table: {int8_mb:,.0f} MB; goal: peak under twice that, {2 * int8_mb:,.0f} MB; '
              f'as float32 it would be {4 * int8_mb:,.0f} MB')
        results = {}
        chosen = set(args.stages.split(',')) | {'format'}
        unknown = chosen - set(STAGES)
        if unknown:
            parser.error(f'--stages: unknown {", ".join(sorted(unknown))} (known: {", ".join(STAGES)})')
        for name in [n for n in STAGES if n in chosen]:
            results[name] = r = run_stage(name, work, passed)
            print(f'{name:>6}: peak RSS {r["peak_rss_mb"]:8,.0f} MB (after imports {r["baseline_rss_mb"]:6,.0f} MB), '
                  f'{r["seconds"]:7.1f} s' + (f', mAP {r["map"]:.4f}' if 'map' in r else ''))
            if name == 'format':
                for line in r['report']:
                    print(f'        {line}')
            if name == 'epoch':
                print(f'        includes load_splits and the CSL method; {r["rows"]:,} training rows read twice '
                      f'(observed, true) as float32 in shuffled batches of {args.batch_size}, one torch thread')
            if name == 'eval':
                print(f'        of which computing the stand-in scores: {r["scores_seconds"]:.1f} s; the peak includes '
                      f'one block of them ({r["scores_block_mb"]:,.0f} MB, a view of the predictions in a run)')
            if name == 'fingerprint':
                print(f'        the start-up fingerprint of the labels: before {r["seconds"]:.3g} s ({r["label_arrays"]} '
                      f'label arrays hashed as loaded); now {r["cold_seconds"]:.3g} s with an empty cache dir, '
                      f'{r["warm_seconds"]:.3g} s warm (later starts, --resume); before/cold '
                      f'{r["seconds"] / r["cold_seconds"]:.3g}, before/warm {r["seconds"] / r["warm_seconds"]:.3g}')
        if not {'new', 'old', 'eval'} <= chosen:
            return 0
        new, old = results['new'], results['old']
        scale = args.images / args.compare_images
        print(f'side by side on {args.compare_images:,} x {args.classes:,} (scores in memory, '
              f'{new["inputs_mb"]:,.0f} MB): masked {new["seconds"]:.1f} s, peak {new["peak_rss_mb"]:,.0f} MB; '
              f'dense {old["seconds"]:.1f} s, peak {old["peak_rss_mb"]:,.0f} MB; time ratio dense/masked '
              f'{old["seconds"] / new["seconds"]:.2f}')
        extra = old['peak_rss_mb'] - old['baseline_rss_mb']
        print(f'dense metrics at {args.images:,} x {args.classes:,}, EXTRAPOLATED linearly in N from '
              f'{args.compare_images:,} (x{scale:g}): about {old["seconds"] * scale:,.0f} s and '
              f'{old["baseline_rss_mb"] - old["inputs_mb"] + scale * (old["inputs_mb"] + extra):,.0f} MB peak '
              f'(measured masked at full size: {results["eval"]["seconds"]:.0f} s, '
              f'{results["eval"]["peak_rss_mb"]:,.0f} MB)')
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

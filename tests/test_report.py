"""report.py on fake run folders written as training writes them (config.json, TrainLogger.save_json):
table values equal log.json, seeds grouped with the right mean and sample std, per-class AP from
per_class_ap.json or absent, PNGs that open."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import report
import report_runs
from instrumentation import TrainLogger
from metrics import average_precision_per_class

CLASSNAMES = ['red circle', 'blue square', 'green triangle', 'yellow star']
CONFIG = {'dataset': 'demo', 'loss': 'EM_PL', 'model': 'small_cnn', 'temp': 0.01, 'threshold': 0.3, 'partial': 0.0,
          'seed': 0, 'data_root': 'data', 'results_dir': 'results', 'cache_dir': 'cache', 'epochs': 4,
          'batch_size': 32, 'lr': 0.001, 'image_size': 64, 'num_workers': 2, 'device': 'auto',
          'clip_model': 'vlpl-demo-tiny', 'clip_pretrained': 'data/demo/clip/vlpl-demo-tiny.pt', 'clip_mode': 'cache',
          'text_features': None, 'backbone_weights': None, 'pretrained': True, 'amp': False, 'channels_last': False,
          'skip_bad_images': False, 'alpha': 0.1, 'beta': 0.2, 'beta_pos': 0.7, 'beta_neg': 0.0, 'warmup_epoch': 0,
          'run_dir': ''}


def make_run(results: Path, seed: int, *, per_class: bool = True, pl: bool = True, stopped_after: int | None = None,
             **changes) -> Path:
    """A run folder as main_clip.run writes it, from noisy predictions that improve with the epoch;
    stopped_after: the folder of a run killed (or still running) after that epoch."""
    cfg = {**CONFIG, 'seed': seed, **changes}
    folder = results / f'{cfg["dataset"]}_{cfg["loss"]}_{cfg["model"]}_s{seed}'
    cfg['run_dir'] = str(folder)
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text(json.dumps(cfg, indent=2))
    rng = np.random.RandomState(seed)
    num_classes = len(CLASSNAMES)
    labels = {p: (rng.rand(n, num_classes) < 0.4).astype(np.float32) for p, n in (('train', 30), ('val', 12), ('test', 16))}
    logger = TrainLogger(cfg['epochs'], num_classes)
    preds_at_best = {}
    for epoch in range(1, (stopped_after or cfg['epochs']) + 1):
        for phase, y in labels.items():
            preds = np.clip(0.5 * rng.rand(*y.shape) + 0.12 * epoch * y, 0, 1)
            logger.log_phase(epoch, phase, preds, y, y, -0.3 / epoch if phase == 'train' else None)
            if phase == 'test' and logger.best_epoch == epoch:
                preds_at_best = {'val': last_val, 'test': preds}
            last_val = preds
        if pl:
            logger.log_scalar(epoch, 'train', 'pl_precision', 0.9 - 0.01 * epoch)
            logger.log_scalar(epoch, 'train', 'pl_recall', 0.3 + 0.02 * epoch)
    logger.save_json(folder / 'log.json')
    if per_class:
        ap = {p: average_precision_per_class(preds_at_best[p], labels[p] == 1).tolist() for p in ('val', 'test')}
        (folder / 'per_class_ap.json').write_text(json.dumps({'classnames': CLASSNAMES, **ap}))
    return folder


@pytest.fixture()
def results(tmp_path) -> Path:
    results = tmp_path / 'results'
    for seed in (0, 1):
        make_run(results, seed)
    make_run(results, 0, loss='an', per_class=False, pl=False)
    return results


def read_csv(path: Path) -> list[dict]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_report_two_seeds(results, tmp_path, capsys):
    out = tmp_path / 'report'
    assert report.main([str(results), '--out', str(out)]) == 0
    logs = {f.name: json.loads((f / 'log.json').read_text()) for f in sorted(results.iterdir())}

    runs = {r['run']: r for r in read_csv(out / 'runs.csv')}
    assert set(runs) == set(logs)
    for name, log in logs.items():                         # the table holds exactly log.json's values
        assert float(runs[name]['val_map']) == log['best_val_map']
        assert float(runs[name]['test_map']) == log['best_test_map']
        assert int(runs[name]['best_epoch']) == log['best_epoch']
    assert runs['demo_EM_PL_small_cnn_s1']['seed'] == '1' and runs['demo_an_small_cnn_s0']['method'] == 'an'
    assert runs['demo_EM_PL_small_cnn_s0']['head'] == 'linear' and runs['demo_EM_PL_small_cnn_s0']['backbone'] == 'small_cnn'

    groups = {g['method']: g for g in read_csv(out / 'groups.csv')}
    em = groups['EM_PL']
    tests = [logs[f'demo_EM_PL_small_cnn_s{s}']['best_test_map'] for s in (0, 1)]
    vals = [logs[f'demo_EM_PL_small_cnn_s{s}']['best_val_map'] for s in (0, 1)]
    assert em['n'] == '2' and em['seeds'] == '0 1'
    assert float(em['test_map_mean']) == pytest.approx((tests[0] + tests[1]) / 2, abs=1e-12)
    # sample std of two values: |a - b| / sqrt(2)
    assert float(em['test_map_std']) == pytest.approx(abs(tests[0] - tests[1]) / np.sqrt(2), abs=1e-12)
    assert float(em['val_map_std']) == pytest.approx(abs(vals[0] - vals[1]) / np.sqrt(2), abs=1e-12)
    assert groups['an']['n'] == '1' and groups['an']['test_map_std'] == ''

    md = (out / 'report.md').read_text()
    mean, std = (tests[0] + tests[1]) / 2, abs(tests[0] - tests[1]) / np.sqrt(2)
    assert f'{mean:.2f} ± {std:.2f}' in md
    assert 'sample standard deviation' in md
    assert 'Not available: no per_class_ap.json or test_preds_best.npy' in md

    per_class = read_csv(out / 'per_class_ap.csv')
    s0 = json.loads((results / 'demo_EM_PL_small_cnn_s0' / 'per_class_ap.json').read_text())
    rows = [r for r in per_class if r['run'] == 'demo_EM_PL_small_cnn_s0']
    assert [r['class'] for r in rows] == CLASSNAMES
    assert [float(r['test_ap']) for r in rows] == pytest.approx([100 * v for v in s0['test']])
    assert np.mean([float(r['test_ap']) for r in rows]) == pytest.approx(logs['demo_EM_PL_small_cnn_s0']['best_test_map'])

    pngs = sorted(p.name for p in out.glob('*.png'))
    assert pngs == ['curves_demo_EM_PL_small_cnn.png', 'curves_demo_an_small_cnn.png', 'map_by_group.png',
                    'per_class_ap_demo_EM_PL_small_cnn.png']
    for name in pngs:
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == 'PNG' and min(img.size) > 200
        assert f']({name})' in md


def test_settings_split_groups_and_errors(tmp_path, capsys):
    results = tmp_path / 'results'
    a = make_run(results / 'a', 0, pl=False)
    b = make_run(results / 'b', 0, lr=0.01, per_class=False, pl=False)
    (results / 'crashed').mkdir()
    (results / 'crashed' / 'config.json').write_text(json.dumps(CONFIG))
    out = tmp_path / 'report'
    assert report.main([str(a), str(b), str(results / 'crashed'), '--out', str(out)]) == 0
    err = capsys.readouterr().err
    assert err.strip() == f'skipped {results / "crashed"}: no log.json (no epoch has finished)'
    groups = read_csv(out / 'groups.csv')
    assert [g['settings'] for g in groups] == ['lr=0.001', 'lr=0.01']   # same columns, told apart
    assert [r['run'] for r in read_csv(out / 'runs.csv')] == ['a/demo_EM_PL_small_cnn_s0', 'b/demo_EM_PL_small_cnn_s0']

    assert report.main([str(tmp_path / 'missing')]) == 2
    assert capsys.readouterr().err.startswith(f'error: {tmp_path / "missing"}: no such folder')
    (tmp_path / 'grid.toml').write_text('methods = ["an"]\n')
    assert report.main([str(tmp_path / 'grid.toml')]) == 2
    assert capsys.readouterr().err.startswith(f'error: {tmp_path / "grid.toml"}: a file, not a folder; a sweep\'s '
                                              'table: report.py --paper RESULTS_DIR')
    assert report.main([str(results / 'crashed'), '--out', str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f'skipped {results / "crashed"}: no log.json')
    assert err[-1] == 'error: none of the 1 run folders found could be read (see the lines above)'
    (results / 'crashed' / 'log.json').write_text('{"epochs": [')  # cut short: named, not 'no log.json'
    (results / 'crashed' / 'config.json').write_text('{"dataset": "de')
    assert report.main([str(results / 'crashed'), '--out', str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith('skipped ') and 'json' in err[0] and err[-1].startswith('error: none of the 1 run folders')


def test_a_run_started_from_a_checkpoint_is_not_a_seed_of_runs_from_scratch(tmp_path):
    """QA round 3: init_from was ignored like a folder, so a fine-tuned run and runs trained from
    scratch were averaged as seeds of one group. Its path may differ per seed: only set / not set counts."""
    results = tmp_path / 'results'
    make_run(results, 0, pl=False)
    make_run(results, 1, pl=False, init_from='/x/EM_s0/best.pt')
    make_run(results, 2, pl=False, init_from='/x/EM_s2/best.pt')
    assert report.main([str(results), '--out', str(tmp_path / 'report')]) == 0
    groups = read_csv(tmp_path / 'report' / 'groups.csv')
    assert [(g['settings'], g['seeds']) for g in groups] == [('', '0'), ('init_from=a checkpoint', '1 2')]


def test_mean_std():
    assert report_runs.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(np.std([1, 2, 4], ddof=1)))
    assert report_runs.mean_std([3.0, None]) == (3.0, None)
    assert report_runs.mean_std([]) == (None, None)


def test_per_class_recomputed_from_test_preds(tiny_pascal, tmp_path, capsys):
    """Runs written before per_class_ap.json existed: test AP from test_preds_best.npy and the test labels."""
    import datasets
    import class_text_features

    folder = make_run(tmp_path / 'results', 0, per_class=False, dataset='pascal', data_root=str(tiny_pascal))
    labels = datasets.load_splits(tiny_pascal, 'pascal')['test'].labels_true
    preds = np.random.RandomState(0).rand(*labels.shape)
    preds[3] = np.nan                                            # an image skipped in training
    np.save(folder / 'test_preds_best.npy', preds)
    out = tmp_path / 'report'
    assert report.main([str(folder), '--out', str(out)]) == 0
    rows = read_csv(out / 'per_class_ap.csv')
    keep = np.arange(len(labels)) != 3
    expected = 100 * average_precision_per_class(preds[keep], labels[keep] == 1)
    assert [r['class'] for r in rows] == class_text_features.read_classnames('pascal')
    assert [float(r['test_ap']) for r in rows] == pytest.approx(expected.tolist())
    assert all(r['val_ap'] == '' for r in rows)
    assert 'recomputed from test_preds_best.npy' in (out / 'report.md').read_text()


def test_incomplete_diverged_repeated_and_twice_given_runs_stay_out_of_the_means(tmp_path, capsys):
    """Issue 29 item 5: a run stopped in epoch 2 of 4 (or still running) is marked and left out of its
    group's mean (it was averaged in as if finished), as is a run without a finite mAP; a folder named
    twice counts once; a copy of a seed is named and not counted again; --include-incomplete counts
    the incomplete ones."""
    import shutil

    results = tmp_path / 'results'
    done = make_run(results, 0)
    cut = make_run(results, 1, stopped_after=2)
    nan = make_run(results, 2)
    log = json.loads((nan / 'log.json').read_text())
    (nan / 'log.json').write_text(json.dumps(log | {'best_val_map': None, 'best_test_map': None}))
    shutil.copytree(done, results / 'copy_of_s0')
    finished = json.loads((done / 'log.json').read_text())
    out = tmp_path / 'report'
    assert report.main([str(results), str(done), str(results / '..' / 'results' / done.name), '--out', str(out)]) == 0
    stdout = capsys.readouterr().out
    assert 'Left out of the group means: 3 runs (1 repeated seed, 1 incomplete, 1 no finite mAP)' in stdout

    runs = read_csv(out / 'runs.csv')
    assert [r['run'] for r in runs] == ['copy_of_s0', done.name, cut.name, nan.name]  # each folder once
    status = {r['run']: (r['status'], r['in_group_mean'], r['left_out']) for r in runs}
    assert status[cut.name] == ('incomplete (2/4 epochs)', 'False', 'incomplete')
    assert status[nan.name] == ('no finite mAP', 'False', 'no finite mAP')
    assert status['copy_of_s0'] == ('complete', 'True', '')
    assert status[done.name] == ('complete', 'False', 'repeats seed 0 of copy_of_s0')
    group, = read_csv(out / 'groups.csv')
    assert (group['n'], group['seeds']) == ('1', '0')
    assert float(group['test_map_mean']) == finished['best_test_map'] and group['test_map_std'] == ''
    md = (out / 'report.md').read_text()
    assert 'incomplete (2/4 epochs)' in md and '--include-incomplete counts the incomplete' in md

    assert report.main([str(results), '--out', str(out), '--include-incomplete']) == 0
    group, = read_csv(out / 'groups.csv')
    cut_log = json.loads((cut / 'log.json').read_text())
    assert (group['n'], group['seeds']) == ('2', '0 1')
    assert float(group['test_map_mean']) == pytest.approx((finished['best_test_map'] + cut_log['best_test_map']) / 2)


def test_include_incomplete_keeps_the_complete_run_of_a_seed_over_its_killed_copy(tmp_path):
    """A killed copy of seed 0 whose folder sorts first (a_killed) must not represent the seed with
    --include-incomplete: the seed's first complete run does (b_complete), and the killed copy is the
    repeat. An incomplete run still represents a seed that has no complete run (seed 1)."""
    import shutil

    results = tmp_path / 'results'
    done = make_run(results, 0)
    alone = make_run(results, 1, stopped_after=2)
    shutil.move(done, results / 'b_complete')
    shutil.copytree(results / 'b_complete', results / 'a_killed')
    log = json.loads((results / 'a_killed' / 'log.json').read_text())
    log['logged'] = {phase: [True, False] + [False] * (len(v) - 2) for phase, v in log['logged'].items()}
    (results / 'a_killed' / 'log.json').write_text(json.dumps(log | {'best_val_map': 99.0, 'best_test_map': 99.0}))
    finished = json.loads((results / 'b_complete' / 'log.json').read_text())
    alone_log = json.loads((alone / 'log.json').read_text())
    out = tmp_path / 'report'
    assert report.main([str(results), '--out', str(out), '--include-incomplete']) == 0
    status = {r['run']: (r['in_group_mean'], r['left_out']) for r in read_csv(out / 'runs.csv')}
    assert status['b_complete'] == ('True', '')
    assert status['a_killed'] == ('False', 'repeats seed 0 of b_complete')
    assert status[alone.name] == ('True', '')
    group, = read_csv(out / 'groups.csv')
    assert (group['n'], group['seeds']) == ('2', '0 1')
    assert float(group['test_map_mean']) == pytest.approx((finished['best_test_map'] + alone_log['best_test_map']) / 2)


def test_a_report_removes_the_plots_of_an_earlier_report_in_the_same_folder(results, tmp_path, capsys):
    """Issue 29 item 5: plots of a group that is no longer reported do not stay beside the new report."""
    out = tmp_path / 'report'
    (out / 'notes.txt').parent.mkdir()
    (out / 'notes.txt').write_text('mine')
    assert report.main([str(results), '--out', str(out)]) == 0
    assert (out / 'curves_demo_an_small_cnn.png').exists()
    assert report.main([str(results / 'demo_EM_PL_small_cnn_s0'), '--out', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        'curves_demo_EM_PL_small_cnn.png', 'groups.csv', 'map_by_group.png', 'notes.txt', 'per_class_ap.csv',
        'per_class_ap_demo_EM_PL_small_cnn.png', 'report.md', 'runs.csv']

"""OpenImages V6 with its real partial annotations (issue 26, item 3): formatting from files in the
official layouts against a truth kept independently, the label tables read lazily, the masked
(annotated-entries-only) metrics against scikit-learn and against CSL's own AP_partial, and one
epoch of `-d openimages` whose test mAP is recomputed here independently."""
from __future__ import annotations

import csv
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

import class_text_features
import config
import datasets
import image_dataset
import engine
import label_tables
import main_clip
import methods
import metrics
import models
from preproc import format_openimages

FIXTURES = Path(__file__).parent / 'fixtures'
NUM_CLASSES = 15


def mid(k: int) -> str:
    return f'/m/0fix{k:02d}'


def write_official(root: Path, seed: int = 0, train: int = 48, test: int = 30) -> dict:
    """Files in the official layouts under root/openimages, and the truth they encode, kept apart from
    any parsing: per phase, the image paths in order and the N x K states the formatted table must hold.

    15 trainable classes (listed in a shuffled order) and a described but non-trainable one whose rows
    must be ignored; per image each class is a positive, an annotated negative or unannotated; some
    images are absent from their folder, some have rows on the non-trainable class only, one pair is
    verified twice, one pair both present and absent (unannotated in the truth); rows of an image are
    contiguous (as in the official files) in a shuffled order."""
    rng = np.random.default_rng(seed)
    folder = root / 'openimages'
    folder.mkdir(parents=True)
    order = rng.permutation(NUM_CLASSES)  # trainable list order = class order
    (folder / 'oidv6-classes-trainable.txt').write_text(''.join(mid(k) + '\n' for k in order))
    with open(folder / 'oidv6-class-descriptions.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['LabelName', 'DisplayName'])
        for k in rng.permutation(NUM_CLASSES + 1):  # NUM_CLASSES: the non-trainable one
            w.writerow([mid(k), f'thing, number {k}' if k % 4 == 0 else f'thing {k}'])
    palette = rng.integers(0, 256, size=(NUM_CLASSES, 3))
    truth = {'classnames': [f'thing, number {k}' if k % 4 == 0 else f'thing {k}' for k in order]}
    for phase, split, n, csv_name in (('train', 'train', train, 'oidv6-train-annotations-human-imagelabels.csv'),
                                      ('val', 'test', test, 'test-annotations-human-imagelabels.csv')):
        (folder / split).mkdir()
        rows_out, kept_paths, kept_states = [], [], []
        for i in range(n):
            image_id = f'{rng.integers(0, 2 ** 60):016x}'
            states = rng.choice([1, -1, 0], size=NUM_CLASSES, p=[0.2, 0.3, 0.5])  # by class position
            only_other = i % 11 == 5                 # rows on the non-trainable class only
            missing = i % 9 == 4                     # no image file
            if only_other:
                states[:] = 0
            elif not states.any():
                states[0] = 1
            image_rows = [(image_id, 'verification', mid(NUM_CLASSES), rng.choice(['0', '1']))]
            for position in np.flatnonzero(states):
                image_rows.append((image_id, rng.choice(['verification', 'crowdsource-verification']),
                                   mid(order[position]), '1' if states[position] == 1 else '0'))
            if i == 2 and not only_other:  # the same verification twice
                image_rows.append(image_rows[-1])
            if i == 3 and not only_other and not missing:  # one pair verified present and absent
                position = int(np.flatnonzero(states)[0])
                image_rows.append((image_id, 'verification', mid(order[position]),
                                   '0' if states[position] == 1 else '1'))
                states[position] = 0
                if not states.any():
                    only_other = True  # nothing annotated is left: the image is left out
            rng.shuffle(image_rows)
            rows_out.extend(image_rows)
            path = f'{split}/{image_id}.jpg'
            if not missing:
                colour = palette[states == 1].mean(axis=0) if (states == 1).any() else np.full(3, 127)
                pixels = np.clip(colour + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / path)
            if not missing and not only_other:
                kept_paths.append(path)
                kept_states.append(states.copy())
        with open(folder / csv_name, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['ImageID', 'Source', 'LabelName', 'Confidence'])
            w.writerows(rows_out)
        truth[phase] = (np.array(kept_paths), np.array(kept_states, dtype=np.int8))
    return truth


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp('openimages')
    truth = write_official(root)
    folder = root / 'openimages'
    assert format_openimages.main(['--load-path', str(folder), '--save-path', str(folder)]) == 0
    return root, truth


# --- formatting --------------------------------------------------------------------------------

def test_formatting_equals_the_truth(official, capsys):
    root, truth = official
    folder = root / 'openimages'
    for phase in ('train', 'val'):
        images = np.load(folder / f'formatted_{phase}_images.npy')
        labels = np.load(folder / f'formatted_{phase}_labels.npy')
        paths, states = truth[phase]
        assert labels.dtype == np.int8 and labels.shape == (len(paths), NUM_CLASSES)
        assert images.tolist() == paths.tolist()
        assert np.array_equal(labels, states)  # every state: positive, annotated negative, unannotated
        assert {-1, 0, 1} == set(np.unique(labels).tolist())
    assert (folder / 'classnames.txt').read_text().splitlines() == truth['classnames']
    order = [line for line in (folder / 'oidv6-classes-trainable.txt').read_text().splitlines()]
    assert (folder / 'class_ids.txt').read_text().splitlines() == order


def test_formatting_reports_what_it_left_out(tmp_path, capsys):
    truth = write_official(tmp_path, seed=1, train=30, test=20)
    folder = tmp_path / 'openimages'
    assert format_openimages.main(['--load-path', str(folder), '--save-path', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    assert 'openimages classes: 15 trainable (oidv6-classes-trainable.txt) of 16 described' in out
    train_line = next(line for line in out.splitlines() if line.startswith('openimages train'))
    # 30 images listed: i % 9 == 4 -> 4 missing (4, 13, 22); i % 11 == 5 -> only other classes (5, 16, 27)
    assert '30 images with labels; 3 missing from their folder (left out)' in train_line
    assert f'{len(truth["train"][0])} images x 15 classes' in train_line
    assert '1 repeated verifications merged, 1 pairs verified both present and absent' in train_line


@pytest.mark.parametrize('edit, message', [
    (lambda f: (f / 'oidv6-classes-trainable.txt').unlink(), 'oidv6-classes-trainable.txt not found'),
    (lambda f: (f / 'test-annotations-human-imagelabels.csv').write_text('ImageID,Source,LabelName\n'),
     'the header lacks Confidence'),
    (lambda f: (f / 'test-annotations-human-imagelabels.csv').write_text(
        'ImageID,Source,LabelName,Confidence\nabc,machine,/m/0fix01,0.7\n'), "Confidence '0.7' is neither 0 nor 1"),
    (lambda f: [p.unlink() for p in (f / 'train').iterdir()], 'no train image of'),
    (lambda f: (f / 'test-annotations-human-imagelabels.csv').write_text(
        'ImageID,Source,LabelName,Confidence\nabc,machine\n'), 'expected 4 fields as in the header, got 2'),
])
def test_bad_official_files_are_one_line_errors(tmp_path, capsys, edit, message):
    write_official(tmp_path, train=12, test=10)
    folder = tmp_path / 'openimages'
    edit(folder)
    assert format_openimages.main(['--load-path', str(folder), '--save-path', str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and '\n' not in err, err
    assert not (folder / 'formatted_train_labels.npy').exists()  # nothing written


def test_display_names_are_one_line_each(tmp_path, capsys):
    """An empty DisplayName, or one holding a (quoted) line break, must not shift the names of
    classnames.txt against class_ids.txt: the empty one keeps its MID, white space becomes one space."""
    truth = write_official(tmp_path, seed=2, train=12, test=10)
    folder = tmp_path / 'openimages'
    ids = (folder / 'oidv6-classes-trainable.txt').read_text().splitlines()
    with open(folder / 'oidv6-class-descriptions.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['LabelName', 'DisplayName'])
        for k in range(NUM_CLASSES):
            w.writerow([mid(k), '' if k == 3 else 'two\nlines' if k == 5 else f'thing {k}'])
    assert format_openimages.main(['--load-path', str(folder), '--save-path', str(folder)]) == 0
    assert '1 without a description keep their MID as name' in capsys.readouterr().out
    names = (folder / 'classnames.txt').read_text().splitlines()
    expected = {mid(k): '' if k == 3 else 'two lines' if k == 5 else f'thing {k}' for k in range(NUM_CLASSES)}
    assert names == [expected[m] or m for m in ids] and len(truth['classnames']) == len(names)
    assert (folder / 'class_ids.txt').read_text().splitlines() == ids


def test_a_classnames_file_that_disagrees_with_class_ids_is_refused(official, tmp_path):
    """read_classnames of a format script's classnames.txt: a blank line or a line count other than
    class_ids.txt's (a file edited by hand) is one line naming the file, not names shifted by a column."""
    root, _ = official
    folder = tmp_path / 'openimages'
    folder.mkdir()
    for name in ('classnames.txt', 'class_ids.txt'):
        shutil.copy(root / 'openimages' / name, folder / name)
    good = (folder / 'classnames.txt').read_text()
    assert class_text_features.read_classnames('openimages', data_root=str(tmp_path)) == good.splitlines()
    (folder / 'classnames.txt').write_text(good.replace('thing 1\n', 'thing\n1\n'))
    with pytest.raises(config.ModelLoadError, match=r'classnames.txt names 16 classes but .*class_ids.txt lists 15'):
        class_text_features.read_classnames('openimages', data_root=str(tmp_path))
    (folder / 'classnames.txt').write_text(good.replace('thing 1\n', '\n'))
    with pytest.raises(config.ModelLoadError, match=r'classnames.txt:\d+ is blank.*format_openimages.py'):
        class_text_features.read_classnames('openimages', data_root=str(tmp_path))


# --- the label tables --------------------------------------------------------------------------

def test_load_splits_keeps_the_tables_lazy(official):
    root, truth = official
    splits = datasets.load_splits(root, 'openimages')
    paths, states = truth['train']
    train_idx, val_idx = datasets.split_indices(len(paths))
    for phase, rows in (('train', train_idx), ('val', val_idx)):
        split = splits[phase]
        assert isinstance(split.labels_obs, label_tables.Annotations) and split.labels_obs is split.labels_true
        assert isinstance(split.labels_true._states, np.memmap)  # read from disk, never loaded whole
        assert np.array_equal(np.asarray(split.labels_true), states[rows])
        assert split.images.tolist() == paths[rows].tolist()
    assert np.array_equal(np.asarray(splits['test'].labels_true), truth['val'][1])
    table = splits['train'].labels_true
    picks = np.array([3, 0, 7, 7])
    assert np.array_equal(table[picks], states[train_idx][picks])
    assert np.array_equal(table[:, 2:9], states[train_idx][:, 2:9])
    assert np.array_equal(np.asarray(table.take(np.arange(len(table)) % 3 == 1)), states[train_idx][1::3])
    rows = label_tables.BatchRows(table, 'cpu')[torch.tensor([5, 1])]
    assert rows.dtype == torch.float32 and torch.equal(rows, torch.tensor(states[train_idx][[5, 1]]).float())
    with pytest.raises(TypeError):
        table == 1  # noqa: B015 - a whole-table comparison is refused
    # A DataLoader worker receives the file's path and its row selection, not the table.
    received = pickle.loads(pickle.dumps(table))
    assert received._states is None and received._path == table._path  # mapped again on first read
    assert np.array_equal(np.asarray(received), states[train_idx]) and isinstance(received._states, np.memmap)


def test_the_fingerprint_hashes_each_table_file_once_and_never_reads_its_rows(official, tmp_path, monkeypatch):
    """fingerprint.of_run digested train/labels_true, train/labels_obs (the same table), val and test by
    reading every row: several passes over a table of millions of rows x 9,605 classes at each start. Now
    each annotation file's sha256 is computed once (cached in the cache dir by size and time, as the
    provenance's) and no row is read; another row selection, or a changed file, is another digest."""
    import fingerprint

    root, _ = official
    splits = datasets.load_splits(root, 'openimages')
    sources = datasets.source_files()
    stats = {phase: np.zeros((len(s), 2), np.int64) for phase, s in splits.items()}

    def no_rows(*a, **k):
        raise AssertionError('an annotation table was read')

    hashed = []
    real_sha256 = fingerprint.sha256_file
    monkeypatch.setattr(label_tables.Annotations, '__getitem__', no_rows)
    monkeypatch.setattr(fingerprint, 'sha256_file', lambda path, cache=None: hashed.append(Path(path).name)
                        or real_sha256(path, cache))
    cache = tmp_path / 'cache'
    cache.mkdir()
    first = fingerprint.of_run(splits, stats, sources, cache)
    assert sorted(hashed) == ['formatted_train_labels.npy', 'formatted_val_labels.npy']  # once each
    monkeypatch.undo()
    assert first['arrays']['train/labels_true']['sha256'] == first['arrays']['train/labels_obs']['sha256']
    assert len({first['arrays'][f'{p}/labels_true']['sha256'] for p in ('train', 'val', 'test')}) == 3

    # Warm: the next start reads neither the rows nor the files (their sha256 are in the cache).
    monkeypatch.setattr(fingerprint, 'open', lambda *a, **k: pytest.fail('a table file was read'), raising=False)
    monkeypatch.setattr(label_tables.Annotations, '__getitem__', no_rows)
    again = fingerprint.of_run(splits, stats, sources, cache)
    monkeypatch.undo()
    assert again['arrays'] == first['arrays']
    folder = tmp_path / 'copy'
    shutil.copytree(root / 'openimages', folder / 'openimages')
    table = np.load(folder / 'openimages' / 'formatted_train_labels.npy')
    table[splits['train'].labels_true.stored_rows[0], 0] = 1 - table[splits['train'].labels_true.stored_rows[0], 0]
    np.save(folder / 'openimages' / 'formatted_train_labels.npy', table)
    changed = fingerprint.of_run(datasets.load_splits(folder, 'openimages'), stats, sources, cache)
    assert fingerprint.differences(first, changed, {}) == [
        'formatted_train_labels.npy differs from the run\'s']


def test_a_run_fingerprinted_before_resumes_on_the_same_tables(official, monkeypatch):
    """A format-1 fingerprint (annotation tables hashed as loaded) is compared the same way on --resume:
    no false 'differs'; a real change is still named."""
    import fingerprint

    root, _ = official
    splits = datasets.load_splits(root, 'openimages')
    sources = datasets.source_files()
    stats = {phase: np.zeros((len(s), 2), np.int64) for phase, s in splits.items()}
    now = fingerprint.of_run(splits, stats, sources)
    old = {'format': 1, 'stats': now['stats'], 'arrays': {key: entry for key, entry in now['arrays'].items()}}
    for key, entry in now['arrays'].items():
        if entry.get('digest'):  # what format 1 recorded: the table hashed as loaded
            phase, field = key.split('/')
            old['arrays'][key] = {k: v for k, v in entry.items() if k != 'digest'} | {
                'sha256': fingerprint.digest(getattr(splits[phase], field))}
    assert fingerprint.differences(old, now, {})  # compared as they are, they differ
    assert fingerprint.differences(old, fingerprint.as_recorded(old, now, splits), {}) == []
    old['arrays']['val/labels_true']['sha256'] = '0' * 64
    assert fingerprint.differences(old, fingerprint.as_recorded(old, now, splits), {}) == [
        'formatted_train_labels.npy differs from the run\'s']


def test_a_damaged_table_stops_with_one_line(tmp_path):
    labels = np.zeros((4, 3), dtype=np.int8)
    labels[2, 1] = 5
    np.save(tmp_path / 'labels.npy', labels)
    table = label_tables.load(tmp_path / 'labels.npy', 4, 3)
    assert np.array_equal(table[:2], labels[:2])
    with pytest.raises(label_tables.AnnotationError, match=r'labels.npy holds values \[5\]'):
        table[:, 0:3]
    np.save(tmp_path / 'float.npy', labels.astype(np.float32))
    with pytest.raises(label_tables.AnnotationError, match='int8'):
        label_tables.load(tmp_path / 'float.npy', 4, 3)


# --- masked metrics ----------------------------------------------------------------------------

def independent_masked_map(preds: np.ndarray, states: np.ndarray) -> tuple[float, int]:
    """scikit-learn AP per class over the annotated entries; classes without an annotated positive
    and an annotated negative skipped; (mean in percent, number skipped)."""
    aps, skipped = [], 0
    for c in range(states.shape[1]):
        counted = states[:, c] != 0
        y = states[counted, c] == 1
        if not y.any() or y.all():
            skipped += 1
            continue
        aps.append(average_precision_score(y, preds[counted, c]))
    return 100.0 * float(np.mean(aps)), skipped


@pytest.mark.parametrize('seed', [0, 1])
def test_masked_ap_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    preds = np.round(rng.random((400, 37)), 2).astype(np.float32)  # ties too
    states = rng.choice(np.array([1, -1, 0], np.int8), size=(400, 37), p=[0.05, 0.1, 0.85])
    states[:, 3] = 0                    # no annotation
    states[:, 5] = np.where(states[:, 5] == 1, -1, states[:, 5])   # no positive
    states[:, 8] = np.where(states[:, 8] == -1, 1, states[:, 8])   # no negative
    ap, skipped = metrics.average_precision_annotated(preds, states, class_block=8)
    assert skipped == {'no_annotation': 1, 'no_positive': 1, 'no_negative': 1}
    expected, num_skipped = independent_masked_map(preds, states)
    assert num_skipped == 3 and np.isnan(ap[[3, 5, 8]]).all()
    got = metrics.compute_metrics(preds, label_tables.Annotations(states))
    assert got['map'] == pytest.approx(expected, abs=1e-10)
    assert metrics.compute_metrics_annotated(preds, states, class_block=5, row_block=33) == got


def test_masked_metrics_with_every_entry_annotated_are_the_dense_ones():
    """Bit for bit: AP, the top-k metrics and the F1 thresholds (every class has both labels)."""
    rng = np.random.default_rng(3)
    preds = np.round(rng.random((300, 20)), 1).astype(np.float32)
    labels = rng.random((300, 20)) < 0.3
    states = np.where(labels, 1, -1).astype(np.int8)
    dense, masked = metrics.compute_metrics(preds, labels), metrics.compute_metrics_annotated(preds, states)
    assert masked == dense
    assert np.array_equal(metrics.average_precision_annotated(preds, states)[0],
                          metrics.average_precision_per_class(preds, labels))
    assert np.array_equal(metrics.choose_thresholds_annotated(preds, states, class_block=7),
                          metrics.choose_thresholds(preds, labels))


def test_masked_top_k_ranks_annotated_entries_only():
    preds = np.array([[0.9, 0.8, 0.1, 0.7],
                      [0.2, 0.9, 0.6, 0.1]], dtype=np.float32)
    states = np.array([[0, 1, -1, 0],      # the best score is unannotated: the positive ranks first
                       [1, 0, 0, 0]], dtype=np.int8)   # one annotated entry: ranked first, counted once
    got = metrics.compute_metrics_annotated(preds, states)
    assert got['prec_at_1'] == 1.0 and got['rec_at_1'] == 1.0
    assert got['prec_at_3'] == pytest.approx(2 / 6) and got['rec_at_5'] == 1.0


def test_masked_ap_equals_csl_ap_partial():
    """CSL's own AP_partial (PartialLabelingCSL, src/helper_functions/helper_functions.py), run on the
    inputs of tests/fixtures/csl_ap_partial.npz: scores without ties (where CSL's argsort order and
    scikit-learn's grouping agree), its targets 1 / 0 / -1 = positive / negative / unannotated. The
    fixture holds the inputs, its mAP and its three skip counts; see the file's 'how' entry."""
    data = np.load(FIXTURES / 'csl_ap_partial.npz')
    states = np.select([data['targets'] == 1, data['targets'] == 0], [1, -1], 0).astype(np.int8)
    ap, skipped = metrics.average_precision_annotated(data['preds'], states)
    assert [skipped[k] for k in metrics.SKIPPED] == data['skip_counts'].tolist()
    valid = data['ap'] != -1
    assert np.array_equal(np.isnan(ap), ~valid)
    assert np.allclose(ap[valid], data['ap'][valid], rtol=1e-7, atol=0)  # CSL divides by (positives + 1e-8)
    assert 100 * np.mean(ap[valid]) == pytest.approx(float(data['map']), rel=1e-7)


# --- training ----------------------------------------------------------------------------------

def run_args(root: Path, tmp_path: Path, method: str) -> list[str]:
    return ['-d', 'openimages', '-l', method, '--data-root', str(root), '--results-dir', str(tmp_path / 'results'),
            '--cache-dir', str(tmp_path / 'cache'), '-m', 'small_cnn', '--no-pretrained', '--image-size', '24',
            '--epochs', '1', '--batch-size', '8', '--lr', '1e-3', '--num-workers', '0', '--device', 'cpu']


@pytest.mark.parametrize('method', ['CSL', 'an'])
def test_one_epoch_and_its_test_map(official, tmp_path, monkeypatch, method, caplog):
    root, truth = official
    if method == 'CSL':  # the caps of a train split too large to predict whole, scaled to the fixture
        monkeypatch.setitem(config.DATASETS, 'openimages',
                            dataclasses.replace(config.DATASETS['openimages'], max_val_images=4, train_metric_rows=9))
    with caplog.at_level('INFO', logger='vlpl'):
        assert main_clip.main(run_args(root, tmp_path, method)) == 0
    assert ('  val:      4 images' in caplog.text) == (method == 'CSL')
    run = tmp_path / 'results' / f'openimages_{method}_small_cnn_s0'
    log = json.loads((run / 'log.json').read_text())
    preds = np.load(run / 'test_preds_best.npy')
    expected, skipped = independent_masked_map(preds, truth['val'][1])
    assert log['best_test_map'] == pytest.approx(expected, abs=1e-9)
    per_class = json.loads((run / 'per_class_ap.json').read_text())['test']
    assert sum(v is None for v in per_class) == skipped
    assert 'observed' not in torch.load(run / 'last.pt', weights_only=True)['method']  # no copy of the table
    if method == 'CSL':  # its prior file names the classes of the data folder's classnames.txt
        with open(run / 'train_avg_preds.csv', newline='') as f:
            assert [row[0] for row in csv.reader(f)][1:] == truth['classnames']


def test_resume_reproduces_an_uninterrupted_run(official, tmp_path, monkeypatch):
    """The method's state holds no copy of the annotation table; a cut and resumed CSL run (its prior
    restored, its labels read again from the table) equals an uninterrupted one."""
    from conftest import interrupt_after

    root, _ = official
    args = run_args(root, tmp_path, 'CSL') + ['--epochs', '2', '--prior-threshold', '0.3']
    assert main_clip.main(args + ['--run-name', 'full']) == 0
    undo = interrupt_after(monkeypatch, 1)
    assert main_clip.main(args + ['--run-name', 'cut']) == 130
    undo()
    cut, full = tmp_path / 'results' / 'cut', tmp_path / 'results' / 'full'
    assert main_clip.main(['--resume', str(cut)]) == 0
    assert json.loads((full / 'log.json').read_text())['values'] == json.loads((cut / 'log.json').read_text())['values']
    states = [torch.load(d / 'last.pt', weights_only=True) for d in (full, cut)]
    assert all(torch.equal(states[0]['model'][k], states[1]['model'][k]) for k in states[0]['model'])


def test_train_epoch_keeps_the_metric_rows_only(official):
    """engine.train_one_epoch with kept_rows returns exactly those rows of the full epoch's predictions
    (the same training: the predictions are recorded, never used), reading its labels by batch."""
    root, _ = official
    train = datasets.load_splits(root, 'openimages')['train']
    cpu = torch.device('cpu')
    cfg = config.build_config(dataset='openimages', loss='an', model='small_cnn', batch_size=8, lr=1e-3,
                              image_size=24, device='cpu', epochs=1, pretrained=False, data_root=str(root))
    images = image_dataset.MultiLabelImages(datasets.image_root(root, 'openimages'), train, 24, train=True)

    def epoch(kept):
        torch.manual_seed(0)
        model = models.build_classifier('small_cnn', NUM_CLASSES, pretrained=False)
        method = methods.build_method(cfg, train.labels_obs, cpu)
        assert isinstance(method.observed, label_tables.BatchRows)
        loader = torch.utils.data.DataLoader(images, batch_size=8, sampler=image_dataset.FlipSampler(len(train), seed=0),
                                             collate_fn=image_dataset.collate_skipping)
        return engine.train_one_epoch(1, cfg, model, torch.optim.Adam(model.parameters(), 1e-3), loader, method,
                                      label_tables.on_device(train.labels_true, cpu, copy=False), None, cpu,
                                      kept_rows=kept)

    full, loss, _ = epoch(None)
    kept = datasets.metric_rows(len(train), 7)
    part, kept_loss, _ = epoch(kept)
    assert full.shape == (len(train), NUM_CLASSES) and part.shape == (7, NUM_CLASSES)
    assert np.array_equal(part, full[kept]) and kept_loss == loss
    assert datasets.metric_rows(len(train), len(train)) is None


def test_split_indices_caps_the_val_split():
    train, val = datasets.split_indices(1000)
    capped_train, capped_val = datasets.split_indices(1000, max_val=30)
    assert len(val) == 200 and len(capped_val) == 30 and len(capped_train) == 970
    assert set(capped_val) <= set(val) | set(train) and not set(capped_val) & set(capped_train)
    assert np.array_equal(datasets.split_indices(1000, max_val=500)[1], val)  # a cap above 20% changes nothing


@pytest.mark.parametrize('extra, message', [
    (['-l', 'bce'], '-l bce needs clean labels, which -d openimages does not have'),
    (['-l', 'epr'], 'needs the expected number of positives per image'),
    (['-l', 'LL-R'], 'publishes no settings for -d openimages'),
    (['-l', 'CSL', '--observed', 'rps0.5'], '--observed does not apply to -d openimages'),
])
def test_refused_settings_are_one_line(official, tmp_path, capsys, extra, message):
    root, _ = official
    args = run_args(root, tmp_path, 'an')
    args[args.index('-l'):args.index('-l') + 2] = []
    with pytest.raises(SystemExit) as stop:  # refused by the parser, before anything is read
        main_clip.main(args + extra)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and message in err and '\n' not in err, err


# --- pseudo-label quality --------------------------------------------------------------------------

def test_pseudo_label_quality_counts_annotated_entries_only():
    """On annotation states an unannotated entry has no truth: it was counted as a true negative, which
    understated the precision. Hand-computed: of the 5 positive pseudo-labels, 3 fall on annotated
    entries and 2 of those are annotated positives."""
    import pseudo_label_options
    from pseudo_labeler import pseudo_label_quality

    states = np.array([[1, 0, -1], [0, 1, -1]], np.int8)
    pl = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    true = pseudo_label_options.truth_of(label_tables.Annotations(states))
    assert pseudo_label_quality(pl, true) == {'precision': 2 / 3, 'recall': 1.0, 'per_image': 2.5,
                                              'annotated_only': True}
    report = pseudo_label_options.class_quality(pl, true, ['a', 'b', 'c'])
    assert [(c['count'], c['hits'], c['precision']) for c in report['per_class']] == [
        (1, 1, 1.0), (1, 1, 1.0), (1, 0, 0.0)]
    assert '(annotated entries only: unannotated ones have no truth)' in pseudo_label_options.quality_line(
        report, 'on train')
    dense = np.array([[1, 0, 0], [0, 1, 0]], np.float64)  # 0/1 labels: every entry has a truth, as before
    assert pseudo_label_quality(pl, pseudo_label_options.truth_of(dense)) == {
        'precision': 0.4, 'recall': 1.0, 'per_image': 2.5, 'annotated_only': False}


def test_pl_quality_lines_of_an_openimages_run(official, tmp_path, tiny_clip, caplog):
    """-l EM_PL on OpenImages: the train pseudo-labels' precision counts annotated entries (and says so);
    the per-epoch 'PL on unknown' has no truth to compare with (the unknown entries are the unannotated
    ones), so it says n/a instead of 'precision 0.000, recall 0.000', and logs no pl_precision."""
    root, truth = official
    features = tmp_path / 'text.npy'
    np.save(features, np.random.RandomState(0).randn(len(truth['classnames']), 32).astype(np.float32))
    args = run_args(root, tmp_path, 'EM_PL') + ['--threshold', '0.05', '--clip-model', tiny_clip['config'],
                                                '--clip-pretrained', tiny_clip['checkpoint'],
                                                '--text-features', str(features)]
    with caplog.at_level('INFO', logger='vlpl'):
        assert main_clip.main(args) == 0
    assert 'Pseudo-labels on train (temp 0.01, threshold 0.05) (annotated entries only: unannotated ones have ' \
           'no truth): precision' in caplog.text
    assert 'PL on unknown: n/a (no truth on unannotated entries)' in caplog.text
    assert 'PL on unknown: precision' not in caplog.text
    log = json.loads((tmp_path / 'results' / 'openimages_EM_PL_small_cnn_s0' / 'log.json').read_text())
    assert 'pl_precision' not in log['values']['train']


def test_a_run_checks_the_class_names_against_the_label_columns_first(official, tmp_path, capsys):
    """QA round 4: classnames.txt cut to 14 names (class_ids.txt gone): -l an trained and wrote a best.pt
    that predict.py could not rebuild, -l CSL died with 'unexpected ValueError'. Now: one line, no run folder."""
    root, _ = official
    copy = tmp_path / 'data'
    shutil.copytree(root, copy)
    names = copy / 'openimages' / 'classnames.txt'
    names.write_text(''.join(line + '\n' for line in names.read_text().splitlines()[:14]))
    (copy / 'openimages' / 'class_ids.txt').unlink()
    for method in ('an', 'CSL'):
        assert main_clip.main(run_args(copy, tmp_path, method)) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f'error: {names} names 14 classes, but the label files of openimages under {copy} have 15 '
                       'columns: run `python preproc/format_openimages.py` again (see data/openimages/README.md)')
    assert not list((tmp_path / 'results').glob('openimages_*'))  # no run folder (results/ itself may exist)

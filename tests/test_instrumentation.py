"""TrainLogger: stored values, best-epoch rule (first maximum), state and JSON round trips."""
import json

import numpy as np
import pytest
import torch

import files
import instrumentation
from instrumentation import TrainLogger, format_summary
from metrics import compute_metrics

LABELS = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=np.float32)
OBSERVED = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=np.float32)
PERFECT = np.where(LABELS == 1, 0.9, 0.1)                 # val mAP 100
WORSE = np.array([[0.2, 0.6, 0.1], [0.7, 0.3, 0.4], [0.5, 0.5, 0.2], [0.4, 0.8, 0.9]])


def run_epochs(logger, val_preds):
    for epoch, vp in enumerate(val_preds, start=1):
        logger.log_phase(epoch, 'train', WORSE, LABELS, OBSERVED, loss=0.5 / epoch)
        logger.log_phase(epoch, 'val', vp, LABELS, LABELS, loss=None)
        logger.log_phase(epoch, 'test', vp * 0.5 + 0.01 * epoch, LABELS, LABELS, loss=None)


def test_log_phase_values_and_summary():
    logger = TrainLogger(num_epochs=3, num_classes=3)
    summary = logger.log_phase(1, 'train', WORSE, LABELS, OBSERVED, loss=0.25)
    assert summary['clean'] == compute_metrics(WORSE, LABELS)
    assert summary['observed'] == compute_metrics(WORSE, OBSERVED == 1)
    assert summary['loss'] == 0.25
    assert summary['mean_pos'] == pytest.approx(4 / 4)     # p > 0.5 per image: 1, 1, 0 (0.5 is not > 0.5), 2
    assert summary['preds_k_hat'] == pytest.approx(WORSE.sum() / 4)
    assert summary['epoch'] == 1 and summary['phase'] == 'train'
    assert summary['best_epoch'] is None and summary['is_best'] is False
    assert logger.get('train', 'map_clean')[0] == summary['clean']['map']
    assert np.isnan(logger.get('train', 'map_clean')[1:]).all()
    assert 'map' in format_summary(summary)


def test_soft_negative_observed_labels_count_as_negative():
    logger = TrainLogger(1, 3)
    soft = OBSERVED.copy()
    soft[1, 0] = -0.2
    summary = logger.log_phase(1, 'train', WORSE, LABELS, soft, loss=1.0)
    assert summary['observed'] == compute_metrics(WORSE, OBSERVED == 1)


def test_best_epoch_first_maximum():
    logger = TrainLogger(num_epochs=4, num_classes=3)
    assert logger.best_epoch is None and logger.best_val_map is None and logger.best_test_map is None
    run_epochs(logger, [WORSE, PERFECT, PERFECT, WORSE])   # epochs 2 and 3 tie at 100
    assert logger.best_epoch == 2
    assert logger.best_val_map == pytest.approx(100.0)
    assert logger.best_test_map == logger.get('test', 'map_clean')[1]
    assert logger.summary(2, 'val')['is_best'] and not logger.summary(3, 'val')['is_best']


def test_best_test_map_missing_until_logged():
    logger = TrainLogger(2, 3)
    logger.log_phase(1, 'val', PERFECT, LABELS, LABELS, loss=None)
    assert logger.best_epoch == 1 and logger.best_test_map is None
    summary = logger.log_phase(1, 'test', PERFECT, LABELS, LABELS, loss=None)
    assert logger.best_test_map == pytest.approx(100.0)
    assert summary['loss'] is None


def test_state_round_trip_json_and_torch(tmp_path):
    logger = TrainLogger(3, 3)
    run_epochs(logger, [WORSE, PERFECT])          # epoch 3 not logged yet
    state = logger.state_dict()
    text = json.dumps(state, allow_nan=False)     # plain, strict JSON
    torch.save({'logger': state}, tmp_path / 'ckpt.pt')
    loaded = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['logger']
    for restored_state in (json.loads(text), loaded):
        restored = TrainLogger(3, 3)
        restored.load_state_dict(restored_state)
        assert restored.best_epoch == 2
        for phase in instrumentation.PHASES:
            for name in instrumentation.SERIES:
                np.testing.assert_array_equal(restored.get(phase, name), logger.get(phase, name))
        assert restored.state_dict() == state
        resumed = restored.log_phase(3, 'val', PERFECT, LABELS, LABELS, loss=None)
        assert resumed['best_epoch'] == 2


def test_load_state_dict_rejects_mismatch_and_extends_to_more_epochs():
    logger = TrainLogger(3, 3)
    run_epochs(logger, [PERFECT, WORSE])
    state = logger.state_dict()
    with pytest.raises(ValueError, match='3 epochs'):
        TrainLogger(2, 3).load_state_dict(state)  # fewer epochs than were saved
    with pytest.raises(ValueError, match='3 classes'):
        TrainLogger(3, 4).load_state_dict(state)
    longer = TrainLogger(5, 3)  # a finished run resumed for more epochs
    longer.load_state_dict(state)
    assert longer.best_epoch == logger.best_epoch == 1
    assert longer.state_dict()['values']['val']['map_clean'][:3] == state['values']['val']['map_clean']
    assert longer.state_dict()['values']['val']['map_clean'][3:] == [None, None]
    assert longer.state_dict()['logged']['val'] == state['logged']['val'] + [False, False]
    del state['values']['val']
    with pytest.raises(ValueError, match='lacks'):
        TrainLogger(3, 3).load_state_dict(state)


def test_save_json_atomic(tmp_path, monkeypatch):
    logger = TrainLogger(2, 3)
    run_epochs(logger, [PERFECT, WORSE])
    path = tmp_path / 'sub' / 'log.json'
    logger.save_json(path)
    data = json.loads(path.read_text())
    assert data['best_epoch'] == 1 and data['best_val_map'] == pytest.approx(100.0)
    assert data['values']['val']['map_clean'][0] == pytest.approx(100.0)
    before = path.read_text()

    def boom(*args, **kwargs):  # the disk fills after the new log was written, before it is synced
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(files.os, 'fsync', boom)
    with pytest.raises(OSError):
        logger.save_json(path)
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ['log.json']


def test_invalid_calls():
    logger = TrainLogger(2, 3)
    with pytest.raises(ValueError, match='unknown phase'):
        logger.log_phase(1, 'dev', WORSE, LABELS, LABELS, loss=None)
    with pytest.raises(ValueError, match='outside 1..2'):
        logger.log_phase(3, 'val', WORSE, LABELS, LABELS, loss=None)
    with pytest.raises(ValueError, match='labels_obs has shape'):
        logger.log_phase(1, 'val', WORSE, LABELS, LABELS[:2], loss=None)
    with pytest.raises(ValueError, match=r'\(N, 4\)'):
        TrainLogger(2, 4).log_phase(1, 'val', WORSE, LABELS, LABELS, loss=None)
    with pytest.raises(ValueError, match='not been logged'):
        logger.summary(1, 'val')


def test_summary_csv_one_row_per_epoch(tmp_path):
    import csv
    import os
    logger = TrainLogger(3, 3)
    run_epochs(logger, [WORSE, PERFECT])                       # epoch 3 never logged
    logger.log_scalar(1, 'train', 'pl_precision', 0.75)
    logger.log_scalar(2, 'train', 'pl_precision', None)
    path = tmp_path / 'summary.csv'
    logger.save_summary_csv(path)
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['epoch'] for r in rows] == ['1', '2']
    assert list(rows[0])[:5] == ['epoch', 'train_loss', 'train_map', 'val_map', 'test_map']
    for r, epoch in zip(rows, (1, 2)):
        assert float(r['train_loss']) == 0.5 / epoch             # repr precision: exact round trip
        for phase in ('train', 'val', 'test'):
            assert float(r[f'{phase}_map']) == logger.get(phase, 'map_clean')[epoch - 1]
            assert float(r[f'{phase}_mean_pos']) == logger.get(phase, 'mean_pos')[epoch - 1]
    assert rows[0]['train_pl_precision'] == '0.75' and rows[1]['train_pl_precision'] == ''
    assert [r['best'] for r in rows] == ['0', '1']
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask     # not mkstemp's 0600
    logger.save_json(tmp_path / 'log.json')
    assert os.stat(tmp_path / 'log.json').st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ['log.json', 'summary.csv']


def test_log_scalar_state_round_trip_and_old_states():
    logger = TrainLogger(2, 3)
    run_epochs(logger, [WORSE, PERFECT])
    logger.log_scalar(2, 'train', 'pl_recall', 0.5)
    state = logger.state_dict()
    assert state['extra']['train'] == {'pl_recall': [None, 0.5]}
    restored = TrainLogger(2, 3)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.state_dict() == state
    assert restored.get('train', 'pl_recall')[1] == 0.5
    old = {k: v for k, v in state.items() if k != 'extra'}    # a checkpoint written before log_scalar
    restored.load_state_dict(old)
    assert restored.state_dict()['extra'] == {'train': {}, 'val': {}, 'test': {}}
    with pytest.raises(ValueError, match='log_phase series'):
        logger.log_scalar(1, 'train', 'map_clean', 1.0)


def test_prediction_summaries_in_row_blocks_are_the_whole_array_ones():
    """log_phase sums predictions in blocks of rows (instrumentation.ROW_BLOCK) so that no N x K temporary
    is made; each row's sum, hence every number, is the whole-array one."""
    rng = np.random.default_rng(0)
    for shape in ((instrumentation.ROW_BLOCK * 2 + 5, 7), (3, 81)):
        preds = rng.random(shape).astype(np.float32)
        labels = (rng.random(shape) < 0.3).astype(np.float32)
        summary = TrainLogger(1, shape[1]).log_phase(1, 'train', preds, labels, labels, 0.5)
        assert summary['mean_pos'] == float(np.mean(np.sum(preds > 0.5, axis=1)))
        assert summary['preds_k_hat'] == float(np.mean(np.sum(preds, axis=1)))

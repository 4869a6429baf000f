"""Training logger: per-epoch metrics of every phase and the best-epoch rule (docs/original-vlpl.md sections 9-10).

All values live in preallocated (num_epochs,) float64 arrays filled with NaN until logged;
`state_dict()` turns them into plain lists (None for "not logged") so a checkpoint holding it
loads with `torch.load(..., weights_only=True)` and the JSON log is strict JSON.

Two records are written from it: `save_json` (log.json, everything) and `save_summary_csv`
(summary.csv, one row per epoch, as timm's train.py writes it).
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np

from label_tables import Annotations
from files import atomic_write, save_json
from metrics import METRIC_KEYS, compute_metrics

PHASES = ('train', 'val', 'test')
LABEL_KINDS = ('clean', 'observed')
# Per-phase scalars besides the metrics: average loss, mean number of classes with p > 0.5
# per image, and the original's 'preds_k_hat' (mean over images of sum_k p_k).
SCALARS = ('loss', 'mean_pos', 'preds_k_hat')
ROW_BLOCK = 4096  # rows of predictions summarised at a time


def _series_name(kind: str, key: str) -> str:
    return f'{key}_{kind}'


SERIES = SCALARS + tuple(_series_name(kind, key) for kind in LABEL_KINDS for key in METRIC_KEYS)


def _to_jsonable(values: np.ndarray) -> list:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def _from_jsonable(values: list, pad: int) -> np.ndarray:
    """The inverse of _to_jsonable, padded with `pad` NaNs (epochs the saved state did not have)."""
    return np.array([np.nan if v is None else v for v in values] + [np.nan] * pad, dtype=np.float64)


def _value_at(array: np.ndarray, row: int) -> float | None:
    value = float(array[row])
    return None if math.isnan(value) else value


# summary.csv columns '<phase>_<column>' after epoch, train_loss and the clean mAP of each phase:
# column name -> logger series.
SUMMARY_METRICS = {'map_observed': 'map_observed', 'prec_at_1': 'prec_at_1_clean',
                   'rec_at_3': 'rec_at_3_clean', 'mean_pos': 'mean_pos'}


def _write_text(path, fill) -> None:
    """Write the text that `fill(text_file)` writes to `path` through the project's one atomic
    writer (files.atomic_write): a reader sees the old file or the whole new one, an exception
    in `fill` keeps the old file, and the file gets the mode of a plain open() (not 0600)."""
    def write(handle):
        text = io.StringIO()
        fill(text)
        handle.write(text.getvalue().encode('utf-8'))
    atomic_write(path, write)


class TrainLogger:
    """Per phase ('train', 'val', 'test') and epoch (1..num_epochs): the metrics of
    `metrics.compute_metrics` against the clean labels (suffix '_clean') and against the
    observed labels (observed 1 = positive, everything else negative; suffix '_observed'),
    the average loss, the mean number of predicted positives (p > 0.5) per image and the
    mean of sum_k p_k per image ('preds_k_hat', the original's figure).

    Best epoch: the first epoch with the highest val 'map_clean' (strictly greater wins,
    so ties keep the earlier epoch).
    """

    def __init__(self, num_epochs: int, num_classes: int):
        if int(num_epochs) < 1 or int(num_classes) < 1:
            raise ValueError(f'TrainLogger needs num_epochs >= 1 and num_classes >= 1, '
                             f'got {num_epochs} and {num_classes}')
        self.num_epochs = int(num_epochs)
        self.num_classes = int(num_classes)
        self._values = {phase: {name: np.full(self.num_epochs, np.nan) for name in SERIES}
                        for phase in PHASES}
        self._logged = {phase: np.zeros(self.num_epochs, dtype=bool) for phase in PHASES}
        # Optional named scalars (log_scalar), e.g. the pseudo-label precision of a train phase.
        self._extra: dict[str, dict[str, np.ndarray]] = {phase: {} for phase in PHASES}

    def _check_epoch_phase(self, epoch: int, phase: str) -> int:
        if phase not in PHASES:
            raise ValueError(f'unknown phase {phase!r}; expected one of {PHASES}')
        if not 1 <= int(epoch) <= self.num_epochs:
            raise ValueError(f'epoch {epoch} outside 1..{self.num_epochs}')
        return int(epoch) - 1

    def log_phase(self, epoch: int, phase: str, preds, labels_true, labels_obs, loss: float | None,
                  mask=None) -> dict:
        """Record one finished phase; returns its summary.

        preds: (N, K) predictions in [0, 1]; labels_true: (N, K) clean 0/1 labels; labels_obs:
        (N, K) observed labels in {-1, 0, 1} (or soft negatives); loss: average loss of the
        phase, or None if not computed (stored as missing); mask: (N, K) bool, the entries the
        metrics count (None: all; `metrics.compute_metrics`). Logging a phase again for the
        same epoch replaces the earlier record (e.g. after resuming mid-epoch).

        Summary: {'epoch', 'phase', 'loss', 'mean_pos', 'preds_k_hat', 'clean': {metric: value},
        'observed': {metric: value}, 'best_epoch', 'is_best'}; 'is_best' is True only for the
        val phase of the current best epoch.
        """
        row = self._check_epoch_phase(epoch, phase)
        preds, labels_true, labels_obs = self._checked_arrays(phase, preds, labels_true, labels_obs)
        clean = compute_metrics(preds, labels_true, mask)
        # Annotations count their annotated entries on both sides; the same table is evaluated once.
        observed = clean if labels_obs is labels_true else compute_metrics(
            preds, labels_obs if isinstance(labels_obs, Annotations) else labels_obs == 1, mask)
        self._store_phase(phase, row, preds, {'clean': clean, 'observed': observed}, loss)
        self._logged[phase][row] = True
        return self.summary(epoch, phase)

    def _checked_arrays(self, phase: str, preds, labels_true, labels_obs) -> tuple:
        """The three inputs of log_phase as arrays, each (N, K) with the N of preds (ValueError if not)."""
        preds = np.asarray(preds)
        # An Annotations table (partial annotations) stays as it is: it is read in blocks.
        labels_true, labels_obs = (x if isinstance(x, Annotations) else np.asarray(x)
                                   for x in (labels_true, labels_obs))
        expected = (preds.shape[0], self.num_classes) if preds.ndim == 2 else None
        for name, array in (('preds', preds), ('labels_true', labels_true), ('labels_obs', labels_obs)):
            if array.ndim != 2 or array.shape != expected:
                raise ValueError(f'log_phase({phase}): {name} has shape {array.shape}, expected '
                                 f'(N, {self.num_classes}) with the same N as preds')
        return preds, labels_true, labels_obs

    def _store_phase(self, phase: str, row: int, preds: np.ndarray, metrics: dict, loss: float | None) -> None:
        """One phase's loss, prediction statistics and metrics into row `row` of its series."""
        values = self._values[phase]
        values['loss'][row] = np.nan if loss is None else float(loss)
        # In blocks of rows (each row's sum is unchanged by the blocks): no N x K temporary.
        positives = np.concatenate([np.sum(preds[r:r + ROW_BLOCK] > 0.5, axis=1)
                                    for r in range(0, len(preds), ROW_BLOCK)] or [np.zeros(0, np.int64)])
        sums = np.concatenate([np.sum(preds[r:r + ROW_BLOCK], axis=1) for r in range(0, len(preds), ROW_BLOCK)]
                              or [np.zeros(0, preds.dtype)])
        values['mean_pos'][row] = float(np.mean(positives))
        values['preds_k_hat'][row] = float(np.mean(sums))
        for kind in LABEL_KINDS:
            for key, value in metrics[kind].items():
                values[_series_name(kind, key)][row] = value

    def log_scalar(self, epoch: int, phase: str, name: str, value: float | None) -> None:
        """Record one extra per-epoch scalar that is not a metric of `log_phase`, e.g.
        log_scalar(epoch, 'train', 'pl_precision', 0.93) or log_scalar(epoch, 'train', 'time', 41.2).

        Stored in state_dict()['extra'][phase][name] (a list over epochs, None where not logged),
        hence in log.json, and written to summary.csv as the column '<phase>_<name>'.
        report.py plots 'pl_precision' and 'pl_recall' of the train phase when present.
        """
        row = self._check_epoch_phase(epoch, phase)
        if not name or name in SERIES:
            raise ValueError(f'log_scalar: {name!r} is empty or a log_phase series; use another name')
        series = self._extra[phase].setdefault(name, np.full(self.num_epochs, np.nan))
        series[row] = np.nan if value is None else float(value)

    def summary(self, epoch: int, phase: str) -> dict:
        """The summary dict of an already logged phase (see `log_phase`)."""
        row = self._check_epoch_phase(epoch, phase)
        if not self._logged[phase][row]:
            raise ValueError(f'phase {phase!r} of epoch {epoch} has not been logged')
        values = self._values[phase]

        def scalar(name):
            return _value_at(values[name], row)

        best = self.best_epoch
        out = {'epoch': int(epoch), 'phase': phase,
               'loss': scalar('loss'), 'mean_pos': scalar('mean_pos'), 'preds_k_hat': scalar('preds_k_hat')}
        for kind in LABEL_KINDS:
            out[kind] = {key: scalar(_series_name(kind, key)) for key in METRIC_KEYS}
        out['best_epoch'] = best
        out['is_best'] = phase == 'val' and best == int(epoch)
        return out

    def get(self, phase: str, name: str) -> np.ndarray:
        """A copy of one series, e.g. get('val', 'map_clean') or an extra scalar of log_scalar:
        (num_epochs,), NaN where not logged."""
        if phase in PHASES and name in self._extra[phase]:
            return self._extra[phase][name].copy()
        if phase not in PHASES or name not in SERIES:
            raise ValueError(f'unknown series {phase!r}/{name!r}; names: {", ".join(SERIES)}')
        return self._values[phase][name].copy()

    @property
    def best_epoch(self) -> int | None:
        """First epoch (1-based) with the highest val clean mAP; None before any val phase."""
        val_map = self._values['val']['map_clean']
        if np.isnan(val_map).all():
            return None
        return int(np.nanargmax(val_map)) + 1  # nanargmax returns the first maximum

    @property
    def best_val_map(self) -> float | None:
        best = self.best_epoch
        return None if best is None else float(self._values['val']['map_clean'][best - 1])

    @property
    def best_test_map(self) -> float | None:
        """Test clean mAP of the best epoch; None until that epoch's test phase is logged."""
        best = self.best_epoch
        if best is None:
            return None
        value = float(self._values['test']['map_clean'][best - 1])
        return None if math.isnan(value) else value

    def state_dict(self) -> dict:
        """Plain python (dict/list/int/float/str/None/bool) copy of everything logged."""
        return {
            'num_epochs': self.num_epochs,
            'num_classes': self.num_classes,
            'logged': {phase: [bool(x) for x in self._logged[phase]] for phase in PHASES},
            'values': {phase: {name: _to_jsonable(self._values[phase][name]) for name in SERIES}
                       for phase in PHASES},
            'extra': {phase: {name: _to_jsonable(series) for name, series in self._extra[phase].items()}
                      for phase in PHASES},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`. The class count must match; a state of fewer epochs fills
        the first ones (a finished run resumed for more epochs)."""
        pad = self._epochs_to_pad(state)
        try:
            for phase in PHASES:
                self._logged[phase], self._values[phase], self._extra[phase] = self._restored_phase(state, phase, pad)
        except KeyError as missing:
            raise ValueError(f'logger state lacks {missing}; was it written by TrainLogger.state_dict()?') from None

    def _epochs_to_pad(self, state: dict) -> int:
        """Epochs this run has beyond the saved state's (ValueError if it has fewer or other classes)."""
        saved_epochs = state.get('num_epochs')
        if not isinstance(saved_epochs, int) or saved_epochs > self.num_epochs \
                or state.get('num_classes') != self.num_classes:
            raise ValueError(f"logger state is for {saved_epochs} epochs / "
                             f"{state.get('num_classes')} classes, this run has {self.num_epochs} / "
                             f'{self.num_classes}')
        return self.num_epochs - saved_epochs

    def _restored_phase(self, state: dict, phase: str, pad: int) -> tuple:
        """(logged, series, extra series) of one phase from a state, each checked to be num_epochs long."""
        logged = np.concatenate([np.asarray(state['logged'][phase], dtype=bool), np.zeros(pad, bool)])
        series = {name: _from_jsonable(state['values'][phase][name], pad) for name in SERIES}
        if logged.shape != (self.num_epochs,) or any(a.shape != (self.num_epochs,) for a in series.values()):
            raise ValueError(f'logger state for phase {phase!r} has the wrong length')
        # extra: absent in states saved before log_scalar existed
        extra = {name: _from_jsonable(values, pad) for name, values in state.get('extra', {}).get(phase, {}).items()}
        if any(a.shape != (self.num_epochs,) for a in extra.values()):
            raise ValueError(f'logger state for phase {phase!r} has an extra series of the wrong length')
        return logged, series, extra

    def to_json_dict(self) -> dict:
        """The JSON log: the best-epoch result plus the full state."""
        return {'best_epoch': self.best_epoch, 'best_val_map': self.best_val_map,
                'best_test_map': self.best_test_map, **self.state_dict()}

    def save_json(self, path) -> None:
        """Write `to_json_dict()` to `path` atomically (files.save_json), so an interrupted write
        never leaves a truncated log."""
        save_json(path, self.to_json_dict(), indent=1)

    def summary_rows(self) -> list[dict]:
        """One dict per epoch with at least one logged phase, in epoch order (see save_summary_csv)."""
        best = self.best_epoch
        extra_columns = [(phase, name) for phase in PHASES for name in sorted(self._extra[phase])]
        return [self._summary_row(row, best, extra_columns) for row in range(self.num_epochs)
                if any(self._logged[phase][row] for phase in PHASES)]

    def _summary_row(self, row: int, best: int | None, extra_columns: list) -> dict:
        """The summary.csv row of epoch row + 1 (see save_summary_csv for the columns)."""
        def value(array):
            return _value_at(array, row)

        out = {'epoch': row + 1, 'train_loss': value(self._values['train']['loss'])}
        out.update({f'{phase}_map': value(self._values[phase]['map_clean']) for phase in PHASES})
        for column, series in SUMMARY_METRICS.items():
            out.update({f'{phase}_{column}': value(self._values[phase][series]) for phase in PHASES})
        out.update({f'{phase}_{name}': value(self._extra[phase][name]) for phase, name in extra_columns})
        out['best'] = int(best == row + 1)
        return out

    def save_summary_csv(self, path) -> None:
        """Write summary.csv atomically: one row per logged epoch, as timm's `update_summary`
        (pytorch-image-models, timm/utils/summary.py) writes one row per epoch.

        Columns: epoch, train_loss, train_map, val_map, test_map (clean mAP in percent), then
        <phase>_map_observed, <phase>_prec_at_1, <phase>_rec_at_3 (clean labels) and <phase>_mean_pos
        for each phase, one column <phase>_<name> per log_scalar series, and best (1 on the best epoch).
        Missing values are empty cells; numbers are written with repr precision.
        """
        rows = self.summary_rows()
        columns = list(rows[0]) if rows else ['epoch', 'train_loss'] + [f'{p}_map' for p in PHASES] + ['best']

        def fill(f):
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator='\n')
            writer.writeheader()
            for row in rows:
                writer.writerow({k: '' if v is None else v for k, v in row.items()})
        _write_text(path, fill)


def format_summary(summary: dict) -> str:
    """One line for the console, e.g. '[val] epoch 3 loss 0.123 map 85.12 (obs 80.01) ...'."""
    def fmt(value, spec):
        return 'n/a' if value is None else format(value, spec)

    clean, observed = summary['clean'], summary['observed']
    line = (f"[{summary['phase']}] epoch {summary['epoch']} loss {fmt(summary['loss'], '.4f')} "
            f"map {fmt(clean['map'], '.2f')} (observed {fmt(observed['map'], '.2f')}) "
            f"prec@1 {fmt(clean['prec_at_1'], '.3f')} rec@3 {fmt(clean['rec_at_3'], '.3f')} "
            f"mean_pos {fmt(summary['mean_pos'], '.2f')}")
    if summary['is_best']:
        line += ' *best*'
    return line

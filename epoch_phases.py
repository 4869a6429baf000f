"""The phases of one epoch of a run, in the order main_clip.py's loop calls them: train (with CCD's
pseudo-label refresh before it and the method's end-of-epoch step after it), evaluate on val and
test (with --ema-decay the model or its average, whichever is better on val), log every phase, and
save the epoch's files (primary process only). `Learner` and run_data.`Data` hold what the phases share.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

import heads_run
import label_tables
import methods
import records
from checkpoints import RunFolder
from config import Config
from distributed import is_primary, log
from engine import predict, train_one_epoch
from files import save_json
from instrumentation import TrainLogger, format_summary
from run_data import Data


@dataclasses.dataclass
class Learner:
    """What training changes and a checkpoint keeps. train_model / eval_model: the model as the
    training and evaluation passes run it (wrapped for several processes, compiled with --compile)."""
    model: torch.nn.Module
    method: methods.Method
    optimizer: torch.optim.Optimizer
    scheduler: object
    logger: TrainLogger
    ema: object = None
    train_model: torch.nn.Module = None
    eval_model: torch.nn.Module = None


def predict_train(cfg: Config, learner: Learner, data: Data, device, desc: str):
    return predict(cfg, learner.eval_model, data.train_eval_loader, len(data.train_eval_set), data.num_classes,
                   device, desc)


def train_phase(cfg: Config, epoch: int, learner: Learner, data: Data, pl_source, train_true, device, run_dir: Path):
    """One epoch's training: refreshed pseudo-labels (CCD), the batches, the method's end of epoch;
    (train predictions, average loss, pseudo-label counts)."""
    if pl_source is not None and pl_source.before_epoch(epoch, learner.model, lambda: predict_train(
            cfg, learner, data, device, f'epoch {epoch} CCD threshold calibration')) and is_primary():
        save_json(run_dir / 'pl_quality.json', pl_source.report)
    # a dataset's randomly shaped extra view (CCD's colour-jittered one) is made only when the method reads it
    data.sampler.skip_draws = learner.method.second_view(epoch) is None
    if cfg.linear_init:  # LinearInit: a frozen trunk for the first --linear-init epochs
        learner.model.set_trunk_frozen(epoch <= cfg.linear_init)
    out = train_one_epoch(epoch, cfg, learner.train_model, learner.optimizer, data.loaders['train'], learner.method,
                          train_true, pl_source, device, scheduler=learner.scheduler, ema=learner.ema,
                          kept_rows=data.metric_rows)
    learner.method.end_epoch(epoch, lambda: predict_train(cfg, learner, data, device,
                                                          f'epoch {epoch} {cfg.loss} update'))
    return out


def evaluate_phases(cfg: Config, epoch: int, learner: Learner, data: Data, device, phase_preds: dict,
                    times: dict) -> tuple:
    """Predictions on val and test, added to phase_preds (their seconds to times); (phase_preds, the
    model evaluated: with --ema-decay the model or its average, whichever is better on val)."""
    model, ema = learner.model, learner.ema
    evaluated = model
    for phase in ('val', 'test'):
        t0 = time.perf_counter()
        if phase == 'test' and data.splits['test'] is data.splits['val']:  # -l CCD validates on the test split
            phase_preds['test'], times['test'] = phase_preds['val'], 0.0
            continue
        phase_preds[phase] = predict(cfg, learner.eval_model if evaluated is model else evaluated,
                                     data.loaders[phase], len(data.sets[phase]), data.num_classes, device,
                                     f'epoch {epoch} {phase}')
        if phase == 'val' and ema is not None:
            ema_preds = predict(cfg, ema.module, data.loaders[phase], len(data.sets[phase]), data.num_classes,
                                device, f'epoch {epoch} {phase} (EMA)')
            if heads_run.ema_wins(phase_preds[phase], ema_preds, data.splits[phase].labels_true, epoch,
                                  data.splits[phase].counted()):
                evaluated, phase_preds[phase] = ema.module, ema_preds
        times[phase] = time.perf_counter() - t0
    return phase_preds, evaluated


def log_epoch(cfg: Config, epoch: int, learner: Learner, data: Data, pl_source, phase_preds: dict, train_loss,
              pl_counts, times: dict) -> None:
    """Every phase's metrics into the logger, and one line each."""
    logger = learner.logger
    for phase in ('train', 'val', 'test'):
        split = data.splits[phase]
        labels = split.labels_true, (learner.method.observed_labels() if phase == 'train' else split.labels_obs)
        rows = data.metric_rows if phase == 'train' else None  # the train metrics' rows (train_metric_rows)
        if rows is not None:
            labels = label_tables.take_rows_of(labels, rows)
        counted = split.counted(slice(None) if rows is None else rows)  # the entries metrics count, or None
        seen = ~np.isnan(phase_preds[phase][:, 0])
        if not seen.all():
            log.info(f'{phase}: skipped {int((~seen).sum())} unreadable images (--skip-bad-images); '
                     'metrics cover the rest')
        s = logger.log_phase(epoch, phase, label_tables.take_rows(phase_preds[phase], seen),
                             *label_tables.take_rows_of(labels, seen), train_loss if phase == 'train' else None,
                             mask=None if counted is None else counted[seen])
        extra = ''
        if phase == 'train' and pl_source is not None and pl_counts[1] > 0:
            if cfg.data.annotated:  # the unknown entries are the unannotated ones: nothing to compare with
                extra = ' | PL on unknown: n/a (no truth on unannotated entries)'
            else:
                precision, recall = pl_counts[0] / pl_counts[1], pl_counts[0] / max(pl_counts[2], 1)
                logger.log_scalar(epoch, 'train', 'pl_precision', float(precision))
                logger.log_scalar(epoch, 'train', 'pl_recall', float(recall))
                extra = f' | PL on unknown: precision {precision:.3f}, recall {recall:.3f}'
            if pl_counts[3] > 0:
                extra += f', {int(pl_counts[3])} positive PL on annotated negatives ignored'
        log.info(f'{format_summary(s)} | {times[phase]:.1f} s{extra}')


def save_epoch(cfg: Config, epoch: int, argv: list[str], learner: Learner, data: Data, pl_source, classnames,
               phase_preds: dict, evaluated, train_loss, times: dict, record: dict, tensorboard,
               folder: RunFolder) -> None:
    """The epoch's files (records.save_epoch), config.json's record, the commit mark, TensorBoard (primary only)."""
    run_dir, logger = folder.path, learner.logger
    # wall times go to config.json's record, so that log.json holds only reproducible numbers
    record['epoch_seconds'] = record.get('epoch_seconds', {}) | {str(epoch): round(sum(times.values()), 2)}
    records.save_epoch(run_dir, epoch, cfg, argv, learner.model, learner.optimizer, logger, learner.method,
                       data.sampler, classnames, phase_preds, data.splits, evaluated=evaluated,
                       extra=heads_run.training_state(learner.ema, learner.scheduler)
                       | {'pseudo_labels': pl_source.state_dict() if pl_source is not None else {},
                          'inputs': data.inputs})
    save_json(run_dir / 'config.json', dataclasses.asdict(cfg) | {'record': record})
    folder.committed()
    if tensorboard is not None:
        for phase in ('train', 'val', 'test'):
            tensorboard.add_scalar(f'mAP/{phase}', logger.get(phase, 'map_clean')[epoch - 1], epoch)
        tensorboard.add_scalar('loss/train', train_loss, epoch)
        tensorboard.flush()

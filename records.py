"""What a run leaves in its folder each epoch, beside the checkpoint: the checkpoints themselves
(last.pt, best.pt), log.json and summary.csv, the best epoch's test predictions, per-class AP and
F1 thresholds, config.json's record (device, versions, commit, times), and TensorBoard events.
Called by main_clip.py on the primary process only.
"""
from __future__ import annotations

import dataclasses
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import heads_run
import losses
from checkpoints import atomic_save, rng_state
from config import Config, UserError
from files import save_json
from label_tables import take_rows
from metrics import per_class_ap, per_class_thresholds


def save_epoch(run_dir: Path, epoch: int, cfg: Config, argv: list[str], model, optimizer, logger, method,
               sampler, classnames: list[str], phase_preds: dict, splits: dict, evaluated=None,
               extra=None) -> None:
    """last.pt, log.json and summary.csv every epoch; when this epoch is the best so far also best.pt,
    the test predictions, the per-class AP and the per-class thresholds that maximise F1 on val
    (predict.py --thresholds). evaluated: the weights that gave the val/test predictions, saved in
    best.pt (default: model; with --ema-decay maybe its average); extra: more last.pt entries (EMA,
    schedule)."""
    common = dict(model=model.state_dict(), epoch=epoch, config=dataclasses.asdict(cfg), argv=list(argv),
                  classnames=classnames) | heads_run.checkpoint_entries(model)
    if logger.best_epoch == epoch:
        atomic_save(phase_preds['test'], run_dir / 'test_preds_best.npy')
        best = common if evaluated is None or evaluated is model else common | {'model': evaluated.state_dict()}
        atomic_save(best | {'test_map': logger.best_test_map}, run_dir / 'best.pt')
        per_class, thresholds = {'classnames': classnames, 'epoch': epoch}, None
        for phase in ('val', 'test'):
            seen = ~np.isnan(phase_preds[phase][:, 0])  # rows of skipped images are NaN
            preds, labels = (take_rows(x, seen) for x in (phase_preds[phase], splits[phase].labels_true))
            # None: a class that partial annotations cannot evaluate (metrics.average_precision_annotated)
            aps = 100.0 * per_class_ap(preds, labels, splits[phase].counted(seen))
            per_class[phase] = [None if np.isnan(ap) else ap for ap in aps.tolist()]
            if phase == 'val':
                thresholds = per_class_thresholds(preds, labels).tolist()
        save_json(run_dir / 'per_class_ap.json', per_class)
        save_json(run_dir / 'thresholds.json', {'classnames': classnames, 'thresholds': thresholds, 'epoch': epoch,
                                                'rule': 'score >= threshold; maximises F1 per class on val'})
    atomic_save(common | dict(optimizer=optimizer.state_dict(), logger=logger.state_dict(),
                              method=method.state_dict(), rng=rng_state(sampler)) | (extra or {}),
                run_dir / 'last.pt')
    logger.save_json(run_dir / 'log.json')
    logger.save_summary_csv(run_dir / 'summary.csv')


def run_record(cfg: Config, device, method_class) -> dict:
    """What config.json records beside the settings: the device used, versions, commit, start time,
    and the settings this method does not read (kept for the record, marked unused)."""
    import torchvision

    versions = {'python': platform.python_version(), 'torch': torch.__version__,
                'torchvision': torchvision.__version__}
    for name in ('open_clip', 'timm'):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # an optional dependency that is not installed has no version to record
            versions[name] = None
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    used = set(losses.loss_hparams(cfg.loss)) if cfg.loss in losses.LOSSES else set()
    unused = sorted({'alpha', 'beta', 'beta_pos', 'beta_neg', 'warmup_epoch'} - used)
    if not method_class.uses_pseudo_labels(cfg):
        unused += ['temp', 'threshold', 'partial', 'clip_mode', 'text_features']
        if cfg.model != 'clip_vision':
            unused += ['clip_model', 'clip_pretrained']
    return {'device': str(device), 'versions': versions, 'git_commit': commit,
            'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'unused_settings': unused}


def open_tensorboard(cfg: Config, run_dir: Path):
    """A SummaryWriter under RUN_DIR/tensorboard with --tensorboard (an optional dependency)."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard') from None
    return SummaryWriter(str(run_dir / 'tensorboard'))

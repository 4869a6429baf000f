"""CCD's soft-label table of a run: the pseudo-label source of --pl-debias and --pl-views cam.

The math is in ccd.py (pure functions, with the lines of github.com/k0u-id/CCD, train.py they
follow); `CcdPseudoLabels` runs it between the frozen CLIP and the classifier, and keeps what
lasts (the table, the calibrated threshold, the refreshes done) in the run's checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch

import ccd
import distributed
import pseudo_label_options as pl_options
from config import Config, UserError, one_line
from embedding_cache import cached_view_embeddings
from pseudo_labeler import PseudoLabeler, PseudoLabelSource, scores_to_labels


class CcdPseudoLabels(PseudoLabelSource):
    """CCD's soft labels (ccd.py) thresholded by the VLPL rule (scores_to_labels).

    table: N x 2 x K soft labels (unflipped, flipped): the global softmax scores, debiased with
    --pl-debias (bias from the unflipped scores), and with --pl-views cam blended with the local
    views' labels before epochs views_epoch + 1 ... views_epoch + refreshes (the first time after
    calibrating the classifier threshold, CCD's `multiplier`). The table, the multiplier and the
    refreshes done are the state saved in the checkpoint.
    """

    def __init__(self, cfg: Config, labeler: PseudoLabeler, table: torch.Tensor, bias, loader, key: dict, device,
                 true: np.ndarray, classnames: list[str], report: dict):
        super().__init__(self._labels, report)
        self.cfg, self.labeler, self.table, self.bias = cfg, labeler, table, bias
        self.loader, self.key, self.device, self.true, self.classnames = loader, key, device, true, classnames
        self.multiplier = None
        self.refreshes = 0

    def _labels(self, images, index, flipped):
        return scores_to_labels(self.table[index, flipped.long()], self.cfg.threshold, self.cfg.partial)

    def unflipped_labels(self) -> np.ndarray:
        return scores_to_labels(self.table[:, 0], self.cfg.threshold, self.cfg.partial).cpu().numpy()

    def before_epoch(self, epoch: int, model, predict_train) -> bool:
        cfg = self.cfg
        if cfg.pl_views != 'cam' or self.refreshes >= cfg.pl_views_refreshes or epoch - 1 < cfg.pl_views_epoch:
            return False
        if self.multiplier is None and cfg.pl_views_threshold is not None:
            self.multiplier = cfg.pl_views_threshold
        if self.multiplier is None:  # CCD calibrates once, on a shuffled pass (train.py:216-247)
            probs = torch.from_numpy(predict_train())
            probs = probs[torch.randperm(probs.shape[0], generator=torch.Generator().manual_seed(cfg.seed))]
            probs = probs[~torch.isnan(probs[:, 0])]
            start = 0.05 if cfg.pl_debias and cfg.pl_floor > 0 else 0.001  # train.py:197-200 (LS on or off)
            self.multiplier, stop = ccd.calibrate_threshold(probs, start, cfg.pl_views_bound)
            distributed.log.info(f'CCD classifier threshold {self.multiplier:.3f} '
                                 f'({"stopped at image " + str(stop) if stop is not None else "images ran out"}; '
                                 f'bound {cfg.pl_views_bound})')
        try:
            rows, _, boxes = ccd.cam_views(
                model, self.loader, multiplier=self.multiplier, offset=int(round(cfg.pl_views_margin * cfg.image_size)),
                side=self.labeler.image_size, device=self.device,
                progress=lambda iterable, desc: distributed.progress(iterable, desc=desc))
        except ValueError as exc:  # a model without CAM: refused at parse time, kept as a guard
            raise UserError(f'--pl-views cam: {one_line(exc)}') from None
        embeddings = cached_view_embeddings(self.labeler, self.loader, rows, boxes, self.key, self.cfg.cache_dir,
                                            device=self.device).to(self.device)
        scores = self.labeler.scores(embeddings)
        local = ccd.local_labels(rows.to(self.device), scores, self.table.shape[0], self.bias, self.floor)
        self.table = ccd.blend(self.table, local[:, None, :], cfg.pl_views_ratio)
        self.refreshes += 1
        when = f'after CAM views refresh {self.refreshes} (before epoch {epoch})'
        stage = pl_options.class_quality(self.unflipped_labels(), self.true, self.classnames)
        stage.update(when=when, epoch=epoch, views=int(rows.numel()),
                     views_per_image=float(rows.numel()) / max(self.table.shape[0], 1), multiplier=self.multiplier)
        self.report['stages'].append(stage)
        distributed.log.info(pl_options.quality_line(stage, when) + f'; {stage["views_per_image"]:.2f} views / image')
        return True

    @property
    def floor(self) -> float:
        return self.cfg.pl_floor if self.cfg.pl_debias else 0.0

    def state_dict(self) -> dict:
        return {'table': self.table.cpu(), 'multiplier': self.multiplier, 'refreshes': self.refreshes,
                'report': self.report}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.table = state['table'].to(self.device)
            self.multiplier, self.refreshes = state['multiplier'], state['refreshes']
            self.report = state.get('report', self.report)


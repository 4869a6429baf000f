"""Partial annotations: ASL and CSL (Alibaba-MIIL/PartialLabelingCSL) as training methods.

`-l ASL` and `-l CSL` register themselves here (methods.register) when main_clip.py imports this
module. The math is in losses_partial.py; this module owns what lasts across batches and epochs:
the resolved settings (CSL's published defaults), the running class prior and the prior the loss
reads. docs/partial-labels.md describes the setting, the flags and every difference from CSL.

Observed labels o in {1, 0, -1} (1 positive, -1 annotated negative, 0 unannotated) come from
`--observed TAG` (formatted_train_labels_obs_<TAG>.npy) or, without it, from the single-positive
file (no -1 entries).

Prior protocol (CSL's train.py, ComputePrior): every training step adds sigmoid(logits) of its
forward to a running per-class sum that is never reset; after every epoch the average is written
to <run_dir>/train_avg_preds.csv (columns Classes,avg_pred, CSL's file format). CSL's selective
mode reads the prior once from --prior_path, a CSV written by an earlier run (its README: a
temporary model trained with mode ignore). Here `--prior-file CSV` does exactly that; without it
the prior is the run's own running average, frozen at the end of each epoch and used by the loss
during the next one (none in epoch 1, where only the likelihood top-k acts). Both, and the running
sums, are method state: saved in every checkpoint and restored on --resume, so a resumed run
uses the same prior bit for bit.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import datasets
import losses
import losses_partial as lp
import methods
from class_text_features import read_classnames
from label_tables import Annotations
from config import NON_NEGATIVE, Config, UserError, number
from datasets import FULL_OBSERVED
from distributed import is_primary, log
from files import atomic_write

PRIOR_CSV = 'train_avg_preds.csv'  # the name CSL's ComputePrior.save_prior writes

# Config fields of the 'Partial labels: ASL / CSL' flags, and which method reads which.
ASL_FIELDS = ('gamma_pos', 'gamma_neg', 'asl_clip', 'asl_focal_grad')
CSL_FIELDS = ('gamma_pos', 'gamma_neg', 'gamma_unann', 'asl_clip', 'csl_mode', 'likelihood_topk',
              'prior_threshold', 'prior_file')
FLAG = {'gamma_pos': '--gamma-pos', 'gamma_neg': '--gamma-neg', 'gamma_unann': '--gamma-unann',
        'asl_clip': '--asl-clip', 'asl_focal_grad': '--asl-focal-grad', 'csl_mode': '--csl-mode',
        'likelihood_topk': '--likelihood-topk', 'prior_threshold': '--prior-threshold',
        'prior_file': '--prior-file'}


def csl_recipe(observed_tag: str | None) -> dict:
    """CSL's README command for the annotation scheme: FPC's for an fpc<N> tag, RPS's otherwise
    (single positive included: it has no annotated negatives, so gamma_neg plays no part)."""
    return lp.CSL_RECIPES['fpc' if observed_tag and observed_tag.startswith('fpc') else 'rps']


def defaults(loss: str, observed_tag: str | None) -> dict:
    """The values the flags of `loss` take when not given (CSL's published settings)."""
    if loss == 'ASL':  # AsymmetricLoss's defaults = the README's "Negative, ASL (4,1)"
        return dict(gamma_pos=lp.ASL_DEFAULTS['gamma_pos'], gamma_neg=lp.ASL_DEFAULTS['gamma_neg'],
                    asl_clip=lp.ASL_DEFAULTS['clip'], asl_focal_grad=False)
    if loss == 'CSL':
        recipe = csl_recipe(observed_tag)
        return dict(gamma_pos=recipe['gamma_pos'], gamma_neg=recipe['gamma_neg'], gamma_unann=recipe['gamma_unann'],
                    asl_clip=recipe['clip'], csl_mode=recipe['mode'], likelihood_topk=recipe['likelihood_topk'],
                    prior_threshold=recipe['prior_threshold'], prior_file=None)
    return {}


def flag_problem(cfg: Config) -> str | None:
    """A one-line complaint about the partial-label flags of cfg, or None when they are fine."""
    method = methods.METHODS[cfg.loss]
    if cfg.observed == FULL_OBSERVED and method.full_labels_refusal:
        return (f'--observed full: -l {cfg.loss} needs unknown labels: it {method.full_labels_refusal}; train '
                'fully labelled data with -l bce, ASL or CSL (docs/partial-labels.md)')
    if cfg.observed not in (None, FULL_OBSERVED) and method.clean_train_labels:
        return f'--observed does nothing with -l {cfg.loss}: it trains on every clean label; drop one of them'
    if cfg.observed is not None and cfg.observed != datasets.FULL_OBSERVED:  # checked before anything is written
        parsed = datasets.parse_observed_tag(cfg.observed)
        if parsed is None or (parsed[0] == 'rps' and parsed[1] > 1) or (parsed[0] == 'fpc' and parsed[1] < 1):
            return (f'--observed {cfg.observed}: a tag is rps<P> (each annotation dropped with probability P, '
                    '0 <= P <= 1), fpc<N> (N >= 1 positives and N negatives kept per class) or full, e.g. rps0.5 '
                    'or fpc1000')
    if cfg.data.annotated:  # real partial annotations (label_tables.py): they are the observed labels
        if cfg.observed is not None:
            return (f'--observed does not apply to -d {cfg.dataset}: its observed labels are its own partial '
                    'annotations (docs/openimages.md)')
        if methods.METHODS[cfg.loss].clean_train_labels or cfg.loss in losses.NEEDS_TRUE_LABELS:
            return (f'-l {cfg.loss} needs clean labels, which -d {cfg.dataset} does not have (its annotations are '
                    'partial): use -l an (unannotated as negative), iu (ignored), ASL or CSL')
    if (cfg.data.expected_num_pos is None and cfg.loss in losses.LOSSES
            and 'expected_num_pos' in losses.loss_hparams(cfg.loss)):
        return (f'-l {cfg.loss} needs the expected number of positives per image, which is not known for '
                f'-d {cfg.dataset}')
    fields = ASL_FIELDS if cfg.loss == 'ASL' else CSL_FIELDS if cfg.loss == 'CSL' else ()
    for name in FLAG:
        value = getattr(cfg, name)
        if name not in fields and value is not None and value is not False:
            owners = ' and '.join(f'-l {m}' for m, f in (('ASL', ASL_FIELDS), ('CSL', CSL_FIELDS)) if name in f)
            return f'{FLAG[name]} applies to {owners} only, not -l {cfg.loss}'
    for name in ('gamma_pos', 'gamma_neg', 'gamma_unann', 'asl_clip', 'prior_threshold'):
        value = getattr(cfg, name)
        if value is not None and not (value >= 0):
            return f'{FLAG[name]} must be >= 0, got {value}'
    if cfg.asl_clip is not None and cfg.asl_clip >= 1:
        return f'--asl-clip must be in [0, 1), got {cfg.asl_clip}'
    if cfg.likelihood_topk is not None and cfg.likelihood_topk < 0:
        return f'--likelihood-topk must be >= 0, got {cfg.likelihood_topk}'
    return None


def resolve(cfg: Config) -> Config:
    """cfg with every partial-label setting of its method filled in (the flags left None take
    `defaults`), so that config.json and the checkpoint record the values the run used."""
    filled = {name: value for name, value in defaults(cfg.loss, cfg.observed).items()
              if getattr(cfg, name) is None}
    return dataclasses.replace(cfg, **filled) if filled else cfg


def _setting(cfg: Config, name: str):
    value = getattr(cfg, name)
    return defaults(cfg.loss, cfg.observed)[name] if value is None else value


class _PartialLabelMethod(methods.Method):
    """Shared by ASL and CSL: the settings, and the check that the observed labels are hard."""

    def __init__(self, cfg: Config, train_observed: np.ndarray, device):
        super().__init__(cfg, train_observed, device)
        # An Annotations table holds only -1, 0 and 1 (each block is checked as it is read).
        if not isinstance(train_observed, Annotations) and not np.isin(train_observed, (-1, 0, 1)).all():
            raise UserError(f'-l {cfg.loss} needs observed labels in {{-1, 0, 1}}; the train file holds other values')
        self.settings = {name: _setting(cfg, name) for name in (ASL_FIELDS if cfg.loss == 'ASL' else CSL_FIELDS)}


@methods.register('ASL', 'asymmetric loss of CSL (AsymmetricLoss): observed positives against everything else, '
                         'focusing --gamma-pos / --gamma-neg, probability margin --asl-clip; a sum over the batch')
class AsymmetricLossMethod(_PartialLabelMethod):
    """ASL with targets y = 1 at the observed positives and 0 elsewhere: annotated negatives and
    unannotated entries are both negatives (CSL's README row "Negative, ASL")."""

    def loss(self, logits, preds, batch, *, epoch, step):
        s = self.settings
        return lp.asymmetric_loss(logits, (batch['observed'] == 1).float(), gamma_neg=s['gamma_neg'],
                                  gamma_pos=s['gamma_pos'], clip=s['asl_clip'], eps=lp.ASL_DEFAULTS['eps'],
                                  disable_torch_grad_focal_loss=not s['asl_focal_grad'])


@methods.register('CSL', 'class-aware selective loss (P-ASL, Ben-Baruch et al.): --csl-mode selective ignores the '
                         'unannotated entries of likely classes (prior > --prior-threshold, prior from '
                         '--prior-file or estimated online) and the --likelihood-topk most likely per image '
                         'of the batch; the rest are negatives')
class ClassAwareSelectiveLoss(_PartialLabelMethod):
    """P-ASL with CSL's partial-label weights, and the running class prior as state."""

    def __init__(self, cfg: Config, train_observed: np.ndarray, device):
        super().__init__(cfg, train_observed, device)
        self.estimator = lp.ClassPriorEstimator(self.num_classes, device)
        self.online_prior: torch.Tensor | None = None  # (K,) frozen at the end of the last epoch
        self.file_prior: torch.Tensor | None = None  # (K,) from --prior-file, read on first use
        self.device = device

    def prior(self) -> torch.Tensor | None:
        """The (K,) prior the loss reads now: --prior-file's, else the online one (None in epoch 1)."""
        path = self.settings['prior_file']
        if path is None:
            return self.online_prior
        if self.file_prior is None:
            self.file_prior = load_prior_file(path, self.cfg.dataset, self.num_classes,
                                              self.cfg.data_root).to(self.device)
        return self.file_prior

    def loss(self, logits, preds, batch, *, epoch, step):
        s = self.settings
        loss = lp.partial_selective_loss(
            logits, batch['observed'], mode=s['csl_mode'], gamma_pos=s['gamma_pos'], gamma_neg=s['gamma_neg'],
            gamma_unann=s['gamma_unann'], clip=s['asl_clip'], likelihood_topk=s['likelihood_topk'],
            prior=self.prior(), prior_threshold=s['prior_threshold'], validate=False)  # checked in __init__
        self.estimator.update(logits)  # CSL: prior.update(output) on every training step
        return loss

    def end_epoch(self, epoch: int, predict_train: Callable[[], np.ndarray]) -> None:
        prior = self.estimator.prior
        if prior is None:  # every image of the epoch was skipped
            return
        self.online_prior = prior.clone()
        names = read_classnames(self.cfg.dataset, data_root=self.cfg.data_root)
        if is_primary():
            text = lp.prior_csv_text(names, prior)
            atomic_write(Path(self.cfg.run_dir) / PRIOR_CSV, lambda handle: handle.write(text.encode('utf-8')))
        threshold = self.settings['prior_threshold']
        top = torch.argsort(-prior.cpu())[:5].tolist()
        used = 'used from the next epoch' if self.settings['prior_file'] is None else 'written only (--prior-file is used)'
        above = int((prior > threshold).sum()) if threshold else 0
        log.info(f'CSL class prior after epoch {epoch} ({int(self.estimator.count)} images, {used}): '
                 f'{above} classes above --prior-threshold {threshold}; highest: '
                 + ', '.join(f'{names[k]} {prior[k].item():.3f}' for k in top)
                 + f'; {Path(self.cfg.run_dir) / PRIOR_CSV}')

    def state_dict(self) -> dict:
        state = super().state_dict() | {'prior_estimator': self.estimator.state_dict()}
        if self.online_prior is not None:
            state['online_prior'] = self.online_prior.cpu().clone()
        if self.file_prior is not None:
            state['file_prior'] = self.file_prior.cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.estimator.load_state_dict(state['prior_estimator'])
        self.online_prior = state['online_prior'].to(self.device) if 'online_prior' in state else None
        # The prior the saved run trained with, even if the CSV has changed since.
        self.file_prior = state['file_prior'].to(self.device) if 'file_prior' in state else None


def load_prior_file(path: str, dataset: str, num_classes: int, data_root: str | None = None) -> torch.Tensor:
    """The (K,) prior of a CSV in CSL's format (Classes,avg_pred, model output order); UserError
    (one line) for a missing or malformed file or rows in another class order."""
    try:
        names, prior = lp.read_prior_csv(path, num_classes)
    except lp.PriorFileError as err:
        raise UserError(f'--prior-file: {err}') from None
    expected = read_classnames(dataset, data_root=data_root)
    if names != expected:
        if sorted(names) == sorted(expected):
            raise UserError(f'--prior-file {path}: its rows are not in the class order of {dataset} '
                            f'(text_features/{dataset}_classnames.txt); CSL reads the rows in model output order')
        log.warning(f'note: the class names of --prior-file {path} differ from those of {dataset}; '
                    'its rows are read in model output order')
    return prior


def add_arguments(parser) -> None:
    """The 'Partial labels: ASL / CSL' group of main_clip.py's flags."""
    g = parser.add_argument_group('Partial labels: ASL / CSL',
                                  'observed positives, annotated negatives and unannotated entries '
                                  '(docs/partial-labels.md); defaults: CSL\'s published settings')
    g.add_argument('--observed', default=None, metavar='TAG',
                   help='train on formatted_train_labels_obs_<TAG>.npy, e.g. rps0.5 or fpc1000, made by '
                        'preproc/generate_observed_labels.py --scheme rps|fpc (the demo makes its own); '
                        '"full": every true label observed (1 positive, -1 negative; no file), refused for '
                        'the methods that need unknown labels; default: the single-positive file')
    g.add_argument('--gamma-pos', type=NON_NEGATIVE, default=None,
                   help='focusing of positives (default: ASL 1, CSL 0)')
    g.add_argument('--gamma-neg', type=NON_NEGATIVE, default=None,
                   help='focusing of annotated negatives (default: ASL 4 (every negative); CSL 1, or 3 with '
                        'an fpc TAG, as its README commands)')
    g.add_argument('--gamma-unann', type=NON_NEGATIVE, default=None,
                   help='CSL: focusing of the unannotated entries kept as negatives (default 4)')
    g.add_argument('--asl-clip', type=NON_NEGATIVE, default=None,
                   help='probability margin m: q = min(1 - p + m, 1) (CSL\'s clip; default: ASL 0.05, CSL 0)')
    g.add_argument('--asl-focal-grad', action='store_true',
                   help='ASL: let the gradient flow through the focusing weight (AsymmetricLossOptimized); '
                        'default: detached, as AsymmetricLoss')
    g.add_argument('--csl-mode', default=None, choices=list(lp.MODES),
                   help='CSL: what unannotated entries are: negative, ignore, ignore_normalize_classes, '
                        'selective (default)')
    g.add_argument('--likelihood-topk', type=number(int, low=0), default=None,
                   help='CSL selective: per image of the batch, how many of the most likely unannotated '
                        'entries to ignore (one budget for the batch; default 5)')
    g.add_argument('--prior-threshold', type=NON_NEGATIVE, default=None,
                   help='CSL selective: ignore the unannotated entries of classes whose prior exceeds it; '
                        '0 turns the prior step off (default 0.5)')
    g.add_argument('--prior-file', default=None, metavar='CSV',
                   help='CSL: class priors as CSV (Classes,avg_pred in class order, e.g. the '
                        f'{PRIOR_CSV} of an earlier run); default: estimated online from the '
                        'model\'s training predictions, the average up to the previous epoch')

"""Training methods: one object per method, owning what lasts across batches and epochs.

The pure loss functions stay in losses.py (the math); a method object around them says what it
needs (pseudo-labels, clean labels, a warm-up), computes the batch loss, and owns its state: the
observed-label matrix that EM_APL rewrites after each epoch today; later a per-image label
estimator with its own parameter group (ROLE), schedules and permanent flips (LL), class priors
(CSL). The training loop calls every method the same way:

    method = build_method(cfg, train_split, device)
    optimizer = Adam(model.param_groups(lr) + method.param_groups(lr))
    for each batch:  loss = method.loss(logits, preds, batch, epoch=..., step=...)
    after the train phase of each epoch:  method.end_epoch(epoch, predict_train)
    checkpoint['method'] = method.state_dict();  method.load_state_dict(...) on resume

as Cole et al.'s LabelEstimator (single-positive-multi-label, models.py) and the task objects of
timm and open_clip own their state. A new method is a subclass and one entry of `METHODS`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

import label_tables
import losses
from label_tables import Annotations
from config import Config
from datasets import FULL_OBSERVED


class Method:
    """A loss of the `losses.LOSSES` registry, with the observed-label matrix of the train split.

    Class attributes say what the training loop must supply:
    needs_pseudo_labels: batch['pseudo_labels'] from the frozen CLIP; uses_warmup: --warmup-epoch
    counts epochs before the method's own rule starts; clean_train_labels: train on the clean
    labels instead of the observed ones (the full-label baselines bce, bce_ls); schedule_uses_epochs:
    the total number of epochs enters the method, so a finished run cannot be resumed for more;
    full_labels_refusal: why the method cannot train with every label observed (--observed full), or
    None when it can: its rules for unknown entries then have nothing to act on and it trains on its
    observed part (EM, EM_APL, EM_PL: the BCE of the labels; docs/partial-labels.md).
    """
    needs_pseudo_labels = False
    uses_warmup = False
    clean_train_labels = False
    schedule_uses_epochs = False  # True: the total number of epochs enters the method (no resume with more)
    edits_observed = False  # True: the method rewrites its observed matrix (EM_APL, LL-Cp)
    full_labels_refusal: str | None = None
    # False: the method reads no training label at all (-l CCD): datasets.load_splits(unlabelled=True) reads
    # no observed-label file, trains on the whole official train split and validates on the test split.
    reads_train_labels = True
    # A method with pseudo-labels of its own (AEVLP, CCD) names their builder: a callable (cfg, data
    # (run_data.Data), device) -> (pseudo_labeler.PseudoLabelSource, quality dict or None). None: VLPL's
    # frozen-CLIP labels (pseudo_label_policy.build_pseudo_labels).
    pseudo_label_builder = None

    @classmethod
    def uses_pseudo_labels(cls, cfg: Config) -> bool:
        """Whether a run of this method computes pseudo-labels: when it needs them, unless every label
        is observed (--observed full), since pseudo-labels only fill unknown entries and there are none."""
        return cls.needs_pseudo_labels and cfg.observed != FULL_OBSERVED

    @classmethod
    def training_images(cls, cfg: Config, images):
        """The training dataset the method reads (a subclass may add views of each image); as given."""
        return images

    def __init__(self, cfg: Config, train_observed: np.ndarray, device):
        self.name = cfg.loss
        self.cfg = cfg
        self.num_classes = train_observed.shape[1]
        self.hparams = dict(alpha=cfg.alpha, beta=cfg.beta, beta_pos=cfg.beta_pos, beta_neg=cfg.beta_neg,
                            positive=2, negative=4, unknown=4, warmup_epoch=cfg.warmup_epoch, ls_coef=0.1,
                            expected_num_pos=cfg.data.expected_num_pos, num_classes=self.num_classes)
        # N x K, a copy: a method that edits it in place (LL-Cp) must not edit the split's labels. Partial
        # annotations (a label_tables.Annotations table) stay on the host, read per batch, unless the
        # method edits them (edits_observed: then a dense float32 copy, for small data).
        if self.edits_observed and isinstance(train_observed, Annotations):
            train_observed = np.asarray(train_observed, dtype=np.float32)
        self.observed = label_tables.on_device(train_observed, device, copy=True)

    def param_groups(self, lr: float) -> list[dict]:
        """Extra optimiser parameter groups the method trains (none for a plain loss)."""
        return []

    def use_pseudo_labels(self, source) -> None:
        """Called once with the run's pseudo-label source (when there is one), before a resumed run's state
        is loaded: a method that owns its source's state (CCD's table) keeps it; others ignore it."""

    def second_view(self, epoch: int) -> str | None:
        """The batch key of a second view of each training image that the engine also runs through the model
        in this epoch, after the first (its logits reach `loss` as batch['view_logits']); None: no second view."""
        return None

    def closing_lines(self, logger) -> list[str]:
        """Lines the run prints after the original's three closing lines (instrumentation.TrainLogger
        `logger` holds every epoch's metrics); none by default."""
        return []

    def loss(self, logits: torch.Tensor, preds: torch.Tensor, batch: dict, *, epoch: int, step: int) -> torch.Tensor:
        """Scalar loss of one batch. logits, preds = sigmoid(logits): B x K float32; batch holds
        'index' (B,), 'observed' (B x K, rows of self.observed), 'true' (B x K), 'pseudo_labels' (B x K or
        None) and 'view_logits' (B x K of the second view, see second_view, or None). The input ranges are
        checked on the first step of an epoch."""
        return losses.compute_batch_loss(self.name, preds, batch['observed'], self.hparams,
                                         true_labels=batch['true'], pseudo_labels=batch['pseudo_labels'],
                                         epoch=epoch, validate=step == 0)

    def aux_loss(self, logits: torch.Tensor, preds: torch.Tensor, batch: dict, *, epoch: int,
                 step: int) -> torch.Tensor:
        """Loss of a head's auxiliary logits (SGRE's label-attention branch), which the engine
        weights by --lamda: by default the method's own loss, as SGRE applies one criterion to both
        outputs. A method whose `loss` has terms that are not about the logits (a label
        estimator's, a prior's) overrides this so that they do not count twice."""
        return self.loss(logits, preds, batch, epoch=epoch, step=step)

    def end_epoch(self, epoch: int, predict_train: Callable[[], np.ndarray]) -> None:
        """Called after the train phase of every epoch; predict_train() gives the N x K sigmoid
        outputs of the current model on the train split (eval mode, row order, NaN rows for
        skipped images)."""

    def observed_labels(self):
        """The N x K observed labels now, for the train phase's metrics: a numpy array, or the split's
        Annotations table when the method reads it unchanged."""
        return self.observed.cpu().numpy() if torch.is_tensor(self.observed) else self.observed.labels

    def state_dict(self) -> dict:
        # An annotation table read unchanged is data, not state: it is not copied into every checkpoint.
        return {'observed': self.observed.cpu()} if torch.is_tensor(self.observed) else {}

    def load_state_dict(self, state: dict) -> None:
        if 'observed' in state:
            self.observed = state['observed'].to(self.observed.device)


class PseudoLabelMethod(Method):
    """EM_PL and EM_PL_ASL: the frozen CLIP's pseudo-labels enter the loss after the warm-up. With
    every label observed (--observed full) no pseudo-label is made: they only ever fill unknown
    entries (o = 0), so the loss is the same whatever they are, and an all-zero matrix stands in."""
    needs_pseudo_labels = True
    uses_warmup = True

    def loss(self, logits, preds, batch, *, epoch, step):
        if batch['pseudo_labels'] is None:  # --observed full: no unknown entry to fill
            batch = batch | {'pseudo_labels': torch.zeros_like(batch['observed'])}
        return super().loss(logits, preds, batch, epoch=epoch, step=step)


class CleanLabelMethod(Method):
    """bce, bce_ls: trained on every clean label (the full-label upper bound)."""
    clean_train_labels = True


class AsymmetricPseudoLabelling(Method):
    """EM_APL (Zhou et al., SPML-AckTheUnknown): after the train phase of every epoch from the
    warm-up on, the lowest-scoring unknown entries of each class become soft negatives of the
    observed matrix (losses.apl_update), which the next epochs train on."""
    uses_warmup = True
    schedule_uses_epochs = True  # n_c = U_c / (epochs - warm-up)
    edits_observed = True

    def __init__(self, cfg: Config, train_observed: np.ndarray, device):
        super().__init__(cfg, train_observed, device)
        self.unknown_counts = losses.count_unknowns(train_observed)  # U_c of the initial matrix

    def end_epoch(self, epoch: int, predict_train: Callable[[], np.ndarray]) -> None:
        if epoch < self.cfg.warmup_epoch:
            return
        preds = np.nan_to_num(predict_train(), nan=1.0)  # a skipped image is never made a negative
        self.observed = torch.as_tensor(losses.apl_update(
            preds, self.observed.cpu().numpy(), self.unknown_counts, epoch=epoch, num_epochs=self.cfg.epochs,
            warmup_epoch=self.cfg.warmup_epoch), dtype=torch.float32, device=self.observed.device)


def _method_class(name: str) -> type[Method]:
    if name == 'EM_APL':
        return AsymmetricPseudoLabelling
    if name in losses.NEEDS_PSEUDO_LABELS:
        return PseudoLabelMethod
    if name in ('bce', 'bce_ls'):
        return CleanLabelMethod
    return Method


METHODS: dict[str, type[Method]] = {name: _method_class(name) for name in losses.LOSSES}

HELP = {
    'an': 'assume every unobserved label negative',
    'an_ls': 'assume negative, with label smoothing 0.1',
    'wan': 'assume negative, down-weighted by 1/(K-1)',
    'epr': 'observed positives + expected number of positives per image as a regulariser (Cole et al.)',
    'iu': 'ignore unobserved labels (observed positives and negatives only)',
    'iun': 'ignore unobserved, but use the true negatives (needs clean labels; an upper bound)',
    'pr': 'pairwise ranking: each observed positive scored above every unobserved class by a margin of 1',
    'bce': 'full-label BCE on the clean labels (upper bound)',
    'bce_ls': 'full-label BCE with label smoothing 0.1 (upper bound)',
    'EM': 'entropy maximisation on unobserved labels (Zhou et al.)',
    'EM_APL': 'EM + asymmetric pseudo-labelling of the lowest-scoring unknowns after each epoch (Zhou et al.)',
    'EM_PL': 'VLPL: EM + CLIP positive pseudo-labels (label-smoothed BCE weighted by --beta-pos)',
    'EM_PL_ASL': 'VLPL with asymmetric focusing (gammas 2 / 4 / 4 for positives, negatives, unknowns)',
}


def register(name: str, help: str):
    """Class decorator: make a Method subclass selectable as `-l name` (help: one line for --help).
    Modules of further methods register theirs on import, as timm's register_model does."""
    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f'method {name!r} is registered twice')
        METHODS[name], HELP[name] = cls, help
        return cls
    return add


def build_method(cfg: Config, train_observed: np.ndarray, device) -> Method:
    """The method object of cfg.loss for the train split's observed labels (N x K)."""
    if cfg.loss not in METHODS:
        losses._get_loss(cfg.loss)  # raises the registry's message (an unknown name)
    return METHODS[cfg.loss](cfg, train_observed, device)

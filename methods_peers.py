"""The single-positive peer methods as methods of this CLI (issue 13): ROLE, LL-R / LL-Ct / LL-Cp, GR-Loss,
AEVLP (its CLIP side in aevlp.py), and the run-level options --boostlu and --linear-init.

The math is in losses_peers.py (each function tested against values computed by its original code);
this module holds what lasts across batches and epochs, as each original keeps it:
- ROLE (elijahcole/single-positive-multi-label): the label estimator, an N x K table of logits with its
  own Adam group at lr_mult * lr (train.py `initialize_training_run`), trained densely (the whole table
  is one parameter, so Adam's moments keep moving rows of earlier batches, as there).
- LL (snucml/LargeLossMatters): the clean rate, a function of the epoch (`losses_peers.ll_clean_rate`,
  the original's repeated subtraction), and for LL-Cp the permanent flips in the observed matrix
  (train.py `run_train`: `label_matrix_obs[idx[r], c] = 1.0`).
- GR (yan4xi1/GRLoss): the per-epoch (w, b, mu, sigma) of `losses_peers.gr_schedule`; AEVLP
  (Fsoft-AIC/AEVLP) the same, with pseudo-labels recomputed at every step (no state).
Their state goes into the checkpoint through `state_dict` (and the optimiser's, for ROLE's Adam moments).

Importing this module registers the methods (methods.register); main_clip.py imports it once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

import aevlp
import losses_peers as lp
import methods
from config import DATASETS, NON_NEGATIVE, POSITIVE, Config, UserError, number

LL_SCHEMES = lp.LL_SCHEMES
# Methods whose original code offers LinearInit: every loss of Cole et al.'s train.py (train_mode
# 'linear_init'), GR-Loss (GRLoss train.py, `linear_init` epochs with a frozen feature extractor) and
# AEVLP (its train.py keeps GR's `linear_init`, schedules shifted alike).
LINEAR_INIT_METHODS = ('an', 'an_ls', 'wan', 'epr', 'iu', 'iun', 'pr', 'bce', 'bce_ls', 'role', 'GR', 'AEVLP')


def _delta_rel(cfg: Config) -> float:
    """The per-epoch rate of LL from --ll-delta-rel (in percent, as LargeLossMatters' --delta_rel)."""
    return lp.ll_delta_rel(cfg.ll_delta_rel)


# ----------------------------------------------------------------------------------------------
# ROLE


class LabelEstimator(nn.Module):
    """Cole et al.'s g (models.py `LabelEstimator`): one row of logits per training image (row i = row
    i of the train split, as datasets.load_splits orders it). estimates(index) = sigmoid(logits[index])."""

    def __init__(self, observed: np.ndarray):
        super().__init__()
        # The global torch generator, as the original (there unseeded; here seeded by -s in main_clip.run).
        self.logits = nn.Parameter(lp.role_init_logits(observed=observed))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits[index])


@methods.register('role', "ROLE (Cole et al.): a per-image label estimator trained jointly, with its own "
                          "Adam group at --role-lr-mult x lr")
class Role(methods.Method):
    full_labels_refusal = ('estimates the unobserved labels with its learnable label table and takes single '
                           'positives only (its original asserts it)')

    def __init__(self, cfg: Config, train_observed: np.ndarray, device):
        super().__init__(cfg, train_observed, device)
        if (np.asarray(train_observed) < 0).any():
            raise UserError('-l role: the observed labels hold negatives (-1); ROLE takes single positives only '
                            '(its original asserts it): regenerate them with 0 negatives')
        self.estimator = LabelEstimator(train_observed).to(device)
        self.expected_num_pos = cfg.data.expected_num_pos

    def param_groups(self, lr: float) -> list[dict]:
        return [{'params': [self.estimator.logits], 'lr': self.cfg.role_lr_mult * lr}]

    def loss(self, logits, preds, batch, *, epoch, step):
        return lp.role_loss(preds=preds, estimates=self.estimator(batch['index']), observed=batch['observed'],
                            expected_num_pos=self.expected_num_pos)

    def state_dict(self) -> dict:
        return {**super().state_dict(), 'estimator': self.estimator.logits.detach().cpu().clone(),
                'rows': self.estimator.logits.shape[0]}

    def load_state_dict(self, state: dict) -> None:
        if state.get('rows') != self.estimator.logits.shape[0]:
            raise UserError(f'the checkpoint\'s ROLE table has {state.get("rows")} rows, the train split '
                            f'{self.estimator.logits.shape[0]}: resume with the same data')
        super().load_state_dict(state)
        with torch.no_grad():  # in place: the optimiser holds this parameter
            self.estimator.logits.copy_(state['estimator'])


# ----------------------------------------------------------------------------------------------
# LL-R / LL-Ct / LL-Cp


class LargeLoss(methods.Method):
    """Large-loss rejection (LL-R) or correction (LL-Ct, LL-Cp) of the assume-negative BCE (Kim et al.
    2022). With --boostlu, BridgeGapExplanationPAMC's copy of these losses: its LL-Cp flips the entries
    with u >= tau (k of them) where LargeLossMatters flips u > tau (k - 1)."""
    scheme = ''
    full_labels_refusal = ('rejects or corrects the largest losses among the unobserved entries; with every '
                           'label observed its threshold falls to 0 and it would reject or flip observed labels')

    def loss(self, logits, preds, batch, *, epoch, step):
        # LL-Cp writes into self.observed, a copy of the split's labels (methods.Method.__init__).
        delta_rel = _delta_rel(self.cfg)
        loss, flips = lp.ll_loss(logits=logits, observed=batch['observed'],
                                 clean_rate=lp.ll_clean_rate(epoch=epoch, delta_rel=delta_rel), delta_rel=delta_rel,
                                 scheme=self.scheme, llcp_as_released=self.cfg.llcp_as_released,
                                 flips_include_threshold=self.cfg.boostlu)
        if flips is not None:  # LL-Cp: permanent, as the original's label_matrix_obs[idx[r], c] = 1.0
            self.observed[batch['index']] = torch.where(flips, torch.ones_like(batch['observed']), batch['observed'])
        return loss


@methods.register('LL-R', 'Large Loss Matters (Kim et al.): assume negative, the largest unobserved losses '
                          'rejected, a rate growing by --ll-delta-rel percent per epoch')
class LargeLossRejection(LargeLoss):
    scheme = 'LL-R'


@methods.register('LL-Ct', 'Large Loss Matters: the largest unobserved losses corrected (target 1) for the step')
class LargeLossCorrectionTemporary(LargeLoss):
    scheme = 'LL-Ct'


@methods.register('LL-Cp', 'Large Loss Matters: the largest unobserved losses corrected permanently in the '
                           'observed labels (--llcp-as-released: as LL-Ct, as the released code runs)')
class LargeLossCorrectionPermanent(LargeLoss):
    scheme = 'LL-Cp'
    edits_observed = True


# ----------------------------------------------------------------------------------------------
# GR-Loss


@methods.register('GR', 'GR-Loss (Chen et al.): soft pseudo-labels k(p) and Gaussian re-weighting v(p) of the '
                        'unknowns, on per-epoch schedules (--gr-beta, --gr-alpha, --gr-q)')
class GeneralizedRobust(methods.Method):
    schedule_uses_epochs = True  # its schedules run over --epochs
    full_labels_refusal = ('has no term for an annotated negative (its negatives are the unknown entries): with '
                           'every label observed it would train on the positives alone')

    def loss(self, logits, preds, batch, *, epoch, step):
        s = lp.gr_schedule(epoch=epoch, num_epochs=self.cfg.epochs, beta=self.cfg.gr_beta, alpha=self.cfg.gr_alpha,
                           linear_init=self.cfg.linear_init)
        q2, q3 = self.cfg.gr_q
        return lp.gr_loss(preds=preds, observed=batch['observed'], w=s.w, b=s.b, mu=s.mu, sigma=s.sigma, q2=q2, q3=q3)


# ----------------------------------------------------------------------------------------------
# AEVLP


@methods.register('AEVLP', "AEVLP (Tran et al.): GR-Loss plus a pseudo-positive term, CLIP pseudo-labels of "
                           "the image and its tiles at every step (--aevlp-* flags)")
class Aevlp(methods.Method):
    """GPR-Loss (losses_peers.aevlp_loss) on the pseudo-labels that aevlp.py makes at every step from
    the frozen CLIP's scores of each image's views; GR's schedules of the epoch (--gr-beta, --gr-alpha,
    --gr-q). The pseudo-labels are not state: the original recomputes them at every step."""
    needs_pseudo_labels = True
    schedule_uses_epochs = True  # GR's schedules run over --epochs
    full_labels_refusal = ('scores CLIP views of every image at every step to fill the unknown entries, where '
                           'its GR-Loss acts too; with every label observed there are none')

    @staticmethod
    def pseudo_label_builder(cfg: Config, data, device):
        return aevlp.build_pseudo_labels(cfg, data.splits['train'], device, data.num_classes)

    @classmethod
    def training_images(cls, cfg: Config, images):
        return aevlp.CropViews(images, cfg.aevlp_grid, aevlp.crop_size(cfg))

    def loss(self, logits, preds, batch, *, epoch, step):
        cfg = self.cfg
        s = lp.gr_schedule(epoch=epoch, num_epochs=cfg.epochs, beta=cfg.gr_beta, alpha=cfg.gr_alpha,
                           linear_init=cfg.linear_init)
        q2, q3 = cfg.gr_q
        lam1, lam2 = cfg.aevlp_lam
        return lp.aevlp_loss(preds=preds, observed=batch['observed'], pseudo_labels=batch['pseudo_labels'],
                             w=s.w, b=s.b, mu=s.mu, sigma=s.sigma, q2=q2, q3=q3, lam1=lam1, lam2=lam2,
                             rho=cfg.aevlp_rho, reg=cfg.aevlp_reg, expected_num_pos=cfg.data.expected_num_pos)


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The 'Peer methods' group of --help."""
    g = parser.add_argument_group('Peer methods', 'settings of -l role, LL-R, LL-Ct, LL-Cp, GR and of --boostlu / '
                                  '--linear-init (docs/peer-methods.md); unset: the paper\'s value per dataset')
    g.add_argument('--ll-delta-rel', type=number(), default=None, metavar='PERCENT',
                   help='LL-*: growth of the rejection / correction rate per epoch, in percent (default: LL-R 0.5, '
                        'LL-Ct 0.2, LL-Cp 0.1, BridgeGapExplanationPAMC\'s values; LargeLossMatters publishes none)')
    g.add_argument('--llcp-as-released', action='store_true',
                   help='LL-Cp: run as the released LargeLossMatters does (as LL-Ct; its `is` test is never true)')
    g.add_argument('--boostlu', action='store_true',
                   help='BoostLU (Kim et al. 2023): multiply the positive class-activation-map values by '
                        '--boostlu-alpha before pooling, in training and inference; any method, CAM backbones')
    g.add_argument('--boostlu-alpha', type=number(), default=None, help='BoostLU factor (default 5, its README)')
    g.add_argument('--role-lr-mult', type=number(), default=None,
                   help="role: the label estimator's lr = this x --lr (default 10, Cole et al.)")
    g.add_argument('--gr-beta', type=number(), nargs=4, default=None, metavar=('W0', 'WT', 'B0', 'BT'),
                   help='GR: schedule of the soft pseudo-label k(p) = sigmoid(w p + b) (default: per dataset)')
    g.add_argument('--gr-alpha', type=number(), nargs=4, default=None, metavar=('MU0', 'SIGMA0', 'MUT', 'SIGMAT'),
                   help='GR: schedule of the re-weight v(p) = exp(-(p - mu)^2 / 2 sigma^2) (default: per dataset)')
    g.add_argument('--gr-q', type=number(), nargs=2, default=None, metavar=('Q2', 'Q3'),
                   help='GR: the generalised cross-entropy exponents (default: per dataset)')
    g.add_argument('--head-lr-mult', type=number(), default=None,
                   help="the linear head's lr = this x --lr (default: 10 for LL-*, GR and --boostlu, as their "
                        'originals; 1 otherwise)')
    g.add_argument('--linear-init', type=number(int, low=0), default=0, metavar='EPOCHS',
                   help='LinearInit: the first EPOCHS of the run train the head (and ROLE\'s estimator) on a '
                        'frozen trunk, the rest end to end (Cole et al.; GR-Loss); default 0')
    g = parser.add_argument_group('AEVLP', 'settings of -l AEVLP (aevlp.py, docs/peer-methods.md); unset: the value '
                                  'of its configs/<dataset>.json (pascal\'s for the demo). --gr-beta, --gr-alpha and '
                                  '--gr-q set its GR schedules')
    unit = number(low=0, high=1)
    g.add_argument('--aevlp-grid', type=number(int, low=1), default=None, metavar='G',
                   help='the image and its G x G tiles are scored (default 4, cub 5)')
    g.add_argument('--aevlp-top-k', type=number(int, low=1), default=None, metavar='N',
                   help='at most N pseudo-positives per image (default 3, cub 32)')
    g.add_argument('--aevlp-eta', type=unit, default=None, metavar='ETA',
                   help='cap of the observed positive\'s score below which a tile\'s max is used')
    g.add_argument('--aevlp-threshold', type=unit, default=None, metavar='T', help='pseudo-positive score threshold')
    g.add_argument('--aevlp-temp', type=POSITIVE, default=None, metavar='TEMP',
                   help='softmax temperature of the CLIP cosines')
    g.add_argument('--aevlp-negative-ratio', type=number(low=0, high=1, high_open=True), default=None, metavar='R',
                   help='fraction of lowest-scoring classes whose pseudo-positives are cleared')
    g.add_argument('--aevlp-lam', type=unit, nargs=2, default=None, metavar=('LAM1', 'LAM2'),
                   help='GPR-Loss: a pseudo-positive\'s weight 1 - v is kept in [LAM2, LAM1]')
    g.add_argument('--aevlp-rho', type=unit, default=None, metavar='RHO',
                   help='GPR-Loss: label smoothing of pseudo-positives')
    g.add_argument('--aevlp-reg', type=NON_NEGATIVE, default=None, metavar='WEIGHT',
                   help='GPR-Loss: weight of the expected-positives regulariser')
    g.add_argument('--aevlp-sparse-topk', type=number(int, low=1), default=None, metavar='N',
                   help='text graph: neighbours kept per class (default 20 / 62 / 50 / 312)')
    g.add_argument('--aevlp-reweight-p', type=unit, default=None, metavar='P',
                   help='text graph: weight of the neighbours (the class itself keeps 1 - p; default 0.2)')
    g.add_argument('--aevlp-relation', default=None, metavar='FILE',
                   help='text graph: K x K class relation .npy, e.g. the original\'s data/relation/relation+voc.npy '
                        '(default: cosines of the class text features)')
    g.add_argument('--aevlp-gcn', default='random', metavar='random|none|FILE',
                   help='text graph weights: "random" draws them as the original does (uniform, frozen; seeded '
                        'by -s here, unseeded there), "none" leaves the text features as they are, FILE holds '
                        'three weights (gc1, gc2, gc3), e.g. saved from a run of the original')
    g.add_argument('--aevlp-classnames', default=None, metavar='FILE',
                   help='class names of the prompts, one per line (e.g. the original\'s data/classnames/'
                        'cub_labels.txt; default: this repository\'s, VOC spelled as the original)')
    g.add_argument('--aevlp-precision', default='auto', choices=['auto', 'fp16', 'fp32'],
                   help='precision of the frozen CLIP scorer; auto: fp16 (the original\'s) on CUDA, fp32 on the '
                        'CPU, whose fp16 kernels are several times slower')
    g.add_argument('--aevlp-crop-size', type=number(int, low=8), default=None, metavar='S',
                   help='side of the scored views (default: the CLIP\'s input side, 224 for ViT-B-16)')


def _method_key(loss: str) -> str | None:
    return {'role': 'role', 'GR': 'GR', 'AEVLP': 'AEVLP', **{s: 'LL' for s in LL_SCHEMES}}.get(loss)


AEVLP_FLAGS = ('--aevlp-grid', '--aevlp-top-k', '--aevlp-eta', '--aevlp-threshold', '--aevlp-temp',
               '--aevlp-negative-ratio', '--aevlp-lam', '--aevlp-rho', '--aevlp-reg', '--aevlp-sparse-topk',
               '--aevlp-reweight-p', '--aevlp-relation', '--aevlp-classnames', '--aevlp-crop-size')


def _aevlp_settings(a: argparse.Namespace, paper: dict, error) -> dict:
    """The aevlp_* Config fields: each flag, or its value in the original's configs/<dataset>.json."""
    def pick(flag: str, key: str):
        value = getattr(a, 'aevlp_' + flag)
        return paper[key] if value is None else value

    kw = dict(aevlp_grid=int(pick('grid', 'grid_size')), aevlp_top_k=int(pick('top_k', 'top_k')),
              aevlp_eta=float(pick('eta', 'eta')), aevlp_threshold=float(pick('threshold', 'threshold')),
              aevlp_temp=float(pick('temp', 'temp')),
              aevlp_negative_ratio=float(pick('negative_ratio', 'negative_ratio')),
              aevlp_lam=tuple(float(v) for v in pick('lam', 'lam')), aevlp_rho=float(pick('rho', 'rho')),
              aevlp_reg=float(pick('reg', 'reg')), aevlp_sparse_topk=int(pick('sparse_topk', 'sparse_topk')),
              aevlp_reweight_p=float(pick('reweight_p', 'reweight_p')), aevlp_relation=a.aevlp_relation,
              aevlp_gcn=a.aevlp_gcn, aevlp_classnames=a.aevlp_classnames, aevlp_precision=a.aevlp_precision,
              aevlp_crop_size=a.aevlp_crop_size)
    num_classes = DATASETS[a.dataset].num_classes
    if kw['aevlp_lam'][0] < kw['aevlp_lam'][1]:
        error(f'--aevlp-lam: LAM1 must be >= LAM2 (a pseudo-positive\'s weight lies in [LAM2, LAM1]), got '
              f'{list(kw["aevlp_lam"])}')
    if kw['aevlp_top_k'] > num_classes:
        error(f'--aevlp-top-k {kw["aevlp_top_k"]} exceeds the {num_classes} classes of -d {a.dataset}')
    if kw['aevlp_sparse_topk'] > num_classes:
        error(f'--aevlp-sparse-topk {kw["aevlp_sparse_topk"]} exceeds the {num_classes} classes of -d {a.dataset}')
    for flag, path in (('--aevlp-relation', a.aevlp_relation), ('--aevlp-classnames', a.aevlp_classnames),
                       ('--aevlp-gcn', None if a.aevlp_gcn in ('random', 'none') else a.aevlp_gcn)):
        if path is not None and not Path(path).is_file():
            error(f'{flag} {path}: no such file')
    if a.text_features:
        error('--text-features: -l AEVLP encodes its own prompts ("a photo of a {name}.") with the CLIP it scores '
              'with; use --aevlp-classnames to change the names')
    if a.data_format == 'packed':
        error('-l AEVLP reads --data-format pil: its views are crops of the full image, which the packs do not hold')
    if a.clip_model is None and a.dataset != 'demo':
        a.clip_model = 'ViT-B-16'  # the original's OpenAI ViT-B/16 (configs/*.json clip_model)
    return kw


def apply_defaults(a: argparse.Namespace, error) -> dict:
    """Checks the peer flags of the parsed command line `a` (error(message) refuses in one line), fills
    a.batch_size, a.lr, a.epochs from the paper's values where unset (not for the demo, which keeps its
    own training settings), and returns the build_config keyword arguments of the peer settings."""
    method = methods.METHODS[a.loss]
    key = _method_key(a.loss)
    given = {flag: getattr(a, flag.lstrip('-').replace('-', '_')) for flag in
             ('--ll-delta-rel', '--boostlu-alpha', '--role-lr-mult', '--gr-beta', '--gr-alpha', '--gr-q')}
    owners = {'--ll-delta-rel': ('LL',), '--role-lr-mult': ('role',), '--gr-beta': ('GR', 'AEVLP'),
              '--gr-alpha': ('GR', 'AEVLP'), '--gr-q': ('GR', 'AEVLP')}
    for flag, owner in owners.items():
        if given[flag] is not None and key not in owner:
            owner_text = '-l LL-R / LL-Ct / LL-Cp' if owner == ('LL',) else '-l ' + ' / '.join(owner)
            error(f'{flag} is a setting of {owner_text}, not of -l {a.loss}')
    aevlp_flags = {flag: getattr(a, flag.lstrip('-').replace('-', '_')) for flag in AEVLP_FLAGS}
    aevlp_flags['--aevlp-gcn'] = None if a.aevlp_gcn == 'random' else a.aevlp_gcn
    aevlp_flags['--aevlp-precision'] = None if a.aevlp_precision == 'auto' else a.aevlp_precision
    for flag, value in aevlp_flags.items():
        if value is not None and key != 'AEVLP':
            error(f'{flag} is a setting of -l AEVLP, not of -l {a.loss}')
    if a.llcp_as_released and a.loss != 'LL-Cp':
        error(f'--llcp-as-released is a setting of -l LL-Cp, not of -l {a.loss}')
    if given['--boostlu-alpha'] is not None and not a.boostlu:
        error('--boostlu-alpha needs --boostlu')
    if a.linear_init and a.loss not in LINEAR_INIT_METHODS:
        error(f'--linear-init: the original of -l {a.loss} offers no LinearInit; it applies to '
              f'{", ".join(LINEAR_INIT_METHODS)}')

    row_key = 'pascal' if a.dataset == 'demo' else DATASETS[a.dataset].published_as or a.dataset
    published = row_key in lp.PEER_DEFAULTS['boostlu']
    if (key or a.boostlu) and not published:  # e.g. OpenImages: none of these papers gives its settings
        error(f'-l {a.loss}{" --boostlu" if a.boostlu else ""}: its original publishes no settings for '
              f'-d {a.dataset}; use it on {", ".join(sorted(set(lp.PEER_DEFAULTS["boostlu"]) - {"demo"}))} or '
              'the demo')
    paper = {}
    if key in ('role', 'LL', 'GR', 'AEVLP'):
        paper = lp.peer_hparams(key, row_key)
    boost = lp.peer_hparams('boostlu', row_key) if published else {}
    if a.dataset != 'demo' and (key or a.boostlu):
        # Each paper's training settings (PEER_DEFAULTS sources); BoostLU's when it is on.
        settings = boost if a.boostlu else paper
        a.batch_size = a.batch_size or settings['bsize']
        a.lr = a.lr or settings['lr']
        a.epochs = a.epochs or settings['num_epochs']
    epochs = a.epochs or DATASETS[a.dataset].epochs

    kw = dict(boostlu=a.boostlu, linear_init=a.linear_init, llcp_as_released=a.llcp_as_released)
    mult_default = 10.0 if key in ('LL', 'GR', 'AEVLP') or a.boostlu else 1.0
    kw['head_lr_mult'] = a.head_lr_mult if a.head_lr_mult is not None else mult_default
    if kw['head_lr_mult'] <= 0:
        error(f'--head-lr-mult must be > 0, got {a.head_lr_mult}')
    if a.boostlu:
        kw['boostlu_alpha'] = a.boostlu_alpha if a.boostlu_alpha is not None else float(boost['alpha'])
        if not kw['boostlu_alpha'] > 0:
            error(f'--boostlu-alpha must be > 0, got {a.boostlu_alpha}')
    if key == 'role':
        kw['role_lr_mult'] = a.role_lr_mult if a.role_lr_mult is not None else float(paper['lr_mult'])
        if not kw['role_lr_mult'] > 0:
            error(f'--role-lr-mult must be > 0, got {a.role_lr_mult}')
    if key == 'LL':
        source = boost if a.boostlu else paper
        d = a.ll_delta_rel if a.ll_delta_rel is not None else float(source[f'delta_rel_percent[{a.loss}]'])
        if not 0 < d < 100:
            error(f'--ll-delta-rel must be in (0, 100) percent per epoch, got {d}')
        if (epochs - 1) * d >= 100:
            error(f'--ll-delta-rel {d} reaches a rate of 100 % within --epochs {epochs}: lower it')
        kw['ll_delta_rel'] = d
    if key == 'AEVLP':
        kw.update(_aevlp_settings(a, paper, error))
    if key in ('GR', 'AEVLP'):
        kw['gr_beta'] = tuple(a.gr_beta if a.gr_beta is not None else paper['beta'])
        kw['gr_alpha'] = tuple(a.gr_alpha if a.gr_alpha is not None else paper['alpha'])
        kw['gr_q'] = tuple(a.gr_q if a.gr_q is not None else paper['q2q3'])
        if kw['gr_alpha'][1] <= 0 or kw['gr_alpha'][3] <= 0:
            error(f'--gr-alpha: both sigmas must be > 0, got {list(kw["gr_alpha"])}')
        if min(kw['gr_q']) <= 0:
            error(f'--gr-q: q2 and q3 must be > 0, got {list(kw["gr_q"])}')
    if a.linear_init < 0 or a.linear_init >= epochs:
        error(f'--linear-init must be in [0, --epochs {epochs}), got {a.linear_init}')
    if a.boostlu:
        from backbones import BACKBONES, backbone  # imports torch and the CLIP loading; not needed otherwise
        model = a.model or DATASETS[a.dataset].model
        if not backbone(model).cam:
            error(f'--boostlu needs a class activation map: -m {model} does not average-pool its feature map; '
                  f'use one of {", ".join(n for n, b in BACKBONES.items() if b.cam)}')
        if a.run_name is None:
            a.run_name = f'{a.dataset}_{a.loss}+boostlu_{model.replace(":", "-")}_s{a.seed}'
    return kw

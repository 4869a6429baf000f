"""How a training run uses heads.py: the head's options from the Config, SGRE's label embeddings,
the weight EMA and its selection rule, the optimiser and schedule, and their checkpoint state.

main_clip.py calls these; the heads, the EMA and the recipe themselves live in heads.py (see
docs/heads.md for the command line and the differences from the originals).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import class_text_features
from config import DATASETS, Config, UserError, one_line
from distributed import log
from heads import HeadConfigError, Query2LabelHead, dataset_defaults
from recipe import OPTIMIZERS, SCHEDULES, ModelEMA, build_optimizer, build_schedule
from label_tables import take_rows
from metrics import compute_metrics


# ------------------------------------------------------------------------------ command line

def add_arguments(g) -> None:
    """The 'Transformer heads' flags (an argparse group); every default is Config's."""
    d = Config.__dataclass_fields__
    g.add_argument('--head', default='linear', choices=['linear', 'bottleneck', 'q2l', 'sgre'],
                   help='classifier head on the backbone: linear (the original), bottleneck (CSL\'s OpenImages head, '
                        'Linear(C, 512) then Linear(512, K)), q2l (Query2Label) or sgre (SGRE); q2l and sgre read the '
                        'whole feature map')
    g.add_argument('--q2l-hidden', type=int, default=None, help=_sized('Query2Label hidden size', 'q2l_hidden'))
    g.add_argument('--q2l-enc-layers', type=int, default=None, help=_sized('Query2Label encoder layers', 'q2l_enc_layers'))
    g.add_argument('--q2l-dec-layers', type=int, default=None, help=_sized('Query2Label decoder layers', 'q2l_dec_layers'))
    g.add_argument('--q2l-heads', type=int, default=None, help=_sized('Query2Label attention heads', 'q2l_heads'))
    g.add_argument('--q2l-ffn', type=int, default=None, help=_sized('Query2Label feed-forward width', 'q2l_ffn'))
    g.add_argument('--q2l-dropout', type=float, default=d['q2l_dropout'].default, help='Query2Label dropout')
    g.add_argument('--q2l-pre-norm', action='store_true', help='Query2Label pre-norm layers (needs --q2l-dec-self-attn)')
    g.add_argument('--q2l-dec-self-attn', action='store_true',
                   help='keep the self-attention of the Query2Label decoder layers (the original removes it)')
    g.add_argument('--sgre-layers', type=int, default=None, help=_sized('SGRE encoder layers', 'sgre_layers'))
    g.add_argument('--sgre-heads', type=int, default=None, help=_sized('SGRE attention heads', 'sgre_heads'))
    g.add_argument('--sgre-ffn', type=int, default=None, help=_sized('SGRE encoder feed-forward width', 'sgre_ffn'))
    g.add_argument('--sgre-dropout', type=float, default=d['sgre_dropout'].default, help='SGRE encoder dropout')
    g.add_argument('--sgre-att-dim', type=int, default=None,
                   help=_sized('size of SGRE\'s low-rank bilinear label-to-pixel attention', 'sgre_att_dim'))
    g.add_argument('--sgre-tau', type=float, default=d['sgre_tau'].default, help='SGRE attention temperature')
    g.add_argument('--sgre-no-pos', action='store_true', help='SGRE without the sine position encoding')
    g.add_argument('--sgre-chunk', type=int, default=None,
                   help='compute SGRE\'s attention over blocks of this many classes, recomputed in the backward '
                        'pass (less memory, more time; default: all classes at once)')
    g.add_argument('--sgre-fused-score', action='store_true',
                   help='SGRE attention score with its two last linear maps fused (same function, less memory)')
    g.add_argument('--label-embeddings', default=None, metavar='FILE.npy',
                   help='SGRE label embeddings, a (K, E) .npy in class order (default: the run\'s CLIP text '
                        'features of the class names; the original uses BERT)')
    g.add_argument('--lamda', type=float, default=None,
                   help='weight of SGRE\'s auxiliary loss (default: SGRE\'s per dataset: coco 0.4, pascal 0.1, '
                        'nuswide 0.05, otherwise 1.0)')
    g.add_argument('--ema-decay', type=float, default=d['ema_decay'].default,
                   help='exponential moving average of the weights, updated after every step; each epoch '
                        'evaluates the model and the average and keeps the better on val, as Query2Label '
                        '(0 = off; the originals use 0.9997, SGRE on VOC 0.9983)')
    g.add_argument('--optimizer', default=d['optimizer'].default, choices=OPTIMIZERS,
                   help='adam (the original VLPL), adamw (the transformer heads\' recipe) or sgd (momentum 0.9, '
                        'LargeLossMatters\' choice for VOC)')
    g.add_argument('--weight-decay', type=float, default=d['weight_decay'].default,
                   help='weight decay (default 0; Query2Label 1e-2, SGRE 1e-4 with adamw; LargeLossMatters 1e-3 with sgd)')
    g.add_argument('--schedule', default=d['schedule'].default, choices=SCHEDULES,
                   help='learning-rate schedule: none (constant) or onecycle (OneCycleLR to --lr, '
                        'pct_start 0.2, stepped every batch)')


def _sized(text: str, name: str) -> str:
    """Help of a head-size flag: the paper's default and the datasets' own (DatasetInfo.head_sizes)."""
    own = [f'{row.name} {dict(row.head_sizes)[name]}' for row in DATASETS.values() if name in dict(row.head_sizes)]
    return f'{text} (default: {Config.__dataclass_fields__[name].default}, the paper\'s' + \
        ''.join(f'; {o}' for o in own) + ')'


def head_sizes(a: argparse.Namespace) -> None:
    """Fill the head sizes left unset: for the head in use the dataset's (the demo's small heads, as its
    row gives the backbone), else the paper's (Config's defaults, which the other heads keep, so that
    a run's settings name no size it does not use)."""
    own = dict(DATASETS[a.dataset].head_sizes) if a.dataset in DATASETS else {}
    for head, names in HEAD_SIZES.items():
        for name in names:
            if getattr(a, name) is None:
                default = Config.__dataclass_fields__[name].default
                setattr(a, name, own.get(name, default) if head == a.head else default)


def config_options(a: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The Config fields of the 'Transformer heads' flags, checked (parser.error on a bad value),
    with lamda's per-dataset default and the dataset's head sizes."""
    head_sizes(a)
    if a.head != 'sgre':
        for flag, value in (('--lamda', a.lamda), ('--label-embeddings', a.label_embeddings)):
            if value is not None:
                parser.error(f'{flag} applies to --head sgre only')
    if not 0.0 <= a.ema_decay < 1.0:
        parser.error('--ema-decay must be in [0, 1) (0 = off)')
    if a.weight_decay < 0:
        parser.error('--weight-decay must be >= 0')
    if a.lamda is not None and a.lamda < 0:
        parser.error('--lamda must be >= 0')
    for flag in ('q2l_hidden', 'q2l_heads', 'q2l_ffn', 'sgre_heads', 'sgre_ffn', 'sgre_att_dim', 'sgre_layers'):
        if getattr(a, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be >= 1')
    if a.q2l_enc_layers < 0:
        parser.error('--q2l-enc-layers must be >= 0')
    if a.sgre_chunk is not None and a.sgre_chunk < 1:
        parser.error('--sgre-chunk must be a positive number of classes')
    if a.sgre_tau <= 0:
        parser.error('--sgre-tau must be > 0')
    for flag in ('q2l_dropout', 'sgre_dropout'):
        if not 0.0 <= getattr(a, flag) < 1.0:
            parser.error(f'--{flag.replace("_", "-")} must be in [0, 1)')
    lamda = a.lamda
    if lamda is None:
        lamda = dataset_defaults(a.dataset, 'sgre')['lamda'] if a.head == 'sgre' else 0.0
    opts = dict(
        q2l_hidden=a.q2l_hidden, q2l_enc_layers=a.q2l_enc_layers, q2l_dec_layers=a.q2l_dec_layers,
        q2l_heads=a.q2l_heads, q2l_ffn=a.q2l_ffn, q2l_dropout=a.q2l_dropout, q2l_pre_norm=a.q2l_pre_norm,
        q2l_dec_self_attn=a.q2l_dec_self_attn, sgre_layers=a.sgre_layers, sgre_heads=a.sgre_heads,
        sgre_ffn=a.sgre_ffn, sgre_dropout=a.sgre_dropout, sgre_att_dim=a.sgre_att_dim, sgre_tau=a.sgre_tau,
        sgre_pos=not a.sgre_no_pos, sgre_chunk=a.sgre_chunk, sgre_fused_score=a.sgre_fused_score,
        label_embeddings=a.label_embeddings, lamda=float(lamda), ema_decay=a.ema_decay, optimizer=a.optimizer,
        weight_decay=a.weight_decay, schedule=a.schedule)
    if a.head == 'q2l':  # every Query2Label constraint is independent of the trunk: check it now
        try:
            with torch.device('meta'):
                Query2LabelHead(a.q2l_hidden, 1, **_q2l_kwargs(opts))
        except HeadConfigError as e:
            parser.error(str(e))
    return opts


# ------------------------------------------------------------------------------------- heads

# The Config fields that shape each head's weights (its state_dict): a checkpoint's head fits a run's
# when these are equal (checkpoints.architecture).
HEAD_SIZES = {
    'linear': (),
    'bottleneck': (),
    'q2l': ('q2l_hidden', 'q2l_enc_layers', 'q2l_dec_layers', 'q2l_heads', 'q2l_ffn', 'q2l_pre_norm',
            'q2l_dec_self_attn'),
    'sgre': ('sgre_layers', 'sgre_heads', 'sgre_ffn', 'sgre_att_dim'),
}


def _q2l_kwargs(c) -> dict:
    get = c.get if isinstance(c, dict) else lambda k: getattr(c, k)
    return dict(hidden_dim=get('q2l_hidden'), enc_layers=get('q2l_enc_layers'), dec_layers=get('q2l_dec_layers'),
                nheads=get('q2l_heads'), dim_feedforward=get('q2l_ffn'), dropout=get('q2l_dropout'),
                pre_norm=get('q2l_pre_norm'), keep_first_self_attn=get('q2l_dec_self_attn'),
                keep_other_self_attn=get('q2l_dec_self_attn'))


def head_options(cfg: Config, label_embeddings: np.ndarray | None = None) -> dict:
    """Keyword arguments of models.build_classifier for cfg.head (none for the linear head)."""
    if cfg.head == 'q2l':
        return _q2l_kwargs(cfg)
    if cfg.head == 'sgre':
        if label_embeddings is None:
            raise ValueError('the SGRE head needs its label embeddings (heads_run.label_embeddings)')
        return dict(label_embeddings=label_embeddings, num_layers=cfg.sgre_layers, num_heads=cfg.sgre_heads,
                    dim_feedforward=cfg.sgre_ffn, dropout=cfg.sgre_dropout, pos=cfg.sgre_pos, tau=cfg.sgre_tau,
                    att_dim=cfg.sgre_att_dim, chunk_classes=cfg.sgre_chunk, fused_score=cfg.sgre_fused_score)
    return {}


def needs_clip(cfg: Config) -> bool:
    """Whether the head needs the CLIP model (SGRE's default label embeddings: its text features,
    unless --label-embeddings or --text-features gives them)."""
    return cfg.head == 'sgre' and cfg.label_embeddings is None and cfg.text_features is None


def label_embeddings(cfg: Config, clip_model, tokenizer, num_classes: int, saved: dict | None = None):
    """SGRE's (K, E) label embeddings, float32: those of a checkpoint (`saved`, on resume and
    --evaluate), else --label-embeddings, else the run's CLIP text features of the class names
    (class_text_features.text_features_for, the same as the pseudo-labeller's). None for other heads."""
    if cfg.head != 'sgre':
        return None
    if saved is not None and saved.get('label_embeddings') is not None:
        return saved['label_embeddings'].float().numpy()
    if cfg.label_embeddings is not None:
        path = Path(cfg.label_embeddings)
        try:
            emb = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f'cannot read --label-embeddings {path}: {one_line(e)}') from None
        if emb.ndim != 2 or emb.shape[0] != num_classes or not np.issubdtype(emb.dtype, np.number):
            raise UserError(f'--label-embeddings {path} holds {emb.dtype} {emb.shape}; expected a numeric '
                            f'({num_classes}, E) array, one row per class in class order')
        if not np.isfinite(emb).all():
            raise UserError(f'--label-embeddings {path} holds non-finite values')
        return emb.astype(np.float32)
    if saved is not None:  # --evaluate of a checkpoint without them: no CLIP text to compute them from
        raise UserError('this SGRE checkpoint holds no label embeddings: pass --label-embeddings FILE.npy')
    return class_text_features.text_features_for(cfg, clip_model, tokenizer, num_classes).float().cpu().numpy()


def checkpoint_entries(model) -> dict:
    """Tensors a checkpoint needs to rebuild the head besides the state_dict (SGRE's fixed label
    embeddings are a non-persistent buffer, as in the original)."""
    head = getattr(model, 'head', None)
    emb = getattr(head, 'embeddings', None)
    if emb is not None and not isinstance(emb, torch.nn.Parameter):
        return {'label_embeddings': emb.detach().cpu()}
    return {}


# ------------------------------------------------------------------- optimiser, schedule, EMA

def build_optimization(cfg: Config, param_groups: list[dict], steps_per_epoch: int):
    """(optimizer, scheduler or None). Defaults (Adam, no decay, no schedule) are the original VLPL's."""
    optimizer = build_optimizer(param_groups, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = build_schedule(optimizer, cfg.schedule, cfg.epochs, max(steps_per_epoch, 1))
    return optimizer, scheduler


def build_ema(cfg: Config, model) -> ModelEMA | None:
    """The weight EMA of --ema-decay (None when 0)."""
    return ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None


def training_state(ema: ModelEMA | None, scheduler) -> dict:
    """Checkpoint entries of the EMA and the schedule (last.pt)."""
    state = {}
    if ema is not None:
        state['ema'] = ema.state_dict()
    if scheduler is not None:
        state['scheduler'] = scheduler.state_dict()
    return state


def load_training_state(resume: dict, ema: ModelEMA | None, scheduler) -> None:
    if ema is not None:
        ema.load_state_dict(resume['ema'])
    if scheduler is not None:
        scheduler.load_state_dict(resume['scheduler'])


def ema_wins(model_preds: np.ndarray, ema_preds: np.ndarray, labels_true: np.ndarray, epoch: int,
             mask: np.ndarray | None = None) -> bool:
    """Query2Label's rule (main_mlc.py): validate the model and its average, keep the average when
    its val mAP is strictly higher. Logs both. mask: the entries mAP counts (None: all)."""
    seen = ~np.isnan(model_preds[:, 0])
    labels_true, counted = take_rows(labels_true, seen), None if mask is None else mask[seen]
    m = compute_metrics(take_rows(model_preds, seen), labels_true, counted)['map']
    e = compute_metrics(take_rows(ema_preds, seen), labels_true, counted)['map']
    wins = e > m
    log.info(f'epoch {epoch} val mAP: model {m:.2f}, EMA {e:.2f} -> evaluating the {"EMA" if wins else "model"}')
    return bool(wins)

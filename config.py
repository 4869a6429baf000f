"""What a run is: the error types, each dataset's facts in one row, and the frozen `Config`.

A leaf module (it imports nothing of the project), so every other module may use it.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

NUMPY_SEED = 1200  # np.random.seed of the original main_clip.py, whatever -s says

# Default folders are those beside this file (data/, results/, cache/, text_features/), wherever the
# command runs from; paths a user gives are relative to the working directory, as usual.
REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_DIRS = {name: str(REPO_ROOT / name) for name in ('data', 'results', 'cache', 'text_features')}


# ----------------------------------------------------------------------------------------------
# Errors


class VLPLError(Exception):
    """A problem the user can fix. main_clip.main catches it once and prints `error: <one line>`
    without a traceback; the message names the file or flag and what to do."""


class UserError(VLPLError):
    """A bad command line, a missing run folder or checkpoint, and the like."""


class ModelLoadError(VLPLError):
    """A model, checkpoint or text-feature file could not be loaded; the message names the flag or
    command that fixes it."""


def one_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first line of an error's message (its type alone when it has none).

    A DataLoader worker re-raises an error with the worker's traceback appended; the original
    message is then the last line and is the one returned. with_type: prefix 'TypeName: ', for
    quoting a foreign library's error inside one of ours.
    """
    text = str(error).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1]
        prefix, sep, rest = text.partition(': ')
        text = rest if sep and prefix.endswith('Error') else text
    first = text.splitlines()[0] if text else ''
    if with_type:
        return f'{type(error).__name__}: {first}'.rstrip(': ')
    return first or type(error).__name__


# ----------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class DatasetInfo:
    """Everything that is particular to one dataset.

    lr, batch_size, alpha, beta_pos: the original's per-dataset settings (github.com/mvrl/VLPL,
    main_clip.py, its argument defaults per dataset); expected_num_pos: the `epr` loss's expected positives per image
    (Cole et al., single-positive-multi-label, config.py); apl_*: EM_APL's beta, warm-up epochs and
    batch size from its own paper (SPML-AckTheUnknown, Table of hyperparameters).
    """
    name: str
    num_classes: int | None  # None: as many as the formatted files hold (a class list the user's files give)
    image_dir: str  # relative to <data_root>/<name>
    lr: float
    batch_size: int
    alpha: float
    beta_pos: float
    expected_num_pos: float | None  # None: not known for the dataset (-l epr is refused)
    apl_beta: float
    apl_warmup: int
    apl_batch_size: int
    image_size: int = 448
    model: str = 'resnet50'
    epochs: int = 10
    clip_model: str = 'ViT-L-14-336'
    clip_pretrained: str = 'openai'  # may hold '{data_root}'
    # (Config field, value) of the transformer heads' sizes where the papers' would not fit the dataset
    # (the demo's CPU-sized heads); a flag given on the command line wins (heads_run.head_sizes)
    head_sizes: tuple = ()
    # The dataset whose published per-dataset values (the peer methods', AEVLP's VOC prompt names) this
    # one takes where no original publishes its own (voc2007: pascal's); None: its own.
    published_as: Optional[str] = None
    # Real partial annotations (label_tables.py): the formatted label files hold int8 annotation states
    # (1 positive, -1 annotated negative, 0 unannotated), which are both the observed labels of training
    # and the ground truth of evaluation, where only annotated entries count.
    annotated: bool = False
    # Class-name file, may hold '{data_root}'; '' = text_features/<name>_classnames.txt (committed).
    classnames: str = ''
    # A train split too large to predict whole each epoch (millions of images x K classes): the val split
    # cut from it holds at most max_val_images rows (None: datasets.VAL_FRACTION of them), and the train
    # phase's metrics cover train_metric_rows of its rows, a fixed random subset (None: every row).
    max_val_images: int | None = None
    train_metric_rows: int | None = None
    # Rows of formatted_train_images.npy and formatted_val_images.npy formatted from the official files
    # (data/<name>/README.md "Expected sizes"): sweep.py --dry-run's cost before the files are there.
    # None: they depend on the user's images (nuswide: at most the raw lists' 161,789 and 107,859).
    official_rows: tuple[int, int] | None = None
    # The command that writes the formatted files (the hints of missing files name it); '' =
    # preproc/format_<name>.py.
    format_command: str = ''

    @property
    def formatter(self) -> str:
        return self.format_command or f'preproc/format_{self.name}.py'


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo('pascal', 20, 'VOCdevkit/VOC2012/JPEGImages', lr=1e-5, batch_size=8, alpha=0.2, beta_pos=0.7,
                expected_num_pos=1.5, apl_beta=0.02, apl_warmup=5, apl_batch_size=8, official_rows=(5717, 5823)),
    # VOC2007 trainval / test (preproc/format_pascal.py --year 2007, SGRE's rule for difficult objects;
    # data/voc2007/README.md), the seed systems' VOC: VLPL has no VOC2007 settings, so these are pascal's.
    DatasetInfo('voc2007', 20, 'VOCdevkit/VOC2007/JPEGImages', lr=1e-5, batch_size=8, alpha=0.2, beta_pos=0.7,
                expected_num_pos=1.5, apl_beta=0.02, apl_warmup=5, apl_batch_size=8, published_as='pascal',
                official_rows=(5011, 4952), format_command='preproc/format_pascal.py --year 2007'),
    DatasetInfo('coco', 80, '.', lr=1e-5, batch_size=8, alpha=0.1, beta_pos=0.7,  # paths start with train2014/
                expected_num_pos=2.9, apl_beta=0.9, apl_warmup=5, apl_batch_size=16, official_rows=(82081, 40137)),
    DatasetInfo('nuswide', 81, 'Flickr', lr=1e-5, batch_size=8, alpha=0.1, beta_pos=0.7,
                expected_num_pos=1.9, apl_beta=0.2, apl_warmup=4, apl_batch_size=16),
    DatasetInfo('cub', 312, 'CUB_200_2011/images', lr=1e-4, batch_size=8, alpha=0.01, beta_pos=0.7,
                expected_num_pos=31.4, apl_beta=0.4, apl_warmup=3, apl_batch_size=8, official_rows=(5994, 5794)),
    # This project's offline demo (preproc/make_demo.py): a small random-init network on 64 px
    # synthetic pictures with the locally trained tiny CLIP. expected_num_pos: the generator's mean
    # number of objects (3.41 measured on its train split).
    DatasetInfo('demo', 30, 'images', lr=1e-3, batch_size=32, alpha=0.1, beta_pos=0.7,
                expected_num_pos=3.4, apl_beta=0.2, apl_warmup=3, apl_batch_size=32,
                image_size=64, model='small_cnn', epochs=10, clip_model='vlpl-demo-tiny', official_rows=(2400, 800),
                clip_pretrained='{data_root}/demo/clip/vlpl-demo-tiny.pt',
                # the sizes of the heads' demo measurements (docs/heads.md): the papers' (hidden 2048, ffn
                # 8192; att 1024, ffn 2048) take minutes per step on a CPU
                head_sizes=(('q2l_hidden', 256), ('q2l_ffn', 1024), ('sgre_att_dim', 256), ('sgre_ffn', 1024))),
    # OpenImages V6 with its human-verified partial annotations (preproc/format_openimages.py,
    # docs/openimages.md): the classes are the user's oidv6-classes-trainable.txt (9,605 in V6), named in
    # the classnames.txt that the format script writes beside the labels. lr 2e-4 and batch 64 are the
    # defaults of CSL's train.py (its OpenImages recipe is not released), 224 px its infer.py's input size
    # for the OpenImages TResNet-M. VLPL publishes no OpenImages setting: alpha, beta_pos and the EM_APL
    # values are COCO's (web photos, as OpenImages); the expected positives per image (epr) are unknown.
    # 20,000 val images and 20,000 train rows in the train metrics keep the predictions of those phases
    # at 0.8 GB each (float32 x 9,605 classes), whatever the size of the train split.
    DatasetInfo('openimages', None, '.', lr=2e-4, batch_size=64, alpha=0.1, beta_pos=0.7,
                expected_num_pos=None, apl_beta=0.9, apl_warmup=5, apl_batch_size=16, image_size=224,
                annotated=True, classnames='{data_root}/openimages/classnames.txt', max_val_images=20000,
                train_metric_rows=20000),
)}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise VLPLError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


# ----------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Config:
    """Everything a run depends on; saved with every checkpoint and compared on resume."""
    dataset: str
    loss: str
    model: str
    temp: float
    threshold: float
    partial: float
    seed: int
    data_root: str
    results_dir: str
    cache_dir: str
    epochs: int
    batch_size: int
    lr: float
    image_size: int
    num_workers: int
    device: str
    clip_model: str
    clip_pretrained: str
    clip_mode: str
    text_features: Optional[str]
    backbone_weights: Optional[str]
    pretrained: bool
    amp: bool
    channels_last: bool
    skip_bad_images: bool
    alpha: float
    beta: float
    beta_pos: float
    beta_neg: float
    warmup_epoch: int
    run_dir: str
    head: str = 'linear'
    input_norm: str = 'imagenet'  # what the backbone's weights expect (models.INPUT_NORMS, --input-norm)
    text_features_dir: str = DEFAULT_DIRS['text_features']
    init_from: Optional[str] = None
    tensorboard: bool = False
    # Peer methods (issue 13, methods_peers.py): LL's rate in percent per epoch and LL-Cp as released,
    # BoostLU and its alpha, ROLE's estimator lr multiplier, GR's schedules and q, the head's lr
    # multiplier, and the epochs of --linear-init.
    ll_delta_rel: float = 0.0
    llcp_as_released: bool = False
    boostlu: bool = False
    boostlu_alpha: float = 5.0
    role_lr_mult: float = 10.0
    gr_beta: tuple = ()
    gr_alpha: tuple = ()
    gr_q: tuple = ()
    head_lr_mult: float = 1.0
    linear_init: int = 0
    # AEVLP (aevlp.py; defaults: its configs/<dataset>.json, filled in by methods_peers.apply_defaults):
    # the pseudo-label rule (grid, top-k, eta, threshold, temperature, negative ratio), GPR-Loss's
    # (lam1, lam2), rho and regulariser weight, the text graph (sparse top-k, reweight p, relation
    # file, 'random' / 'none' / a weights file, class-name file), the scoring precision and view side.
    aevlp_grid: int = 4
    aevlp_top_k: int = 3
    aevlp_eta: float = 0.0
    aevlp_threshold: float = 0.5
    aevlp_temp: float = 0.01
    aevlp_negative_ratio: float = 0.2
    aevlp_lam: tuple = ()
    aevlp_rho: float = 0.9
    aevlp_reg: float = 0.05
    aevlp_sparse_topk: int = 20
    aevlp_reweight_p: float = 0.2
    aevlp_relation: Optional[str] = None
    aevlp_gcn: str = 'random'
    aevlp_classnames: Optional[str] = None
    aevlp_precision: str = 'auto'
    aevlp_crop_size: Optional[int] = None
    # Transformer heads, weight EMA and the heads' training recipe (issue 15; heads.py, heads_run.py,
    # docs/heads.md). Query2Label options (defaults: the original's main_mlc.py parser):
    q2l_hidden: int = 2048
    q2l_enc_layers: int = 1
    q2l_dec_layers: int = 2
    q2l_heads: int = 4
    q2l_ffn: int = 8192
    q2l_dropout: float = 0.1
    q2l_pre_norm: bool = False
    q2l_dec_self_attn: bool = False
    # SGRE options (defaults: the original's lib/util.py get_args and README commands):
    sgre_layers: int = 1
    sgre_heads: int = 8
    sgre_ffn: int = 2048
    sgre_dropout: float = 0.1
    sgre_att_dim: int = 1024
    sgre_tau: float = 1.0
    sgre_pos: bool = True
    sgre_chunk: Optional[int] = None
    sgre_fused_score: bool = False
    label_embeddings: Optional[str] = None  # K x E .npy; None: the run's CLIP text features
    lamda: float = 0.0  # weight of the head's auxiliary loss (SGRE); 0 for heads without one
    # Weight EMA (0: off) and the optimiser recipe (defaults: Adam, constant lr, as the original VLPL).
    ema_decay: float = 0.0
    optimizer: str = 'adam'
    weight_decay: float = 0.0
    schedule: str = 'none'
    # Partial labels: ASL / CSL (docs/partial-labels.md). None: the method's default
    # (methods_partial.defaults), filled in by main_clip.parse_args (methods_partial.resolve).
    observed: Optional[str] = None  # TAG of formatted_train_labels_obs_<TAG>.npy; None: single positive
    gamma_pos: Optional[float] = None
    gamma_neg: Optional[float] = None
    gamma_unann: Optional[float] = None
    asl_clip: Optional[float] = None
    asl_focal_grad: bool = False
    csl_mode: Optional[str] = None
    likelihood_topk: Optional[int] = None
    prior_threshold: Optional[float] = None
    prior_file: Optional[str] = None
    # Several processes (docs/distributed.md): launch settings, not part of the recipe
    dist_backend: str = 'auto'
    dist_timeout: float = 1800.0
    sync_bn: bool = True
    # Input pipeline (issue 18, packs.py, docs/input-pipeline.md): 'pil' decodes and resizes in the
    # workers; 'packed' reads preproc/pack_images.py's uint8 packs and normalises on the device
    # (bit-identical tensors). compile: torch.compile of the model.
    data_format: str = 'pil'
    compile: bool = False
    # CLIP pseudo-label options (issue 16, ccd.py, pseudo_label_options.py, docs/ccd.md): CCD's debias
    # (entropy bound, floor = 1 / LS_coeff), CCD's CAM-guided local views (refresh after pl_views_epoch
    # epochs, pl_views_refreshes times; margin as a fraction of the side; blend ratio; calibration
    # bound, or a fixed threshold instead), CLIP's own preprocessing, and prompt templates ('ensemble' or a file).
    pl_debias: bool = False
    pl_debias_entropy: float = 2.0
    pl_floor: float = 0.05
    pl_views: str = 'global'
    pl_views_epoch: int = 2
    pl_views_refreshes: int = 1
    pl_views_margin: float = 0.125
    pl_views_ratio: float = 0.2
    pl_views_bound: float = 4.0
    pl_views_threshold: Optional[float] = None
    clip_preprocess: str = 'original'
    prompts: Optional[str] = None
    # -l CCD (methods_ccd.py, ccd_labels.py, docs/ccd.md; defaults: its train_gpu#0.sh and config.py, filled in
    # by methods_ccd.apply_defaults): coeff (the CAM's alpha), loss_coeff (flag offset), ratio (blend), the
    # view margin in pixels, LS_coeff (floor 1 / it; 0: off), the calibration bound, inf_num (refreshes),
    # use_consist, global_temp and local_temp (the debias), the inference and view sides, the CAM box rule,
    # the CLIP's precision; the calibration's step (CCD: 0.001 per 100 images; the demo's small split: more).
    ccd_coeff: float = 3.0
    ccd_loss_coeff: float = 1.0
    ccd_ratio: float = 0.2
    ccd_offset: int = 80
    ccd_ls_coeff: int = 20
    ccd_bound: float = 4.0
    ccd_calibration_step: float = 0.001
    ccd_refreshes: int = 1
    ccd_consistency: float = 1.0
    ccd_global_debias: bool = True
    ccd_local_debias: bool = True
    ccd_infer_size: int = 640
    ccd_view_size: int = 640
    ccd_box: str = 'released'
    ccd_precision: str = 'auto'
    # The original's settings applied (--recipe NAME, paper_recipes.py) and the flags of the command
    # line that changed them ('--flag value' strings): provenance, not settings of their own.
    recipe: Optional[str] = None
    recipe_overrides: tuple = ()

    @property
    def data(self) -> DatasetInfo:
        return DATASETS[self.dataset]


# Settings a resumed run may change without changing its results.
RESUMABLE_CHANGES = frozenset({'num_workers', 'device', 'results_dir', 'cache_dir', 'data_root', 'clip_mode',
                               'run_dir', 'skip_bad_images', 'text_features_dir', 'tensorboard',
                               'dist_backend', 'dist_timeout', 'sync_bn', 'data_format', 'recipe_overrides'})


def build_config(*, dataset: str, loss: str, model: str | None = None, temp: float = 0.01,
                 threshold: float = 0.3, partial: float = 0.0, partial_everywhere: bool = False, seed: int = 0,
                 data_root: str = DEFAULT_DIRS['data'], results_dir: str = DEFAULT_DIRS['results'],
                 run_name: str | None = None, cache_dir: str = DEFAULT_DIRS['cache'], epochs: int | None = None, batch_size: int | None = None,
                 lr: float | None = None, image_size: int | None = None, num_workers: int = 0,
                 device: str = 'auto', clip_model: str | None = None, clip_pretrained: str | None = None,
                 clip_mode: str = 'cache', text_features: str | None = None, backbone_weights: str | None = None,
                 pretrained: bool = True, amp: bool = False, channels_last: bool = False,
                 skip_bad_images: bool = False, alpha: float | None = None, beta_pos: float | None = None,
                 warmup_epoch: int | None = None, **settings) -> Config:
    """The Config of a run: every setting left None takes the dataset's value (DATASETS row);
    `settings` are further Config fields (those with defaults: head, methods' own settings, ...).

    The original's rules kept here: -p (partial) acts for pascal with clip_vision only unless
    partial_everywhere; EM_APL takes its beta, warm-up and batch size from the row's apl_* values.
    heads_options: the transformer-head, EMA and optimiser fields of Config by name (q2l_*, sgre_*,
    label_embeddings, lamda, ema_decay, optimizer, weight_decay, schedule); main_clip.parse_args
    fills lamda's per-dataset default (heads.dataset_defaults).
    """
    row = dataset_info(dataset)
    model = model or row.model
    is_apl = loss == 'EM_APL'
    partial_applies = partial_everywhere or (dataset == 'pascal' and model == 'clip_vision')
    return Config(
        dataset=dataset, loss=loss, model=model, temp=temp, threshold=threshold,
        partial=partial if partial_applies else 0.0, seed=seed, data_root=data_root, results_dir=results_dir,
        cache_dir=cache_dir, epochs=epochs or row.epochs,
        batch_size=batch_size or (row.apl_batch_size if is_apl else row.batch_size),
        lr=lr or row.lr, image_size=image_size or row.image_size, num_workers=num_workers, device=device,
        clip_model=clip_model or row.clip_model,
        clip_pretrained=clip_pretrained or row.clip_pretrained.format(data_root=data_root),
        clip_mode=clip_mode, text_features=text_features, backbone_weights=backbone_weights,
        pretrained=pretrained, amp=amp, channels_last=channels_last, skip_bad_images=skip_bad_images,
        alpha=alpha if alpha is not None else row.alpha, beta=row.apl_beta,
        beta_pos=beta_pos if beta_pos is not None else row.beta_pos, beta_neg=0.0,
        warmup_epoch=warmup_epoch if warmup_epoch is not None else (row.apl_warmup if is_apl else 0),
        run_dir=str(Path(results_dir) / (run_name or default_run_name(dataset, loss, model, seed, settings.get('observed')))),
        **settings)


def default_run_name(dataset: str, loss: str, model: str, seed: int, observed: str | None = None) -> str:
    """<dataset>[-<observed TAG>]_<method>_<backbone>_s<seed>; a backbone timm:NAME is written timm-NAME."""
    return f'{dataset}{"-" + observed if observed else ""}_{loss}_{model.replace(":", "-")}_s{seed}'


# ----------------------------------------------------------------------------------------------
# Command-line value types (shared by every module that adds flags)


def number(kind=float, *, low=None, high=None, low_open=False, high_open=False):
    """argparse type: an int or a finite float inside [low, high] (open ends where asked).
    'nan' and 'inf' are refused, so no value reaches the run that the run cannot use."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}')
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'{text!r} is not a finite number')
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f'must be {">" if low_open else ">="} {low}, got {text}')
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f'must be {"<" if high_open else "<="} {high}, got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def folder_name(text: str) -> str:
    """argparse type of --run-name: one plain folder name inside --results-dir. A path ('a/b',
    '../x'), '.' or '..' would put the run (and what --overwrite replaces) outside its own folder:
    '--run-name . --overwrite' once replaced the whole results folder. Hidden names are the run
    folders' own bookkeeping (.NAME.replaced, .NAME.lock), which report.py skips."""
    if not text or '/' in text or '\\' in text or text.startswith('.') or text != text.strip():
        raise argparse.ArgumentTypeError(f'{text!r} is not a plain folder name (no "/", not starting with "."): '
                                         'the run folder is <results-dir>/<run-name>; choose the parent with '
                                         '--results-dir')
    return text


POSITIVE = number(float, low=0, low_open=True)
NON_NEGATIVE = number(float, low=0)
COUNT = number(int, low=1)

"""Train and evaluate single-positive multi-label classifiers with CLIP pseudo-labels (VLPL).

Reads top to bottom: the command line, set-up, the run as a sequence of named steps (`_run`; its
data steps are in run_data.py, the phases of an epoch in epoch_phases.py), --evaluate, and main. Examples:

    python main_clip.py -d demo                      # offline demo, CPU, a few minutes
    python main_clip.py -d coco -l EM_PL -m clip_vision
    python main_clip.py --resume results/coco_EM_PL_clip_vision_s0
    python main_clip.py --evaluate results/coco_EM_PL_clip_vision_s0/best.pt
    torchrun --standalone --nproc_per_node 4 main_clip.py -d coco   # 4 processes (docs/distributed.md)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import backbones
import class_text_features
import clip_loading
import datasets
import distributed
import fingerprint
import heads_run
import label_tables
import methods
import methods_partial  # registers -l ASL and -l CSL
import methods_ccd  # registers CCD
import methods_peers  # registers role, LL-R, LL-Ct, LL-Cp, GR, AEVLP
import models
import packs
import paper_recipes
import pseudo_label_options
import pseudo_label_policy
import records
from checkpoints import RunFolder, classifier_of, config_differences, load_checkpoint, rebuild_classifier, set_rng_state
from config import (COUNT, DATASETS, DEFAULT_DIRS, NON_NEGATIVE, NUMPY_SEED, POSITIVE, Config, UserError, VLPLError,
                    build_config, folder_name, number, one_line)
from distributed import is_primary, log
from engine import NonFiniteLoss, predict
from epoch_phases import Learner, evaluate_phases, log_epoch, save_epoch, train_phase
from files import save_json
from instrumentation import TrainLogger
from metrics import compute_metrics
from run_data import Data, build_loaders, check_same_inputs, load_data, make_loader, prepare_data


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' unless the help text already says what the default is."""

    def _get_help_string(self, action):
        if 'default' in (action.help or '') or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block above it)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def backbone_name(text: str) -> str:
    """argparse type of -m: a BACKBONES row or timm:NAME (backbones.backbone)."""
    try:
        backbones.backbone(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description='VLPL: single-positive multi-label training with CLIP pseudo-labels. Default folders '
                    '(data, results, cache, text_features) are those beside main_clip.py; paths you give '
                    'are relative to the working directory.',
        formatter_class=HelpFormatter)
    p.add_argument('-d', '--dataset', default='pascal', choices=sorted(DATASETS),
                   help='dataset under --data-root; "demo" is generated offline on first use')
    p.add_argument('-l', '--loss', default='EM_PL', choices=sorted(methods.METHODS), metavar='METHOD',
                   help='training method: ' + '; '.join(f'{name}: {methods.HELP[name]}' for name in methods.METHODS))
    p.add_argument('-g', '--gpu', default=None,
                   help='GPU index, exported as CUDA_VISIBLE_DEVICES (default: leave it as it is)')
    p.add_argument('-m', '--model', default=None, type=backbone_name, metavar='BACKBONE',
                   help=f'trainable backbone: {", ".join(sorted(backbones.BACKBONES))}, or timm:NAME for any timm '
                        'model (pretrained tag or --backbone-weights; docs/backbones.md) (default: resnet50; '
                        'small_cnn for the demo)')
    p.add_argument('-t', '--temp', type=POSITIVE, default=0.01, help='softmax temperature of the CLIP scores')
    p.add_argument('-th', '--threshold', type=number(low=0, high=1, low_open=True, high_open=True), default=0.3,
                   help='positive pseudo-label threshold, in (0, 1)')
    p.add_argument('-p', '--partial', type=number(low=0, high=1, high_open=True), default=0.0,
                   help='fraction of lowest-scoring classes made negative pseudo-labels, in [0, 1); as in the '
                        'original it applies to pascal with -m clip_vision only, unless --partial-everywhere')
    p.add_argument('--partial-everywhere', action='store_true',
                   help='apply -p to every dataset and backbone')
    p.add_argument('-s', '--pytorch_seed', '--seed', dest='seed', type=number(int, low=-2 ** 63, high=2 ** 64 - 1),
                   default=0, help='torch seed (torch takes any 64-bit value)')
    p.add_argument('--recipe', default=None, metavar='NAME',
                   help='start from the original\'s own settings for -l and -d (recipes/<METHOD>.toml, e.g. '
                        '"original"; docs/sweeps.md); flags given here win and are recorded as overrides')
    p.add_argument('--data-root', default=DEFAULT_DIRS['data'], help='folder holding <dataset>/formatted_*.npy')
    p.add_argument('--results-dir', default=DEFAULT_DIRS['results'], help='each run writes a folder here')
    p.add_argument('--run-name', default=None, type=folder_name,
                   help='name of the run folder inside --results-dir, one plain name '
                        '(default: <dataset>_<loss>_<model>_s<seed>)')
    p.add_argument('--cache-dir', default=DEFAULT_DIRS['cache'], help='frozen-CLIP embedding cache')
    p.add_argument('--epochs', type=COUNT, default=None, help='number of epochs (default 10)')
    p.add_argument('--batch-size', type=COUNT, default=None, help='default: per dataset (8; EM_APL: its paper)')
    p.add_argument('--lr', type=POSITIVE, default=None, help='Adam learning rate (default: per dataset)')
    p.add_argument('--image-size', type=COUNT, default=None, help='input size (default 448; demo 64)')
    p.add_argument('--input-norm', default=None, choices=backbones.INPUT_NORMS,
                   help="the input normalisation the backbone's weights expect: imagenet (ImageNet mean and std, "
                        "the pipeline's) or none ([0, 1] pixels, as MIIL's TResNets were trained; "
                        'docs/seed-checkpoints.md) (default: the backbone\'s: none for tresnet_m, tresnet_l and timm '
                        'models whose pretrained config says so, else imagenet)')
    p.add_argument('--num-workers', type=number(int, low=0), default=min(8, os.cpu_count() or 1),
                   help='DataLoader worker processes')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto = cuda if available')
    p.add_argument('--clip-model', default=None,
                   help='open_clip model name or JSON config (default ViT-L-14-336; demo vlpl-demo-tiny)')
    p.add_argument('--clip-pretrained', default=None,
                   help='open_clip pretrained tag or local checkpoint file (default openai)')
    p.add_argument('--clip-mode', default='cache', choices=['cache', 'online'],
                   help='cache: embed every training image once per flip and reuse it; '
                        'online: run the frozen CLIP on every training batch, as the original')
    p.add_argument('--text-features', default=None,
                   help='(K, D) .npy of class text features (default: computed with the CLIP model and cached '
                        'in --text-features-dir)')
    p.add_argument('--text-features-dir', default=DEFAULT_DIRS['text_features'],
                   help='folder for computed class text features')
    p.add_argument('--backbone-weights', default=None,
                   help='local weights file for the backbone (default: download the published weights)')
    p.add_argument('--no-pretrained', action='store_true',
                   help='random initialisation of the backbone (default: ImageNet weights)')
    p.add_argument('--amp', action='store_true',
                   help='bf16 autocast on CUDA (losses stay float32; default: float32)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format (CNNs on GPU)')
    p.add_argument('--skip-bad-images', action='store_true',
                   help='skip unreadable images (each named once in the log) instead of stopping')
    p.add_argument('--alpha', type=NON_NEGATIVE, default=None,
                   help='entropy weight of EM losses (default: per dataset)')
    p.add_argument('--beta-pos', type=NON_NEGATIVE, default=None,
                   help='weight of positive pseudo-labels (default 0.7)')
    p.add_argument('--warmup-epoch', type=number(int, low=0), default=None,
                   help='EM_PL: epochs of plain EM first (default 0); EM_APL: per dataset')
    methods_peers.add_arguments(p)
    methods_ccd.add_arguments(p)
    methods_partial.add_arguments(p)
    heads_run.add_arguments(p.add_argument_group('Transformer heads'))  # --head, --ema-decay, ... (docs/heads.md)
    pseudo_label_options.add_arguments(p)
    g = p.add_argument_group('several processes (torchrun / srun; docs/distributed.md)')
    g.add_argument('--dist-backend', default='auto', choices=['auto', 'nccl', 'gloo'],
                   help='torch.distributed backend; auto: nccl on CUDA, gloo on CPU')
    g.add_argument('--dist-timeout', type=POSITIVE, default=1800.0,
                   help='seconds a collective waits for the other processes before the run stops')
    g.add_argument('--no-sync-bn', action='store_true',
                   help='per-process BatchNorm statistics (faster; default: synchronised over the global '
                        'batch when there are several processes, as one process computes them)')
    g = p.add_argument_group('input pipeline (docs/input-pipeline.md)')
    g.add_argument('--data-format', default='pil', choices=['pil', 'packed'],
                   help='pil: decode and resize every image in the workers; packed: read the uint8 packs of '
                        'preproc/pack_images.py and flip and normalise on the device (the same tensors, bit for bit)')
    g.add_argument('--compile', action='store_true', help='torch.compile the model (default: off)')
    g = p.add_argument_group('runs and checkpoints')
    g.add_argument('--resume', default=None, metavar='RUN_DIR',
                   help='continue the run in RUN_DIR from its last complete epoch; other flags may change '
                        'only the device, workers and folders, and --epochs may grow where the method allows')
    g.add_argument('--evaluate', default=None, metavar='CHECKPOINT',
                   help='only compute the test metrics of a saved checkpoint')
    g.add_argument('--init-from', default=None, metavar='CHECKPOINT',
                   help='start a new run from the model weights of a saved checkpoint (same backbone and classes)')
    g.add_argument('--tensorboard', action='store_true',
                   help='also write TensorBoard event files to RUN_DIR/tensorboard (needs the tensorboard package)')
    g.add_argument('--overwrite', action='store_true',
                   help='replace an existing run folder of the same name (default: refuse)')
    return p


# Flags that exclude each other: (flag, flag, why).
EXCLUSIVE = [('evaluate', 'resume', 'evaluate a checkpoint or continue a run, not both'),
             ('evaluate', 'init_from', '--evaluate trains nothing'),
             ('evaluate', 'overwrite', '--evaluate writes no run folder'),
             ('resume', 'init_from', 'a resumed run continues from its own last.pt'),
             ('resume', 'overwrite', 'a resumed run keeps its folder'),
             ('no_pretrained', 'backbone_weights', 'random initialisation or the weights file, not both'),
             ('init_from', 'backbone_weights', 'the checkpoint already holds the backbone weights')]


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    parser = build_parser()
    a = parser.parse_args(argv)
    recipe = {}
    if a.recipe:  # the recipe's flags first, so that the command line's win
        try:
            recipe_argv = paper_recipes.as_flags(paper_recipes.find(a.recipe, a.loss, a.dataset,
                                                                    paper_recipes.long_flags(parser)))
        except VLPLError as e:
            parser.error(one_line(e))
        a = parser.parse_args(recipe_argv + list(sys.argv[1:] if argv is None else argv))
        recipe = dict(recipe=a.recipe, recipe_overrides=paper_recipes.overrides(parser, recipe_argv, a))
    if a.gpu is not None:
        os.environ['CUDA_VISIBLE_DEVICES'] = str(a.gpu)
    for first, second, why in EXCLUSIVE:
        if getattr(a, first) and getattr(a, second):
            parser.error(f'--{first.replace("_", "-")} and --{second.replace("_", "-")} exclude each other: {why}')

    ccd_settings = methods_ccd.apply_defaults(a, parser.error)  # before the peers' (it sets --head-lr-mult)
    peer = methods_peers.apply_defaults(a, parser.error) | ccd_settings
    cfg = build_config(
        dataset=a.dataset, loss=a.loss, model=a.model, temp=a.temp, threshold=a.threshold, partial=a.partial,
        partial_everywhere=a.partial_everywhere, seed=a.seed, data_root=a.data_root, results_dir=a.results_dir,
        run_name=a.run_name, cache_dir=a.cache_dir, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        image_size=a.image_size or backbones.backbone(a.model or DATASETS[a.dataset].model).image_size,
        input_norm=a.input_norm or backbones.backbone(a.model or DATASETS[a.dataset].model).input_norm,
        num_workers=a.num_workers, device=a.device, clip_model=a.clip_model,
        clip_pretrained=a.clip_pretrained, clip_mode=a.clip_mode, text_features=a.text_features,
        backbone_weights=a.backbone_weights, pretrained=not a.no_pretrained, amp=a.amp,
        channels_last=a.channels_last, skip_bad_images=a.skip_bad_images, alpha=a.alpha, beta_pos=a.beta_pos,
        warmup_epoch=a.warmup_epoch, text_features_dir=a.text_features_dir, init_from=a.init_from,
        tensorboard=a.tensorboard, head=a.head, observed=a.observed, gamma_pos=a.gamma_pos, gamma_neg=a.gamma_neg,
        gamma_unann=a.gamma_unann, asl_clip=a.asl_clip, asl_focal_grad=a.asl_focal_grad, csl_mode=a.csl_mode,
        likelihood_topk=a.likelihood_topk, prior_threshold=a.prior_threshold, prior_file=a.prior_file,
        dist_backend=a.dist_backend, dist_timeout=a.dist_timeout, sync_bn=not a.no_sync_bn,
        data_format=a.data_format, compile=a.compile,
        **peer, **heads_run.config_options(a, parser), **pseudo_label_options.settings(a), **recipe)
    problem = methods_partial.flag_problem(cfg)
    if problem:
        parser.error(problem)
    cfg = methods_partial.resolve(cfg)
    if a.partial > 0 and cfg.partial == 0:  # the original's rule, kept in config.build_config
        log.warning(f'note: -p {a.partial} is ignored for -d {cfg.dataset} -m {cfg.model}, as in the original; '
                    'add --partial-everywhere to apply it')
    method = methods.METHODS[cfg.loss]
    backbone = backbones.backbone(cfg.model)
    pseudo_label_options.check(cfg, parser.error,
                               needs_pseudo_labels=method.uses_pseudo_labels(cfg) and method.pseudo_label_builder is None,
                               has_cam=backbone.cam and models.HEADS[cfg.head].cam)
    if method.uses_warmup and cfg.warmup_epoch >= cfg.epochs:
        parser.error(f'--warmup-epoch {cfg.warmup_epoch} leaves no epoch of {cfg.loss} after the warmup '
                     f'(--epochs {cfg.epochs})')
    return cfg, a


# ----------------------------------------------------------------------------------------------
# Set-up


def select_device(name: str):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA device is visible (check -g / CUDA_VISIBLE_DEVICES)')
    if name == 'cuda' and distributed.process().world_size > 1:
        return torch.device('cuda', distributed.process().local_rank)  # one GPU per process
    return torch.device(name)


def seed_everything(seed: int) -> None:
    np.random.seed(NUMPY_SEED)
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# The run


def run(cfg: Config, argv: list[str], resume: Optional[dict], overwrite: bool = False) -> dict:
    """A training run (or the rest of one, from `resume`); returns the best epoch's results.
    The run folder is locked for the run and created only when the run starts writing."""
    device = select_device(cfg.device)
    folder = RunFolder(Path(cfg.run_dir), resuming=resume is not None, overwrite=overwrite)
    with folder:
        return _run(cfg, argv, resume, device, folder)


def _run(cfg: Config, argv: list[str], resume: Optional[dict], device, folder: RunFolder) -> dict:
    run_dir = folder.path
    seed_everything(cfg.seed)
    splits, root, init, trunk = load_data(cfg, resume)
    method_class = methods.METHODS[cfg.loss]
    data = build_loaders(cfg, splits, root, method_class, device)
    if resume is not None:
        check_same_inputs(cfg, resume, data, root)
    clip_model, tokenizer = load_frozen_clip(cfg, method_class, device)
    pl_source = pseudo_label_source(cfg, method_class, clip_model, tokenizer, data, device)
    learner = build_model_and_optimiser(cfg, clip_model, tokenizer, data, resume, init, trunk, device)
    if pl_source is not None:
        learner.method.use_pseudo_labels(pl_source)
    train_true = label_tables.on_device(splits['train'].labels_true, device, copy=False)  # rows per batch
    classnames = class_text_features.read_classnames(cfg.dataset, data_root=cfg.data_root)
    start_epoch = restore(learner, resume, pl_source, data.sampler)
    add_ema(cfg, learner, resume, run_dir)
    record, tensorboard = start_records(cfg, device, method_class, folder, pl_source, data, resume)
    wrap_for_training(cfg, learner, device)
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_preds, train_loss, pl_counts = train_phase(cfg, epoch, learner, data, pl_source, train_true, device,
                                                         run_dir)
        times = {'train': time.perf_counter() - t0}
        phase_preds, evaluated = evaluate_phases(cfg, epoch, learner, data, device, {'train': train_preds}, times)
        log_epoch(cfg, epoch, learner, data, pl_source, phase_preds, train_loss, pl_counts, times)
        if is_primary():
            save_epoch(cfg, epoch, argv, learner, data, pl_source, classnames, phase_preds, evaluated, train_loss,
                       times, record, tensorboard, folder)
        log.info(f'checkpoint: {run_dir / "last.pt"} (epoch {epoch})')
    return closing_lines(learner.logger, run_dir, learner.method)


def load_frozen_clip(cfg: Config, method_class, device) -> tuple:
    """(CLIP model, tokenizer) when the run needs CLIP (VLPL's pseudo-labels, -m clip_vision, a head's
    label embeddings), else (None, None)."""
    if ((method_class.uses_pseudo_labels(cfg) and method_class.pseudo_label_builder is None)
            or cfg.model == 'clip_vision' or heads_run.needs_clip(cfg)):
        return clip_loading.load_clip(cfg.clip_model, cfg.clip_pretrained, device=device)
    return None, None


def pseudo_label_source(cfg: Config, method_class, clip_model, tokenizer, data: Data, device):
    """The pseudo-labels of the training phase (None for a method without them): the method's own
    (AEVLP), else VLPL's frozen-CLIP labels; their quality on train is logged."""
    if not method_class.uses_pseudo_labels(cfg):
        if method_class.needs_pseudo_labels:
            log.info(f'--observed full: no unknown entry for a pseudo-label to fill, so -l {cfg.loss} trains on '
                     'the labels alone, without CLIP')
        return None
    own_labels = method_class.pseudo_label_builder
    if own_labels is not None:
        pl_source, quality = own_labels(cfg, data, device)
    else:
        pl_source, quality = pseudo_label_policy.build_pseudo_labels(
            cfg, clip_model, tokenizer, data.splits['train'], data.train_eval_loader, device, data.num_classes)
    if quality:
        only = pseudo_label_options.ANNOTATED_ONLY if quality.get('annotated_only') else ''
        log.info(f'Pseudo-labels on train (temp {cfg.temp}, threshold {cfg.threshold}){only}: precision '
                 f'{quality["precision"]:.3f}, recall {quality["recall"]:.3f}, '
                 f'{quality["per_image"]:.2f} positives / image')
    if pl_source.report:
        log.info(pseudo_label_options.quality_line(pl_source.report['stages'][-1], 'on train'))
    return pl_source


def build_model_and_optimiser(cfg: Config, clip_model, tokenizer, data: Data, resume: Optional[dict],
                              init: Optional[dict], trunk: Optional[backbones.Trunk], device) -> Learner:
    """The classifier (fresh, on the trunk load_data built, or --init-from's weights), the method object, the
    optimiser, the schedule, the logger."""
    num_classes = data.num_classes
    label_embeddings = heads_run.label_embeddings(cfg, clip_model, tokenizer, num_classes, resume)
    # Reseed so that the head's initialisation does not depend on what ran before (CLIP loading and
    # every DataLoader iterator draw from the global generator).
    torch.manual_seed(cfg.seed)
    if init is not None:  # the weights are the checkpoint's, its fit checked at start (checkpoints.check_fits)
        model = classifier_of(cfg, num_classes, clip_model=clip_model, embeddings=label_embeddings)
        model.load_state_dict(init['model'])
        model = model.to(device)
    else:
        fresh = resume is None  # else the weights come from last.pt
        model = models.build_classifier(cfg.model, num_classes, pretrained=cfg.pretrained and fresh,
                                        weights_path=cfg.backbone_weights if fresh else None, trunk=trunk,
                                        clip_model=clip_model, head=cfg.head,
                                        cam_boost=cfg.boostlu_alpha if cfg.boostlu else None,
                                        image_size=cfg.image_size, input_norm=cfg.input_norm,
                                        **heads_run.head_options(cfg, label_embeddings)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = methods.build_method(cfg, data.splits['train'].labels_obs, device)
    optimizer, scheduler = heads_run.build_optimization(
        cfg, model.param_groups(cfg.lr, cfg.head_lr_mult) + method.param_groups(cfg.lr), len(data.loaders['train']))
    return Learner(model, method, optimizer, scheduler, TrainLogger(cfg.epochs, num_classes))


def restore(learner: Learner, resume: Optional[dict], pl_source, sampler) -> int:
    """The state of a resumed run (model, optimiser, logger, method, random states, pseudo-labels);
    returns the first epoch to train."""
    if resume is None:
        return 1
    learner.model.load_state_dict(resume['model'])
    learner.optimizer.load_state_dict(resume['optimizer'])
    learner.logger.load_state_dict(resume['logger'])
    learner.method.load_state_dict(resume['method'])
    set_rng_state(resume['rng'], sampler)
    if pl_source is not None:
        pl_source.load_state_dict(resume.get('pseudo_labels', {}))
    return resume['epoch'] + 1


def add_ema(cfg: Config, learner: Learner, resume: Optional[dict], run_dir: Path) -> None:
    """The weight EMA (--ema-decay), from the restored weights; a resumed run restores its state and the schedule's."""
    learner.ema = heads_run.build_ema(cfg, learner.model)
    if resume is not None:
        heads_run.load_training_state(resume, learner.ema, learner.scheduler)
        log.info(f'Resuming {run_dir} after epoch {resume["epoch"]}')


def start_records(cfg: Config, device, method_class, folder: RunFolder, pl_source, data: Data,
                  resume: Optional[dict] = None) -> tuple:
    """(config.json's record, TensorBoard writer or None); the primary process creates the run folder.
    A resumed run whose text features, prompts, priors or CLIP weights changed since it started stops
    here, before config.json is rewritten (records.changed_input_files)."""
    record = records.run_record(cfg, device, method_class) | {'inputs': fingerprint.summary(data.inputs)}
    changed = []
    saved = records.json_or_none(folder.path / 'config.json') if resume is not None and is_primary() else None
    if isinstance(saved, dict) and isinstance(saved.get('record'), dict):  # provenance: the primary's record
        changed = records.changed_input_files(saved['record'].get('provenance') or {}, record.get('provenance') or {},
                                              record.get('unused_settings', ()))
    if resume is not None and distributed.any_rank(bool(changed)):  # every process stops, none waits
        raise UserError(f'--resume {cfg.run_dir}: {"; ".join(changed) or "an input file (the first process names it)"}'
                        ': not the file the run started with, and its epochs so far were trained with the other: '
                        f'restore it, or start a new run (--init-from {Path(cfg.run_dir) / "last.pt"} starts it from '
                        'these weights)')
    tensorboard = records.open_tensorboard(cfg, folder.path) if is_primary() else None
    if is_primary():
        folder.create()
        save_json(folder.path / 'config.json', dataclasses.asdict(cfg) | {'record': record})
        if pl_source is not None and pl_source.report:
            save_json(folder.path / 'pl_quality.json', pl_source.report)
    return record, tensorboard


def wrap_for_training(cfg: Config, learner: Learner, device) -> None:
    """The model as training runs it (DistributedDataParallel for several processes) and --compile's forms."""
    learner.train_model = distributed.wrap_model(learner.model, device, cfg.sync_bn)  # model itself on one process
    learner.eval_model = learner.model
    if cfg.compile:  # the compiled modules share the model's parameters; checkpoints save `model`
        learner.eval_model = torch.compile(learner.model)
        learner.train_model = (learner.eval_model if learner.train_model is learner.model
                               else torch.compile(learner.train_model))


def closing_lines(logger: TrainLogger, run_dir: Path, method) -> dict:
    """The original's three closing lines and the method's own (CCD's label-free choice); the best epoch's
    results."""
    log.info(f'Best epoch: {logger.best_epoch}')
    log.info(f'Best epoch validation score: {logger.best_val_map:.2f}')
    log.info(f'Best epoch test score: {logger.best_test_map:.2f}')
    for line in method.closing_lines(logger):
        log.info(line)
    return dict(best_epoch=logger.best_epoch, val_map=logger.best_val_map, test_map=logger.best_test_map,
                run_dir=str(run_dir))


def evaluate(cfg: Config, ckpt: dict, where: str = '--evaluate') -> float:
    """Test mAP of a saved model, rebuilt from the checkpoint alone (checkpoints.rebuild_classifier: no
    CLIP weights, no CLIP config file; the demo's tiny CLIP is not trained for it)."""
    device = select_device(cfg.device)
    rebuilt = rebuild_classifier(ckpt, where)
    splits = prepare_data(cfg, clip=False)
    num_classes = splits['test'].labels_true.shape[1]
    if num_classes != len(rebuilt.classnames):
        raise UserError(f'{where}: its model has {len(rebuilt.classnames)} classes, the test split of '
                        f'{cfg.dataset} under {cfg.data_root} {num_classes}')
    names = class_text_features.read_classnames(cfg.dataset, data_root=cfg.data_root)
    if 'classnames' in ckpt and rebuilt.classnames != names:  # e.g. an imported checkpoint in another class order
        k = next(i for i, (a, b) in enumerate(zip(rebuilt.classnames, names)) if a != b)
        raise UserError(f'{where}: its class {k} is {rebuilt.classnames[k]!r}, class {k} of {cfg.dataset} is '
                        f'{names[k]!r}: its classes are not this dataset\'s (docs/seed-checkpoints.md for an imported one)')
    model = rebuilt.model.to(device)
    root = datasets.image_root(cfg.data_root, cfg.dataset)
    test_set = packs.image_sets(cfg, {'test': splits['test']}, root)[0]['test']  # --data-format pil or packed
    loader = make_loader(test_set, batch_size=cfg.batch_size, cfg=cfg, device=device)
    preds = predict(cfg, model, loader, len(test_set), num_classes, device, 'test')
    m = compute_metrics(preds, splits['test'].labels_true, splits['test'].counted())
    log.info(f'Test mAP of {cfg.dataset} epoch {ckpt["epoch"]}: {m["map"]:.2f}')
    return m['map']


def config_from_checkpoint(ckpt: dict, argv: list[str], path: Path, override_run_dir: Optional[str],
                           instead: str = 'start a new run instead (--init-from can start it from these weights)'
                           ) -> Config:
    """Re-parse the saved command line followed by this one, so later flags override saved ones;
    `instead`: what the refusal of changed settings tells the user to do."""
    saved = [a for a in ckpt.get('argv', [])]
    cfg, _ = parse_args(saved + argv)
    if override_run_dir:
        cfg = dataclasses.replace(cfg, run_dir=override_run_dir)
    more_ok = not methods.METHODS[cfg.loss].schedule_uses_epochs
    diffs = config_differences(ckpt['config'], cfg, more_epochs_ok=more_ok)
    if diffs:
        why = ('' if more_ok or not any(d.startswith('epochs:') for d in diffs)
               else f' ({cfg.loss} uses the total number of epochs in its schedule, so more epochs would not '
                    'continue the same run)')
        raise UserError(f'{path}: this command changes settings of the saved run ({"; ".join(diffs)}){why}; '
                        f'{instead}')
    return cfg


def resume_hint(cfg: Optional[Config]) -> str:
    """What is true about the run folder after a failure, and what to do."""
    if cfg is None:
        return ''
    if (Path(cfg.run_dir) / 'last.pt').exists():
        return f'; the last complete epoch is kept: continue with --resume {cfg.run_dir}'
    return '; no epoch was complete, so nothing was kept: start the run again'


def strip_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + '='):
            out.append(a)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = None
    try:
        cfg, args = parse_args(argv)
        if distributed.process().world_size > 1:  # launched by torchrun or srun
            distributed.init_process_group(select_device(cfg.device).type, cfg.dist_backend, cfg.dist_timeout)
            signal.signal(signal.SIGTERM, _stopped_by_launcher)
        if args.evaluate:
            ckpt = load_checkpoint(Path(args.evaluate))
            cfg = config_from_checkpoint(ckpt, strip_flag(argv, '--evaluate'), Path(args.evaluate), None,
                                         '--evaluate tests a checkpoint in its own settings: drop the flags that '
                                         'change them (predict.py runs it on other images)')
            evaluate(cfg, ckpt, f'--evaluate {args.evaluate}')
            return 0
        resume = None
        if args.resume:
            last = Path(args.resume) / 'last.pt'
            if (Path(args.resume) / 'config.json').is_file() and not last.exists():
                raise UserError(f'--resume {args.resume}: the run stopped before its first checkpoint, so there is '
                                'nothing to continue; run the same command without --resume')
            resume = load_checkpoint(last)
            cfg = config_from_checkpoint(resume, strip_flag(argv, '--resume'), last, args.resume)
            if resume['epoch'] >= cfg.epochs:
                more = ('' if methods.METHODS[cfg.loss].schedule_uses_epochs
                        else f'; add --epochs N (N > {cfg.epochs}) to train it further')
                raise UserError(f'{args.resume} already finished all {cfg.epochs} epochs{more}')
            argv = resume.get('argv', []) + strip_flag(argv, '--resume')
        run(cfg, argv, resume, overwrite=args.overwrite)
        return 0
    except NonFiniteLoss as e:
        log.error(f'error: {one_line(e)}{resume_hint(cfg)}')
        return 2
    except VLPLError as e:
        log.error(f'error: {one_line(e)}')
        return 2
    except OSError as e:  # e.g. a full disk while writing a checkpoint: the previous one is intact
        where = f' {e.filename}' if e.filename else ''
        log.error(f'error: cannot read or write{where}: {e.strerror or e}{resume_hint(cfg)}')
        return 1
    except KeyboardInterrupt:
        log.error(f'\ninterrupted{resume_hint(cfg)}')
        return 130
    except Exception as e:
        if distributed.is_collective_error(e):
            # Another process raised (its own line says why), was killed, or stopped answering for
            # --dist-timeout seconds: this one stops too, with one line and no traceback.
            log.error(f'error: lost contact with the other processes ({distributed.short_reason(e)}): one failed '
                      f'(see its message) or died{resume_hint(cfg)}')
            return 1
        if os.environ.get('VLPL_TRACEBACK'):  # a bug: one line, and the traceback on request
            raise
        log.error(f'error: unexpected {type(e).__name__}: {one_line(e)[:300]} (this is a bug; run again with '
                  'VLPL_TRACEBACK=1 to see where, and report it)')
        return 1
    finally:
        distributed.destroy_process_group()


def _stopped_by_launcher(signum, frame):
    """torchrun (and srun --kill-on-bad-exit) send SIGTERM to the other processes when one fails."""
    raise distributed.PeerFailure('stopped by the launcher because another process failed (see its message); '
                                  'the last complete checkpoint is kept: continue with --resume RUN_DIR')


if __name__ == '__main__':
    sys.exit(main())

"""Train and evaluate single-positive multi-label classifiers with CLIP pseudo-labels (VLPL).

Reads top to bottom: per-dataset settings, the command line, set-up (data, frozen CLIP, model),
the phases of an epoch, checkpoints, and the loop. Examples:

    python main_clip.py -d demo                      # offline demo, CPU, a few minutes
    python main_clip.py -d coco -l EM_PL -m clip_vision
    python main_clip.py --resume results/coco_EM_PL_clip_vision_s0
    python main_clip.py --evaluate results/coco_EM_PL_clip_vision_s0/best.pt
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import datasets
import losses
import models
from instrumentation import TrainLogger, format_summary
from metrics import compute_metrics

# Per-dataset settings of the original (REFERENCE section 10). EM_APL takes beta, warmup and batch
# size from its own paper (SPML-AckTheUnknown). The demo row is this project's: a small
# random-init network on 64 px synthetic images with the locally trained tiny CLIP.
DATASET_SETTINGS = {
    'pascal': dict(lr=1e-5, batch_size=8, alpha=0.2, beta_pos=0.7, apl=(0.02, 5, 8)),
    'coco': dict(lr=1e-5, batch_size=8, alpha=0.1, beta_pos=0.7, apl=(0.9, 5, 16)),
    'nuswide': dict(lr=1e-5, batch_size=8, alpha=0.1, beta_pos=0.7, apl=(0.2, 4, 16)),
    'cub': dict(lr=1e-4, batch_size=8, alpha=0.01, beta_pos=0.7, apl=(0.4, 3, 8)),
    'demo': dict(lr=1e-3, batch_size=32, alpha=0.1, beta_pos=0.7, apl=(0.2, 3, 32),
                 image_size=64, model='small_cnn', epochs=10,
                 clip_model='vlpl-demo-tiny', clip_pretrained='{data_root}/demo/clip/vlpl-demo-tiny.pt'),
}
DEFAULTS = dict(image_size=448, model='resnet50', epochs=10,
                clip_model='ViT-L-14-336', clip_pretrained='openai')
NUMPY_SEED = 1200


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

    def hparams(self, num_classes: int) -> dict:
        """The loss hyper-parameters under the original's names (losses.compute_batch_loss)."""
        return dict(alpha=self.alpha, beta=self.beta, beta_pos=self.beta_pos, beta_neg=self.beta_neg,
                    positive=2, negative=4, unknown=4, warmup_epoch=self.warmup_epoch, ls_coef=0.1,
                    expected_num_pos=losses.EXPECTED_NUM_POS[self.dataset], num_classes=num_classes)


# Settings a resumed run may change without changing its results.
RESUMABLE_CHANGES = {'num_workers', 'device', 'results_dir', 'cache_dir', 'data_root', 'clip_mode',
                     'run_dir', 'skip_bad_images'}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' unless the help text already says what the default is."""

    def _get_help_string(self, action):
        if 'default' in (action.help or '') or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='VLPL: single-positive multi-label training with CLIP pseudo-labels.',
        formatter_class=HelpFormatter)
    p.add_argument('-d', '--dataset', default='pascal', choices=sorted(DATASET_SETTINGS),
                   help='dataset under --data-root; "demo" is generated offline on first use')
    p.add_argument('-l', '--loss', default='EM_PL', choices=sorted(losses.LOSSES), help='training loss')
    p.add_argument('-g', '--gpu', default=None,
                   help='GPU index, exported as CUDA_VISIBLE_DEVICES (default: leave it as it is)')
    p.add_argument('-m', '--model', default=None, choices=sorted(models.BACKBONES),
                   help='trainable backbone (default: resnet50; small_cnn for the demo)')
    p.add_argument('-t', '--temp', type=float, default=0.01, help='softmax temperature of the CLIP scores')
    p.add_argument('-th', '--threshold', type=float, default=0.3, help='positive pseudo-label threshold')
    p.add_argument('-p', '--partial', type=float, default=0.0,
                   help='fraction of lowest-scoring classes made negative pseudo-labels; as in the original '
                        'it applies to pascal with -m clip_vision only, unless --partial-everywhere')
    p.add_argument('--partial-everywhere', action='store_true',
                   help='apply -p to every dataset and backbone')
    p.add_argument('-s', '--pytorch_seed', '--seed', dest='seed', type=int, default=0, help='torch seed')
    p.add_argument('--data-root', default='data', help='folder holding <dataset>/formatted_*.npy')
    p.add_argument('--results-dir', default='results', help='each run writes a folder here')
    p.add_argument('--run-name', default=None,
                   help='name of the run folder (default: <dataset>_<loss>_<model>_s<seed>)')
    p.add_argument('--cache-dir', default='cache', help='frozen-CLIP embedding cache')
    p.add_argument('--epochs', type=int, default=None, help='number of epochs (default 10)')
    p.add_argument('--batch-size', type=int, default=None, help='default: per dataset (8; EM_APL: its paper)')
    p.add_argument('--lr', type=float, default=None, help='Adam learning rate (default: per dataset)')
    p.add_argument('--image-size', type=int, default=None, help='input size (default 448; demo 64)')
    p.add_argument('--num-workers', type=int, default=min(8, os.cpu_count() or 1),
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
                        'under text_features/)')
    p.add_argument('--backbone-weights', default=None,
                   help='local weights file for the backbone (default: download the published weights)')
    p.add_argument('--no-pretrained', action='store_true',
                   help='random initialisation of the backbone (default: ImageNet weights)')
    p.add_argument('--amp', action='store_true',
                   help='bf16 autocast on CUDA (losses stay float32; default: float32)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format (CNNs on GPU)')
    p.add_argument('--skip-bad-images', action='store_true',
                   help='skip unreadable images (reported) instead of stopping')
    p.add_argument('--alpha', type=float, default=None, help='entropy weight of EM losses (default: per dataset)')
    p.add_argument('--beta-pos', type=float, default=None, help='weight of positive pseudo-labels (default 0.7)')
    p.add_argument('--warmup-epoch', type=int, default=None,
                   help='EM_PL: epochs of plain EM first (default 0); EM_APL: per dataset')
    p.add_argument('--resume', default=None, metavar='RUN_DIR',
                   help='continue the run in RUN_DIR from its last complete epoch; other flags may change '
                        'only the device, workers and folders')
    p.add_argument('--evaluate', default=None, metavar='CHECKPOINT',
                   help='only compute the test metrics of a saved checkpoint')
    return p


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.gpu is not None:
        os.environ['CUDA_VISIBLE_DEVICES'] = str(a.gpu)
    if not 0.0 < a.threshold < 1.0:
        parser.error(f'-th/--threshold must be in (0, 1), got {a.threshold}')
    if a.temp <= 0:
        parser.error(f'-t/--temp must be > 0, got {a.temp}')
    if not 0.0 <= a.partial < 1.0:
        parser.error(f'-p/--partial must be in [0, 1), got {a.partial}')
    for flag in ('epochs', 'batch_size', 'image_size'):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be >= 1')
    if a.lr is not None and a.lr <= 0:
        parser.error('--lr must be > 0')
    if a.num_workers < 0:
        parser.error('--num-workers must be >= 0')
    if a.no_pretrained and a.backbone_weights:
        parser.error('--no-pretrained and --backbone-weights exclude each other')

    row = {**DEFAULTS, **DATASET_SETTINGS[a.dataset]}
    model = a.model or row['model']
    apl_beta, apl_warmup, apl_batch = row['apl']
    is_apl = a.loss == 'EM_APL'
    # The original reads -p for pascal only and applies negative pseudo-labels with clip_vision only.
    partial_applies = a.partial_everywhere or (a.dataset == 'pascal' and model == 'clip_vision')
    if a.partial > 0 and not partial_applies:
        print(f'note: -p {a.partial} is ignored for -d {a.dataset} -m {model}, as in the original; '
              'add --partial-everywhere to apply it', file=sys.stderr)
    run_name = a.run_name or f'{a.dataset}_{a.loss}_{model}_s{a.seed}'
    cfg = Config(
        dataset=a.dataset, loss=a.loss, model=model, temp=a.temp, threshold=a.threshold,
        partial=a.partial if partial_applies else 0.0, seed=a.seed, data_root=a.data_root,
        results_dir=a.results_dir, cache_dir=a.cache_dir, epochs=a.epochs or row['epochs'],
        batch_size=a.batch_size or (apl_batch if is_apl else row['batch_size']),
        lr=a.lr or row['lr'], image_size=a.image_size or row['image_size'], num_workers=a.num_workers,
        device=a.device, clip_model=a.clip_model or row['clip_model'],
        clip_pretrained=a.clip_pretrained or row['clip_pretrained'].format(data_root=a.data_root),
        clip_mode=a.clip_mode, text_features=a.text_features, backbone_weights=a.backbone_weights,
        pretrained=not a.no_pretrained, amp=a.amp, channels_last=a.channels_last,
        skip_bad_images=a.skip_bad_images,
        alpha=a.alpha if a.alpha is not None else row['alpha'],
        beta=apl_beta, beta_pos=a.beta_pos if a.beta_pos is not None else row['beta_pos'], beta_neg=0.0,
        warmup_epoch=a.warmup_epoch if a.warmup_epoch is not None else (apl_warmup if is_apl else 0),
        run_dir=str(Path(a.results_dir) / run_name))
    if cfg.loss in WARMUP_LOSSES and cfg.warmup_epoch >= cfg.epochs:
        parser.error(f'--warmup-epoch {cfg.warmup_epoch} leaves no epoch of {cfg.loss} after the warmup '
                     f'(--epochs {cfg.epochs})')
    return cfg, a


WARMUP_LOSSES = {'EM_PL', 'EM_PL_ASL', 'EM_APL'}


class UserError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


# ----------------------------------------------------------------------------------------------
# Set-up


def select_device(name: str):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA device is visible (check -g / CUDA_VISIBLE_DEVICES)')
    return torch.device(name)


def seed_everything(seed: int) -> None:
    np.random.seed(NUMPY_SEED)
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: Config) -> dict:
    """Formatted splits of REFERENCE section 4; the demo is generated on first use."""
    if cfg.dataset == 'demo':
        from preproc import make_demo
        make_demo.ensure_demo(cfg.data_root, progress=True)
    return datasets.load_splits(cfg.data_root, cfg.dataset,
                                clean_train_labels=cfg.loss in CLEAN_LABEL_LOSSES)


CLEAN_LABEL_LOSSES = {'bce', 'bce_ls'}


def text_features_for(cfg: Config, clip_model, tokenizer, num_classes: int):
    """(K, D) normalised class text features: --text-features, or computed once and cached.

    A computed file has a key file beside it (CLIP model, weights identity, class names), so new
    weights under the same file name, e.g. a regenerated demo CLIP, are never paired with stale text.
    """
    if cfg.text_features:
        return models.load_text_features(cfg.text_features, num_classes)
    path = models.default_text_features_path(cfg.dataset, cfg.clip_model, cfg.clip_pretrained)
    classnames = models.read_classnames(cfg.dataset)
    key = dict(clip_model=cfg.clip_model, weights=models.weights_identity(cfg.clip_pretrained),
               classnames=classnames)
    key_path = path.with_suffix('.json')
    try:
        stored = json.loads(key_path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        stored = None  # no key file, or a damaged one: compute again
    if stored != key:
        print(f'Computing text features of {cfg.dataset} with {cfg.clip_model} -> {path}')
        models.save_text_features(path, models.compute_text_features(clip_model, tokenizer, classnames))
        models.atomic_write(key_path, lambda handle: handle.write(json.dumps(key, indent=1).encode()))
    return models.load_text_features(path, num_classes)


def make_loader(dataset, *, batch_size: int, sampler=None, cfg: Config, device):
    """Batches in row order (or the sampler's), pinned for CUDA, workers kept across epochs."""
    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
        collate_fn=datasets.collate_skipping, pin_memory=device.type == 'cuda',
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


# ----------------------------------------------------------------------------------------------
# The phases of an epoch


def autocast(cfg: Config, device):
    if cfg.amp and device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


class NonFiniteLoss(UserError):
    pass


def train_one_epoch(epoch: int, cfg: Config, model, optimizer, loader, labels: dict, pl_source,
                    hparams: dict, device, check_every: int = 50):
    """One pass over the training split. Returns (preds (N, K) in row order, mean loss, pl stats).

    labels holds device tensors 'obs' (N, K, modified by EM_APL) and 'true' (N, K). pl_source gives
    the pseudo-labels of a batch (None when the loss uses none). Host syncs happen only every
    `check_every` steps, for the progress bar and the non-finite-loss check.
    """
    model.train()
    num_rows, num_classes = labels['obs'].shape
    preds_all = torch.full((num_rows, num_classes), float('nan'), device=device)  # NaN: skipped image
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    step_on_device = torch.zeros((), dtype=torch.long, device=device)
    pl_counts = torch.zeros(3, device=device)  # true positives, predicted positives, true positives available
    bar = tqdm(loader, desc=f'epoch {epoch} train', leave=False, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        if batch is None:  # every image of the batch was unreadable (--skip-bad-images)
            continue
        images = batch['image'].to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        index = batch['index'].to(device, non_blocking=True)
        observed = labels['obs'][index]
        true = labels['true'][index]
        pl = None
        if pl_source is not None:
            pl = pl_source(images, index, batch['flipped'].to(device, non_blocking=True))
            unknown_pos = (pl == 1) & (observed == 0)
            pl_counts += torch.stack([(unknown_pos & (true == 1)).sum(), unknown_pos.sum(),
                                      ((observed == 0) & (true == 1)).sum()]).float()
        with autocast(cfg, device):
            logits = model(images)
        preds = torch.sigmoid(logits.float())
        loss = losses.compute_batch_loss(cfg.loss, preds, observed, hparams, true_labels=true,
                                         pseudo_labels=pl, epoch=epoch, validate=step == 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        preds_all[index] = preds.detach()
        loss = loss.detach()
        loss_sum += loss
        step_on_device.fill_(step)  # a kernel argument, not a host-to-device copy
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step_on_device, first_bad)
        if (step + 1) % check_every == 0 or step + 1 == len(loader):
            if first_bad.item() >= 0:
                raise NonFiniteLoss(f'non-finite loss at epoch {epoch}, batch {first_bad.item()} '
                                    f'(loss {cfg.loss}, lr {cfg.lr}); the last checkpoint of {cfg.run_dir} '
                                    'is kept: lower --lr or check the data, then --resume')
            bar.set_postfix(loss=f'{loss.item():.4f}')
    bar.close()
    return preds_all.cpu().numpy(), (loss_sum / max(len(loader), 1)).item(), pl_counts.cpu().numpy()


def predict(cfg: Config, model, loader, num_rows: int, num_classes: int, device, desc: str):
    """Sigmoid outputs (N, K) in row order, eval mode, no CLIP work; NaN rows for skipped images."""
    model.eval()
    preds_all = torch.full((num_rows, num_classes), float('nan'), device=device)  # NaN: skipped image
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
            if batch is None:
                continue
            images = batch['image'].to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(cfg, device):
                logits = model(images)
            preds_all[batch['index'].to(device)] = torch.sigmoid(logits.float())
    return preds_all.cpu().numpy()


def pseudo_label_quality(pl, true) -> dict:
    """Precision and recall of the positive pseudo-labels against the true labels (all entries)."""
    pos = pl == 1
    hits = float((pos & (true == 1)).sum())
    return dict(precision=hits / max(float(pos.sum()), 1.0), recall=hits / max(float((true == 1).sum()), 1.0),
                per_image=float(pos.sum()) / max(pl.shape[0], 1))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj, path: Path) -> None:
    """np.save (arrays) or torch.save (everything else) through models.atomic_write: a checkpoint
    is never half-written, and Ctrl-C or a full disk keeps the previous one."""
    if isinstance(obj, np.ndarray):
        models.atomic_write(path, lambda handle: np.save(handle, obj))
    else:
        models.atomic_write(path, lambda handle: torch.save(obj, handle))


def rng_state(sampler) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), numpy_keys=torch.from_numpy(keys.astype(np.int64)),
                 numpy_rest=[kind, int(pos), int(has_gauss), float(cached)],
                 python=list(random.getstate()[1]), python_rest=[random.getstate()[0], random.getstate()[2]],
                 sampler=sampler.state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, sampler) -> None:
    torch.set_rng_state(state['torch'])
    kind, pos, has_gauss, cached = state['numpy_rest']
    np.random.set_state((kind, state['numpy_keys'].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss = state['python_rest']
    random.setstate((version, tuple(state['python']), gauss))
    sampler.load_state(state['sampler'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def load_checkpoint(path: Path) -> dict:
    """weights_only loading: a file that is not one of our checkpoints is refused, not executed."""
    if not path.is_file():
        raise UserError(f'{path}: no such checkpoint')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{path}: not a readable VLPL checkpoint ({first[:200]})') from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'epoch'} <= set(ckpt):
        raise UserError(f'{path}: not a VLPL checkpoint (missing model/config/epoch)')
    return ckpt


def config_differences(old: dict, new: Config) -> list[str]:
    new_d = dataclasses.asdict(new)
    return [f'{k}: {old.get(k)!r} -> {new_d[k]!r}' for k in new_d
            if k not in RESUMABLE_CHANGES and old.get(k) != new_d[k]]


# ----------------------------------------------------------------------------------------------
# The run


def prepare_run_dir(cfg: Config, resuming: bool) -> Path:
    run_dir = Path(cfg.run_dir)
    if not resuming and (run_dir / 'last.pt').exists():
        raise UserError(f'{run_dir} already holds a run: continue it with --resume {run_dir}, '
                        'or choose another --run-name')
    ensure_writable(run_dir, '--results-dir')
    ensure_writable(Path(cfg.cache_dir), '--cache-dir')
    return run_dir


def ensure_writable(folder: Path, flag: str) -> None:
    """Fail before training, not after the first epoch, when a folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f'.write-test-{os.getpid()}'
        probe.write_bytes(b'ok')
        probe.unlink()
    except OSError as e:
        raise UserError(f'cannot write to {folder}: {e.strerror}; choose a writable {flag}') from None


def build_pseudo_labels(cfg: Config, clip_model, tokenizer, splits, train_eval_loader, device, num_classes):
    """The frozen-CLIP pseudo-label source of the training phase: (images, index, flipped) -> pl."""
    text = text_features_for(cfg, clip_model, tokenizer, num_classes).to(device)
    labeler = models.PseudoLabeler(clip_model.visual, text, temp=cfg.temp, threshold=cfg.threshold,
                                   partial=cfg.partial).to(device)
    if cfg.clip_mode == 'online':
        print('Frozen CLIP runs on every training batch (--clip-mode online); the pseudo-label '
              'precision and recall are reported on each train line.')
        return lambda images, index, flipped: labeler(images), None
    key = models.embedding_cache_key(
        dataset=cfg.dataset, image_root=train_eval_loader.dataset.root, images=splits['train'].images,
        clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained, image_size=cfg.image_size,
        clip_size=labeler.image_size, precision='bf16' if cfg.amp and device.type == 'cuda' else 'float32')
    emb = models.cached_embeddings(labeler, train_eval_loader, key, Path(cfg.cache_dir), device=device,
                                   amp=cfg.amp).to(device)  # (N, 2, D): unflipped, flipped
    quality = pseudo_label_quality(labeler.from_embeddings(emb[:, 0]).cpu().numpy(), splits['train'].labels_true)
    return (lambda images, index, flipped: labeler.from_embeddings(emb[index, flipped.long()])), quality


def run(cfg: Config, argv: list[str], resume: Optional[dict]) -> dict:
    """A training run (or the rest of one, from `resume`); returns the best epoch's results."""
    device = select_device(cfg.device)
    run_dir = prepare_run_dir(cfg, resuming=resume is not None)
    seed_everything(cfg.seed)
    splits = prepare_data(cfg)
    num_classes = splits['train'].labels_obs.shape[1]
    for phase, split in splits.items():
        print(f'{phase:>5}: {len(split.images):6d} images, {num_classes} classes, '
              f'{split.labels_obs.clip(min=0).sum(1).mean():.2f} observed positives / image, '
              f'{split.labels_true.sum(1).mean():.2f} true positives / image')

    root = datasets.image_root(cfg.data_root, cfg.dataset)
    sets = {phase: datasets.MultiLabelImages(root, split, cfg.image_size, train=phase == 'train',
                                             dataset=cfg.dataset, skip_bad=cfg.skip_bad_images)
            for phase, split in splits.items()}
    sampler = datasets.FlipSampler(len(sets['train']), seed=cfg.seed)
    loaders = {'train': make_loader(sets['train'], batch_size=cfg.batch_size, sampler=sampler, cfg=cfg,
                                    device=device)}
    for phase in ('val', 'test'):
        loaders[phase] = make_loader(sets[phase], batch_size=cfg.batch_size, cfg=cfg, device=device)
    train_eval_set = datasets.MultiLabelImages(root, splits['train'], cfg.image_size, train=False,
                                               dataset=cfg.dataset, skip_bad=cfg.skip_bad_images)
    train_eval_loader = make_loader(train_eval_set, batch_size=cfg.batch_size, cfg=cfg, device=device)

    needs_pl = cfg.loss in losses.NEEDS_PSEUDO_LABELS
    clip_model = tokenizer = None
    if needs_pl or cfg.model == 'clip_vision':
        clip_model, tokenizer = models.load_clip(cfg.clip_model, cfg.clip_pretrained, device=device)
    pl_source, quality = None, None
    if needs_pl:
        pl_source, quality = build_pseudo_labels(cfg, clip_model, tokenizer, splits, train_eval_loader,
                                                 device, num_classes)
        if quality:
            print(f'Pseudo-labels on train (temp {cfg.temp}, threshold {cfg.threshold}): precision '
                  f'{quality["precision"]:.3f}, recall {quality["recall"]:.3f}, '
                  f'{quality["per_image"]:.2f} positives / image')

    # Reseed so that the head's initialisation does not depend on what ran before (CLIP loading and
    # every DataLoader iterator draw from the global generator).
    torch.manual_seed(cfg.seed)
    model = models.build_classifier(cfg.model, num_classes, pretrained=cfg.pretrained and resume is None,
                                    weights_path=cfg.backbone_weights if resume is None else None,
                                    clip_model=clip_model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    logger = TrainLogger(cfg.epochs, num_classes)
    labels = {'obs': torch.as_tensor(splits['train'].labels_obs, device=device),
              'true': torch.as_tensor(splits['train'].labels_true, device=device)}
    unknown_counts = losses.count_unknowns(splits['train'].labels_obs)
    hparams = cfg.hparams(num_classes)
    start_epoch = 1
    if resume is not None:
        model.load_state_dict(resume['model'])
        optimizer.load_state_dict(resume['optimizer'])
        logger.load_state_dict(resume['logger'])
        labels['obs'] = resume['train_observed'].to(device)
        set_rng_state(resume['rng'], sampler)
        start_epoch = resume['epoch'] + 1
        print(f'Resuming {run_dir} after epoch {resume["epoch"]}')
    (run_dir / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_preds, train_loss, pl_counts = train_one_epoch(epoch, cfg, model, optimizer, loaders['train'],
                                                             labels, pl_source, hparams, device)
        if cfg.loss == 'EM_APL' and epoch >= cfg.warmup_epoch:
            preds = predict(cfg, model, train_eval_loader, len(train_eval_set), num_classes, device,
                            f'epoch {epoch} APL')
            preds = np.nan_to_num(preds, nan=1.0)  # a skipped image is never made a negative
            labels['obs'] = torch.as_tensor(losses.apl_update(
                preds, labels['obs'].cpu().numpy(), unknown_counts, epoch=epoch, num_epochs=cfg.epochs,
                warmup_epoch=cfg.warmup_epoch), dtype=torch.float32, device=device)
        times = {'train': time.perf_counter() - t0}
        phase_preds = {'train': train_preds}
        for phase in ('val', 'test'):
            t0 = time.perf_counter()
            phase_preds[phase] = predict(cfg, model, loaders[phase], len(sets[phase]), num_classes, device,
                                         f'epoch {epoch} {phase}')
            times[phase] = time.perf_counter() - t0
        for phase in ('train', 'val', 'test'):
            split = splits[phase]
            observed = labels['obs'].cpu().numpy() if phase == 'train' else split.labels_obs
            seen = ~np.isnan(phase_preds[phase][:, 0])
            if not seen.all():
                print(f'{phase}: skipped {int((~seen).sum())} unreadable images (--skip-bad-images); '
                      'metrics cover the rest')
            s = logger.log_phase(epoch, phase, phase_preds[phase][seen], split.labels_true[seen], observed[seen],
                                 train_loss if phase == 'train' else None)
            extra = ''
            if phase == 'train' and pl_source is not None and pl_counts[1] > 0:
                extra = (f' | PL on unknown: precision {pl_counts[0] / pl_counts[1]:.3f}, '
                         f'recall {pl_counts[0] / max(pl_counts[2], 1):.3f}')
            print(f'{format_summary(s)} | {times[phase]:.1f} s{extra}')
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch,
                     config=dataclasses.asdict(cfg), argv=list(argv), logger=logger.state_dict(),
                     train_observed=labels['obs'].cpu(), rng=rng_state(sampler))
        if logger.best_epoch == epoch:
            atomic_save(phase_preds['test'], run_dir / 'test_preds_best.npy')
            atomic_save({k: state[k] for k in ('model', 'epoch', 'config', 'argv')}
                        | {'test_map': logger.best_test_map}, run_dir / 'best.pt')
        atomic_save(state, run_dir / 'last.pt')
        logger.save_json(run_dir / 'log.json')
        print(f'checkpoint: {run_dir / "last.pt"} (epoch {epoch})')

    print(f'Best epoch: {logger.best_epoch}')
    print(f'Best epoch validation score: {logger.best_val_map:.2f}')
    print(f'Best epoch test score: {logger.best_test_map:.2f}')
    return dict(best_epoch=logger.best_epoch, val_map=logger.best_val_map, test_map=logger.best_test_map,
                run_dir=str(run_dir))


def evaluate(cfg: Config, ckpt: dict) -> float:
    """Test mAP of a saved model (no CLIP weights needed: the classifier carries its own)."""
    device = select_device(cfg.device)
    splits = prepare_data(cfg)
    num_classes = splits['test'].labels_true.shape[1]
    clip_model = None
    if cfg.model == 'clip_vision':
        clip_model, _ = models.load_clip(cfg.clip_model, None, device=device)
    model = models.build_classifier(cfg.model, num_classes, pretrained=False, clip_model=clip_model)
    model.load_state_dict(ckpt['model'])
    model.to(device)
    test_set = datasets.MultiLabelImages(datasets.image_root(cfg.data_root, cfg.dataset), splits['test'],
                                         cfg.image_size, train=False, dataset=cfg.dataset,
                                         skip_bad=cfg.skip_bad_images)
    loader = make_loader(test_set, batch_size=cfg.batch_size, cfg=cfg, device=device)
    preds = predict(cfg, model, loader, len(test_set), num_classes, device, 'test')
    m = compute_metrics(preds, splits['test'].labels_true)
    print(f'Test mAP of {cfg.dataset} epoch {ckpt["epoch"]}: {m["map"]:.2f}')
    return m['map']


def config_from_checkpoint(ckpt: dict, argv: list[str], path: Path, override_run_dir: Optional[str]) -> Config:
    """Re-parse the saved command line followed by this one, so later flags override saved ones."""
    saved = [a for a in ckpt.get('argv', [])]
    cfg, _ = parse_args(saved + argv)
    if override_run_dir:
        cfg = dataclasses.replace(cfg, run_dir=override_run_dir)
    diffs = config_differences(ckpt['config'], cfg)
    if diffs:
        raise UserError(f'{path}: this command changes settings of the saved run ({"; ".join(diffs)}); '
                        'start a new run instead')
    return cfg


def one_line(error: Exception) -> str:
    """The user-facing message of an error, also when a DataLoader worker re-raised it with the
    worker's traceback appended (its last line is then the original message)."""
    text = str(error).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1]
        prefix, sep, rest = text.partition(': ')
        text = rest if sep and prefix.endswith('Error') else text
    return text.splitlines()[0] if text else type(error).__name__


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
    try:
        cfg, args = parse_args(argv)
        if args.evaluate:
            ckpt = load_checkpoint(Path(args.evaluate))
            cfg = config_from_checkpoint(ckpt, strip_flag(argv, '--evaluate'), Path(args.evaluate), None)
            evaluate(cfg, ckpt)
            return 0
        resume = None
        if args.resume:
            last = Path(args.resume) / 'last.pt'
            resume = load_checkpoint(last)
            cfg = config_from_checkpoint(resume, strip_flag(argv, '--resume'), last, args.resume)
            if resume['epoch'] >= cfg.epochs:
                raise UserError(f'{args.resume} already finished all {cfg.epochs} epochs')
            argv = resume.get('argv', []) + strip_flag(argv, '--resume')
        run(cfg, argv, resume)
        return 0
    except (UserError, datasets.DataError, models.ModelLoadError) as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a full disk while writing a checkpoint: the previous one is intact
        where = f' {e.filename}' if e.filename else ''
        print(f'error: cannot read or write{where}: {e.strerror or e}; the last complete checkpoint is kept',
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('\ninterrupted: checkpoints are written atomically, so the last complete epoch is kept; '
              'continue with --resume RUN_DIR', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())

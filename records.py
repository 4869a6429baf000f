"""What a run leaves in its folder each epoch, beside the checkpoint: the checkpoints themselves
(last.pt, best.pt), log.json and summary.csv, the best epoch's test predictions, per-class AP and
F1 thresholds, config.json's record (device, versions, commit, times, and the provenance of the
run's inputs: weights and label files with their sha256), and TensorBoard events. Called by
main_clip.py on the primary process only. `run_status` says what a run folder holds (finished or
not), for sweep.py and report.py alike.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import heads_run
import losses
from checkpoints import atomic_save, clip_entries, rng_state
from config import NUMPY_SEED, Config, UserError
from distributed import is_primary
from files import save_json
from fingerprint import SHA256_CACHE, sha256_file  # noqa: F401 (SHA256_CACHE: where it caches)
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
    common = model_entries(cfg, argv, model, epoch, classnames)
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


def model_entries(cfg: Config, argv: list[str], model, epoch: int, classnames: list[str]) -> dict:
    """The entries of every checkpoint that describe its classifier (best.pt, last.pt, and a published
    checkpoint imported by preproc/import_checkpoint.py): weights, epoch, the settings and the command
    line they parse from, class names, the head's tensors outside its state dict and clip_vision's CLIP
    architecture."""
    return dict(model=model.state_dict(), epoch=epoch, config=dataclasses.asdict(cfg), argv=list(argv),
                classnames=list(classnames)) | heads_run.checkpoint_entries(model) | clip_entries(cfg, model)


def run_record(cfg: Config, device, method_class) -> dict:
    """What config.json records beside the settings: the device used, versions, commit, start time,
    the settings this method does not read (kept for the record, marked unused), and the
    provenance of the run's inputs (`provenance`; computed on the primary process only)."""
    used = set(losses.loss_hparams(cfg.loss)) if cfg.loss in losses.LOSSES else set()
    unused = sorted({'alpha', 'beta', 'beta_pos', 'beta_neg', 'warmup_epoch'} - used)
    if not method_class.uses_pseudo_labels(cfg):
        unused += ['temp', 'threshold', 'partial', 'clip_mode', 'text_features']
        if cfg.model != 'clip_vision':
            unused += ['clip_model', 'clip_pretrained']
    git = git_state()
    record = {'device': str(device), 'versions': library_versions(), 'git_commit': git['commit'],
              'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'unused_settings': unused}
    if is_primary():
        record['provenance'] = provenance(cfg, device, uses_clip='clip_model' not in unused, git=git)
    return record


# ----------------------------------------------------------------------------------------------
# Provenance: what a number came from


def library_versions() -> dict:
    import torchvision

    versions = {'python': platform.python_version(), 'torch': torch.__version__,
                'torchvision': torchvision.__version__, 'numpy': np.__version__}
    for name in ('open_clip', 'timm'):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # an optional dependency that is not installed has no version to record
            versions[name] = None
    return versions


def git_state() -> dict:
    """{'commit': HEAD or None, 'dirty': whether tracked files differ from it (None if unknown)}."""
    def git(*args):
        return subprocess.run(['git', *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    try:
        head = git('rev-parse', 'HEAD')
        if head.returncode != 0:
            return {'commit': None, 'dirty': None}
        status = git('status', '--porcelain', '--untracked-files=no')
        return {'commit': head.stdout.strip(), 'dirty': bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {'commit': None, 'dirty': None}


def device_name(device) -> str:
    """The accelerator's marketing name, or the CPU model."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _file_record(path, cache_dir) -> dict:
    path = Path(path)
    if not path.is_file():
        return {'file': str(path), 'sha256': None}
    return {'file': str(path.resolve()), 'sha256': sha256_file(path, cache_dir)}


def _hf_cached(repo_id: str, filenames) -> Optional[str]:
    """The local copy of a Hugging Face Hub file when it is in the cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def published_weights_file(kind: str, name: str, tag: Optional[str] = None) -> Optional[str]:
    """Where the published weights of a backbone (kind 'backbone', name a BACKBONES key) or a CLIP
    model (kind 'clip', name and tag as open_clip takes them) lie in the local caches of
    torchvision, timm (Hugging Face Hub) and open_clip; None when not found."""
    import backbones
    import trunks

    try:
        if kind == 'backbone' and name == 'resnet50':
            import torchvision

            weights = getattr(torchvision.models.ResNet50_Weights, trunks.RESNET50_WEIGHTS)
            path = Path(torch.hub.get_dir()) / 'checkpoints' / Path(weights.url).name
            return str(path) if path.is_file() else None
        if kind == 'backbone' and backbones.timm_name(name):
            import timm

            hub = timm.models.get_pretrained_cfg(backbones.timm_name(name)).hf_hub_id
            return _hf_cached(hub, ('model.safetensors', 'pytorch_model.bin')) if hub else None
        if kind == 'clip':
            import open_clip

            cfg = open_clip.get_pretrained_cfg(name, tag) or {}
            if cfg.get('hf_hub'):
                repo, filename = os.path.split(cfg['hf_hub'])
                found = _hf_cached(repo, [filename] if filename else
                                   ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin'))
                if found:
                    return found
            if cfg.get('url'):
                path = Path(os.path.expanduser('~/.cache/clip')) / Path(cfg['url']).name
                return str(path) if path.is_file() else None
    except Exception:  # a library without these helpers: the provenance says the file was not found
        return None
    return None


def _weights(name: str, path: Optional[str], cache_dir) -> dict:
    out = {'name': name}
    if path is None:
        return out | {'file': None, 'sha256': None}
    return out | _file_record(path, cache_dir)


def data_files(cfg: Config) -> list[Path]:
    """The formatted image lists, labels, observed labels and ignore masks a run of cfg reads
    (datasets.load_splits: --observed full reads no observed-label file, nor does a dataset of real
    partial annotations such as openimages; a mask only where the dataset has one)."""
    import datasets

    folder = Path(cfg.data_root) / cfg.dataset
    names = [f'formatted_{phase}_{kind}.npy' for phase in ('train', 'val') for kind in ('images', 'labels')]
    optional = ['formatted_train_ignore.npy', 'formatted_val_ignore.npy']
    if cfg.observed != datasets.FULL_OBSERVED:
        optional.insert(0, datasets.observed_file_name(cfg.observed))
    return [folder / name for name in names] + [folder / name for name in optional if (folder / name).is_file()]


# Config fields that name an input file, besides weights and data.
INPUT_FILE_FIELDS = ('text_features', 'label_embeddings', 'prior_file', 'aevlp_relation', 'aevlp_classnames',
                     'prompts', 'init_from')


def provenance(cfg: Config, device, *, uses_clip: bool, git: Optional[dict] = None) -> dict:
    """Where a run's number comes from: the code (commit, dirty tree), the libraries, the device,
    the backbone and CLIP weights (name, file, sha256), the input size, the seeds of the split and
    of the observed labels, the sha256 of every label file, and the recipe with its overrides."""
    import backbones
    import datasets

    cache = cfg.cache_dir
    if cfg.backbone_weights:
        backbone = _weights('--backbone-weights', cfg.backbone_weights, cache)
    elif cfg.init_from:
        backbone = _weights('--init-from', cfg.init_from, cache)
    elif cfg.model == 'clip_vision':
        backbone = {'name': f'the CLIP image tower ({cfg.clip_model} / {cfg.clip_pretrained})'}
    elif cfg.pretrained and backbones.pretrained_weights(cfg.model):
        backbone = _weights(backbones.pretrained_weights(cfg.model), published_weights_file('backbone', cfg.model), cache)
    else:
        backbone = {'name': 'random initialisation (the run\'s torch seed)'}
    clip = None
    if uses_clip or cfg.model == 'clip_vision' or heads_run.needs_clip(cfg):
        if Path(str(cfg.clip_pretrained)).is_file():
            clip = _weights(f'{cfg.clip_model} / local file', cfg.clip_pretrained, cache)
        else:
            clip = _weights(f'{cfg.clip_model} / {cfg.clip_pretrained}',
                            published_weights_file('clip', cfg.clip_model, cfg.clip_pretrained), cache)
    git = git or git_state()
    return {
        'git_commit': git['commit'], 'git_dirty': git['dirty'],
        'versions': library_versions(), 'device_name': device_name(device),
        'backbone_weights': backbone, 'clip_weights': clip,
        'image_size': cfg.image_size, 'split_seed': datasets.SPLIT_SEED, 'val_fraction': datasets.VAL_FRACTION,
        'numpy_seed': NUMPY_SEED, 'observed': cfg.observed or 'single positive',
        'data_files': {path.name: (sha256_file(path, cache) if path.is_file() else None) for path in data_files(cfg)},
        'input_files': {name: _file_record(getattr(cfg, name), cache) for name in INPUT_FILE_FIELDS
                        if getattr(cfg, name, None) and Path(str(getattr(cfg, name))).is_file()},
        'recipe': cfg.recipe, 'recipe_overrides': list(cfg.recipe_overrides),
    }


def changed_input_files(old: dict, new: dict, unused=()) -> list[str]:
    """'what FILE: sha256 a -> b' for each input file a resumed run reads on every epoch (the text features,
    prompts, priors, ... of INPUT_FILE_FIELDS, and the CLIP weights) whose content differs between the
    provenance the run recorded (`old`) and the one of the resume (`new`). --init-from and the backbone's
    weights only start a run, and a file of an `unused` setting is not read: they are not compared."""
    pairs = [(name, (old.get('input_files') or {}).get(name), (new.get('input_files') or {}).get(name))
             for name in INPUT_FILE_FIELDS if name != 'init_from' and name not in unused]
    pairs.append(('CLIP weights', old.get('clip_weights'), new.get('clip_weights')))
    out = []
    for name, before, now in pairs:
        if not (isinstance(before, dict) and isinstance(now, dict)) or None in (before.get('sha256'),
                                                                                 now.get('sha256')):
            continue  # not read, or not known to both: a changed flag is config.json's to compare
        if before['sha256'] != now['sha256']:
            out.append(f"{name.replace('_', '-') if name in INPUT_FILE_FIELDS else name} {now.get('file')}: "
                       f"sha256 {before['sha256'][:12]} -> {now['sha256'][:12]}")
    return out


# ----------------------------------------------------------------------------------------------
# What a run folder holds


@dataclass(frozen=True)
class RunStatus:
    """state: 'finished' (every planned epoch logged, the closing lines' values present),
    'interrupted' (stopped or still running: fewer epochs logged than planned), 'no finite mAP'
    (every epoch logged but no best val / test mAP), 'empty' (a folder without a complete epoch)
    or 'missing'; epochs_done / epochs: logged and planned epochs; why: one line for anything but
    finished."""
    state: str
    epochs_done: int = 0
    epochs: Optional[int] = None
    why: str = ''

    @property
    def finished(self) -> bool:
        return self.state == 'finished'


def json_or_none(path: Path):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def status_of(config: Optional[dict], log: Optional[dict], where: str = 'the run') -> RunStatus:
    """What a run's config.json and log.json (as dicts, None when unreadable) say about it. A run
    is finished when log.json covers the planned epochs (config.json's `epochs`, as log.json's
    `num_epochs`), every phase of every one of them is logged, and the best epoch with its finite
    val and test mAP (the original's closing lines) is there. The one definition of "finished"
    for sweep.py (skip it) and report.py (count it)."""
    if config is None:
        return RunStatus('empty', why=f'{where}: no readable config.json')
    epochs = config.get('epochs')
    if log is None:
        return RunStatus('empty', 0, epochs, f'{where}: no complete epoch (no log.json)')
    if not isinstance(epochs, int):  # a config.json without the planned epochs: log.json's
        epochs = log.get('num_epochs')
    logged = log.get('logged')
    if logged is None:  # a log.json written before `logged` existed: the epochs with a clean mAP
        logged = {phase: [v is not None for v in log.get('values', {}).get(phase, {}).get('map_clean', [])]
                  for phase in ('train', 'val', 'test')}
    phases = [list(logged.get(phase, [])) for phase in ('train', 'val', 'test')]
    done = 0
    while all(done < len(p) and p[done] for p in phases):
        done += 1
    if not isinstance(epochs, int) or log.get('num_epochs') != epochs or done < epochs:
        return RunStatus('interrupted', done, epochs, f'{where}: {done} of {epochs} epochs logged')
    if log.get('best_epoch') is None or not all(_finite(log.get(k)) for k in ('best_val_map', 'best_test_map')):
        return RunStatus('no finite mAP', done, epochs, f'{where}: log.json has no finite best val and test mAP')
    return RunStatus('finished', done, epochs)


def run_status(folder) -> RunStatus:
    """status_of the run folder's config.json and log.json ('missing' for no folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return RunStatus('missing', why=f'{folder}: no such run folder')
    return status_of(json_or_none(folder / 'config.json'), json_or_none(folder / 'log.json'), str(folder))


def open_tensorboard(cfg: Config, run_dir: Path):
    """A SummaryWriter under RUN_DIR/tensorboard with --tensorboard (an optional dependency)."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard') from None
    return SummaryWriter(str(run_dir / 'tensorboard'))

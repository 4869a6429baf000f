"""Checkpoints: atomic saving, the random states that make a resumed run exact, safe loading,
the one way back from a checkpoint to its classifier, and the settings a resumed run may not change.

A checkpoint (last.pt) holds: model, optimizer, epoch, config (dict), argv (the command line),
logger (TrainLogger state), method (the method object's state, methods.Method.state_dict), rng
(torch, CUDA, numpy, python and the training sampler's generator) and classnames. best.pt holds
model, epoch, config, argv, classnames and test_map. Both hold what rebuilding the classifier needs
beyond the config: SGRE's label embeddings and, for clip_vision, the CLIP architecture (`clip_config`,
the open_clip config as trained), so a checkpoint needs no other file. Everything is plain tensors and
Python types, so both load with torch.load(weights_only=True): a file that is not ours is refused,
never executed.

`rebuild_classifier` is the one way from a checkpoint back to its classifier (--evaluate, predict.py);
`check_fits` compares a checkpoint's classifier with a run's (--init-from), from the same reading of
the stored configuration (`stored_settings`, `architecture`), and then every weight's name and shape
with the run's classifier built on the meta device. All three build through `classifier_of`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import class_text_features
import backbones
import clip_loading
import heads_run
import models
import trunks
from config import DATASETS, RESUMABLE_CHANGES, Config, ModelLoadError, UserError, one_line
from distributed import is_primary, log
from files import claim_lock, save_npy, save_torch, try_lock

MAX_IMAGE_SIZE = 4096  # a stored input side beyond this is an edited or damaged checkpoint


def atomic_save(obj, path: Path) -> None:
    """np.save (arrays) or torch.save (everything else), atomically (files.replace_all): a
    checkpoint is never half-written, and Ctrl-C or a full disk keeps the previous one."""
    if isinstance(obj, np.ndarray):
        save_npy(path, obj)
    else:
        save_torch(path, obj)


def rng_state(sampler) -> dict:
    """Every random state of the process as tensors and plain types (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = dict(torch=torch.get_rng_state(), numpy_keys=torch.from_numpy(keys.astype(np.int64)),
                 numpy_rest=[kind, int(pos), int(has_gauss), float(cached)],
                 python=list(python_state), python_rest=[version, gauss], sampler=sampler.state())
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
    path = Path(path)
    if path.is_dir():
        if (path / 'config.json').is_file() or (path / 'best.pt').is_file():
            raise UserError(f'{path} is a run folder; pass {path / "best.pt"} (or last.pt)')
        raise UserError(f'{path} is a folder, not a checkpoint; pass RUN/best.pt of a run folder')
    if not path.is_file():
        raise UserError(f'{path}: no such checkpoint')
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a text file would "hold Python objects"
        with open(path, 'rb') as handle:
            zip_start = handle.read(4) == b'PK\x03\x04'
        raise UserError(f'{path}: ' + ('not a readable VLPL checkpoint, truncated or damaged (its zip archive is cut '
                                       'short); use another checkpoint (last.pt or best.pt of the run)' if zip_start
                                       else 'not a checkpoint (not a PyTorch zip archive); pass best.pt or last.pt '
                                       'of a run folder'))
    try:
        with warnings.catch_warnings():  # torch's note on an unusual pickle protocol says nothing to a user
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        # torch's message goes on to suggest weights_only=False, which would run the file's code:
        # not an option for a file that is not ours.
        raise UserError(f'{path}: not a VLPL checkpoint: it holds Python objects that a checkpoint written by '
                        'main_clip.py never holds, so it was not loaded (no code in it ran)') from None
    except Exception as e:  # a damaged archive fails in many ways inside torch (zip, unpickler, storage)
        reason = one_line(e)[:120]
        raise UserError(f'{path}: not a readable VLPL checkpoint, truncated or damaged ({reason}); '
                        'use another checkpoint (last.pt or best.pt of the run)') from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'epoch'} <= set(ckpt):
        raise UserError(f'{path}: not a VLPL checkpoint (missing model/config/epoch)')
    return ckpt


# ----------------------------------------------------------------------------------------------
# The one way back from a checkpoint


def stored_settings(ckpt: dict) -> SimpleNamespace:
    """The run settings a checkpoint stores (its `config`), with Config's defaults for settings added to
    Config after it was written (None for those without a default), as attributes (what
    heads_run.head_options reads)."""
    defaults = {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(Config)}
    return SimpleNamespace(**(defaults | dict(ckpt.get('config') or {})))


def architecture(settings, num_classes: int | None, clip: dict | None = None) -> dict:
    """What decides whether weights fit a classifier: classes, backbone, head and the head's sizes, and
    for clip_vision the CLIP architecture (`clip`, an open_clip config). `settings`: a Config or
    stored_settings."""
    arch = {'classes': num_classes, 'backbone': settings.model, 'head': settings.head,
            'input_norm': settings.input_norm}
    arch |= {name: getattr(settings, name) for name in heads_run.HEAD_SIZES.get(settings.head, ())}
    if settings.model == 'clip_vision' and clip is not None:
        arch['clip'] = {k: v for k, v in clip.items() if k != 'quick_gelu'}  # no weights of its own
    return arch


def describe(settings, arch: dict, shown=()) -> str:
    """'demo, 30 classes, small_cnn/linear', plus the head sizes named in `shown` (those that differ)."""
    def known(value):
        return '?' if value is None else value
    text = (f'{known(settings.dataset)}, {known(arch["classes"])} classes, '
            f'{known(arch["backbone"])}/{known(arch["head"])}')
    extra = [f'--{k.replace("_", "-")} {arch.get(k)}' for k in shown if k not in ('classes', 'backbone', 'head', 'clip')]
    if 'clip' in shown:
        extra.append(f'CLIP {settings.clip_model}')
    return text + (f' ({", ".join(extra)})' if extra else '')


def clip_entries(cfg: Config, model) -> dict:
    """clip_vision: the checkpoint entry `clip_config` ({'name', 'config'}: the open_clip config of the
    trained tower, QuickGELU as it was built, e.g. forced by an 'openai' tag), so that rebuilding needs
    neither the --clip-model file nor the tag. {} for other backbones."""
    if cfg.model != 'clip_vision':
        return {}
    config = clip_loading.clip_config(cfg.clip_model)
    config['quick_gelu'] = any(type(m).__name__ == 'QuickGELU' for m in model.trunk.modules())
    return {'clip_config': {'name': Path(str(cfg.clip_model)).stem, 'config': config}}


def _stored_clip(ckpt: dict, settings, where: str) -> dict:
    """The CLIP architecture of a clip_vision checkpoint: stored, or (a checkpoint written before it was
    stored) read from its --clip-model now, QuickGELU as its pretrained tag forced it."""
    if isinstance(ckpt.get('clip_config'), dict):
        return ckpt['clip_config']['config']
    try:
        config = clip_loading.clip_config(settings.clip_model)
    except ModelLoadError as e:
        raise UserError(f'{where}: this clip_vision checkpoint predates stored CLIP configs and its CLIP config is '
                        f'not at hand ({one_line(e)}); put the --clip-model file back where it was') from None
    import open_clip

    tag = str(settings.clip_pretrained or '')
    try:
        forced = bool(open_clip.get_pretrained_cfg(settings.clip_model, tag).get('quick_gelu', False))
    except Exception:  # a local file or an unknown name: the config says it
        forced = False
    return config | ({'quick_gelu': True} if forced else {})


def _clip_architecture_model(config: dict, device='cpu'):
    """A randomly initialised open_clip model of `config` (the checkpoint then fills every weight),
    registered under a name of its own so that no built-in config of open_clip is replaced."""
    text = json.dumps(config, sort_keys=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f'vlpl-checkpoint-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json'
        path.write_text(text)
        return clip_loading.load_clip(str(path), None, device=device)[0]


def classifier_of(settings, num_classes: int, *, clip: dict | None = None, clip_model=None, embeddings=None,
                  device=None) -> torch.nn.Module:
    """The randomly initialised classifier `settings` (a Config or stored_settings) describes: backbone at
    its input size (a ViT's pos_embed, a Swin's windows), head and every head size, input normalisation,
    BoostLU's CAM scaling, SGRE's label `embeddings` (K x E). clip_vision's tower is `clip_model`, else one
    of the open_clip config `clip`. No weights are downloaded and nothing is drawn from the caller's
    generators. device: where the tensors are made (None: torch's default device, the CPU unless a caller's
    `with torch.device(...)` says otherwise); 'meta': names and shapes only, in milliseconds and no memory
    (the --init-from check at start). The one builder behind rebuild_classifier, check_fits and
    --init-from's model."""
    with torch.random.fork_rng(devices=[]), (torch.device(device) if device else contextlib.nullcontext()):
        if settings.model == 'clip_vision' and clip_model is None:
            clip_model = _clip_architecture_model(clip, device or torch.get_default_device())
        boost = settings.boostlu_alpha if settings.boostlu else None
        return models.build_classifier(settings.model, num_classes, pretrained=False, clip_model=clip_model,
                                       head=settings.head, cam_boost=boost, image_size=settings.image_size,
                                       input_norm=settings.input_norm, **heads_run.head_options(settings, embeddings))


@dataclasses.dataclass
class Rebuilt:
    model: torch.nn.Module        # in eval mode, on the CPU
    classnames: list[str]
    image_size: int
    settings: SimpleNamespace     # stored_settings(ckpt)


def rebuild_classifier(ckpt: dict, where: str) -> Rebuilt:
    """The classifier a checkpoint holds, from what it stores alone (backbone, head and every head size,
    input size, class names, SGRE's label embeddings, the CLIP architecture of clip_vision): no dataset,
    no download, no other file. The one way back from a checkpoint (--evaluate, predict.py).

    Checkpoints written before class names were stored take text_features/<dataset>_classnames.txt.
    `where` names the checkpoint in messages. Raises UserError (one line) when the checkpoint does not
    describe a classifier of this code, its input size is implausible, or its weights do not fit.
    """
    s = stored_settings(ckpt)
    try:
        backbones.backbone(str(s.model))
    except ValueError:
        raise UserError(f'{where}: the checkpoint names backbone {s.model!r}, which this code does not know '
                        f'(known: {", ".join(sorted(backbones.BACKBONES))}, timm:NAME)') from None
    if s.head not in models.HEADS:
        raise UserError(f'{where}: the checkpoint names head {s.head!r}, which this code does not know '
                        f'(known: {", ".join(sorted(models.HEADS))})')
    size = s.image_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise UserError(f'{where}: its image_size {size!r} is no input size (1 to {MAX_IMAGE_SIZE}): the file was '
                        'edited or damaged; use the run\'s own best.pt or last.pt')
    classnames = ckpt.get('classnames')
    if classnames is None:
        try:
            classnames = class_text_features.read_classnames(s.dataset or '', data_root=s.data_root)
        except ModelLoadError:
            raise UserError(f'{where}: the checkpoint holds no class names and its dataset '
                            f'{getattr(s, "dataset", None)!r} has no text_features/<dataset>_classnames.txt') from None
        log.warning(f'note: checkpoint without class names; using those of dataset {s.dataset!r}')
    classnames = [str(c) for c in classnames]
    clip = _stored_clip(ckpt, s, where) if s.model == 'clip_vision' else None
    model = classifier_of(s, len(classnames), clip=clip, embeddings=heads_run.label_embeddings(s, None, None,
                                                                                               len(classnames), ckpt))
    problem = trunks.state_dict_mismatch(model.state_dict(), ckpt['model'])
    if problem:
        arch = architecture(s, len(classnames))
        raise UserError(f'{where}: its weights do not fit the classifier it describes ({describe(s, arch)}): '
                        f'{problem}')
    model.load_state_dict(ckpt['model'])
    return Rebuilt(model.eval(), classnames, size, s)


def check_fits(ckpt: dict, cfg: Config, classnames: list[str], where: str) -> None:
    """--init-from: the checkpoint's classifier (classes, backbone, head and its sizes, CLIP architecture)
    is the one this run builds, checked before any expensive work; else one line naming both, e.g.
    'checkpoint: demo, 30 classes, small_cnn/linear; this run: pascal, 20 classes, small_cnn/q2l'. Then
    every weight's name and shape against the run's classifier built on the meta device (classifier_of),
    so that a shape the settings do not name (a ViT's pos_embed at another --image-size) is refused
    here too, naming the first key that differs and both shapes."""
    s = stored_settings(ckpt)
    stored_names = ckpt.get('classnames')
    both_clip = cfg.model == s.model == 'clip_vision'
    theirs = architecture(s, None if stored_names is None else len(stored_names),
                          _stored_clip(ckpt, s, where) if both_clip else None)
    mine = architecture(cfg, len(classnames), clip_loading.clip_config(cfg.clip_model) if both_clip else None)
    # (a checkpoint without class names: its weights' shapes tell, when they are loaded)
    differ = [k for k in mine if theirs.get(k) != mine[k] and not (k == 'classes' and theirs[k] is None)]
    if differ:
        if theirs['head'] != mine['head']:  # the sizes of two different heads say nothing more
            differ = [k for k in differ if k in ('classes', 'backbone', 'head', 'clip')]
        raise UserError(f'{where}: its model does not fit this run (checkpoint: {describe(s, theirs, differ)}; '
                        f'this run: {describe(cfg, mine, differ)}); start from a checkpoint of the same classes, '
                        'backbone and head')
    if stored_names is not None and [str(c) for c in stored_names] != [str(c) for c in classnames]:
        raise UserError(f'{where}: its {len(classnames)} classes are not this run\'s (checkpoint: {s.dataset}, '
                        f'{", ".join(map(str, stored_names[:2]))}, ...; this run: {cfg.dataset}, '
                        f'{", ".join(classnames[:2])}, ...); start from a checkpoint of the same classes')
    # Every weight's name and shape, which the settings above do not all decide (a ViT's pos_embed
    # follows --image-size): the run's classifier on the meta device, before any CLIP work.
    clip = clip_loading.clip_config(cfg.clip_model) if cfg.model == 'clip_vision' else None
    run_model = classifier_of(cfg, len(classnames), clip=clip, embeddings=_embeddings_shaped(cfg, len(classnames)),
                              device='meta')
    problem = trunks.state_dict_mismatch(run_model.state_dict(), ckpt['model'])
    if problem:
        sizes = (f' (checkpoint: --image-size {s.image_size}; this run: --image-size {cfg.image_size})'
                 if s.image_size != cfg.image_size else '')
        raise UserError(f'{where}: its weights do not fit this run\'s classifier: {problem}{sizes}')


def _embeddings_shaped(cfg: Config, num_classes: int):
    """SGRE's label embeddings as this run will have them, or (when its CLIP computes them) zeros of
    their K x E shape, which is all the meta-device check needs; None for other heads."""
    if not heads_run.needs_clip(cfg):
        return heads_run.label_embeddings(cfg, None, None, num_classes)
    return np.zeros((num_classes, clip_loading.clip_config(cfg.clip_model)['embed_dim']), np.float32)


def config_differences(old: dict, new: Config, *, more_epochs_ok: bool = False) -> list[str]:
    """'name: old -> new' for every setting that differs and that a resumed run may not change.

    A setting added to Config after the checkpoint was written counts as its default there. A CLIP
    checkpoint path derived from --data-root (the demo's) follows a moved data folder.
    more_epochs_ok: a larger --epochs is allowed (the method's schedule does not use the total).
    """
    new_d = dataclasses.asdict(new)
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    old = {**defaults, **old}
    template = DATASETS[new.dataset].clip_pretrained if new.dataset in DATASETS else ''
    if '{data_root}' in template and old.get('clip_pretrained') == template.format(data_root=old.get('data_root')) \
            and new.clip_pretrained == template.format(data_root=new.data_root):
        old['clip_pretrained'] = new.clip_pretrained
    if more_epochs_ok and isinstance(old.get('epochs'), int) and new.epochs > old['epochs']:
        old['epochs'] = new.epochs
    return [f'{k}: {old.get(k)!r} -> {new_d[k]!r}' for k in new_d
            if k not in RESUMABLE_CHANGES and old.get(k) != new_d[k]]


class RunFolder:
    """The folder of one run, from the checks before the run to its first checkpoint.

    - Locked for the whole run (a POSIX lock on results_dir/.<name>.lock, which the kernel releases
      when the process ends, however it ends; POSIX locks also hold across the nodes of a shared
      NFS file system): a second run of the same name refuses in one line naming the holder. The
      lock file goes when the run leaves no folder (it never started, or failed before its first
      checkpoint).
    - Created only when the run starts writing (`create`), so a failed start leaves nothing behind;
      a run that fails before its first checkpoint removes the folder it created.
    - `overwrite`: an existing run folder is moved aside (.<name>.replaced) when the new run starts
      writing and deleted once the new run's first checkpoint exists (`committed`); if the new run
      fails before that, the old folder is put back. A run killed before that (SIGKILL, power loss)
      cannot put it back itself: the next start of the same name does (`_recover`), before anything
      else, so the finished run is never lost to a later --overwrite.
    """

    def __init__(self, path: Path, *, resuming: bool, overwrite: bool = False):
        self.path = Path(path)
        self.resuming, self.overwrite = resuming, overwrite
        self.created = False
        self.aside: Path | None = None
        self._lock = None

    @property
    def replaced(self) -> Path:
        """Where --overwrite keeps the replaced run until the new run's first checkpoint."""
        return self.path.with_name(f'.{self.path.name}.replaced')

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f'.{self.path.name}.lock')

    def __enter__(self) -> 'RunFolder':
        ensure_writable(self.path.parent, '--results-dir')
        try:
            if is_primary():  # one lock per run, held by the process that writes its files
                self._acquire()
                self._recover()
            # (another rank may look before rank 0 has put a replaced run back: it counts as a run)
            holds_run = (self.path / 'last.pt').exists() or (self.replaced / 'last.pt').exists()
            if not self.resuming and holds_run and not self.overwrite:
                raise UserError(f'{self.path} already holds a run: continue it with --resume {self.path}, '
                                'replace it with --overwrite, or choose another --run-name')
        except BaseException:
            self._release()
            raise
        return self

    def _acquire(self) -> None:
        for _ in range(3):
            handle, holder = try_lock(self.lock_path)
            if handle is None:
                raise UserError(f'{self.path} is in use by another run ({holder}); wait for it to end or choose '
                                'another --run-name')
            try:  # a run that ended meanwhile may have removed the file we locked: lock the new one
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        else:
            raise UserError(f'{self.lock_path}: could not be locked (removed and created again by other runs); '
                            'start the run again')
        claim_lock(handle)
        self._lock = handle

    def _recover(self) -> None:
        """Settle what an --overwrite run killed before its first checkpoint left (under the lock)."""
        if not self.replaced.exists():
            return
        if (self.path / 'last.pt').exists():  # the new run checkpointed and was stopped before `committed`
            shutil.rmtree(self.replaced)
            log.warning(f'note: removed {self.replaced}, the run that --overwrite replaced: {self.path} has '
                        'since written its first checkpoint')
            return
        if self.path.exists():  # the replacing run's folder, without a checkpoint: nothing to keep
            shutil.rmtree(self.path)
        self.replaced.rename(self.path)
        log.warning(f'note: restored {self.path} from {self.replaced}: an --overwrite run of it was stopped '
                    'before its first checkpoint')

    def create(self) -> Path:
        """Make the folder (moving an old run aside under --overwrite); idempotent."""
        if self.overwrite and not self.resuming and self.path.exists() and self.aside is None:
            if self.replaced.exists():  # _recover settled it under the lock: never delete a run here
                raise UserError(f'{self.replaced} holds an earlier run: move it away, then start again')
            self.path.rename(self.replaced)
            self.aside = self.replaced
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created = True
        return self.path

    def committed(self) -> None:
        """The first checkpoint of this run exists: the replaced run may go."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not (self.path / 'last.pt').exists():
            if self.created:
                shutil.rmtree(self.path, ignore_errors=True)
            if self.aside is not None:
                self.aside.rename(self.path)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            if not self.path.exists():  # no run here: no lock file either (removed while still held)
                self.lock_path.unlink(missing_ok=True)
            self._lock.close()  # releases the lock
            self._lock = None


def ensure_writable(folder: Path, flag: str) -> None:
    """Fail before training, not after the first epoch, when a folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f'.write-test-{os.getpid()}'
        probe.write_bytes(b'ok')
        probe.unlink()
    except OSError as e:
        raise UserError(f'cannot write to {folder}: {e.strerror}; choose a writable {flag}') from None

"""Checkpoints: atomic saving, the random states that make a resumed run exact, safe loading,
and the settings a resumed run may not change.

A checkpoint (last.pt) holds: model, optimizer, epoch, config (dict), argv (the command line),
logger (TrainLogger state), method (the method object's state, methods.Method.state_dict), rng
(torch, CUDA, numpy, python and the training sampler's generator) and classnames. best.pt holds
model, epoch, config, argv, classnames and test_map. Everything is plain tensors and Python types,
so both load with torch.load(weights_only=True): a file that is not ours is refused, never executed.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import pickle
import random
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np
import torch

from config import DATASETS, RESUMABLE_CHANGES, Config, UserError, one_line
from distributed import is_primary, log
from files import save_npy, save_torch


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
    if not path.is_file():
        raise UserError(f'{path}: no such checkpoint')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        # torch's message goes on to suggest weights_only=False, which would run the file's code:
        # not an option for a file that is not ours.
        raise UserError(f'{path}: not a VLPL checkpoint: it holds Python objects that a checkpoint written by '
                        'main_clip.py never holds, so it was not loaded (no code in it ran)') from None
    except Exception as e:  # a damaged archive fails in many ways inside torch (zip, unpickler, storage)
        reason = one_line(e)[:120] if zipfile.is_zipfile(path) else 'not a PyTorch zip archive'
        raise UserError(f'{path}: not a readable VLPL checkpoint, truncated or damaged ({reason}); '
                        'use another checkpoint (last.pt or best.pt of the run)') from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'epoch'} <= set(ckpt):
        raise UserError(f'{path}: not a VLPL checkpoint (missing model/config/epoch)')
    return ckpt


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
            handle = open(self.lock_path, 'a+')
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or 'unknown'
                handle.close()
                raise UserError(f'{self.path} is in use by another run ({holder}); wait for it to end or choose '
                                'another --run-name') from None
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
        handle.seek(0)
        handle.truncate()
        handle.write(f'host {socket.gethostname()}, pid {os.getpid()}\n')
        handle.flush()
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

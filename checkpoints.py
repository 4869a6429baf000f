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
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from config import RESUMABLE_CHANGES, Config, UserError, one_line
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
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f'{path}: not a readable VLPL checkpoint ({one_line(e)[:200]})') from None
    if not isinstance(ckpt, dict) or not {'model', 'config', 'epoch'} <= set(ckpt):
        raise UserError(f'{path}: not a VLPL checkpoint (missing model/config/epoch)')
    return ckpt


def config_differences(old: dict, new: Config) -> list[str]:
    """'name: old -> new' for every setting that differs and that a resumed run may not change.
    A setting added to Config after the checkpoint was written counts as its default there."""
    new_d = dataclasses.asdict(new)
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}
    old = {**defaults, **old}
    return [f'{k}: {old.get(k)!r} -> {new_d[k]!r}' for k in new_d
            if k not in RESUMABLE_CHANGES and old.get(k) != new_d[k]]

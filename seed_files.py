"""The seed systems' files (CSL, Query2Label, SGRE, CCD) read as data: a published checkpoint weights-only
(`read_file`), an original's run settings (`read_config`), and the state dicts inside them.

A checkpoint is read with torch.load(weights_only=True), only the harmless globals that the published files
hold allowed: a file holding anything else is refused without running any of it. The helpers below take a
state dict out of the originals' wrappings (`module.` prefixes) and read its layout (blocks per stage, tensor
sizes) for seed_trunks.py and seed_checkpoints.py (docs/seed-checkpoints.md).
"""
from __future__ import annotations

import collections
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from config import UserError, one_line


class CheckpointImportError(UserError):
    """A file that cannot be imported as the named kind; one line naming the file and what to do."""


# ----------------------------------------------------------------------------------------------
# Reading the originals' files


def _harmless_globals() -> dict:
    """Python globals the originals' files hold beside tensors and plain containers, with what reads them
    as data: numpy scalars and dtypes (Query2Label's best_mAP is numpy's), argparse.Namespace, and CCD's
    settings P, a munch.Munch (a dict subclass, read as an OrderedDict without the munch package)."""
    import argparse

    core = np._core if hasattr(np, '_core') else np.core
    table = {'argparse.Namespace': argparse.Namespace, 'munch.Munch': collections.OrderedDict,
             'numpy.dtype': np.dtype}
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        table[f'{module}.scalar'] = core.multiarray.scalar
    for name in dir(np.dtypes):
        if name.endswith('DType'):
            table[f'numpy.dtypes.{name}'] = getattr(np.dtypes, name)
    return table


def read_file(path: Path) -> object:
    """The object in a published checkpoint file, read with torch.load(weights_only=True) and, where the
    file names them, the harmless globals above allowed: a file holding anything else is refused
    without running any of it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointImportError(f'{path} is a folder: pass the checkpoint file inside it')
    if not path.is_file():
        raise CheckpointImportError(f'{path}: no such file')
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as handle:
            start = handle.read(4)
        if start == b'PK\x03\x04':
            raise CheckpointImportError(f'{path}: not a readable PyTorch checkpoint (its zip archive is cut short or '
                                        'damaged); download it again')
        if start[:1] != b'\x80':  # torch.save writes a zip archive, before torch 1.6 a pickle
            raise CheckpointImportError(f'{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)')
    table = _harmless_globals()
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if zipfile.is_zipfile(path) else []
    except Exception:  # a damaged archive: torch.load below says why
        found = []
    refused = [name for name in found if name not in table]
    if refused:
        raise CheckpointImportError(f'{path}: it holds Python objects that no published checkpoint of the seed systems '
                                    f'holds ({refused[0]}), so it was not loaded (no code in it ran)')
    try:
        with torch.serialization.safe_globals([(value, name) for name, value in table.items()]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointImportError(f'{path}: it holds Python objects that no published checkpoint of the seed '
                                    'systems holds, so it was not loaded (no code in it ran)') from None
    except Exception as e:  # truncated, not a torch file, ...
        raise CheckpointImportError(f'{path}: not a readable PyTorch checkpoint ({one_line(e)[:120]})') from None


def without_module_prefix(state: dict) -> dict:
    """A state dict without the `module.` prefixes of DistributedDataParallel and ModelEma wrappers."""
    while state and all(isinstance(k, str) and k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def blocks_per_stage(state: dict, pattern: str, stages) -> tuple[int, ...]:
    """Blocks per stage: the distinct block indices of keys matching pattern.format(stage) + r'(\\d+)\\.'."""
    counts = []
    for stage in stages:
        regex = re.compile(re.escape(pattern.format(stage)) + r'(\d+)\.')
        counts.append(len({m.group(1) for k in state for m in [regex.match(k)] if m}))
    return tuple(counts)


def size_of(value: torch.Tensor, dim: int) -> int:
    return int(value.shape[dim])


def read_config(path: Path) -> dict:
    """An original's run settings: Query2Label's config JSON (q2l_infer.py --config) or SGRE's config.yaml
    (lib/util.py prepare_env writes one `key: value` line per setting)."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except OSError as e:
        raise CheckpointImportError(f'--config {path}: cannot read it ({e.strerror or e})') from None
    try:
        if path.suffix == '.json':
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise CheckpointImportError(f'--config {path}: not a readable settings file ({one_line(e)[:120]})') from None
    if not isinstance(data, dict):
        raise CheckpointImportError(f'--config {path}: holds no settings (key: value)')
    return data

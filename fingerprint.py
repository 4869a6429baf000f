"""The fingerprint of a run's inputs: what `--resume`, the image packs and the frozen-CLIP embedding
cache compare to notice data that changed under them (docs/input-pipeline.md, "Inputs that change").

Cheap enough for millions of images, because no image is read: each image contributes its size and
modification time (one os.stat, the call datasets.check_images makes anyway), and each formatted
array of a split (image list, labels, observed labels) the sha256 of its bytes as loaded. A picture
rewritten in place gets a new modification time; a copy that keeps the times (`cp -a`, `rsync -a`)
is the same data. Not seen: a file rewritten with the same size within the file system's time
resolution, or whose time was set back by hand.

A fingerprint is plain types and int64 tensors, so it is stored in last.pt (weights_only loading):

    {'format': 1,
     'arrays': {'train/images': {'file': 'formatted_train_images.npy', 'sha256': ..., 'rows': N}, ...},
     'stats': {'train': N x 2 int64 tensor (size, mtime_ns), 'val': ..., 'test': ...}}
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import torch

FORMAT = 1
MISSING = -1  # size and time of an image that is not a regular file


def image_stats(root, images) -> np.ndarray:
    """(N, 2) int64: st_size and st_mtime_ns of root/images[i], or (-1, -1) where it is not a regular file."""
    out = np.full((len(images), 2), MISSING, dtype=np.int64)
    folder = os.fspath(root)
    for i, name in enumerate(images):
        try:
            st = os.stat(os.path.join(folder, str(name)))
        except (OSError, ValueError):  # missing, unreadable folder, or a name with a NUL byte
            continue
        if stat.S_ISREG(st.st_mode):
            out[i] = st.st_size, st.st_mtime_ns
    return out


def digest(*arrays) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (C order). A lazily read table (label_tables.
    Annotations, OpenImages' millions of rows) is hashed block by block, never copied whole; its digest
    equals that of the same array in memory."""
    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, 'row_blocks'):
            h.update(f'{a.dtype.str}{a.shape};'.encode())
            for _, _, block in a.row_blocks():
                h.update(np.ascontiguousarray(block).tobytes())
            continue
        a = np.ascontiguousarray(a)
        h.update(f'{a.dtype.str}{a.shape};'.encode())
        h.update(a.tobytes())
    return h.hexdigest()


def changed_rows(before: np.ndarray, now: np.ndarray, *, present_only: bool = False) -> np.ndarray:
    """Rows whose (size, mtime) differ; with present_only, only among images that exist now."""
    changed = (np.asarray(before) != np.asarray(now)).any(axis=1)
    if present_only:
        changed &= np.asarray(now)[:, 0] != MISSING
    return np.flatnonzero(changed)


def of_run(splits: dict, stats: dict, sources: dict) -> dict:
    """The fingerprint of a run: splits {phase: datasets.Split}, stats {phase: (N, 2) image_stats of
    the pixels the run reads}, sources {phase: {field: formatted file it was loaded from}}
    (datasets.source_files; a field that is None, an optional file absent, is recorded as such)."""
    arrays = {}
    for phase, fields in sources.items():
        if phase not in splits:
            continue
        for field, file in fields.items():
            value = getattr(splits[phase], field)  # None: an optional file that is absent
            arrays[f'{phase}/{field}'] = {'file': file, 'sha256': None if value is None else digest(value),
                                          'rows': 0 if value is None else int(len(value))}
    return {'format': FORMAT, 'arrays': arrays,
            'stats': {phase: torch.from_numpy(np.asarray(s, dtype=np.int64)) for phase, s in stats.items()}}


def summary(fingerprint: dict) -> dict:
    """What config.json records of it: the number of images per split and one digest of everything."""
    stats = {phase: np.asarray(s) for phase, s in fingerprint['stats'].items()}
    everything = sorted((k, str(v['sha256'])) for k, v in fingerprint['arrays'].items())
    return {'images': {phase: len(s) for phase, s in stats.items()},
            'sha256': digest(np.array([f'{k}={v}' for k, v in everything]), *(stats[p] for p in sorted(stats)))}


def differences(before: dict, now: dict, images_of: dict) -> list[str]:
    """What changed between two fingerprints: one phrase naming the formatted files that differ (with
    the splits whose size changed), one counting the images that changed.

    images_of: {phase: (image folder, image names)} to name the first changed image."""
    out, files, resized, lists_differ = [], [], [], set()
    for key, entry in now['arrays'].items():
        old = before['arrays'].get(key)
        if old is not None and old['sha256'] == entry['sha256']:
            continue
        phase, field = key.split('/')
        if field == 'images':
            lists_differ.add(phase)
            if old is not None and old['rows'] != entry['rows']:
                resized.append(f'{phase} split: {entry["rows"]} images, was {old["rows"]}')
        if entry['file'] not in files:
            files.append(entry['file'])
    if files:
        names = files[0] if len(files) == 1 else ', '.join(files[:-1]) + ' and ' + files[-1]
        out.append(f'{names} differ{"s" if len(files) == 1 else ""} from the run\'s'
                   + (f' ({"; ".join(resized)})' if resized else ''))
    count, first = 0, None
    for phase, stats in now['stats'].items():
        old = before['stats'].get(phase)
        if phase in lists_differ or old is None or tuple(old.shape) != tuple(stats.shape):
            continue
        rows = changed_rows(np.asarray(old), np.asarray(stats))
        if len(rows) and first is None:
            folder, names = images_of[phase]
            first = Path(folder) / str(names[rows[0]])
        count += len(rows)
    if count:
        out.append(f'{count} image{"s" if count > 1 else ""} changed, appeared or went missing since the run '
                   f'started (first: {first})')
    return out

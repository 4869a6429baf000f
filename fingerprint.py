"""The fingerprint of a run's inputs: what `--resume`, the image packs and the frozen-CLIP embedding
cache compare to notice data that changed under them (docs/input-pipeline.md, "Inputs that change").

Cheap enough for millions of images, because no image is read: each image contributes its size and
modification time (one os.stat, the call datasets.check_images makes anyway), and each formatted
array of a split (image list, labels, observed labels) the sha256 of its bytes as loaded. A picture
rewritten in place gets a new modification time; a copy that keeps the times (`cp -a`, `rsync -a`)
is the same data. Not seen: a file rewritten with the same size within the file system's time
resolution, or whose time was set back by hand.

An annotation table read from its file (label_tables.Annotations: OpenImages, millions of rows x
9,605 classes) is not read at all at start: its digest is that of the stored file's sha256
(sha256_file, cached in <cache dir>/sha256.json by path, size and modification time, the cache the
run's provenance uses for the same file) with the rows the split selects. Each file is hashed at most
once per start (its train and val splits and its observed labels share it), and not again while it
keeps its size and time. Fingerprints written before (format 1) hashed such a table as loaded; a
resume compares with those the same way (as_recorded).

A fingerprint is plain types and int64 tensors, so it is stored in last.pt (weights_only loading):

    {'format': 2,
     'arrays': {'train/images': {'file': 'formatted_train_images.npy', 'sha256': ..., 'rows': N}, ...,
                'train/labels_true': {..., 'digest': 'stored file'}  (an annotation table, see above)},
     'stats': {'train': N x 2 int64 tensor (size, mtime_ns), 'val': ..., 'test': ...}}
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import torch

from files import save_json

FORMAT = 2
MISSING = -1  # size and time of an image that is not a regular file
SHA256_CACHE = 'sha256.json'
STORED_FILE = 'stored file'  # an array entry digested from its stored file's sha256 (format 2)


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


def sha256_file(path, cache_dir=None) -> str:
    """sha256 of a file. With cache_dir, remembered in <cache_dir>/sha256.json by (absolute path,
    size, modification time in ns), so a sweep hashes a 1 GB weights file once, not once per run;
    a changed file (other size or time) is hashed again. Concurrent writers may drop each other's
    entries: harmless, the file is hashed again next time."""
    path = Path(path).resolve()
    st = path.stat()
    key = f'{path}|{st.st_size}|{st.st_mtime_ns}'
    cache_path = Path(cache_dir) / SHA256_CACHE if cache_dir else None
    cache = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        if isinstance(cache, dict) and isinstance(cache.get(key), str):
            return cache[key]
    h = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 22), b''):
            h.update(block)
    value = h.hexdigest()
    if cache_path is not None:
        try:
            save_json(cache_path, {**(cache if isinstance(cache, dict) else {}), key: value}, indent=0)
        except OSError:
            pass  # an unwritable cache only costs a second hash later
    return value


def _stored_table_digest(table, file_sha256: str) -> str:
    """The digest of an annotation table read from its file: the file's sha256, the table's shape and
    the stored rows it selects (all of them, or a train / val cut)."""
    h = hashlib.sha256(f'{table.dtype.str}{table.shape};file {file_sha256};rows '.encode())
    rows = table.stored_rows
    h.update(b'all' if rows is None else np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()


def changed_rows(before: np.ndarray, now: np.ndarray, *, present_only: bool = False) -> np.ndarray:
    """Rows whose (size, mtime) differ; with present_only, only among images that exist now."""
    changed = (np.asarray(before) != np.asarray(now)).any(axis=1)
    if present_only:
        changed &= np.asarray(now)[:, 0] != MISSING
    return np.flatnonzero(changed)


def of_run(splits: dict, stats: dict, sources: dict, cache_dir=None) -> dict:
    """The fingerprint of a run: splits {phase: datasets.Split}, stats {phase: (N, 2) image_stats of
    the pixels the run reads}, sources {phase: {field: formatted file it was loaded from}}
    (datasets.source_files; a field that is None, an optional file absent, is recorded as such).
    cache_dir: where sha256_file remembers the stored tables' sha256 (None: hashed once per call)."""
    arrays, files = {}, {}
    for phase, fields in sources.items():
        if phase not in splits:
            continue
        for field, file in fields.items():
            value = getattr(splits[phase], field)  # None: an optional file that is absent
            entry = {'file': file, 'sha256': None, 'rows': 0 if value is None else int(len(value))}
            if getattr(value, 'file', None) is not None:  # an annotation table: its file is hashed, not read
                if value.file not in files:
                    files[value.file] = sha256_file(value.file, cache_dir)
                entry |= {'file': Path(value.file).name, 'sha256': _stored_table_digest(value, files[value.file]),
                          'digest': STORED_FILE}  # the file it is read from (an annotated dataset's labels_obs)
            elif value is not None:
                entry['sha256'] = digest(value)
            arrays[f'{phase}/{field}'] = entry
    return {'format': FORMAT, 'arrays': arrays,
            'stats': {phase: torch.from_numpy(np.asarray(s, dtype=np.int64)) for phase, s in stats.items()}}


def summary(fingerprint: dict) -> dict:
    """What config.json records of it: the number of images per split and one digest of everything."""
    stats = {phase: np.asarray(s) for phase, s in fingerprint['stats'].items()}
    everything = sorted((k, str(v['sha256'])) for k, v in fingerprint['arrays'].items())
    return {'images': {phase: len(s) for phase, s in stats.items()},
            'sha256': digest(np.array([f'{k}={v}' for k, v in everything]), *(stats[p] for p in sorted(stats)))}


def as_recorded(before: dict, now: dict, splits: dict) -> dict:
    """`now` with each annotation table that `before` (a format 1 fingerprint) digested as loaded
    digested that way too, so that differences() compares like with like: a run started before
    format 2 resumes on the same data (at the cost of one pass over those tables, once)."""
    arrays = dict(now['arrays'])
    for key, entry in now['arrays'].items():
        old = before['arrays'].get(key)
        if entry.get('digest') == STORED_FILE and old is not None and old.get('digest') != STORED_FILE:
            phase, field = key.split('/')
            arrays[key] = {k: v for k, v in entry.items() if k != 'digest'} | {
                'sha256': digest(getattr(splits[phase], field))}
    return now | {'arrays': arrays}


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

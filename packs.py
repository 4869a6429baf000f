"""Image packs (--data-format packed, docs/input-pipeline.md): every image of a split resized once,
stored as one uint8 array file, and read back without decoding.

A pack of split P (train, val, test; the splits of datasets.load_splits, rows in split order) at
size S is two files in ``<data_root>/<dataset>/packed/``:

  ``P.npy``   N x S x S x 3 uint8 (numpy format, read memory-mapped): row i is
              image_io.resized_pixels of image i, the pixels the PIL pipeline normalises
  ``P.json``  its stamp: format, dataset, split, image_size, num_images, the image list and the
              sha256 of the list, every image's size and modification time when it was packed
              (fingerprint.image_stats) and their sha256, and the rows whose image could not be read
              (--skip-bad-images)

Writing (`write_pack`) goes to ``.P.npy.partial``, allocated in full on disk before the first row
(a full disk is one line at the start, never a SIGBUS in the middle), with a stamp
``.P.json.partial`` that records the rows written so far (after a flush); a run that is
interrupted, or stopped by a full disk, continues from there, and the pack is renamed into place
only when complete. Images rewritten after packing are re-packed (only those rows) by the next
`write_pack`, and refused by a run until then (`open_pack`). A pack of another size is never
mixed in: a pack or a partial pack of size S' != S is refused (--overwrite replaces it).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import datasets
import fingerprint
import image_dataset
import image_io
from config import UserError
from datasets import DataError, Split
from files import save_json

FORMAT = 'vlpl-pack-2'  # 2: the images' sizes and times (vlpl-pack-1 had none)
SAME = ('format', 'image_size', 'num_images', 'images_sha256')  # the same pack, maybe of older images
SPLITS = ('train', 'val', 'test')


def pack_dir(data_root, dataset: str) -> Path:
    return Path(data_root) / dataset / 'packed'


def pack_paths(data_root, dataset: str, split: str) -> tuple[Path, Path]:
    """(array file, stamp file) of a complete pack."""
    folder = pack_dir(data_root, dataset)
    return folder / f'{split}.npy', folder / f'{split}.json'


def partial_paths(data_root, dataset: str, split: str) -> tuple[Path, Path]:
    folder = pack_dir(data_root, dataset)
    return folder / f'.{split}.npy.partial', folder / f'.{split}.json.partial'


def images_sha(images) -> str:
    return hashlib.sha256('\n'.join(str(p) for p in images).encode('utf-8')).hexdigest()


def pack_command(dataset: str, image_size: int, data_root, *, overwrite: bool = False) -> str:
    root = '' if Path(data_root).resolve() == (Path(__file__).resolve().parent / 'data') else f' --data-root {data_root}'
    more = ' --overwrite' if overwrite else ''
    return f'`python preproc/pack_images.py -d {dataset} --image-size {image_size}{root}{more}`'


def _stamp(dataset: str, split: str, images, image_size: int, stats) -> dict:
    return {'format': FORMAT, 'dataset': dataset, 'split': split, 'image_size': int(image_size),
            'num_images': len(images), 'images_sha256': images_sha(images), 'bad_rows': [],
            'image_stats_sha256': fingerprint.digest(stats), 'images': [str(p) for p in images]}


STAMP_KEYS = ('format', 'image_size', 'num_images', 'images_sha256')


def _read_json(path: Path) -> dict | None:
    """A pack stamp, or None for anything else (unreadable, not a JSON object, or without the keys
    every stamp has: one edited by hand is 'not a pack stamp', never a KeyError)."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and all(k in stamp for k in STAMP_KEYS) else None


# ----------------------------------------------------------------------------------------------
# Reading


def open_pack(data_root, dataset: str, phase: str, split: Split, image_size: int) -> tuple[Path, dict, np.ndarray]:
    """The array file, stamp and packed image stats of the pack of `phase`, checked against the split's
    image list, the images on disk (one rewritten since it was packed is refused; the pack stands for
    images that are no longer there) and the run's image size; DataError (one line naming the pack
    command) otherwise."""
    array_path, stamp_path = pack_paths(data_root, dataset, phase)
    command = pack_command(dataset, image_size, data_root)
    redo = pack_command(dataset, image_size, data_root, overwrite=True)
    if not array_path.is_file() or not stamp_path.is_file():
        raise DataError(f'{array_path} not found (--data-format packed): run {command}')
    stamp = _read_json(stamp_path)
    if stamp is not None and stamp.get('format') == 'vlpl-pack-1':
        raise DataError(f'{array_path} was packed by an older pack_images.py that did not record the images\' sizes '
                        f'and times, so a picture rewritten since cannot be told: run {redo}')
    if stamp is None or stamp.get('format') != FORMAT:
        raise DataError(f'{stamp_path} is not a pack stamp: run {redo}')
    if stamp['image_size'] != image_size:
        raise DataError(f'{array_path} holds {stamp["image_size"]} px images but this run uses --image-size '
                        f'{image_size}: pass --image-size {stamp["image_size"]}, or run {redo}')
    images = split.images
    if stamp['num_images'] != len(images) or stamp['images_sha256'] != images_sha(images):
        raise DataError(f'{array_path} was packed from another image list than the {phase} split of {dataset} '
                        f'(re-formatted data?): run {redo}')
    packed = np.asarray(stamp.get('image_stats', []), dtype=np.int64).reshape(-1, 2)
    if len(packed) != len(images) or fingerprint.digest(packed) != stamp.get('image_stats_sha256'):
        raise DataError(f'{stamp_path} is damaged (its image sizes and times): run {redo}')
    root = datasets.image_root(data_root, dataset)
    changed = fingerprint.changed_rows(packed, split.stats(root), present_only=True)
    if len(changed):
        raise DataError(f'{array_path}: {len(changed)} image{"s" if len(changed) > 1 else ""} changed since '
                        f'{"they were" if len(changed) > 1 else "it was"} packed (first: {root / str(images[changed[0]])}): '
                        f'run {command} (it re-packs them)')
    try:
        array = np.load(array_path, mmap_mode='r')
    except (OSError, ValueError) as err:
        raise DataError(f'{array_path} is not a readable pack ({err}): run {redo}') from None
    if array.dtype != np.uint8 or array.shape != (len(images), image_size, image_size, 3):
        raise DataError(f'{array_path} has {array.dtype} {array.shape}, expected uint8 '
                        f'({len(images)}, {image_size}, {image_size}, 3): run {redo}')
    return array_path, stamp, packed


class PackedImages(torch.utils.data.Dataset):
    """MultiLabelImages read from a pack: the same items, except ``image`` is the uint8 S x S x 3
    array as stored (never flipped); ``flipped`` says whether image_io.to_model_input mirrors it on
    the device. The flips are drawn exactly as MultiLabelImages draws them. The memory map is
    opened in each worker process on first use (it is not pickled)."""

    def __init__(self, data_root, split: Split, image_size: int, train: bool, *, dataset: str, phase: str,
                 skip_bad: bool = False, pin_memory: bool = False):
        self.path, stamp, self.packed_stats = open_pack(data_root, dataset, phase, split, image_size)
        self.root = datasets.image_root(data_root, dataset)  # for the embedding cache key and messages
        self.split = split
        self.image_size = image_size
        self.train = train
        self.dataset = dataset
        self.phase = phase
        self.skip_bad = skip_bad
        self.pin_memory = pin_memory  # batches read in the main process for a CUDA device
        self.bad_rows = frozenset(stamp.get('bad_rows', []))
        if self.bad_rows and not skip_bad:
            first = self.root / str(split.images[min(self.bad_rows)])
            raise DataError(f'{self.path} lacks {len(self.bad_rows)} images that could not be read when it was '
                            f'packed (first: {first}): pass --skip-bad-images, or fix them and repack with '
                            f'{pack_command(dataset, image_size, data_root, overwrite=True)}')
        self._array = None

    def __len__(self) -> int:
        return len(self.split)

    def __getstate__(self):
        return self.__dict__ | {'_array': None}

    def image_stats(self) -> np.ndarray:
        """(N, 2) size and modification time of the images when they were packed (fingerprint.py):
        the pixels this set reads."""
        return self.packed_stats

    def _row_and_flip(self, key) -> tuple[int, bool]:
        if isinstance(key, tuple):
            return int(key[0]), bool(key[1]) and self.train
        return int(key), self.train and bool(torch.rand(1) < 0.5)

    def _rows(self):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode='r')
        return self._array

    def __getitem__(self, key) -> dict:
        i, flipped = self._row_and_flip(key)
        if i in self.bad_rows:
            return {'skipped': i}
        return {
            'image': torch.from_numpy(np.array(self._rows()[i])),
            'label_obs': torch.from_numpy(self.split.labels_obs[i].copy()),
            'label_true': torch.from_numpy(self.split.labels_true[i].copy()),
            'index': torch.tensor(i, dtype=torch.int64),
            'flipped': torch.tensor(flipped),
        }

    def __getitems__(self, keys: list) -> dict:
        """The whole batch of `keys` at once, already collated (image_dataset.collate_skipping passes it
        through): what collate_skipping makes of the items of __getitem__, the same tensors, but
        each row is copied once from the memory map into the batch, with no per-item tensors and no
        second copy to stack them. In a DataLoader worker the batch is allocated in shared memory,
        where the worker's result travels to the main process anyway (torch would otherwise copy it
        there); in the main process, in page-locked memory with pin_memory (the DataLoader's pin
        thread then has nothing to copy). Flips are drawn in key order, as __getitem__ draws them
        item by item."""
        drawn = [self._row_and_flip(key) for key in keys]
        kept = [(i, flipped) for i, flipped in drawn if i not in self.bad_rows]
        batch = {'skipped': [i for i, _ in drawn if i in self.bad_rows]}
        if not kept:
            return batch
        array = self._rows()
        rows = np.array([i for i, _ in kept], dtype=np.int64)
        in_worker = torch.utils.data.get_worker_info() is not None
        image = batch_buffer((len(rows),) + array.shape[1:], shared=in_worker,
                             pin=self.pin_memory and not in_worker)
        out = image.numpy()
        for k, i in enumerate(rows):  # one memcpy per row from the page cache
            out[k] = array[i]
        return {'image': image,
                'label_obs': torch.from_numpy(self.split.labels_obs[rows]),
                'label_true': torch.from_numpy(self.split.labels_true[rows]),
                'index': torch.from_numpy(rows),
                'flipped': torch.tensor([flipped for _, flipped in kept], dtype=torch.bool)} | batch


def batch_buffer(shape: tuple, *, shared: bool, pin: bool = False, dtype=torch.uint8) -> torch.Tensor:
    """An uninitialised tensor of `shape`: in shared memory (`shared`: where a DataLoader worker's
    batch travels to the main process, as torch's default_collate allocates it), in page-locked
    memory (`pin`: a CUDA copy from it can overlap compute), or in ordinary memory."""
    if shared:
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size())
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def image_sets(cfg, splits: dict, root: Path) -> tuple[dict, torch.utils.data.Dataset]:
    """The datasets of a run for cfg.data_format: {phase: set} and the unflipped train set (for the
    embedding cache and the EM_APL update; None when `splits` has no train split)."""
    if cfg.data_format == 'packed':
        # page-locked batches when the run is on CUDA (main_clip.select_device's rule for 'auto')
        pin = cfg.device == 'cuda' or (cfg.device == 'auto' and torch.cuda.is_available())

        def make(phase, train):
            return PackedImages(cfg.data_root, splits[phase], cfg.image_size, train=train, dataset=cfg.dataset,
                                phase=phase, skip_bad=cfg.skip_bad_images, pin_memory=pin)
    else:
        def make(phase, train):
            return image_dataset.MultiLabelImages(root, splits[phase], cfg.image_size, train=train, dataset=cfg.dataset,
                                             skip_bad=cfg.skip_bad_images)
    return {phase: make(phase, phase == 'train') for phase in splits}, make('train', False) if 'train' in splits else None


# ----------------------------------------------------------------------------------------------
# Writing


class _Resized(torch.utils.data.Dataset):
    """(row, S x S x 3 uint8 pixels or None when unreadable and skip_bad) of the rows given."""

    def __init__(self, images: image_dataset.MultiLabelImages, rows: list[int], image_size: int, skip_bad: bool):
        self.images, self.rows, self.image_size, self.skip_bad = images, rows, image_size, skip_bad

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        row = self.rows[k]
        try:
            img = self.images._open(self.images.root / str(self.images.split.images[row]))
        except DataError:
            if self.skip_bad:
                return row, None
            raise
        return row, image_io.resized_pixels(img, self.image_size)


def _collate(items):
    return items


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn: the worker ends when the process that started it ends, however it
    ends. A worker left behind by a SIGKILLed parent otherwise lives on for good (it blocks on a full
    result pipe that nobody reads), holding its memory and the partial pack mapped from its parent.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL), then a check that the parent did not die before that
    call. Elsewhere: a daemon thread that polls the parent's pid once a second."""
    parent = os.getppid()
    if sys.platform.startswith('linux'):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            args = (ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
            if libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), *args) == 0:
                if os.getppid() != parent or parent == 1:  # orphaned before the call
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass  # no prctl: watch the parent instead

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name='die-with-parent', daemon=True).start()


def _allocated(path: Path) -> int:
    """Bytes a file holds on disk (its blocks), not its apparent size: a sparse partial pack has
    the size of the whole pack from its first row on."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _bytes(n: int) -> str:
    return next(f'{n / unit:.1f} {name}' for unit, name in ((1e12, 'TB'), (1e9, 'GB'), (1e6, 'MB'), (1e3, 'kB'), (1, 'B'))
                if abs(n) >= unit or unit == 1)


def _disk_full_hint(array_path: Path, folder: Path) -> str:
    return (f'free some space on {folder}, or pass --data-root on a larger disk (then the pack goes there), and run '
            'the same command again')


def reserve(fd: int, length: int) -> bool:
    """Allocate the blocks of bytes [0, length) of the file `fd` on disk; False where the file system
    cannot (the file stays sparse). Linux: fallocate(2) itself, not glibc's posix_fallocate, which on
    a file system without it (NFS before 4.2) writes one byte per block instead, for hours on a COCO
    pack. Elsewhere: the system's posix_fallocate where there is one."""
    if sys.platform.startswith('linux'):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if libc.fallocate(fd, 0, 0, length) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(code, os.strerror(code))
    if hasattr(os, 'posix_fallocate'):
        try:
            os.posix_fallocate(fd, 0, length)
            return True
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
    return False


def _allocate(part_array: Path, array_path: Path, shape: tuple, fresh: bool) -> np.memmap:
    """The partial pack as a memory map, every block of it allocated on disk first (`reserve`), so
    that a full disk is this one error now rather than a SIGBUS when a row lands in a hole of a
    sparse file (where the file system cannot allocate ahead, only the free-space check guards it).
    `fresh`: create it (header and size); else map the existing partial pack."""
    folder = part_array.parent
    try:
        if fresh:
            folder.mkdir(parents=True, exist_ok=True)
            array = np.lib.format.open_memmap(part_array, mode='w+', dtype=np.uint8, shape=shape)
        else:
            array = np.load(part_array, mmap_mode='r+')
        total = part_array.stat().st_size
        need = total - _allocated(part_array)
        free = shutil.disk_usage(folder).free
        if need > free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(part_array))
        if need > 0:
            fd = os.open(part_array, os.O_RDWR)
            try:
                reserve(fd, total)
            finally:
                os.close(fd)
        return array
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            if fresh:
                part_array.unlink(missing_ok=True)
            need = int(np.prod(shape)) - (0 if fresh else _allocated(part_array))
            raise UserError(f'{array_path} needs {_bytes(need)} more on disk than {folder} has ('
                            f'{_bytes(shutil.disk_usage(folder).free)} free): {_disk_full_hint(array_path, folder)}'
                            ) from None
        raise UserError(f'cannot write {err.filename or part_array}: {err.strerror or err}') from None


def _refresh(array_path: Path, stamp_path: Path, part_array: Path, part_stamp: Path, done: dict, want: dict,
             stats: np.ndarray) -> list[int] | None:
    """A complete pack of the same image list and size whose images changed since it was packed goes
    back to being a partial pack with those rows to redo; returns them (None: not such a pack).
    Order: the partial stamp first, then the stamp goes, then the array is renamed, so an interrupt at
    any point leaves a state the next write_pack finishes."""
    if not all(done.get(k) == want[k] for k in SAME):
        return None
    packed = np.asarray(done.get('image_stats', []), dtype=np.int64).reshape(-1, 2)
    if len(packed) != len(stats):
        return None
    redo = fingerprint.changed_rows(packed, stats).tolist()
    bad = sorted(set(done.get('bad_rows', [])) - set(redo))
    save_json(part_stamp, want | {'images': [], 'rows_done': want['num_images'], 'redo': redo, 'bad_rows': bad},
              indent=None)
    stamp_path.unlink(missing_ok=True)
    os.replace(array_path, part_array)
    return redo


def write_pack(data_root, dataset: str, phase: str, split: Split, image_size: int, *, num_workers: int = 0,
               chunk: int = 256, overwrite: bool = False, skip_bad: bool = False, progress=None) -> str:
    """Write (or finish, or refresh) the pack of one split; returns a one-line report.

    Resumes an interrupted pack of the same image list and size from the rows its partial stamp
    records (from row 0 if its images changed meanwhile); re-packs the rows of a complete pack whose
    images changed since (fingerprint.image_stats); refuses a pack or partial pack of another size
    unless `overwrite`. Rows are recorded as done only after the array is flushed, in chunks of
    `chunk` rows. A full disk, at the start or later, is one UserError; the rows written are kept.
    """
    array_path, stamp_path = pack_paths(data_root, dataset, phase)
    part_array, part_stamp = partial_paths(data_root, dataset, phase)
    root = datasets.image_root(data_root, dataset)
    stats = split.stats(root)  # before any image is read: an image rewritten while packing is seen next time
    want = _stamp(dataset, phase, split.images, image_size, stats)
    command = pack_command(dataset, image_size, data_root)
    redo_command = pack_command(dataset, image_size, data_root, overwrite=True)
    if overwrite:
        for path in (array_path, stamp_path, part_array, part_stamp):
            path.unlink(missing_ok=True)
    for path, what in ((stamp_path, array_path), (part_stamp, f'the interrupted pack {part_array}')):
        stored = _read_json(path) if path.is_file() else None
        if stored is not None and stored.get('image_size') not in (None, image_size):
            raise UserError(f'{what} holds {stored["image_size"]} px images, not {image_size}: packs of two '
                            f'sizes are never mixed; pass --image-size {stored["image_size"]}, or add --overwrite '
                            f'to replace it with {image_size} px images')
    n, shape = len(split), (len(split), image_size, image_size, 3)
    done_stamp = _read_json(stamp_path) if stamp_path.is_file() else None
    try:
        if done_stamp is not None and array_path.is_file():
            if done_stamp.get('image_stats_sha256') == want['image_stats_sha256'] and \
                    all(done_stamp.get(k) == want[k] for k in SAME):
                try:  # the stamp says complete; the array must be too (a truncated file was called complete)
                    fits = np.load(array_path, mmap_mode='r').shape == shape
                except (OSError, ValueError):
                    fits = False
                if not fits:
                    raise UserError(f'{array_path} is not the complete pack its stamp describes (cut short or '
                                    f'damaged): run {redo_command}')
                return f'{phase}: {array_path} is complete ({n} images, {image_size} px)'
            if _refresh(array_path, stamp_path, part_array, part_stamp, done_stamp, want, stats) is None:
                older = done_stamp.get('format') == 'vlpl-pack-1'
                raise UserError(f'{array_path} was packed ' + ('by an older pack_images.py that did not record the '
                                'images\' sizes and times' if older else 'from another image list (re-formatted data?)')
                                + f': run {redo_command}')
        state = _read_json(part_stamp) if part_stamp.is_file() else None
        same = state is not None and all(state.get(k) == want[k] for k in SAME)
        if same and array_path.is_file() and not part_array.exists():  # stopped between a rename and a stamp
            if state.get('rows_done') == n and not state.get('redo') and \
                    state.get('image_stats_sha256') == want['image_stats_sha256']:
                bad = state.get('bad_rows', [])
                return _finish(array_path, stamp_path, part_stamp, want, stats, bad, phase, n, n)
            os.replace(array_path, part_array)  # a refresh stopped before its rename
        resumable = same and part_array.is_file()
        if resumable:
            try:
                probe = np.load(part_array, mmap_mode='r')
                resumable = probe.shape == shape and probe.dtype == np.uint8
                del probe
            except (OSError, ValueError):
                resumable = False
        again = ''
        if resumable and state.get('image_stats_sha256') == want['image_stats_sha256']:
            start, redo, bad = int(state['rows_done']), list(state.get('redo', [])), list(state.get('bad_rows', []))
        elif resumable:  # images changed while the pack was interrupted: which rows is not recorded
            start, redo, bad = 0, [], []
            again = 'images changed since the interrupted pack started, so every row was packed again, '
        else:  # a new pack; the blocks of a partial pack it replaces are freed first
            start, redo, bad = 0, [], []
            part_stamp.unlink(missing_ok=True)
            part_array.unlink(missing_ok=True)
        array = _allocate(part_array, array_path, shape, fresh=not resumable)
    except OSError as err:
        raise UserError(f'cannot write {err.filename or stamp_path}: {err.strerror or err}') from None
    rows = redo + list(range(start, n))
    source = image_dataset.MultiLabelImages(root, split, image_size, train=False, dataset=dataset)
    loader = torch.utils.data.DataLoader(_Resized(source, rows, image_size, skip_bad), batch_size=chunk,
                                         num_workers=num_workers, collate_fn=_collate,
                                         worker_init_fn=die_with_parent if num_workers else None)
    bar = progress(total=n, initial=n - len(rows), desc=f'packing {phase}') if progress else None
    taken, bad = 0, set(bad)
    try:
        for items in loader:
            for row, pixels in items:
                if pixels is None:
                    bad.add(row)
                else:
                    bad.discard(row)
                    array[row] = pixels
            array.flush()
            taken += len(items)
            left = redo[taken:]
            save_json(part_stamp, want | {'images': [], 'rows_done': start + max(0, taken - len(redo)), 'redo': left,
                                          'bad_rows': sorted(bad)}, indent=None)
            if bar is not None:
                bar.update(len(items))
        array.flush()
        del array
        os.replace(part_array, array_path)  # complete: only now under its name
        how = again + (f'{len(redo)} changed image{"s" if len(redo) != 1 else ""} re-packed, ' if redo
                       else f'resumed at row {start}, ' if start else '')
        return _finish(array_path, stamp_path, part_stamp, want, stats, sorted(bad), phase, n, start, how)
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        raise UserError(f'cannot write {err.filename or part_array}: {err.strerror or err}; the rows packed so far are '
                        'kept: ' + (_disk_full_hint(array_path, part_array.parent) if full
                                    else 'run the same command again to continue')) from None
    finally:
        if bar is not None:
            bar.close()


def _finish(array_path: Path, stamp_path: Path, part_stamp: Path, want: dict, stats: np.ndarray, bad: list,
            phase: str, n: int, start: int, how: str | None = None) -> str:
    save_json(stamp_path, want | {'bad_rows': bad, 'image_stats': stats.tolist(),
                                  'written': time.strftime('%Y-%m-%dT%H:%M:%S%z')}, indent=1)
    part_stamp.unlink(missing_ok=True)
    if how is None:
        how = f'resumed at row {start}, ' if start else ''
    skipped = f', {len(bad)} unreadable images left empty (--skip-bad-images)' if bad else ''
    return (f'{phase}: {array_path} written ({how}{n} images, {want["image_size"]} px, '
            f'{array_path.stat().st_size / 1e9:.2f} GB){skipped}')

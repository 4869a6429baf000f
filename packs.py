"""Image packs (--data-format packed, docs/input-pipeline.md): every image of a split resized once,
stored as one uint8 array file, and read back without decoding.

A pack of split P (train, val, test; the splits of datasets.load_splits, rows in split order) at
size S is two files in ``<data_root>/<dataset>/packed/``:

  ``P.npy``   N x S x S x 3 uint8 (numpy format, read memory-mapped): row i is
              datasets.resized_pixels of image i, the pixels the PIL pipeline normalises
  ``P.json``  its stamp: format, dataset, split, image_size, num_images, the image list and the
              sha256 of the list, and the rows whose image could not be read (--skip-bad-images)

Writing (`write_pack`) goes to ``.P.npy.partial`` with a stamp ``.P.json.partial`` that records the
rows written so far (after a flush); a run that is interrupted continues from there, and the pack
is renamed into place only when complete. A pack of another size is never mixed in: a pack or a
partial pack of size S' != S is refused (--overwrite replaces it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import datasets
from config import UserError
from datasets import DataError, Split
from files import save_json

FORMAT = 'vlpl-pack-1'
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


def pack_command(dataset: str, image_size: int, data_root) -> str:
    root = '' if Path(data_root).resolve() == (Path(__file__).resolve().parent / 'data') else f' --data-root {data_root}'
    return f'`python preproc/pack_images.py -d {dataset} --image-size {image_size}{root}`'


def _stamp(dataset: str, split: str, images, image_size: int) -> dict:
    return {'format': FORMAT, 'dataset': dataset, 'split': split, 'image_size': int(image_size),
            'num_images': len(images), 'images_sha256': images_sha(images), 'bad_rows': [],
            'images': [str(p) for p in images]}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Reading


def open_pack(data_root, dataset: str, split: str, images, image_size: int) -> tuple[Path, dict]:
    """The array file and stamp of the pack of `split`, checked against the split's image list
    and the run's image size; DataError (one line naming the pack command) otherwise."""
    array_path, stamp_path = pack_paths(data_root, dataset, split)
    command = pack_command(dataset, image_size, data_root)
    if not array_path.is_file() or not stamp_path.is_file():
        raise DataError(f'{array_path} not found (--data-format packed): run {command}')
    stamp = _read_json(stamp_path)
    if stamp is None or stamp.get('format') != FORMAT:
        raise DataError(f'{stamp_path} is not a pack stamp: run {command} --overwrite')
    if stamp['image_size'] != image_size:
        raise DataError(f'{array_path} holds {stamp["image_size"]} px images but this run uses --image-size '
                        f'{image_size}: pass --image-size {stamp["image_size"]}, or run {command} --overwrite')
    if stamp['num_images'] != len(images) or stamp['images_sha256'] != images_sha(images):
        raise DataError(f'{array_path} was packed from another image list than the {split} split of {dataset} '
                        f'(re-formatted data?): run {command} --overwrite')
    try:
        array = np.load(array_path, mmap_mode='r')
    except (OSError, ValueError) as err:
        raise DataError(f'{array_path} is not a readable pack ({err}): run {command} --overwrite') from None
    if array.dtype != np.uint8 or array.shape != (len(images), image_size, image_size, 3):
        raise DataError(f'{array_path} has {array.dtype} {array.shape}, expected uint8 '
                        f'({len(images)}, {image_size}, {image_size}, 3): run {command} --overwrite')
    return array_path, stamp


class PackedImages(torch.utils.data.Dataset):
    """MultiLabelImages read from a pack: the same items, except ``image`` is the uint8 S x S x 3
    array as stored (never flipped); ``flipped`` says whether datasets.to_model_input mirrors it on
    the device. The flips are drawn exactly as MultiLabelImages draws them. The memory map is
    opened in each worker process on first use (it is not pickled)."""

    def __init__(self, data_root, split: Split, image_size: int, train: bool, *, dataset: str, phase: str,
                 skip_bad: bool = False, pin_memory: bool = False):
        self.path, stamp = open_pack(data_root, dataset, phase, split.images, image_size)
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
                            f'{pack_command(dataset, image_size, data_root)} --overwrite')
        self._array = None

    def __len__(self) -> int:
        return len(self.split)

    def __getstate__(self):
        return self.__dict__ | {'_array': None}

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
        """The whole batch of `keys` at once, already collated (datasets.collate_skipping passes it
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
            return datasets.MultiLabelImages(root, splits[phase], cfg.image_size, train=train, dataset=cfg.dataset,
                                             skip_bad=cfg.skip_bad_images)
    return {phase: make(phase, phase == 'train') for phase in splits}, make('train', False) if 'train' in splits else None


# ----------------------------------------------------------------------------------------------
# Writing


class _Resized(torch.utils.data.Dataset):
    """(row, S x S x 3 uint8 pixels or None when unreadable and skip_bad) of the rows given."""

    def __init__(self, images: datasets.MultiLabelImages, rows: range, image_size: int, skip_bad: bool):
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
        return row, datasets.resized_pixels(img, self.image_size)



def _collate(items):
    return items


def write_pack(data_root, dataset: str, phase: str, split: Split, image_size: int, *, num_workers: int = 0,
               chunk: int = 256, overwrite: bool = False, skip_bad: bool = False, progress=None) -> str:
    """Write (or finish) the pack of one split; returns a one-line report.

    Resumes an interrupted pack of the same image list and size from the rows its partial stamp
    records; refuses a pack or partial pack of another size unless `overwrite`. Rows are recorded
    as done only after the array is flushed, in chunks of `chunk` rows.
    """
    array_path, stamp_path = pack_paths(data_root, dataset, phase)
    part_array, part_stamp = partial_paths(data_root, dataset, phase)
    want = _stamp(dataset, phase, split.images, image_size)
    command = pack_command(dataset, image_size, data_root)
    if overwrite:
        for path in (array_path, stamp_path, part_array, part_stamp):
            path.unlink(missing_ok=True)
    for path, what in ((stamp_path, array_path), (part_stamp, f'the interrupted pack {part_array}')):
        stored = _read_json(path) if path.is_file() else None
        if stored is not None and stored.get('image_size') not in (None, image_size):
            raise UserError(f'{what} holds {stored["image_size"]} px images, not {image_size}: packs of two '
                            f'sizes are never mixed; pass --image-size {stored["image_size"]}, or add --overwrite '
                            f'to replace it with {image_size} px images')
    done_stamp = _read_json(stamp_path) if stamp_path.is_file() else None
    if done_stamp is not None and array_path.is_file():
        if all(done_stamp.get(k) == want[k] for k in ('format', 'image_size', 'num_images', 'images_sha256')):
            return f'{phase}: {array_path} is complete ({len(split)} images, {image_size} px)'
        raise UserError(f'{array_path} was packed from another image list (re-formatted data?): run {command} '
                        '--overwrite')
    n, shape = len(split), (len(split), image_size, image_size, 3)
    state = _read_json(part_stamp) if part_stamp.is_file() else None
    same = state is not None and all(state.get(k) == want[k] for k in ('format', 'image_size', 'num_images',
                                                                        'images_sha256'))
    if same and state.get('rows_done') == n and array_path.is_file() and not part_array.exists():
        return _finish(array_path, stamp_path, part_stamp, want, state.get('bad_rows', []), phase, n, n)
    resumable = same and part_array.is_file()
    if resumable:
        try:
            array = np.load(part_array, mmap_mode='r+')
            resumable = array.shape == shape and array.dtype == np.uint8
        except (OSError, ValueError):
            resumable = False
    if resumable:
        start, bad = int(state['rows_done']), list(state.get('bad_rows', []))
    else:
        part_stamp.unlink(missing_ok=True)
        part_array.parent.mkdir(parents=True, exist_ok=True)
        need = int(np.prod(shape))
        free = shutil.disk_usage(part_array.parent).free + (part_array.stat().st_size if part_array.exists() else 0)
        if need > free:
            raise UserError(f'{array_path} needs {need / 1e9:.1f} GB but {part_array.parent} has {free / 1e9:.1f} GB '
                            'free: free some space or pass --data-root on a larger disk')
        array = np.lib.format.open_memmap(part_array, mode='w+', dtype=np.uint8, shape=shape)
        start, bad = 0, []
    source = datasets.MultiLabelImages(datasets.image_root(data_root, dataset), split, image_size, train=False,
                                       dataset=dataset)
    loader = torch.utils.data.DataLoader(_Resized(source, range(start, n), image_size, skip_bad), batch_size=chunk,
                                         num_workers=num_workers, collate_fn=_collate)
    bar = progress(total=n, initial=start, desc=f'packing {phase}') if progress else None
    rows_done = start
    try:
        for items in loader:
            for row, pixels in items:
                if pixels is None:
                    bad.append(row)
                else:
                    array[row] = pixels
            array.flush()
            rows_done += len(items)
            save_json(part_stamp, want | {'images': [], 'rows_done': rows_done, 'bad_rows': bad}, indent=None)
            if bar is not None:
                bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()
    array.flush()
    del array
    os.replace(part_array, array_path)  # complete: only now under its name
    return _finish(array_path, stamp_path, part_stamp, want, bad, phase, n, start)


def _finish(array_path: Path, stamp_path: Path, part_stamp: Path, want: dict, bad: list, phase: str, n: int,
            start: int) -> str:
    save_json(stamp_path, want | {'bad_rows': bad, 'written': time.strftime('%Y-%m-%dT%H:%M:%S%z')}, indent=1)
    part_stamp.unlink(missing_ok=True)
    how = f'resumed at row {start}, ' if start else ''
    skipped = f', {len(bad)} unreadable images left empty (--skip-bad-images)' if bad else ''
    return (f'{phase}: {array_path} written ({how}{n} images, {want["image_size"]} px, '
            f'{array_path.stat().st_size / 1e9:.2f} GB){skipped}')

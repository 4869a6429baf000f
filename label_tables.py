"""Label tables at scale: partial annotations as an N x K table of int8 states, read by rows and blocks.

A dataset with real partial annotations (OpenImages V6, preproc/format_openimages.py) says of each
image only what human raters verified: a few classes present, a few absent, nothing about the
thousands of others. Its formatted label files hold one int8 state per (image, class), in this
project's observed-label convention (docs/partial-labels.md):

    1 positive (verified present), -1 annotated negative (verified absent), 0 unannotated.

These states are the observed labels of training *and* the ground truth of evaluation, where only
the annotated entries count (metrics.compute_metrics_annotated). At OpenImages' scale the table must
never become a dense float matrix (200,000 x 9,600 is 1.9 GB as int8 and 7.7 GB as float32; the
real train split holds millions of images), so:

- `Annotations` holds the table as it lies on disk (a memory-mapped .npy) with an optional row
  selection (the train/val cut of datasets.split_indices), and is only ever read in pieces: the rows
  of a batch, blocks of rows, blocks of columns (classes). Every piece read is checked to hold only
  -1, 0 and 1, so a damaged file stops the run with one line naming it, without a scan of the whole
  file at start-up.
- `BatchRows` gives a training batch's rows as float32 on the device (the engine's
  `method.observed[index]`), gathered from the host table per batch.
- `take_rows` selects rows of either kind of label matrix without copying a whole one.

Dense 0/1 label matrices (every fully labelled dataset) stay plain numpy arrays, untouched.
`np.asarray(annotations)` gives the dense int8 table, for the few methods whose own state is a dense
N x K matrix anyway (ROLE, AEVLP, EM_APL, LL-Cp, CLIP pseudo-label quality): fine on small data,
not at OpenImages' scale (docs/openimages.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from config import VLPLError

STATES = (-1, 0, 1)


class AnnotationError(VLPLError):
    """An annotation file with a value other than -1, 0 or 1; the message names the file."""


class Annotations:
    """N x K int8 annotation states (1 positive, -1 annotated negative, 0 unannotated), read lazily.

    states: the whole (R x K) int8 table, usually np.load(path, mmap_mode='r'); rows: sorted indices
    of the rows this table holds (None: all R). Indexing follows numpy and always returns an int8
    ndarray: ``a[i]`` one row (K,), ``a[index_array]`` those rows (B x K), ``a[r0:r1]`` a block of
    rows, ``a[:, c0:c1]`` a block of columns (N x C), ``a[rows, c0:c1]``. ``take(rows)`` selects rows
    without reading them. Comparing the whole table (``a == 1``) is refused: read it in blocks.
    """

    ndim = 2
    dtype = np.dtype(np.int8)

    def __init__(self, states: np.ndarray, rows: np.ndarray | None = None, source: str | Path | None = None,
                 path: str | Path | None = None):
        if states.ndim != 2 or states.dtype != np.int8:
            raise ValueError(f'Annotations need a 2-D int8 table, got {states.dtype} {states.shape}')
        self._states = states
        self._stored_shape = states.shape
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._path = None if path is None else str(path)  # a memory-mapped file: pickled by its path
        self.source = str(source) if source is not None else 'the annotation table'

    @property
    def shape(self) -> tuple[int, int]:
        return (self._stored_shape[0] if self._rows is None else len(self._rows), self._stored_shape[1])

    @property
    def file(self) -> str | None:
        """The formatted file the table is memory-mapped from (None: a table in memory)."""
        return self._path

    @property
    def stored_rows(self) -> np.ndarray | None:
        """The rows of the stored table this one holds, in order (None: all of them)."""
        return self._rows

    def __getstate__(self) -> dict:
        """A DataLoader worker gets the file's path, not a copy of the table (as packs.PackedImages)."""
        return self.__dict__ | ({'_states': None} if self._path else {})

    def _table(self) -> np.ndarray:
        if self._states is None:  # unpickled in another process: map the file there
            self._states = np.load(self._path, mmap_mode='r', allow_pickle=False)
        return self._states

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f'Annotations({self.shape[0]} x {self.shape[1]}, from {self.source})'

    def _base_rows(self, key):
        """The rows of the stored table that `key` (int, slice, int or bool array) selects."""
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f'row {key} out of range for {len(self)} rows')
            key = int(key) % len(self)
            return key if self._rows is None else int(self._rows[key])
        if isinstance(key, slice):
            return key if self._rows is None else self._rows[key]
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (len(self),):
                raise IndexError(f'boolean row mask of shape {key.shape} for {len(self)} rows')
            key = np.flatnonzero(key)
        return key if self._rows is None else self._rows[key]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError('Annotations take [rows] or [rows, columns]')
            rows, columns = key
            if not isinstance(columns, (slice, int, np.integer)):
                raise IndexError('Annotations read columns by int or slice')
            base = self._base_rows(rows)
            block = self._table()[base, columns] if not isinstance(base, slice) else self._table()[base][:, columns]
        else:
            block = self._table()[self._base_rows(key)]
        return self._checked(np.array(block, dtype=np.int8, copy=True))

    def _checked(self, block: np.ndarray) -> np.ndarray:
        if block.size and (block.min() < -1 or block.max() > 1):
            bad = np.unique(block[(block < -1) | (block > 1)])[:5].tolist()
            raise AnnotationError(f'{self.source} holds values {bad}, annotation states are -1, 0 and 1: '
                                  'format the dataset again')
        return block

    def take(self, rows) -> 'Annotations':
        """The table of the selected rows (int indices or a boolean mask over this table's rows), read
        lazily like this one."""
        base = self._base_rows(rows)
        if isinstance(base, (int, np.integer)):
            base = np.array([base])
        if isinstance(base, slice):
            base = np.arange(self._stored_shape[0])[base]
        return Annotations(self._table(), np.asarray(base, dtype=np.int64), self.source, self._path)

    def row_blocks(self, size: int = 4096):
        """(r0, r1, block r1 - r0 x K int8) over all rows, in order."""
        for r0 in range(0, len(self), size):
            r1 = min(r0 + size, len(self))
            yield r0, r1, self[r0:r1]

    def column_blocks(self, size: int = 256):
        """(c0, c1, block N x (c1 - c0) int8) over all classes, in order."""
        for c0 in range(0, self.shape[1], size):
            c1 = min(c0 + size, self.shape[1])
            yield c0, c1, self[:, c0:c1]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The dense table (N x K int8; in `dtype` if given): for small data only."""
        dense = self[:]
        return dense if dtype is None else dense.astype(dtype)

    def __eq__(self, other):
        raise TypeError('compare an Annotations table block by block (labels[rows] == 1), not as a whole')

    __hash__ = object.__hash__


def load(path: str | Path, num_rows: int, num_classes: int | None) -> Annotations:
    """The annotation table of a formatted file, memory-mapped: an int8 (num_rows, K) .npy.
    num_classes None accepts any K. Raises AnnotationError (one line, naming the file)."""
    try:
        states = np.load(path, mmap_mode='r', allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise AnnotationError(f'{path} is not a readable numpy array ({err})') from None
    if states.ndim != 2 or states.dtype != np.int8:
        raise AnnotationError(f'{path} holds {states.dtype} {states.shape}; annotation states are an int8 '
                              '(N, K) table: format the dataset again')
    if states.shape[0] != num_rows:
        raise AnnotationError(f'{path} has {states.shape[0]} rows but the image list has {num_rows}')
    if num_classes is not None and states.shape[1] != num_classes:
        raise AnnotationError(f'{path} has {states.shape[1]} classes, expected {num_classes}')
    return Annotations(states, source=path, path=path)


def take_rows(labels, rows: np.ndarray):
    """labels restricted to `rows` (a boolean mask or row indices): the object itself when a mask
    keeps every row (no copy of a large matrix), an Annotations view, or numpy's indexing."""
    if rows.dtype == bool and rows.all():
        return labels
    return labels.take(rows) if isinstance(labels, Annotations) else labels[rows]


def take_rows_of(tables: tuple, rows: np.ndarray) -> tuple:
    """take_rows of each table; a table given twice stays one object (metrics evaluate it once)."""
    taken = {}
    for table in tables:
        if id(table) not in taken:
            taken[id(table)] = take_rows(table, rows)
    return tuple(taken[id(table)] for table in tables)


def summary(labels: Annotations, block: int = 4096) -> dict[str, float]:
    """Mean positives and annotated negatives per image, and the number of classes with both an
    annotated positive and an annotated negative (those the masked mAP evaluates), read in blocks."""
    positives = np.zeros(labels.shape[1], dtype=np.int64)
    negatives = np.zeros(labels.shape[1], dtype=np.int64)
    for _, _, rows in labels.row_blocks(block):
        positives += (rows == 1).sum(axis=0)
        negatives += (rows == -1).sum(axis=0)
    n = max(len(labels), 1)
    return {'positives': positives.sum() / n, 'negatives': negatives.sum() / n,
            'evaluable': int(((positives > 0) & (negatives > 0)).sum())}


class BatchRows:
    """The rows of an N x K label table for training batches: ``rows[index]`` is B x K float32 on the
    device. The table stays on the host (an Annotations view of a memory-mapped file); each batch
    reads its B rows, so a table of millions of images never sits whole in host or device memory.
    The index is read back from the device when it lives there (one small copy per step)."""

    def __init__(self, labels: Annotations, device):
        self.labels = labels
        self.device = device

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape

    def __getitem__(self, index):
        import torch

        rows = self.labels[index.detach().cpu().numpy()]
        return torch.from_numpy(rows).to(self.device).float()


def on_device(labels, device, *, copy: bool):
    """Rows of a label table for the training loop: a dense numpy matrix becomes one device tensor
    (torch.tensor when copy, else torch.as_tensor), as before; an Annotations table a BatchRows."""
    import torch  # here: metrics.py and report.py import this module without torch

    if isinstance(labels, Annotations):
        return BatchRows(labels, device)
    return torch.tensor(labels, device=device) if copy else torch.as_tensor(labels, device=device)

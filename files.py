"""The one way files are written: atomically (temporary file, fsync, os.replace); and the one way a
folder is locked (try_lock, claim_lock).

Every writer of the project goes through `replace_all` (checkpoints, test predictions, the
embedding cache and its key, text features, JSON logs, the formatted arrays of preproc/ and the
demo files), so a reader sees the old file or the whole new one, never a part, and an
interrupted write (Ctrl-C, full disk) leaves the previous file intact.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

Writer = Callable  # write(binary file handle) -> None


def replace_all(writers: dict) -> list[Path]:
    """Write every {path: write(handle)} to a temporary file beside its path, fsync each, and only
    when all are written os.replace them into place (in the given order).

    On any exception (KeyboardInterrupt included) every temporary file is removed and the old
    files are kept; the exception propagates.
    """
    temporary: dict[Path, Path] = {}
    try:
        for path, write in writers.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
            temporary[path] = tmp
            with open(tmp, 'wb') as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
    return list(temporary)


def atomic_write(path: str | os.PathLike, write: Writer) -> Path:
    """Call `write(binary file)` on a temporary file and move it to `path` (see replace_all)."""
    return replace_all({Path(path): write})[0]


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """np.save without pickles, atomically."""
    return atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))


def save_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> Path:
    """JSON (strict: NaN and infinity refused) with a final newline, atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + '\n'
    return atomic_write(path, lambda handle: handle.write(text.encode('utf-8')))


def save_torch(path: str | os.PathLike, obj) -> Path:
    """torch.save, atomically (a checkpoint is never half-written). torch.save reports a failed
    write (a full disk) as RuntimeError; it is raised here as the OSError it is."""
    import torch

    def write(handle):
        try:
            torch.save(obj, handle)
        except RuntimeError as e:
            raise OSError(errno.EIO, f'writing failed ({str(e).strip().splitlines()[0][:120]})', str(path)) from None
    return atomic_write(path, write)


def try_lock(path: str | os.PathLike):
    """(open handle holding a POSIX lock on `path`, None), or (None, what the holder wrote in it) when
    another process holds it. The kernel releases the lock when the handle is closed or the process
    ends, however it ends; POSIX locks also hold across the nodes of a shared file system. The
    holder is named by `claim_lock`."""
    import fcntl

    handle = open(path, 'a+')
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or 'unknown'
        handle.close()
        return None, holder
    return handle, None


def claim_lock(handle) -> None:
    """Write who holds the lock (host and pid) into the locked file, for the next process to name."""
    import socket

    handle.seek(0)
    handle.truncate()
    handle.write(f'host {socket.gethostname()}, pid {os.getpid()}\n')
    handle.flush()

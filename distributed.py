"""Which process this is, and the one primary-rank gate for output.

On one process (plain `python main_clip.py`) everything here is a no-op: rank 0 of 1. Under a
launcher the rank and world size come from the environment: torchrun sets RANK / WORLD_SIZE /
LOCAL_RANK; SLURM's srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (read the same way by
open_clip's training code, open_clip_train/distributed.py, world_info_from_env).

Every message goes through the `vlpl` logger (`log`): information to standard output, warnings
and errors to standard error, and only from the primary process. Progress bars come from
`progress`, which is silent off the primary process. Files are written only where
`is_primary()` holds.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger('vlpl')


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def info_from_env(environ=None) -> ProcessInfo:
    """Rank, world size and local rank from torchrun's or SLURM's variables (1 process if neither)."""
    env = os.environ if environ is None else environ
    for rank, world, local in (('RANK', 'WORLD_SIZE', 'LOCAL_RANK'),
                               ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID')):
        if rank in env and world in env:
            return ProcessInfo(int(env[rank]), int(env[world]), int(env.get(local, 0)))
    return ProcessInfo()


_process = info_from_env()


def process() -> ProcessInfo:
    return _process


def is_primary() -> bool:
    """The gate of every print, progress bar and file write."""
    return _process.rank == 0


class _CurrentStream(logging.Handler):
    """Writes to whatever sys.stdout / sys.stderr is at the time (pytest's capture included)."""

    def __init__(self, name: str, level: int, below: int | None = None):
        super().__init__(level)
        self.name_ = name
        if below is not None:
            self.addFilter(lambda record: record.levelno < below)

    def emit(self, record: logging.LogRecord) -> None:
        stream = getattr(sys, self.name_)
        stream.write(self.format(record) + '\n')
        stream.flush()


def setup_logging() -> None:
    """Information to stdout and warnings to stderr, as plain messages; off the primary process
    only errors are shown. Idempotent."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_primary() else logging.ERROR)
    log.addHandler(_CurrentStream('stdout', logging.DEBUG, below=logging.WARNING))
    log.addHandler(_CurrentStream('stderr', logging.WARNING))


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on the primary process; a silent one elsewhere."""
    from tqdm import tqdm

    kwargs.setdefault('dynamic_ncols', True)
    return tqdm(iterable, disable=not is_primary() or kwargs.pop('disable', False), **kwargs)


setup_logging()

"""Which process this is, the one primary-rank gate for output, and the few collectives a run
with several processes needs (torch.distributed + DistributedDataParallel; docs/distributed.md).

On one process (plain `python main_clip.py`) everything here is a no-op: rank 0 of 1. Under a
launcher the rank and world size come from the environment: torchrun sets RANK / WORLD_SIZE /
LOCAL_RANK; SLURM's srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (read the same way by
open_clip's training code, open_clip_train/distributed.py, world_info_from_env).

Every message goes through the `vlpl` logger (`log`): information to standard output, warnings
and errors to standard error, and only from the primary process. Progress bars come from
`progress`, which is silent off the primary process. Files are written only where
`is_primary()` holds.

With several processes (`init_process_group`): the global batch of the single-process order is
cut into one contiguous share per rank (`GlobalBatchShares`); `gather_batch` puts the shares back
together so that every rank computes the method's loss on the whole global batch; `shard` and
`merge_shards` split an evaluation pass into row blocks and gather it back in row order;
`primary_first` lets rank 0 build a shared file while the others wait; `wrap_model` adds
synchronised BatchNorm and DistributedDataParallel. On one process every one of them is a no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from config import VLPLError

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
    only errors are shown, prefixed with the rank. The primary process prints exactly what one
    process prints (the closing lines that scripts grep included). Idempotent."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_primary() else logging.ERROR)
    log.addHandler(_CurrentStream('stdout', logging.DEBUG, below=logging.WARNING))
    log.addHandler(_CurrentStream('stderr', logging.WARNING))
    if not is_primary():  # several processes: say which other one speaks
        for handler in log.handlers:
            handler.setFormatter(logging.Formatter(f'[rank {_process.rank}] %(message)s'))


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on the primary process; a silent one elsewhere."""
    from tqdm import tqdm

    kwargs.setdefault('dynamic_ncols', True)
    return tqdm(iterable, disable=not is_primary() or kwargs.pop('disable', False), **kwargs)


setup_logging()


# ----------------------------------------------------------------------------------------------
# The process group


class PeerFailure(VLPLError):
    """Another process of the run failed, died or stopped answering."""


def world_size() -> int:
    """Processes taking part in the run: 1 unless init_process_group has joined a larger group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def init_process_group(device_type: str, backend: str = 'auto', timeout_s: float = 1800.0) -> None:
    """Join the launcher's process group when the environment names more than one process.

    torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; under srun the rank and world
    come from SLURM_PROCID / SLURM_NTASKS and the job script exports MASTER_ADDR / MASTER_PORT (as
    open_clip's open_clip_train/distributed.py init_distributed_device does, rank and world are
    passed explicitly). backend 'auto': nccl on CUDA, gloo on CPU. timeout_s bounds every
    collective: a process that stops answering makes the others fail after that long.
    """
    if _process.world_size <= 1 or world_size() > 1:
        return
    missing = [name for name in ('MASTER_ADDR', 'MASTER_PORT') if name not in os.environ]
    if missing:
        raise VLPLError(f'{" and ".join(missing)} not set for {_process.world_size} processes: launch with '
                        'torchrun, or export MASTER_ADDR=<first node> MASTER_PORT=<free port> in the SLURM '
                        'script (docs/distributed.md)')
    if backend == 'auto':
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
    if backend == 'nccl' and device_type != 'cuda':
        raise VLPLError('--dist-backend nccl needs --device cuda; use gloo on CPU')
    if device_type == 'cuda':
        torch.cuda.set_device(_process.local_rank)
    dist.init_process_group(backend, init_method='env://', rank=_process.rank, world_size=_process.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_collective_error(error: BaseException) -> bool:
    """True for the errors torch.distributed raises when a peer died or a collective timed out
    (never on one process)."""
    if world_size() == 1:
        return False
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(word in text for word in (
        'Connection closed by peer', 'Connection reset by peer', 'Timed out', 'timed out', 'Broken pipe',
        'ProcessGroup', 'NCCL', 'Gloo', 'gloo'))


def short_reason(error: BaseException) -> str:
    """'Connection closed by peer [10.0.0.2]:50087' out of gloo's or NCCL's long message."""
    text = re.sub(r'^(\[[^\]]*\]\s*)+', '', str(error).strip().splitlines()[0] if str(error).strip() else '')
    return (text.split('. ')[0] or type(error).__name__)[:160]


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (one all_reduce MAX)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextlib.contextmanager
def primary_first(what: str):
    """Run the block on rank 0 first (it builds a shared file), then on the others, which then
    find the file complete. If rank 0 fails, the others stop with one line instead of waiting."""
    if world_size() > 1 and not is_primary() and any_rank(False):
        raise PeerFailure(f'rank 0 failed while {what}; see its message')
    try:
        yield
    except BaseException:
        if world_size() > 1 and is_primary():
            any_rank(True)
        raise
    if world_size() > 1 and is_primary():
        any_rank(False)


# ----------------------------------------------------------------------------------------------
# Batches and shards


def share_bounds(num_rows: int, world: int, rank_: int) -> tuple[int, int]:
    """Contiguous share [start, stop) of rank_ among `world` (sizes differ by at most one, the first
    num_rows % world shares one larger, as numpy.array_split cuts)."""
    base, extra = divmod(num_rows, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (rank_ < extra)


class GlobalBatchShares(torch.utils.data.Sampler):
    """The batch sampler of one rank: its contiguous share of every global batch.

    `sampler` yields the single-process order (image_dataset.FlipSampler: the same shuffle and flips on
    every rank, from the same seed and generator state); it is cut into global batches of
    `batch_size` (the last one shorter) exactly as a one-process DataLoader cuts it, and each
    global batch into world shares in rank order, so the concatenation of the shares in rank order
    is the single-process batch. Every rank gets the same number of steps; a share may be empty
    when the last global batch has fewer rows than processes. No row is repeated or padded.
    """

    def __init__(self, sampler, batch_size: int, world: int | None = None, rank_: int | None = None):
        self.sampler, self.batch_size = sampler, batch_size
        self.world = world_size() if world is None else world
        self.rank = rank() if rank_ is None else rank_

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        keys = list(self.sampler)
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start:start + self.batch_size]
            lo, hi = share_bounds(len(batch), self.world, self.rank)
            yield batch[lo:hi]


class _GatherRows(torch.autograd.Function):
    """all_gather of equally long row blocks (forward), concatenated in rank order.

    Backward: every rank computes the same loss L from the gathered rows, and DDP averages the
    parameter gradients over the W ranks, so a rank must send W * dL/d(its rows) back into its own
    model; the gathered gradient is identical on every rank, so no communication is needed (the
    same convention as torch.distributed.nn.functional.all_gather, which sums the ranks' equal
    gradients, and as SyncBatchNorm: each rank differentiates the sum of all ranks' losses).
    """

    @staticmethod
    def forward(ctx, block: torch.Tensor) -> torch.Tensor:
        world = world_size()
        ctx.rows, ctx.rank, ctx.world = block.shape[0], rank(), world
        parts = [torch.empty_like(block) for _ in range(world)]
        dist.all_gather(parts, block.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows] * ctx.world


def _pad_rows(x: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_full((rows - x.shape[0], *x.shape[1:]), value)])


def gather_batch(logits: torch.Tensor, index: torch.Tensor, pseudo_labels: torch.Tensor | None,
                 batch_size: int):
    """This rank's share of a global batch -> the whole global batch, rows in single-process order.

    logits: b x K (differentiable, see _GatherRows); index: (b,) training rows; pseudo_labels:
    b x K or None; batch_size: the global batch size (the largest share is ceil(batch_size / W),
    so every share is padded to that many rows; padded rows carry index -1 and are dropped).
    Returns (logits B' x K, index (B',), pseudo_labels B' x K or None), identical on every rank.
    """
    rows = math.ceil(batch_size / world_size())
    meta = [index.to(torch.float64)[:, None]]  # one collective for the index and the pseudo-labels
    if pseudo_labels is not None:
        meta.append(pseudo_labels.to(torch.float64))
    meta = _pad_rows(torch.cat(meta, 1), rows, value=-1.0).to(_comm_device())
    parts = [torch.empty_like(meta) for _ in range(world_size())]
    dist.all_gather(parts, meta)
    meta = torch.cat(parts).to(logits.device)
    keep = meta[:, 0] >= 0
    gathered = _GatherRows.apply(_pad_rows(logits, rows).to(_comm_device())).to(logits.device)[keep]
    pl = meta[keep, 1:].to(pseudo_labels.dtype) if pseudo_labels is not None else None
    return gathered, meta[keep, 0].long(), pl


def shard(dataset):
    """This rank's contiguous block of an evaluation dataset (the dataset itself on one process)."""
    if world_size() == 1:
        return dataset
    start, stop = share_bounds(len(dataset), world_size(), rank())
    return torch.utils.data.Subset(dataset, range(start, stop))


def merge_shards(full: torch.Tensor) -> torch.Tensor:
    """N x ... rows of which this rank filled its `shard` block -> every block, in row order, on
    every rank (one all_gather; no row twice). The identity on one process."""
    world = world_size()
    if world == 1:
        return full
    n = full.shape[0]
    start, stop = share_bounds(n, world, rank())
    rows = math.ceil(n / world)
    block = _pad_rows(full[start:stop], rows).to(_comm_device())
    parts = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(parts, block)
    blocks = [part[:hi - lo] for part, (lo, hi) in zip(parts, (share_bounds(n, world, r) for r in range(world)))]
    return torch.cat(blocks).to(full.device)


# ----------------------------------------------------------------------------------------------
# The model


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all_reduce SUM: backward sums the ranks' gradients (torch.distributed.nn's
    convention, see _GatherRows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, over gloo on the CPU
    (torch.nn.SyncBatchNorm runs on GPUs only). Mean and variance are computed in two passes from
    all-reduced sums, the running statistics with the global count, as one process would; the
    state dict keys are BatchNorm's. Eval mode is plain BatchNorm."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {input.dim()}D input)')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=x.dtype)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = stats[-1].detach()
        mean = stats[:-1] / n
        centred = x - mean.reshape(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * n / max(float(n) - 1, 1.0), momentum)
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def _gloo_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` replaced by GlooSyncBatchNorm, parameters and buffers kept."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:  # the same Parameter objects, so an optimiser built before still holds them
            new.weight, new.bias = module.weight, module.bias
        for name in ('running_mean', 'running_var', 'num_batches_tracked'):
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _gloo_sync_batchnorm(child))
    return module


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """The module the training step calls: `model` itself on one process; otherwise, BatchNorm
    synchronised across ranks (in place, unless sync_bn is False) and a DistributedDataParallel
    around it. `model` keeps its state dict keys, so checkpoints do not depend on the world size."""
    if world_size() == 1:
        return model
    if sync_bn:
        if device.type == 'cuda':
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            converted = _gloo_sync_batchnorm(model)
        assert converted is model, 'a bare BatchNorm cannot be converted in place'
    # With synchronised BatchNorm the running statistics are already equal on every rank; without,
    # rank 0's are broadcast at every forward (DDP's default).
    ddp = nn.parallel.DistributedDataParallel
    buffers = ('forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(ddp).parameters
               else 'broadcast_buffers')  # the name since torch 2.13
    return ddp(model, device_ids=[device.index] if device.type == 'cuda' else None, **{buffers: not sync_bn})

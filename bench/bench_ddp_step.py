"""Time the training step on one process and under a launcher (the per-step cost of several processes).

Run from the repository root:

    OMP_NUM_THREADS=1 python bench/bench_ddp_step.py                     # one process, one thread
    torchrun --standalone --nproc_per_node 2 bench/bench_ddp_step.py     # two processes, one thread each
    python bench/bench_ddp_step.py --ddp                                 # one process: plain vs DDP-wrapped
    python bench/bench_ddp_step.py --device cuda --ddp                   # the same on one GPU

Every step is engine.train_one_epoch's (the demo's small_cnn at 64 px, EM loss, Adam) on synthetic
images held in memory, so data loading is not timed. With several processes each rank runs its
share of every global batch and the step adds the gathers of distributed.gather_batch, the
gradient all-reduce of DDP and, unless --no-sync-bn, synchronised BatchNorm. A step's time is the
gap between two optimiser steps within an epoch (--steps of them after --warmup), printed by rank
0 as min / median / max, with images/s of the median.

--ddp on one process: the same model, once plain and once wrapped in DistributedDataParallel in a
process group of one (made here when no launcher made one), epochs alternating, so the ratio DDP /
plain is the wrapping's own cost (bucketing, the all-reduce hooks), side by side in one run.
"""
import argparse
import socket
import statistics
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == '__main__':  # no progress bars in the output (tqdm reads this when first imported)
    os.environ.setdefault('TQDM_DISABLE', '1')

import distributed  # noqa: E402
import engine  # noqa: E402
import methods  # noqa: E402
import models  # noqa: E402
from bench.common import load_line, machine_lines, spread  # noqa: E402
from config import build_config  # noqa: E402


class TimedAdam(torch.optim.Adam):
    """Adam that records the wall time at each step (after the backward pass and its all-reduce)."""

    def __init__(self, params, lr, device):
        super().__init__(params, lr=lr)
        self.times, self.device = [], device

    def step(self, closure=None):
        out = super().step(closure)
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch-size', type=int, default=32, help='global batch (default: 32, the demo\'s)')
    p.add_argument('--image-size', type=int, default=64, help='default: 64, the demo\'s')
    p.add_argument('--model', default='small_cnn', help='backbone (default: small_cnn, the demo\'s)')
    p.add_argument('--steps', type=int, default=60, help='timed steps of each variant (default: 60)')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps of each variant first (default: 5)')
    p.add_argument('--rounds', type=int, default=3,
                   help='--ddp on one process: epochs of each variant, alternating (default: 3)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--no-sync-bn', action='store_true', help='several processes: BatchNorm not synchronised')
    p.add_argument('--ddp', action='store_true', help='one process: time the model plain and wrapped in DDP (a '
                   'process group of one), side by side')
    return p


def one_process_group(device) -> bool:
    """A process group of this process alone (the launcher's when it made one); True when made here."""
    if torch.distributed.is_initialized():
        return False
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if 'MASTER_ADDR' in os.environ and 'MASTER_PORT' in os.environ:  # torchrun --nproc_per_node 1
        torch.distributed.init_process_group(backend, init_method='env://', rank=0, world_size=1)
        return True
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    return True


def step_times(variants: dict, cfg, batches, method, observed, device, warmup: int, steps: int,
               rounds: int) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Seconds per step of each variant {name: (module the step calls, TimedAdam)}: one untimed epoch of
    warmup + 1 steps each, then `rounds` epochs each, alternating, of the steps divided among them.
    Also, on CUDA, each variant's peak memory above what was allocated before its epochs."""
    gaps = {name: [] for name in variants}
    peaks = {name: None for name in variants}
    per_round = [len(r) for r in torch.arange(steps).tensor_split(rounds) if len(r)]
    plan = [(warmup + 1, False)] + [(n + 1, True) for n in per_round]  # n + 1 optimiser steps give n gaps
    for count, timed in plan:
        for name, (train_model, optimizer) in variants.items():
            optimizer.times.clear()
            if device.type == 'cuda':
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            engine.train_one_epoch(1, cfg, train_model, optimizer, batches[:count], method, observed, None, device,
                                   check_every=10 ** 9)
            if device.type == 'cuda':
                peaks[name] = max(peaks[name] or 0, torch.cuda.max_memory_allocated() - before)
            if timed:
                gaps[name] += torch.tensor(optimizer.times, dtype=torch.float64).diff().tolist()
    return gaps, peaks


def parse_args(argv=None):
    parser = build_parser()
    a = parser.parse_args(argv)
    if min(a.batch_size, a.image_size, a.steps, a.rounds) < 1 or a.warmup < 0:
        parser.error('--batch-size, --image-size, --steps and --rounds must be >= 1, --warmup >= 0')
    return a


def measure(a, device):
    """(seconds per step of each variant, their CUDA peaks, the world size), as the docstring says."""
    distributed.init_process_group(device.type)
    world, rank = distributed.world_size(), distributed.rank()
    cfg = build_config(dataset='demo', loss='EM', model=a.model, batch_size=a.batch_size, image_size=a.image_size,
                       device=device.type, pretrained=False)
    num_classes = cfg.data.num_classes
    steps = max(a.warmup, -(-a.steps // a.rounds)) + 1
    num_rows = steps * a.batch_size
    g = torch.Generator().manual_seed(0)
    observed = torch.zeros(num_rows, num_classes)
    observed[torch.arange(num_rows), torch.randint(0, num_classes, (num_rows,), generator=g)] = 1
    batches = []
    for s in range(steps):
        lo, hi = distributed.share_bounds(a.batch_size, world, rank)
        index = torch.arange(s * a.batch_size + lo, s * a.batch_size + hi)
        batches.append(dict(image=torch.randn(len(index), 3, a.image_size, a.image_size, generator=g).to(device),
                            index=index.to(device), flipped=torch.zeros(len(index), dtype=torch.bool, device=device)))
    method = methods.build_method(cfg, observed.numpy(), device)

    def fresh_model():
        torch.manual_seed(0)
        model = models.build_classifier(a.model, num_classes, pretrained=False).to(device)
        return model, TimedAdam(model.parameters(), cfg.lr, device)

    made_group = False
    model, optimizer = fresh_model()
    if world > 1:
        variants = {'DDP' + ('' if a.no_sync_bn else ', sync BN'):
                    (distributed.wrap_model(model, device, sync_bn=not a.no_sync_bn), optimizer)}
    else:
        variants = {'plain': (model, optimizer)}
        if a.ddp:
            made_group = one_process_group(device)
            ddp_model, ddp_optimizer = fresh_model()
            variants['DDP (process group of one)'] = (torch.nn.parallel.DistributedDataParallel(
                ddp_model, device_ids=[device.index] if device.type == 'cuda' else None), ddp_optimizer)
    try:
        gaps, peaks = step_times(variants, cfg, batches, method, observed.to(device), device, a.warmup, a.steps,
                                 a.rounds)
    finally:
        if made_group:
            torch.distributed.destroy_process_group()
    return gaps, peaks, world


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == 'cuda' and not torch.cuda.is_available():
        print('bench_ddp_step.py: error: --device cuda: no CUDA device is visible; run with --device cpu',
              file=sys.stderr)
        return 2
    device = torch.device('cuda', distributed.process().local_rank) if a.device == 'cuda' else torch.device('cpu')
    header = machine_lines(device)
    gaps, peaks, world = measure(a, device)
    median = {name: statistics.median(g) * 1e3 for name, g in gaps.items()}
    lines = header + [f'{world} process(es), {torch.get_num_threads()} thread(s) each, {a.device}, {a.model} at '
                      f'{a.image_size} px, global batch {a.batch_size}; ms per global step: min / median / max over '
                      f'{a.steps} steps' + (f' ({a.rounds} alternating epochs each)' if len(gaps) > 1 else '')]
    for name, g in gaps.items():
        memory = '' if peaks[name] is None else f', peak {peaks[name] / 2 ** 30:.2f} GiB above the resident'
        lines.append(f'{name}: {spread([1e3 * t for t in g])} ms per step '
                     f'({a.batch_size / median[name] * 1e3:.3g} images/s at the median{memory})')
    if len(gaps) == 2:
        plain, ddp = median.values()
        lines.append(f'DDP wrapping overhead: DDP / plain (medians) = {ddp:.4g} / {plain:.4g} = {ddp / plain:.3f}x')
    lines.append(load_line('end'))
    if distributed.is_primary():
        print('\n'.join(lines))
    distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())

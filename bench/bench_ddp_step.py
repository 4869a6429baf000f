"""Time the training step on one process and under a launcher (the per-step cost of several processes).

Run from the repository root:

    OMP_NUM_THREADS=1 python bench/bench_ddp_step.py                     # one process, one thread
    torchrun --standalone --nproc_per_node 2 bench/bench_ddp_step.py     # two processes, one thread each
    python bench/bench_ddp_step.py --device cuda                         # one GPU, plain model
    torchrun --standalone --nproc_per_node 1 bench/bench_ddp_step.py --device cuda --ddp   # one GPU, DDP-wrapped

Every step is engine.train_one_epoch's (the demo's small_cnn at 64 px, EM loss, Adam) on synthetic
images held in memory, so data loading is not timed. With several processes each rank runs its
share of every global batch and the step adds the gathers of distributed.gather_batch, the
gradient all-reduce of DDP and, unless --no-sync-bn, synchronised BatchNorm. The median time per
global step over --steps steps (after --warmup) is printed by rank 0, with images/s.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed  # noqa: E402
import engine  # noqa: E402
import methods  # noqa: E402
import models  # noqa: E402
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch-size', type=int, default=32, help='global batch (the demo\'s)')
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--steps', type=int, default=60, help='timed steps')
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--no-sync-bn', action='store_true')
    p.add_argument('--ddp', action='store_true', help='one process: wrap the model in DDP all the same '
                   '(a process group of one; launch with torchrun --nproc_per_node 1)')
    a = p.parse_args(argv)
    device = torch.device('cuda', distributed.process().local_rank) if a.device == 'cuda' else torch.device('cpu')
    distributed.init_process_group(device.type)
    world, rank = distributed.world_size(), distributed.rank()
    cfg = build_config(dataset='demo', loss='EM', batch_size=a.batch_size, image_size=a.image_size, device=a.device,
                       pretrained=False)
    num_classes = cfg.data.num_classes
    steps = a.steps + a.warmup
    num_rows = steps * a.batch_size
    g = torch.Generator().manual_seed(0)
    observed = torch.zeros(num_rows, num_classes)
    observed[torch.arange(num_rows), torch.randint(0, num_classes, (num_rows,), generator=g)] = 1
    batches = []
    for s in range(steps):
        lo, hi = distributed.share_bounds(a.batch_size, world, rank)
        index = torch.arange(s * a.batch_size + lo, s * a.batch_size + hi)
        batches.append(dict(image=torch.randn(len(index), 3, a.image_size, a.image_size, generator=g),
                            index=index, flipped=torch.zeros(len(index), dtype=torch.bool)))
    torch.manual_seed(0)
    model = models.build_classifier('small_cnn', num_classes, pretrained=False).to(device)
    method = methods.build_method(cfg, observed.numpy(), device)
    optimizer = TimedAdam(model.parameters(), cfg.lr, device)
    train_model = distributed.wrap_model(model, device, sync_bn=not a.no_sync_bn)
    if a.ddp and world == 1:
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    engine.train_one_epoch(1, cfg, train_model, optimizer, batches, method, observed.to(device), None, device,
                           check_every=10 ** 9)
    gaps = torch.tensor(optimizer.times).diff()[a.warmup - 1:]
    ms = float(gaps.median()) * 1e3
    wrapped = 'DDP' if world > 1 or isinstance(train_model, torch.nn.parallel.DistributedDataParallel) else 'plain'
    sync = f', sync BN {"off" if a.no_sync_bn else "on"}' if world > 1 else ''
    distributed.log.info(f'{world} process(es), {torch.get_num_threads()} thread(s) each, {a.device}, {wrapped}{sync}: '
                         f'{ms:.1f} ms per global step of '
                         f'{a.batch_size} images ({a.batch_size / ms * 1e3:.0f} images/s), median of {len(gaps)}')
    distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())

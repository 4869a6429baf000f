"""Parameters and forward+backward time of each head on the same trunk feature map.

Run from the repository root: python bench/bench_heads.py [--device cuda] [--batch 8]

Input: a random feature map B x C x h x w (default 2 x 2048 x 14 x 14: ResNet-50 at 448 px), the
same for every head; K = 80 classes (COCO); SGRE gets random 512-d label embeddings (CLIP
ViT-B text width). Heads: the linear head on the pooled map (this project's default), Query2Label
and SGRE with the originals' defaults, and SGRE with --fused-score and with chunked attention.
Each time is the median of --steps runs after --warmup runs, in train mode.
"""
from __future__ import annotations

import argparse
import statistics
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == '__main__':  # no progress bars in the output (tqdm reads this when first imported)
    os.environ.setdefault('TQDM_DISABLE', '1')

from bench.common import load_line, machine_lines  # noqa: E402
from heads import Query2LabelHead, SGREHead  # noqa: E402


HEAD_NAMES = ('linear', 'q2l', 'sgre', 'sgre-fused', 'sgre-chunk8')


class LinearOnPooled(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_head(head: nn.Module, x: torch.Tensor, steps: int, warmup: int, amp: bool) -> float:
    device = x.device
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = head(x)
        out.float().square().mean().backward()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        head.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu', help='cpu or cuda (default: cpu)')
    p.add_argument('--batch', type=int, default=2, help='B (default: 2)')
    p.add_argument('--channels', type=int, default=2048, help='C (default: 2048, ResNet-50)')
    p.add_argument('--grid', type=int, default=14, help='h = w (default: 14, 448 px at stride 32)')
    p.add_argument('--classes', type=int, default=80, help='K (default: 80)')
    p.add_argument('--steps', type=int, default=3, help='timed runs (default: 3)')
    p.add_argument('--warmup', type=int, default=1, help='untimed runs first (default: 1)')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    p.add_argument('--only', default='', help='comma-separated subset of the head names')
    p.add_argument('--q2l-hidden', type=int, default=2048, help='Query2Label hidden width (default: 2048, the '
                   'original)')
    p.add_argument('--feedforward', type=int, default=None,
                   help='feed-forward width of both transformer heads (default: each original\'s, 8192 and 2048)')
    p.add_argument('--att-dim', type=int, default=1024, help='SGRE attention size (default: 1024, the original)')
    args = p.parse_args(argv)
    unknown = sorted(set(filter(None, args.only.split(','))) - set(HEAD_NAMES))
    if unknown:
        p.error(f'--only: unknown {unknown}; choose among {", ".join(HEAD_NAMES)}')
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.grid, args.grid, device=device)
    emb = torch.randn(args.classes, 512)
    ff = {} if args.feedforward is None else {'dim_feedforward': args.feedforward}
    sgre = dict(att_dim=args.att_dim, **ff)
    builders = {
        'linear': lambda: LinearOnPooled(args.channels, args.classes),
        'q2l': lambda: Query2LabelHead(args.channels, args.classes, hidden_dim=args.q2l_hidden, **ff),
        'sgre': lambda: SGREHead(args.channels, args.classes, emb, **sgre),
        'sgre-fused': lambda: SGREHead(args.channels, args.classes, emb, fused_score=True, **sgre),
        'sgre-chunk8': lambda: SGREHead(args.channels, args.classes, emb, chunk_classes=8, **sgre),
    }
    assert tuple(builders) == HEAD_NAMES
    names = [n for n in builders if not args.only or n in args.only.split(',')]
    print('\n'.join(machine_lines(device)))
    print(f'input {tuple(x.shape)} on {device}{" bf16 autocast" if args.amp else ""}, K={args.classes}')
    for name in names:
        head = builders[name]().to(device).train()
        params = sum(p.numel() for p in head.parameters() if p.requires_grad)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        t = time_head(head, x, args.steps, args.warmup, args.amp)
        mem = f'  peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB' if device.type == 'cuda' else ''
        print(f'{name:12s} {params / 1e6:8.2f} M params  forward+backward {t * 1e3:9.4g} ms{mem}')
        del head
    print(load_line('end'))
    return 0


if __name__ == '__main__':
    sys.exit(main())

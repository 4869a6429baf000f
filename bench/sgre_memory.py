"""Measure the memory of SGRE's label-to-pixel attention on CPU (Linux, glibc).

Run from the repository root: python bench/sgre_memory.py [--classes 80 --tokens 196 ...]

One forward + backward of `heads.LowRankBilinearAttention` for batch 1, in each mode (plain,
--fused-score, --chunk-classes). The bytes in use come from glibc's mallinfo2, sampled after
every tensor operation (a TorchDispatchMode), so the peak is at operation granularity. Printed in
units of one B x K x N x att float32 tensor ("copy"): what the forward pass keeps for the
backward pass, and the peak over forward + backward. Multiply by the batch size for a batch.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_lines  # noqa: E402
from heads import LowRankBilinearAttention  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
                 'fordblks', 'keepcost')]


def _bytes_in_use_fn():
    libc = ctypes.CDLL('libc.so.6')
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd   # heap chunks in use + mmapped blocks (large tensors)
    return in_use


class _PeakTracker(TorchDispatchMode):
    def __init__(self, in_use):
        super().__init__()
        self.in_use = in_use
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def measure(mode: str, classes: int, tokens: int, dim: int, embed_dim: int, att_dim: int, chunk: int,
            in_use) -> tuple[float, float]:
    att = LowRankBilinearAttention(dim, embed_dim, att_dim, chunk_classes=chunk if mode == 'chunked' else None,
                                   fused_score=mode == 'fused')
    x = torch.randn(1, tokens, dim, requires_grad=True)
    emb = torch.randn(classes, embed_dim)
    copy = classes * tokens * att_dim * 4
    for _ in range(2):   # the second run is reported: the first warms up the allocator
        base = in_use()
        with _PeakTracker(in_use) as tracker:
            a = att(x, emb)
            kept = in_use() - base
            a.square().sum().backward()
        peak = tracker.peak - base
        del a
        x.grad = None
    return kept / copy, peak / copy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--classes', type=int, default=80, help='K (default: 80, COCO)')
    p.add_argument('--tokens', type=int, default=196, help='N = h*w (default: 196, 448 px at stride 32)')
    p.add_argument('--dim', type=int, default=256, help='token channels D (small by default; it does not scale the intermediate)')
    p.add_argument('--embed-dim', type=int, default=64, help='label-embedding size E (default: 64)')
    p.add_argument('--att-dim', type=int, default=1024, help='attention size (default: 1024, the original)')
    p.add_argument('--chunk-classes', type=int, default=8, help='classes per block in the chunked mode (default: 8)')
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _report(args)
    finally:
        torch.set_num_threads(threads)


def _report(args) -> int:
    in_use = _bytes_in_use_fn()
    print(machine_lines()[0])  # memory, not time: the load does not matter
    copy = args.classes * args.tokens * args.att_dim * 4
    print(f'one copy (1 x {args.classes} x {args.tokens} x {args.att_dim} float32) = {copy / 1e6:.1f} MB per image')
    for mode in ('plain', 'fused', 'chunked'):
        kept, peak = measure(mode, args.classes, args.tokens, args.dim, args.embed_dim, args.att_dim,
                             args.chunk_classes, in_use)
        print(f'{mode:8s} kept for backward {kept:5.2f} copies   peak forward+backward {peak:5.2f} copies')
    return 0


if __name__ == '__main__':
    sys.exit(main())

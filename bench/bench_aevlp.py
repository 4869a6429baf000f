"""AEVLP's scoring step per training batch, in fp32 and fp16, side by side.

Run from the repository root: python bench/bench_aevlp.py [--clip-model ViT-B-16] [--device cuda]

One step of aevlp.CropScorer: B images x (1 + G^2) uint8 views flipped and normalised on the device,
the frozen CLIP image tower, cosines with a K x D class matrix, and AEVLP's pseudo-label rule. The
CLIP has random weights (the time does not depend on them); default: the demo's tiny CLIP at its
64 px, batch 32, G = 4, K = 30 (the demo's settings). Each time is the median of --steps runs after
--warmup runs; the last line gives the fp16 / fp32 ratio (the reason --aevlp-precision auto scores
in fp32 on the CPU).
"""
from __future__ import annotations

import argparse
import statistics
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == '__main__':  # no progress bars in the output (tqdm reads this when first imported)
    os.environ.setdefault('TQDM_DISABLE', '1')

import aevlp  # noqa: E402
import clip_loading  # noqa: E402
from bench.common import load_line, machine_lines  # noqa: E402


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def step_time(scorer, views, flips, index, steps: int, warmup: int, device) -> float:
    batch = {'views': views, 'view_flips': flips}
    for _ in range(warmup):
        scorer(index, batch)
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        scorer(index, batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--clip-model', default='vlpl-demo-tiny')
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--grid', type=int, default=4)
    p.add_argument('--classes', type=int, default=30)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    size = clip_loading.configured_image_size(a.clip_model)
    views = torch.randint(0, 256, (a.batch, 1 + a.grid ** 2, size, size, 3), dtype=torch.uint8)
    flips = torch.rand(a.batch, 1 + a.grid ** 2) < 0.5
    observed = torch.zeros(a.batch, a.classes, device=device)
    observed[torch.arange(a.batch), torch.arange(a.batch) % a.classes] = 1
    index = torch.arange(a.batch, device=device)
    hp = dict(grid_size=a.grid, temp=0.01, eta=0.0, top_k=3, threshold=0.5, negative_ratio=0.2)
    print('\n'.join(machine_lines(device)))
    print(f'{a.clip_model} at {size} px, {a.batch} images x {1 + a.grid ** 2} views, K = {a.classes}, '
          f'{device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else torch.get_num_threads()} '
          f'{"" if device.type == "cuda" else "threads"})')
    seconds = {}
    for precision, dtype in (('fp32', torch.float32), ('fp16', torch.float16)):
        model, _ = clip_loading.load_clip(a.clip_model, None, device=device, precision=precision)
        width = clip_loading.clip_embed_dim(model)
        text = aevlp.text_matrix(torch.randn(a.classes, width, device=device).to(dtype), None, None)
        scorer = aevlp.CropScorer(model.visual.eval(), text, observed, hp)
        seconds[precision] = step_time(scorer, views, flips, index, a.steps, a.warmup, device)
        print(f'{precision}: {1000 * seconds[precision]:.4g} ms per step')
    fp16, fp32 = 1000 * seconds['fp16'], 1000 * seconds['fp32']
    print(f'fp16 / fp32 time: {fp16:.4g} / {fp32:.4g} = {fp16 / fp32:.2f}')
    print(load_line('end'))
    return 0


if __name__ == '__main__':
    sys.exit(main())

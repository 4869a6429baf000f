"""Time one training step of the seed systems' backbones with each head, at their real input sizes.

Run from the repository root:

    python bench/bench_seed_backbones.py --device cuda            # the four seed rows x linear / q2l / sgre
    python bench/bench_seed_backbones.py --rows timm:resnet18 --image-size 64 --batch-size 2 --steps 1

Random initialisation (nothing is downloaded; the weights do not change the time): models.build_classifier
for every (backbone, head), AdamW, the ASL loss of Query2Label and SGRE (gamma_neg 2, gamma_pos 0; CSL's
losses_partial.asymmetric_loss) on random 0/1 labels of K = 20 classes (VOC2007), bf16 autocast on CUDA
(--amp of main_clip), batch --batch-size. A step is forward, loss, backward and optimiser step; the time
is the median over --steps steps after --warmup steps, read after torch.cuda.synchronize(). Also the
peak GPU memory of the steps. Each row at its published input size unless --image-size is given:
resnet101 448, tresnet_m 224 (CSL), tresnet_l 448, swin_large 384 (Query2Label).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import losses_partial  # noqa: E402
import models  # noqa: E402
from bench.common import load_line, machine_lines  # noqa: E402

SIZES = {'resnet101': 448, 'tresnet_m': 224, 'tresnet_l': 448, 'swin_large': 384}
NUM_CLASSES = 20


def one_config(name: str, head: str, size: int, args, device) -> dict:
    torch.manual_seed(0)
    options = {}
    if head == 'sgre':  # SGRE's label embeddings: a K x 768 matrix (its BERT embeddings' width)
        options = dict(label_embeddings=np.random.RandomState(0).randn(NUM_CLASSES, 768).astype(np.float32))
    if args.head_width:  # smaller transformer heads (tests/test_bench.py runs the bench tiny)
        width = {'q2l': dict(hidden_dim=args.head_width, dim_feedforward=2 * args.head_width),
                 'sgre': dict(att_dim=args.head_width, dim_feedforward=2 * args.head_width)}
        options |= width.get(head, {})
    model = models.build_classifier(name, NUM_CLASSES, pretrained=False, head=head, image_size=size,
                                    **options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = (torch.rand(args.batch_size, NUM_CLASSES, device=device) < 0.1).float()
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else torch.autocast('cpu', enabled=False)

    def step() -> float:
        t0 = time.perf_counter()
        with amp:
            logits, aux = model.forward_with_aux(images)
        loss = losses_partial.asymmetric_loss(logits.float(), labels, gamma_neg=2, gamma_pos=0, clip=0.0, eps=1e-5,
                                              disable_torch_grad_focal_loss=True)
        if aux is not None:
            loss = loss + 0.1 * losses_partial.asymmetric_loss(aux.float(), labels, gamma_neg=2, gamma_pos=0, clip=0.0,
                                                               eps=1e-5, disable_torch_grad_focal_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    model.train()
    for _ in range(args.warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(step() for _ in range(args.steps))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else float('nan')
    return dict(name=name, head=head, size=size, map=tuple(model.feature_shape(size)), params=params,
                ms=1000 * seconds, images_per_s=args.batch_size / seconds, peak_gib=peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--rows', default=','.join(SIZES), help='backbones (rows or timm:NAME), comma-separated')
    p.add_argument('--heads', default='linear,q2l,sgre', help='heads, comma-separated')
    p.add_argument('--image-size', type=int, default=None, help='input side for every row (default: the row\'s)')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--head-width', type=int, default=None,
                   help='Query2Label hidden size and SGRE attention size, feed-forward twice that (default: the '
                        'originals\')')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    import timm
    print('\n'.join(machine_lines(device)))
    print(f'torch {torch.__version__}, timm {timm.__version__}, device '
          f'{torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}, batch {args.batch_size}, '
          f'median of {args.steps} steps after {args.warmup}')
    print('| backbone | head | input | map (C, h, w) | parameters (M) | ms / step | images / s | peak GiB |')
    print('|---|---|---|---|---|---|---|---|')
    for name in args.rows.split(','):
        size = args.image_size or SIZES.get(name, 224)
        for head in args.heads.split(','):
            r = one_config(name, head, size, args, device)
            print(f'| {name} | {head} | {size} | {r["map"]} | {r["params"]:.1f} | {r["ms"]:.4g} | '
                  f'{r["images_per_s"]:.4g} | {r["peak_gib"]:.1f} |', flush=True)
    print(load_line('end'))
    return 0


if __name__ == '__main__':
    sys.exit(main())

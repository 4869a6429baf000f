"""Images per second of the input pipeline: PIL (decode + resize in the workers) against the packs
of preproc/pack_images.py (uint8 rows read from a memory map, flip and normalisation on the
device), side by side in one run, with the images per second the training step consumes.

Run from the repository root:

    python bench/bench_loader.py                          # 256 synthetic 640 x 480 JPEGs, 448 px
    python bench/bench_loader.py --device cuda            # normalisation on the GPU
    python bench/bench_loader.py -d coco --images 2000    # the first rows of a packed test split
    python bench/bench_loader.py --compile                # also a torch.compile'd training step

Both pipelines read the same images with the same --num-workers and batch size, in the same
shuffled (row, flip) order a FlipSampler draws, and each batch is made into the network input on
--device (datasets.to_model_input), so each side is timed up to the tensor the model reads. The
timed passes alternate (PIL, packed, PIL, packed, ...) and the best pass of each is reported. An
untimed pass first compares every tensor of the two pipelines (they must be bit-identical).

The training step: one ResNet-50 step at the same size and batch (engine.train_one_epoch, method
EM: the step of EM_PL with cached pseudo-labels, whose lookup costs nothing next to the network),
random weights, median of --steps. The input pipeline keeps up when its images/s exceed the step's.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGET_RATIO = 5.0  # issue 18: packed >= 5x the PIL pipeline on the 2-core development machine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('-d', '--dataset', default=None,
                   help='read the first --images rows of the test split of this dataset (its images and its '
                        'test pack must exist; default: synthetic JPEGs)')
    p.add_argument('--data-root', default=None, help='with -d: main_clip.py --data-root')
    p.add_argument('--images', type=int, default=256, help='images per pass (default: 256)')
    p.add_argument('--source-size', default='640x480',
                   help='synthetic JPEGs: W x H (default 640x480, a typical COCO image)')
    p.add_argument('--image-size', type=int, default=448, help='network input side (default: 448)')
    p.add_argument('--batch-size', type=int, default=8, help='default: 8, as the original')
    p.add_argument('--num-workers', type=int, default=os.cpu_count() or 1,
                   help='DataLoader workers of both pipelines (default: the CPU count)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to_model_input runs')
    p.add_argument('--passes', type=int, default=2, help='timed passes of each pipeline (default: 2)')
    p.add_argument('--steps', type=int, default=2, help='timed training steps, median (default: 2)')
    p.add_argument('--no-step', action='store_true', help='skip timing the training step')
    p.add_argument('--model', default='resnet50', help='backbone of the timed training step (default: resnet50)')
    p.add_argument('--compile', action='store_true', help='also time the training step under torch.compile')
    p.add_argument('--amp', action='store_true', help='the training step under bf16 autocast (CUDA only)')
    return p


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic_dataset(folder: Path, count: int, size: str):
    """`count` JPEGs of smooth random content (they compress like photos) under folder/coco/."""
    from PIL import Image

    import datasets
    width, height = (int(v) for v in size.lower().split('x'))
    root = folder / 'coco'  # image_dir of coco is '.'
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    names = []
    for i in range(count):
        small = rng.randint(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        noise = rng.randint(-12, 13, (height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        name = f'img_{i:05d}.jpg'
        img.save(root / name, quality=90)
        names.append(name)
    labels = np.zeros((count, 80), dtype=np.float32)
    return datasets.Split(np.array(names), labels, labels.copy())


def make_loader(dataset, keys, args):
    workers = args.num_workers
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=keys, num_workers=workers,
                                       collate_fn=__import__('datasets').collate_skipping,
                                       pin_memory=args.device == 'cuda', persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


def one_pass(loader, device, sync) -> float:
    """Images per second from the first batch to the last (worker start-up not counted)."""
    import datasets
    count, start = 0, None
    for batch in loader:
        x = datasets.to_model_input(batch['image'], batch['flipped'], device)
        sync()
        if start is None:
            start = time.perf_counter()
            continue
        count += x.shape[0]
    return count / (time.perf_counter() - start)


def step_rate(args, device, sync, compile_model: bool) -> float:
    """Images per second of one training step (median of --steps after one untimed step)."""
    import dataclasses

    import engine
    import methods
    import models
    from config import build_config

    cfg = build_config(dataset='coco', loss='EM', model=args.model, pretrained=False, device=device.type,
                       batch_size=args.batch_size, image_size=args.image_size, amp=args.amp)
    cfg = dataclasses.replace(cfg, compile=compile_model)
    torch.manual_seed(0)
    b, k = args.batch_size, 80
    model = models.build_classifier(args.model, k, pretrained=False).to(device)
    optimizer = torch.optim.Adam(model.param_groups(cfg.lr), lr=cfg.lr)
    train_model = torch.compile(model) if compile_model else model
    observed = np.zeros((b, k), dtype=np.float32)
    observed[np.arange(b), np.arange(b) % k] = 1
    method = methods.build_method(cfg, observed, device)
    batch = dict(image=torch.randn(b, 3, args.image_size, args.image_size), index=torch.arange(b),
                 flipped=torch.zeros(b, dtype=torch.bool))
    true = torch.as_tensor(observed, device=device)
    times = []
    for i in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        engine.train_one_epoch(1, cfg, train_model, optimizer, [batch], method, true, None, device)
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0:
            log(f'  first step {times[0]:.1f} s{" (compilation included)" if compile_model else ""}')
    return b / statistics.median(times[1:])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import datasets
    import packs

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with tempfile.TemporaryDirectory(prefix='bench_loader_') as tmp:
        if args.dataset:
            from config import DEFAULT_DIRS
            data_root = args.data_root or DEFAULT_DIRS['data']
            split = datasets.load_splits(data_root, args.dataset, clean_train_labels=True)['test']
            dataset = args.dataset
        else:
            data_root, dataset = Path(tmp), 'coco'
            log(f'writing {args.images} synthetic {args.source_size} JPEGs ...')
            split = synthetic_dataset(Path(tmp), args.images, args.source_size)
            t0 = time.perf_counter()
            packs.write_pack(data_root, dataset, 'test', split, args.image_size, num_workers=args.num_workers)
            log(f'packed them in {time.perf_counter() - t0:.1f} s (once per dataset)')
        root = datasets.image_root(data_root, dataset)
        pil = datasets.MultiLabelImages(root, split, args.image_size, train=True, dataset=dataset)
        packed = packs.PackedImages(data_root, split, args.image_size, train=True, dataset=dataset, phase='test')
        n = min(args.images, len(split))
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(split), generator=generator)[:n].tolist()
        keys = list(zip(order, (torch.rand(n, generator=generator) < 0.5).tolist()))
        loaders = {'PIL': make_loader(pil, keys, args), 'packed': make_loader(packed, keys, args)}

        log(f'comparing every tensor of the two pipelines ({n} images, both flips as drawn) ...')
        identical = True
        for a, b in zip(loaders['PIL'], loaders['packed']):
            x = datasets.to_model_input(a['image'], a['flipped'], device)
            y = datasets.to_model_input(b['image'], b['flipped'], device)
            identical &= bool(torch.equal(x, y)) and torch.equal(a['index'], b['index'])
        rates = {name: [] for name in loaders}
        for p in range(args.passes):
            for name, loader in loaders.items():
                rates[name].append(one_pass(loader, device, sync))
                log(f'  pass {p + 1} {name}: {rates[name][-1]:.1f} images/s')
        best = {name: max(r) for name, r in rates.items()}

        steps = {}
        if not args.no_step:
            log(f'timing the training step ({args.model}, {args.image_size} px, batch {args.batch_size}) ...')
            steps['eager'] = step_rate(args, device, sync, False)
            if args.compile:
                try:
                    steps['torch.compile'] = step_rate(args, device, sync, True)
                except Exception as err:  # a missing compiler, an unsupported op: report, do not hide
                    log(f'  torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}')

    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()
    print(f'input pipeline, {n} images of {"dataset " + dataset if args.dataset else args.source_size + " JPEG"} -> '
          f'{args.image_size} px, batch {args.batch_size}, {args.num_workers} workers, {os.cpu_count()} CPUs, '
          f'to_model_input on {device} ({name}), torch {torch.__version__}')
    print(f'| pipeline | images/s (best of {args.passes}) |')
    print('|---|---:|')
    for key in best:
        print(f'| {key} | {best[key]:.1f} |')
    ratio = best['packed'] / best['PIL']
    verdict = 'meets' if ratio >= TARGET_RATIO else 'below'
    print(f'ratio packed / PIL: {ratio:.1f}x ({verdict} the {TARGET_RATIO:.0f}x target); tensors '
          f'{"bit-identical" if identical else "DIFFER"} over all {n} images')
    for key, rate in steps.items():
        side = 'the input pipeline' if rate > best['PIL'] else 'the training step'
        print(f'training step ({key}, {args.model}{" --amp" if args.amp else ""}): {rate:.3g} images/s needed; '
              f'with PIL the bottleneck is {side}; packed gives {best["packed"] / rate:.1f}x what the step needs')
    return 0 if identical else 1


if __name__ == '__main__':
    sys.exit(main())

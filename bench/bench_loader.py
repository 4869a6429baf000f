"""Images per second of the input pipeline: PIL (decode + resize in the workers) against the packs
of preproc/pack_images.py (uint8 rows read from a memory map, flip and normalisation on the
device), side by side in one run, where the time of each goes, and the images per second the
training step consumes.

Run from the repository root:

    python bench/bench_loader.py                          # 256 synthetic 640 x 480 JPEGs, 448 px
    python bench/bench_loader.py --device cuda            # normalisation on the GPU
    python bench/bench_loader.py -d coco --images 2000    # the first rows of a packed test split
    python bench/bench_loader.py --compile                # also a torch.compile'd training step

Pipelines, each reading the same images in the same shuffled (row, flip) order a FlipSampler draws,
batch by batch up to the tensor the model reads (image_io.to_model_input on --device):

  PIL                  MultiLabelImages in --num-workers DataLoader workers (the original pipeline)
  packed               PackedImages in --num-workers workers (the batch crosses to the main
                       process in shared memory)
  packed, main process PackedImages read by the main process itself (--num-workers 0): with the
                       pack in the page cache, reading a row costs less than handing it over

The timed passes alternate (PIL, packed, packed main, PIL, ...); each row gives the min / median /
max over --passes and the CPU time per image of the main process and its workers. The ratios are
of the medians. An untimed pass first compares every tensor of the pipelines (bit-identical).

--profile (default on): each stage of both pipelines alone, in this process on one thread, per
image: what a worker does for PIL (read the file, decode, resize, flip, ToTensor, Normalize, the
batch into shared memory) and for the packs (read the rows, into ordinary or shared memory, and
the flip, conversion and normalisation of to_model_input, alone and fused). Their sums bound the
images/s this machine can reach: CPUs / (CPU time per image).

The training step: one step of --model at the same size and batch (engine.train_one_epoch, method
EM: the step of EM_PL with cached pseudo-labels, whose lookup costs nothing next to the network),
random weights, median of --steps. The input pipeline keeps up when its images/s exceed the step's.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == '__main__':  # no progress bars in the output (tqdm reads this when first imported)
    os.environ.setdefault('TQDM_DISABLE', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (cpu_count, device_sync, load_line, log, machine_lines,  # noqa: E402
                          spread)

TARGET_RATIO = 5.0  # issue 18: packed >= 5x the PIL pipeline on the 2-core development machine
MAIN = 'packed, main process'


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
    p.add_argument('--num-workers', type=int, default=cpu_count(),
                   help='DataLoader workers of the PIL and packed rows (default: the CPU count)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to_model_input runs')
    p.add_argument('--passes', type=int, default=3, help='timed passes of each pipeline (default: 3)')
    p.add_argument('--profile', action=argparse.BooleanOptionalAction, default=True,
                   help='time every stage alone, per image (default: on)')
    p.add_argument('--profile-images', type=int, default=32, help='images of the stage profile (default: 32)')
    p.add_argument('--steps', type=int, default=2, help='timed training steps, median (default: 2)')
    p.add_argument('--no-step', action='store_true', help='skip timing the training step')
    p.add_argument('--model', default='resnet50', help='backbone of the timed training step (default: resnet50)')
    p.add_argument('--compile', action='store_true', help='also time the training step under torch.compile')
    p.add_argument('--amp', action='store_true', help='the training step under bf16 autocast (CUDA only)')
    return p


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
        small = rng.randint(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        noise = rng.randint(-12, 13, (height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        name = f'img_{i:05d}.jpg'
        img.save(root / name, quality=90)
        names.append(name)
    labels = np.zeros((count, 80), dtype=np.float32)
    return datasets.Split(np.array(names), labels, labels.copy())


def make_loader(dataset, keys, batch_size: int, workers: int, device):
    import image_dataset
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=workers,
                                       collate_fn=image_dataset.collate_skipping,
                                       pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


def _worker_cpu_seconds(loader) -> float:
    """CPU seconds (user + system) used so far by the loader's live worker processes (Linux /proc)."""
    iterator = getattr(loader, '_iterator', None)
    total = 0.0
    for worker in getattr(iterator, '_workers', []) or []:
        try:
            fields = Path(f'/proc/{worker.pid}/stat').read_text().rsplit(')', 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')  # utime, stime
        except (OSError, ValueError, IndexError):
            return float('nan')
    return total


def one_pass(loader, device, sync) -> tuple[float, float]:
    """(images per second from the first batch to the last, CPU ms per image of this process and the
    loader's workers over the same span); worker start-up is not counted."""
    import image_io
    count, start = 0, None
    for batch in loader:
        x = image_io.to_model_input(batch['image'], batch['flipped'], device)
        sync()
        if start is None:
            start, cpu0, workers0 = time.perf_counter(), time.process_time(), _worker_cpu_seconds(loader)
            continue
        count += x.shape[0]
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0 + _worker_cpu_seconds(loader) - workers0
    return count / seconds, 1e3 * cpu / max(count, 1)


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


# ----------------------------------------------------------------------------------------------
# The stage profile: every stage alone, one thread, CPU ms per image


def _ms_per_image(fn, images: int, repeats: int = 3, clock=time.process_time) -> float:
    """Median over `repeats` of fn()'s time per image (fn handles `images` images). The clock is this
    process's CPU time (user + system: page faults count), which other processes' load barely
    changes, unlike the wall time; a stage on the GPU is timed by the wall clock."""
    fn()  # warm: first-touch page faults and lazy imports are not a stage's cost
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return 1e3 * statistics.median(times) / images


def profile_stages(pil, packed, keys, batch_size: int, device) -> list[tuple[str, str, float]]:
    """[(pipeline, stage, CPU ms per image)] of each stage alone on `keys`, in this process on one thread.

    PIL: the work of MultiLabelImages.__getitem__ split into its calls, then default_collate's
    stack into a fresh shared-memory batch (what a worker does before the hand-off). Packed: the rows
    read into a batch (PackedImages.__getitems__) in ordinary and in shared memory, then
    to_model_input's flip, ToTensor conversion and Normalize alone (tensor operations) and as the
    CPU runs them (one byte-table lookup, fused), or on the device.
    """
    from PIL import Image
    from torchvision.transforms import functional as TF

    import image_io
    import packs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n, size = len(keys), packed.image_size
        rows, flips = [k[0] for k in keys], [bool(k[1]) for k in keys]
        paths = [pil.root / str(pil.split.images[i]) for i in rows]
        raw = [p.read_bytes() for p in paths]
        decoded = [Image.open(io.BytesIO(b)).convert('RGB') for b in raw]
        resized = [TF.resize(img, [size, size]) for img in decoded]
        tensors = [TF.to_tensor(img) for img in resized]
        normalised = [TF.normalize(t, image_io.IMAGENET_MEAN, image_io.IMAGENET_STD) for t in tensors]
        chunks = [slice(lo, lo + batch_size) for lo in range(0, n, batch_size)]

        def collate_shared():
            for c in chunks:
                part = normalised[c]
                torch.stack(part, out=packs.batch_buffer((len(part),) + tuple(part[0].shape), shared=True,
                                                            dtype=torch.float32))

        stages = [
            ('PIL', 'read the JPEG file', _ms_per_image(lambda: [p.read_bytes() for p in paths], n)),
            ('PIL', 'decode to RGB (Image.open + convert)',
             _ms_per_image(lambda: [Image.open(io.BytesIO(b)).convert('RGB') for b in raw], n)),
            ('PIL', f'resize to {size} px (TF.resize)', _ms_per_image(lambda: [TF.resize(img, [size, size])
                                                                             for img in decoded], n)),
            ('PIL', 'flip (TF.hflip, the rows drawn flipped)',
             _ms_per_image(lambda: [TF.hflip(img) for img, f in zip(resized, flips) if f], n)),
            ('PIL', 'ToTensor (TF.to_tensor)', _ms_per_image(lambda: [TF.to_tensor(img) for img in resized], n)),
            ('PIL', 'Normalize (TF.normalize)', _ms_per_image(
                lambda: [TF.normalize(t, image_io.IMAGENET_MEAN, image_io.IMAGENET_STD) for t in tensors], n)),
            ('PIL', 'float32 batch into shared memory (a worker\'s collate)', _ms_per_image(collate_shared, n)),
        ]

        batches = [packed.__getitems__(keys[c]) for c in chunks]

        def read_rows(shared: bool):
            array = packed._rows()
            for c in chunks:
                part = rows[c]
                shape = (len(part),) + array.shape[1:]
                out = packs.batch_buffer(shape, shared=shared).numpy()
                for k, i in enumerate(part):
                    out[k] = array[i]

        def flip_only():
            for b in batches:
                for k in torch.nonzero(b['flipped'])[:, 0].tolist():
                    b['image'][k].flip(1)

        chw = [b['image'].permute(0, 3, 1, 2) for b in batches]
        scaled = [x.float().div(255) for x in chw]
        stages += [
            ('packed', 'read the rows into a batch (memory map, main process)', _ms_per_image(
                lambda: read_rows(False), n)),
            ('packed', 'read the rows into shared memory (as in a worker)', _ms_per_image(lambda: read_rows(True), n)),
            ('packed', 'whole batch read (PackedImages.__getitems__, labels included)', _ms_per_image(
                lambda: [packed.__getitems__(keys[c]) for c in chunks], n)),
            ('packed', 'flip alone (uint8, the rows drawn flipped)', _ms_per_image(flip_only, n)),
            ('packed', 'ToTensor alone (uint8 HWC -> float32 CHW / 255)', _ms_per_image(
                lambda: [x.float().div(255) for x in chw], n)),
            ('packed', 'Normalize alone ((x - mean) / std)', _ms_per_image(
                lambda: [image_io._normalise(x) for x in scaled], n)),
            ('packed', f'flip + ToTensor + Normalize as to_model_input runs them on {device.type}'
                       + (' (byte-table lookup, fused)' if device.type == 'cpu' else
                          ' (copy to the device included; wall time)'),
             _ms_per_image(lambda: [image_io.to_model_input(b['image'], b['flipped'], device) for b in batches]
                           + [device_sync(device)()], n, clock=time.process_time if device.type == 'cpu'
                           else time.perf_counter)),
        ]
        return stages
    finally:
        torch.set_num_threads(threads)


def profile_table(stages, cpus: int, workers: int) -> list[str]:
    """The stage table, the CPU time per image each pipeline needs, and the ceiling it sets here."""
    lines = ['| pipeline | stage (alone, one thread) | CPU ms per image |', '|---|---|---:|']
    lines += [f'| {pipeline} | {stage} | {ms:.4f} |' for pipeline, stage, ms in stages]
    t = {(p, s.split(' (')[0]): ms for p, s, ms in stages}
    pil = sum(ms for p, s, ms in stages if p == 'PIL')
    convert = stages[-1][2]
    in_worker = t[('packed', 'read the rows into shared memory')] + convert
    in_main = t[('packed', 'read the rows into a batch')] + convert
    lines.append('')
    lines.append(f'sums: PIL {pil:.4f} ms per image in its workers; packed {in_worker:.4f} ms (rows into shared '
                 f'memory + to_model_input) with workers, {in_main:.4f} ms read by the main process')
    lines.append(f'ceiling on {cpus} CPUs (every CPU busy with nothing else): PIL {1e3 * cpus / pil:.0f} images/s, '
                 f'packed {1e3 * cpus / in_worker:.0f} with workers, {1e3 * cpus / in_main:.0f} read by the main '
                 f'process (to_model_input spreads over {torch.get_num_threads()} threads); ratio ceilings '
                 f'{pil / in_worker:.2f}x and {pil / in_main:.2f}x')
    if workers:
        lines.append('the worker hand-off (pickling, the queue, page faults of fresh shared memory in both '
                     'processes) comes on top: compare the sums with the measured CPU ms per image above')
    return lines


@dataclasses.dataclass
class LoaderFigures:
    """What measure() found: per pipeline the images/s and CPU ms per image of every pass, its workers
    and (CUDA) its peak GPU memory; whether the tensors agree; the stage profile; the step's images/s."""
    source: str
    images: int
    workers: dict
    rates: dict
    cpu_ms: dict
    peak_bytes: dict
    identical: bool
    stages: list | None
    steps: dict

    @property
    def median(self) -> dict:
        return {name: statistics.median(r) for name, r in self.rates.items()}


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ('images', 'image_size', 'batch_size', 'passes', 'steps', 'profile_images'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be >= 1')
    if args.num_workers < 0:
        parser.error('--num-workers must be >= 0')
    return args


def measure(args, device) -> LoaderFigures:
    """Every pipeline on the same images and keys: the comparison pass, the timed passes, the stage
    profile and the training step, as the module's docstring says."""
    import datasets
    import image_dataset
    import image_io
    import packs

    sync = device_sync(device)
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
        pil = image_dataset.MultiLabelImages(root, split, args.image_size, train=True, dataset=dataset)
        packed = packs.PackedImages(data_root, split, args.image_size, train=True, dataset=dataset, phase='test',
                                    pin_memory=device.type == 'cuda')
        n = min(args.images, len(split))
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(split), generator=generator)[:n].tolist()
        keys = list(zip(order, (torch.rand(n, generator=generator) < 0.5).tolist()))
        w = args.num_workers
        loaders = {'PIL': make_loader(pil, keys, args.batch_size, w, device),
                   'packed': make_loader(packed, keys, args.batch_size, w, device)}
        if w > 0:
            loaders[MAIN] = make_loader(packed, keys, args.batch_size, 0, device)

        log(f'comparing every tensor of the pipelines ({n} images, both flips as drawn) ...')
        identical = True
        for group in zip(*loaders.values()):
            made = [image_io.to_model_input(b['image'], b['flipped'], device) for b in group]
            identical &= all(torch.equal(made[0], x) and torch.equal(group[0]['index'], b['index'])
                             for x, b in zip(made[1:], group[1:]))
        rates = {name: [] for name in loaders}
        cpu_ms = {name: [] for name in loaders}
        peaks = {name: None for name in loaders}
        for p in range(args.passes):
            for name, loader in loaders.items():
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                rate, ms = one_pass(loader, device, sync)
                if device.type == 'cuda':
                    peaks[name] = max(peaks[name] or 0, torch.cuda.max_memory_allocated() - before)
                rates[name].append(rate)
                cpu_ms[name].append(ms)
                log(f'  pass {p + 1} {name}: {rate:.1f} images/s')
        stages = profile_stages(pil, packed, keys[:args.profile_images], args.batch_size, device) if args.profile \
            else None

        steps = {}
        if not args.no_step:
            log(f'timing the training step ({args.model}, {args.image_size} px, batch {args.batch_size}) ...')
            steps['eager'] = step_rate(args, device, sync, False)
            if args.compile:
                try:
                    steps['torch.compile'] = step_rate(args, device, sync, True)
                except Exception as err:  # a missing compiler, an unsupported op: report, do not hide
                    log(f'  torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}')
        del loaders
    source = f'dataset {dataset}' if args.dataset else f'{args.source_size} JPEG'
    return LoaderFigures(source, n, {name: 0 if name == MAIN else w for name in rates}, rates, cpu_ms, peaks,
                         identical, stages, steps)


def report(fig: LoaderFigures, args, device) -> list[str]:
    """The result lines: the pipelines' table, the ratios of the medians, the step, the profile."""
    median = fig.median
    lines = [f'input pipeline: {fig.images} images of {fig.source} -> {args.image_size} px, batch {args.batch_size}, '
             f'to_model_input on {device}; {args.passes} passes each, alternating', '',
             '| pipeline | workers | images/s min / median / max | CPU ms per image (median; main + workers) |',
             '|---|---:|---|---:|']
    for name in fig.rates:
        lines.append(f'| {name} | {fig.workers[name]} | {spread(fig.rates[name], ".1f")} | '
                     f'{statistics.median(fig.cpu_ms[name]):.3f} |')
    lines.append('')
    for name in fig.rates:
        if name != 'PIL':
            ratio = median[name] / median['PIL']
            lines.append(f'ratio {name} / PIL (medians): {median[name]:.1f} / {median["PIL"]:.1f} = {ratio:.2f}x '
                         f'({"meets" if ratio >= TARGET_RATIO else "below"} the {TARGET_RATIO:.0f}x target)')
    lines.append(f'tensors {"bit-identical" if fig.identical else "DIFFER"} across the pipelines over all '
                 f'{fig.images} images')
    for key, rate in fig.steps.items():
        best = max(median[name] for name in median if name != 'PIL')
        side = 'the input pipeline' if rate > median['PIL'] else 'the training step'
        lines.append(f'training step ({key}, {args.model}{" --amp" if args.amp else ""}): {rate:.3g} images/s '
                     f'needed; with PIL the bottleneck is {side}; the faster packed row gives {best / rate:.1f}x '
                     'what the step needs')
    if fig.stages is not None:
        lines += [''] + profile_table(fig.stages, cpu_count(), args.num_workers)
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('bench_loader.py: error: --device cuda: no CUDA device is visible; run with --device cpu',
              file=sys.stderr)
        return 2
    header = machine_lines(device)
    fig = measure(args, device)
    print('\n'.join(header + report(fig, args, device) + [load_line('end')]))
    return 0 if fig.identical else 1


if __name__ == '__main__':
    sys.exit(main())

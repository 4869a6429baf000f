"""Time this project's speed-ups against the original's behaviour, side by side in one process.

Run from the repository root:

    python bench/bench_speed.py                   # CPU: about 5 minutes on 2 idle cores
    python bench/bench_speed.py --device cuda     # adds bf16 autocast and channels_last rows

Real architectures with random initialisation (nothing is downloaded): ResNet-50 at 448 px and
the frozen CLIP ViT-L-14-336 image tower with random unit text features (K = 80), batch 8, the
same random batch for every variant (--model, --clip-model, --image-size, --batch-size make it
smaller; tests/test_bench.py runs it tiny). The batch is already on the device: data loading is
not timed. The pseudo-label sources are the training script's own (pseudo_label_policy.build_pseudo_labels
with --clip-mode online and cache), so the bench calls them as engine.train_one_epoch does.

  train    one EM_PL step of engine.train_one_epoch on a one-batch loader: pseudo-labels from
           the frozen CLIP run on the batch (--clip-mode online, the original) vs looked up from
           cached embeddings (--clip-mode cache)
  eval     one evaluation step: the original also runs the frozen CLIP (its output is unused);
           ours (engine.predict) runs the classifier only, under inference_mode
  metrics  metrics.compute_metrics vs the original's per-image loop (40,137 x 80, COCO test size)
  parts    (not run by default) the pieces of a step alone, to see which one dominates

The variants of one comparison run interleaved (A, B, A, B, ...), so that a change of machine
load hits them alike; each time is the median over --steps runs after --warmup runs, and each
speed-up is the baseline's median over the variant's, as printed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == '__main__':  # no progress bars in the output (tqdm reads this when first imported)
    os.environ.setdefault('TQDM_DISABLE', '1')

from bench.common import (device_sync, load_line, log as progress, machine_lines,  # noqa: E402
                          spread, time_interleaved)

SECTIONS = ('train', 'eval', 'metrics', 'parts', 'overhead')
NUM_CLASSES = 80  # COCO
UNRATED = ('parts', 'overhead')  # sections of pieces, not of alternatives: no speed-up
METRICS_SHAPE = (40137, NUM_CLASSES)  # COCO test split
# Ratios the issue asks for: (section, variant key) -> minimal speed-up over the section's baseline.
TARGETS = {('train', 'cached'): ('cpu', 2.5), ('eval', 'ours'): (None, 5.0),
           ('train', 'cached_amp_cl'): ('cuda', 4.0)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where the networks run (default: cpu)')
    p.add_argument('--steps', type=int, default=None,
                   help='timed runs of every variant, the median is reported (default: 2 on CPU, 20 on CUDA)')
    p.add_argument('--warmup', type=int, default=None,
                   help='untimed runs of every variant first (default: 3 on CUDA; 0 on CPU, where a step '
                        'lasts many seconds, far more than the one-off costs of a first run, and the '
                        'set-up has already run the frozen CLIP once to fill the cache)')
    p.add_argument('--batch-size', type=int, default=8, help='images per step (default: 8, as the original)')
    p.add_argument('--image-size', type=int, default=448, help='classifier input size (default: 448, as the original)')
    p.add_argument('--model', default='resnet50', help='classifier backbone (default: resnet50, as the original)')
    p.add_argument('--clip-model', default='ViT-L-14-336',
                   help='frozen CLIP (an open_clip name or preproc/clip_configs stem; default: ViT-L-14-336, as '
                        'the original)')
    p.add_argument('--metrics-rows', type=int, default=METRICS_SHAPE[0],
                   help=f'rows of the metrics input (default: {METRICS_SHAPE[0]}, the COCO test split)')
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='also time ours with --amp (bf16 autocast) and --channels-last '
                        '(default: on with --device cuda; on CPU --amp is a no-op of main_clip)')
    p.add_argument('--compile', action='store_true',
                   help='also time ours with --compile (torch.compile; compiled by one untimed run first)')
    p.add_argument('--compile-backend', default='inductor',
                   help='torch.compile backend of the --compile rows (default: inductor, as main_clip.py --compile)')
    p.add_argument('--sections', default='train,eval,metrics',
                   help=f'comma-separated sections to run, of {", ".join(SECTIONS)} (default: train,eval,metrics)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s own choice)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights and inputs (default: 0)')
    return p


@dataclasses.dataclass
class Row:
    section: str
    key: str
    label: str
    times: list[float]
    peak_bytes: int | None = None  # CUDA: peak memory of one run above what was allocated before it
    skipped: str | None = None     # why the variant was not timed (times is then empty)

    @property
    def median(self) -> float:
        import statistics
        return statistics.median(self.times)


# ----------------------------------------------------------------------------------------------
# Set-up: the real networks, random weights, one random batch


@dataclasses.dataclass
class Setup:
    device: object
    cfg: object            # config.Config of the original run (float32, --clip-mode online)
    model: object          # the classifier (ResNet-50)
    optimizer: object
    labeler: object        # pseudo_labeler.PseudoLabeler around the frozen CLIP image tower (the parts section)
    online: object         # the training script's pseudo-label source of --clip-mode online
    cached: object         # ... of --clip-mode cache (the batch's embeddings cached once, both flips)
    batch: dict            # one training batch as the loader gives it: image, index, flipped
    method: object         # methods.Method of EM_PL over the batch's observed labels (B x K)
    train_true: object     # B x K clean labels on the device, as train_one_epoch expects
    sync: Callable[[], None]
    amp_model: object = None      # channels_last copy of the classifier for the --amp rows
    amp_optimizer: object = None


class OneBatchImages:
    """The training split of the bench: the batch's images, for the embedding cache's loader (its
    `root` is part of the cache key, as MultiLabelImages's is)."""

    def __init__(self, images, root: Path):
        self.images, self.root = images, root

    def __len__(self) -> int:
        return len(self.images)

    def image_stats(self):
        """The files' (size, mtime) of the cache key (fingerprint.py): none here, the images are in memory."""
        import numpy as np
        return np.zeros((len(self.images), 2), dtype=np.int64)

    def __getitem__(self, i: int) -> dict:
        import torch
        return dict(image=self.images[i], index=torch.tensor(i), flipped=torch.tensor(False))


def make_setup(args, device, workdir: Path) -> Setup:
    """Both networks with random weights, one random batch, and the pseudo-label sources that
    main_clip.py builds for --clip-mode online and cache (pseudo_label_policy.build_pseudo_labels; the cache
    is written under `workdir`)."""
    import numpy as np
    import torch

    import class_text_features
    import clip_loading
    import datasets
    import image_dataset
    import methods
    import models
    import pseudo_label_policy
    import pseudo_labeler
    from config import build_config

    torch.manual_seed(args.seed)
    progress(f'building CLIP {args.clip_model} (random init) and {args.model} (random init) ...')
    clip, tokenizer = clip_loading.load_clip(args.clip_model, None, device=device)
    width = clip_loading.clip_embed_dim(clip)
    text_path = workdir / 'text_features.npy'
    np.save(text_path, torch.nn.functional.normalize(torch.randn(NUM_CLASSES, width), dim=1).numpy())
    cfg = build_config(dataset='coco', loss='EM_PL', model=args.model, pretrained=False, device=device.type,
                       batch_size=args.batch_size, image_size=args.image_size, clip_mode='online',
                       clip_model=args.clip_model, text_features=str(text_path), cache_dir=str(workdir / 'cache'))
    model = models.build_classifier(args.model, NUM_CLASSES, pretrained=False).to(device)
    optimizer = torch.optim.Adam(model.param_groups(cfg.lr), lr=cfg.lr)

    b, s = args.batch_size, args.image_size
    images = torch.randn(b, 3, s, s, device=device)
    # Random clean labels with at least one positive per image; one of them is observed.
    true = (torch.rand(b, NUM_CLASSES, device=device) < 2.9 / NUM_CLASSES).float()
    true[torch.arange(b), torch.randint(NUM_CLASSES, (b,))] = 1.0
    observed = torch.zeros_like(true)
    observed[torch.arange(b), torch.multinomial(true, 1).squeeze(1)] = 1.0
    batch = dict(image=images, index=torch.arange(b, device=device),
                 flipped=torch.zeros(b, dtype=torch.bool, device=device))
    split = datasets.Split(np.array([f'bench_{i}.jpg' for i in range(b)]), true.cpu().numpy(),
                           observed.cpu().numpy())
    loader = torch.utils.data.DataLoader(OneBatchImages(images.cpu(), workdir), batch_size=b,
                                         collate_fn=image_dataset.collate_skipping)
    progress('building the pseudo-label sources; the cache embeds the batch once per flip with the frozen CLIP ...')
    with contextlib.redirect_stdout(sys.stderr):  # their log lines are progress, not results
        online, _ = pseudo_label_policy.build_pseudo_labels(cfg, clip, tokenizer, split, loader, device, NUM_CLASSES)
        cached, _ = pseudo_label_policy.build_pseudo_labels(dataclasses.replace(cfg, clip_mode='cache'), clip,
                                                            tokenizer, split, loader, device, NUM_CLASSES)
    labeler = pseudo_labeler.PseudoLabeler(clip.visual, class_text_features.load_text_features(text_path, NUM_CLASSES),
                                           temp=cfg.temp, threshold=cfg.threshold, partial=cfg.partial).to(device)
    method = methods.build_method(cfg, observed.cpu().numpy(), device)
    setup = Setup(device=device, cfg=cfg, model=model, optimizer=optimizer, labeler=labeler, online=online,
                  cached=cached, batch=batch, method=method, train_true=true, sync=device_sync(device))
    if args.amp:
        import copy
        setup.amp_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        setup.amp_optimizer = torch.optim.Adam(setup.amp_model.param_groups(cfg.lr), lr=cfg.lr)
    return setup


# ----------------------------------------------------------------------------------------------
# The comparisons


def amp_label(device) -> str:
    return '--amp --channels-last' + (' (--amp: no-op on CPU)' if device.type == 'cpu' else ' (bf16)')


def compile_model(model, args):
    """torch.compile(model) with --compile-backend (compilation happens on the first call)."""
    import torch
    return torch.compile(model, backend=args.compile_backend)


def train_variants(st: Setup, args) -> dict:
    """{key: (label, one training step)}: engine.train_one_epoch over a loader of one batch."""
    import engine

    cfg = st.cfg
    loader = [st.batch]

    def step(config, model, optimizer, source):
        return lambda: engine.train_one_epoch(1, config, model, optimizer, loader, st.method, st.train_true,
                                              source, st.device)

    cache_cfg = dataclasses.replace(cfg, clip_mode='cache')
    variants = {
        'online': ('original: frozen CLIP on the batch (--clip-mode online), float32',
                   step(cfg, st.model, st.optimizer, st.online)),
        'cached': ('ours: pseudo-labels from cached embeddings, float32',
                   step(cache_cfg, st.model, st.optimizer, st.cached)),
    }
    if args.amp:
        amp = dict(amp=True, channels_last=True)
        variants['online_amp_cl'] = (f'ours: online CLIP, {amp_label(st.device)}',
                                     step(dataclasses.replace(cfg, **amp), st.amp_model, st.amp_optimizer, st.online))
        variants['cached_amp_cl'] = (f'ours: cached, {amp_label(st.device)}',
                                     step(dataclasses.replace(cache_cfg, **amp), st.amp_model, st.amp_optimizer,
                                          st.cached))
    if args.compile:
        model, optimizer, config = ((st.amp_model, st.amp_optimizer, dataclasses.replace(cache_cfg, amp=True,
                                                                                        channels_last=True))
                                    if args.amp else (st.model, st.optimizer, cache_cfg))
        variants['cached_compile'] = (f'ours: cached{", " + amp_label(st.device) if args.amp else ""}, '
                                      f'{compile_label(args)}', step(dataclasses.replace(config, compile=True),
                                                                     compile_model(model, args), optimizer, st.cached))
    return variants


def compile_label(args) -> str:
    return '--compile' + ('' if args.compile_backend == 'inductor' else f' (backend {args.compile_backend})')


def bench_train(st: Setup, args) -> list[Row]:
    return run_section('train', train_variants(st, args), args, st.sync)


def eval_variants(st: Setup, args) -> dict:
    """{key: (label, one evaluation step)}: the original's CLIP + classifier vs engine.predict."""
    import torch

    import engine

    cfg, b = st.cfg, args.batch_size
    images = st.batch['image']

    def original():
        st.model.eval()
        with torch.no_grad():
            st.online(images, st.batch['index'], st.batch['flipped'])  # run on every val/test batch, never used
            preds = torch.sigmoid(st.model(images))
        return preds.cpu().numpy()

    def ours(config, model):
        return lambda: engine.predict(config, model, [st.batch], b, NUM_CLASSES, st.device, 'eval')

    variants = {'original': ('original: frozen CLIP (output unused) + classifier, float32', original),
                'ours': ('ours: classifier only, inference_mode, float32', ours(cfg, st.model))}
    amp_cfg = dataclasses.replace(cfg, amp=True, channels_last=True)
    if args.amp:
        variants['ours_amp_cl'] = (f'ours: classifier only, {amp_label(st.device)}', ours(amp_cfg, st.amp_model))
    if args.compile:
        model, config = (st.amp_model, amp_cfg) if args.amp else (st.model, cfg)
        variants['ours_compile'] = (f'ours: classifier only{", " + amp_label(st.device) if args.amp else ""}, '
                                    f'{compile_label(args)}', ours(dataclasses.replace(config, compile=True),
                                                                   compile_model(model, args)))
    return variants


def bench_eval(st: Setup, args) -> list[Row]:
    return run_section('eval', eval_variants(st, args), args, st.sync)


def bench_metrics(args) -> tuple[list[Row], str]:
    """compute_metrics vs the per-image loop on one random input (COCO test size by default)."""
    import numpy as np

    import metrics

    shape = (args.metrics_rows, NUM_CLASSES)
    rng = np.random.default_rng(args.seed)
    preds = rng.random(shape, dtype=np.float32)
    labels = (rng.random(shape) < 2.9 / shape[1]).astype(np.float32)
    labels[0, 0] = 1  # at least one positive, so that every metric is defined
    variants = {'loop': ('original: per-image Python loop (compute_metrics_loop)',
                         lambda: metrics.compute_metrics_loop(preds, labels)),
                'ours': ('ours: vectorised compute_metrics', lambda: metrics.compute_metrics(preds, labels))}
    # At least one warm-up here: the loop's first call also imports scikit-learn (a second or two).
    rows = run_section('metrics', variants, args, lambda: None, warmup=max(args.warmup, 1))
    fast, slow = metrics.compute_metrics(preds, labels), metrics.compute_metrics_loop(preds, labels)
    worst = max(abs(fast[k] - slow[k]) for k in metrics.METRIC_KEYS)
    return rows, f'metrics: {shape[0]} x {shape[1]}; largest difference between the two: {worst:.1e}'


def bare_steps(st: Setup):
    """(training step, forward) of the classifier called directly, without the engine: the same model,
    batch, cached pseudo-labels and EM_PL loss as the train and eval rows."""
    import torch

    import losses

    images, index, flipped = st.batch['image'], st.batch['index'], st.batch['flipped']
    pl = st.cached(images, index, flipped)

    def classifier_step():
        st.model.train()
        preds = torch.sigmoid(st.model(images).float())
        loss = losses.compute_batch_loss('EM_PL', preds, st.method.observed, st.method.hparams, pseudo_labels=pl,
                                         validate=False)
        st.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        st.optimizer.step()

    def classifier_forward():
        st.model.eval()
        with torch.inference_mode():
            torch.sigmoid(st.model(images))

    return classifier_step, classifier_forward


def bench_parts(st: Setup, args) -> list[Row]:
    """The pieces of a training step alone: which one dominates the online step?"""
    images, index, flipped = st.batch['image'], st.batch['index'], st.batch['flipped']
    classifier_step, classifier_forward = bare_steps(st)
    variants = {'clip': ('frozen CLIP image tower embed (no_grad)', lambda: st.labeler.embed(images)),
                'step': ('classifier forward + EM_PL loss + backward + Adam', classifier_step),
                'forward': ('classifier forward (inference_mode)', classifier_forward),
                'lookup': ('pseudo-labels from the cached embeddings', lambda: st.cached(images, index, flipped))}
    return run_section('parts', variants, args, st.sync)


def bench_overhead(st: Setup, args) -> list[Row]:
    """The engine's own cost per step: engine.train_one_epoch and engine.predict against the bare step
    and forward of the same model, in this process's CPU time (user + system), which other processes'
    load barely moves. Meaningful at small sizes (--model small_cnn --image-size 16 --threads 1
    --steps 200), where the network's time does not hide a millisecond."""
    import time

    classifier_step, classifier_forward = bare_steps(st)
    images, index, flipped = st.batch['image'], st.batch['index'], st.batch['flipped']
    train, evaluate = train_variants(st, args)['cached'][1], eval_variants(st, args)['ours'][1]
    variants = {'engine_train': ('CPU time: engine.train_one_epoch, one cached step', train),
                'bare_train': ('CPU time: the same step without the engine (lookup + step)',
                               lambda: (st.cached(images, index, flipped), classifier_step())),
                'engine_eval': ('CPU time: engine.predict, one batch', evaluate),
                'bare_eval': ('CPU time: the same forward without the engine', classifier_forward)}
    return run_section('overhead', variants, args, st.sync, clock=time.process_time)


def run_section(section: str, variants: dict, args, sync, warmup: int | None = None,
                deadline: float | None = None, clock=None) -> list[Row]:
    """Time {key: (label, fn)} interleaved; rows in the order given, the first is the baseline. On CUDA
    each variant then runs once more alone for its peak memory above what was resident before. A
    --compile variant is compiled by one untimed run first; if compiling fails (no compiler, an
    unsupported operation) its row says so and the others are timed."""
    warmup = args.warmup if warmup is None else warmup
    skipped = {}
    for key, (label, fn) in variants.items():
        if '--compile' in label:  # compilation is a one-off: never in a timed run
            progress(f'{section}: compiling {key} (one untimed run) ...')
            try:
                sync()
                fn()
                sync()
            except Exception as err:  # report, do not hide: the row names the error
                skipped[key] = f'compilation failed: {type(err).__name__}: {(str(err).splitlines() or [""])[0][:160]}'
                progress(f'  {skipped[key]}')
    timed = {key: fn for key, (_, fn) in variants.items() if key not in skipped}
    progress(f'{section}: {len(timed)} variants x ({warmup} warm-up + {args.steps} timed), interleaved ...')
    times = time_interleaved(timed, warmup=warmup, steps=args.steps, sync=sync, deadline=deadline,
                             **({'clock': clock} if clock else {}))
    peaks = {key: peak_memory(fn, sync) for key, fn in timed.items()} if args.device == 'cuda' else {}
    return [Row(section, key, label, times.get(key, []), peaks.get(key), skipped.get(key))
            for key, (label, _) in variants.items()]


def peak_memory(fn, sync) -> int:
    """Bytes of CUDA memory one run of fn allocates at its peak above what is allocated before it."""
    import torch
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - before


# ----------------------------------------------------------------------------------------------
# Report


def speed_ups(rows: list[Row]) -> dict[tuple[str, str], float]:
    """(section, key) -> the section's first row's median over this row's median (parts: none)."""
    baseline: dict[str, float] = {}
    return {(row.section, row.key): baseline.setdefault(row.section, row.median) / row.median
            for row in rows if row.section not in UNRATED and not row.skipped}


def format_table(rows: list[Row], device_type: str) -> str:
    """A Markdown table, rows grouped by section; the first row of a section is the baseline of its
    speed-ups, which are the quotients of the medians as printed."""
    with_memory = any(row.peak_bytes is not None for row in rows)
    lines = ['| section | variant | median s | speed-up | target | runs s: min / median / max |'
             + (' peak GPU memory GiB |' if with_memory else ''),
             '|---|---|---:|---:|---|---|' + ('---:|' if with_memory else '')]
    ratio = speed_ups(rows)
    for row in rows:
        memory = f' {row.peak_bytes / 2 ** 30:.2f} |' if row.peak_bytes is not None else (' |' if with_memory else '')
        if row.skipped:
            lines.append(f'| {row.section} | {row.label} | | | | skipped: {row.skipped} |{memory}')
            continue
        speed_up, verdict = ratio.get((row.section, row.key)), ''
        target = TARGETS.get((row.section, row.key))
        if speed_up is not None and target and target[0] in (None, device_type):
            verdict = f'>= {target[1]}x: {"met" if speed_up >= target[1] else "MISSED"}'
        lines.append(f'| {row.section} | {row.label} | {row.median:.4g} | '
                     f'{"" if speed_up is None else f"{speed_up:.2f}x"} | {verdict} | {spread(row.times)} |{memory}')
    return '\n'.join(lines)


def parts_note(rows: list[Row]) -> str | None:
    """What the pieces predict for the train and eval speed-ups (each piece timed alone)."""
    t = {row.key: row.median for row in rows if row.section == 'parts'}
    if not {'clip', 'step', 'forward', 'lookup'} <= set(t):
        return None
    return (f'parts: CLIP embed / classifier step = {t["clip"] / t["step"]:.2f}; predicted speed-ups: '
            f'train (clip + step) / (step + lookup) = {(t["clip"] + t["step"]) / (t["step"] + t["lookup"]):.2f}x, '
            f'eval (clip + forward) / forward = {(t["clip"] + t["forward"]) / t["forward"]:.2f}x')


def overhead_note(rows: list[Row]) -> str:
    """The engine's cost per step: the engine's median CPU time minus the bare step's."""
    t = {row.key: row.median for row in rows if row.section == 'overhead'}
    return (f'overhead (CPU time): the engine adds {1e3 * (t["engine_train"] - t["bare_train"]):.3f} ms to a training '
            f'step and {1e3 * (t["engine_eval"] - t["bare_eval"]):.3f} ms to an evaluation step (medians)')


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(',') if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f'--sections: unknown {unknown}; choose among {", ".join(SECTIONS)}')
    args.sections = sections
    for flag in ('steps', 'batch_size', 'image_size', 'threads', 'metrics_rows'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be >= 1')
    if args.warmup is not None and args.warmup < 0:
        parser.error('--warmup must be >= 0')
    on_gpu = args.device == 'cuda'
    args.steps = args.steps or (20 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)
    args.amp = on_gpu if args.amp is None else args.amp
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('bench_speed.py: error: --device cuda: no CUDA device is visible; run with --device cpu',
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = machine_lines(device)

    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix='bench_speed_') as workdir:
        if {'train', 'eval', 'parts', 'overhead'} & set(args.sections):
            setup_started = time.perf_counter()
            st = make_setup(args, device, Path(workdir))
            notes.append(f'set-up (building both networks, embedding the batch once per flip): '
                         f'{time.perf_counter() - setup_started:.0f} s')
            index, flipped = st.batch['index'], st.batch['flipped']
            pl_online = st.online(st.batch['image'], index, flipped)
            pl_cached = st.cached(st.batch['image'], index, flipped)
            notes.append(f'pseudo-labels of the batch, cached vs online: '
                         f'{"equal" if torch.equal(pl_online, pl_cached) else "DIFFERENT"} '
                         f'({int((pl_online == 1).sum())} positives in {pl_online.numel()} entries)')
            for section, bench in (('train', bench_train), ('eval', bench_eval), ('parts', bench_parts),
                                   ('overhead', bench_overhead)):
                if section in args.sections:
                    rows += bench(st, args)
    if 'metrics' in args.sections:
        metric_rows, note = bench_metrics(args)
        rows += metric_rows
        notes.append(note)
    if 'parts' in args.sections:
        notes.append(parts_note(rows))
    if 'overhead' in args.sections:
        notes.append(overhead_note(rows))

    print('VLPL speed benchmark: ours vs the original, same inputs, one process')
    print('\n'.join(header))
    print(f'batch {args.batch_size}, classifier {args.model} at {args.image_size} px, frozen CLIP {args.clip_model}, '
          f'K = {NUM_CLASSES}, random init; median of {args.steps} runs after {args.warmup} warm-up runs '
          '(metrics: at least 1), variants interleaved')
    print()
    print(format_table(rows, device.type))
    print()
    for note in notes:
        print(note)
    print(load_line('end'))
    print(f'total wall time: {time.perf_counter() - started:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())

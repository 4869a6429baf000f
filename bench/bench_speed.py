"""Time this project's speed-ups against the original's behaviour, side by side in one process.

Run from the repository root:

    python bench/bench_speed.py                   # CPU: about 4 minutes on 2 idle cores
    python bench/bench_speed.py --device cuda     # adds bf16 autocast and channels_last rows

Real architectures with random initialisation (nothing is downloaded): ResNet-50 at 448 px and
the frozen CLIP ViT-L-14-336 image tower with random unit text features (K = 80), batch 8, the
same random batch for every variant. The batch is already on the device: data loading is not
timed.

  train    one EM_PL step of engine.train_one_epoch on a one-batch loader: pseudo-labels from
           the frozen CLIP run on the batch (--clip-mode online, the original) vs looked up from
           cached embeddings (--clip-mode cache)
  eval     one evaluation step: the original also runs the frozen CLIP (its output is unused);
           ours (engine.predict) runs the classifier only, under inference_mode
  metrics  metrics.compute_metrics vs the original's per-image loop (40,137 x 80, COCO test size)
  parts    (not run by default) the pieces of a step alone, to see which one dominates

The variants of one comparison run interleaved (A, B, A, B, ...), so that a change of machine
load hits them alike; each time is the median over --steps runs after --warmup runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ('train', 'eval', 'metrics', 'parts')
NUM_CLASSES = 80  # COCO
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
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='also time ours with --amp (bf16 autocast) and --channels-last '
                        '(default: on with --device cuda; on CPU --amp is a no-op of main_clip)')
    p.add_argument('--sections', default='train,eval,metrics',
                   help=f'comma-separated sections to run, of {", ".join(SECTIONS)} (default: train,eval,metrics)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s own choice)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights and inputs (default: 0)')
    return p


# ----------------------------------------------------------------------------------------------
# Timing


def time_interleaved(variants: dict[str, Callable[[], object]], *, warmup: int, steps: int,
                     sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds of each of `steps` runs of every variant, after `warmup` untimed runs of each.

    Rounds go A, B, C, A, B, C, ...: slow drifts of the machine's load (other processes on a
    shared CPU, GPU clocks) then spread over all variants instead of favouring one. `sync`
    waits for queued device work, so that an asynchronous GPU call is timed to its end.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + steps):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


@dataclasses.dataclass
class Row:
    section: str
    key: str
    label: str
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Set-up: the real networks, random weights, one random batch


@dataclasses.dataclass
class Setup:
    device: object
    cfg: object            # config.Config of the original run (float32, --clip-mode online)
    model: object          # ResNet-50 classifier
    optimizer: object
    labeler: object        # pseudo_labeler.PseudoLabeler around the random CLIP ViT-L-14-336 image tower
    batch: dict            # one training batch as the loader gives it: image, index, flipped
    method: object         # methods.Method of EM_PL over the batch's observed labels (B x K)
    train_true: object     # B x K clean labels on the device, as train_one_epoch expects
    embeddings: object     # (B, 2, D) cache of the batch: [:, 0] = labeler.embed(image), [:, 1] unused
    sync: Callable[[], None]
    amp_model: object = None      # channels_last copy of the classifier for the --amp rows
    amp_optimizer: object = None


def make_setup(args, device) -> Setup:
    import torch
    import clip_loading
    import methods
    import models
    import pseudo_labeler
    from config import build_config

    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    cfg = build_config(dataset='coco', loss='EM_PL', model='resnet50', pretrained=False, device=device.type,
                       batch_size=args.batch_size, image_size=args.image_size, clip_mode='online')
    torch.manual_seed(args.seed)
    progress('building CLIP ViT-L-14-336 (random init) and ResNet-50 (random init) ...')
    clip, _ = clip_loading.load_clip('ViT-L-14-336', None, device=device)
    text = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, clip.visual.output_dim), dim=1)
    labeler = pseudo_labeler.PseudoLabeler(clip.visual, text, temp=cfg.temp, threshold=cfg.threshold,
                                           partial=cfg.partial).to(device)
    del clip  # the text tower is not needed
    model = models.build_classifier('resnet50', NUM_CLASSES, pretrained=False).to(device)
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
    progress('embedding the batch once with the frozen CLIP (the cache the cached step reads) ...')
    embeddings = torch.nn.functional.normalize(torch.randn(b, 2, text.shape[1], device=device), dim=-1)
    embeddings[:, 0] = labeler.embed(images)
    method = methods.build_method(cfg, observed.cpu().numpy(), device)
    setup = Setup(device=device, cfg=cfg, model=model, optimizer=optimizer, labeler=labeler, batch=batch,
                  method=method, train_true=true, embeddings=embeddings, sync=sync)
    if args.amp:
        import copy
        setup.amp_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        setup.amp_optimizer = torch.optim.Adam(setup.amp_model.param_groups(cfg.lr), lr=cfg.lr)
    return setup


def online_source(labeler):
    """Pseudo-labels of --clip-mode online: the frozen CLIP on every batch."""
    return lambda images, index, flipped, batch: labeler(images)


def cached_source(labeler, embeddings):
    """Pseudo-labels of --clip-mode cache: a lookup of the (row, flip) embedding."""
    return lambda images, index, flipped, batch: labeler.from_embeddings(embeddings[index, flipped.long()])


# ----------------------------------------------------------------------------------------------
# The comparisons


def amp_label(device) -> str:
    return '--amp --channels-last' + (' (--amp: no-op on CPU)' if device.type == 'cpu' else ' (bf16)')


def bench_train(st: Setup, args) -> list[Row]:
    """One training step: engine.train_one_epoch over a loader of one batch."""
    import engine

    cfg = st.cfg
    loader = [st.batch]

    def step(config, model, optimizer, source):
        return lambda: engine.train_one_epoch(1, config, model, optimizer, loader, st.method, st.train_true,
                                              source, st.device)

    variants = {
        'online': ('original: frozen CLIP on the batch (--clip-mode online), float32',
                   step(cfg, st.model, st.optimizer, online_source(st.labeler))),
        'cached': ('ours: pseudo-labels from cached embeddings, float32',
                   step(dataclasses.replace(cfg, clip_mode='cache'), st.model, st.optimizer,
                        cached_source(st.labeler, st.embeddings))),
    }
    if args.amp:
        amp_cfg = dataclasses.replace(cfg, clip_mode='cache', amp=True, channels_last=True)
        variants['cached_amp_cl'] = (f'ours: cached, {amp_label(st.device)}',
                                     step(amp_cfg, st.amp_model, st.amp_optimizer,
                                          cached_source(st.labeler, st.embeddings)))
    return run_section('train', variants, args, st.sync)


def bench_eval(st: Setup, args) -> list[Row]:
    """One evaluation step: the original's CLIP + classifier vs engine.predict."""
    import torch
    import engine

    cfg, b = st.cfg, args.batch_size
    images = st.batch['image']

    def original():
        st.model.eval()
        with torch.no_grad():
            st.labeler(images)  # computed on every val/test batch by the original, never used
            preds = torch.sigmoid(st.model(images))
        return preds.cpu().numpy()

    def ours(config, model):
        return lambda: engine.predict(config, model, [st.batch], b, NUM_CLASSES, st.device, 'eval')

    variants = {'original': ('original: frozen CLIP (output unused) + classifier, float32', original),
                'ours': ('ours: classifier only, inference_mode, float32', ours(cfg, st.model))}
    if args.amp:
        variants['ours_amp_cl'] = (f'ours: classifier only, {amp_label(st.device)}',
                                   ours(dataclasses.replace(cfg, amp=True, channels_last=True), st.amp_model))
    return run_section('eval', variants, args, st.sync)


def bench_metrics(args) -> tuple[list[Row], str]:
    """compute_metrics vs the per-image loop on one random COCO-test-sized input."""
    import numpy as np
    import metrics

    rng = np.random.default_rng(args.seed)
    preds = rng.random(METRICS_SHAPE, dtype=np.float32)
    labels = (rng.random(METRICS_SHAPE) < 2.9 / METRICS_SHAPE[1]).astype(np.float32)
    variants = {'loop': ('original: per-image Python loop (compute_metrics_loop)',
                         lambda: metrics.compute_metrics_loop(preds, labels)),
                'ours': ('ours: vectorised compute_metrics', lambda: metrics.compute_metrics(preds, labels))}
    # At least one warm-up here: the loop's first call also imports scikit-learn (a second or two).
    rows = run_section('metrics', variants, args, lambda: None, warmup=max(args.warmup, 1))
    fast, slow = metrics.compute_metrics(preds, labels), metrics.compute_metrics_loop(preds, labels)
    worst = max(abs(fast[k] - slow[k]) for k in metrics.METRIC_KEYS)
    return rows, f'metrics: largest difference between the two: {worst:.1e}'


def bench_parts(st: Setup, args) -> list[Row]:
    """The pieces of a training step alone: which one dominates the online step?"""
    import torch
    import losses

    images = st.batch['image']
    pl = st.labeler.from_embeddings(st.embeddings[:, 0])

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
            st.model(images)

    variants = {'clip': ('frozen CLIP ViT-L-14-336 embed (no_grad)', lambda: st.labeler.embed(images)),
                'step': ('ResNet-50 forward + EM_PL loss + backward + Adam', classifier_step),
                'forward': ('ResNet-50 forward (inference_mode)', classifier_forward),
                'lookup': ('pseudo-labels from a cached embedding', lambda: st.labeler.from_embeddings(
                    st.embeddings[st.batch['index'], 0]))}
    return run_section('parts', variants, args, st.sync)


def run_section(section: str, variants: dict, args, sync, warmup: int | None = None) -> list[Row]:
    """Time {key: (label, fn)} interleaved; rows in the order given, the first is the baseline."""
    warmup = args.warmup if warmup is None else warmup
    progress(f'{section}: {len(variants)} variants x ({warmup} warm-up + {args.steps} timed), interleaved ...')
    times = time_interleaved({key: fn for key, (_, fn) in variants.items()}, warmup=warmup,
                             steps=args.steps, sync=sync)
    return [Row(section, key, label, times[key]) for key, (label, _) in variants.items()]


# ----------------------------------------------------------------------------------------------
# Report


def format_table(rows: list[Row], device_type: str) -> str:
    """Rows grouped by section; the first row of a section is the baseline of its speed-ups."""
    lines = [f'{"section":<8} {"variant":<64} {"median s":>9} {"speed-up":>9}  {"target":<16} runs (s)',
             '-' * 124]
    baseline: dict[str, float] = {}
    for row in rows:
        ratio, verdict = '', ''
        if row.section != 'parts':
            speed_up = baseline.setdefault(row.section, row.median) / row.median
            ratio = f'{speed_up:.2f}x'
            target = TARGETS.get((row.section, row.key))
            if target and target[0] in (None, device_type):
                verdict = f'>= {target[1]}x: {"met" if speed_up >= target[1] else "MISSED"}'
        runs = ' '.join(f'{t:.3g}' for t in row.times)
        lines.append(f'{row.section:<8} {row.label:<64} {row.median:9.4f} {ratio:>9}  {verdict:<16} {runs}')
    return '\n'.join(lines)


def parts_note(rows: list[Row]) -> str | None:
    """What the pieces predict for the train and eval speed-ups (each piece timed alone)."""
    t = {row.key: row.median for row in rows if row.section == 'parts'}
    if not {'clip', 'step', 'forward', 'lookup'} <= set(t):
        return None
    return (f'parts: CLIP embed / classifier step = {t["clip"] / t["step"]:.2f}; predicted speed-ups: '
            f'train (clip + step) / (step + lookup) = {(t["clip"] + t["step"]) / (t["step"] + t["lookup"]):.2f}x, '
            f'eval (clip + forward) / forward = {(t["clip"] + t["forward"]) / t["forward"]:.2f}x')


def describe_machine(device) -> str:
    import torch
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        extra = (f', TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, '
                 f'TF32 cuDNN {torch.backends.cudnn.allow_tf32}')
    else:
        name = platform.processor() or platform.machine()
        extra = ''
    return (f'device: {device.type} ({name}{extra}); torch {torch.__version__}; '
            f'{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; python {platform.python_version()}')


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(',') if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f'--sections: unknown {unknown}; choose among {", ".join(SECTIONS)}')
    for flag in ('steps', 'batch_size', 'image_size', 'threads'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")} must be >= 1')
    if args.warmup is not None and args.warmup < 0:
        parser.error('--warmup must be >= 0')

    started = time.perf_counter()
    os.environ.setdefault('TQDM_DISABLE', '1')  # main_clip's per-epoch progress bars, one per timed step
    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda: no CUDA device is visible; run with --device cpu', file=sys.stderr)
        return 2
    device = torch.device(args.device)
    on_gpu = device.type == 'cuda'
    args.steps = args.steps or (20 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)
    args.amp = on_gpu if args.amp is None else args.amp
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[Row] = []
    notes: list[str] = []
    if {'train', 'eval', 'parts'} & set(sections):
        setup_started = time.perf_counter()
        st = make_setup(args, device)
        notes.append(f'set-up (building both networks, embedding the batch once): '
                     f'{time.perf_counter() - setup_started:.0f} s')
        pl_online = st.labeler(st.batch['image'])
        pl_cached = cached_source(st.labeler, st.embeddings)(None, st.batch['index'], st.batch['flipped'])
        notes.append(f'pseudo-labels of the batch, cached vs online: '
                     f'{"equal" if torch.equal(pl_online, pl_cached) else "DIFFERENT"} '
                     f'({int((pl_online == 1).sum())} positives in {pl_online.numel()} entries)')
        for section, bench in (('train', bench_train), ('eval', bench_eval), ('parts', bench_parts)):
            if section in sections:
                rows += bench(st, args)
    if 'metrics' in sections:
        metric_rows, note = bench_metrics(args)
        rows += metric_rows
        notes.append(note)
    if 'parts' in sections:
        notes.append(parts_note(rows))

    print('VLPL speed benchmark: ours vs the original, same inputs, one process')
    print(describe_machine(device))
    print(f'batch {args.batch_size}, classifier ResNet-50 at {args.image_size} px, frozen CLIP ViT-L-14-336 '
          f'at 336 px, K = {NUM_CLASSES}, random init; median of {args.steps} runs after {args.warmup} warm-up runs '
          '(metrics: at least 1), variants interleaved')
    print()
    print(format_table(rows, device.type))
    print()
    for note in notes:
        print(note)
    print(f'total wall time: {time.perf_counter() - started:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())

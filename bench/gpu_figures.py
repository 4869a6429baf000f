"""The figures of one GPU in one command, within a time box, as one Markdown table.

Run from the repository root on a machine with one CUDA device:

    python bench/gpu_figures.py                         # writes results/gpu_figures.md and prints it
    python bench/gpu_figures.py --out /tmp/figures.md --budget 420

Sections, in this order, each time-boxed (a section that does not fit in what is left of --budget is
skipped and its row says why; a section that fails says how), all of them side by side in one process:

  train    one training step, --clip-mode online (the original) vs cache, float32 and --amp (bf16)
           with --channels-last (bench/bench_speed.py: ResNet-50 at 448 px, CLIP ViT-L-14-336, batch 8)
  eval     one evaluation step: the original (frozen CLIP run, output unused) vs ours, float32 and bf16
  loader   PIL vs the packs with flip and normalisation on the device (bench/bench_loader.py, 1024
           synthetic 640 x 480 JPEGs at 448 px, batch 8), beside the images/s the bf16 cached step needs
  ddp      the training step plain vs wrapped in DistributedDataParallel in a process group of one
           (bench/bench_ddp_step.py --ddp, ResNet-50 at 448 px, batch 8): DDP's own cost on one GPU
  compile  the bf16 cached training step and the bf16 evaluation step eager vs --compile (torch.compile;
           compilation is timed apart, in the row's note)

Every row gives the median, the min / median / max of its runs, its ratio to the section's first row
(speed-up for steps, images/s over PIL's for the loader, DDP / plain for ddp) and, on CUDA, the peak
memory of one run above what was allocated before it. On a machine without CUDA the same code runs
at tiny sizes (the demo's tiny CLIP, small_cnn at 32 px, torch.compile's 'eager' backend, which traces
but does not generate code) and the table's header says so: such a table checks the command, it says
nothing of a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == '__main__':  # no progress bars in the output (tqdm reads this when first imported)
    os.environ.setdefault('TQDM_DISABLE', '1')

from bench import bench_ddp_step, bench_loader, bench_speed  # noqa: E402
from bench.common import cpu_count, load_line, log, machine_lines, parse_sections, spread  # noqa: E402

SECTIONS = ('train', 'eval', 'loader', 'ddp', 'compile')
# Seconds a section needs at least on a GPU (set-up included), and the share of what is left it may
# take: a section that would not fit is skipped, and the timing loops stop at their share.
NEEDS = {'train': (60, 0.35), 'eval': (15, 0.15), 'loader': (45, 0.35), 'ddp': (20, 0.3), 'compile': (90, 1.0)}
GRACE_S = 25  # past --budget, the watchdog ends the run (a compilation can outlast any time box)


@dataclasses.dataclass
class Sizes:
    """The arguments of each bench: the real sizes on a GPU, tiny ones on a CPU."""
    speed: list
    loader: list
    ddp: list


def sizes(on_gpu: bool) -> Sizes:
    if on_gpu:
        return Sizes(
            speed=['--device', 'cuda', '--steps', '20', '--warmup', '3', '--amp'],
            loader=['--device', 'cuda', '--images', '1024', '--passes', '3', '--no-step',
                    '--num-workers', str(min(16, cpu_count()))],
            ddp=['--device', 'cuda', '--ddp', '--model', 'resnet50', '--image-size', '448', '--batch-size', '8',
                 '--steps', '30', '--warmup', '3', '--rounds', '3'])
    return Sizes(
        speed=['--device', 'cpu', '--clip-model', 'vlpl-demo-tiny', '--model', 'small_cnn', '--image-size', '32',
               '--batch-size', '2', '--steps', '2', '--warmup', '0', '--amp', '--compile-backend', 'eager'],
        loader=['--device', 'cpu', '--images', '16', '--source-size', '64x48', '--image-size', '32',
                '--batch-size', '4', '--passes', '1', '--no-step', '--num-workers', '1', '--profile-images', '8'],
        ddp=['--device', 'cpu', '--ddp', '--model', 'small_cnn', '--image-size', '16', '--batch-size', '4',
             '--steps', '2', '--warmup', '1', '--rounds', '1'])


@dataclasses.dataclass
class Line:
    """One row of the table."""
    section: str
    variant: str
    unit: str = ''              # 's' (a step's time), 'images/s', 'ms per step'
    runs: list = dataclasses.field(default_factory=list)
    ratio: str = ''             # e.g. '3.21x speed-up', quotient of the medians as printed
    peak_bytes: int | None = None
    note: str = ''

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None


def cell(value: float | None) -> str:
    return '' if value is None else f'{value:.4g}'


def table(lines: list[Line], on_gpu: bool) -> list[str]:
    out = ['| section | variant | median | unit | runs: min / median / max | ratio | peak GPU memory GiB | note |',
           '|---|---|---:|---|---|---|---:|---|']
    for r in lines:
        memory = '' if r.peak_bytes is None else f'{r.peak_bytes / 2 ** 30:.2f}'
        runs = spread(r.runs) if r.runs else ''
        out.append(f'| {r.section} | {r.variant} | {cell(r.median)} | {r.unit} | {runs} | {r.ratio} | '
                   f'{memory if on_gpu else "n/a (CPU)"} | {r.note} |')
    return out


def step_lines(section: str, rows, base_word: str = 'speed-up') -> list[Line]:
    """bench_speed rows as table lines; ratio: the first row's median over each row's (as printed)."""
    out, base = [], None
    for row in rows:
        if row.skipped:
            out.append(Line(section, row.label, note=f'skipped: {row.skipped}'))
            continue
        median = float(f'{row.median:.4g}')
        base = median if base is None else base
        out.append(Line(section, row.label, 's per step', list(row.times), f'{base / median:.2f}x {base_word}',
                        row.peak_bytes))
    return out


class Run:
    """The time box, the table so far, and the file it is written to after every section."""

    def __init__(self, args, on_gpu: bool, argv: list[str]):
        self.args, self.on_gpu = args, on_gpu
        self.started = time.perf_counter()
        self.deadline = self.started + args.budget
        self.lines: list[Line] = []
        self.notes: list[str] = []
        self.step_need: tuple[float, str] | None = None  # images/s of the train section's bf16 cached step
        self.header = self._header(argv)

    def _header(self, argv) -> list[str]:
        import torch
        device = torch.device('cuda' if self.on_gpu else 'cpu')
        title = ('# VLPL figures on one GPU' if self.on_gpu else
                 '# VLPL figures: NO GPU here, tiny sizes on the CPU (the same code; these figures check the '
                 'command and say nothing of a GPU)')
        command = ' '.join(['python bench/gpu_figures.py'] + argv)
        return [title, '', f'`{command}`, {time.strftime("%Y-%m-%d %H:%M:%S %Z")}', ''] + \
            [f'- {line}' for line in machine_lines(device)] + ['']

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def section_deadline(self, name: str) -> float:
        return time.perf_counter() + NEEDS[name][1] * max(self.left(), 0)

    def fits(self, name: str) -> str | None:
        """None when the section fits in what is left, else the reason it is skipped."""
        need = NEEDS[name][0] if self.on_gpu else 0
        if self.left() < need or self.left() <= 0:
            return (f'time box: {max(self.left(), 0):.0f} s left of --budget {self.args.budget:.0f}, the section '
                    f'needs about {need} s')
        return None

    def text(self, extra: list[str] = ()) -> str:
        elapsed = time.perf_counter() - self.started
        body = self.header + table(self.lines, self.on_gpu) + [''] + [f'- {n}' for n in self.notes + list(extra)]
        body.append(f'- {load_line("end")}; {elapsed:.0f} s of --budget {self.args.budget:.0f} s')
        return '\n'.join(body) + '\n'

    def write(self, extra: list[str] = ()) -> str:
        from files import atomic_write
        text = self.text(extra)
        atomic_write(self.args.out, lambda handle: handle.write(text.encode('utf-8')))
        return text


# ----------------------------------------------------------------------------------------------
# The sections


def skip(run: Run, section: str, reason: str) -> None:
    run.lines.append(Line(section, '(section)', note=reason))
    run.write()


def one_line(err: BaseException) -> str:
    return f'{type(err).__name__}: {(str(err).splitlines() or [""])[0][:200]}'


def attempt(run: Run, section: str, measure, need: str | None = None):
    """measure() when the section fits in the time box (that of NEEDS[need or section]), else None; a
    skipped or failed section is a row that says why, and the other sections still run."""
    reason = run.fits(need or section)
    if reason:
        return skip(run, section, f'skipped: {reason}')
    try:
        return measure()
    except Exception as err:
        return skip(run, section, f'failed: {one_line(err)}')


def speed_setup(run: Run, size: Sizes, sections: list[str]):
    """(bench_speed's arguments, its Setup) for train, eval and compile, or None when none of them runs."""
    import tempfile

    import torch

    wanted = [s for s in ('train', 'eval', 'compile') if s in sections]
    if not wanted:
        return None
    reason = run.fits(wanted[0])
    if reason:
        for name in wanted:
            skip(run, name, f'skipped: {reason}')
        return None
    args = bench_speed.parse_args(size.speed)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix='gpu_figures_') as workdir:  # the cache is read into memory
            st = bench_speed.make_setup(args, torch.device(args.device), Path(workdir))
    except Exception as err:
        for name in wanted:
            skip(run, name, f'failed in the set-up: {one_line(err)}')
        return None
    run.notes.append(f'set-up of train / eval / compile (both networks, the pseudo-label cache): '
                     f'{time.perf_counter() - started:.0f} s; batch {args.batch_size}, {args.model} at '
                     f'{args.image_size} px, CLIP {args.clip_model}, {args.steps} timed runs after {args.warmup}, '
                     'interleaved')
    return args, st


def run_steps(run: Run, name: str, speed) -> None:
    """train or eval: every variant of bench_speed's section, side by side."""
    args, st = speed
    make = bench_speed.train_variants if name == 'train' else bench_speed.eval_variants
    rows = attempt(run, name, lambda: bench_speed.run_section(name, make(st, args), args, st.sync,
                                                              deadline=run.section_deadline(name)))
    if rows is None:
        return
    run.lines += step_lines(name, rows)
    if name == 'train':
        last = rows[-1]  # the cached step under --amp --channels-last: what a GPU run trains with
        run.step_need = (args.batch_size / last.median, last.label)
    run.write()


def run_compile(run: Run, speed) -> None:
    """Eager vs torch.compile of the bf16 cached training step and of the bf16 evaluation step."""
    args, st = speed
    compiled = argparse.Namespace(**{**vars(args), 'compile': True})
    for section, make, keys in (('compile: train', bench_speed.train_variants, ('cached_amp_cl', 'cached_compile')),
                                ('compile: eval', bench_speed.eval_variants, ('ours_amp_cl', 'ours_compile'))):
        started = time.perf_counter()
        variants = {k: v for k, v in make(st, compiled).items() if k in keys}
        rows = attempt(run, section, lambda: bench_speed.run_section(
            section, variants, compiled, st.sync, deadline=run.section_deadline('compile')), need='compile')
        if rows is None:
            continue
        lines = step_lines(section, rows)
        lines[-1].note = (lines[-1].note + '; ' if lines[-1].note else '') + \
            f'compilation + timing: {time.perf_counter() - started:.0f} s, backend {args.compile_backend}'
        run.lines += lines
        run.write()


def run_loader(run: Run, size: Sizes) -> None:
    import torch

    args = bench_loader.parse_args(size.loader)
    device = torch.device(args.device)
    fig = attempt(run, 'loader', lambda: bench_loader.measure(args, device))
    if fig is None:
        return
    base = float(f'{fig.median["PIL"]:.4g}')
    for name, rates in fig.rates.items():
        median = float(f'{statistics.median(rates):.4g}')
        note = f'{fig.workers[name]} workers; {statistics.median(fig.cpu_ms[name]):.3f} CPU ms per image'
        if run.step_need:
            note += f'; {median / float(f"{run.step_need[0]:.4g}"):.2f}x what the training step needs'
        run.lines.append(Line('loader', f'{name} ({fig.images} {fig.source} -> {args.image_size} px, to_model_input '
                                        f'on {device.type})', 'images/s', rates, f'{median / base:.2f}x PIL',
                              fig.peak_bytes[name], note))
    if run.step_need:
        run.lines.append(Line('loader', f'the training step needs ({run.step_need[1]}, batch {args.batch_size})',
                              'images/s', [run.step_need[0]], note='the batch over the train section\'s median step'))
    run.notes.append('loader: the pipelines\' tensors are bit-identical' if fig.identical else
                     'loader: the pipelines\' tensors DIFFER (they must be bit-identical)')
    if fig.stages is not None:
        total = {p: sum(ms for q, _, ms in fig.stages if q == p) for p in ('PIL', 'packed')}
        run.notes.append(f'loader stage profile (one thread, CPU ms per image): PIL {total["PIL"]:.3f} in all; packed: '
                         + '; '.join(f'{stage} {ms:.3f}' for p, stage, ms in fig.stages if p == 'packed'))
    run.write()


def run_ddp(run: Run, size: Sizes) -> None:
    import torch

    a = bench_ddp_step.parse_args(size.ddp)
    device = torch.device(a.device, 0) if a.device == 'cuda' else torch.device('cpu')
    measured = attempt(run, 'ddp', lambda: bench_ddp_step.measure(a, device))
    if measured is None:
        return
    gaps, peaks, _ = measured
    base = None
    for name, g in gaps.items():
        ms = [1e3 * t for t in g]
        median = float(f'{statistics.median(ms):.4g}')
        base = median if base is None else base
        run.lines.append(Line('ddp', f'{name}, {a.model} at {a.image_size} px, batch {a.batch_size}', 'ms per step',
                              ms, f'{median / base:.2f}x plain', peaks[name]))
    run.write()


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=str(Path(__file__).resolve().parents[1] / 'results' / 'gpu_figures.md'),
                   help='the Markdown file written after every section (default: results/gpu_figures.md)')
    p.add_argument('--budget', type=float, default=420.0,
                   help='seconds for all sections (default: 420: with the start-up and the watchdog\'s grace the '
                        'command stays under 8 minutes); a section that does not fit in what is left is skipped')
    p.add_argument('--sections', default=','.join(SECTIONS),
                   help=f'comma-separated sections to run, of {", ".join(SECTIONS)} (default: all)')
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    sections = parse_sections(parser, args.sections, SECTIONS)
    if args.budget <= 0:
        parser.error('--budget must be > 0')
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f'--out {args.out}: cannot create its folder ({err.strerror})')
    import torch
    on_gpu = torch.cuda.is_available()
    run = Run(args, on_gpu, argv)
    if not on_gpu:
        log('no CUDA device: the same code at tiny sizes, on the CPU')
    size = sizes(on_gpu)

    def stop():  # past the budget and its grace: keep what is written, say so, end the process
        print(run.write([f'STOPPED by the time box ({args.budget:.0f} s + {GRACE_S} s) inside a section']))
        sys.stdout.flush()
        os._exit(3)

    watchdog = threading.Timer(args.budget + GRACE_S, stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        speed = speed_setup(run, size, sections)
        for name in ('train', 'eval'):
            if name in sections and speed:
                run_steps(run, name, speed)
        if 'loader' in sections:
            run_loader(run, size)
        if 'ddp' in sections:
            run_ddp(run, size)
        if 'compile' in sections and speed:
            run_compile(run, speed)
        text = run.write()
    finally:
        watchdog.cancel()
    print(text, end='')
    log(f'written: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

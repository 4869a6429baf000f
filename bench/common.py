"""What every benchmark of bench/ shares: the machine it ran on, how busy it was, interleaved timing and
the spread of the runs.

A timing on a shared machine says little without the machine's load: every bench prints
`machine_lines` first (CPU model and count, torch threads, the device, the load average at the start)
and a warning when the machine was busy, so a table pasted into a document carries its conditions.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable

# A load average (1 minute) above this share of the CPUs at the start: other work competes with the
# bench, and its timings are noisy (docs/input-pipeline.md, "Measuring").
BUSY_LOAD_PER_CPU = 0.5


def cpu_count() -> int:
    """CPUs this process may run on (a container's or taskset's limit), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def machine_lines(device=None) -> list[str]:
    """The machine as the bench found it at its start: CPUs, torch, the device, the load average, and
    a warning line when the machine is busy (load above BUSY_LOAD_PER_CPU per CPU)."""
    import torch

    cpus = cpu_count()
    where = 'cpu'
    if device is not None and getattr(device, 'type', device) == 'cuda':
        where = (f'cuda ({torch.cuda.get_device_name(device)}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, '
                 f'TF32 cuDNN {torch.backends.cudnn.allow_tf32})')
    lines = [f'machine: {cpu_name()}, {cpus} CPUs, {torch.get_num_threads()} torch threads; device {where}; '
             f'torch {torch.__version__}, python {platform.python_version()}']
    load = load_average()
    if load is None:
        lines.append('load average at start: unknown (no os.getloadavg here)')
        return lines
    lines.append(f'load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) '
                 f'on {cpus} CPUs')
    if load[0] > BUSY_LOAD_PER_CPU * cpus:
        lines.append(f'WARNING: the machine is busy (load {load[0]:.2f} on {cpus} CPUs): other work competes '
                     'with this bench and its timings are noisy; re-run on a quiet machine for figures to quote')
    return lines


def load_line(when: str = 'end') -> str:
    load = load_average()
    return f'load average at {when}: ' + ('unknown' if load is None else
                                          f'{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)')


def parse_sections(parser, text: str, known) -> list[str]:
    """The comma-separated sections of `text`, each one of `known` (else the parser's one-line error)."""
    sections = [s.strip() for s in text.split(',') if s.strip()]
    unknown = sorted(set(sections) - set(known))
    if unknown or not sections:
        parser.error(f'--sections: unknown {unknown}; choose among {", ".join(known)}')
    return sections


def log(message: str) -> None:
    """Progress on stderr, so that stdout is only the result (the table to paste)."""
    print(message, file=sys.stderr, flush=True)


def spread(values, fmt: str = '.4g') -> str:
    """'min / median / max' of the runs, each with `fmt`."""
    values = list(values)
    return ' / '.join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def device_sync(device) -> Callable[[], None]:
    """A function that waits for the queued work of `device` (CUDA calls return before they finish)."""
    import torch

    if getattr(device, 'type', device) == 'cuda':
        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(variants: dict[str, Callable[[], object]], *, warmup: int, steps: int,
                     sync: Callable[[], None], deadline: float | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each of `steps` runs of every variant, after `warmup` untimed runs of each.

    Rounds go A, B, C, A, B, C, ...: slow drifts of the machine's load (other processes on a shared
    CPU, GPU clocks) then spread over all variants instead of favouring one. `sync` waits for queued
    device work, so that an asynchronous GPU call is timed to its end. `deadline` (a perf_counter
    time): no new round starts after it once every variant has one timed run (a time box). `clock`:
    the wall time, or time.process_time for this process's CPU time (user + system).
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + steps):
        if deadline is not None and round_ > warmup and time.perf_counter() > deadline:
            break
        for name, fn in variants.items():
            sync()
            start = clock()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(clock() - start)
    return times

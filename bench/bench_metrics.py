"""Time metrics.compute_metrics against the per-image Python loop of the same definition.

Run from the repository root: python bench/bench_metrics.py
Both run in the same process on the same random input (COCO test size by default); the
script checks that they agree and prints both times and the speed-up.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_line, machine_lines, spread  # noqa: E402
from metrics import METRIC_KEYS, compute_metrics, compute_metrics_loop  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--num-images', type=int, default=40137, help='rows N (default: 40137, COCO test)')
    parser.add_argument('--num-classes', type=int, default=80, help='classes K (default: 80)')
    parser.add_argument('--positives', type=float, default=2.9,
                        help='expected positives per image of the random labels (default: 2.9)')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed runs of the vectorised version; the median is reported (default: 5)')
    parser.add_argument('--seed', type=int, default=0, help='numpy seed of the random input (default: 0)')
    args = parser.parse_args(argv)
    if min(args.num_images, args.num_classes, args.repeats) < 1:
        parser.error('--num-images, --num-classes and --repeats must be >= 1')
    header = machine_lines()

    rng = np.random.default_rng(args.seed)
    shape = (args.num_images, args.num_classes)
    preds = rng.random(shape, dtype=np.float32)
    labels = (rng.random(shape) < args.positives / args.num_classes).astype(np.float32)

    fast_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = compute_metrics(preds, labels)
        fast_times.append(time.perf_counter() - start)
    import sklearn.metrics  # noqa: F401  (imported by the loop's first call: not part of its time)
    start = time.perf_counter()
    slow = compute_metrics_loop(preds, labels)
    slow_time = time.perf_counter() - start

    worst = max(abs(fast[key] - slow[key]) for key in METRIC_KEYS)
    fast_time = statistics.median(fast_times)
    print('\n'.join(header))
    print(f'input: {args.num_images} x {args.num_classes}, seed {args.seed}')
    print(f'vectorised compute_metrics: {fast_time:.4g} s (median of {args.repeats}; min / median / max '
          f'{spread(fast_times)})')
    print(f'per-image loop reference:   {slow_time:.4g} s')
    print(f'speed-up: {slow_time:.4g} / {fast_time:.4g} = {slow_time / fast_time:.2f}x')
    print(f'largest difference between the two: {worst:.2e} ({"agree" if worst < 1e-9 else "DISAGREE"})')
    print(load_line('end'))
    return 0 if worst < 1e-9 else 1


if __name__ == '__main__':
    sys.exit(main())

"""Pack the images of a dataset for `main_clip.py --data-format packed` (docs/input-pipeline.md).

    python preproc/pack_images.py -d coco                    # 448 px, train, val and test
    python preproc/pack_images.py -d demo --image-size 64

For each split of main_clip.py (train and val: the rows of the official train split that
datasets.load_splits cuts; test: the official val split) every image is decoded and resized once,
exactly as the training pipeline resizes it (RGB, Resize((S, S)), bilinear, antialias), and stored
as one uint8 N x S x S x 3 array in <data-root>/<dataset>/packed/<split>.npy, with its index
<split>.json (the image list, its sha256, the size, each image's size and modification time). A
pack is allocated on disk in full first (a full disk is one line at the start), written under a
temporary name and renamed when complete; an interrupted run, or one stopped by a full disk,
continues where it stopped when run again; images rewritten since a pack was made are re-packed
(only those rows); a pack of another size is refused (--overwrite replaces it). The decoding
workers end with the script, however it ends. Disk: N x S x S x 3 bytes per split.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python preproc/pack_images.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os

import datasets
import packs
from config import DATASETS, DEFAULT_DIRS, VLPLError, number, one_line
from preproc._common import PreprocError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='pack_images.py', description=__doc__.split('\n\n')[0])
    p.add_argument('-d', '--dataset', required=True, choices=sorted(DATASETS))
    p.add_argument('--image-size', type=number(int, low=1), default=None,
                   help='side S of the stored images; must equal main_clip.py --image-size (default: the '
                        "dataset's, 448; demo 64)")
    p.add_argument('--data-root', default=DEFAULT_DIRS['data'], help='folder holding <dataset>/formatted_*.npy')
    p.add_argument('--splits', default=','.join(packs.SPLITS),
                   help='comma-separated splits to pack (default: train,val,test)')
    p.add_argument('--num-workers', type=number(int, low=0), default=min(8, os.cpu_count() or 1),
                   help='processes decoding and resizing images')
    p.add_argument('--overwrite', action='store_true', help='replace existing (or partial) packs, of any size')
    p.add_argument('--skip-bad-images', action='store_true',
                   help='leave unreadable images empty and list them in the stamp (main_clip.py then needs '
                        '--skip-bad-images) instead of stopping')
    return p


def pack(args: argparse.Namespace) -> list[str]:
    from distributed import progress

    size = args.image_size or DATASETS[args.dataset].image_size
    wanted = [s.strip() for s in args.splits.split(',') if s.strip()]
    unknown = sorted(set(wanted) - set(packs.SPLITS))
    if unknown or not wanted:
        raise PreprocError(f'--splits {args.splits}: choose among {",".join(packs.SPLITS)}')
    if args.dataset == 'demo':
        from preproc import make_demo
        make_demo.ensure_demo(args.data_root)
    splits = datasets.load_splits(args.data_root, args.dataset, clean_train_labels=True)
    report = []
    for phase in wanted:
        try:
            report.append(packs.write_pack(args.data_root, args.dataset, phase, splits[phase], size,
                                           num_workers=args.num_workers, overwrite=args.overwrite,
                                           skip_bad=args.skip_bad_images, progress=progress))
        except VLPLError as err:  # raised in a worker: its message without the worker's traceback
            raise PreprocError(one_line(err)) from None
        except KeyboardInterrupt:
            raise PreprocError(f'interrupted while packing {phase}: the rows written so far are kept; run the '
                               'same command again to continue') from None
    return report


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), pack, argv, errors=(PreprocError, VLPLError))


if __name__ == '__main__':
    sys.exit(main())

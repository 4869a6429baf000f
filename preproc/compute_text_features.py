"""Compute the CLIP text features of a dataset's classes and save them as a (K, D) float32 .npy.

Row k is the L2-normalised open_clip text embedding of the template with '{}' replaced by class k
(text_features/<dataset>_classnames.txt, formatted class order; CUB attributes as phrases).
Default output: text_features/<dataset>_<clip model>_<weights>[_t<template hash>].npy, see
class_text_features.default_text_features_path. The file is written atomically.

    python preproc/compute_text_features.py --dataset pascal
    python preproc/compute_text_features.py --dataset demo --clip-model vlpl-demo-tiny \\
        --clip-pretrained data/demo/clip/vlpl-demo-tiny.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as `python preproc/compute_text_features.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import class_text_features  # noqa: E402
import clip_loading  # noqa: E402
from config import DATASETS, DEFAULT_DIRS, ModelLoadError  # noqa: E402
from preproc._common import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    committed = {p.name.removesuffix('_classnames.txt') for p in class_text_features.CLASSNAMES_DIR.glob('*_classnames.txt')}
    datasets = sorted(committed | {name for name, row in DATASETS.items() if row.classnames})  # + names in data/
    parser = argparse.ArgumentParser(prog='compute_text_features', description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset', required=True, choices=datasets,
                        help='dataset whose class names are encoded (required)')
    parser.add_argument('--clip-model', default='ViT-L-14-336',
                        help='open_clip model name, JSON config file, or name of preproc/clip_configs/<name>.json '
                             '(default: ViT-L-14-336)')
    parser.add_argument('--clip-pretrained', default='openai',
                        help="open_clip pretrained tag, local checkpoint file, or 'none' for random weights "
                             '(default: openai)')
    parser.add_argument('--template', default='{}',
                        help="text encoded per class, '{}' is replaced by the class name, e.g. 'a photo of a {}.' "
                             "(default: '{}', the class name alone)")
    parser.add_argument('--output', default=None,
                        help='output .npy file (default: text_features/<dataset>_<clip model>_<weights>'
                             '[_t<first 8 hex of sha1(template)>].npy, the suffix only for a template other than {})')
    parser.add_argument('--device', default='cpu', help="torch device for CLIP, e.g. 'cuda' (default: cpu)")
    parser.add_argument('--data-root', default=DEFAULT_DIRS['data'],
                        help='folder of the datasets, for a dataset whose class names its format script writes '
                             'there (openimages; default: data/ beside main_clip.py)')
    return parser


def compute_and_save(dataset: str, clip_model: str, clip_pretrained: str | None, template: str = '{}',
                     output: str | Path | None = None, device: str = 'cpu', data_root: str | None = None) -> Path:
    """Load CLIP, encode the dataset's class names, save (K, D) float32 normalised rows; returns the path."""
    if '{}' not in template:
        raise ValueError(f"--template {template!r} must contain '{{}}' where the class name goes")
    path = Path(output) if output else class_text_features.default_text_features_path(
        dataset, clip_model, clip_pretrained, template)
    classnames = class_text_features.read_classnames(dataset, data_root=data_root)
    clip, tokenizer = clip_loading.load_clip(clip_model, clip_pretrained, device=device)
    features = class_text_features.compute_text_features(clip, tokenizer, classnames, template)
    return class_text_features.save_text_features(path, features)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> list[str]:
        pretrained = None if args.clip_pretrained.lower() == 'none' else args.clip_pretrained
        path = compute_and_save(args.dataset, args.clip_model, pretrained, args.template, args.output, args.device,
                                args.data_root)
        return [f'wrote {path}']

    return run_cli(parser, body, argv, errors=(ModelLoadError, ValueError, OSError))


if __name__ == '__main__':
    sys.exit(main())

"""Label new images with a trained VLPL classifier.

The inference entry point, as timm's inference.py and CSL's infer.py: it rebuilds the network
from what the checkpoint holds (backbone name, image size, class names, weights), with no dataset
and no CLIP weights, and writes per image the classes above the threshold and the top-k scores.

    python predict.py results/coco_EM_PL_resnet50_s0/best.pt photos/ --output labels.csv
    python predict.py best.pt a.jpg b.png --thresholds results/coco_EM_PL_resnet50_s0/thresholds.json
    python predict.py best.pt photos/ --output labels.json --top-k 3 --device cuda --amp

Folders are searched recursively (hidden files and folders are left out). A file that is not a
readable image is reported on one line and skipped; the others are predicted.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import image_io
from config import VLPLError, one_line
from files import atomic_write


class PredictError(VLPLError):
    """A problem the user can fix; printed as one line (`error: ...`), exit status 2."""


# ----------------------------------------------------------------------------------------------
# The checkpoint and the model


def load_checkpoint(path: Path) -> dict:
    """The checkpoint dict, loaded with weights_only=True (checkpoints.load_checkpoint: a file that is
    not one of ours is refused, not executed), and checked to describe a model."""
    try:
        ckpt = checkpoints.load_checkpoint(path)
    except VLPLError as e:
        raise PredictError(str(e) if 'pass ' in str(e) or 'use ' in str(e) else
                           f'{e}; pass best.pt or last.pt of a run folder') from None
    if not isinstance(ckpt.get('model'), dict) or not isinstance(ckpt.get('config'), dict) \
            or 'model' not in ckpt['config']:
        raise PredictError(f'{path}: not a VLPL checkpoint (it lacks the model weights or the run configuration); '
                           'pass best.pt or last.pt of a run folder')
    return ckpt


def rebuild_from_checkpoint(ckpt: dict, where: str = 'checkpoint') -> tuple[torch.nn.Module, list[str], int]:
    """(model in eval mode on the CPU, class names (K), input size S) from a training checkpoint, through
    the one way back from a checkpoint (checkpoints.rebuild_classifier: every head size, the CLIP
    architecture and SGRE's label embeddings as stored; no dataset, no download)."""
    try:
        rebuilt = checkpoints.rebuild_classifier(ckpt, where)
    except VLPLError as e:
        raise PredictError(str(e)) from None
    return rebuilt.model, rebuilt.classnames, rebuilt.image_size


# ----------------------------------------------------------------------------------------------
# Thresholds


def load_thresholds(path: Path, classnames: list[str]) -> np.ndarray:
    """(K,) per-class thresholds from --thresholds FILE.

    .json: {"classnames": [...], "thresholds": [...]} (class names, when given, must be the
    checkpoint's, in the same order) or a plain list of K numbers; .npy: a 1-D array of K numbers.
    Per-class F1-maximising thresholds on the val split come from metrics.choose_thresholds.
    """
    where = f'--thresholds {path}'
    if not path.is_file():
        raise PredictError(f'{where}: no such file')
    try:
        if path.suffix == '.npy':
            values = np.load(path, allow_pickle=False)
        else:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                names = data.get('classnames')
                if names is not None and [str(n) for n in names] != classnames:
                    raise PredictError(f'{where}: its class names differ from the checkpoint\'s; '
                                       'use the thresholds of the same run')
                data = data.get('thresholds')
            values = np.asarray(data, dtype=np.float64)
    except PredictError:
        raise
    except Exception as e:
        raise PredictError(f'{where}: not a readable thresholds file ({one_line(e)[:200]})') from None
    if values.shape != (len(classnames),) or not np.isfinite(values).all():
        raise PredictError(f'{where}: expected {len(classnames)} finite numbers (one per class), '
                           f'got shape {values.shape}')
    return values.astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Images


def list_files(paths: list[str]) -> list[Path]:
    """Files named on the command line, and every non-hidden file below the named folders (sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob('*')
                            if f.is_file() and not any(part.startswith('.') for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise PredictError(f'{p}: no such file or folder')
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Item i: (i, 3 x S x S tensor, None) or, for a file that is not a readable image, (i, None, reason)."""

    def __init__(self, files: list[Path], image_size: int):
        self.files = files
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            rgb = image_io.read_rgb(self.files[i])  # the training pipeline's reading, 16-bit and float images too
        except Exception as e:  # PIL raises many kinds on damaged files; every one means "skip this file"
            return i, None, one_line(e)[:200]
        return i, image_io.image_tensor(rgb, self.image_size), None


def collate_files(items):
    """(indices of readable images, B x 3 x S x S tensor or None, [(index, reason) of skipped files])."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def predict_files(model, files: list[Path], image_size: int, *, batch_size: int = 32, device='cpu',
                  amp: bool = False, num_workers: int = 0, progress: bool = True):
    """Sigmoid scores of every readable file: (kept indices into files, (n_kept x K) float32 array,
    [(index, reason) of skipped files]). Skipped files are reported on stderr as they are met."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(ImageFiles(files, image_size), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate_files,
                                         pin_memory=device.type == 'cuda')
    model = model.to(device).eval()
    kept, scores, skipped = [], [], []
    use_amp = amp and device.type == 'cuda'
    with torch.inference_mode(), tqdm(total=len(files), unit='img', desc='predict', disable=not progress,
                                      dynamic_ncols=True) as bar:
        for indices, images, bad in loader:
            for i, reason in bad:
                tqdm.write(f'skipped {files[i]}: not a readable image ({reason})', file=sys.stderr)
            skipped += bad
            if images is not None:
                with torch.autocast('cuda', dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(images.to(device, non_blocking=True))
                scores.append(torch.sigmoid(logits.float()).cpu().numpy())
                kept += indices
            bar.update(len(indices) + len(bad))
    return kept, (np.concatenate(scores) if scores else np.zeros((0, 0), np.float32)), skipped


# ----------------------------------------------------------------------------------------------
# Output


def label_rows(files: list[Path], scores: np.ndarray, classnames: list[str], thresholds: np.ndarray,
               top_k: int) -> list[dict]:
    """Per image: {'file', 'labels': [(class, score)] with score >= its class threshold, highest first,
    'top_k': [(class, score)] the top_k highest scores} (ties: lower class index first)."""
    order = np.argsort(-scores, axis=1, kind='stable')  # N x K, descending
    rows = []
    for f, s, o in zip(files, scores, order):
        rows.append({'file': str(f),
                     'labels': [(classnames[c], float(s[c])) for c in o if s[c] >= thresholds[c]],
                     'top_k': [(classnames[c], float(s[c])) for c in o[:top_k]]})
    return rows


def to_csv(rows: list[dict], top_k: int) -> str:
    """Columns: file, labels ('a;b'), label_scores ('0.9312;0.6120'), top1, top1_score, ..., topk, topk_score."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    header = ['file', 'labels', 'label_scores']
    for r in range(1, top_k + 1):
        header += [f'top{r}', f'top{r}_score']
    writer.writerow(header)
    for row in rows:
        line = [row['file'], ';'.join(c for c, _ in row['labels']), ';'.join(f'{s:.4f}' for _, s in row['labels'])]
        for c, s in row['top_k']:
            line += [c, f'{s:.4f}']
        writer.writerow(line + [''] * (len(header) - len(line)))
    return out.getvalue()


def to_json(rows: list[dict], skipped: list[tuple[str, str]], checkpoint: str, thresholds: np.ndarray,
            classnames: list[str]) -> str:
    def pairs(items):
        return [{'class': c, 'score': round(s, 6)} for c, s in items]
    return json.dumps({
        'checkpoint': checkpoint,
        'thresholds': dict(zip(classnames, (float(t) for t in thresholds))),
        'images': [{'file': r['file'], 'labels': pairs(r['labels']), 'top_k': pairs(r['top_k'])} for r in rows],
        'skipped': [{'file': f, 'reason': reason} for f, reason in skipped],
    }, indent=1) + '\n'


# ----------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """'(default: X)' for every flag that has a value by default; the help of the others says it."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def check_output(output: Path) -> None:
    """--output can be written: not a folder, no folder above it that is a file (checked before predicting)."""
    if output.is_dir():
        raise PredictError(f'--output {output} is a folder; name a file such as {output / "labels.csv"}')
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PredictError(f'--output {output}: its parent {parent} is a file, not a folder; '
                                   'choose another --output')
            break


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='Label images with a trained VLPL classifier: per image the classes whose score reaches '
                    'the threshold and the top-k classes with their scores.',
        formatter_class=_HelpFormatter)
    p.add_argument('checkpoint', help='best.pt or last.pt of a run folder')
    p.add_argument('paths', nargs='+', metavar='PATH', help='image files and/or folders (searched recursively)')
    p.add_argument('--output', default=None, metavar='FILE',
                   help='FILE.csv or FILE.json (format from the suffix, any case; an existing file is replaced, '
                        'and the closing line says so); default: CSV on standard output')
    thresholds = p.add_mutually_exclusive_group()
    thresholds.add_argument('--threshold', type=float, default=0.5,
                            help='one threshold for every class: a class is predicted when its score >= it')
    thresholds.add_argument('--thresholds', default=None, metavar='FILE',
                            help='per-class thresholds (.json {"classnames", "thresholds"} or a .npy of K numbers), '
                                 'e.g. those training chose on the val split (default: --threshold for every class)')
    p.add_argument('--top-k', type=int, default=5, help='also list the k highest-scoring classes (0: none)')
    p.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto = cuda if available')
    p.add_argument('--amp', action='store_true', help='bf16 autocast on CUDA (ignored on the CPU; default: float32)')
    p.add_argument('--num-workers', type=int, default=min(4, os.cpu_count() or 1),
                   help='processes that read and resize the images')
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = Path(args.output) if args.output else None
        fmt = output.suffix.lower() if output is not None else '.csv'
        if fmt not in ('.csv', '.json'):
            raise PredictError(f'--output {output}: the name must end in .csv or .json')
        if output is not None:
            check_output(output)
        if not 0.0 <= args.threshold <= 1.0:
            raise PredictError(f'--threshold must be in [0, 1], got {args.threshold}')
        for flag in ('top_k', 'num_workers'):
            if getattr(args, flag) < 0:
                raise PredictError(f'--{flag.replace("_", "-")} must be >= 0')
        if args.batch_size < 1:
            raise PredictError('--batch-size must be >= 1')
        if args.device == 'cuda' and not torch.cuda.is_available():
            raise PredictError('--device cuda: no CUDA device is visible; use --device cpu')
        device = args.device if args.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
        files = list_files(args.paths)
        if not files:
            raise PredictError(f'no files under {" ".join(args.paths)}')
        model, classnames, image_size = rebuild_from_checkpoint(load_checkpoint(Path(args.checkpoint)),
                                                                args.checkpoint)
        if args.thresholds:
            thresholds = load_thresholds(Path(args.thresholds), classnames)
        else:
            thresholds = np.full(len(classnames), args.threshold)
        if args.amp and device != 'cuda':
            print('note: --amp applies on CUDA only; predicting in float32 on the CPU', file=sys.stderr)
        kept, scores, skipped = predict_files(model, files, image_size, batch_size=args.batch_size, device=device,
                                              amp=args.amp, num_workers=args.num_workers)
        if not kept:
            raise PredictError(f'none of the {len(files)} files is a readable image')
        rows = label_rows([files[i] for i in kept], scores, classnames, thresholds, args.top_k)
        if fmt == '.json':
            text = to_json(rows, [(str(files[i]), r) for i, r in skipped], args.checkpoint, thresholds, classnames)
        else:
            text = to_csv(rows, min(args.top_k, len(classnames)))
        replaced = ''
        if output is None:
            sys.stdout.write(text)
        else:
            replaced = ' (replaced the file that was there)' if output.exists() else ''
            try:
                atomic_write(output, lambda handle: handle.write(text.encode('utf-8')))
            except OSError as e:
                raise PredictError(f'--output {output}: cannot write ({e.strerror or e})') from None
        print(f'{len(kept)} images labelled{f" -> {output}{replaced}" if output else ""}; {len(skipped)} files '
              'skipped', file=sys.stderr)
        return 0
    except VLPLError as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('\ninterrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())

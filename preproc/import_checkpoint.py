"""Import a published checkpoint of a seed system (CSL, Query2Label, SGRE, CCD) as a checkpoint of this
project: weights mapped onto the classifier, class names, backbone, head and its sizes, input size and
normalisation, the command line that builds it. `main_clip.py --evaluate`, `--init-from` and predict.py take
the file as they take a run's best.pt (docs/seed-checkpoints.md).

    python preproc/import_checkpoint.py --from csl mtresnet_opim_86.72.pth csl_tresnet_m_openimages.pt \\
        --class-descriptions oidv6-class-descriptions.csv
    python preproc/import_checkpoint.py --from q2l Q2L-R101-448/checkpoint.pkl q2l_r101_448.pt \\
        --config Q2L-R101-448/config_new.json
    python preproc/import_checkpoint.py --from sgre experiments/mlic_mscoco/exp1/checkpoints/best_ema_model.pth \\
        sgre_r101_coco.pt --config experiments/mlic_mscoco/exp1/config.yaml --label-embeddings data/mscoco/bert.npy
    python preproc/import_checkpoint.py --from ccd results/20240101_000000/bestmodel.pt ccd_voc12.pt

The input file is read with torch.load(weights_only=True) (numpy scalars, argparse.Namespace and CCD's Munch
settings read as data): a file holding anything else is refused and none of it runs. A file that is not of
the named kind, or whose layout has no place here, stops with one line; OUT is written atomically, only
when everything mapped, and never over an existing file without --overwrite.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import sys
from pathlib import Path

if __package__ in (None, ''):  # run as `python preproc/import_checkpoint.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import backbones  # noqa: E402
import records  # noqa: E402
import seed_checkpoints  # noqa: E402
import seed_files  # noqa: E402
from checkpoints import atomic_save, rebuild_classifier  # noqa: E402
from config import DATASETS, DEFAULT_DIRS, VLPLError, one_line  # noqa: E402
from preproc._common import run_cli  # noqa: E402
from preproc.fetch import digests  # noqa: E402
from seed_checkpoints import Options  # noqa: E402
from seed_files import CheckpointImportError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='import_checkpoint', description=__doc__.split('\n\n')[0])
    parser.add_argument('--from', dest='kind', required=True, choices=sorted(seed_checkpoints.SOURCES),
                        help='the seed system that saved IN: csl (PartialLabelingCSL), q2l (Query2Label), sgre, ccd')
    parser.add_argument('input', metavar='IN', help='the published checkpoint file, as downloaded')
    parser.add_argument('output', metavar='OUT', help='the checkpoint of this project to write')
    parser.add_argument('--config', default=None, metavar='FILE',
                        help="the original's run settings: Query2Label's config JSON (q2l_infer.py --config), SGRE's "
                             'config.yaml; they give what the weights do not (attention heads, --orid_norm, ...)')
    parser.add_argument('--label-embeddings', default=None, metavar='FILE.npy',
                        help="SGRE: its label embeddings (data/<data>/bert.npy of scripts/embedding.py), which its "
                             'checkpoints do not hold')
    parser.add_argument('--class-descriptions', default=None, metavar='FILE.csv',
                        help="CSL OpenImages: oidv6-class-descriptions.csv (LabelName,DisplayName), to name the classes "
                             'as infer.py does (default: their MIDs)')
    parser.add_argument('--data-root', default=DEFAULT_DIRS['data'],
                        help='CSL OpenImages: where format_openimages.py wrote openimages/class_ids.txt and classnames.txt; '
                             "when they exist the classes are put in the dataset's order and named as it names them")
    parser.add_argument('--original-classes', default=None, metavar='FILE',
                        help="the original's class list, one name per line (e.g. SGRE's data/<data>/label.txt): checked "
                             "to be this dataset's order before importing")
    parser.add_argument('-d', '--dataset', default=None, choices=sorted(DATASETS),
                        help="the dataset of the classes (default: the checkpoint's)")
    parser.add_argument('--model', default=None, metavar='BACKBONE',
                        help='the backbone that holds the weights, a BACKBONES row or timm:NAME (default: from the '
                             "checkpoint's layout)")
    parser.add_argument('--image-size', type=int, default=None,
                        help="input side (default: the original's: its position encoding's grid, or its default)")
    parser.add_argument('--input-norm', default=None, choices=backbones.INPUT_NORMS,
                        help="the input normalisation the weights expect (default: the original's)")
    parser.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    return parser


def read_descriptions(path: Path) -> dict:
    """OpenImages MID -> display name from oidv6-class-descriptions.csv (LabelName,DisplayName)."""
    try:
        with open(path, newline='', encoding='utf-8') as f:
            rows = [row for row in csv.reader(f) if len(row) >= 2]
    except OSError as e:
        raise CheckpointImportError(f'--class-descriptions {path}: cannot read it ({e.strerror or e})') from None
    return {row[0]: row[1] for row in rows if row[0] != 'LabelName'}


def options_from(args: argparse.Namespace) -> Options:
    options = Options(dataset=args.dataset, model=args.model, image_size=args.image_size, input_norm=args.input_norm)
    if args.model is not None:
        try:
            backbones.backbone(args.model)
        except ValueError as e:
            raise CheckpointImportError(f'--model: {e}') from None
    if args.image_size is not None and args.image_size < 1:
        raise CheckpointImportError('--image-size must be >= 1')
    if args.config:
        options.config = seed_files.read_config(Path(args.config))
    if args.label_embeddings:
        try:
            options.label_embeddings = np.load(args.label_embeddings, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointImportError(f'--label-embeddings {args.label_embeddings}: {one_line(e)}') from None
    if args.class_descriptions:
        options.class_descriptions = read_descriptions(Path(args.class_descriptions))
    folder = Path(args.data_root) / 'openimages'
    if args.kind == 'csl' and args.dataset in (None, 'openimages') and (folder / 'class_ids.txt').is_file():
        options.dataset_classes = tuple(
            [line.strip() for line in (folder / name).read_text(encoding='utf-8').splitlines() if line.strip()]
            for name in ('class_ids.txt', 'classnames.txt'))
    if args.original_classes:
        try:
            text = Path(args.original_classes).read_text(encoding='utf-8')
        except OSError as e:
            raise CheckpointImportError(f'--original-classes {args.original_classes}: {e.strerror or e}') from None
        options.original_classes = [line.strip() for line in text.splitlines() if line.strip()]
    return options


def parse_settings(argv: list[str], where: str):
    """The Config main_clip.py makes of the imported command line (what --evaluate re-parses)."""
    from main_clip import parse_args

    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            return parse_args(argv)[0]
    except SystemExit:
        raise CheckpointImportError(f'{where}: its settings make no classifier here ({message.getvalue().strip()})') from None


def rebuild(ckpt: dict, where: str):
    """The classifier of a checkpoint through the project's one way back from a checkpoint
    (checkpoints.rebuild_classifier, the path of --evaluate and predict.py)."""
    try:
        return rebuild_classifier(ckpt, where).model
    except VLPLError as e:
        raise CheckpointImportError(one_line(e)) from None


def import_checkpoint(kind: str, source: Path, output: Path, options: Options, overwrite: bool = False) -> list[str]:
    """Read, convert, rebuild and write; the report lines."""
    source, output = Path(source), Path(output)
    if output.is_dir():
        raise CheckpointImportError(f'{output} is a folder: give OUT as a file path (e.g. {output / "imported.pt"})')
    if output.exists() and source.exists() and output.samefile(source):
        raise CheckpointImportError(f'{output} is also IN: write the import to another file (the original stays '
                                    'as it was published)')
    if output.exists() and not overwrite:
        raise CheckpointImportError(f'{output} exists: choose another OUT or add --overwrite')
    where = str(source)
    imported = seed_checkpoints.convert(kind, seed_files.read_file(source), where, options)
    cfg = parse_settings(imported.argv, where)
    ckpt = dict(model=imported.state, config=dataclasses.asdict(cfg), argv=imported.argv,
                classnames=imported.classnames, epoch=imported.epoch, **imported.extras)
    model = rebuild(ckpt, where)
    provenance = dict(source=kind, file=source.name, sha256=digests(source)['sha256'], assumed=list(imported.notes))
    extras = {k: v for k, v in imported.extras.items() if k != 'label_embeddings'}  # the head holds those
    entries = records.model_entries(cfg, imported.argv, model, imported.epoch, imported.classnames)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(entries | extras | {'imported': provenance}, output)
    flags = ' '.join(imported.argv)
    return ([f'{output}: {seed_checkpoints.SOURCES[kind].name} {source.name}, {len(imported.classnames)} classes; '
             f'builds as: {flags}']
            + [f'assumed: {note}' for note in imported.notes]
            + [f'evaluate: python main_clip.py --evaluate {output}   label images: python predict.py {output} IMAGES'])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> list[str]:
        return import_checkpoint(args.kind, Path(args.input), Path(args.output), options_from(args), args.overwrite)

    return run_cli(parser, body, argv, errors=(VLPLError, OSError))


if __name__ == '__main__':
    sys.exit(main())

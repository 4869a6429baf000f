"""The data of a run: the formatted splits (the demo generated on first use), every input file
checked before the expensive work (an --init-from checkpoint compared with the run, the backbone's
weights loaded), the image sets of --data-format and their loaders (`Data`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import backbones
import class_text_features
import datasets
import distributed
import fingerprint
import heads_run
import image_dataset
import label_tables
import methods
import packs
from checkpoints import check_fits, ensure_writable, load_checkpoint
from config import Config, UserError
from distributed import is_primary, log


@dataclasses.dataclass
class Data:
    """The splits of a run, their image sets and loaders. train_eval: the train images in row order
    without flips (the embedding cache, predictions on the train split)."""
    splits: dict
    sets: dict
    train_eval_set: torch.utils.data.Dataset
    sampler: image_dataset.FlipSampler
    loaders: dict
    train_eval_loader: torch.utils.data.DataLoader
    inputs: dict  # the fingerprint of the data (fingerprint.py), kept in last.pt for --resume
    # The train rows whose predictions the train phase keeps for its metrics (datasets.metric_rows,
    # DatasetInfo.train_metric_rows); None: every row.
    metric_rows: object = None

    @property
    def num_classes(self) -> int:
        return self.splits['train'].labels_obs.shape[1]


def needs_clip(cfg: Config) -> bool:
    """Whether the run uses a CLIP model: pseudo-labels (VLPL's or a method's own), the clip_vision
    backbone, or SGRE's default label embeddings."""
    return (methods.METHODS[cfg.loss].needs_pseudo_labels or cfg.model == 'clip_vision'
            or heads_run.needs_clip(cfg))


def prepare_data(cfg: Config, *, clip: bool = True) -> dict:
    """The formatted splits (docs/original-vlpl.md section 4); the demo is generated on first use, its
    tiny CLIP only when `clip` (a run that uses CLIP; not --evaluate, whose checkpoint holds its model)."""
    if cfg.dataset == 'demo':
        from preproc import make_demo
        with distributed.primary_first('generating the demo data'):
            make_demo.ensure_demo(cfg.data_root, progress=is_primary(), with_clip=clip)
            if cfg.observed is not None:
                ensure_demo_observed(cfg)
    method = methods.METHODS[cfg.loss]
    splits = datasets.load_splits(cfg.data_root, cfg.dataset, observed=cfg.observed,
                                  clean_train_labels=method.clean_train_labels, unlabelled=not method.reads_train_labels)
    # One class name per label column, checked before any work: a classnames.txt edited by hand (OpenImages')
    # let a run train and write a checkpoint that predict.py and --evaluate could not rebuild.
    names = class_text_features.read_classnames(cfg.dataset, data_root=cfg.data_root)
    num_classes = splits['test'].labels_true.shape[1]
    if len(names) != num_classes:
        where = class_text_features.classnames_path(cfg.dataset, cfg.data_root)
        raise datasets.DataError(f'{where} names {len(names)} classes, but the label files of {cfg.dataset} under '
                                 f'{cfg.data_root} have {num_classes} columns: run '
                                 f'`python {datasets.DATASETS[cfg.dataset].formatter}` again '
                                 f'(see data/{cfg.dataset}/README.md)')
    return splits


def ensure_demo_observed(cfg: Config) -> None:
    """The demo makes its own partial-annotation file (seed 1200) when it lacks it, or when the demo
    was rebuilt since: generate_observed_labels.py --scheme rps|fpc for a tag it can parse."""
    from preproc import generate_observed_labels

    parsed = datasets.parse_observed_tag(cfg.observed)
    if parsed is None or datasets.canonical_observed_tag(*parsed) != cfg.observed:
        return  # load_splits names the command
    folder = Path(cfg.data_root) / 'demo'
    path = folder / datasets.observed_file_name(cfg.observed)
    if path.is_file() and path.stat().st_mtime >= (folder / 'formatted_train_labels.npy').stat().st_mtime:
        return
    if is_primary():
        try:
            log.info(generate_observed_labels.write_partial(cfg.data_root, 'demo', *parsed, overwrite=True))
        except generate_observed_labels.PreprocError as err:  # e.g. rps1.0: a file without an observed positive
            raise datasets.DataError(f'--observed {cfg.observed}: {err}') from None


def make_loader(dataset, *, batch_size: int, sampler=None, cfg: Config, device):
    """Batches in row order (or the sampler's), pinned for CUDA, workers kept across epochs.
    Several processes: a training loader yields this rank's share of each global batch
    (distributed.GlobalBatchShares); an evaluation loader this rank's block of rows.

    Each loader draws its workers' base seed from a generator of its own: from the global one, each
    new iterator would take a number from the stream that the heads' dropout reads, and with
    persistent workers an uninterrupted run makes its iterators in epoch 1 only, a resumed run again
    in its first epoch, so a resumed q2l / sgre run would drift. (The workers draw nothing: the flips
    come from the sampler.)"""
    workers = cfg.num_workers
    batches = dict(batch_size=batch_size, sampler=sampler)
    if distributed.world_size() > 1:
        batches = (dict(batch_sampler=distributed.GlobalBatchShares(sampler, batch_size)) if sampler is not None
                   else dict(batch_size=batch_size, sampler=None))
        dataset = dataset if sampler is not None else distributed.shard(dataset)
    return torch.utils.data.DataLoader(
        dataset, **batches, shuffle=False, num_workers=workers,
        collate_fn=image_dataset.collate_skipping, pin_memory=device.type == 'cuda',
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed))


def check_inputs(cfg: Config, splits: dict, root: Path, resume: dict | None) -> tuple:
    """Every input file checked before the expensive work (CLIP, the embedding cache, training); returns
    the --init-from checkpoint (checked to fit this run: checkpoints.check_fits) and the trunk built with
    --backbone-weights or the published weights (backbones.build_trunk; None where a checkpoint or CLIP
    gives the weights)."""
    for phase, split in splits.items():
        if cfg.data_format == 'packed':  # the packs replace the image files
            packs.open_pack(cfg.data_root, cfg.dataset, phase, split, cfg.image_size)
            continue
        for path in datasets.check_images(root, split, phase, cfg.dataset, cfg.skip_bad_images, cfg.data_root):
            log.warning(f'skipped missing image {root / path} (--skip-bad-images)')
    for flag, path in (('--backbone-weights', cfg.backbone_weights), ('--text-features', cfg.text_features)):
        if path is not None and not Path(path).is_file():
            raise UserError(f'{flag} {path}: no such file')
    if cfg.text_features:
        class_text_features.load_text_features(cfg.text_features, splits['train'].labels_obs.shape[1])
    ensure_writable(Path(cfg.cache_dir), '--cache-dir')
    init = trunk = None
    if cfg.init_from and resume is None:
        where = f'--init-from {cfg.init_from}'
        try:
            init = load_checkpoint(Path(cfg.init_from))
        except UserError as e:
            raise UserError(f'{where}: {e}') from None
        check_fits(init, cfg, class_text_features.read_classnames(cfg.dataset, data_root=cfg.data_root), where)
    elif resume is None and cfg.model != 'clip_vision':  # clip_vision's weights are the CLIP model's
        trunk = backbones.build_trunk(cfg.model, seed=cfg.seed, pretrained=cfg.pretrained,
                                   weights_path=cfg.backbone_weights, image_size=cfg.image_size)
    return init, trunk


def load_data(cfg: Config, resume: dict | None = None) -> tuple:
    """The formatted splits, described in one line each, and every input file checked; (splits, image root,
    --init-from checkpoint or None, prebuilt trunk or None: check_inputs)."""
    splits = prepare_data(cfg, clip=needs_clip(cfg))
    num_classes = splits['train'].labels_obs.shape[1]
    for phase, split in splits.items():
        if isinstance(split.labels_true, label_tables.Annotations):  # partial annotations, read in blocks
            counts = label_tables.summary(split.labels_true)
            log.info(f'{phase:>5}: {len(split.images):6d} images, {num_classes} classes, {counts["positives"]:.2f} '
                     f'annotated positives and {counts["negatives"]:.2f} annotated negatives / image; '
                     f'{counts["evaluable"]} classes with both (the mAP skips the others)')
            continue
        negatives = ''
        if phase == 'train' and cfg.observed is not None:
            negatives = f'{(split.labels_obs == -1).sum(1).mean():.2f} observed negatives / image ({cfg.observed}), '
        log.info(f'{phase:>5}: {len(split.images):6d} images, {num_classes} classes, '
                 f'{split.labels_obs.clip(min=0).sum(1).mean():.2f} observed positives / image, {negatives}'
                 f'{split.labels_true.sum(1).mean():.2f} true positives / image')
    root = datasets.image_root(cfg.data_root, cfg.dataset)
    return (splits, root) + check_inputs(cfg, splits, root, resume)


def build_loaders(cfg: Config, splits: dict, root: Path, method_class, device) -> Data:
    """The image sets (--data-format), the flip sampler and the loaders of every phase."""
    sets, train_eval_set = packs.image_sets(cfg, splits, root)  # --data-format pil or packed
    inputs = fingerprint.of_run(splits, {phase: sets[phase].image_stats() for phase in splits},
                                datasets.source_files(cfg.observed, method_class.clean_train_labels,
                                                      unlabelled=not method_class.reads_train_labels),
                                cfg.cache_dir)
    sets['train'] = method_class.training_images(cfg, sets['train'])  # AEVLP, CCD add their views
    sampler = image_dataset.FlipSampler(len(sets['train']), seed=cfg.seed, views=getattr(sets['train'], 'num_views', 0),
                                   draws=getattr(sets['train'], 'num_draws', 0))
    loaders = {'train': make_loader(sets['train'], batch_size=cfg.batch_size, sampler=sampler, cfg=cfg,
                                    device=device)}
    for phase in ('val', 'test'):
        loaders[phase] = make_loader(sets[phase], batch_size=cfg.batch_size, cfg=cfg, device=device)
    train_eval_loader = make_loader(train_eval_set, batch_size=cfg.batch_size, cfg=cfg, device=device)
    return Data(splits, sets, train_eval_set, sampler, loaders, train_eval_loader, inputs,
                datasets.metric_rows(len(splits['train']), cfg.data.train_metric_rows))


def check_same_inputs(cfg: Config, resume: dict, data: Data, root: Path) -> None:
    """--resume continues on the data the run started with (fingerprint.py), or stops in one line."""
    if 'inputs' not in resume:
        log.warning(f'note: {cfg.run_dir}/last.pt records no fingerprint of its data (an older version wrote it), '
                    'so the data are not checked against those the run started with')
        return
    now = fingerprint.as_recorded(resume['inputs'], data.inputs, data.splits)
    diffs = fingerprint.differences(resume['inputs'], now, {p: (root, s.images) for p, s in data.splits.items()})
    if diffs:
        raise UserError(f'--resume {cfg.run_dir}: the data under --data-root {cfg.data_root} are not those the run '
                        f'started with: {"; ".join(diffs)}; resuming would train on other pictures or labels: '
                        'restore them (a copy that keeps modification times, cp -a or rsync -a, is the same data), or '
                        f'start a new run (--init-from {Path(cfg.run_dir) / "last.pt"} starts it from these weights)')

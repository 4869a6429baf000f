"""The class text features of CLIP: class names, their text embeddings, and their files.

`read_classnames` reads text_features/<dataset>_classnames.txt; `compute_text_features` embeds
them with CLIP's text tower; `save_text_features` / `load_text_features` write and check the
K x D .npy files (preproc/compute_text_features.py makes them from the command line). A run's
features (`text_features_for`) are --text-features, or computed once and kept beside a key file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import distributed
import pseudo_label_options as pl_options
from clip_loading import is_checkpoint_path, weights_identity
from config import DATASETS, DEFAULT_DIRS, REPO_ROOT, Config, ModelLoadError, one_line
from files import save_json, save_npy

CLASSNAMES_DIR = REPO_ROOT / 'text_features'
TEXT_FEATURES_DIR = DEFAULT_DIRS['text_features']  # default output folder (--text-features-dir)


def cub_attribute_phrase(attribute: str) -> str:
    """'has_bill_shape::curved_(up_or_down)' -> 'bill shape: curved (up or down)'."""
    group, sep, value = attribute.partition('::')
    group = group.removeprefix('has_').replace('_', ' ')
    if not sep:
        return group
    return f"{group}: {value.replace('_', ' ')}"


def classnames_path(dataset: str, data_root: str | None = None) -> Path:
    """The class-name file of `dataset`: its DATASETS row's `classnames` under data_root (one its format
    script writes), else text_features/<dataset>_classnames.txt."""
    row = DATASETS.get(dataset)
    if row is not None and row.classnames:
        return Path(row.classnames.format(data_root=data_root or DEFAULT_DIRS['data']))
    return CLASSNAMES_DIR / f'{dataset}_classnames.txt'


def read_classnames(dataset: str, *, raw: bool = False, data_root: str | None = None) -> list[str]:
    """Class names of `dataset` in formatted class order, from text_features/<dataset>_classnames.txt,
    or from the file its DATASETS row names (`classnames`, under data_root: a class list that comes
    from the user's own files, written by its format script, e.g. OpenImages' trainable classes).

    For cub the file holds the attribute names of attributes.txt; they are returned as readable
    phrases (cub_attribute_phrase) unless raw=True.
    """
    row = DATASETS.get(dataset)
    if row is not None and row.classnames:
        path = classnames_path(dataset, data_root)
        if not path.is_file():
            raise ModelLoadError(f'no class names for dataset {dataset!r}: {path} is missing; see data/{dataset}/'
                                 f'README.md and run `python {row.formatter}` (it writes them)')
        return _read_written_classnames(path, dataset)
    path = classnames_path(dataset)
    if not path.is_file():
        known = sorted(p.name.removesuffix('_classnames.txt') for p in CLASSNAMES_DIR.glob('*_classnames.txt'))
        raise ModelLoadError(f'no class names for dataset {dataset!r}: {path} is missing (known: {known})')
    names = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
    if dataset == 'cub' and not raw:
        names = [cub_attribute_phrase(n) for n in names]
    return names


def _read_written_classnames(path: Path, dataset: str) -> list[str]:
    """The lines of a classnames.txt a format script wrote: one name per class, none blank, as many as
    the class_ids.txt beside it, if there is one (a file edited by hand must not shift the names
    against the label columns)."""
    redo = f'run `python {DATASETS[dataset].formatter}` again (see data/{dataset}/README.md)'
    names = path.read_text(encoding='utf-8').splitlines()
    blank = next((i for i, name in enumerate(names) if not name.strip()), None)
    if blank is not None:
        raise ModelLoadError(f'{path}:{blank + 1} is blank: each line names the class of one label column; {redo}')
    ids = path.with_name('class_ids.txt')
    if ids.is_file():
        num_ids = len(ids.read_text(encoding='utf-8').splitlines())
        if num_ids != len(names):
            raise ModelLoadError(f'{path} names {len(names)} classes but {ids} lists {num_ids}: {redo}')
    return [name.strip() for name in names]


def compute_text_features(clip_model: nn.Module, tokenizer, classnames: list[str], template: str = '{}',
                          batch_size: int = 256) -> torch.Tensor:
    """K x D float32 CPU tensor: row k = normalised CLIP text embedding of template with '{}' -> classnames[k]."""
    if '{}' not in template:
        raise ValueError(f"template {template!r} must contain '{{}}' where the class name goes")
    if not classnames:
        raise ValueError('no class names given')
    texts = [template.replace('{}', name) for name in classnames]
    device = next(clip_model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size]).to(device)
            chunks.append(clip_model.encode_text(tokens).float().cpu())
    return F.normalize(torch.cat(chunks), dim=1)


def default_text_features_path(dataset: str, clip_model: str, clip_pretrained: str | None, template: str = '{}',
                       folder: str | os.PathLike = TEXT_FEATURES_DIR) -> Path:
    """Default file of a dataset's text features: <folder>/<dataset>_<model>_<weights>[_t<hash>].npy.

    model: the open_clip name, or the stem of a JSON config path; weights: the tag, the stem of a
    checkpoint path, or 'random' for None; the suffix _t<first 8 hex of sha1(template)> appears
    only when the template is not the class name alone ('{}'). E.g. pascal_ViT-L-14-336_openai.npy.
    """
    def clean(text: str) -> str:
        return ''.join(c if c.isalnum() or c in '.-' else '-' for c in text)

    model = Path(clip_model).stem if str(clip_model).endswith('.json') else str(clip_model)
    if clip_pretrained is None:
        weights = 'random'
    elif is_checkpoint_path(str(clip_pretrained)):
        weights = Path(clip_pretrained).stem
    else:
        weights = str(clip_pretrained)
    suffix = '' if template == '{}' else '_t' + hashlib.sha1(template.encode('utf-8')).hexdigest()[:8]
    return Path(folder) / f'{dataset}_{clean(model)}_{clean(weights)}{suffix}.npy'


def save_text_features(path: str | os.PathLike, features: torch.Tensor | np.ndarray) -> Path:
    """Write K x D float32 features to `path` (.npy) atomically (atomic_write)."""
    array = np.ascontiguousarray(
        features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features), dtype=np.float32)
    return save_npy(path, array)


def load_text_features(path: str | os.PathLike, num_classes: int) -> torch.Tensor:
    """K x D float32 tensor from a .npy file; rows are L2-normalised here if they are not already.

    Already normalised files (|norm - 1| <= 1e-4 on every row) are returned unchanged, so the
    published VLPL files give exactly the values the original used.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f'text features {path} not found: create them with '
                             f'python preproc/compute_text_features.py --dataset <dataset> --output {path}')
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f'cannot read text features {path} as a numeric .npy array ({one_line(exc, with_type=True)})') from exc
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise ModelLoadError(f'text features {path} must be a K x D numeric array, got shape {array.shape} '
                             f'dtype {array.dtype}')
    if array.shape[0] != num_classes:
        raise ModelLoadError(f'text features {path} have {array.shape[0]} rows but the dataset has {num_classes} '
                             f'classes: wrong file for this dataset?')
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ModelLoadError(f'text features {path} contain NaN or infinite values')
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        raise ModelLoadError(f'text features {path} have all-zero rows {np.flatnonzero(norms == 0)[:5].tolist()}')
    if np.abs(norms - 1.0).max() > 1e-4:
        array = array / norms[:, None]
    return torch.from_numpy(np.ascontiguousarray(array))



def refuse_identical_rows(features: torch.Tensor, classnames: list[str], what_to_do: str) -> None:
    """ModelLoadError when two classes get the same text feature: a prompt longer than the CLIP's
    context is cut, and when the cut falls before the class name every class reads the same text
    (pseudo-labels of precision 0, silently); so do two equal names."""
    _, row_of, counts = torch.unique(features, dim=0, return_inverse=True, return_counts=True)
    repeated = torch.nonzero(counts[row_of] > 1).flatten()  # classes whose feature another class shares
    if len(repeated):
        group = torch.nonzero(row_of == row_of[repeated[0]]).flatten().tolist()
        names = ', '.join(repr(classnames[k]) for k in group[:3])
        raise ModelLoadError(f'{len(group)} classes ({names}{", ..." if len(group) > 3 else ""}) get the same text '
                             'feature: their prompts are cut at the CLIP\'s context length before the class name '
                             f'(or the names are equal): {what_to_do}')


def text_features_for(cfg: Config, clip_model, tokenizer, num_classes: int) -> torch.Tensor:
    """(K, D) normalised class text features: --text-features, or computed once and cached.

    A computed file has a key file beside it (CLIP model, weights identity, class names), so new
    weights under the same file name, e.g. a regenerated demo CLIP, are never paired with stale text.
    With --prompts the features are the ensemble of its templates (pseudo_label_options); the file
    name and the key then include the templates.
    """
    if cfg.text_features:
        return load_text_features(cfg.text_features, num_classes)
    classnames = read_classnames(cfg.dataset, data_root=cfg.data_root)
    key = dict(clip_model=cfg.clip_model, weights=weights_identity(cfg.clip_pretrained), classnames=classnames)
    if cfg.prompts:
        templates = pl_options.read_prompts(cfg.prompts)
        path = default_text_features_path(cfg.dataset, cfg.clip_model, cfg.clip_pretrained,
                                          folder=cfg.text_features_dir)
        path = path.with_name(f'{path.stem}_p{pl_options.templates_digest(templates)}.npy')
        key['templates'] = templates
        try:
            stored = json.loads(path.with_suffix('.json').read_text()) if path.exists() else None
        except (OSError, ValueError):
            stored = None
        if stored != key:
            distributed.log.info(f'Computing text features of {cfg.dataset} from {len(templates)} prompt templates '
                                 f'(--prompts {cfg.prompts}) -> {path}')
            features = pl_options.ensemble_text_features(clip_model, tokenizer, classnames, templates)
            refuse_identical_rows(features, classnames, f'--prompts {cfg.prompts}: shorten its templates')
            save_text_features(path, features)
            save_json(path.with_suffix('.json'), key, indent=1)
        return load_text_features(path, num_classes)
    path = default_text_features_path(cfg.dataset, cfg.clip_model, cfg.clip_pretrained, folder=cfg.text_features_dir)
    key_path = path.with_suffix('.json')
    with distributed.primary_first(f'computing the text features {path}'):  # the others then read them
        try:
            stored = json.loads(key_path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            stored = None  # no key file, or a damaged one: compute again
        if stored != key:
            distributed.log.info(f'Computing text features of {cfg.dataset} with {cfg.clip_model} -> {path}')
            features = compute_text_features(clip_model, tokenizer, classnames)
            refuse_identical_rows(features, classnames, f'shorten the class names of {cfg.dataset}')
            save_text_features(path, features)
            save_json(key_path, key, indent=1)
    return load_text_features(path, num_classes)


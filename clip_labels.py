"""The frozen CLIP side of VLPL: loading CLIP, class text features, the pseudo-labeller and the
embedding cache, and the policy that ties them to a run.

CLIP comes from open_clip (`load_clip`). The frozen image tower plus one text embedding per
class make the `PseudoLabeler` (pseudo-label rule of github.com/mvrl/VLPL, main_clip.py, the
softmax-threshold step of its training loop), shared by every backbone. It works on images or on
precomputed embeddings, so the embeddings of the training images are cached once
(`cached_embeddings`) and every epoch reads them (`build_pseudo_labels`).

Loading errors that a user can fix (no network, missing file, wrong shape) raise
`ModelLoadError` with a one-line message that names the command-line flag to use.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import distributed
from config import DEFAULT_DIRS, REPO_ROOT, Config, ModelLoadError, one_line
from files import save_json, save_npy

CLASSNAMES_DIR = REPO_ROOT / 'text_features'
CLIP_CONFIG_DIR = REPO_ROOT / 'preproc' / 'clip_configs'
TEXT_FEATURES_DIR = DEFAULT_DIRS['text_features']  # default output folder (--text-features-dir)
CLIP_FLAG = '--clip-pretrained PATH (a local open_clip or OpenAI checkpoint file)'


# --------------------------------------------------------------------------- CLIP

def _register_clip_config(model_name: str) -> str:
    """Name under which open_clip knows `model_name`, registering a JSON config if needed.

    Order: an explicit JSON path; preproc/clip_configs/<model_name>.json; an open_clip name.
    A registered JSON config is known by its file stem (and replaces a built-in of that name).
    """
    import open_clip

    path = Path(model_name)
    if model_name.endswith('.json') or path.is_file():
        config_path = path
    elif (CLIP_CONFIG_DIR / f'{model_name}.json').is_file():
        config_path = CLIP_CONFIG_DIR / f'{model_name}.json'
    elif model_name in open_clip.list_models() or model_name.startswith(('hf-hub:', 'local-dir:')):
        return model_name
    else:
        raise ModelLoadError(
            f'unknown CLIP model {model_name!r}: not an open_clip model name, a JSON config file, '
            f'or {CLIP_CONFIG_DIR.relative_to(REPO_ROOT)}/{model_name}.json (--clip-model)')
    if not config_path.is_file():
        raise ModelLoadError(f'CLIP model config {config_path} not found (--clip-model)')
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f'cannot read CLIP model config {config_path} ({one_line(exc, with_type=True)})') from exc
    needed = {'embed_dim', 'vision_cfg', 'text_cfg'}
    if not isinstance(config, dict) or not needed <= set(config):
        raise ModelLoadError(f'{config_path} is not an open_clip model config: it needs the keys {sorted(needed)}')
    open_clip.add_model_config(config_path)
    return config_path.stem


def _is_checkpoint_path(pretrained: str) -> bool:
    return (os.sep in pretrained or '/' in pretrained or Path(pretrained).exists()
            or Path(pretrained).suffix in {'.pt', '.pth', '.bin', '.safetensors', '.npz', '.ckpt'})


def _is_torchscript(path: Path) -> bool:
    # OpenAI's own .pt files are TorchScript archives, which torch.load(weights_only=True) refuses.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith('/constants.pkl') or n == 'constants.pkl' for n in archive.namelist())


def load_clip(model_name: str, pretrained: str | None, device: str | torch.device = 'cpu'):
    """Load a CLIP model with open_clip; returns (model in eval mode, tokenizer).

    model_name: an open_clip name ('ViT-L-14-336'), a JSON config path, or the stem of
    preproc/clip_configs/<name>.json. pretrained: an open_clip tag ('openai'), a local checkpoint
    file (open_clip/state-dict file, or OpenAI's TorchScript .pt), or None for random weights.

    Tags trained with QuickGELU (all 'openai' ones) get QuickGELU even when the config name
    lacks '-quickgelu' (open_clip 3 only warns), so 'ViT-L-14-336' + 'openai' equals OpenAI's
    model. A local state-dict file cannot tell: use 'ViT-L-14-336-quickgelu' for OpenAI weights.
    """
    import open_clip

    name = _register_clip_config(str(model_name))
    device = torch.device(device)
    if pretrained is None:
        model = open_clip.create_model(name, pretrained=None, device=device)
    elif _is_checkpoint_path(str(pretrained)):
        path = Path(pretrained)
        if not path.is_file():
            raise ModelLoadError(f'CLIP checkpoint {path} not found (--clip-pretrained)')
        try:
            if _is_torchscript(path):
                model = open_clip.load_openai_model(str(path), precision='fp32', device=device)
            else:
                _warn_if_quickgelu_needed(name)
                model = open_clip.create_model(name, pretrained=str(path), device=device)
        except Exception as exc:
            raise ModelLoadError(f'could not load CLIP checkpoint {path} into {name!r} ({one_line(exc, with_type=True)}); '
                                 f'check --clip-model and --clip-pretrained') from exc
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelLoadError(f'unknown pretrained tag {pretrained!r} for CLIP model {name!r} (known: {tags}); '
                                 f'pass a tag or {CLIP_FLAG}')
        quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get('quick_gelu', False))
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
        except Exception as exc:
            raise ModelLoadError(f'downloading the CLIP weights {name!r}/{pretrained!r} failed ({one_line(exc, with_type=True)}); '
                                 f'pass {CLIP_FLAG}') from exc
    return model.eval(), open_clip.get_tokenizer(name)


def _warn_if_quickgelu_needed(name: str) -> None:
    import open_clip

    config = open_clip.get_model_config(name) or {}
    if open_clip.get_pretrained_cfg(name, 'openai').get('quick_gelu') and not config.get('quick_gelu'):
        warnings.warn(f'{name!r} uses GELU; if this checkpoint holds OpenAI weights use {name}-quickgelu',
                      stacklevel=3)


def clip_image_size(clip_model: nn.Module) -> int:
    """Square input side of a CLIP model (or of its image tower)."""
    visual = getattr(clip_model, 'visual', clip_model)
    size = getattr(visual, 'image_size', None)
    if size is None:
        size = getattr(visual, 'preprocess_cfg', {}).get('size')
    if size is None:
        raise ValueError(f'cannot tell the input size of {type(visual).__name__}')
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f'non-square CLIP input size {tuple(size)} is not supported')
        size = size[0]
    return int(size)


def clip_embed_dim(clip_model: nn.Module) -> int:
    visual = getattr(clip_model, 'visual', clip_model)
    dim = getattr(visual, 'output_dim', None)
    if dim is None:  # towers without the attribute: ask the tower itself
        size = clip_image_size(visual)
        param = next(visual.parameters())
        with torch.no_grad():
            dim = visual(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)).shape[-1]
    return int(dim)


def resize_for_clip(images: torch.Tensor, size: int) -> torch.Tensor:
    """B x C x H x W -> B x C x size x size: torchvision tensor resize, bilinear, antialias on.

    The input is the ImageNet-normalised pipeline tensor (docs/original-vlpl.md section 5: CLIP gets no
    normalisation of its own). Batched resizing equals the original's per-image loop.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if images.dim() != 4:
        raise ValueError(f'expected images B x C x H x W, got shape {tuple(images.shape)}')
    return TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def pseudo_labels(image_embeddings: torch.Tensor, text_features: torch.Tensor, temp: float = 0.01,
                  threshold: float = 0.3, partial: float = 0.0) -> torch.Tensor:
    """CLIP pseudo-labels (docs/original-vlpl.md section 7), B x K float in {-1, 0, +1}.

    s = softmax((e @ T.T) / temp) over the K classes, e: B x D (L2-normalised image embeddings),
    T: K x D (L2-normalised text features). pl = +1 where s > threshold (strict), else 0.
    If partial > 0, the n = int(partial * K) classes with the smallest s get pl = -1, written
    after the positives (so a positive among the n smallest becomes -1, as in the original).
    Ties among the smallest are broken by class index (lower index first); the original's
    torch.topk leaves that order unspecified. Since s sums to 1, at most ceil(1/threshold) - 1
    classes are positive (three for the default threshold 0.3). Computed in float32.
    """
    if image_embeddings.dim() != 2 or text_features.dim() != 2:
        raise ValueError(f'expected B x D embeddings and K x D text features, got {tuple(image_embeddings.shape)} '
                         f'and {tuple(text_features.shape)}')
    if image_embeddings.shape[1] != text_features.shape[1]:
        raise ValueError(f'embedding width {image_embeddings.shape[1]} != text feature width {text_features.shape[1]}: '
                         f'text features from another CLIP model?')
    if temp <= 0:
        raise ValueError(f'temperature must be positive, got {temp}')
    if not 0.0 <= partial <= 1.0:
        raise ValueError(f'partial must lie in [0, 1], got {partial}')
    e = image_embeddings.float()
    t = text_features.to(device=e.device, dtype=torch.float32)
    scores = torch.softmax((e @ t.T) / temp, dim=1)  # B x K
    labels = (scores > threshold).float()
    num_neg = int(partial * t.shape[0])
    if num_neg > 0:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :num_neg]
        labels.scatter_(1, lowest, -1.0)
    return labels


class PseudoLabeler(nn.Module):
    """Frozen CLIP image tower + class text features -> pseudo-labels (docs/original-vlpl.md section 7).

    The tower is frozen in place (requires_grad False) and stays in eval mode even when a parent
    module calls .train(). Text features (K x D) are stored L2-normalised as a non-persistent
    buffer, so they follow .to(device) but do not enter checkpoints.
    """

    def __init__(self, visual: nn.Module, text_features: torch.Tensor | np.ndarray, *, temp: float = 0.01,
                 threshold: float = 0.3, partial: float = 0.0):
        super().__init__()
        self.visual = visual
        self.visual.requires_grad_(False)
        self.visual.eval()
        self.image_size = clip_image_size(visual)
        features = text_features if torch.is_tensor(text_features) else torch.from_numpy(np.asarray(text_features))
        self.register_buffer('text_features', F.normalize(features.float(), dim=1), persistent=False)
        self.temp, self.threshold, self.partial = float(temp), float(threshold), float(partial)

    def train(self, mode: bool = True) -> 'PseudoLabeler':
        super().train(mode)
        self.visual.eval()
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pipeline images B x 3 x S x S -> L2-normalised projected CLIP embeddings B x D (float32)."""
        param = next(self.visual.parameters())
        x = resize_for_clip(images, self.image_size).to(device=param.device, dtype=param.dtype)
        return F.normalize(self.visual(x).float(), dim=-1)

    def from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B x D normalised embeddings (e.g. cached output of embed) -> B x K pseudo-labels."""
        return pseudo_labels(embeddings, self.text_features, self.temp, self.threshold, self.partial)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_embeddings(self.embed(images))


# --------------------------------------------------------------------------- text features

def cub_attribute_phrase(attribute: str) -> str:
    """'has_bill_shape::curved_(up_or_down)' -> 'bill shape: curved (up or down)'."""
    group, sep, value = attribute.partition('::')
    group = group.removeprefix('has_').replace('_', ' ')
    if not sep:
        return group
    return f"{group}: {value.replace('_', ' ')}"


def read_classnames(dataset: str, *, raw: bool = False) -> list[str]:
    """Class names of `dataset` in formatted class order, from text_features/<dataset>_classnames.txt.

    For cub the file holds the attribute names of attributes.txt; they are returned as readable
    phrases (cub_attribute_phrase) unless raw=True.
    """
    path = CLASSNAMES_DIR / f'{dataset}_classnames.txt'
    if not path.is_file():
        known = sorted(p.name.removesuffix('_classnames.txt') for p in CLASSNAMES_DIR.glob('*_classnames.txt'))
        raise ModelLoadError(f'no class names for dataset {dataset!r}: {path} is missing (known: {known})')
    names = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
    if dataset == 'cub' and not raw:
        names = [cub_attribute_phrase(n) for n in names]
    return names


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
    elif _is_checkpoint_path(str(clip_pretrained)):
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


# --------------------------------------------------------------------------- embedding cache

def weights_identity(pretrained: str | None) -> dict:
    """What identifies CLIP weights: the tag, or a local file's resolved path, size and mtime."""
    if pretrained is not None and _is_checkpoint_path(str(pretrained)) and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        return {'file': str(Path(pretrained).resolve()), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
    return {'tag': pretrained}


def embedding_cache_key(*, dataset: str, image_root, images, clip_model: str, clip_pretrained: str | None,
                        image_size: int, clip_size: int, precision: str = 'float32') -> dict:
    """Everything a cached embedding depends on. A change of any entry selects another cache file.

    precision: 'float32', or 'bf16' for a cache built under CUDA autocast (--amp). A JSON model
    config is identified by its content too, so editing it in place invalidates the cache.
    """
    config = Path(str(clip_model))
    config_sha = (hashlib.sha256(config.read_bytes()).hexdigest()
                  if str(clip_model).endswith('.json') and config.is_file() else None)
    return {'format': 1, 'dataset': dataset, 'image_root': str(Path(image_root).resolve()),
            'images_sha256': hashlib.sha256('\n'.join(map(str, images)).encode()).hexdigest(),
            'num_images': len(images), 'clip_model': str(clip_model), 'clip_config_sha256': config_sha,
            'weights': weights_identity(clip_pretrained), 'image_size': int(image_size),
            'clip_size': int(clip_size), 'precision': precision}


def cached_embeddings(labeler: PseudoLabeler, loader, key: dict, cache_dir: str | os.PathLike, *,
                      device, amp: bool = False) -> torch.Tensor:
    """(N, 2, D) float32 frozen-CLIP embeddings of every image of `loader`, unflipped and flipped.

    The frozen CLIP's output depends only on the image and the horizontal flip, so it is computed
    once and reused by every epoch and every later run with the same key (embedding_cache_key).
    `loader` must yield the images without random flips (eval transforms); the flipped embedding
    is that of image.flip(-1), which is exactly the tensor the training transform produces.
    The array is written to a temporary file and renamed, and its key file is written after it:
    an interrupted build is never used, it is rebuilt. bf16 autocast on CUDA when `amp`.
    """
    cache_dir = Path(cache_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f'clip_{key["dataset"]}_{digest}.npy'
    key_path = path.with_suffix('.json')
    num_rows = key['num_images']
    array = None
    if path.is_file() and key_path.is_file():
        try:
            stored_key = json.loads(key_path.read_text())
            array = np.load(path, allow_pickle=False)
            if not (stored_key == key and array.ndim == 3 and array.shape[:2] == (num_rows, 2)):
                array = None
        except (OSError, ValueError, EOFError):
            array = None  # unreadable or truncated: rebuilt below
    # Several processes: all use the file or all rebuild it, each embedding its block of rows.
    if not distributed.any_rank(array is None):
        return torch.from_numpy(array)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = None
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if amp and torch.device(device).type == 'cuda'
                else contextlib.nullcontext())
    with autocast:
        for batch in distributed.progress(loader, desc='frozen CLIP embeddings (once, cached)'):
            if 'image' not in batch:  # every image of the batch was skipped (--skip-bad-images)
                continue
            images = datasets.to_model_input(batch['image'], batch.get('flipped'), device)  # packed: on the device
            plain, flipped = labeler.embed(images), labeler.embed(images.flip(-1))  # B x D each
            if out is None:
                out = np.zeros((num_rows, 2, plain.shape[1]), dtype=np.float32)
            index = batch['index'].numpy()
            out[index, 0] = plain.float().cpu().numpy()
            out[index, 1] = flipped.float().cpu().numpy()
    if distributed.world_size() > 1:  # the loader held this rank's block (distributed.shard): gather
        mine = out if out is not None else np.zeros((num_rows, 2, labeler.text_features.shape[1]), np.float32)
        merged = distributed.merge_shards(torch.from_numpy(mine)).numpy()
        out = merged if distributed.any_rank(out is not None) else None
    if out is None:
        raise ValueError('the embedding cache loader yielded no image')
    if distributed.is_primary():  # rank 0 writes; the others wait until the file is complete
        key_path.unlink(missing_ok=True)
        save_npy(path, out)
        save_json(key_path, key)
    distributed.barrier()
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- the policy of a run

def text_features_for(cfg: Config, clip_model, tokenizer, num_classes: int) -> torch.Tensor:
    """(K, D) normalised class text features: --text-features, or computed once and cached.

    A computed file has a key file beside it (CLIP model, weights identity, class names), so new
    weights under the same file name, e.g. a regenerated demo CLIP, are never paired with stale text.
    """
    if cfg.text_features:
        return load_text_features(cfg.text_features, num_classes)
    path = default_text_features_path(cfg.dataset, cfg.clip_model, cfg.clip_pretrained, folder=cfg.text_features_dir)
    classnames = read_classnames(cfg.dataset)
    key = dict(clip_model=cfg.clip_model, weights=weights_identity(cfg.clip_pretrained), classnames=classnames)
    key_path = path.with_suffix('.json')
    with distributed.primary_first(f'computing the text features {path}'):  # the others then read them
        try:
            stored = json.loads(key_path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            stored = None  # no key file, or a damaged one: compute again
        if stored != key:
            distributed.log.info(f'Computing text features of {cfg.dataset} with {cfg.clip_model} -> {path}')
            save_text_features(path, compute_text_features(clip_model, tokenizer, classnames))
            save_json(key_path, key, indent=1)
    return load_text_features(path, num_classes)


def pseudo_label_quality(pl: np.ndarray, true: np.ndarray) -> dict:
    """Precision and recall of the positive pseudo-labels against the true labels (all entries)."""
    pos = pl == 1
    hits = float((pos & (true == 1)).sum())
    return dict(precision=hits / max(float(pos.sum()), 1.0), recall=hits / max(float((true == 1).sum()), 1.0),
                per_image=float(pos.sum()) / max(pl.shape[0], 1))


def build_pseudo_labels(cfg: Config, clip_model, tokenizer, train_split, train_eval_loader, device,
                        num_classes: int):
    """The frozen-CLIP pseudo-label source of the training phase and its quality on the train split.

    Returns (source, quality): source(images, index, flipped) -> B x K pseudo-labels; quality is
    pseudo_label_quality over the unflipped train images (None with --clip-mode online, which runs
    CLIP on every batch as the original does). --clip-mode cache embeds every training image once
    per flip state and reads the embedding of the flip the sampler drew.
    """
    text = text_features_for(cfg, clip_model, tokenizer, num_classes).to(device)
    width = clip_embed_dim(clip_model)
    if text.shape[1] != width:
        raise ModelLoadError(f'text features {cfg.text_features or "(computed)"} are {text.shape[1]} wide but the CLIP '
                             f'model {cfg.clip_model} embeds images in {width}: features of another CLIP model? '
                             'Pass the matching --text-features or --clip-model')
    labeler = PseudoLabeler(clip_model.visual, text, temp=cfg.temp, threshold=cfg.threshold,
                            partial=cfg.partial).to(device)
    if cfg.clip_mode == 'online':
        distributed.log.info('Frozen CLIP runs on every training batch (--clip-mode online); the pseudo-label '
                             'precision and recall are reported on each train line.')
        return (lambda images, index, flipped: labeler(images)), None
    images = train_eval_loader.dataset
    if isinstance(images, torch.utils.data.Subset):  # several processes: this rank's block (distributed.shard)
        images = images.dataset
    key = embedding_cache_key(
        dataset=cfg.dataset, image_root=images.root, images=train_split.images,
        clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained, image_size=cfg.image_size,
        clip_size=labeler.image_size, precision='bf16' if cfg.amp and device.type == 'cuda' else 'float32')
    emb = cached_embeddings(labeler, train_eval_loader, key, Path(cfg.cache_dir), device=device,
                            amp=cfg.amp).to(device)  # (N, 2, D): unflipped, flipped
    quality = pseudo_label_quality(labeler.from_embeddings(emb[:, 0]).cpu().numpy(), train_split.labels_true)
    return (lambda images, index, flipped: labeler.from_embeddings(emb[index, flipped.long()])), quality

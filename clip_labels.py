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
import ccd
import pseudo_label_options as pl_options
from config import DEFAULT_DIRS, REPO_ROOT, Config, ModelLoadError, UserError, one_line
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


def configured_image_size(model_name: str) -> int | None:
    """The square input side in a CLIP model's open_clip config (--clip-model), None if it has none."""
    import open_clip

    config = open_clip.get_model_config(_register_clip_config(str(model_name))) or {}
    size = config.get('vision_cfg', {}).get('image_size')
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    return size if isinstance(size, int) else None


def _is_checkpoint_path(pretrained: str) -> bool:
    return (os.sep in pretrained or '/' in pretrained or Path(pretrained).exists()
            or Path(pretrained).suffix in {'.pt', '.pth', '.bin', '.safetensors', '.npz', '.ckpt'})


def _is_torchscript(path: Path) -> bool:
    # OpenAI's own .pt files are TorchScript archives, which torch.load(weights_only=True) refuses.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith('/constants.pkl') or n == 'constants.pkl' for n in archive.namelist())


def load_clip(model_name: str, pretrained: str | None, device: str | torch.device = 'cpu', precision: str = 'fp32'):
    """Load a CLIP model with open_clip; returns (model in eval mode, tokenizer).

    precision 'fp16': open_clip's half-precision model (convolution, linear and attention weights and
    the projections in fp16, LayerNorm computed in fp32), as OpenAI's own clip.build_model makes it
    (clip/model.py `convert_weights`); AEVLP scores with it (aevlp.py).

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
        model = open_clip.create_model(name, pretrained=None, device=device, precision=precision)
    elif _is_checkpoint_path(str(pretrained)):
        path = Path(pretrained)
        if not path.is_file():
            raise ModelLoadError(f'CLIP checkpoint {path} not found (--clip-pretrained)')
        try:
            if _is_torchscript(path):
                model = open_clip.load_openai_model(str(path), precision=precision, device=device)
            else:
                _warn_if_quickgelu_needed(name)
                model = open_clip.create_model(name, pretrained=str(path), device=device, precision=precision)
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
            model = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu,
                                          precision=precision)
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
    return scores_to_labels(scores, threshold, partial)


def scores_to_labels(scores: torch.Tensor, threshold: float = 0.3, partial: float = 0.0) -> torch.Tensor:
    """The labelling rule of `pseudo_labels` applied to B x K scores (softmax scores, or CCD's
    debiased and refreshed soft labels): +1 where score > threshold, then the int(partial * K)
    lowest scores -1 (stable order)."""
    labels = (scores > threshold).float()
    num_neg = int(partial * scores.shape[1])
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
                 threshold: float = 0.3, partial: float = 0.0, preprocess: str = 'original'):
        super().__init__()
        self.visual = visual
        self.visual.requires_grad_(False)
        self.visual.eval()
        self.image_size = clip_image_size(visual)
        features = text_features if torch.is_tensor(text_features) else torch.from_numpy(np.asarray(text_features))
        self.register_buffer('text_features', F.normalize(features.float(), dim=1), persistent=False)
        self.temp, self.threshold, self.partial = float(temp), float(threshold), float(partial)
        # 'original': the ImageNet-normalised pipeline tensor resized (resize_for_clip); 'clip': CLIP's
        # own mean, std and interpolation (pseudo_label_options.clip_preprocess).
        if preprocess not in ('original', 'clip'):
            raise ValueError(f"preprocess must be 'original' or 'clip', got {preprocess!r}")
        self.preprocess = preprocess
        self.clip_settings = pl_options.clip_preprocess_settings(visual)

    def train(self, mode: bool = True) -> 'PseudoLabeler':
        super().train(mode)
        self.visual.eval()
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pipeline images B x 3 x S x S -> L2-normalised projected CLIP embeddings B x D (float32)."""
        if self.preprocess == 'clip':
            return self.embed_inputs(pl_options.clip_preprocess(images, self.image_size, self.clip_settings))
        return self.embed_inputs(resize_for_clip(images, self.image_size))

    @torch.no_grad()
    def embed_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP inputs B x 3 x s x s (s = image_size, already preprocessed) -> normalised embeddings B x D."""
        param = next(self.visual.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        return F.normalize(self.visual(x).float(), dim=-1)

    def to_clip_normalisation(self, images: torch.Tensor) -> torch.Tensor:
        """Pipeline pixels (any size) in the normalisation CLIP is fed with (unchanged for 'original')."""
        return pl_options.renormalise(images, self.clip_settings) if self.preprocess == 'clip' else images

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B x D normalised embeddings -> B x K softmax scores, as pseudo_labels computes them."""
        t = self.text_features.to(device=embeddings.device, dtype=torch.float32)
        return torch.softmax((embeddings.float() @ t.T) / self.temp, dim=1)

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
                        image_size: int, clip_size: int, precision: str = 'float32',
                        preprocess: str = 'original') -> dict:
    """Everything a cached embedding depends on. A change of any entry selects another cache file.

    precision: 'float32', or 'bf16' for a cache built under CUDA autocast (--amp). A JSON model
    config is identified by its content too, so editing it in place invalidates the cache.
    preprocess: how the pipeline tensor becomes CLIP's input (--clip-preprocess). The embeddings of
    CCD's local views add the digest of their boxes (cached_view_embeddings).
    """
    config = Path(str(clip_model))
    config_sha = (hashlib.sha256(config.read_bytes()).hexdigest()
                  if str(clip_model).endswith('.json') and config.is_file() else None)
    return {'format': 1, 'dataset': dataset, 'image_root': str(Path(image_root).resolve()),
            'images_sha256': hashlib.sha256('\n'.join(map(str, images)).encode()).hexdigest(),
            'num_images': len(images), 'clip_model': str(clip_model), 'clip_config_sha256': config_sha,
            'weights': weights_identity(clip_pretrained), 'image_size': int(image_size),
            'clip_size': int(clip_size), 'precision': precision, 'preprocess': preprocess}


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
    path = _cache_path(key, cache_dir)
    num_rows = key['num_images']
    array = _read_cached(path, key, (num_rows, 2))
    # Several processes: all use the file or all rebuild it, each embedding its block of rows.
    if not distributed.any_rank(array is None):
        return array
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
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
        _write_cached(path, key, out)
    distributed.barrier()
    return torch.from_numpy(out)


def _cache_path(key: dict, cache_dir) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f'clip_{key["dataset"]}_{digest}.npy'


def _read_cached(path: Path, key: dict, leading: tuple) -> torch.Tensor | None:
    """The cached array at `path` if its key file holds `key` and its leading dimensions are `leading`."""
    key_path = path.with_suffix('.json')
    if path.is_file() and key_path.is_file():
        try:
            stored_key = json.loads(key_path.read_text())
            array = np.load(path, allow_pickle=False)
            if stored_key == key and array.ndim == len(leading) + 1 and array.shape[:len(leading)] == leading:
                return torch.from_numpy(array)
        except (OSError, ValueError, EOFError):
            pass  # unreadable or truncated: rebuilt by the caller
    return None


def _write_cached(path: Path, key: dict, array: np.ndarray) -> torch.Tensor:
    """The array first, its key file after it: an interrupted write is never read back."""
    key_path = path.with_suffix('.json')
    key_path.unlink(missing_ok=True)
    save_npy(path, array)
    save_json(key_path, key)
    return torch.from_numpy(array)


def cached_view_embeddings(labeler: PseudoLabeler, loader, rows: torch.Tensor, boxes: torch.Tensor, key: dict,
                           cache_dir: str | os.PathLike, *, device) -> torch.Tensor:
    """(V, D) float32 CLIP embeddings of CCD's local views: view v is image rows[v] cropped and resized to
    boxes[v] (a ccd.cam_views row: box and size; ccd.view_inputs). Cached like the global embeddings, under `key` (the split's
    embedding_cache_key, computed in float32 without autocast) plus the digest of the views, so a rerun
    with the same views reuses them.
    `loader`: the split in row order without flips."""
    views = torch.cat([rows[:, None], boxes], dim=1).numpy().astype(np.int64)
    key = dict(key, precision='float32', views='ccd-cam-crops',
               views_sha256=hashlib.sha256(views.tobytes()).hexdigest(), num_views=int(views.shape[0]))
    path = _cache_path(key, cache_dir)
    array = _read_cached(path, key, (views.shape[0],))
    if array is not None:
        return array
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    out = np.zeros((views.shape[0], clip_embed_dim(labeler.visual)), dtype=np.float32)
    order = torch.argsort(rows, stable=True)
    for batch in distributed.progress(loader, desc='CCD local views: CLIP embeddings'):
        if 'image' not in batch:
            continue
        index = batch['index']
        lo, hi = torch.searchsorted(rows[order], torch.stack([index.min(), index.max() + 1]))
        picked = order[lo:hi]
        picked = picked[torch.isin(rows[picked], index)]
        if picked.numel() == 0:
            continue
        position = {int(r): i for i, r in enumerate(index.tolist())}
        images = batch['image'][[position[int(r)] for r in rows[picked]]].to(device)
        inputs = ccd.view_inputs(images, boxes[picked], labeler.image_size, labeler.to_clip_normalisation)
        out[picked.numpy()] = labeler.embed_inputs(inputs).cpu().numpy()
    return _write_cached(path, key, out)


# --------------------------------------------------------------------------- the policy of a run

def text_features_for(cfg: Config, clip_model, tokenizer, num_classes: int) -> torch.Tensor:
    """(K, D) normalised class text features: --text-features, or computed once and cached.

    A computed file has a key file beside it (CLIP model, weights identity, class names), so new
    weights under the same file name, e.g. a regenerated demo CLIP, are never paired with stale text.
    With --prompts the features are the ensemble of its templates (pseudo_label_options); the file
    name and the key then include the templates.
    """
    if cfg.text_features:
        return load_text_features(cfg.text_features, num_classes)
    classnames = read_classnames(cfg.dataset)
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
            save_text_features(path, pl_options.ensemble_text_features(clip_model, tokenizer, classnames, templates))
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
            save_text_features(path, compute_text_features(clip_model, tokenizer, classnames))
            save_json(key_path, key, indent=1)
    return load_text_features(path, num_classes)


def pseudo_label_quality(pl: np.ndarray, true: np.ndarray) -> dict:
    """Precision and recall of the positive pseudo-labels against the true labels (all entries)."""
    pos = pl == 1
    hits = float((pos & (true == 1)).sum())
    return dict(precision=hits / max(float(pos.sum()), 1.0), recall=hits / max(float((true == 1).sum()), 1.0),
                per_image=float(pos.sum()) / max(pl.shape[0], 1))


class PseudoLabelSource:
    """The pseudo-labels of the training phase: source(images, index, flipped) -> B x K in {-1, 0, +1}.

    report: the per-class quality on the train split (pseudo_label_options.class_quality, stages in
    order), None where it is not computed (--clip-mode online). before_epoch and the state hooks do
    nothing here; CcdPseudoLabels overrides them.
    """

    def __init__(self, labels_of, report: dict | None = None):
        self.labels_of = labels_of
        self.report = report

    def __call__(self, images, index, flipped, batch=None):
        """batch: the loader's whole batch, for a source that reads more of it (aevlp.AevlpPseudoLabels)."""
        return self.labels_of(images, index, flipped)

    def before_epoch(self, epoch: int, model, predict_train) -> bool:
        """Called before the training phase of every epoch; True when the labels changed."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CcdPseudoLabels(PseudoLabelSource):
    """CCD's soft labels (ccd.py) thresholded by the VLPL rule (scores_to_labels).

    table: N x 2 x K soft labels (unflipped, flipped): the global softmax scores, debiased with
    --pl-debias (bias from the unflipped scores), and with --pl-views cam blended with the local
    views' labels before epochs views_epoch + 1 ... views_epoch + refreshes (the first time after
    calibrating the classifier threshold, CCD's `multiplier`). The table, the multiplier and the
    refreshes done are the state saved in the checkpoint.
    """

    def __init__(self, cfg: Config, labeler: PseudoLabeler, table: torch.Tensor, bias, loader, key: dict, device,
                 true: np.ndarray, classnames: list[str], report: dict):
        super().__init__(self._labels, report)
        self.cfg, self.labeler, self.table, self.bias = cfg, labeler, table, bias
        self.loader, self.key, self.device, self.true, self.classnames = loader, key, device, true, classnames
        self.multiplier = None
        self.refreshes = 0

    def _labels(self, images, index, flipped):
        return scores_to_labels(self.table[index, flipped.long()], self.cfg.threshold, self.cfg.partial)

    def unflipped_labels(self) -> np.ndarray:
        return scores_to_labels(self.table[:, 0], self.cfg.threshold, self.cfg.partial).cpu().numpy()

    def before_epoch(self, epoch: int, model, predict_train) -> bool:
        cfg = self.cfg
        if cfg.pl_views != 'cam' or self.refreshes >= cfg.pl_views_refreshes or epoch - 1 < cfg.pl_views_epoch:
            return False
        if self.multiplier is None and cfg.pl_views_threshold is not None:
            self.multiplier = cfg.pl_views_threshold
        if self.multiplier is None:  # CCD calibrates once, on a shuffled pass (train.py:216-247)
            probs = torch.from_numpy(predict_train())
            probs = probs[torch.randperm(probs.shape[0], generator=torch.Generator().manual_seed(cfg.seed))]
            probs = probs[~torch.isnan(probs[:, 0])]
            start = 0.05 if cfg.pl_debias and cfg.pl_floor > 0 else 0.001  # train.py:197-200 (LS on or off)
            self.multiplier, stop = ccd.calibrate_threshold(probs, start, cfg.pl_views_bound)
            distributed.log.info(f'CCD classifier threshold {self.multiplier:.3f} '
                                 f'({"stopped at image " + str(stop) if stop is not None else "images ran out"}; '
                                 f'bound {cfg.pl_views_bound})')
        try:
            rows, _, boxes = ccd.cam_views(
                model, self.loader, multiplier=self.multiplier, offset=int(round(cfg.pl_views_margin * cfg.image_size)),
                side=self.labeler.image_size, device=self.device,
                progress=lambda iterable, desc: distributed.progress(iterable, desc=desc))
        except ValueError as exc:  # a model without CAM: refused at parse time, kept as a guard
            raise UserError(f'--pl-views cam: {one_line(exc)}') from None
        embeddings = cached_view_embeddings(self.labeler, self.loader, rows, boxes, self.key, self.cfg.cache_dir,
                                            device=self.device).to(self.device)
        scores = self.labeler.scores(embeddings)
        local = ccd.local_labels(rows.to(self.device), scores, self.table.shape[0], self.bias, self.floor)
        self.table = ccd.blend(self.table, local[:, None, :], cfg.pl_views_ratio)
        self.refreshes += 1
        when = f'after CAM views refresh {self.refreshes} (before epoch {epoch})'
        stage = pl_options.class_quality(self.unflipped_labels(), self.true, self.classnames)
        stage.update(when=when, epoch=epoch, views=int(rows.numel()),
                     views_per_image=float(rows.numel()) / max(self.table.shape[0], 1), multiplier=self.multiplier)
        self.report['stages'].append(stage)
        distributed.log.info(pl_options.quality_line(stage, when) + f'; {stage["views_per_image"]:.2f} views / image')
        return True

    @property
    def floor(self) -> float:
        return self.cfg.pl_floor if self.cfg.pl_debias else 0.0

    def state_dict(self) -> dict:
        return {'table': self.table.cpu(), 'multiplier': self.multiplier, 'refreshes': self.refreshes,
                'report': self.report}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.table = state['table'].to(self.device)
            self.multiplier, self.refreshes = state['multiplier'], state['refreshes']
            self.report = state.get('report', self.report)


def pseudo_label_options(cfg: Config) -> dict:
    """The pseudo-label settings of a run, as pl_quality.json records them."""
    return dict(temp=cfg.temp, threshold=cfg.threshold, partial=cfg.partial, clip_preprocess=cfg.clip_preprocess,
                prompts=cfg.prompts, pl_debias=cfg.pl_debias, pl_debias_entropy=cfg.pl_debias_entropy,
                pl_floor=cfg.pl_floor, pl_views=cfg.pl_views, pl_views_epoch=cfg.pl_views_epoch,
                pl_views_refreshes=cfg.pl_views_refreshes, pl_views_margin=cfg.pl_views_margin,
                pl_views_ratio=cfg.pl_views_ratio, pl_views_bound=cfg.pl_views_bound,
                pl_views_threshold=cfg.pl_views_threshold)


def build_pseudo_labels(cfg: Config, clip_model, tokenizer, train_split, train_eval_loader, device,
                        num_classes: int):
    """The frozen-CLIP pseudo-label source of the training phase and its quality on the train split.

    Returns (source, quality): source is a PseudoLabelSource (called with images, index, flipped ->
    B x K pseudo-labels); quality is pseudo_label_quality over the unflipped train images (None
    with --clip-mode online, which runs CLIP on every batch as the original does). --clip-mode
    cache embeds every training image once per flip state and reads the embedding of the flip the
    sampler drew. With --pl-debias or --pl-views cam the source is CcdPseudoLabels.
    """
    text = text_features_for(cfg, clip_model, tokenizer, num_classes).to(device)
    width = clip_embed_dim(clip_model)
    if text.shape[1] != width:
        raise ModelLoadError(f'text features {cfg.text_features or "(computed)"} are {text.shape[1]} wide but the CLIP '
                             f'model {cfg.clip_model} embeds images in {width}: features of another CLIP model? '
                             'Pass the matching --text-features or --clip-model')
    labeler = PseudoLabeler(clip_model.visual, text, temp=cfg.temp, threshold=cfg.threshold,
                            partial=cfg.partial, preprocess=cfg.clip_preprocess).to(device)
    if cfg.clip_mode == 'online':
        distributed.log.info('Frozen CLIP runs on every training batch (--clip-mode online); the pseudo-label '
                             'precision and recall are reported on each train line.')
        return PseudoLabelSource(lambda images, index, flipped: labeler(images)), None
    images = train_eval_loader.dataset
    if isinstance(images, torch.utils.data.Subset):  # several processes: this rank's block (distributed.shard)
        images = images.dataset
    key = embedding_cache_key(
        dataset=cfg.dataset, image_root=images.root, images=train_split.images,
        clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained, image_size=cfg.image_size,
        clip_size=labeler.image_size, precision='bf16' if cfg.amp and device.type == 'cuda' else 'float32',
        preprocess=cfg.clip_preprocess)
    emb = cached_embeddings(labeler, train_eval_loader, key, Path(cfg.cache_dir), device=device,
                            amp=cfg.amp).to(device)  # (N, 2, D): unflipped, flipped
    classnames = read_classnames(cfg.dataset)
    report = {'options': pseudo_label_options(cfg), 'classnames': classnames, 'stages': []}
    true = train_split.labels_true
    if not (cfg.pl_debias or cfg.pl_views == 'cam'):
        plain = labeler.from_embeddings(emb[:, 0]).cpu().numpy()
        report['stages'].append(pl_options.class_quality(plain, true, classnames) | {'when': 'global', 'epoch': 0})
        source = PseudoLabelSource(lambda images, index, flipped: labeler.from_embeddings(emb[index, flipped.long()]),
                                   report)
        return source, pseudo_label_quality(plain, true)
    table = torch.stack([labeler.scores(emb[:, 0]), labeler.scores(emb[:, 1])], dim=1)  # N x 2 x K
    bias = None
    stage_extra = {}
    if cfg.pl_debias:
        bias, confident, counts = ccd.class_bias(table[:, 0], cfg.pl_debias_entropy)
        table = ccd.debias(table, bias, cfg.pl_floor)
        stage_extra = dict(bias=bias.tolist(), bias_counts=counts.tolist(),
                           confident_images=int(confident.sum()),
                           classes_never_top1=[classnames[k] for k in torch.nonzero(counts == 0)[:, 0].tolist()])
    source = CcdPseudoLabels(cfg, labeler, table, bias, train_eval_loader, key, device, true, classnames, report)
    labels = source.unflipped_labels()
    report['stages'].append(pl_options.class_quality(labels, true, classnames)
                            | {'when': 'global, debiased' if cfg.pl_debias else 'global', 'epoch': 0} | stage_extra)
    return source, pseudo_label_quality(labels, true)

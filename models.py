"""Networks of VLPL: the trainable classifiers and the frozen CLIP pseudo-labeller.

Classifiers (REFERENCE section 6) are built by one factory, `build_classifier`, from the
`BACKBONES` table: each row makes a trunk that maps images (B x 3 x S x S) to features
(B x F); the factory adds the linear head Linear(F, K). A new backbone is one new row.

CLIP comes from open_clip (`load_clip`). The frozen image tower plus one text embedding per
class make the `PseudoLabeler` (REFERENCE section 7), shared by every backbone. It works on
images or on precomputed embeddings, so the embeddings can be cached.

Loading errors that a user can fix (no network, missing file, wrong shape) raise
`ModelLoadError` with a one-line message that names the command-line flag to use.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent
CLASSNAMES_DIR = REPO_ROOT / 'text_features'
CLIP_CONFIG_DIR = REPO_ROOT / 'preproc' / 'clip_configs'
TEXT_FEATURES_DIR = 'text_features'  # default output folder, relative to the working directory

BACKBONE_FLAGS = '--backbone-weights PATH (a local weights file) or --no-pretrained (random initialisation)'
CLIP_FLAG = '--clip-pretrained PATH (a local open_clip or OpenAI checkpoint file)'


class ModelLoadError(RuntimeError):
    """A model, checkpoint or text-feature file could not be loaded; the message is one line
    meant for the user and names the flag or command that fixes it."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {text[0] if text else ""}'.rstrip(': ')


# --------------------------------------------------------------------------- classifiers

class Classifier(nn.Module):
    """logits (B x K) = head(trunk(images)), trunk: B x 3 x S x S -> B x F."""

    def __init__(self, trunk: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))


class ClipVisionTrunk(nn.Module):
    """A trainable CLIP image tower fed with the pipeline tensor resized to the CLIP input size.

    Output: the projected, unnormalised CLIP image embedding (B x embed_dim), as the original
    applies its head to `image_embeds`.
    """

    def __init__(self, visual: nn.Module, image_size: int):
        super().__init__()
        self.visual = visual
        self.image_size = image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(resize_for_clip(images, self.image_size))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _resnet50_trunk(pretrained: bool, weights_path: str | None, clip_model) -> tuple[nn.Module, int]:
    import torchvision

    if weights_path is not None:
        net = torchvision.models.resnet50(weights=None)
        state = _read_state_dict(weights_path)
        # A trunk saved without its ImageNet fc is fine: fc is replaced anyway.
        state = {k: v for k, v in state.items() if not k.startswith('fc.')}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ModelLoadError(f'{weights_path} does not fit torchvision ResNet-50 ({_one_line(exc)}); '
                                 f'check --backbone-weights') from exc
        missing = [k for k in missing if not k.startswith('fc.')]
        if missing or unexpected:
            raise ModelLoadError(
                f'{weights_path} is not a torchvision ResNet-50 state dict (missing keys {missing[:3]}, '
                f'unexpected keys {unexpected[:3]}); check --backbone-weights')
    elif pretrained:
        try:
            net = torchvision.models.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
        except Exception as exc:  # no network, proxy, corrupt cache: all end the same way for the user
            raise ModelLoadError(
                f'downloading the ImageNet weights of resnet50 (torchvision IMAGENET1K_V1) failed '
                f'({_one_line(exc)}); pass {BACKBONE_FLAGS}') from exc
    else:
        net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()  # torchvision flattens before fc, so the trunk gives B x 2048 even for B = 1
    return net, 2048


def _timm_trunk(timm_name: str, pretrained: bool, weights_path: str | None, clip_model) -> tuple[nn.Module, int]:
    import timm

    # num_classes=0 drops the classifier (head.fc = Identity) and keeps timm's pooling and
    # head norm, so Linear(F, K) on top equals the original's replaced head.fc.
    kwargs: dict = dict(num_classes=0)
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise ModelLoadError(f'backbone weights file {weights_path} not found (--backbone-weights)')
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_path)))
        try:
            net = timm.create_model(timm_name, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f'could not load {weights_path} into timm {timm_name!r} ({_one_line(exc)}); '
                f'check --backbone-weights') from exc
    elif pretrained:
        try:
            net = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f'downloading the pretrained weights of timm {timm_name!r} failed ({_one_line(exc)}); '
                f'pass {BACKBONE_FLAGS}') from exc
    else:
        net = timm.create_model(timm_name, pretrained=False, **kwargs)
    return net, int(getattr(net, 'head_hidden_size', None) or net.num_features)


def _clip_vision_trunk(pretrained: bool, weights_path: str | None, clip_model) -> tuple[nn.Module, int]:
    if clip_model is None:
        raise ValueError('clip_vision needs clip_model (the CLIP model from load_clip)')
    # `pretrained` has no say here: the weights are those of clip_model (random if it was loaded
    # with pretrained=None), e.g. before a checkpoint of a trained classifier is loaded.
    if weights_path is not None:
        raise ModelLoadError('clip_vision takes its weights from the CLIP model: use --clip-pretrained, '
                             'not --backbone-weights')
    visual = copy.deepcopy(clip_model.visual)
    visual.requires_grad_(True)
    return ClipVisionTrunk(visual, clip_image_size(clip_model)), _clip_embed_dim(clip_model)


def _small_cnn_trunk(pretrained: bool, weights_path: str | None, clip_model) -> tuple[nn.Module, int]:
    # Random init whatever `pretrained` says: there are no published weights for it.
    if weights_path is not None:
        raise ModelLoadError('small_cnn has no pretrained weights: drop --backbone-weights')
    widths = (32, 64, 128, 256)
    layers, cin = [], 3
    for w in widths:
        layers.append(_conv_block(cin, w))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*layers), widths[-1]


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: make_trunk(pretrained, weights_path, clip_model) -> (trunk, feature_dim)."""
    make_trunk: Callable[..., tuple[nn.Module, int]]
    description: str


BACKBONES: dict[str, BackboneSpec] = {
    'resnet50': BackboneSpec(
        _resnet50_trunk, 'torchvision ResNet-50, IMAGENET1K_V1 weights, fc removed; head Linear(2048, K)'),
    'clip_vision': BackboneSpec(
        _clip_vision_trunk, 'trainable copy of the CLIP image tower (input resized to the CLIP size); '
                            'head Linear(embed_dim, K) on the unnormalised projected embedding'),
    'convnext_xlarge_22k': BackboneSpec(
        partial(_timm_trunk, 'convnext_xlarge.fb_in22k'), "timm 'convnext_xlarge.fb_in22k'; head Linear(2048, K)"),
    'convnext_xlarge_1k': BackboneSpec(
        partial(_timm_trunk, 'convnext_xlarge.fb_in22k_ft_in1k'),
        "timm 'convnext_xlarge.fb_in22k_ft_in1k'; head Linear(2048, K)"),
    'small_cnn': BackboneSpec(
        _small_cnn_trunk, 'random-init CNN, 4 stride-2 conv-BN-ReLU blocks (32-64-128-256), for the offline demo; '
                          'head Linear(256, K)'),
}


def build_classifier(name: str, num_classes: int, *, pretrained: bool = True,
                     weights_path: str | os.PathLike | None = None, clip_model: nn.Module | None = None) -> Classifier:
    """Classifier for backbone `name` (a key of BACKBONES): forward(images B x 3 x S x S) -> logits B x K.

    pretrained: download the backbone's published weights (ignored by small_cnn, which is always
    random, and by clip_vision, whose weights are clip_model's). weights_path: a local weights file
    instead of the download (torchvision state dict for resnet50, any file timm reads for
    convnext). clip_model: the model from load_clip, required by clip_vision (its image tower is
    deep-copied and trained; the copy does not share parameters with clip_model).
    """
    if name not in BACKBONES:
        raise ValueError(f'unknown backbone {name!r}; choose one of {sorted(BACKBONES)}')
    if num_classes < 1:
        raise ValueError(f'num_classes must be positive, got {num_classes}')
    if weights_path is not None and not pretrained:
        raise ModelLoadError('--backbone-weights and --no-pretrained contradict each other: give one')
    trunk, feature_dim = BACKBONES[name].make_trunk(pretrained, None if weights_path is None else str(weights_path),
                                                    clip_model)
    return Classifier(trunk, feature_dim, num_classes)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise ModelLoadError(f'backbone weights file {path} not found (--backbone-weights)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f'could not read {path} as a PyTorch state dict ({_one_line(exc)}); '
                             f'check --backbone-weights') from exc
    for key in ('state_dict', 'model'):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f'{path} holds a {type(state).__name__}, not a state dict (--backbone-weights)')
    return state


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
        raise ModelLoadError(f'cannot read CLIP model config {config_path} ({_one_line(exc)})') from exc
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
            raise ModelLoadError(f'could not load CLIP checkpoint {path} into {name!r} ({_one_line(exc)}); '
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
            raise ModelLoadError(f'downloading the CLIP weights {name!r}/{pretrained!r} failed ({_one_line(exc)}); '
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


def _clip_embed_dim(clip_model: nn.Module) -> int:
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

    The input is the ImageNet-normalised pipeline tensor (REFERENCE section 5: CLIP gets no
    normalisation of its own). Batched resizing equals the original's per-image loop.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if images.dim() != 4:
        raise ValueError(f'expected images B x C x H x W, got shape {tuple(images.shape)}')
    return TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def pseudo_labels(image_embeddings: torch.Tensor, text_features: torch.Tensor, temp: float = 0.01,
                  threshold: float = 0.3, partial: float = 0.0) -> torch.Tensor:
    """CLIP pseudo-labels (REFERENCE section 7), B x K float in {-1, 0, +1}.

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
    """Frozen CLIP image tower + class text features -> pseudo-labels (REFERENCE section 7).

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
    import hashlib

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


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """Call `write(binary file)` on a temporary file beside `path`, flush it to disk, then
    os.replace it into place: readers see the old file or the whole new one, never a part.
    On any exception (Ctrl-C included) the temporary file is removed and the old file kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_text_features(path: str | os.PathLike, features: torch.Tensor | np.ndarray) -> Path:
    """Write K x D float32 features to `path` (.npy) atomically (atomic_write)."""
    array = np.ascontiguousarray(
        features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features), dtype=np.float32)
    return atomic_write(path, lambda handle: np.save(handle, array))


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
        raise ModelLoadError(f'cannot read text features {path} as a numeric .npy array ({_one_line(exc)})') from exc
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
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f'clip_{key["dataset"]}_{digest}.npy'
    key_path = path.with_suffix('.json')
    num_rows = key['num_images']
    if path.is_file() and key_path.is_file():
        try:
            stored_key = json.loads(key_path.read_text())
            array = np.load(path, allow_pickle=False)
            if stored_key == key and array.ndim == 3 and array.shape[:2] == (num_rows, 2):
                return torch.from_numpy(array)
        except (OSError, ValueError, EOFError):
            pass  # unreadable or truncated: rebuilt below
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = None
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if amp and torch.device(device).type == 'cuda'
                else contextlib.nullcontext())
    with autocast:
        for batch in tqdm(loader, desc='frozen CLIP embeddings (once, cached)', dynamic_ncols=True):
            if batch is None:
                continue
            images = batch['image'].to(device, non_blocking=True)
            plain, flipped = labeler.embed(images), labeler.embed(images.flip(-1))  # B x D each
            if out is None:
                out = np.zeros((num_rows, 2, plain.shape[1]), dtype=np.float32)
            index = batch['index'].numpy()
            out[index, 0] = plain.float().cpu().numpy()
            out[index, 1] = flipped.float().cpu().numpy()
    if out is None:
        raise ValueError('the embedding cache loader yielded no image')
    key_path.unlink(missing_ok=True)
    atomic_write(path, lambda handle: np.save(handle, out))
    atomic_write(key_path, lambda handle: handle.write(json.dumps(key, sort_keys=True).encode()))
    return torch.from_numpy(out)

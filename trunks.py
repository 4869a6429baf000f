"""The trainable trunks' networks: how each backbone's module is built and its weights loaded.

Each `make_trunk(pretrained, weights_path, clip_model, image_size) -> (module, C)` of a `BACKBONES` row
(backbones.py) is here: torchvision's ResNet-50 with fc removed, any timm model (`timm_trunk`: ConvNeXt-XL,
the seed systems' ResNet-101, TResNet-M/L, Swin-L), the trainable CLIP image tower (`ClipVisionTrunk`) and
the demo's small CNN. They follow the original's networks (github.com/mvrl/VLPL, models.py: ResNet-50 with
fc removed, the trainable CLIP image tower, timm ConvNeXt-XL with head.fc replaced; see
docs/original-vlpl.md section 6) and the seed systems' (docs/backbones.md).

Loading errors that a user can fix raise `ModelLoadError` with a one-line message that names the
command-line flag to use.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from clip_loading import clip_embed_dim, clip_image_size, resize_for_clip
from config import ModelLoadError, UserError, one_line

BACKBONE_FLAGS = '--backbone-weights PATH (a local weights file) or --no-pretrained (random initialisation)'


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

    def token_shape(self) -> tuple[int, int, int]:
        """(width, gh, gw) of `token_map`: an open_clip VisionTransformer's patch-token grid."""
        visual = self.visual
        if not (hasattr(visual, 'output_tokens') and hasattr(visual, 'grid_size')
                and hasattr(visual, 'transformer')):
            raise UserError(f'-m clip_vision with a head that reads the feature map needs a ViT CLIP image tower '
                            f'(its patch-token grid); {type(visual).__name__} gives only its pooled embedding: '
                            'use --head linear or a ViT --clip-model')
        gh, gw = visual.grid_size
        return int(visual.transformer.width), int(gh), int(gw)

    def token_map(self, images: torch.Tensor) -> torch.Tensor:
        """B x width x gh x gw: the ViT's patch tokens after ln_post, before the projection
        (open_clip VisionTransformer with output_tokens=True), laid out on the patch grid."""
        width, gh, gw = self.token_shape()
        visual, before = self.visual, self.visual.output_tokens
        visual.output_tokens = True
        try:
            _, tokens = visual(resize_for_clip(images, self.image_size))
        finally:
            visual.output_tokens = before
        if tokens.shape[1] != gh * gw:  # e.g. pool_type 'none' keeps the class token
            tokens = tokens[:, -gh * gw:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], width, gh, gw)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


# The published weights that `pretrained` loads (the originals' torchvision resnet50(pretrained=True)
# is IMAGENET1K_V1; IMAGENET1K_V2 moves VOC mAP by about a point, snucml/LargeLossMatters issue 3).
RESNET50_WEIGHTS = 'IMAGENET1K_V1'


def resnet50_trunk(pretrained: bool, weights_path: str | None, clip_model, image_size=None) -> tuple[nn.Module, int]:
    import torchvision

    if weights_path is not None:
        net = torchvision.models.resnet50(weights=None)
        state = _read_state_dict(weights_path)
        # A trunk saved without its ImageNet fc is fine: fc is replaced anyway.
        state = {k: v for k, v in state.items() if not k.startswith('fc.')}
        problem = state_dict_mismatch({k: v for k, v in net.state_dict().items() if not k.startswith('fc.')}, state)
        if problem:
            raise ModelLoadError(f'--backbone-weights {weights_path} is not a torchvision ResNet-50 state dict: '
                                 f'{problem}')
        net.load_state_dict(state, strict=False)
    elif pretrained:
        try:
            net = torchvision.models.resnet50(weights=getattr(torchvision.models.ResNet50_Weights, RESNET50_WEIGHTS))
        except Exception as exc:  # no network, proxy, corrupt cache: all end the same way for the user
            raise ModelLoadError(
                f'downloading the ImageNet weights of resnet50 (torchvision {RESNET50_WEIGHTS}) failed '
                f'({one_line(exc, with_type=True)}); pass {BACKBONE_FLAGS}') from exc
    else:
        net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()  # torchvision flattens before fc, so the trunk gives B x 2048 even for B = 1
    return net, 2048


def timm_trunk(timm_name: str, pretrained: bool, weights_path: str | None, clip_model,
                image_size: int | None = None) -> tuple[nn.Module, int]:
    """The timm model itself is the trunk, so a timm (or torchvision ResNet) state dict maps onto the
    classifier's `trunk.*` keys unchanged. A model whose input size is fixed (timm's pretrained cfg
    `fixed_input_size`: ViT, Swin) is built for image_size (None: its own), as Query2Label builds Swin
    with img_size (lib/models/swin_transformer.py build_swin_transformer)."""
    import timm

    # num_classes=0 drops the classifier (head.fc = Identity) and keeps timm's pooling and
    # head norm, so Linear(F, K) on top equals the original's replaced head.fc.
    kwargs: dict = dict(num_classes=0)
    pretrained_cfg = timm.models.get_pretrained_cfg(timm_name)
    if image_size and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs['img_size'] = image_size
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise ModelLoadError(f'backbone weights file {weights_path} not found (--backbone-weights)')
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_path)))
        try:
            with _TimmLoadReport() as report:
                net = timm.create_model(timm_name, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f'could not load {weights_path} into timm {timm_name!r} ({one_line(exc, with_type=True)}); '
                f'check --backbone-weights') from exc
        if report.problems:  # timm loads a file non-strictly once the classifier is dropped
            raise ModelLoadError(f'{weights_path} does not fit timm {timm_name!r} ({report.problems[0]}); '
                                 'check --backbone-weights')
    elif pretrained:
        try:
            net = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f'downloading the pretrained weights of timm {timm_name!r} failed ({one_line(exc, with_type=True)}); '
                f'pass {BACKBONE_FLAGS}') from exc
    else:
        net = timm.create_model(timm_name, pretrained=False, **kwargs)
    return net, int(getattr(net, 'head_hidden_size', None) or net.num_features)


class _TimmLoadReport(logging.Handler):
    """Collects what timm's weight loader says about keys while it is open (timm.models._builder
    load_pretrained: with num_classes=0 it loads non-strictly and only logs the keys a file lacks or
    has in excess, which for a trunk means the file is for another model)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.problems: list[str] = []
        self.logger = logging.getLogger('timm.models._builder')

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(('Missing keys', 'Unexpected keys')):
            self.problems.append(message.split(')')[0][:200] + ')')

    def __enter__(self):
        self.saved = self.logger.level, self.logger.propagate
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # reported as our one-line error instead
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def clip_vision_trunk(pretrained: bool, weights_path: str | None, clip_model, image_size=None) -> tuple[nn.Module, int]:
    # `pretrained` has no say here: the weights are those of clip_model (random if it was loaded
    # with pretrained=None), e.g. before a checkpoint of a trained classifier is loaded.
    if weights_path is not None:
        raise ModelLoadError('clip_vision takes its weights from the CLIP model: use --clip-pretrained, '
                             'not --backbone-weights')
    if clip_model is None:
        raise ValueError('clip_vision needs clip_model (the CLIP model from load_clip)')
    visual = copy.deepcopy(clip_model.visual)
    visual.requires_grad_(True)
    return ClipVisionTrunk(visual, clip_image_size(clip_model)), clip_embed_dim(clip_model)


def small_cnn_trunk(pretrained: bool, weights_path: str | None, clip_model, image_size=None) -> tuple[nn.Module, int]:
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


def state_dict_mismatch(expected: dict, given: dict) -> str | None:
    """Why `given` does not load into a model whose state_dict() is `expected` (strictly), naming the first
    key that differs and the shapes; None when it loads."""
    for key, value in expected.items():
        if key not in given:
            return f'{key} is missing from the file ({len(given)} entries, {len(expected)} expected)'
        theirs = given[key]
        if not isinstance(theirs, torch.Tensor):
            return f'{key} is a {type(theirs).__name__}, not a tensor'
        if tuple(theirs.shape) != tuple(value.shape):
            return (f'{key} is {" x ".join(map(str, theirs.shape)) or "a scalar"} in the file, '
                    f'{" x ".join(map(str, value.shape)) or "a scalar"} in the model')
    extra = [key for key in given if key not in expected]
    if extra:
        return f'{extra[0]} is in the file but not in the model ({len(extra)} such entries)'
    return None


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise ModelLoadError(f'backbone weights file {path} not found (--backbone-weights)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f'could not read {path} as a PyTorch state dict ({one_line(exc, with_type=True)}); '
                             f'check --backbone-weights') from exc
    if isinstance(state, dict) and {'model', 'config', 'epoch'} <= set(state):
        raise ModelLoadError(f'--backbone-weights {path} is a checkpoint of this project (a whole classifier), '
                             f'not backbone weights: start from it with --init-from {path}')
    for key in ('state_dict', 'model'):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f'{path} holds a {type(state).__name__}, not a state dict (--backbone-weights)')
    return state

"""The trainable networks: trunks (backbones) and heads, built by one factory.

A classifier is trunk + head, as timm splits forward_features / forward_head:
- a trunk maps images (B x 3 x S x S) to a feature map (B x C x h x w; `feature_shape` says
  which) and knows how it pools that map to one vector per image (B x C);
- a head comes from the `HEADS` table: 'linear' (Linear(C, K) on the pooled vector, the default),
  'q2l' and 'sgre' (transformer heads reading the whole map; heads.py, docs/heads.md).
Backbones are rows of `BACKBONES`, and `timm:NAME` is a row made for any timm model (`backbone`);
`build_classifier` builds any pair. The trunks follow the original's networks (github.com/mvrl/VLPL,
models.py: ResNet-50 with fc removed, the trainable CLIP image tower, timm ConvNeXt-XL with head.fc
replaced; see docs/original-vlpl.md section 6) and the seed systems' (ResNet-101, TResNet-M/L, Swin-L
through timm; docs/backbones.md).

The frozen CLIP pseudo-labeller is not here: see pseudo_labeler.py.
Loading errors that a user can fix raise `ModelLoadError` with a one-line message that names the
command-line flag to use.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clip_loading import clip_embed_dim, clip_image_size, resize_for_clip
from config import ModelLoadError, UserError, one_line
from datasets import IMAGENET_MEAN, IMAGENET_STD
from heads import BottleneckHead, Query2LabelHead, SGREHead
from losses_peers import boostlu_logits

BACKBONE_FLAGS = '--backbone-weights PATH (a local weights file) or --no-pretrained (random initialisation)'


# --------------------------------------------------------------------------- trunks

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


def _resnet50_trunk(pretrained: bool, weights_path: str | None, clip_model, image_size=None) -> tuple[nn.Module, int]:
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


def _timm_trunk(timm_name: str, pretrained: bool, weights_path: str | None, clip_model,
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


def _clip_vision_trunk(pretrained: bool, weights_path: str | None, clip_model, image_size=None) -> tuple[nn.Module, int]:
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


def _small_cnn_trunk(pretrained: bool, weights_path: str | None, clip_model, image_size=None) -> tuple[nn.Module, int]:
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


# Feature map and pooling of each trunk, as functions of the trunk module (so the trunk keeps the
# parameter names of its library: a torchvision or timm state dict loads into it unchanged).

def _resnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet._forward_impl up to layer4: B x 2048 x S/32 x S/32."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _avgpool_flatten(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return torch.flatten(net.avgpool(features), 1)


def _timm_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_features(x)


def _timm_pool(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """timm's forward_head with num_classes=0: global pool, head norm, flatten (fc is Identity)."""
    return net.forward_head(features)


def _timm_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's forward_features as a B x C x h x w map: channels-last outputs (Swin: B x h x w x C) are
    permuted; token outputs (ViT: B x (P + h w) x C) lose their P prefix tokens (class, registers)
    and are laid out on the patch grid."""
    out = net.forward_features(x)
    if out.ndim == 4:
        return out.permute(0, 3, 1, 2) if getattr(net, 'output_fmt', 'NCHW') == 'NHWC' else out
    if out.ndim != 3:
        raise ModelLoadError(f'timm {type(net).__name__}: forward_features gives a {out.ndim}-D tensor, neither a '
                             'feature map nor tokens; choose another -m')
    tokens = out[:, getattr(net, 'num_prefix_tokens', 0):]
    h, w = _token_grid(net, x.shape[-2:])
    if h * w != tokens.shape[1]:
        raise ModelLoadError(f'timm {type(net).__name__}: {tokens.shape[1]} patch tokens do not fill its {h} x {w} '
                             'grid; choose another -m or --image-size')
    return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)


def _token_grid(net: nn.Module, size) -> tuple[int, int]:
    """(h, w) of the patch grid of an input of `size` (H, W): timm's PatchEmbed's, else the last
    stage's reduction."""
    patch_embed = getattr(net, 'patch_embed', None)
    if hasattr(patch_embed, 'dynamic_feat_size'):
        return tuple(int(v) for v in patch_embed.dynamic_feat_size(tuple(size)))
    reduction = net.feature_info[-1]['reduction']
    return int(size[0]) // reduction, int(size[1]) // reduction


def _timm_pooled(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's own pooling (forward_head: average, class token, attention pool, head norm, ...) as a
    B x C x 1 x 1 map, so that the linear head gets exactly what timm's classifier would."""
    return net.forward_head(net.forward_features(x))[:, :, None, None]


def _timm_map_shape(net: nn.Module, image_size: int) -> tuple[int, int, int]:
    side = -(-image_size // net.feature_info[-1]['reduction'])  # stride-r stages round up
    return int(net.num_features), side, side


def _nhwc_pool(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """forward_head of a channels-last timm model (Swin) applied to the B x C x h x w map."""
    return net.forward_head(features.permute(0, 2, 3, 1))


def _embedding_as_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CLIP tower gives one embedding per image: a 1 x 1 map."""
    return net(x)[:, :, None, None]


def _clip_token_map(net: ClipVisionTrunk, x: torch.Tensor) -> torch.Tensor:
    return net.token_map(x)


def _clip_token_shape(net: ClipVisionTrunk, image_size: int) -> tuple[int, int, int]:
    return net.token_shape()  # the input is resized to the CLIP size: the grid is fixed


def _flatten(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return features.flatten(1)


def _sequential_features(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Every layer of the small CNN but its final pooling and flattening."""
    for layer in list(net)[:-2]:
        x = layer(x)
    return x


def _sequential_pool(net: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
    return net[-1](net[-2](features))


def _halvings(times: int, *, ceil: bool, first: int = 1) -> Callable[[int], int]:
    """Side of the map after a stride-`first` stem (floor) and `times` stride-2 stages."""
    def side(size: int) -> int:
        size //= first
        for _ in range(times):
            size = -(-size // 2) if ceil else size // 2
        return size
    return side


@dataclass(frozen=True)
class Trunk:
    """A trunk built ahead of its classifier (`build_trunk`): the module, its feature width, and the
    state of torch's generator right after it was built, from which `build_classifier` draws the head."""
    module: nn.Module
    dim: int
    rng_after: torch.Tensor


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone.

    make_trunk(pretrained, weights_path, clip_model, image_size) -> (trunk, C); features(trunk, images) ->
    B x C x h x w with h = w = grid(S); pool(trunk, features) -> B x C; cam: whether a linear head
    applied at every position of the map gives the class activation map of the pooled logits
    (true where pool is a plain average). map_features / map_shape(trunk, S) -> (C, h, w): the
    map given to heads that read the map, where `features` is no real grid (clip_vision: the
    ViT's patch tokens instead of the 1 x 1 embedding); None = `features`. image_size: the input
    side its published weights are made for, the run's default when --image-size is not given
    (None: the dataset's). input_norm: the input normalisation its published weights were trained with
    (INPUT_NORMS), the run's default when --input-norm is not given.
    """
    make_trunk: Callable[..., tuple[nn.Module, int]]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    pool: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    grid: Callable[[int], int]
    cam: bool
    description: str
    map_features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    map_shape: Callable[[nn.Module, int], tuple[int, int, int]] | None = None
    image_size: int | None = None
    input_norm: str = 'imagenet'


BACKBONES: dict[str, BackboneSpec] = {
    'resnet50': BackboneSpec(
        _resnet50_trunk, _resnet_features, _avgpool_flatten, _halvings(5, ceil=True), True,
        'torchvision ResNet-50, IMAGENET1K_V1 weights, fc removed; map 2048 x S/32 x S/32'),
    'clip_vision': BackboneSpec(
        _clip_vision_trunk, _embedding_as_map, _flatten, lambda size: 1, False,
        'trainable copy of the CLIP image tower (input resized to the CLIP size); the unnormalised projected '
        'embedding, a 1 x 1 map; heads that read the map get the ViT patch-token grid (width x g x g)',
        map_features=_clip_token_map, map_shape=_clip_token_shape),
    'convnext_xlarge_22k': BackboneSpec(
        partial(_timm_trunk, 'convnext_xlarge.fb_in22k'), _timm_features, _timm_pool, _halvings(5, ceil=False),
        False, "timm 'convnext_xlarge.fb_in22k'; map 2048 x S/32 x S/32, pooled with timm's head norm"),
    'convnext_xlarge_1k': BackboneSpec(
        partial(_timm_trunk, 'convnext_xlarge.fb_in22k_ft_in1k'), _timm_features, _timm_pool,
        _halvings(5, ceil=False), False,
        "timm 'convnext_xlarge.fb_in22k_ft_in1k'; map 2048 x S/32 x S/32, pooled with timm's head norm"),
    'small_cnn': BackboneSpec(
        _small_cnn_trunk, _sequential_features, _sequential_pool, _halvings(4, ceil=True), True,
        'random-init CNN, 4 stride-2 conv-BN-ReLU blocks (32-64-128-256), for the offline demo; map 256 x S/16 x S/16'),
    # The seed systems' backbones (docs/backbones.md): Query2Label's and SGRE's ResNet-101 (torchvision's
    # ImageNet weights), CSL's TResNet-M (ImageNet-21K), Query2Label's TResNet-L (448 px) and Swin-L (384 px,
    # ImageNet-22K). Their maps are what those originals give their heads; pooled by timm's average.
    'resnet101': BackboneSpec(
        partial(_timm_trunk, 'resnet101.tv_in1k'), _timm_features, _timm_pool, _halvings(5, ceil=True), True,
        "timm 'resnet101.tv_in1k' (torchvision's IMAGENET1K_V1 weights, torchvision's keys); map 2048 x S/32 x S/32"),
    'tresnet_m': BackboneSpec(
        partial(_timm_trunk, 'tresnet_m.miil_in21k'), _timm_features, _timm_pool, _halvings(3, ceil=True, first=4),
        True, "timm 'tresnet_m.miil_in21k' (ImageNet-21K, CSL's pretraining; [0, 1] pixels); map 2048 x S/32 x S/32",
        input_norm='none'),
    'tresnet_l': BackboneSpec(
        partial(_timm_trunk, 'tresnet_l.miil_in1k_448'), _timm_features, _timm_pool, _halvings(3, ceil=True, first=4),
        True, "timm 'tresnet_l.miil_in1k_448' (Query2Label's tresnet_l_448; [0, 1] pixels); map 2432 x S/32 x S/32",
        input_norm='none'),
    'swin_large': BackboneSpec(
        partial(_timm_trunk, 'swin_large_patch4_window12_384.ms_in22k'), _timm_map, _nhwc_pool,
        _halvings(3, ceil=True, first=4), True,
        "timm 'swin_large_patch4_window12_384.ms_in22k' (Query2Label's swin_L_384_22k), built for the input size "
        "(default 384); map 1536 x S/32 x S/32 after the final norm", image_size=384),
}

TIMM_PREFIX = 'timm:'

# The input normalisation a backbone's weights were trained with (--input-norm): 'imagenet', the
# pipeline's ImageNet mean and std (torchvision's and VLPL's models); 'none', ToTensor's [0, 1] pixels
# without normalisation (MIIL's TResNets: CSL's src/helper_functions/get_data.py has no Normalize;
# Query2Label's and SGRE's --orid_norm).
INPUT_NORMS = ('imagenet', 'none')


def _timm_input_norm(timm_name: str) -> str:
    """'none' for a timm model whose pretrained config normalises with mean 0 and std 1 (MIIL's TResNets),
    else 'imagenet'."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    plain = cfg is not None and tuple(cfg.mean) == (0.0, 0.0, 0.0) and tuple(cfg.std) == (1.0, 1.0, 1.0)
    return 'none' if plain else 'imagenet'


@functools.lru_cache(maxsize=None)
def _timm_row(timm_name: str) -> BackboneSpec:
    return BackboneSpec(
        partial(_timm_trunk, timm_name), _timm_pooled, _flatten, lambda size: 1, False,
        f"timm {timm_name!r}: pooled by timm's own head (a 1 x 1 map); heads that read the map get its "
        "forward_features as C x h x w", map_features=_timm_map, map_shape=_timm_map_shape,
        input_norm=_timm_input_norm(timm_name))


def backbone(name: str) -> BackboneSpec:
    """The BACKBONES row of `name`, or for 'timm:NAME' (NAME a timm model, optionally with its
    pretrained tag, e.g. 'timm:resnet18.a1_in1k') a row built for that model. ValueError otherwise."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith(TIMM_PREFIX):
        import timm

        timm_name = name[len(TIMM_PREFIX):]
        if timm.is_model(timm_name):
            return _timm_row(timm_name)
        raise ValueError(f'unknown backbone {name!r}: {timm_name!r} is not a timm model name '
                         '(timm.list_models() lists them)')
    raise ValueError(f'unknown backbone {name!r}; choose one of {", ".join(sorted(BACKBONES))} or timm:NAME '
                     '(any timm model, e.g. timm:resnet18)')


def timm_name(name: str) -> str | None:
    """The timm model (with its pretrained tag) behind backbone `name`, None for the others."""
    trunk = backbone(name).make_trunk
    return trunk.args[0] if isinstance(trunk, partial) and trunk.func is _timm_trunk else None


def pretrained_weights(name: str) -> str | None:
    """The published weights `pretrained` loads for backbone `name` ('torchvision
    ResNet50_Weights.IMAGENET1K_V1', 'timm <model.tag>'), None where there are none (small_cnn;
    clip_vision takes the CLIP's). Recorded in every run's provenance; recipes' facts check it."""
    if name == 'resnet50':
        return f'torchvision ResNet50_Weights.{RESNET50_WEIGHTS}'
    timm_model = timm_name(name)
    return f'timm {timm_model}' if timm_model else None


# --------------------------------------------------------------------------- heads

@dataclass(frozen=True)
class HeadSpec:
    """One head: make(C, K, **options) -> module; reads 'pooled' (B x C) or the whole 'map'
    (B x C x h x w); returns logits B x K. aux: the module also takes return_aux=True and then
    returns an object with .logits and .aux_logits (B x K each), the latter trained with weight
    --lamda (Classifier.forward_with_aux, engine.train_one_epoch). cam: the head is one Linear(C, K),
    so applied at every position of the map it gives the class activation map
    (Classifier.class_activation_maps: --boostlu, --pl-views cam)."""
    make: Callable[..., nn.Module]
    reads: str
    description: str
    aux: bool = False
    cam: bool = False


HEADS: dict[str, HeadSpec] = {
    'linear': HeadSpec(nn.Linear, 'pooled', 'Linear(C, K) on the pooled features (the original head)', cam=True),
    'bottleneck': HeadSpec(BottleneckHead, 'pooled', "CSL's OpenImages head: Linear(C, 512) then Linear(512, K) "
                           'on the pooled features (github.com/Alibaba-MIIL/PartialLabelingCSL)'),
    'q2l': HeadSpec(Query2LabelHead, 'map', 'Query2Label: transformer encoder + class-query decoder '
                    '(github.com/SlongLiu/query2labels)'),
    'sgre': HeadSpec(SGREHead, 'map', 'SGRE: label-to-pixel attention and semantic-guided enhancement '
                     '(github.com/jasonseu/SGRE)', aux=True),
}


# --------------------------------------------------------------------------- classifier

class Classifier(nn.Module):
    """logits (B x K) = forward_head(forward_features(images)).

    The trunk and head are submodules `trunk` and `head`, so state dicts keep the keys of the
    original layout (trunk.*, head.weight, head.bias for the linear head).

    input_norm: the normalisation the weights expect (INPUT_NORMS). The pipeline always gives
    ImageNet-normalised tensors (datasets.image_tensor); 'none' turns them back into ToTensor's
    [0, 1] pixels, x * std + mean per channel, before the trunk (not saved in the state dict).
    """

    def __init__(self, trunk: nn.Module, spec: BackboneSpec, feature_dim: int, num_classes: int,
                 head: str = 'linear', cam_boost: float | None = None, input_norm: str = 'imagenet',
                 **head_options):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f'unknown input normalisation {input_norm!r}; choose one of {INPUT_NORMS}')
        self.input_norm = input_norm
        if input_norm == 'none':
            self.register_buffer('_pixel_scale', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
            self.register_buffer('_pixel_shift', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.trunk = trunk
        row = HEADS[head]
        self._features, self._map_shape = spec.features, None
        if row.reads == 'map' and spec.map_features is not None:
            self._features, self._map_shape = spec.map_features, spec.map_shape
            feature_dim = spec.map_shape(trunk, 0)[0]
        self.head = row.make(feature_dim, num_classes, **head_options)
        self.spec = spec
        self.head_reads = row.reads
        self.head_aux = row.aux
        self.feature_dim = feature_dim
        # BoostLU (--boostlu): logits = mean over positions of the CAM with its positive values times
        # cam_boost, in training and inference (youngwk/BridgeGapExplanationPAMC, models.py
        # ImageClassifier.forward). None: the plain head.
        if cam_boost is not None and (not spec.cam or not row.cam):
            raise ValueError('BoostLU needs an average-pooled trunk (BackboneSpec.cam) and the linear head')
        self.cam_boost = cam_boost
        self.trunk_frozen = False

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S -> B x C x h x w."""
        if self.input_norm == 'none':
            images = images * self._pixel_scale.to(images.dtype) + self._pixel_shift.to(images.dtype)
        return self._features(self.trunk, images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> logits B x K."""
        if self.cam_boost is not None:
            return boostlu_logits(cam=self.class_activation_maps(features), alpha=self.cam_boost)
        if self.head_reads == 'map':
            return self.head(features)
        return self.head(self.spec.pool(self.trunk, features))

    def forward(self, images: torch.Tensor, with_aux: bool = False):
        """Logits B x K; with_aux: (logits, auxiliary logits or None), see forward_with_aux."""
        if with_aux:
            return self.forward_with_aux(images)
        return self.forward_head(self.forward_features(images))

    def forward_with_aux(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, auxiliary logits or None), both B x K: the training forward. The auxiliary
        logits are those of a head with an auxiliary loss (SGRE's label-attention branch);
        None for every other head, whose logits are then exactly forward(images)."""
        if not self.head_aux:
            return self(images), None
        out = self.head(self.forward_features(images), return_aux=True)
        return out.logits, out.aux_logits

    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of forward_features for S x S inputs."""
        if self._map_shape is not None:
            return self._map_shape(self.trunk, image_size)
        side = self.spec.grid(image_size)
        return self.feature_dim, side, side

    def class_activation_maps(self, features: torch.Tensor) -> torch.Tensor:
        """B x K x h x w: the linear head applied at every position of the map (Zhou et al., CAM).
        Averaging it over positions gives the logits, for trunks whose pooling is an average."""
        if not self.spec.cam or not isinstance(self.head, nn.Linear):
            raise ValueError('class activation maps need an average-pooled trunk and the linear head')
        # a 1x1 convolution, as CCD's and BoostLU's `onebyone_conv` (a channel sum in another order than
        # an einsum's: other float rounding)
        weight = self.head.weight
        return F.conv2d(features, weight.view(weight.shape[0], weight.shape[1], 1, 1), self.head.bias)

    def param_groups(self, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
        """The optimiser's parameter groups of the network: every trainable parameter at lr; with
        head_lr_mult != 1, two groups: the trunk at lr and the head at head_lr_mult * lr (the
        `lr_mult` of LargeLossMatters, BridgeGapExplanationPAMC and GRLoss, train.py)."""
        if head_lr_mult == 1.0:
            return [{'params': [p for p in self.parameters() if p.requires_grad], 'lr': lr}]
        return [{'params': [p for p in self.trunk.parameters() if p.requires_grad], 'lr': lr},
                {'params': [p for p in self.head.parameters() if p.requires_grad], 'lr': head_lr_mult * lr}]

    def set_trunk_frozen(self, frozen: bool) -> None:
        """--linear-init: a frozen trunk gets no gradient and stays in eval mode (its batch-norm
        statistics do not move), so only the head (and a method's own parameters) train."""
        self.trunk_frozen = frozen
        self.trunk.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.trunk_frozen:
            self.trunk.eval()
        return self


def build_trunk(name: str, *, seed: int, pretrained: bool = True,
                weights_path: str | os.PathLike | None = None, image_size: int | None = None) -> Trunk:
    """The trunk of backbone `name` alone, built (weights downloaded or read from `weights_path`, and
    checked) as build_classifier would build it right after torch.manual_seed(seed), without touching
    the global generator. A run builds it before the expensive CLIP work, so that a wrong weights file
    or a failed download stops the run at once; build_classifier(trunk=...) then gives the same model
    as building both in one go. Not for clip_vision, whose trunk is the CLIP model's tower."""
    if weights_path is not None and not pretrained:
        raise ModelLoadError('--backbone-weights and --no-pretrained contradict each other: give one')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, dim = backbone(name).make_trunk(pretrained, None if weights_path is None else str(weights_path),
                                                None, image_size)
        return Trunk(module, dim, torch.get_rng_state())


def build_classifier(name: str, num_classes: int, *, pretrained: bool = True,
                     weights_path: str | os.PathLike | None = None, clip_model: nn.Module | None = None,
                     head: str = 'linear', cam_boost: float | None = None, image_size: int | None = None,
                     input_norm: str = 'imagenet', trunk: Trunk | None = None, **head_options) -> Classifier:
    """Classifier for backbone `name` (a key of BACKBONES or timm:NAME, see `backbone`) and head
    `head` (a key of HEADS): forward(images B x 3 x S x S) -> logits B x K.

    pretrained: download the backbone's published weights (ignored by small_cnn, which is always
    random, and by clip_vision, whose weights are clip_model's). weights_path: a local weights file
    instead of the download (torchvision state dict for resnet50, any file timm reads for the timm
    backbones). clip_model: the model from clip_loading.load_clip, required by clip_vision (its image
    tower is deep-copied and trained; the copy does not share parameters with clip_model).
    image_size: the input side S, for backbones built for one input size (Swin, ViT; None: theirs).
    input_norm: the input normalisation the weights expect (Classifier; INPUT_NORMS).
    trunk: a trunk of this backbone from build_trunk (pretrained, weights_path and image_size are then its
    own); the head is drawn from the generator state that followed it.
    """
    spec = backbone(name)
    if head not in HEADS:
        raise ValueError(f'unknown head {head!r}; choose one of {sorted(HEADS)}')
    if num_classes < 1:
        raise ValueError(f'num_classes must be positive, got {num_classes}')
    if weights_path is not None and not pretrained:
        raise ModelLoadError('--backbone-weights and --no-pretrained contradict each other: give one')
    if trunk is not None:
        torch.set_rng_state(trunk.rng_after)
        module, feature_dim = trunk.module, trunk.dim
    else:
        module, feature_dim = spec.make_trunk(pretrained, None if weights_path is None else str(weights_path),
                                              clip_model, image_size)
    return Classifier(module, spec, feature_dim, num_classes, head, cam_boost=cam_boost, input_norm=input_norm,
                      **head_options)


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

"""The backbones: the table of trunks (`BACKBONES`), each trunk's feature map and pooling, `backbone(name)`.

A trunk maps images (B x 3 x S x S) to a feature map (B x C x h x w) and knows how it pools that map to
one vector per image (B x C), as timm splits forward_features / forward_head. Each row of `BACKBONES`
names how its module is built (`make_trunk`, trunks.py) and the functions of that module that give its
map and its pooled vector; `timm:NAME` is a row made for any timm model (`backbone`). `build_trunk`
builds a trunk ahead of its classifier (models.build_classifier).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from config import ModelLoadError
from trunks import (RESNET50_WEIGHTS, ClipVisionTrunk, clip_vision_trunk, resnet50_trunk, small_cnn_trunk,
                    timm_trunk)


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
        resnet50_trunk, _resnet_features, _avgpool_flatten, _halvings(5, ceil=True), True,
        'torchvision ResNet-50, IMAGENET1K_V1 weights, fc removed; map 2048 x S/32 x S/32'),
    'clip_vision': BackboneSpec(
        clip_vision_trunk, _embedding_as_map, _flatten, lambda size: 1, False,
        'trainable copy of the CLIP image tower (input resized to the CLIP size); the unnormalised projected '
        'embedding, a 1 x 1 map; heads that read the map get the ViT patch-token grid (width x g x g)',
        map_features=_clip_token_map, map_shape=_clip_token_shape),
    'convnext_xlarge_22k': BackboneSpec(
        partial(timm_trunk, 'convnext_xlarge.fb_in22k'), _timm_features, _timm_pool, _halvings(5, ceil=False),
        False, "timm 'convnext_xlarge.fb_in22k'; map 2048 x S/32 x S/32, pooled with timm's head norm"),
    'convnext_xlarge_1k': BackboneSpec(
        partial(timm_trunk, 'convnext_xlarge.fb_in22k_ft_in1k'), _timm_features, _timm_pool,
        _halvings(5, ceil=False), False,
        "timm 'convnext_xlarge.fb_in22k_ft_in1k'; map 2048 x S/32 x S/32, pooled with timm's head norm"),
    'small_cnn': BackboneSpec(
        small_cnn_trunk, _sequential_features, _sequential_pool, _halvings(4, ceil=True), True,
        'random-init CNN, 4 stride-2 conv-BN-ReLU blocks (32-64-128-256), for the offline demo; map 256 x S/16 x S/16'),
    # The seed systems' backbones (docs/backbones.md): Query2Label's and SGRE's ResNet-101 (torchvision's
    # ImageNet weights), CSL's TResNet-M (ImageNet-21K), Query2Label's TResNet-L (448 px) and Swin-L (384 px,
    # ImageNet-22K). Their maps are what those originals give their heads; pooled by timm's average.
    'resnet101': BackboneSpec(
        partial(timm_trunk, 'resnet101.tv_in1k'), _timm_features, _timm_pool, _halvings(5, ceil=True), True,
        "timm 'resnet101.tv_in1k' (torchvision's IMAGENET1K_V1 weights, torchvision's keys); map 2048 x S/32 x S/32"),
    'tresnet_m': BackboneSpec(
        partial(timm_trunk, 'tresnet_m.miil_in21k'), _timm_features, _timm_pool, _halvings(3, ceil=True, first=4),
        True, "timm 'tresnet_m.miil_in21k' (ImageNet-21K, CSL's pretraining; [0, 1] pixels); map 2048 x S/32 x S/32",
        input_norm='none'),
    'tresnet_l': BackboneSpec(
        partial(timm_trunk, 'tresnet_l.miil_in1k_448'), _timm_features, _timm_pool, _halvings(3, ceil=True, first=4),
        True, "timm 'tresnet_l.miil_in1k_448' (Query2Label's tresnet_l_448; [0, 1] pixels); map 2432 x S/32 x S/32",
        input_norm='none'),
    'swin_large': BackboneSpec(
        partial(timm_trunk, 'swin_large_patch4_window12_384.ms_in22k'), _timm_map, _nhwc_pool,
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
        partial(timm_trunk, timm_name), _timm_pooled, _flatten, lambda size: 1, False,
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
    return trunk.args[0] if isinstance(trunk, partial) and trunk.func is timm_trunk else None


def pretrained_weights(name: str) -> str | None:
    """The published weights `pretrained` loads for backbone `name` ('torchvision
    ResNet50_Weights.IMAGENET1K_V1', 'timm <model.tag>'), None where there are none (small_cnn;
    clip_vision takes the CLIP's). Recorded in every run's provenance; recipes' facts check it."""
    if name == 'resnet50':
        return f'torchvision ResNet50_Weights.{RESNET50_WEIGHTS}'
    timm_model = timm_name(name)
    return f'timm {timm_model}' if timm_model else None


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

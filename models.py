"""The trainable networks: a trunk (backbones.py) and a head, built by one factory.

A classifier is trunk + head, as timm splits forward_features / forward_head:
- a trunk maps images (B x 3 x S x S) to a feature map (B x C x h x w; `feature_shape` says
  which) and knows how it pools that map to one vector per image (B x C): a row of
  backbones.BACKBONES, or `timm:NAME` for any timm model (backbones.backbone);
- a head comes from the `HEADS` table: 'linear' (Linear(C, K) on the pooled vector, the default),
  'q2l' and 'sgre' (transformer heads reading the whole map; heads.py, docs/heads.md).
`build_classifier` builds any pair.

The frozen CLIP pseudo-labeller is not here: see pseudo_labeler.py.
Loading errors that a user can fix raise `ModelLoadError` with a one-line message that names the
command-line flag to use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from backbones import INPUT_NORMS, BackboneSpec, Trunk, backbone
from config import ModelLoadError
from image_io import IMAGENET_MEAN, IMAGENET_STD
from heads import BottleneckHead, Query2LabelHead, SGREHead
from losses_peers import boostlu_logits


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
    ImageNet-normalised tensors (image_io.image_tensor); 'none' turns them back into ToTensor's
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

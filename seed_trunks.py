"""The backbones in the seed systems' checkpoints: their layouts (`TRUNKS`) and their tensors under the keys
of a models.Classifier's `trunk`.

`convert_trunk` recognises a layout by a key only it has, names the backbone (-m: a BACKBONES row or
timm:NAME) from its sizes, and renames its tensors.

A torchvision ResNet's names are timm's (resnet101, timm:resnet18, ...; batch-norm layers without
`num_batches_tracked`, as Query2Label's FrozenBatchNorm2d, get 0, the count of training steps, which
evaluation never reads: `with_step_counts`); a MIIL TResNet becomes timm's TResNet as timm converts it
(timm.models.tresnet.checkpoint_filter_fn): Sequential indices to conv/bn names, and an InplaceABN scale w
to a BatchNorm scale |w| + eps (inplace_abn's forward, src/inplace_abn_cpu.cpp forward_cpu, scales by
|w| + eps); Microsoft's Swin becomes timm's (timm.models.swin_transformer.checkpoint_filter_fn): the
patch merging of stage i moves to the start of stage i + 1.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from seed_files import CheckpointImportError, blocks_per_stage, size_of


# ----------------------------------------------------------------------------------------------
# Trunks: layouts of the originals' backbones -> the keys of a models.Classifier's `trunk`


def _resnet_name(state: dict) -> str | None:
    bottleneck = 'layer1.0.conv3.weight' in state
    return RESNETS.get((bottleneck, blocks_per_stage(state, 'layer{}.', range(1, 5))))


def _resnet_keys(state: dict) -> dict:
    return dict(state)  # torchvision's names are timm's


# (Bottleneck blocks?, blocks per stage) -> -m
RESNETS = {(False, (2, 2, 2, 2)): 'timm:resnet18', (False, (3, 4, 6, 3)): 'timm:resnet34',
           (True, (3, 4, 6, 3)): 'resnet50', (True, (3, 4, 23, 3)): 'resnet101',
           (True, (3, 8, 36, 3)): 'timm:resnet152'}


def _tresnet_name(state: dict) -> str | None:
    planes = size_of(state['body.conv1.0.weight'], 0)
    v2 = 'body.layer1.0.conv3.0.weight' in state  # TResNet v2: Bottleneck blocks in every stage
    return TRESNETS.get((planes, blocks_per_stage(state, 'body.layer{}.', range(1, 5)), v2))


# (stem width, blocks per stage, v2) -> -m (timm.models.tresnet: tresnet_m/l/xl, tresnet_v2_l)
TRESNETS = {(64, (3, 4, 11, 3), False): 'tresnet_m', (76, (4, 5, 18, 3), False): 'tresnet_l',
            (83, (4, 5, 24, 3), False): 'timm:tresnet_xl', (64, (3, 4, 23, 3), True): 'timm:tresnet_v2_l'}

# MIIL's TResNet (conv2d_ABN = Sequential(Conv2d, InPlaceABN), wrapped once more where anti-aliasing
# follows; downsample = Sequential([AvgPool2d,] conv2d_ABN)) -> timm's ConvNormAct names, in this order
# (the rules of timm.models.tresnet.checkpoint_filter_fn).
TRESNET_RENAMES = ((r'conv(\d+)\.0\.0\.', r'conv\1.conv.'), (r'conv(\d+)\.0\.1\.', r'conv\1.bn.'),
                   (r'conv(\d+)\.0\.', r'conv\1.conv.'), (r'conv(\d+)\.1\.', r'conv\1.bn.'),
                   (r'downsample\.(\d+)\.0\.', r'downsample.\1.conv.'),
                   (r'downsample\.(\d+)\.1\.', r'downsample.\1.bn.'))
INPLACE_ABN_EPS = 1e-5  # conv2d_ABN builds InPlaceABN with its default eps


def _tresnet_keys(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, replacement in TRESNET_RENAMES:
            key = re.sub(pattern, replacement, key, count=1)
        if key.endswith('.bn.weight'):  # InplaceABN scales by |w| + eps, BatchNorm by w
            value = value.abs() + INPLACE_ABN_EPS
        out[key] = value
    return out


def _swin_name(state: dict) -> str | None:
    embed = size_of(state['patch_embed.proj.weight'], 0)
    rows = size_of(state['layers.0.blocks.0.attn.relative_position_bias_table'], 0)  # (2 window - 1)^2
    window = (math.isqrt(rows) + 1) // 2
    return SWINS.get((embed, blocks_per_stage(state, 'layers.{}.blocks.', range(4)), window))


# (embedding width, blocks per stage, window) -> -m
SWINS = {(192, (2, 2, 18, 2), 12): 'swin_large', (192, (2, 2, 18, 2), 7): 'timm:swin_large_patch4_window7_224',
         (128, (2, 2, 18, 2), 12): 'timm:swin_base_patch4_window12_384',
         (128, (2, 2, 18, 2), 7): 'timm:swin_base_patch4_window7_224'}


def _swin_keys(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.rsplit('.', 1)[-1] in ('relative_position_index', 'attn_mask'):
            continue  # constants of the window geometry, recomputed by timm's Swin for the input size
        # Microsoft's Swin merges patches at the end of stage i, timm's at the start of stage i + 1
        out[re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', key)] = value
    return out


@dataclass(frozen=True)
class TrunkLayout:
    """One backbone layout of the originals: `marker`, a key only it has; `name`, the -m of its published
    sizes (None: a size no published checkpoint has); `keys`, its tensors under the trunk's names."""
    description: str
    marker: str
    name: Callable[[dict], str | None]
    keys: Callable[[dict], dict]
    stride: int = 32  # input side / map side (the position encodings' grid)


TRUNKS = (
    TrunkLayout('torchvision ResNet', 'layer1.0.conv1.weight', _resnet_name, _resnet_keys),
    TrunkLayout("MIIL's TResNet (InplaceABN)", 'body.conv1.0.weight', _tresnet_name, _tresnet_keys),
    TrunkLayout("Microsoft's Swin Transformer", 'patch_embed.proj.weight', _swin_name, _swin_keys),
)


def convert_trunk(state: dict, where: str, model: str | None) -> tuple[str, dict, TrunkLayout]:
    """(backbone -m, {'trunk.' + key: tensor}, its layout) of an original's backbone tensors; `model`
    overrides the backbone the layout names (its tensors must then fit it)."""
    if any(k.startswith('stage0.') for k in state):
        raise CheckpointImportError(f'{where}: its backbone is a CvT, which timm does not have, so no backbone of this '
                                    'project can hold it (docs/seed-checkpoints.md)')
    for layout in TRUNKS:
        if layout.marker in state:
            name = model or layout.name(state)
            if name is None:
                raise CheckpointImportError(
                    f'{where}: its {layout.description} is of a size no published checkpoint has; name the backbone '
                    'that holds it with --model (a BACKBONES row or timm:NAME)')
            return name, {'trunk.' + k: v for k, v in layout.keys(state).items()}, layout
    raise CheckpointImportError(f'{where}: its backbone is none of {", ".join(t.description for t in TRUNKS)} '
                                f'(first key {next(iter(state), None)!r})')


def with_step_counts(state: dict) -> dict:
    """Every batch-norm layer (a `.running_mean`) given the `num_batches_tracked` it lacks (InplaceABN and
    FrozenBatchNorm2d keep none): 0, the count of training steps, which evaluation never reads."""
    out = dict(state)
    for key in state:
        if key.endswith('.running_mean'):
            out.setdefault(key[:-len('running_mean')] + 'num_batches_tracked', torch.tensor(0, dtype=torch.long))
    return out

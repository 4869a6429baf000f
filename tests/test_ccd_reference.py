"""Golden test of -l CCD against the original's own code (github.com/k0u-id/CCD 0b57641).

tests/fixtures/ccd_reference.npz holds what the original computed when its own `train.run_train` ran,
unchanged, on CPU, on the recipe below: a tiny random OpenAI-format ModifiedResNet CLIP (its clip package's
`build_model`, float32 as `clip.load` makes it on the CPU), a ResNet-50 `models.ImageClassifier` with the
recipe's weights, and RECIPE_P (its train_gpu#0.sh settings, but smaller images, three epochs, lr 0 so that
the weights the gradient step sees are the recipe's, and loss_coeff 0.1 so that the entropy flags weigh the
loss). A line tracer read run_train's locals where its comments say: the text features, the global table
(softmax scores, entropy flags, class bias, debiased labels), the classifier's batch-norm statistics and the
calibrated threshold before the epoch-2 refresh, the table after it, the first training step of epoch 0 and
of epoch 2 (inputs, soft labels, flags, logits, losses, every parameter's gradient) and the train mAP of each
epoch against the pseudo-labels; and `cropping_box` on random boxes with tensor corners, as run_train passes
them. Only numbers are stored (see the file's 'meta'); the script that ran the original is not part of this
repository (it imports the original's code).

Here the same inputs go through this repository's real path: main_clip.parse_args -> the CCD method's CLIP
side (open_clip at fp32, CCD's any-size ModifiedResNet forward) -> its table, refresh and loss.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).parent / 'fixtures' / 'ccd_reference.npz'

# --------------------------------------------------------------------------- the recipe (shared with the
# script that ran the original; changing any of it invalidates the fixture)

CLIP_SEED = 3100        # key i (sorted) of the CLIP state dict: np.random.RandomState(CLIP_SEED + i)
CLASSIFIER_SEED = 4100  # key i (sorted) of the classifier state dict: np.random.RandomState(CLASSIFIER_SEED + i)
PICTURE_SEED = 21       # np.random.RandomState(PICTURE_SEED + b): picture b
BOX_SEED = 9            # np.random.RandomState: the random boxes given to cropping_box
TRAIN_SIZES = [(100, 80), (61, 97), (130, 70), (90, 90)]  # (width, height) of the train pictures
VAL_SIZES = [(80, 60), (64, 64)]
NUM_CLASSES = 20
# Classes whose classifier bias is high: the classifier selects them, so each picture gets a few views.
SELECTED_CLASSES = [2, 7, 14]
VOC_NAMES = ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'dining table',
             'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa', 'train', 'tv monitor']
# run_train's P: train_gpu#0.sh's values except those marked
RECIPE_P = dict(
    dataset='voc12', num_classes=NUM_CLASSES, arch='resnet50', feat_dim=2048, use_pretrained=False,
    freeze_feature_extractor=False, num_workers=0, lr_mult=10, colorjitter=True, train_flip=True,
    update_label=True, global_temp=True, local_temp=True, use_consist=1.0, inf_num=1,
    bsize=2,                       # script 16: four pictures
    lr=0.0,                        # script 1e-5: the weights stay the recipe's
    num_epochs=3,                  # script 10: the refresh and the consistency term start at epoch 2
    offset_size=40,                # script 80 (at 640 px): the inference images are 256 px here
    coeff=3.0, ratio=0.2, LS=True, LS_coeff=20, bound=4,
    loss_coeff=0.1,                # script 1 (flags without effect): 0.1, config.py's default
    train_resize=(64, 64),         # 448 in config.py
    resize=(256, 256),             # 640 in config.py; the views' long side stays cropping_box's 640
)
VIEW_SIDE = 640  # cropping_box's hard-wired long side

# open_clip config of the tiny CLIP: OpenAI's ModifiedResNet layout (RN50x64's 14 x 14 attention-pool grid,
# so its 448 px input, and 1024-wide embeddings), one block per stage, QuickGELU text transformer
CLIP_CONFIG = {
    'embed_dim': 1024, 'quick_gelu': True,
    'vision_cfg': {'image_size': 448, 'layers': [1, 1, 1, 1], 'width': 16, 'head_width': 64},
    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 1, 'layers': 1},
}


def _clip_std(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, std) of a CLIP key's normal draw: batch-norm and layer-norm weights near 1, running
    variances near 1; OpenAI's initial scales elsewhere (1 / sqrt(fan in) for weights)."""
    if key.endswith('running_var'):
        return 1.0, 0.1
    if key.endswith('running_mean') or key.endswith('bias'):
        return 0.0, 0.05
    if ('bn' in key or 'downsample.1' in key or 'ln_' in key) and key.endswith('weight'):
        return 1.0, 0.1
    if key == 'positional_embedding':
        return 0.0, 0.01
    if key == 'token_embedding.weight':
        return 0.0, 0.02
    if key == 'visual.attnpool.positional_embedding':
        return 0.0, shape[-1] ** -0.5
    if key == 'text_projection':
        return 0.0, shape[0] ** -0.5
    return 0.0, math.prod(shape[1:]) ** -0.5


def clip_state_dict() -> dict[str, torch.Tensor]:
    """The tiny CLIP's weights under OpenAI's (= open_clip's) key names, every float rounded to fp16 as in
    OpenAI's checkpoints; key i of the sorted keys is offset + std * standard_normal(RandomState(CLIP_SEED +
    i)) (numpy: the same bits on every machine); batch-norm counters 0, logit_scale log(1 / 0.07)."""
    import open_clip

    shapes = {k: tuple(v.shape) for k, v in open_clip.model.CLIP(**CLIP_CONFIG).state_dict().items()}
    state = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        if key.endswith('num_batches_tracked'):
            state[key] = torch.tensor(0, dtype=torch.int64)
        elif key == 'logit_scale':
            state[key] = torch.tensor(math.log(1 / 0.07), dtype=torch.float16)
        else:
            offset, std = _clip_std(key, shape)
            z = np.random.RandomState(CLIP_SEED + i).standard_normal(shape)
            value = offset + std * z
            if key.endswith('running_var'):
                value = np.abs(value)
            state[key] = torch.from_numpy(np.asarray(value, dtype=np.float16))
    # 30 % of the image projection maps into the text projection's 64-dimensional span, so that the two towers'
    # features share a subspace and the softmax scores spread: two train pictures above CCD's entropy bound 2
    # and two below.
    a = np.random.RandomState(CLIP_SEED - 1).standard_normal((64, 512)) * 512 ** -0.5
    shared = state['text_projection'].double().numpy().T @ a
    mixed = 0.7 * state['visual.attnpool.c_proj.weight'].double().numpy() + 0.3 * shared
    state['visual.attnpool.c_proj.weight'] = torch.from_numpy(mixed.astype(np.float16))
    return state


# The torchvision ResNet-50 modules in CCD's ImageClassifier.feature_extractor (nn.Sequential of its
# children without avgpool and fc): index -> torchvision name.
CCD_TRUNK_MODULES = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3', '7': 'layer4'}


def classifier_state_dict() -> dict[str, torch.Tensor]:
    """CCD's ImageClassifier weights (its key names: feature_extractor.*, onebyone_conv.*, alpha), float32.
    Key i of the sorted keys: convolutions N(0, 2 / fan_out) (torchvision's kaiming_normal_), batch-norm
    weights 1 (0.2 for each block's last one, so the untrained network stays in range without its batch
    statistics), biases and running means 0, running variances 1, all drawn from RandomState(CLASSIFIER_SEED
    + i); the 1x1 convolution N(0, 0.01) with bias +1 for SELECTED_CLASSES and -4 elsewhere; alpha 1."""
    import torchvision

    names = {v: k for k, v in CCD_TRUNK_MODULES.items()}
    shapes = {}
    for key, value in torchvision.models.resnet50(weights=None).state_dict().items():
        module, _, rest = key.partition('.')
        if module in names:
            shapes[f'feature_extractor.{names[module]}.{rest}'] = tuple(value.shape)
    shapes.update({'onebyone_conv.weight': (NUM_CLASSES, 2048, 1, 1), 'onebyone_conv.bias': (NUM_CLASSES,),
                   'alpha': (1, NUM_CLASSES)})
    state = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        rs = np.random.RandomState(CLASSIFIER_SEED + i)
        if key.endswith('num_batches_tracked'):
            value = np.zeros(shape, np.int64)
        elif key == 'alpha' or key.endswith('running_var'):
            value = np.ones(shape)
        elif key == 'onebyone_conv.bias':
            value = np.full(shape, -4.0)
            value[SELECTED_CLASSES] = 1.0
        elif key == 'onebyone_conv.weight':
            value = 0.01 * rs.standard_normal(shape)
        elif len(shape) == 4:
            value = math.sqrt(2.0 / (shape[0] * shape[2] * shape[3])) * rs.standard_normal(shape)
        elif key.endswith('weight'):  # batch norm
            value = np.full(shape, 0.2 if key.endswith('bn3.weight') else 1.0)
        else:
            value = np.zeros(shape)
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.int64 if value.dtype == np.int64 else np.float32))
    return state


def pictures(sizes: list[tuple[int, int]], first: int) -> list[np.ndarray]:
    """H x W x 3 uint8 pictures of six kinds (dark, light, noise, stripes, flat red, coloured checks), picture b
    of kind (first + b) mod 6, so that the tiny CLIP's scores differ between them (some above and some below
    CCD's entropy bound 2)."""
    out = []
    for b, (width, height) in enumerate(sizes):
        rs = np.random.RandomState(PICTURE_SEED + first + b)
        kind = (first + b) % 6
        yy, xx = np.mgrid[0:height, 0:width]
        if kind == 0:
            base = rs.normal(0, 5, (height, width, 3))
        elif kind == 1:
            base = 255 - np.abs(rs.normal(0, 5, (height, width, 3)))
        elif kind == 2:
            base = rs.uniform(0, 255, (height, width, 3))
        elif kind == 3:
            base = 255 * ((xx // 4) % 2)[..., None] * np.ones(3)
        elif kind == 4:
            base = np.zeros((height, width, 3)) + [200, 30, 30]
        else:
            base = 255 * ((yy // 8 + xx // 8) % 2)[..., None] * rs.uniform(0, 1, 3)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def train_pictures() -> list[np.ndarray]:
    return pictures(TRAIN_SIZES, 0)


def val_pictures() -> list[np.ndarray]:
    return pictures(VAL_SIZES, len(TRAIN_SIZES))


def random_boxes(count: int = 400, side: int = 640) -> np.ndarray:
    """count x 5 int64 (y1, x1, y2, x2, offset): corners anywhere in a side x side image, offsets 0..100."""
    rs = np.random.RandomState(BOX_SEED)
    corners = rs.randint(0, side, size=(count, 4))
    return np.concatenate([corners, rs.randint(0, 101, size=(count, 1))], axis=1).astype(np.int64)


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def fingerprint(t: torch.Tensor) -> np.ndarray:
    """A large gradient's fingerprint (float64): its sum, its sum of squares and its dot products with three
    fixed random vectors (RandomState(0), standard normal, one per row)."""
    x = t.detach().double().reshape(-1).numpy()
    r = np.random.RandomState(0).standard_normal((3, x.size))
    return np.concatenate([[x.sum(), (x * x).sum()], r @ x])

"""CCD's images (github.com/k0u-id/CCD 0b57641, datasets.py `ImageDataset`, `TorchvisionNormalize` and
`multilabel`): the inference images its CLIP and its CAM refresh read, and the two training views.

- Normalisation (`ccd_tensor`): transforms.Resize((S, S)) of the PIL image (bilinear, antialiased), then
  (pixel / 255 - mean) / std with ImageNet's mean and std computed in float64 by numpy and stored as
  float32 (`TorchvisionNormalize`; torchvision's Normalize, used by the other methods here, computes in
  float32 and differs by an ulp on some pixels). A flip mirrors the result (`imutils.random_lr_flip`).
- Inference images (`CcdImages`, its `infer` dataset): the train split at --ccd-infer-size (CCD: 640),
  no flip: the global CLIP pass, the CAMs of the refresh and the crops come from them.
- Training views (`CcdTrainViews`, its `train` dataset): 'image' at --image-size (448) with a random flip,
  and 'ex_image', the same picture resized, then colour-jittered on the PIL image (ColorJitter(0.5, 0.5,
  0.5, 0.5): brightness, contrast and saturation factors uniform in [0.5, 1.5], hue shift uniform in
  [-0.5, 0.5], applied in a random order), normalised and flipped on its own. The consistency loss
  compares the two views' outputs. The randomness comes from the sampler (image_dataset.FlipSampler with one
  view flip and eight draws per item), not from the workers, so a run repeats and resumes exactly; the
  original draws it unseeded in its workers (the same distributions). In the epochs without the
  consistency term (CCD's 0 and 1) the view is not made (the original makes it and leaves it unused).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import image_dataset
import image_io

_MEAN = np.array(image_io.IMAGENET_MEAN)
_STD = np.array(image_io.IMAGENET_STD)
JITTER = 0.5  # datasets.py: transforms.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.5)
JITTER_DRAWS = 8  # four for the order of the adjustments, four for their factors


# TorchvisionNormalize of each byte value, per channel: (v / 255 - mean) / std in float64, then float32
# (3 x 256); a lookup gives its result exactly, several times faster than the arithmetic on every pixel.
_BYTES = ((np.arange(256)[None, :] / 255.0 - _MEAN[:, None]) / _STD[:, None]).astype(np.float32)


def normalise(pixels: np.ndarray, flipped: bool = False) -> torch.Tensor:
    """H x W x 3 uint8 pixels -> 3 x H x W float32 in CCD's normalisation, mirrored left-right if flipped."""
    if flipped:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(np.stack([_BYTES[c][pixels[..., c]] for c in range(3)]))


def ccd_tensor(img: Image.Image, size: int, flipped: bool = False) -> torch.Tensor:
    """3 x size x size float32: CCD's Resize((size, size)) and TorchvisionNormalize (float64, then float32)."""
    return normalise(np.asarray(TF.resize(img, [size, size])), flipped)


def colour_jitter(img: Image.Image, draws) -> Image.Image:
    """torchvision ColorJitter(0.5, 0.5, 0.5, 0.5) on a PIL image with its parameters taken from eight
    uniform numbers in [0, 1): the order of the four adjustments is the argsort of the first four (a
    uniformly random permutation, as torch.randperm(4)), the factors are 0.5 + u (brightness, contrast,
    saturation) and u - 0.5 (hue) of the last four (torchvision's uniform draws in [1 - 0.5, 1 + 0.5] and
    [-0.5, 0.5])."""
    order = np.argsort(np.asarray(draws[:4]), kind='stable')
    brightness, contrast, saturation = (1 - JITTER + 2 * JITTER * u for u in draws[4:7])
    hue = 2 * JITTER * draws[7] - JITTER
    for fn in order:
        if fn == 0:
            img = TF.adjust_brightness(img, brightness)
        elif fn == 1:
            img = TF.adjust_contrast(img, contrast)
        elif fn == 2:
            img = TF.adjust_saturation(img, saturation)
        else:
            img = TF.adjust_hue(img, hue)
    return img


class CcdImages(image_dataset.MultiLabelImages):
    """A split's images in CCD's normalisation (ccd_tensor) at image_size; with train False never flipped."""

    def tensor(self, img: Image.Image, flipped: bool) -> torch.Tensor:
        return ccd_tensor(img, self.image_size, flipped)


class CcdTrainViews(CcdImages):
    """CCD's training images: item['image'] as CcdImages (flipped as the sampler drew) and item['ex_image'],
    the colour-jittered second view with its own flip (FlipSampler(views=1, draws=8) keys)."""
    num_views = 1
    num_draws = JITTER_DRAWS

    def __init__(self, images: image_dataset.MultiLabelImages):
        super().__init__(images.root, images.split, images.image_size, True, dataset=images.dataset,
                         skip_bad=images.skip_bad)

    def extras(self, img: Image.Image, key) -> dict[str, torch.Tensor]:
        if not (isinstance(key, tuple) and len(key) == 4):
            raise ValueError('CcdTrainViews needs (row, flip, view_flips, draws) keys from FlipSampler(views=1, draws=8)')
        if key[3] is None:  # an epoch without the consistency term (FlipSampler.skip_draws)
            return {}
        resized = TF.resize(img, [self.image_size, self.image_size])
        return {'ex_image': normalise(np.asarray(colour_jitter(resized, key[3])), key[2][0])}

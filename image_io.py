"""One image file as the network sees it: its RGB picture (`read_rgb`) and its input tensor.

`read_rgb` is how every reader here decodes an image file (16-bit and float images scaled by their range;
pictures it refuses are `UnusableImage`); `image_tensor` makes the network input (Resize((S, S)), flip,
ToTensor, ImageNet Normalize with `IMAGENET_MEAN` / `IMAGENET_STD`); `resized_pixels` is the uint8 picture
the packs store, and `to_model_input` makes a packed uint8 batch on its device bit-identical to the PIL
pipeline's tensor (docs/input-pipeline.md).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnusableImage(ValueError):
    """A file PIL opens whose picture read_rgb refuses; the caller names the file. A ValueError, so every
    reader that treats OSError and ValueError as an unreadable image (skipped with --skip-bad-images,
    named and skipped by predict.py) treats it so too."""


class ImageRangeError(UnusableImage):
    """An image whose values have no range to scale to 8 bits by (read_rgb)."""


class ImageTooLarge(UnusableImage):
    """An image over PIL's decompression-bomb limit (read_rgb): PIL refuses to decode it."""


SIXTEEN_BIT = 65535


def read_rgb(path) -> Image.Image:
    """The RGB picture of an image file, as every reader here sees it: the training and evaluation
    pipeline, the packs, the frozen-CLIP embedding cache, AEVLP's views (all through
    MultiLabelImages) and predict.py.

    8-bit modes (1, L, P, LA, PA, RGB, RGBA, CMYK, YCbCr, ...): PIL's convert('RGB'), unchanged.
    convert('RGB') clips the modes PIL keeps wider than 8 bits at 255 (a 16-bit PNG turns white,
    a float image in [0, 1] black), so they are scaled by their range first, to an 8-bit L image:

    - I;16, I;16L, I;16B, I;16N (16-bit grey: PNG, TIFF) and I (32-bit integer; PIL opens 16-bit
      PGM/PPM as I, scaled to 0..65535): v in 0..65535 becomes round(v / 257), half up, so 0 -> 0,
      65535 -> 255, and an 8-bit value b widened to 16 bits the standard way (257 b, PNG's sample
      depth scaling) reads back as b. Values outside 0..65535 (a 32-bit integer image) are refused.
    - F (32-bit float, TIFF): values in [0, 1] become round(255 x), half up. Values outside [0, 1],
      NaN or infinite are refused: such a file has no range to scale by.

    An image of more than twice PIL's Image.MAX_IMAGE_PIXELS pixels (PIL's guard against decompression
    bombs: its DecompressionBombError is neither an OSError nor a ValueError) is ImageTooLarge.

    A refusal is UnusableImage (a ValueError); every caller names the file in its one-line message.
    """
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:
        said = str(err).split(",")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        raise ImageTooLarge(f"too large to decode ({said}: PIL's guard against decompression bombs): downscale "
                            "it") from None
    with img:
        if img.mode == "F":
            x = np.asarray(img, dtype=np.float64)
            if not (np.isfinite(x).all() and x.min(initial=0.0) >= 0.0 and x.max(initial=0.0) <= 1.0):
                finite = x[np.isfinite(x)]
                span = f"{finite.min():g} to {finite.max():g}" if finite.size else "no finite value"
                raise ImageRangeError(f"a float (mode F) image with values outside [0, 1] ({span}"
                                      f"{', NaN or infinite values' if finite.size < x.size else ''}), so there is "
                                      "no range to scale it to 8 bits by: save it as an 8- or 16-bit image")
            return Image.fromarray(np.floor(x * 255.0 + 0.5).astype(np.uint8)).convert("RGB")  # uint8 2-D: L
        if img.mode == "I" or img.mode.startswith("I;16"):
            v = np.asarray(img).astype(np.int64)
            low, high = int(v.min(initial=0)), int(v.max(initial=0))
            if low < 0 or high > SIXTEEN_BIT:
                raise ImageRangeError(f"an image of mode {img.mode} with values {low} to {high}, outside the 16-bit "
                                      f"range 0..{SIXTEEN_BIT} it is scaled by: save it as an 8- or 16-bit image")
            return Image.fromarray(((v + 128) // 257).astype(np.uint8)).convert("RGB")
        return img.convert("RGB")


def image_tensor(img: Image.Image, image_size: int, *, flipped: bool = False) -> torch.Tensor:
    """The network input of an RGB PIL image: Resize((S, S)) (bilinear, antialias), optional
    horizontal flip, ToTensor, ImageNet Normalize -> 3 x S x S float. Used for training,
    evaluation and predict.py alike."""
    img = TF.resize(img, [image_size, image_size])
    if flipped:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def resized_pixels(img: Image.Image, image_size: int) -> np.ndarray:
    """The S x S x 3 uint8 pixels of an RGB PIL image after the pipeline's Resize((S, S)): what
    image_tensor normalises, and what preproc/pack_images.py stores (docs/input-pipeline.md)."""
    return np.asarray(TF.resize(img, [image_size, image_size]), dtype=np.uint8)


def to_model_input(images: torch.Tensor, flipped: torch.Tensor | None, device) -> torch.Tensor:
    """The network input of a batch on `device`.

    A float batch (the PIL pipeline, already normalised in the workers) is only moved. A uint8
    B x S x S x 3 batch (--data-format packed) is moved without blocking and made there exactly as
    image_tensor makes it: rows with ``flipped`` mirrored left-right (TF.hflip, exact on uint8),
    ToTensor (3 x S x S, float32, divided by 255) and Normalize (minus the mean, divided by the
    std, in float32), so the result is bit-identical to the PIL pipeline's tensor. Those float32
    operations are applied once, on the CPU, to the 256 values of a byte (``_byte_table``) and every
    pixel is looked up: one pass over memory instead of five, and the same bits on every device (CUDA
    divides a tensor by a Python number as a product with its reciprocal, which rounds differently
    from the CPU's division: computed there, the batch differed from the PIL pipeline's, measured on
    an H200).
    """
    if images.dtype != torch.uint8:
        return images.to(device, non_blocking=True)
    if torch.device(device).type == 'cpu':
        return _lookup_on_cpu(images, flipped)
    return _lookup_on_device(images.to(device, non_blocking=True),
                             None if flipped is None else flipped.to(device, non_blocking=True))


_DEVICE_TABLES: dict = {}


def _lookup_on_device(x: torch.Tensor, flipped: torch.Tensor | None) -> torch.Tensor:
    """to_model_input of a uint8 B x S x S x 3 batch with tensor operations on its device: hflip, then
    each byte looked up in the CPU-computed _byte_table (channel c's values at [256 c, 256 c + 256))."""
    if flipped is not None:
        x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(2), x)
    if x.device not in _DEVICE_TABLES:
        _DEVICE_TABLES[x.device] = torch.from_numpy(_byte_table()).reshape(-1).to(x.device)
    offsets = torch.arange(0, 3 * 256, 256, device=x.device).view(1, 3, 1, 1)
    return _DEVICE_TABLES[x.device][x.permute(0, 3, 1, 2).long() + offsets]  # B x 3 x S x S float32


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """TF.normalize's arithmetic: (x - mean) / std with float32 mean and std, channel dim 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(shape)
    std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(shape)
    return x.sub(mean).div(std)


_BYTE_TABLE: list = []


def _byte_table() -> np.ndarray:
    """3 x 256 float32: the network input of byte value v in channel c, computed with the same
    float32 operations as to_tensor and normalize."""
    if not _BYTE_TABLE:
        values = torch.arange(256, dtype=torch.uint8).float().div(255)  # TF.to_tensor
        _BYTE_TABLE.append(_normalise(values.view(1, 1, 256).expand(1, 3, 256)).reshape(3, 256).numpy().copy())
    return _BYTE_TABLE[0]


_POOL: dict = {}


def _lookup_on_cpu(images: torch.Tensor, flipped: torch.Tensor | None) -> torch.Tensor:
    """The byte-table lookup of every image plane, on torch.get_num_threads() threads (np.take
    releases the GIL), as a tensor operation would use them."""
    table = _byte_table()
    x = images.numpy()
    out = torch.empty((x.shape[0], 3) + x.shape[1:3], dtype=torch.float32)
    o = out.numpy()
    flips = np.zeros(len(x), bool) if flipped is None else flipped.cpu().numpy().astype(bool)

    def plane(b: int, c: int) -> None:
        src = x[b, :, ::-1] if flips[b] else x[b]  # hflip: read the row backwards
        np.take(table[c], src[..., c], out=o[b, c], mode='clip')  # 'clip': unbuffered; bytes are in range

    jobs = [(b, c) for b in range(len(x)) for c in range(3)]
    threads = torch.get_num_threads()
    if threads <= 1 or len(jobs) <= 3:
        for job in jobs:
            plane(*job)
        return out
    if _POOL.get('threads') != threads:
        from concurrent.futures import ThreadPoolExecutor
        _POOL.update(threads=threads, pool=ThreadPoolExecutor(threads, thread_name_prefix='to_model_input'))
    for done in [_POOL['pool'].submit(plane, *job) for job in jobs]:
        done.result()
    return out

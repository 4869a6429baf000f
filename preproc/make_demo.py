"""Build the offline demo: synthetic multi-label images and a tiny CLIP trained on them.

Everything is generated from one integer seed, so a fresh clone needs no download:

* ``<data_root>/demo/images/{train,val}/NNNNN.png``: 64 x 64 RGB pictures of 1 to 6 objects
  (3.4 on average) of the 30 classes of ``DEMO_CLASSES``: a class is a (colour, shape) pair and
  every colour and every shape belongs to two or three classes. Objects co-occur by scene
  (``_choose_classes``), many are small (log-uniform radius 4 to 12 px), they may overlap and
  leave the frame (each keeps at least half of its area visible), on a textured background
  (smooth field + grating) with distractor blobs in object colours.
* ``formatted_{train,val}_{images,labels,labels_obs}.npy`` in the layout of every other dataset
  (docs/original-vlpl.md section 2); observed labels come from ``generate_observed(labels, 1, 0, 1200)``.
  ``demo_manifest.json`` stamps them: generator version, seed, sizes, generator parameters and
  the sha256 of every file, so an older or damaged demo is found by content and rebuilt.
* ``clip/vlpl-demo-tiny.pt``: the state dict of the open_clip model described by
  ``preproc/clip_configs/vlpl-demo-tiny.json`` (a small ModifiedResNet image tower and a
  two-layer text transformer), trained with open_clip's contrastive ``ClipLoss`` on a separate
  stream of generated pictures (fewer objects per picture, as web photos) whose captions name
  only the salient objects, as web captions do (``make_caption``); stamp
  ``clip/vlpl-demo-tiny.json``. CLIP sees the pictures exactly as the training pipeline hands
  them to the pseudo-labeller (docs/original-vlpl.md section 5): ImageNet-normalised, then resized to the
  CLIP image size (64, so the resize is the identity).

Streams of randomness: picture i of split s is drawn from ``default_rng([seed, s, i])``
(s = 0 train, 1 val, 2 CLIP pairs), so the splits never share a picture and a picture does not
depend on how many others are drawn.

    python preproc/make_demo.py --data-root data --seed 0 [--force]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from preproc._common import PreprocError, run_cli, save_arrays  # noqa: E402
from clip_labels import clip_image_size  # noqa: E402
from files import atomic_write  # noqa: E402
from preproc.generate_observed_labels import generate_observed  # noqa: E402

# Twelve colours and twelve shapes; a class is one (colour, shape) pair, and every colour and every
# shape belongs to two or three classes, so neither alone names a class.
_COLOURS = [
    ("red", (220, 30, 30)), ("blue", (35, 70, 235)), ("green", (30, 165, 50)),
    ("yellow", (245, 220, 25)), ("purple", (135, 40, 185)), ("orange", (255, 135, 0)),
    ("cyan", (0, 215, 225)), ("pink", (255, 125, 195)), ("white", (250, 250, 250)),
    ("black", (15, 15, 15)), ("brown", (135, 80, 35)), ("navy", (20, 25, 105)),
]
_SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "heart", "moon",
           "arrow", "ring", "pentagon"]
NUM_CLASSES = 30
# Class 12 a + b: colour b, shape (b + 4 a) mod 12 (a = 0, 1, 2): all pairs distinct.
_CLASS_PARTS = [(i % 12, (i % 12 + 4 * (i // 12)) % 12) for i in range(NUM_CLASSES)]
DEMO_CLASSES: list[str] = [f"{_COLOURS[c][0]} {_SHAPES[s]}" for c, s in _CLASS_PARTS]
# Co-occurrence: class k belongs to scene k mod 6 (5 classes each, often of the same colour). A
# picture has one scene; each object comes from it with probability SCENE_P, else from the others.
NUM_SCENES = 6
SCENE_P = 0.7
DEMO_CLIP_CONFIG = "vlpl-demo-tiny"
CLIP_CONFIG_PATH = Path(__file__).resolve().parent / "clip_configs" / f"{DEMO_CLIP_CONFIG}.json"

IMAGE_SIZE = 64
OBSERVED_SEED = 1200  # the seed every dataset's observed labels use (docs/original-vlpl.md section 3)
STREAM_TRAIN, STREAM_VAL, STREAM_CLIP = 0, 1, 2
NUM_OBJECTS_P = (0.10, 0.20, 0.25, 0.20, 0.15, 0.10)  # P(1..6 objects), mean 3.4 before failures
# The CLIP pairs show few objects more often, as web photos do.
CLIP_NUM_OBJECTS_P = (0.45, 0.30, 0.15, 0.10, 0.0, 0.0)
RADIUS_RANGE = (4.0, 12.0)  # object half-size in pixels at 64 px, log-uniform: many small ones
MIN_VISIBLE = 0.5  # every object keeps half of its area visible (inside the frame, not covered)
DISTRACTORS = (0, 4)  # irregular blobs per picture (uniform count), in object colours or grey
DISTRACTOR_RADIUS = (3.0, 9.0)
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth, anti-aliased edges
_PLACEMENT_TRIES = 40

# Bump when the pictures, captions or training recipe change, so cached demos are rebuilt.
GENERATOR_VERSION = 2

DEFAULT_SIZES = dict(num_train=2400, num_test=800, num_clip_pairs=4000, clip_epochs=6)

# '{}' (bare names, the zero-shot prompt) is listed twice: it is drawn twice as often.
_CAPTION_TEMPLATES = [
    "{}",
    "{}",
    "a picture with {}",
    "a photo of {}",
    "an image showing {}",
    "there is {} in this picture",
    "{} on a textured background",
    "a drawing of {}",
]


# --------------------------------------------------------------------------- pictures

def _regular_polygon(n: int, start_deg: float, radius: float = 1.0) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 60, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)  # image y points down; +2.5 centres the curve
    return pts / np.abs(pts).max()


def _moon(cut_offset: float = 0.55, cut_radius: float = 0.85) -> np.ndarray:
    """Unit disc minus a disc of radius ``cut_radius`` centred at (cut_offset, 0), as a polygon.

    The circles meet at x0 = (1 + d^2 - rc^2) / 2d: the outline runs along the unit circle from
    angle arccos(x0) to 2 pi - arccos(x0), then back along the cut circle through its far side.
    """
    d, rc = cut_offset, cut_radius
    x0 = (1.0 + d * d - rc * rc) / (2.0 * d)
    alpha, beta = math.acos(x0), math.acos((x0 - d) / rc)
    outer = np.linspace(alpha, 2.0 * np.pi - alpha, 40)
    inner = np.linspace(2.0 * np.pi - beta, beta, 30)[1:-1]
    return np.concatenate([np.stack([np.cos(outer), np.sin(outer)], axis=1),
                           np.stack([d + rc * np.cos(inner), rc * np.sin(inner)], axis=1)])


# Outlines in local coordinates (unit half-size, y down); circle and ring are drawn as ellipses.
_POLYGONS = {
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": _regular_polygon(3, -90.0),
    "star": _star(),
    "diamond": np.array([[0.0, -1.0], [0.65, 0.0], [0.0, 1.0], [-0.65, 0.0]]),
    "cross": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
                       [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]),
    "hexagon": _regular_polygon(6, 0.0),
    "heart": _heart(),
    "moon": _moon(),
    "arrow": np.array([[-1, -0.28], [0.15, -0.28], [0.15, -0.7], [1, 0], [0.15, 0.7],
                       [0.15, 0.28], [-1, 0.28]]),
    "pentagon": _regular_polygon(5, -90.0),
}


def _blob(rng: np.random.Generator) -> np.ndarray:
    """Irregular 9-gon (radii 0.5 to 1 at jittered angles): a distractor that is no class shape."""
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, size=9))
    radii = rng.uniform(0.5, 1.0, size=9)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _mask(outline, cx: float, cy: float, radius: float, angle: float) -> tuple[np.ndarray, int, int]:
    """Coverage of one shape on the supersampled grid -> (bool h x w, x0, y0) of its bounding box.

    ``outline``: a key of ``_POLYGONS``, "circle", "ring", or an n x 2 array (unit half-size);
    centre and radius in supersampled pixels; the box may reach outside the picture.
    """
    x0, y0 = math.floor(cx - radius) - 1, math.floor(cy - radius) - 1
    size = math.ceil(2.0 * radius) + 3
    layer = Image.new("L", (size, size))
    draw = ImageDraw.Draw(layer)
    lx, ly = cx - x0, cy - y0
    if isinstance(outline, str) and outline not in _POLYGONS:
        box = (lx - radius, ly - radius, lx + radius, ly + radius)
        if outline == "circle":
            draw.ellipse(box, fill=1)
        elif outline == "ring":
            draw.ellipse(box, outline=1, width=max(1, round(0.38 * radius)))
        else:
            raise ValueError(f"unknown shape {outline!r}")
    else:
        points = _POLYGONS[outline] if isinstance(outline, str) else outline
        c, s = math.cos(angle), math.sin(angle)
        local = points @ np.array([[c, s], [-s, c]])
        draw.polygon([(lx + radius * x, ly + radius * y) for x, y in local], fill=1)
    return np.asarray(layer, dtype=bool), x0, y0


def _clip_to(mask: np.ndarray, x0: int, y0: int, size: int):
    """Part of a box mask inside the size x size grid -> (mask part, grid slices)."""
    h, w = mask.shape
    top, left = max(0, -y0), max(0, -x0)
    bottom, right = min(h, size - y0), min(w, size - x0)
    if bottom <= top or right <= left:
        return mask[:0, :0], (slice(0, 0), slice(0, 0))
    return (mask[top:bottom, left:right],
            (slice(y0 + top, y0 + bottom), slice(x0 + left, x0 + right)))


def _jittered(rgb, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.array(rgb, dtype=np.float32) + rng.integers(-15, 16, size=3), 0, 255)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Textured field -> S x S x 3 float32: a smooth tinted grey (4 x 4 control points, bilinear)
    plus a sinusoidal grating (random period, angle, phase, tint and contrast)."""
    base = rng.uniform(85.0, 170.0)
    grid = (base + rng.uniform(-25.0, 25.0, size=(4, 4, 1))
            + rng.uniform(-12.0, 12.0, size=(4, 4, 3)))
    field = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    smooth = np.asarray(field.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.float32)
    period, theta, phase = rng.uniform(5.0, 16.0), rng.uniform(0.0, np.pi), rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
    tint = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
    return smooth + rng.uniform(5.0, 22.0) * wave[..., None] * tint


def _choose_classes(rng: np.random.Generator, num_objects_p: tuple) -> np.ndarray:
    """Distinct classes of one picture: a scene, then each object from it with probability
    SCENE_P (else from the other scenes), without repeats."""
    num_objects = int(rng.choice(len(num_objects_p), p=num_objects_p)) + 1
    scene = int(rng.integers(NUM_SCENES))
    in_scene = np.arange(NUM_CLASSES) % NUM_SCENES == scene
    chosen: list[int] = []
    for _ in range(num_objects):
        pool = in_scene if rng.random() < SCENE_P else ~in_scene
        pool = pool.copy()
        pool[chosen] = False
        if not pool.any():
            pool = np.ones(NUM_CLASSES, dtype=bool)
            pool[chosen] = False
        chosen.append(int(rng.choice(np.flatnonzero(pool))))
    return np.array(chosen)


def render_picture(rng: np.random.Generator, num_objects_p: tuple = NUM_OBJECTS_P
                   ) -> tuple[np.ndarray, list[int], list[float]]:
    """Draw one picture -> (uint8 S x S x 3, class indices in drawing order (>= 1), visible area
    of each object in pixels).

    Classes: ``_choose_classes`` (1 to 6, scene co-occurrence). Background: ``_background``, then
    0 to 3 distractor blobs (``DISTRACTORS``) in a jittered object colour or a grey. Each object
    gets a log-uniform radius in ``RADIUS_RANGE``, a rotation in +-20 degrees, a colour jitter in
    +-15 per channel and a centre that may put part of it outside the frame; objects may overlap
    and a later one covers an earlier one, but a position is accepted only if every object keeps
    at least ``MIN_VISIBLE`` of its area visible. An object with no such position in
    ``_PLACEMENT_TRIES`` draws is left out (never the first one). Shapes are drawn at 4x into an
    id map, box-filtered down and composited over the background; then Gaussian pixel noise
    (std 6) is added.
    """
    classes = _choose_classes(rng, num_objects_p)
    background = _background(rng)
    big = IMAGE_SIZE * _SUPERSAMPLE
    s = _SUPERSAMPLE
    ids = np.zeros((big, big), dtype=np.int16)  # 0 background, 1 + j object j, 100 + j blob j
    palette = np.zeros((256, 3), dtype=np.float32)
    for j in range(int(rng.integers(DISTRACTORS[0], DISTRACTORS[1]))):
        r = rng.uniform(*DISTRACTOR_RADIUS)
        cx, cy = rng.uniform(0.0, IMAGE_SIZE, size=2)
        mask, x0, y0 = _mask(_blob(rng), cx * s, cy * s, r * s, 0.0)
        part, where = _clip_to(mask, x0, y0, big)
        ids[where][part] = 100 + j
        if rng.random() < 0.75:
            palette[100 + j] = _jittered(_COLOURS[int(rng.integers(len(_COLOURS)))][1], rng)
        else:
            palette[100 + j] = rng.uniform(40.0, 210.0)
    full_area: list[int] = []
    visible: list[int] = []
    drawn: list[int] = []
    for k in classes:
        shape = _SHAPES[_CLASS_PARTS[k][1]]
        for _ in range(_PLACEMENT_TRIES):
            r = math.exp(rng.uniform(*np.log(RADIUS_RANGE)))
            cx, cy = rng.uniform(0.3 * r, IMAGE_SIZE - 0.3 * r, size=2)
            angle = math.radians(rng.uniform(-20.0, 20.0))
            mask, x0, y0 = _mask(shape, cx * s, cy * s, r * s, angle)
            part, where = _clip_to(mask, x0, y0, big)
            area, inside = int(mask.sum()), int(part.sum())
            covered = np.bincount(ids[where][part], minlength=len(drawn) + 1)[1:len(drawn) + 1]
            if inside >= MIN_VISIBLE * area and all(
                    v - c >= MIN_VISIBLE * a for v, c, a in zip(visible, covered, full_area)):
                break
        else:
            continue
        visible = [v - int(c) for v, c in zip(visible, covered)] + [inside]
        full_area.append(area)
        drawn.append(int(k))
        ids[where][part] = len(drawn)
        palette[len(drawn)] = _jittered(_COLOURS[_CLASS_PARTS[k][0]][1], rng)
    # Box filter by PIL's reduce: the colour layer (id map through the palette) gives colour x
    # coverage, the mask layer the coverage alone.
    layer = Image.fromarray(ids.astype(np.uint8), "P")
    layer.putpalette(palette.astype(np.uint8).ravel().tolist())
    premultiplied = np.asarray(layer.convert("RGB").reduce(s), dtype=np.float32)
    mask = Image.fromarray(np.where(ids > 0, 255, 0).astype(np.uint8), "L")
    coverage = np.asarray(mask.reduce(s), dtype=np.float32) / 255.0
    picture = background * (1.0 - coverage[..., None]) + premultiplied
    picture += 6.0 * rng.standard_normal(picture.shape, dtype=np.float32)
    areas = [v / float(s * s) for v in visible]
    return np.clip(np.rint(picture), 0, 255).astype(np.uint8), drawn, areas


def iter_pictures(seed: int, stream: int, num: int, *, progress: bool = False,
                  desc: str = "pictures"):
    """Yield (i, uint8 S x S x 3 picture, class indices, visible areas) for pictures 0..num-1.

    Picture i is ``render_picture(default_rng([seed, stream, i]))``, with the object-count
    distribution ``CLIP_NUM_OBJECTS_P`` for the CLIP stream and ``NUM_OBJECTS_P`` otherwise.
    """
    from tqdm import tqdm

    num_objects_p = CLIP_NUM_OBJECTS_P if stream == STREAM_CLIP else NUM_OBJECTS_P
    for i in tqdm(range(num), desc=desc, unit="img", disable=not progress, leave=False):
        yield (i, *render_picture(np.random.default_rng([seed, stream, i]), num_objects_p))


def generate_pictures(seed: int, stream: int, num: int, *, progress: bool = False,
                      desc: str = "pictures", with_areas: bool = False):
    """Pictures 0..num-1 of a stream -> (uint8 N x S x S x 3, float32 N x K labels in {0, 1}),
    plus, with ``with_areas``, float32 N x K visible areas in pixels (0 where absent)."""
    images = np.empty((num, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.zeros((num, NUM_CLASSES), dtype=np.float32)
    areas = np.zeros((num, NUM_CLASSES), dtype=np.float32)
    for i, pixels, classes, visible in iter_pictures(seed, stream, num, progress=progress,
                                                     desc=desc):
        images[i] = pixels
        labels[i, classes] = 1.0
        areas[i, classes] = visible
    return (images, labels, areas) if with_areas else (images, labels)


# --------------------------------------------------------------------------- captions

CAPTION_FULL_AREA = 60.0  # visible area (pixels at 64 px) from which an object is always named


def make_caption(names: list[str], areas: list[float], rng: np.random.Generator) -> str:
    """Caption naming some of the objects of a picture, like a web caption: the salient ones.

    The object with the largest visible area is always named; every other one with probability
    min(1, 0.2 + 0.8 area / ``CAPTION_FULL_AREA``), so small or mostly covered objects are often
    left out. The named ones go in random order through a random template of
    ``_CAPTION_TEMPLATES``: "a x", "a x and a y", "a x, a y and a z" (bare names for the
    template '{}', the zero-shot prompt of the pseudo-labeller).
    """
    n = len(names)
    keep = rng.random(n) < np.minimum(1.0, 0.2 + 0.8 * np.asarray(areas) / CAPTION_FULL_AREA)
    keep[int(np.argmax(areas))] = True
    chosen = [names[j] for j in rng.permutation(n) if keep[j]]
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    if template != "{}":
        chosen = [f"a {name}" for name in chosen]
    listed = chosen[0] if len(chosen) == 1 else ", ".join(chosen[:-1]) + " and " + chosen[-1]
    return template.format(listed)


# --------------------------------------------------------------------------- tiny CLIP

def register_clip_config() -> None:
    """Make ``DEMO_CLIP_CONFIG`` known to open_clip (create_model / get_tokenizer)."""
    import open_clip

    if DEMO_CLIP_CONFIG not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIG_PATH)


def _normalise_for_clip(images_u8, image_size: int):
    """uint8 B x S x S x 3 -> what the pseudo-labeller sees: the pipeline's ToTensor + ImageNet
    Normalize (datasets.py), then clip_labels.resize_for_clip to the CLIP size (identity at 64)."""
    import torch

    from datasets import IMAGENET_MEAN, IMAGENET_STD
    from clip_labels import resize_for_clip

    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return resize_for_clip((x - mean) / std, image_size)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns on the root logger that a model without pretrained weights is random;
    here that is the point, so the line would only confuse a user watching the demo build."""
    drop = _DropRandomInitWarning()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


@contextlib.contextmanager
def _torch_threads(num: int):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_demo_clip(seed: int = 0, *, num_pairs: int = DEFAULT_SIZES["num_clip_pairs"],
                    epochs: int = DEFAULT_SIZES["clip_epochs"], batch_size: int = 64,
                    lr: float = 2e-3, progress: bool = False):
    """Train the tiny CLIP on ``num_pairs`` pictures of stream 2 -> (model in eval mode, tokenizer).

    Each epoch every picture gets a fresh caption (``make_caption``) and a horizontal flip with
    probability 0.5 (the training pipeline flips too). Loss: open_clip ``ClipLoss`` (symmetric
    InfoNCE, learnable logit scale from open_clip's init 1/0.07, clamped at 100 as in CLIP).
    AdamW (weight decay 0.05 on matrices only), linear warm-up over the first 5% of steps, then
    cosine decay to 0.

    CPU, one thread, torch RNG forked and seeded: the weights depend only on the arguments, not
    on the machine's core count, and the caller's RNG and thread setting are left as they were.
    One thread also loses little here (the matrices are tiny) and, unlike two, does not collapse
    when another process keeps the second core busy.
    """
    import open_clip
    import torch
    from tqdm import tqdm

    register_clip_config()
    images_u8, labels, areas = generate_pictures(seed, STREAM_CLIP, num_pairs, progress=progress,
                                                 desc="demo CLIP pictures", with_areas=True)
    objects = [([DEMO_CLASSES[k] for k in np.flatnonzero(row)], area_row[row > 0])
               for row, area_row in zip(labels, areas)]
    images_u8 = torch.from_numpy(images_u8)
    caption_rng = np.random.default_rng([seed, STREAM_CLIP, num_pairs, 1])
    tokenizer = open_clip.get_tokenizer(DEMO_CLIP_CONFIG)

    with torch.random.fork_rng(devices=[]), _torch_threads(1):
        torch.manual_seed(seed)
        with _quiet_random_init_warning():
            model = open_clip.create_model(DEMO_CLIP_CONFIG, pretrained=None)
        image_size = clip_image_size(model)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                                      fused=True)
        steps_per_epoch = math.ceil(num_pairs / batch_size)
        total = epochs * steps_per_epoch
        warmup = max(1, total // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(
            (step + 1) / warmup, 0.5 * (1.0 + math.cos(math.pi * step / total))))
        loss_fn = open_clip.ClipLoss()
        model.train()
        bar = tqdm(total=total, desc="demo CLIP training", unit="step", disable=not progress,
                   leave=False)
        for _ in range(epochs):
            captions = [make_caption(names, visible, caption_rng) for names, visible in objects]
            tokens = tokenizer(captions)
            order = torch.randperm(num_pairs)
            flips = torch.rand(num_pairs) < 0.5
            for start in range(0, num_pairs, batch_size):
                idx = order[start:start + batch_size]
                x = _normalise_for_clip(images_u8[idx], image_size)
                x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
                image_features, text_features, logit_scale = model(x, tokens[idx])
                loss = loss_fn(image_features, text_features, logit_scale)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                with torch.no_grad():  # CLIP's clamp: logit scale at most 100
                    model.logit_scale.clamp_(0, math.log(100))
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- files

def _save_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _images_sha256(images_dir: Path, names) -> str:
    """One sha256 over the listed pictures (name, then bytes, in order); ValueError if one is missing."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(str(name).encode() + b"\0")
        try:
            digest.update((images_dir / name).read_bytes())
        except OSError:
            raise ValueError(f"images/{name} is missing or unreadable") from None
    return digest.hexdigest()


def generator_parameters() -> dict:
    """What the pictures depend on besides the seed and the sizes; recorded in both stamps."""
    return dict(image_size=IMAGE_SIZE, classes=DEMO_CLASSES, num_scenes=NUM_SCENES,
                scene_p=SCENE_P, num_objects_p=list(NUM_OBJECTS_P),
                clip_num_objects_p=list(CLIP_NUM_OBJECTS_P), radius_range=list(RADIUS_RANGE),
                min_visible=MIN_VISIBLE, distractors=list(DISTRACTORS),
                distractor_radius=list(DISTRACTOR_RADIUS), caption_full_area=CAPTION_FULL_AREA)


def _settings_problem(found: dict | None, expected: dict) -> str | None:
    """Why a stamp does not describe what would be built now (None: it does)."""
    if found is None:
        return "its stamp is missing or unreadable"
    if found.get("version") != expected["version"]:
        return (f"it was made by generator version {found.get('version')}, "
                f"this is version {expected['version']}")
    changed = sorted(key for key in expected if found.get(key) != expected[key])
    if changed:
        return f"it was made with other settings ({', '.join(changed)})"
    return None


DATA_STAMP = "demo_manifest.json"
_PHASES = (("train", STREAM_TRAIN, "num_train"), ("val", STREAM_VAL, "num_test"))
_NPY_FILES = [f"formatted_{phase}_{kind}.npy" for phase, _, _ in _PHASES
              for kind in ("images", "labels", "labels_obs")]


def data_problem(demo_dir: Path, expected: dict) -> str | None:
    """Why the dataset in ``demo_dir`` cannot be used as it is, in a few words (None: it can).

    Checks the content, not only the presence: the stamp must match ``expected`` (version, seed,
    sizes, generator parameters), and every npy file and the pictures it lists must have the
    sha256 the stamp recorded when they were written (a truncated or edited file fails).
    """
    stamp = _read_json(demo_dir / DATA_STAMP)
    problem = _settings_problem(stamp, expected)
    if problem:
        return problem
    files = stamp.get("sha256")
    if not isinstance(files, dict) or sorted(files) != sorted(_NPY_FILES):
        return f"its stamp {DATA_STAMP} is damaged"
    for name in _NPY_FILES:
        path = demo_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != files[name]:
            return f"{name} is damaged (its content differs from the stamp)"
    try:
        names = [str(p) for phase, _, _ in _PHASES
                 for p in np.load(demo_dir / f"formatted_{phase}_images.npy", allow_pickle=False)]
        if _images_sha256(demo_dir / "images", names) != stamp.get("images_sha256"):
            return "a picture under images/ is damaged (its content differs from the stamp)"
    except ValueError as err:
        return str(err)
    return None


def _write_data(demo_dir: Path, seed: int, sizes: dict, stamp: dict, progress: bool) -> None:
    """Pictures into a temporary folder renamed to images/ at the end, then the npy files, then
    the stamp with their sha256 (written last: an interrupted build has no valid stamp)."""
    demo_dir.mkdir(parents=True, exist_ok=True)
    (demo_dir / DATA_STAMP).unlink(missing_ok=True)
    for stale in demo_dir.glob(".images-*"):  # left behind by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = demo_dir / f".images-{os.getpid()}"
    tmp_dir.mkdir()
    arrays = {}
    names: list[str] = []
    try:
        for phase, stream, size_key in _PHASES:
            (tmp_dir / phase).mkdir()
            paths = [f"{phase}/{i:05d}.png" for i in range(sizes[size_key])]
            labels = np.zeros((len(paths), NUM_CLASSES))  # float64, as format_*.py write
            for i, pixels, classes, _ in iter_pictures(seed, stream, len(paths), progress=progress,
                                                       desc=f"demo {phase} images"):
                Image.fromarray(pixels, "RGB").save(tmp_dir / paths[i], compress_level=1)
                labels[i, classes] = 1.0
            names += paths
            arrays[f"formatted_{phase}_images.npy"] = np.array(paths)
            arrays[f"formatted_{phase}_labels.npy"] = labels
            arrays[f"formatted_{phase}_labels_obs.npy"] = generate_observed(labels, 1, 0,
                                                                            OBSERVED_SEED)
        final = demo_dir / "images"
        if final.exists():
            old = demo_dir / f".images-old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp_dir, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp_dir, final)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    save_arrays(demo_dir, arrays)
    _save_json(demo_dir / DATA_STAMP,
               {**stamp, "sha256": {name: _sha256(demo_dir / name) for name in _NPY_FILES},
                "images_sha256": _images_sha256(demo_dir / "images", names)})


def clip_problem(checkpoint: Path, expected: dict) -> str | None:
    """Why the tiny-CLIP checkpoint cannot be used as it is (None: it can): its stamp
    (``<checkpoint>.json``) must match ``expected`` and record the checkpoint's sha256."""
    stamp = _read_json(checkpoint.with_suffix(".json"))
    problem = _settings_problem(stamp, expected)
    if problem:
        return problem
    if not checkpoint.is_file():
        return f"{checkpoint.name} is missing"
    if _sha256(checkpoint) != stamp.get("sha256"):
        return f"{checkpoint.name} is damaged (its content differs from the stamp)"
    return None


def _save_state_dict(path: Path, model) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(model.state_dict(), f))


def ensure_demo(data_root: str | Path = "data", *, seed: int = 0, progress: bool = True,
                force: bool = False, num_train: int = DEFAULT_SIZES["num_train"],
                num_test: int = DEFAULT_SIZES["num_test"],
                num_clip_pairs: int = DEFAULT_SIZES["num_clip_pairs"],
                clip_epochs: int = DEFAULT_SIZES["clip_epochs"],
                report: Callable[[str], None] | None = print, with_clip: bool = True) -> Path:
    """Create what is missing, stale or damaged in ``<data_root>/demo/``; return the CLIP checkpoint.

    Two independent artefacts, each with a json stamp of what produced it (generator version,
    seed, sizes, parameters) and the sha256 of what it wrote: the dataset (images/ + six npy
    files, stamp ``demo_manifest.json``) and the tiny CLIP (``clip/vlpl-demo-tiny.pt``, stamp
    ``clip/vlpl-demo-tiny.json``, which also holds the model config). An artefact is rebuilt when
    ``data_problem`` / ``clip_problem`` find a reason, or with ``force``; ``report`` (if given)
    gets one line saying what is built and why. Otherwise nothing is written. Each file appears
    atomically (temporary name + os.replace). ``with_clip=False``: the dataset only (a run that uses
    no CLIP, or --evaluate, whose checkpoint holds its model); the CLIP is left as it is.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test),
                        ("num_clip_pairs", num_clip_pairs), ("clip_epochs", clip_epochs)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    say = report or (lambda line: None)
    demo_dir = Path(data_root) / "demo"
    first_use = not (demo_dir / DATA_STAMP).exists() and not any(
        (demo_dir / name).exists() for name in _NPY_FILES)
    sizes = dict(num_train=int(num_train), num_test=int(num_test))
    data_stamp = dict(version=GENERATOR_VERSION, seed=int(seed), **sizes, **generator_parameters())
    problem = "--force" if force else data_problem(demo_dir, data_stamp)
    if problem:
        say(f"Generating the demo dataset in {demo_dir} (first use)" if first_use else
            f"Regenerating the demo dataset in {demo_dir}: {problem}")
        _write_data(demo_dir, int(seed), sizes, data_stamp, progress)

    checkpoint = demo_dir / "clip" / f"{DEMO_CLIP_CONFIG}.pt"
    if not with_clip:
        return checkpoint
    clip_stamp = dict(version=GENERATOR_VERSION, seed=int(seed),
                      num_clip_pairs=int(num_clip_pairs), clip_epochs=int(clip_epochs),
                      model_config=json.loads(CLIP_CONFIG_PATH.read_text()),
                      **generator_parameters())
    problem = "--force" if force else clip_problem(checkpoint, clip_stamp)
    if problem:
        say(f"Training the demo's tiny CLIP -> {checkpoint} (first use)" if first_use else
            f"Retraining the demo's tiny CLIP {checkpoint}: {problem}")
        checkpoint.with_suffix(".json").unlink(missing_ok=True)
        model, _ = train_demo_clip(int(seed), num_pairs=int(num_clip_pairs),
                                   epochs=int(clip_epochs), progress=progress)
        _save_state_dict(checkpoint, model)
        _save_json(checkpoint.with_suffix(".json"), {**clip_stamp, "sha256": _sha256(checkpoint)})
    return checkpoint


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_demo.py",
        description="Generate the synthetic demo dataset and train its tiny CLIP "
                    "(creates only what is missing or stale).")
    parser.add_argument("--data-root", default="data",
                        help="folder that holds the <dataset>/ folders; writes <data-root>/demo/ "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the pictures, captions and CLIP training "
                             "(default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild everything even if it is up to date (default: off)")
    parser.add_argument("--num-train", type=_positive_int, default=DEFAULT_SIZES["num_train"],
                        help="pictures in the official train split (default: %(default)s)")
    parser.add_argument("--num-test", type=_positive_int, default=DEFAULT_SIZES["num_test"],
                        help="pictures in the official val (= test) split (default: %(default)s)")
    parser.add_argument("--clip-pairs", type=_positive_int,
                        default=DEFAULT_SIZES["num_clip_pairs"],
                        help="image-caption pairs the tiny CLIP trains on (default: %(default)s)")
    parser.add_argument("--clip-epochs", type=_positive_int, default=DEFAULT_SIZES["clip_epochs"],
                        help="epochs of tiny-CLIP training (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars (default: off)")

    def build(args: argparse.Namespace) -> list[str]:
        demo_dir = Path(args.data_root) / "demo"
        try:
            checkpoint = ensure_demo(args.data_root, seed=args.seed, progress=not args.quiet,
                                     force=args.force, num_train=args.num_train,
                                     num_test=args.num_test, num_clip_pairs=args.clip_pairs,
                                     clip_epochs=args.clip_epochs)
        except OSError as err:
            raise PreprocError(f"cannot write the demo into {demo_dir}: {err.strerror or err} "
                               f"(check --data-root)") from None
        return [f"demo ready in {demo_dir}; tiny CLIP checkpoint: {checkpoint}"]

    return run_cli(parser, build, argv)


if __name__ == "__main__":
    sys.exit(main())

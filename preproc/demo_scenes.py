"""The demo's scene generator: synthetic multi-label pictures of coloured shapes.

A picture (``render_picture``) is 64 x 64 RGB with 1 to 6 objects (3.4 on average) of the 30
classes of ``DEMO_CLASSES``: a class is a (colour, shape) pair and every colour and every shape
belongs to two or three classes. Objects co-occur by scene (``_choose_classes``), many are small
(log-uniform radius 4 to 12 px), they may overlap and leave the frame (each keeps at least half of
its area visible), on a textured background (smooth field + grating) with distractor blobs in
object colours.

Streams of randomness: picture i of stream s is drawn from ``default_rng([seed, s, i])``
(s = 0 train, 1 val, 2 CLIP pairs), so the splits never share a picture and a picture does not
depend on how many others are drawn. preproc/make_demo.py writes the splits; preproc/demo_clip.py
trains the demo's tiny CLIP on stream 2.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

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

IMAGE_SIZE = 64
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


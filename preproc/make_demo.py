"""Build the offline demo: synthetic multi-label images and a tiny CLIP trained on them.

Everything is generated from one integer seed, so a fresh clone needs no download:

* ``<data_root>/demo/images/{train,val}/NNNNN.png``: 64 x 64 RGB pictures of 1 to 4 coloured
  shapes (the 12 classes of ``DEMO_CLASSES``, each at most once per picture) on a textured,
  noisy background; objects keep apart (centre distance >= ``MIN_GAP`` x the sum of their radii)
  so that every object stays visible.
* ``formatted_{train,val}_{images,labels,labels_obs}.npy`` in the layout of every other dataset
  (docs/original-vlpl.md section 2); observed labels come from ``generate_observed(labels, 1, 0, 1200)``.
* ``clip/vlpl-demo-tiny.pt``: the state dict of the open_clip model described by
  ``preproc/clip_configs/vlpl-demo-tiny.json`` (a ViT with 16 px patches at 64 px and a
  two-layer text transformer), trained with open_clip's contrastive ``ClipLoss`` on a separate
  stream of generated pictures whose captions name only some of the objects, as web captions
  do (``make_caption``). CLIP sees the pictures exactly as the training pipeline hands them to
  the pseudo-labeller (docs/original-vlpl.md section 5): ImageNet-normalised, then resized to the CLIP
  image size (64, so the resize is the identity).

Streams of randomness: picture i of split s is drawn from ``default_rng([seed, s, i])``
(s = 0 train, 1 val, 2 CLIP pairs), so the splits never share a picture and a picture does not
depend on how many others are drawn.

    python preproc/make_demo.py --data-root data --seed 0 [--force]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from preproc._common import PreprocError, run_cli, save_arrays  # noqa: E402
from files import atomic_write  # noqa: E402
from preproc.generate_observed_labels import generate_observed  # noqa: E402

# (colour name, RGB, shape); colour and shape both differ between classes.
_OBJECTS = [
    ("red", (220, 30, 30), "circle"),
    ("blue", (35, 70, 235), "square"),
    ("green", (30, 165, 50), "triangle"),
    ("yellow", (245, 220, 25), "star"),
    ("purple", (135, 40, 185), "diamond"),
    ("orange", (255, 135, 0), "cross"),
    ("cyan", (0, 215, 225), "hexagon"),
    ("pink", (255, 125, 195), "heart"),
    ("white", (250, 250, 250), "moon"),
    ("black", (15, 15, 15), "arrow"),
    ("brown", (135, 80, 35), "ring"),
    ("navy", (20, 25, 105), "pentagon"),
]
DEMO_CLASSES: list[str] = [f"{colour} {shape}" for colour, _, shape in _OBJECTS]
DEMO_CLIP_CONFIG = "vlpl-demo-tiny"
CLIP_CONFIG_PATH = Path(__file__).resolve().parent / "clip_configs" / f"{DEMO_CLIP_CONFIG}.json"

IMAGE_SIZE = 64
OBSERVED_SEED = 1200  # the seed every dataset's observed labels use (docs/original-vlpl.md section 3)
STREAM_TRAIN, STREAM_VAL, STREAM_CLIP = 0, 1, 2
NUM_OBJECTS_P = (0.10, 0.30, 0.35, 0.25)  # P(1..4 objects): mean 2.75 before placement failures
# The CLIP pairs show single objects more often, as web photos do: uniform over 1..4 objects.
CLIP_NUM_OBJECTS_P = (0.25, 0.25, 0.25, 0.25)
RADIUS_RANGE = (7.0, 12.0)  # object half-size in pixels at 64 px
MIN_GAP = 0.85  # centre distance >= MIN_GAP * (r1 + r2): overlaps stay small
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth, anti-aliased edges
_PLACEMENT_TRIES = 60

# Bump when the pictures, captions or training recipe change, so cached demos are rebuilt.
GENERATOR_VERSION = 1

DEFAULT_SIZES = dict(num_train=2400, num_test=800, num_clip_pairs=4000, clip_epochs=6)

# '{}' (bare names, the zero-shot prompt) is listed twice: it is drawn twice as often.
_CAPTION_TEMPLATES = [
    "{}",
    "{}",
    "a picture with {}",
    "a photo of {}",
    "an image showing {}",
    "there is {} in this picture",
    "{} on a grey background",
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


def _draw_object(draws: tuple, shape: str, colour: tuple, cx: float, cy: float, radius: float,
                 angle: float) -> None:
    """Draw one shape centred at (cx, cy) with half-size ``radius`` (supersampled pixels).

    ``draws`` = (colour layer, coverage layer): the shape goes into both, so after box
    downsampling the colour layer holds colour x coverage and the other the coverage alone.
    """
    for draw, fill in zip(draws, (colour, 255)):
        if shape in _POLYGONS:
            c, s = math.cos(angle), math.sin(angle)
            local = _POLYGONS[shape] @ np.array([[c, s], [-s, c]])
            draw.polygon([(cx + radius * x, cy + radius * y) for x, y in local], fill=fill)
            continue
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "ring":
            draw.ellipse(box, outline=fill, width=max(1, round(0.38 * radius)))
        else:
            raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator) -> np.ndarray:
    """Smooth, slightly tinted grey field (4 x 4 control points, bilinear) -> S x S x 3 float32."""
    base = rng.uniform(85.0, 170.0)
    grid = (base + rng.uniform(-25.0, 25.0, size=(4, 4, 1))
            + rng.uniform(-12.0, 12.0, size=(4, 4, 3)))
    field = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(field.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.float32)


def render_picture(rng: np.random.Generator,
                   num_objects_p: tuple = NUM_OBJECTS_P) -> tuple[np.ndarray, list[int]]:
    """Draw one picture -> (uint8 S x S x 3, class indices in drawing order, >= 1 of them).

    1 to 4 distinct classes (probabilities ``num_objects_p``); each gets a radius in
    ``RADIUS_RANGE``, a rotation in +-15 degrees, a colour jitter in +-15 per channel and a
    position inside the picture at which its centre is at least ``MIN_GAP * (r_i + r_j)`` from
    every object already placed; an object with no such position in ``_PLACEMENT_TRIES`` draws is
    left out (never the first one). Shapes are drawn at 4x, box-filtered down and
    alpha-composited over the background; then Gaussian pixel noise (std 6) is added.
    """
    num_objects = int(rng.choice(4, p=num_objects_p)) + 1
    classes = rng.choice(len(_OBJECTS), size=num_objects, replace=False)
    background = _background(rng)
    big = IMAGE_SIZE * _SUPERSAMPLE
    layers = Image.new("RGB", (big, big)), Image.new("L", (big, big))
    draws = tuple(ImageDraw.Draw(layer) for layer in layers)
    placed: list[tuple[float, float, float]] = []
    drawn: list[int] = []
    for k in classes:
        for _ in range(_PLACEMENT_TRIES):
            r = rng.uniform(*RADIUS_RANGE)
            cx, cy = rng.uniform(r, IMAGE_SIZE - r, size=2)
            if all(math.hypot(cx - px, cy - py) >= MIN_GAP * (r + pr) for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        drawn.append(int(k))
        _, rgb, shape = _OBJECTS[k]
        jitter = rng.integers(-15, 16, size=3)
        colour = tuple(int(v) for v in np.clip(np.array(rgb) + jitter, 0, 255))
        angle = math.radians(rng.uniform(-15.0, 15.0))
        s = _SUPERSAMPLE
        _draw_object(draws, shape, colour, cx * s, cy * s, r * s, angle)
    premultiplied = np.asarray(layers[0].reduce(_SUPERSAMPLE), dtype=np.float32)
    coverage = np.asarray(layers[1].reduce(_SUPERSAMPLE), dtype=np.float32)[..., None] / 255.0
    picture = background * (1.0 - coverage) + premultiplied
    picture += 6.0 * rng.standard_normal(picture.shape, dtype=np.float32)
    return np.clip(np.rint(picture), 0, 255).astype(np.uint8), drawn


def iter_pictures(seed: int, stream: int, num: int, *, progress: bool = False,
                  desc: str = "pictures"):
    """Yield (i, uint8 S x S x 3 picture, class indices) for pictures 0..num-1 of a stream.

    Picture i is ``render_picture(default_rng([seed, stream, i]))``, with the object-count
    distribution ``CLIP_NUM_OBJECTS_P`` for the CLIP stream and ``NUM_OBJECTS_P`` otherwise.
    """
    from tqdm import tqdm

    num_objects_p = CLIP_NUM_OBJECTS_P if stream == STREAM_CLIP else NUM_OBJECTS_P
    for i in tqdm(range(num), desc=desc, unit="img", disable=not progress, leave=False):
        yield (i, *render_picture(np.random.default_rng([seed, stream, i]), num_objects_p))


def generate_pictures(seed: int, stream: int, num: int, *, progress: bool = False,
                      desc: str = "pictures") -> tuple[np.ndarray, np.ndarray]:
    """Pictures 0..num-1 of a stream -> (uint8 N x S x S x 3, float32 N x K labels in {0, 1})."""
    images = np.empty((num, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.zeros((num, len(DEMO_CLASSES)), dtype=np.float32)
    for i, pixels, classes in iter_pictures(seed, stream, num, progress=progress, desc=desc):
        images[i] = pixels
        labels[i, classes] = 1.0
    return images, labels


# --------------------------------------------------------------------------- captions

def make_caption(names: list[str], rng: np.random.Generator) -> str:
    """Caption naming some of the objects of a picture, like a web caption.

    With n objects, a random subset of n - 1 or n of them (each size with probability 1/2, at
    least one object) is named in random order through a random template of
    ``_CAPTION_TEMPLATES``: "a x", "a x and a y", "a x, a y and a z" (bare names for the
    template '{}', the zero-shot prompt of the pseudo-labeller). Leaving out at most one object
    keeps captions specific enough for the tiny CLIP to learn in seconds; smaller subsets
    (uniform size, or each object named with probability 0.75) gave lower pseudo-label precision.
    """
    n = len(names)
    size = int(rng.integers(max(1, n - 1), n + 1))
    chosen = [names[j] for j in rng.permutation(n)[:size]]
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    if template != "{}":
        chosen = [f"a {name}" for name in chosen]
    listed = chosen[0] if size == 1 else ", ".join(chosen[:-1]) + " and " + chosen[-1]
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
    images_u8, labels = generate_pictures(seed, STREAM_CLIP, num_pairs, progress=progress,
                                          desc="demo CLIP pictures")
    names_per_image = [[DEMO_CLASSES[k] for k in np.flatnonzero(row)] for row in labels]
    images_u8 = torch.from_numpy(images_u8)
    caption_rng = np.random.default_rng([seed, STREAM_CLIP, num_pairs, 1])
    tokenizer = open_clip.get_tokenizer(DEMO_CLIP_CONFIG)

    with torch.random.fork_rng(devices=[]), _torch_threads(1):
        torch.manual_seed(seed)
        with _quiet_random_init_warning():
            model = open_clip.create_model(DEMO_CLIP_CONFIG, pretrained=None)
        image_size = model.visual.image_size[0]
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
            captions = [make_caption(names, caption_rng) for names in names_per_image]
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
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_DATA_MANIFEST = "demo_manifest.json"
_PHASES = (("train", STREAM_TRAIN, "num_train"), ("val", STREAM_VAL, "num_test"))


def _data_complete(demo_dir: Path, stamp: dict) -> bool:
    if _read_json(demo_dir / _DATA_MANIFEST) != stamp:
        return False
    for phase, _, size_key in _PHASES:
        for kind in ("images", "labels", "labels_obs"):
            if not (demo_dir / f"formatted_{phase}_{kind}.npy").is_file():
                return False
        folder = demo_dir / "images" / phase
        if not folder.is_dir() or sum(1 for _ in os.scandir(folder)) != stamp[size_key]:
            return False
    return True


def _write_data(demo_dir: Path, seed: int, sizes: dict, progress: bool) -> None:
    """Pictures into a temporary folder renamed to images/ at the end, then the npy files."""
    demo_dir.mkdir(parents=True, exist_ok=True)
    (demo_dir / _DATA_MANIFEST).unlink(missing_ok=True)
    for stale in demo_dir.glob(".images-*"):  # left behind by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = demo_dir / f".images-{os.getpid()}"
    tmp_dir.mkdir()
    arrays = {}
    try:
        for phase, stream, size_key in _PHASES:
            (tmp_dir / phase).mkdir()
            paths = [f"{phase}/{i:05d}.png" for i in range(sizes[size_key])]
            labels = np.zeros((len(paths), len(DEMO_CLASSES)))  # float64, as format_*.py write
            for i, pixels, classes in iter_pictures(seed, stream, len(paths), progress=progress,
                                                    desc=f"demo {phase} images"):
                Image.fromarray(pixels, "RGB").save(tmp_dir / paths[i], compress_level=1)
                labels[i, classes] = 1.0
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


def _save_state_dict(path: Path, model) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(model.state_dict(), f))


def ensure_demo(data_root: str | Path = "data", *, seed: int = 0, progress: bool = True,
                force: bool = False, num_train: int = DEFAULT_SIZES["num_train"],
                num_test: int = DEFAULT_SIZES["num_test"],
                num_clip_pairs: int = DEFAULT_SIZES["num_clip_pairs"],
                clip_epochs: int = DEFAULT_SIZES["clip_epochs"]) -> Path:
    """Create what is missing or stale in ``<data_root>/demo/``; return the CLIP checkpoint path.

    Two independent artefacts, each with a json stamp of what produced it (seed, sizes, generator
    version): the dataset (images/ + six npy files, stamp ``demo_manifest.json``) and the tiny CLIP
    (``clip/vlpl-demo-tiny.pt``, stamp ``clip/vlpl-demo-tiny.json``, which also holds the model
    config). An artefact is rebuilt when its stamp differs, a file is missing, or ``force``;
    otherwise nothing is written. Each file appears atomically (temporary name + os.replace).
    """
    for name, value in (("num_train", num_train), ("num_test", num_test),
                        ("num_clip_pairs", num_clip_pairs), ("clip_epochs", clip_epochs)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    demo_dir = Path(data_root) / "demo"
    sizes = dict(num_train=int(num_train), num_test=int(num_test))
    data_stamp = dict(version=GENERATOR_VERSION, seed=int(seed), image_size=IMAGE_SIZE,
                      classes=DEMO_CLASSES, **sizes)
    if force or not _data_complete(demo_dir, data_stamp):
        _write_data(demo_dir, int(seed), sizes, progress)
        _save_json(demo_dir / _DATA_MANIFEST, data_stamp)

    checkpoint = demo_dir / "clip" / f"{DEMO_CLIP_CONFIG}.pt"
    clip_stamp_path = checkpoint.with_suffix(".json")
    clip_stamp = dict(version=GENERATOR_VERSION, seed=int(seed),
                      num_clip_pairs=int(num_clip_pairs), clip_epochs=int(clip_epochs),
                      classes=DEMO_CLASSES,
                      model_config=json.loads(CLIP_CONFIG_PATH.read_text()))
    if force or _read_json(clip_stamp_path) != clip_stamp or not checkpoint.is_file():
        clip_stamp_path.unlink(missing_ok=True)
        model, _ = train_demo_clip(int(seed), num_pairs=int(num_clip_pairs),
                                   epochs=int(clip_epochs), progress=progress)
        _save_state_dict(checkpoint, model)
        _save_json(clip_stamp_path, clip_stamp)
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

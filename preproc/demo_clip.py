"""The demo's tiny CLIP: captions of the generated pictures, and contrastive training on them.

``train_demo_clip`` trains the open_clip model described by
``preproc/clip_configs/vlpl-demo-tiny.json`` (a small ModifiedResNet image tower and a two-layer
text transformer) with open_clip's contrastive ``ClipLoss`` on a separate stream of generated
pictures (preproc/demo_scenes.py, stream 2: fewer objects per picture, as web photos) whose
captions name only the salient objects, as web captions do (``make_caption``). CLIP sees the
pictures exactly as the training pipeline hands them to the pseudo-labeller
(docs/original-vlpl.md section 5): ImageNet-normalised, then resized to the CLIP image size (64,
so the resize is the identity). preproc/make_demo.py saves and stamps the result.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np

from clip_loading import clip_image_size
from preproc.demo_scenes import DEMO_CLASSES, STREAM_CLIP, generate_pictures

DEMO_CLIP_CONFIG = "vlpl-demo-tiny"
CLIP_CONFIG_PATH = Path(__file__).resolve().parent / "clip_configs" / f"{DEMO_CLIP_CONFIG}.json"
DEFAULT_PAIRS, DEFAULT_EPOCHS = 4000, 6  # image-caption pairs and epochs of the tiny CLIP's training

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
    Normalize (image_io.py), then clip_loading.resize_for_clip to the CLIP size (identity at 64)."""
    import torch

    from image_io import IMAGENET_MEAN, IMAGENET_STD
    from clip_loading import resize_for_clip

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


def train_demo_clip(seed: int = 0, *, num_pairs: int = DEFAULT_PAIRS,
                    epochs: int = DEFAULT_EPOCHS, batch_size: int = 64,
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


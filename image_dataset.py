"""The images of a split as a torch Dataset (`MultiLabelImages`), their batches, and `FlipSampler`.

An item is an image of a split (datasets.Split) read through image_io.read_rgb and made into the network
input by image_io.image_tensor, with its labels, row and flip; `collate_skipping` drops the images that
could not be read (--skip-bad-images); `FlipSampler` draws the training shuffle and flips in the main
process (docs/original-vlpl.md section 5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets import DataError, Split
from image_io import UnusableImage, image_tensor, read_rgb


class MultiLabelImages(torch.utils.data.Dataset):
    """Images of one split with their labels (docs/original-vlpl.md section 5).

    Item ``i``: ``image`` (3 x S x S float, ImageNet-normalised), ``label_obs`` (K,), ``label_true``
    (K,), ``index`` (int64 row in the split) and ``flipped`` (bool). Train: Resize((S, S)) on the RGB
    PIL image (bilinear, antialias), horizontal flip when ``torch.rand(1) < 0.5`` (the draw of
    torchvision's RandomHorizontalFlip(0.5)), ToTensor, Normalize. Eval: never flipped.
    ``flipped`` is returned so that the frozen-CLIP embedding can be cached per (index, flipped).
    """

    def __init__(self, root: Path, split: Split, image_size: int, train: bool, *,
                 dataset: str = "", skip_bad: bool = False):
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.train = train
        self.dataset = dataset  # only used in error messages
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.split)

    def _open(self, path: Path) -> Image.Image:
        where = f" of dataset {self.dataset}" if self.dataset else ""
        try:
            return read_rgb(path)
        except UnusableImage as err:
            raise DataError(f"image {path}{where} is {err}, or pass --skip-bad-images") from None
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {path}{where} ({err}); check the image folder, "
                            f"re-run the dataset's formatting step, or pass --skip-bad-images") from None

    def image_stats(self) -> np.ndarray:
        """(N, 2) size and modification time of the files the pixels are read from (fingerprint.py)."""
        return self.split.stats(self.root)

    def __getitem__(self, key) -> dict[str, torch.Tensor] | None:
        """``key`` is a row index, or a (row, flip) pair from FlipSampler (train only).

        With a plain index the train flip is drawn here, as torchvision's RandomHorizontalFlip
        would. With ``skip_bad`` an unreadable image gives ``{"skipped": row}``, which
        ``collate_skipping`` drops from the batch and lists under "skipped".
        """
        if isinstance(key, tuple):
            i, flipped = int(key[0]), bool(key[1]) and self.train
        else:
            i, flipped = int(key), self.train and bool(torch.rand(1) < 0.5)
        try:
            img = self._open(self.root / str(self.split.images[i]))
        except DataError:
            if self.skip_bad:
                return {"skipped": i}
            raise
        image = self.tensor(img, flipped)
        return {
            "image": image,
            "label_obs": torch.from_numpy(self.split.labels_obs[i].copy()),
            "label_true": torch.from_numpy(self.split.labels_true[i].copy()),
            "index": torch.tensor(i, dtype=torch.int64),
            "flipped": torch.tensor(flipped),
            **self.extras(img, key),
        }

    def tensor(self, img: Image.Image, flipped: bool) -> torch.Tensor:
        """The item's image tensor (image_tensor; a subclass may make it another way, e.g. CCD's
        normalisation in ccd_images.py)."""
        return image_tensor(img, self.image_size, flipped=flipped)

    def extras(self, img: Image.Image, key) -> dict[str, torch.Tensor]:
        """Further tensors of an item made from the same decoded image (a subclass adds views of it,
        e.g. aevlp.CropViews); none here."""
        return {}


def collate_skipping(items: list | dict) -> dict:
    """default_collate of the items MultiLabelImages could read; the rows it gave up on are listed
    under "skipped" (a list of row indices), and a batch of skipped items only has that key. A dict
    is a batch its dataset already collated (packs.PackedImages.__getitems__): returned as it is."""
    if isinstance(items, dict):
        return items
    kept = [item for item in items if "skipped" not in item]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = [item["skipped"] for item in items if "skipped" in item]
    return batch


def report_skipped(dataset: "MultiLabelImages", rows: list[int]) -> None:
    """Name each skipped image once in the log (--skip-bad-images); runs in the main process."""
    from distributed import log

    seen = dataset.__dict__.setdefault("_reported", set())
    for row in rows:
        if row not in seen:
            seen.add(row)
            log.warning(f"skipped unreadable image {dataset.root / str(dataset.split.images[row])} (--skip-bad-images)")


class FlipSampler(torch.utils.data.Sampler):
    """Shuffled (row, flip) pairs for the training loader, drawn in the main process.

    Each epoch draws a permutation and one flip bit per row from a private generator seeded with
    the run's torch seed. Because the randomness lives here and not in the worker processes, a run
    gives the same batches whatever --num-workers is, works with persistent workers, and resumes
    exactly from the generator state saved in a checkpoint.

    views > 0: each item is (row, flip, view_flips) with `views` more flip bits per row, drawn after
    the others (so the rows and flips are those of views = 0), for a dataset that flips further
    views of the image independently (aevlp.CropViews). draws > 0: each item is (row, flip, view_flips,
    draws) with `draws` uniform numbers in [0, 1) per row, drawn last, for a dataset whose further views
    are random in other ways (ccd_images.CcdTrainViews' colour jitter). skip_draws: the draws are made
    (the random stream stays that of every epoch) but handed out as None, so that the dataset skips
    the view they shape in an epoch that does not read it.
    """

    def __init__(self, num_rows: int, seed: int, views: int = 0, draws: int = 0):
        self.num_rows = num_rows
        self.views = views
        self.draws = draws
        self.skip_draws = False
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        order = torch.randperm(self.num_rows, generator=self.generator).tolist()
        flips = (torch.rand(self.num_rows, generator=self.generator) < 0.5).tolist()
        if not self.views and not self.draws:
            return iter(zip(order, flips))
        view_flips = (torch.rand(self.num_rows, self.views, generator=self.generator) < 0.5).tolist()
        if not self.draws:
            return iter(zip(order, flips, map(tuple, view_flips)))
        draws = torch.rand(self.num_rows, self.draws, generator=self.generator, dtype=torch.float64).tolist()
        if self.skip_draws:
            return iter(zip(order, flips, map(tuple, view_flips), [None] * self.num_rows))
        return iter(zip(order, flips, map(tuple, view_flips), map(tuple, draws)))

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

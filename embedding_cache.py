"""The frozen-CLIP embedding cache: every training image embedded once, read by every epoch.

The frozen CLIP's output depends only on the image and its horizontal flip, so the embeddings of a
split (`cached_embeddings`, or any per-row embedding: `cached_rows`) and of CCD's local views
(`cached_view_embeddings`) are computed once and kept under --cache-dir, in a file named after the digest of everything they depend on
(`embedding_cache_key`), with that key in a JSON file beside it.

The key names the pixels as --resume does (fingerprint.py): the image list and each image's size and
modification time, not the folder they lie in, so a copy that keeps the times (`cp -a`, `rsync -a`) is
the same data and is not embedded again. A file is superseded when a new one is written for the same
dataset, image list, CLIP and settings whose inputs changed since (the images' sizes and times, the CLIP
config's or weights file's content: `lineage`): it can never be read again, so it is removed then, with
one log line (a COCO cache of ViT-L/14 is about 0.5 GB). Files of other settings are never touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

import distributed
import fingerprint
import image_io
from clip_loading import weights_identity
from files import save_json, save_npy
from pseudo_labeler import PseudoLabeler


def embedding_cache_key(*, dataset: str, images, clip_model: str, clip_pretrained: str | None,
                        image_size: int, clip_size: int, precision: str = 'float32',
                        preprocess: str = 'original', image_stats=None) -> dict:
    """Everything a cached embedding depends on. A change of any entry selects another cache file.

    images: the image list (names relative to the image folder, whose location is not part of the key);
    image_stats: (N, 2) size and modification time of the images whose pixels are embedded (the
    image set's image_stats(), fingerprint.py), so pictures rewritten since are embedded again.

    precision: 'float32', or 'bf16' for a cache built under CUDA autocast (--amp). A JSON model
    config is identified by its content too, so editing it in place invalidates the cache.
    preprocess: how the pipeline tensor becomes CLIP's input (--clip-preprocess). The embeddings of
    CCD's local views add the digest of their boxes (cached_view_embeddings).
    """
    config_sha = config_digest(clip_model)
    return {'format': 2, 'dataset': dataset,
            'images_sha256': hashlib.sha256('\n'.join(map(str, images)).encode()).hexdigest(),
            'num_images': len(images), 'clip_model': str(clip_model), 'clip_config_sha256': config_sha,
            'weights': weights_identity(clip_pretrained), 'image_size': int(image_size),
            'clip_size': int(clip_size), 'precision': precision, 'preprocess': preprocess,
            'image_stats_sha256': None if image_stats is None else fingerprint.digest(image_stats)}


def config_digest(clip_model: str) -> str | None:
    """sha256 of a JSON model config given as --clip-model (so that editing it in place invalidates what was
    cached with it); None for an open_clip name."""
    config = Path(str(clip_model))
    return (hashlib.sha256(config.read_bytes()).hexdigest()
            if str(clip_model).endswith('.json') and config.is_file() else None)


def cached_embeddings(labeler: PseudoLabeler, loader, key: dict, cache_dir: str | os.PathLike, *,
                      device, amp: bool = False) -> torch.Tensor:
    """(N, 2, D) float32 frozen-CLIP embeddings of every image of `loader`, unflipped and flipped.

    The frozen CLIP's output depends only on the image and the horizontal flip, so it is computed
    once and reused by every epoch and every later run with the same key (embedding_cache_key).
    `loader` must yield the images without random flips (eval transforms); the flipped embedding
    is that of image.flip(-1), which is exactly the tensor the training transform produces.
    bf16 autocast on CUDA when `amp`.
    """
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if amp and torch.device(device).type == 'cuda'
                else contextlib.nullcontext())

    def embed(images):
        return torch.stack([labeler.embed(images), labeler.embed(images.flip(-1))], dim=1)  # B x 2 x D
    with autocast:
        return cached_rows(embed, loader, key, cache_dir, device=device, per_row=(2,),
                           width=labeler.text_features.shape[1])


def cached_rows(embed, loader, key: dict, cache_dir: str | os.PathLike, *, device, per_row: tuple = (),
                width: int, desc: str = 'frozen CLIP embeddings (once, cached)') -> torch.Tensor:
    """(N, *per_row, D) float32: embed(images on `device`) -> B x *per_row x D for every batch of `loader`
    (its 'image' and 'index'), computed once and kept under cache_dir with `key` (embedding_cache_key;
    key['num_images'] = N). The array is written to a temporary file and renamed, and its key file is
    written after it: an interrupted build is never used, it is rebuilt. Several processes: each embeds
    the rows its loader holds (distributed.shard), the blocks are merged, rank 0 writes."""
    path = _cache_path(key, cache_dir)
    num_rows = key['num_images']
    array = _read_cached(path, key, (num_rows,) + tuple(per_row))
    # Several processes: all use the file or all rebuild it, each embedding its block of rows.
    if not distributed.any_rank(array is None):
        return array
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    out = None
    for batch in distributed.progress(loader, desc=desc):
        if 'image' not in batch:  # every image of the batch was skipped (--skip-bad-images)
            continue
        images = image_io.to_model_input(batch['image'], batch.get('flipped'), device)  # packed: on the device
        rows = embed(images).float().cpu().numpy()
        if out is None:
            out = np.zeros((num_rows,) + rows.shape[1:], dtype=np.float32)
        out[batch['index'].numpy()] = rows
    if distributed.world_size() > 1:  # the loader held this rank's block (distributed.shard): gather
        mine = out if out is not None else np.zeros((num_rows,) + tuple(per_row) + (width,), np.float32)
        merged = distributed.merge_shards(torch.from_numpy(mine)).numpy()
        out = merged if distributed.any_rank(out is not None) else None
    if out is None:
        raise ValueError('the embedding cache loader yielded no image')
    if distributed.is_primary():  # rank 0 writes; the others wait until the file is complete
        _write_cached(path, key, out)
    distributed.barrier()
    return torch.from_numpy(out)


def _cache_path(key: dict, cache_dir) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f'clip_{key["dataset"]}_{digest}.npy'


def _read_cached(path: Path, key: dict, leading: tuple) -> torch.Tensor | None:
    """The cached array at `path` if its key file holds `key` and its leading dimensions are `leading`."""
    key_path = path.with_suffix('.json')
    if path.is_file() and key_path.is_file():
        try:
            stored_key = json.loads(key_path.read_text())
            array = np.load(path, allow_pickle=False)
            if stored_key == key and array.ndim == len(leading) + 1 and array.shape[:len(leading)] == leading:
                return torch.from_numpy(array)
        except (OSError, ValueError, EOFError):
            pass  # unreadable or truncated: rebuilt by the caller
    return None


# Key entries that describe the state of a cache's inputs rather than which data and settings it is of
# (format 1 keys also held the images' folder): a key that differs from another only in these (and in
# the size and time of the same weights file) supersedes it.
STATE_ENTRIES = ('format', 'image_root', 'image_stats_sha256', 'clip_config_sha256')


def lineage(key: dict) -> dict:
    """The data and settings a cache key is of, without the state of its inputs (STATE_ENTRIES; a weights
    file by its path alone): keys of one lineage describe the same embeddings at different moments."""
    out = {k: v for k, v in key.items() if k not in STATE_ENTRIES}
    weights = key.get('weights')
    if isinstance(weights, dict) and 'file' in weights:
        out['weights'] = {'file': weights['file']}
    return out


def _write_cached(path: Path, key: dict, array: np.ndarray) -> torch.Tensor:
    """The array first, its key file after it: an interrupted write is never read back. Then the files of
    the same lineage that it supersedes are removed (_remove_superseded)."""
    key_path = path.with_suffix('.json')
    key_path.unlink(missing_ok=True)
    save_npy(path, array)
    save_json(key_path, key)
    _remove_superseded(path, key)
    return torch.from_numpy(array)


def _remove_superseded(path: Path, key: dict) -> None:
    """Remove the cache files beside `path` whose key is of the same lineage as `key` but another key:
    their images or CLIP files changed since, so no run reads them again. One log line names them."""
    mine = lineage(key)
    removed, freed = [], 0
    for other in sorted(path.parent.glob(f'clip_{key["dataset"]}_*.json')):
        if other == path.with_suffix('.json'):
            continue
        try:
            stored = json.loads(other.read_text())
        except (OSError, ValueError):
            continue  # unreadable: not provably ours to remove
        if not isinstance(stored, dict) or stored == key or lineage(stored) != mine:
            continue
        array = other.with_suffix('.npy')
        freed += array.stat().st_size if array.is_file() else 0
        array.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
        removed.append(array.name)
    if removed:
        distributed.log.info(f'embedding cache: removed {len(removed)} superseded file{"s" if len(removed) > 1 else ""} '
                             f'of the same dataset, image list and CLIP settings, whose images or CLIP files changed '
                             f'since ({", ".join(removed)}; {freed / 2 ** 20:.1f} MB freed)')


def cached_view_embeddings(embed_views, loader, rows: torch.Tensor, views: torch.Tensor, key: dict,
                           cache_dir: str | os.PathLike, *, device, width: int, precision: str = 'float32',
                           desc: str = 'CCD local views: CLIP embeddings') -> torch.Tensor:
    """(V, D) float32 CLIP embeddings of CCD's local views: view v is image rows[v] cropped and resized as
    views[v] says (a ccd.cam_views row: box and size); embed_views(images, views) -> V' x D embeds the
    views of a batch, given the image of each (on `device`). Cached like the global embeddings, under `key`
    (the split's embedding_cache_key) with `precision` plus the digest of the views, so a rerun with the
    same views reuses them. `loader`: the split in row order without flips. Every process computes
    all views (the refresh is the same on every rank); rank 0 writes."""
    table = torch.cat([rows[:, None], views], dim=1).numpy().astype(np.int64)
    key = dict(key, precision=precision, views='ccd-cam-crops', views_sha256=hashlib.sha256(table.tobytes()).hexdigest(),
               num_views=int(table.shape[0]))
    path = _cache_path(key, cache_dir)
    array = _read_cached(path, key, (table.shape[0],))
    if not distributed.any_rank(array is None):
        return array
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    out = np.zeros((table.shape[0], width), dtype=np.float32)
    order = torch.argsort(rows, stable=True)
    for batch in distributed.progress(loader, desc=desc):
        if 'image' not in batch:
            continue
        index = batch['index']
        lo, hi = torch.searchsorted(rows[order], torch.stack([index.min(), index.max() + 1]))
        picked = order[lo:hi]
        picked = picked[torch.isin(rows[picked], index)]
        if picked.numel() == 0:
            continue
        position = {int(r): i for i, r in enumerate(index.tolist())}
        images = batch['image'][[position[int(r)] for r in rows[picked]]].to(device)
        out[picked.numpy()] = embed_views(images, views[picked]).float().cpu().numpy()
    if distributed.is_primary():
        _write_cached(path, key, out)
    distributed.barrier()
    return torch.from_numpy(out)


def cached_array(key: dict, cache_dir: str | os.PathLike, compute) -> torch.Tensor:
    """A small float32 array kept under cache_dir with its key (key['dataset'] names the file): read back
    when the key matches, else compute() (a tensor) written there first (CCD's class text features, so
    that a rerun needs no CLIP)."""
    path = _cache_path(key, cache_dir)
    key_path = path.with_suffix('.json')
    try:
        if path.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
            return torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError, EOFError):
        pass  # unreadable or truncated: computed again
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(compute().float().cpu().numpy())
    if distributed.is_primary():
        _write_cached(path, key, array)
    return torch.from_numpy(array)

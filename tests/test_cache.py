"""Tests of the frozen-CLIP embedding cache (embedding_cache.cached_embeddings, embedding_cache.embedding_cache_key).

A tiny random open_clip model (conftest.tiny_clip) embeds the tiny pascal-shaped dataset
(conftest.tiny_pascal, K = 20). Checked: a round trip that runs CLIP once only; a new cache
for every changed key entry; interrupted or damaged builds are rebuilt, never used; and
pseudo-labels from the cache equal those computed online for every training row and flip,
both through the PseudoLabeler and through main_clip's pseudo-label sources.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import image_dataset
import main_clip
import class_text_features
import clip_loading
import embedding_cache
import pseudo_label_policy
import pseudo_labeler

IMAGE_SIZE = 32  # pipeline size; the tiny CLIP's own input size is 32 as well
BATCH = 8


@pytest.fixture
def clip_files(tiny_clip, tmp_path) -> dict:
    """A private copy of the tiny CLIP checkpoint: tests may touch or rewrite it."""
    checkpoint = tmp_path / 'clip' / 'tiny.pt'
    checkpoint.parent.mkdir()
    shutil.copy2(tiny_clip['checkpoint'], checkpoint)
    return {'config': tiny_clip['config'], 'checkpoint': str(checkpoint)}


@pytest.fixture
def labeler(clip_files) -> pseudo_labeler.PseudoLabeler:
    clip, _ = clip_loading.load_clip(clip_files['config'], clip_files['checkpoint'])
    # Random unit text features; partial 0.25 makes 5 negative pseudo-labels per image, so
    # both signs of pseudo-label are compared.
    text = F.normalize(torch.randn(20, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    return pseudo_labeler.PseudoLabeler(clip.visual, text, temp=0.01, threshold=0.3, partial=0.25)


@pytest.fixture(scope='module')
def train_split(tiny_pascal) -> datasets.Split:
    return datasets.load_splits(tiny_pascal, 'pascal')['train']


@pytest.fixture
def root(tiny_pascal) -> Path:
    return datasets.image_root(tiny_pascal, 'pascal')


def eval_loader(root, split) -> torch.utils.data.DataLoader:
    dataset = image_dataset.MultiLabelImages(root, split, IMAGE_SIZE, train=False)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False, num_workers=0,
                                       collate_fn=image_dataset.collate_skipping)


def make_key(root, split, clip_files, **changes) -> dict:
    entries = dict(dataset='pascal', images=split.images, clip_model=clip_files['config'],
                   clip_pretrained=clip_files['checkpoint'], image_size=IMAGE_SIZE, clip_size=32)
    entries.update(changes)
    return embedding_cache.embedding_cache_key(**entries)


class CountingEmbed:
    """Replaces labeler.embed: counts calls and raises on call number `fail_at` (1-based)."""

    def __init__(self, labeler, fail_at: int | None = None):
        self.embed, self.fail_at, self.calls = labeler.embed, fail_at, 0

    def __call__(self, images):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt('simulated interruption of the cache build')
        return self.embed(images)


def build(labeler, root, split, key, cache_dir, monkeypatch, fail_at=None) -> tuple[torch.Tensor, int]:
    """cached_embeddings with a counting embed; returns (embeddings, number of embed calls)."""
    counter = CountingEmbed(labeler, fail_at)
    monkeypatch.setattr(labeler, 'embed', counter)
    try:
        return embedding_cache.cached_embeddings(labeler, eval_loader(root, split), key, cache_dir, device='cpu'), counter.calls
    finally:
        monkeypatch.setattr(labeler, 'embed', counter.embed)


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(cache_dir).iterdir()) if Path(cache_dir).exists() else []


def data_files(cache_dir: Path, suffix: str) -> list[Path]:
    return sorted(p for p in Path(cache_dir).glob(f'*{suffix}') if not p.name.startswith('.'))


# --------------------------------------------------------------------------- round trip


def test_round_trip_runs_clip_once_and_reloads_identical_values(labeler, root, train_split, clip_files,
                                                                 tmp_path, monkeypatch):
    key = make_key(root, train_split, clip_files)
    cache_dir = tmp_path / 'cache'
    first, calls = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    num_rows = len(train_split)
    assert num_rows == 32
    assert calls == 2 * -(-num_rows // BATCH)  # one plain and one flipped embed per batch
    assert first.shape == (num_rows, 2, 32) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=-1), torch.ones(num_rows, 2), atol=1e-5)
    # Exactly the array and its key: no temporary file left behind.
    npy, = data_files(cache_dir, '.npy')
    key_file, = data_files(cache_dir, '.json')
    assert cache_files(cache_dir) == sorted([npy.name, key_file.name])
    assert key_file.stem == npy.stem
    assert json.loads(key_file.read_text()) == key
    assert np.array_equal(np.load(npy), first.numpy())

    def no_clip(images):
        raise AssertionError('the second call must load the cache, not run CLIP')

    monkeypatch.setattr(labeler, 'embed', no_clip)
    second = embedding_cache.cached_embeddings(labeler, eval_loader(root, train_split), key, cache_dir, device='cpu')
    assert torch.equal(second, first)
    # A key built again from equal entries (another list object, same names) finds the same file.
    third = embedding_cache.cached_embeddings(labeler, eval_loader(root, train_split),
                                              make_key(root, train_split, clip_files, images=list(train_split.images)),
                                              cache_dir, device='cpu')
    assert torch.equal(third, first)
    assert len(data_files(cache_dir, '.npy')) == 1


# --------------------------------------------------------------------------- invalidation


def _touch(path: str) -> None:
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def _touch_weights(ctx) -> dict:
    """Same path and size, newer mtime: the key entries stay, the file's identity changes."""
    _touch(ctx['clip']['checkpoint'])
    return {}


def _grow_weights_keeping_mtime(ctx) -> dict:
    """Same path and mtime, one byte longer."""
    path = ctx['clip']['checkpoint']
    stat = os.stat(path)
    with open(path, 'ab') as handle:
        handle.write(b'\0')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return {}


CHANGES = {
    'image list, one name changed': lambda ctx: dict(images=np.array(
        ['other.png', *ctx['split'].images[1:]])),
    'image list, order changed': lambda ctx: dict(images=ctx['split'].images[::-1]),
    'image list, one image fewer': lambda ctx: dict(images=ctx['split'].images[:-1]),
    'clip weights file touched': _touch_weights,
    'clip weights file resized': _grow_weights_keeping_mtime,
    'clip weights, another file': lambda ctx: dict(clip_pretrained=shutil.copy2(
        ctx['clip']['checkpoint'], Path(ctx['clip']['checkpoint']).with_name('copy.pt'))),
    'clip weights, a tag': lambda ctx: dict(clip_pretrained='openai'),
    'image_size': lambda ctx: dict(image_size=48),
    'clip model': lambda ctx: dict(clip_model='ViT-L-14-336'),
    'clip input size': lambda ctx: dict(clip_size=64),
    'dataset': lambda ctx: dict(dataset='coco'),
    'images rewritten (their sizes and times)': lambda ctx: dict(image_stats=np.ones((len(ctx['split']), 2))),
}
# Changes of the state of the same inputs (the same weights file, the same images): the new cache
# supersedes the old one, which no key can select again, and it is removed.
SUPERSEDING = ('clip weights file touched', 'clip weights file resized', 'images rewritten (their sizes and times)')


@pytest.mark.parametrize('change', sorted(CHANGES))
def test_a_changed_key_entry_selects_a_new_cache_and_rebuilds(change, labeler, root, train_split, clip_files,
                                                              tmp_path, monkeypatch):
    cache_dir = tmp_path / 'cache'
    key = make_key(root, train_split, clip_files)
    first, _ = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    old_files = data_files(cache_dir, '.npy')

    # The change is made after the first build (a touched weights file changes the key only then).
    changed = make_key(root, train_split, clip_files,
                       **CHANGES[change](dict(split=train_split, clip=clip_files, root=root)))
    assert changed != key
    # With a shorter image list the key describes fewer rows than the loader; use a matching split.
    split = train_split
    if changed['num_images'] != len(train_split):
        split = dataclasses.replace(train_split, images=train_split.images[:-1],
                                    labels_true=train_split.labels_true[:-1], labels_obs=train_split.labels_obs[:-1])
    _, calls = build(labeler, root, split, changed, cache_dir, monkeypatch)
    assert calls > 0, 'a changed key must run CLIP again'
    new_files = data_files(cache_dir, '.npy')
    if change in SUPERSEDING:
        assert len(new_files) == 1 and not set(old_files) & set(new_files)
        assert len(data_files(cache_dir, '.json')) == 1
    else:  # another dataset, image list, CLIP or setting: both kept
        assert len(new_files) == 2 and set(old_files) < set(new_files)
    for path in new_files:  # every array has its own key file, which holds its own key
        assert json.loads(path.with_suffix('.json').read_text()) in (key, changed)

    # The old cache is still valid for the old key (only if the old key can still be built:
    # touching the weights file changed its identity for good).
    if change not in SUPERSEDING:
        again, calls = build(labeler, root, train_split, key, cache_dir, monkeypatch)
        assert calls == 0 and torch.equal(again, first)


def test_the_weights_identity_follows_the_file(clip_files):
    path = clip_files['checkpoint']
    before = embedding_cache.embedding_cache_key(dataset='pascal', images=['a'], clip_model='m',
                                                 clip_pretrained=path, image_size=8, clip_size=8)['weights']
    stat = os.stat(path)
    assert before == {'file': str(Path(path).resolve()), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
    _touch(path)
    after = embedding_cache.embedding_cache_key(dataset='pascal', images=['a'], clip_model='m',
                                                clip_pretrained=path, image_size=8, clip_size=8)['weights']
    assert after['mtime_ns'] == before['mtime_ns'] + 5_000_000_000 and after['size'] == before['size']


def test_a_stale_key_file_beside_the_array_is_rebuilt(labeler, root, train_split, clip_files, tmp_path,
                                                      monkeypatch):
    cache_dir = tmp_path / 'cache'
    key = make_key(root, train_split, clip_files)
    first, _ = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    key_file, = data_files(cache_dir, '.json')
    key_file.write_text(json.dumps({**key, 'image_size': 999}, sort_keys=True))  # left by another build
    again, calls = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    assert calls > 0
    assert torch.allclose(again, first, atol=1e-6)
    assert json.loads(key_file.read_text()) == key


# --------------------------------------------------------------------------- interrupted builds


def test_a_build_interrupted_while_embedding_leaves_nothing_and_is_rebuilt(labeler, root, train_split,
                                                                           clip_files, tmp_path, monkeypatch):
    cache_dir = tmp_path / 'cache'
    key = make_key(root, train_split, clip_files)
    with pytest.raises(KeyboardInterrupt):
        build(labeler, root, train_split, key, cache_dir, monkeypatch, fail_at=5)  # during the third batch
    assert data_files(cache_dir, '.npy') == [] and data_files(cache_dir, '.json') == []
    assert not [name for name in cache_files(cache_dir) if 'tmp' in name]
    rebuilt, calls = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    assert calls == 8
    reference, _ = build(labeler, root, train_split, key, tmp_path / 'fresh', monkeypatch)
    assert torch.equal(rebuilt, reference)


def test_a_build_interrupted_before_its_key_file_is_rebuilt(labeler, root, train_split, clip_files, tmp_path,
                                                            monkeypatch):
    """The array is renamed into place, then the key file: a stop in between leaves an array
    without its key, which the next call must not trust."""
    cache_dir = tmp_path / 'cache'
    key = make_key(root, train_split, clip_files)
    real_replace = os.replace

    def replace_array_only(src, dst):
        if str(dst).endswith('.json'):
            raise KeyboardInterrupt('stopped between the array and its key file')
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', replace_array_only)
    with pytest.raises(KeyboardInterrupt):
        build(labeler, root, train_split, key, cache_dir, monkeypatch)
    monkeypatch.setattr(os, 'replace', real_replace)
    assert len(data_files(cache_dir, '.npy')) == 1 and data_files(cache_dir, '.json') == []
    # Poison the orphaned array: if it were used, the values below would be zeros.
    npy, = data_files(cache_dir, '.npy')
    np.save(npy, np.zeros((len(train_split), 2, 32), dtype=np.float32))
    rebuilt, calls = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    assert calls == 8
    assert torch.allclose(rebuilt.norm(dim=-1), torch.ones(len(train_split), 2), atol=1e-5)
    assert json.loads(npy.with_suffix('.json').read_text()) == key


def test_an_interrupted_array_write_keeps_no_partial_file(labeler, root, train_split, clip_files, tmp_path,
                                                          monkeypatch):
    cache_dir = tmp_path / 'cache'
    key = make_key(root, train_split, clip_files)
    real_save = np.save

    def half_save(handle, array, **kwargs):
        handle.write(b'\x93NUMPY partial')
        raise KeyboardInterrupt('stopped while writing the array')

    monkeypatch.setattr(np, 'save', half_save)
    with pytest.raises(KeyboardInterrupt):
        build(labeler, root, train_split, key, cache_dir, monkeypatch)
    monkeypatch.setattr(np, 'save', real_save)
    assert cache_files(cache_dir) == []  # the temporary file was removed, nothing else was written
    _, calls = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    assert calls == 8


@pytest.mark.parametrize('keep', [0.0, 0.01, 0.3, 0.99])
def test_a_truncated_array_with_its_key_file_is_rebuilt(keep, labeler, root, train_split, clip_files, tmp_path,
                                                        monkeypatch):
    cache_dir = tmp_path / 'cache'
    key = make_key(root, train_split, clip_files)
    first, _ = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    npy, = data_files(cache_dir, '.npy')
    data = npy.read_bytes()
    npy.write_bytes(data[:int(keep * len(data))])
    rebuilt, calls = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    assert calls == 8
    assert torch.allclose(rebuilt, first, atol=1e-6)
    assert npy.read_bytes() == data or np.allclose(np.load(npy), first.numpy(), atol=1e-6)


def test_an_array_of_the_wrong_shape_is_rebuilt(labeler, root, train_split, clip_files, tmp_path, monkeypatch):
    cache_dir = tmp_path / 'cache'
    key = make_key(root, train_split, clip_files)
    first, _ = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    npy, = data_files(cache_dir, '.npy')
    np.save(npy, first.numpy()[:-1])  # one row short, a valid .npy file
    rebuilt, calls = build(labeler, root, train_split, key, cache_dir, monkeypatch)
    assert calls == 8 and rebuilt.shape == first.shape
    assert torch.allclose(rebuilt, first, atol=1e-6)


# --------------------------------------------------------------------------- cached == online


def test_cached_pseudo_labels_equal_online_ones_for_every_row_and_flip(labeler, root, train_split, clip_files,
                                                                      tmp_path, monkeypatch):
    key = make_key(root, train_split, clip_files)
    cache, _ = build(labeler, root, train_split, key, tmp_path / 'cache', monkeypatch)
    train_set = image_dataset.MultiLabelImages(root, train_split, IMAGE_SIZE, train=True)
    positives = negatives = 0
    for row in range(len(train_split)):
        for flip in (False, True):
            item = train_set[(row, flip)]
            assert bool(item['flipped']) == flip and int(item['index']) == row
            image = item['image'][None]  # 1 x 3 x S x S, the training transform's tensor
            online_embedding = labeler.embed(image)
            assert torch.allclose(cache[row, int(flip)][None], online_embedding, atol=1e-5), (row, flip)
            online = labeler(image)
            assert torch.equal(labeler.from_embeddings(cache[row, int(flip)][None]), online), (row, flip)
            positives += int((online == 1).sum())
            negatives += int((online == -1).sum())
    # The comparison is not vacuous: the flip changes the embedding, and both signs of
    # pseudo-label occur (5 negatives per image from partial 0.25) and rows differ.
    assert (cache[:, 0] - cache[:, 1]).abs().amax(dim=1).min() > 1e-3
    assert negatives == 2 * len(train_split) * 5
    assert positives > 0
    assert len({tuple(labeler.from_embeddings(cache[:, 0])[i].tolist()) for i in range(len(train_split))}) > 1


def test_main_clip_cache_source_equals_online_source_on_training_batches(labeler, root, train_split, clip_files,
                                                                        tiny_pascal, tmp_path):
    """The wiring of pseudo_label_policy.build_pseudo_labels: (images, index, flipped) of FlipSampler
    batches give the same pseudo-labels from the cache as from the frozen CLIP."""
    text_path = tmp_path / 'text.npy'
    class_text_features.save_text_features(text_path, labeler.text_features)
    cfg, _ = main_clip.parse_args([
        '-d', 'pascal', '--data-root', str(tiny_pascal), '--cache-dir', str(tmp_path / 'cache'),
        '--results-dir', str(tmp_path / 'results'), '-m', 'small_cnn', '--no-pretrained',
        '--image-size', str(IMAGE_SIZE), '--batch-size', str(BATCH), '--num-workers', '0', '--device', 'cpu',
        '--clip-model', clip_files['config'], '--clip-pretrained', clip_files['checkpoint'],
        '--text-features', str(text_path)])
    splits = datasets.load_splits(tiny_pascal, 'pascal')
    device = torch.device('cpu')
    clip, tokenizer = clip_loading.load_clip(cfg.clip_model, cfg.clip_pretrained)
    sources = {}
    for mode in ('cache', 'online'):
        config = dataclasses.replace(cfg, clip_mode=mode)
        sources[mode], _ = pseudo_label_policy.build_pseudo_labels(config, clip, tokenizer, splits['train'],
                                                                   eval_loader(root, splits['train']), device, 20)
    assert len(data_files(tmp_path / 'cache', '.npy')) == 1
    train_set = image_dataset.MultiLabelImages(root, splits['train'], IMAGE_SIZE, train=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, sampler=image_dataset.FlipSampler(len(train_set), 0),
                                         collate_fn=image_dataset.collate_skipping)
    flips = 0
    for batch in loader:
        args = batch['image'], batch['index'], batch['flipped']
        assert torch.equal(sources['cache'](*args), sources['online'](*args))
        flips += int(batch['flipped'].sum())
    assert 0 < flips < len(train_set)  # both flip states were compared


def test_a_copy_that_keeps_the_times_is_not_embedded_again_and_superseded_caches_go(tmp_path, tiny_clip,
                                                                                     tiny_text_features, caplog):
    """The key held the resolved image folder, so a `cp -a` copy of the data, which --resume accepts as
    the same data, was embedded again into a second full-size file; and every change of the images
    left the old file beside the new one. Now the copy reuses the cache, and a rewritten image replaces
    the file of that lineage (one log line), leaving the cache of another setting alone."""
    from conftest import tiny_run_args, write_pascal_like

    first = write_pascal_like(tmp_path / 'a' / 'data', num_train=12, num_val=4, seed=2)
    copy = tmp_path / 'b' / 'data'
    shutil.copytree(first, copy, copy_function=shutil.copy2)  # what cp -a does: the times are kept
    cache = tmp_path / 'cache'

    def run(root, name, *extra):
        args = tiny_run_args(root, tmp_path, tiny_clip, tiny_text_features, epochs=1) + [
            '-l', 'EM_PL', '--run-name', name, '--cache-dir', str(cache), *extra]
        assert main_clip.main(args) == 0
        return sorted(p.name for p in cache.glob('clip_pascal_*.npy'))

    made = run(first, 'first')
    assert len(made) == 1
    assert run(copy, 'copy') == made  # the same pixels: read from the cache
    image = datasets.image_root(copy, 'pascal') / str(datasets.load_splits(copy, 'pascal')['train'].images[0])
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # rewritten, as far as a stat tells
    with caplog.at_level('INFO', logger='vlpl'):
        rebuilt = run(copy, 'rewritten')
    assert len(rebuilt) == 1 and rebuilt != made
    assert f'embedding cache: removed 1 superseded file of the same dataset, image list and CLIP settings, ' \
           f'whose images or CLIP files changed since ({made[0]};' in caplog.text
    other = run(copy, 'other', '--image-size', '48')  # another setting: its own file, the first one kept
    assert len(other) == 2 and set(rebuilt) < set(other)

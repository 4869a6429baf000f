"""Hostile data (issue 29, round 2): 16-bit and float images, inputs that change under a run, a full
disk while packing, and pack_images.py's workers after a SIGKILL. Each case once gave a wrong result
without a word, a traceback or a bus error; each test here failed on the code before its fix."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_loading
import embedding_cache
import pseudo_label_policy
import datasets
import image_dataset
import image_io
import main_clip
import packs
import predict
from config import UserError
from datasets import DataError
from preproc import generate_observed_labels, pack_images
from pseudo_labeler import PseudoLabeler
from tests.conftest import interrupt_after, tiny_run_args, write_pascal_like
from tests.test_hostile import one_error_line

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def rewrite(path: Path, seed: int) -> None:
    """Other pixels under the same name, with a modification time that surely differs."""
    size = Image.open(path).size
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 7_000_000_000))


def fail_at(call: int, error: BaseException, function):
    """function, except that its call number `call` raises error."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return function(*args, **kwargs)
    return failing


def assert_same_as_a_fresh_pack(data: Path, split, phase: str = 'train') -> None:
    """The pack of `phase` under data equals one packed in one go from a copy of the images."""
    reference = data.parent / 'reference'
    shutil.copytree(data, reference)
    shutil.rmtree(packs.pack_dir(reference, 'pascal'))
    packs.write_pack(reference, 'pascal', phase, split, SIZE)
    assert np.array_equal(np.load(packs.pack_paths(data, 'pascal', phase)[0]),
                          np.load(packs.pack_paths(reference, 'pascal', phase)[0]))


# ----------------------------------------------------------------------------------------------
# 1. 16-bit and float images are scaled by their range, by every reader


def wide_versions(folder: Path, grey: np.ndarray) -> dict[str, Path]:
    """The 8-bit grey picture `grey` saved as L (the reference), 16-bit PNG (I;16), 16-bit big-endian
    TIFF (I;16B), 16-bit PGM (which PIL opens as mode I) and float TIFF in [0, 1] (F)."""
    wide = grey.astype(np.uint16) * 257  # PNG's sample depth scaling from 8 to 16 bits
    paths = {m: folder / f'{m.replace(";", "_")}.{ext}' for m, ext in
             (('L', 'png'), ('I;16', 'png'), ('I;16B', 'tif'), ('I', 'pgm'), ('F', 'tif'))}
    Image.fromarray(grey).save(paths['L'])
    Image.fromarray(wide).save(paths['I;16'])
    Image.fromarray(wide.astype('>u2')).save(paths['I;16B'])
    h, w = grey.shape
    paths['I'].write_bytes(b'P5\n%d %d\n65535\n' % (w, h) + wide.astype('>u2').tobytes())
    Image.fromarray((grey / 255.0).astype(np.float32)).save(paths['F'])
    return paths


def test_16_bit_and_float_images_read_as_their_8_bit_picture_everywhere(tmp_path, tiny_clip):
    grey = np.random.RandomState(0).randint(0, 256, (20, 28)).astype(np.uint8)
    grey[0, :4] = (0, 1, 254, 255)
    paths = wide_versions(tmp_path, grey)
    assert {m: Image.open(p).mode for m, p in paths.items()} == {m: m for m in paths}
    names = [p.name for p in paths.values()]  # the 8-bit reference first

    # Every reader: the training pipeline, predict.py, the packs, the CLIP embedding cache
    split = datasets.Split(np.array(names), np.zeros((len(names), 1), np.float32), np.zeros((len(names), 1), np.float32))
    images = image_dataset.MultiLabelImages(tmp_path, split, SIZE, train=False)
    tensors = [images[i]['image'] for i in range(len(names))]
    assert [torch.equal(t, tensors[0]) for t in tensors] == [True] * len(names)  # old code: white or black
    files = predict.ImageFiles(list(paths.values()), SIZE)
    assert [torch.equal(files[i][1], tensors[0]) for i in range(len(names))] == [True] * len(names)
    pixels = [packs._Resized(images, list(range(len(names))), SIZE, False)[i][1] for i in range(len(names))]
    assert [np.array_equal(p, pixels[0]) for p in pixels] == [True] * len(names)
    clip, _ = clip_loading.load_clip(tiny_clip['config'], tiny_clip['checkpoint'])
    labeler = PseudoLabeler(clip.visual, torch.randn(3, 32))
    key = embedding_cache.embedding_cache_key(dataset='pascal', images=names, clip_model='m',
                                          clip_pretrained=None, image_size=SIZE, clip_size=32)
    loader = torch.utils.data.DataLoader(images, batch_size=len(names), collate_fn=image_dataset.collate_skipping)
    embeddings = embedding_cache.cached_embeddings(labeler, loader, key, tmp_path / 'cache', device='cpu')
    assert [torch.equal(embeddings[i], embeddings[0]) for i in range(len(names))] == [True] * len(names)

    # The rule: exactly the 8-bit picture; 0..65535 maps to 0..255 by round(v / 257), half up
    reference = np.asarray(Image.open(paths['L']).convert('RGB'))
    for mode, path in paths.items():
        assert np.array_equal(np.asarray(image_io.read_rgb(path)), reference), mode
    ramp = tmp_path / 'ramp.png'
    Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256)).save(ramp)
    got = np.asarray(image_io.read_rgb(ramp))[..., 0].reshape(-1).astype(np.int64)
    assert np.array_equal(got, (np.arange(65536) + 128) // 257) and got[32767] == 127 and got[32768] == 128


def test_8_bit_images_read_exactly_as_before(tmp_path):
    rng = np.random.RandomState(1)
    rgb = rng.randint(0, 256, (9, 11, 3)).astype(np.uint8)
    files = {}
    for mode in ('1', 'L', 'P', 'LA', 'RGB', 'RGBA', 'CMYK'):
        img = Image.fromarray(rgb).convert(mode)
        files[mode] = tmp_path / f'{mode}.{"jpg" if mode == "CMYK" else "png"}'
        img.save(files[mode])
    files['JPEG'] = tmp_path / 'rgb.jpg'
    Image.fromarray(rgb).save(files['JPEG'], quality=90)
    for mode, path in files.items():
        with Image.open(path) as img:
            before = np.asarray(img.convert('RGB'))
        assert np.array_equal(np.asarray(image_io.read_rgb(path)), before), mode


def test_images_without_a_range_are_refused_in_one_line_naming_the_file(tmp_path, capsys):
    root = write_pascal_like(tmp_path / 'data', num_train=10, num_val=4, seed=5)
    folder = datasets.image_root(root, 'pascal')
    splits = datasets.load_splits(root, 'pascal', clean_train_labels=True)
    name = str(splits['test'].images[1])
    target = folder / name
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(target, format='TIFF')  # 0..255 floats
    test = image_dataset.MultiLabelImages(folder, splits['test'], SIZE, train=False, dataset='pascal')
    with pytest.raises(DataError) as info:
        test[1]
    assert str(target) in str(info.value) and 'outside [0, 1]' in str(info.value)
    assert image_dataset.MultiLabelImages(folder, splits['test'], SIZE, train=False, skip_bad=True)[1] == {'skipped': 1}
    args = ['-d', 'pascal', '--data-root', str(root), '--image-size', str(SIZE), '--splits', 'test',
            '--num-workers', '0']
    assert pack_images.main(args) == 2
    one_error_line(capsys.readouterr().err, str(target), 'outside [0, 1]', '--skip-bad-images')
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(target, format='TIFF')  # a 32-bit integer image
    with pytest.raises(DataError, match='outside the 16-bit range'):
        test[1]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 2))
    kept, _, skipped = predict.predict_files(model, [target, folder / str(splits['test'].images[0])], SIZE,
                                             progress=False)
    assert kept == [1] and skipped[0][0] == 0 and 'outside the 16-bit range' in skipped[0][1]
    assert f'skipped {target}: ' in capsys.readouterr().err


def test_an_image_over_pils_bomb_limit_is_an_unreadable_image_everywhere(tmp_path, tiny_clip, tiny_text_features,
                                                                          monkeypatch, capsys):
    """PIL's DecompressionBombError is neither OSError nor ValueError: training, packs and the embedding
    cache ended as 'unexpected ... this is a bug'. read_rgb now refuses it as an unusable image: one line
    naming the file, skipped with --skip-bad-images. (PIL's limit is lowered so that a 64 x 64 picture
    crosses it, as a 20,000 x 20,000 one does at the default limit.)"""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # refused above 2000 pixels; the others have 576
    root = write_pascal_like(tmp_path / 'data', num_train=10, num_val=4, seed=5)
    folder = datasets.image_root(root, 'pascal')
    splits = datasets.load_splits(root, 'pascal')
    target = folder / str(splits['train'].images[1])
    Image.new('L', (64, 64)).save(target, format='PNG')
    args = tiny_run_args(root, tmp_path, tiny_clip, tiny_text_features, epochs=1) + ['-l', 'an']
    assert main_clip.main(args) == 2
    one_error_line(capsys.readouterr().err, str(target), 'too large to decode', '--skip-bad-images')
    with pytest.raises(ValueError, match='too large to decode'):  # what every reader takes as unreadable
        image_io.read_rgb(target)
    assert main_clip.main(args + ['--skip-bad-images']) == 0
    assert f'{target}' in capsys.readouterr().err
    pack = ['-d', 'pascal', '--data-root', str(root), '--image-size', str(SIZE), '--splits', 'train',
            '--num-workers', '0']
    assert pack_images.main(pack) == 2
    one_error_line(capsys.readouterr().err, str(target), 'too large to decode')


# ----------------------------------------------------------------------------------------------
# 2. Inputs that change under a run


@pytest.fixture
def interrupted_run(tmp_path, tiny_clip, tiny_text_features, monkeypatch):
    """A 2-epoch run of -l an on a private tiny dataset with the partial-annotation file rps0.5,
    stopped after epoch 1; returns (data root, args, function to resume it)."""
    data = write_pascal_like(tmp_path / 'data', num_train=30, num_val=10, seed=7)
    assert generate_observed_labels.main(['--dataset', 'pascal', '--data-root', str(data), '--scheme', 'rps']) == 0
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=2) + ['-l', 'an', '--observed',
                                                                                      'rps0.5']
    restore = interrupt_after(monkeypatch, 1)
    assert main_clip.main(args) == 130
    restore()
    run_dir = tmp_path / 'results' / 'pascal-rps0.5_an_small_cnn_s0'
    return data, args, lambda *extra: main_clip.main(['--resume', str(run_dir), *extra])


def regenerate_observed(data: Path, tmp_path: Path) -> tuple[list, tuple]:
    """The observed-label file of the run's tag regenerated with another seed: today silent."""
    folder = data / 'pascal'
    labels = np.load(folder / 'formatted_train_labels.npy')
    np.save(folder / 'formatted_train_labels_obs_rps0.5.npy', generate_observed_labels.simulate_rps(labels, 0.5, 3))
    return [], ("formatted_train_labels_obs_rps0.5.npy differs from the run's",)


def rewrite_pictures(data: Path, tmp_path: Path) -> tuple[list, tuple]:
    """A train and a test picture rewritten under their names: today silent."""
    splits = datasets.load_splits(data, 'pascal', observed='rps0.5')
    folder = datasets.image_root(data, 'pascal')
    for k, name in enumerate((splits['train'].images[4], splits['test'].images[2])):
        rewrite(folder / str(name), seed=k)
    return [], ('2 images changed', f'(first: {folder / str(splits["train"].images[4])})')


def other_data(data: Path, tmp_path: Path) -> tuple[list, tuple]:
    """--data-root pointing at another dataset: today an IndexError traceback."""
    other = write_pascal_like(tmp_path / 'other', num_train=36, num_val=10, seed=8)
    np.save(other / 'pascal' / 'formatted_train_labels_obs_rps0.5.npy', generate_observed_labels.simulate_rps(
        np.load(other / 'pascal' / 'formatted_train_labels.npy'), 0.5, 1200))
    return ['--data-root', str(other)], ('formatted_train_images.npy, ', 'train split: 29 images, was 24')


@pytest.mark.parametrize('change', [regenerate_observed, rewrite_pictures, other_data])
def test_resume_stops_in_one_line_when_the_data_changed(change, interrupted_run, tmp_path, capsys):
    data, args, resume = interrupted_run
    extra, needles = change(data, tmp_path)
    capsys.readouterr()
    assert resume(*extra) == 2
    one_error_line(capsys.readouterr().err, *needles, '--init-from')


@pytest.mark.parametrize('what', ['text-features', 'clip-pretrained'])
def test_resume_stops_when_a_file_read_every_epoch_changed(what, tmp_path, tiny_clip, tiny_text_features, monkeypatch,
                                                          capsys):
    """QA round 4: the text features (or the CLIP weights) rewritten in place between the epochs of an
    -l EM_PL run: the resume trained on with the other pseudo-labels (precision 0.64 -> 0.05), and its
    provenance claimed the new file for the whole run. It stops in one line now, config.json untouched."""
    data = write_pascal_like(tmp_path / 'data', num_train=30, num_val=10, seed=7)
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=2) + ['-l', 'EM_PL']
    flag = f'--{what}'
    mine = tmp_path / ('tf.npy' if what == 'text-features' else 'clip.pt')
    shutil.copyfile(args[args.index(flag) + 1], mine)
    args[args.index(flag) + 1] = str(mine)
    restore = interrupt_after(monkeypatch, 1)
    assert main_clip.main(args) == 130
    restore()
    run_dir = tmp_path / 'results' / 'pascal_EM_PL_small_cnn_s0'
    config = (run_dir / 'config.json').read_text()
    if what == 'text-features':
        np.save(mine, np.load(mine)[::-1].copy())
    else:
        state = torch.load(mine, weights_only=True)
        target = state.get('state_dict', state) if isinstance(state, dict) else state
        key = next(k for k, v in target.items() if torch.is_tensor(v) and v.is_floating_point())
        target[key] = target[key] + 0.5
        torch.save(state, mine)
    capsys.readouterr()
    assert main_clip.main(['--resume', str(run_dir)]) == 2
    name = 'text-features' if what == 'text-features' else 'CLIP weights'
    one_error_line(capsys.readouterr().err, f'{name} {mine.resolve()}: sha256 ', 'not the file the run started with',
                   '--init-from')
    assert (run_dir / 'config.json').read_text() == config


def test_resume_continues_on_the_same_data_moved_with_its_times(interrupted_run, tmp_path, capsys):
    data, args, resume = interrupted_run
    moved = tmp_path / 'moved'
    shutil.copytree(data, moved)  # copy2: contents and modification times, as cp -a or rsync -a
    assert resume('--data-root', str(moved)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-3].startswith('Best epoch: ')
    last = torch.load(tmp_path / 'results' / 'pascal-rps0.5_an_small_cnn_s0' / 'last.pt', weights_only=True)
    assert set(last['inputs']['stats']) == {'train', 'val', 'test'} and last['inputs']['stats']['test'].shape == (10, 2)
    config = json.loads((tmp_path / 'results' / 'pascal-rps0.5_an_small_cnn_s0' / 'config.json').read_text())
    assert config['record']['inputs']['images'] == {'train': 24, 'val': 6, 'test': 10}


def test_packs_notice_images_rewritten_after_packing_and_repack_only_those(tmp_path, monkeypatch):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=6, seed=3)
    splits = datasets.load_splits(data, 'pascal', clean_train_labels=True)
    packs.write_pack(data, 'pascal', 'train', splits['train'], SIZE)
    folder = datasets.image_root(data, 'pascal')
    changed = folder / str(splits['train'].images[5])
    rewrite(changed, seed=11)
    fresh = datasets.load_splits(data, 'pascal', clean_train_labels=True)['train']  # stats are taken once per split
    with pytest.raises(DataError, match=f'1 image changed since it was packed \\(first: {changed}\\).*pack_images.py'):
        packs.PackedImages(data, fresh, SIZE, train=False, dataset='pascal', phase='train')  # today: the old pixels
    decoded, original = [], image_io.resized_pixels
    monkeypatch.setattr(image_io, 'resized_pixels', lambda img, size: decoded.append(1) or original(img, size))
    report = packs.write_pack(data, 'pascal', 'train', fresh, SIZE, chunk=4)
    monkeypatch.undo()
    assert '1 changed image re-packed' in report and len(decoded) == 1
    assert_same_as_a_fresh_pack(data, fresh)
    stamp_path = packs.pack_paths(data, 'pascal', 'train')[1]
    assert json.loads(stamp_path.read_text())['image_stats'] == fresh.stats(folder).tolist()
    packs.open_pack(data, 'pascal', 'train', datasets.load_splits(data, 'pascal', clean_train_labels=True)['train'],
                    SIZE)
    # images gone after packing: the pack stands for them
    shutil.rmtree(folder)
    assert packs.PackedImages(data, datasets.load_splits(data, 'pascal')['train'], SIZE, train=False, dataset='pascal',
                              phase='train')[5]['image'].shape == (SIZE, SIZE, 3)


def test_an_interrupted_pack_whose_images_changed_is_packed_again(tmp_path, monkeypatch):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=6, seed=3)
    split = datasets.load_splits(data, 'pascal', clean_train_labels=True)['train']
    monkeypatch.setattr(packs, 'save_json', fail_at(3, KeyboardInterrupt(), packs.save_json))  # after 2 chunks
    with pytest.raises(KeyboardInterrupt):
        packs.write_pack(data, 'pascal', 'train', split, SIZE, chunk=4)
    monkeypatch.undo()
    rewrite(datasets.image_root(data, 'pascal') / str(split.images[1]), seed=4)  # a row already packed
    split = datasets.load_splits(data, 'pascal', clean_train_labels=True)['train']
    assert 'packed again' in packs.write_pack(data, 'pascal', 'train', split, SIZE, chunk=4)  # today: resumed at 8
    assert_same_as_a_fresh_pack(data, split)


def test_a_packed_run_refuses_a_stale_pack_in_one_line(tmp_path, tiny_clip, tiny_text_features, capsys):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=6, seed=3)
    pack = ['-d', 'pascal', '--data-root', str(data), '--image-size', str(SIZE), '--num-workers', '0']
    assert pack_images.main(pack) == 0
    changed = datasets.image_root(data, 'pascal') / str(datasets.load_splits(data, 'pascal')['test'].images[0])
    rewrite(changed, seed=2)
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=1) + ['-l', 'an', '--data-format',
                                                                                     'packed']
    capsys.readouterr()
    assert main_clip.main(args) == 2
    one_error_line(capsys.readouterr().err, 'test.npy: 1 image changed since it was packed', str(changed),
                   'pack_images.py -d pascal --image-size 32')
    assert pack_images.main(pack) == 0
    assert '1 changed image re-packed' in capsys.readouterr().out
    assert main_clip.main(args) == 0


def test_the_embedding_cache_is_rebuilt_for_rewritten_images(tmp_path, tiny_clip, tiny_text_features):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=6, seed=3)
    cfg, _ = main_clip.parse_args(tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features))
    clip, tokenizer = clip_loading.load_clip(cfg.clip_model, cfg.clip_pretrained)
    cache = Path(cfg.cache_dir)

    def embed() -> None:
        splits = datasets.load_splits(data, 'pascal')
        images = image_dataset.MultiLabelImages(datasets.image_root(data, 'pascal'), splits['train'], SIZE, train=False)
        loader = torch.utils.data.DataLoader(images, batch_size=8, collate_fn=image_dataset.collate_skipping)
        pseudo_label_policy.build_pseudo_labels(cfg, clip, tokenizer, splits['train'], loader, torch.device('cpu'), 20)
        return splits['train']

    train = embed()
    first, = cache.glob('clip_*.npy')
    old = np.load(first)
    rewrite(datasets.image_root(data, 'pascal') / str(train.images[3]), seed=9)
    embed()  # today: the old pictures' embeddings, silently
    second, = cache.glob('clip_*.npy')  # the old pictures' file is superseded: removed
    assert second != first, 'the cache of the old pictures was used'
    new = np.load(second)
    changed = np.abs(old - new).max(axis=(1, 2)) > 0
    assert changed.tolist() == [i == 3 for i in range(len(train))]


def test_generate_observed_labels_replaces_other_labels_only_with_overwrite(tmp_path, capsys):
    data = write_pascal_like(tmp_path / 'data', num_train=10, num_val=4, seed=1)
    args = ['--dataset', 'pascal', '--data-root', str(data)]
    single = data / 'pascal' / 'formatted_train_labels_obs.npy'
    tagged = data / 'pascal' / 'formatted_train_labels_obs_rps0.5.npy'
    assert generate_observed_labels.main(args + ['--scheme', 'rps']) == 0
    before = {p: p.read_bytes() for p in (single, tagged)}
    capsys.readouterr()
    for extra, path in ((['--seed', '7'], single), (['--scheme', 'rps', '--seed', '7'], tagged)):
        assert generate_observed_labels.main(args + extra) == 2  # today: replaced without a word
        one_error_line(capsys.readouterr().err, f'{path} exists and holds other observed labels', '--overwrite')
        assert path.read_bytes() == before[path]
    # the same labels again: nothing to replace
    assert generate_observed_labels.main(args) == 0
    assert '(unchanged)' in capsys.readouterr().out and single.read_bytes() == before[single]
    assert generate_observed_labels.main(args + ['--scheme', 'rps', '--seed', '7', '--overwrite']) == 0
    assert tagged.read_bytes() != before[tagged]


# ----------------------------------------------------------------------------------------------
# 6. A full disk while packing


@pytest.fixture
def pack_data(tmp_path):
    return write_pascal_like(tmp_path / 'data', num_train=20, num_val=6, seed=3)


def test_reserve_allocates_every_block(tmp_path):
    path = tmp_path / 'sparse'
    path.write_bytes(b'')
    os.truncate(path, 1 << 20)
    assert path.stat().st_blocks * 512 < 1 << 20  # a sparse file holds no blocks
    fd = os.open(path, os.O_RDWR)
    try:
        if not packs.reserve(fd, 1 << 20):
            pytest.skip('this file system cannot allocate ahead')
    finally:
        os.close(fd)
    assert path.stat().st_blocks * 512 >= 1 << 20 and path.stat().st_size == 1 << 20


def test_a_full_disk_at_the_start_of_a_pack_is_one_line(pack_data, monkeypatch, capsys):
    def no_space(fd, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(packs, 'reserve', no_space, raising=False)  # (the old code has no reserve: it ignores this)
    args = ['-d', 'pascal', '--data-root', str(pack_data), '--image-size', str(SIZE), '--splits', 'train',
            '--num-workers', '0']
    assert pack_images.main(args) == 2  # today: the sparse file is accepted, and a later write is a SIGBUS
    one_error_line(capsys.readouterr().err, 'train.npy needs', 'free some space', 'run the same command again')
    assert list(packs.pack_dir(pack_data, 'pascal').iterdir()) == []  # no partial file holding space
    monkeypatch.undo()
    assert pack_images.main(args) == 0


def test_a_full_disk_in_the_middle_keeps_the_rows_and_resumes(pack_data, monkeypatch):
    split = datasets.load_splits(pack_data, 'pascal', clean_train_labels=True)['train']
    part_stamp = packs.partial_paths(pack_data, 'pascal', 'train')[1]
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(part_stamp))
    monkeypatch.setattr(packs, 'save_json', fail_at(3, full, packs.save_json))  # the third chunk's stamp
    with pytest.raises(UserError) as info:  # today: the OSError's traceback
        packs.write_pack(pack_data, 'pascal', 'train', split, SIZE, chunk=4)
    message = str(info.value)
    assert '\n' not in message and 'No space left on device' in message and 'rows packed so far are kept' in message
    assert json.loads(part_stamp.read_text())['rows_done'] == 8
    monkeypatch.undo()
    assert 'resumed at row 8' in packs.write_pack(pack_data, 'pascal', 'train', split, SIZE, chunk=4)
    assert_same_as_a_fresh_pack(pack_data, split)


FULL_DISK = """
import collections, json, shutil, subprocess, sys
from preproc import pack_images
packed, args = sys.argv[1], sys.argv[2:]
subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=32k', 'tmpfs', packed], check=True)
# 1. a sparse partial pack left by an interrupted pack of another image list: its apparent size is not free space
open(packed + '/.train.npy.partial', 'wb').truncate(10**12)
json.dump({'format': 'vlpl-pack-2', 'image_size': 80, 'num_images': 1}, open(packed + '/.train.json.partial', 'w'))
print('status', pack_images.main(args), flush=True)
# 2. the disk fills after the free-space check (here: the check is told of space that is not there)
usage = shutil.disk_usage
shutil.disk_usage = lambda path: collections.namedtuple('usage', 'total used free')(10**12, 0, 10**12)
print('status', pack_images.main(args), flush=True)
shutil.disk_usage = usage
# 3. space freed: the same command packs
subprocess.run(['mount', '-o', 'remount,size=4096k', packed], check=True)
print('status', pack_images.main(args), flush=True)
"""


@pytest.mark.skipif(shutil.which('unshare') is None, reason='needs unshare(1) to mount a small tmpfs')
def test_a_real_full_disk_is_one_line_and_never_a_bus_error(pack_data, tmp_path):
    """A 32 kB tmpfs (in a user and mount namespace: no root needed) for a 307 kB pack, first beside a
    leftover sparse partial file of 1 TB apparent size, then while the free-space check is fooled."""
    packed = packs.pack_dir(pack_data, 'pascal')
    packed.mkdir()
    probe = subprocess.run(['unshare', '-rm', 'sh', '-c', f'mount -t tmpfs -o size=32k tmpfs {packed}'],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs in a user namespace here ({probe.stderr.strip()})')
    args = ['-d', 'pascal', '--data-root', str(pack_data), '--image-size', '80', '--splits', 'train',
            '--num-workers', '0']
    out = subprocess.run(['unshare', '-rm', sys.executable, '-c', FULL_DISK, str(packed), *args], cwd=REPO,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    statuses = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith('status ')]
    assert statuses == [2, 2, 0], f'exit {out.returncode}\n{out.stdout}{out.stderr}'  # today: exit -7 (SIGBUS) at the first
    errors = [line.split('\r')[-1] for line in out.stderr.splitlines() if 'error:' in line]
    assert len(errors) == 2 and 'Traceback' not in out.stderr, out.stderr
    assert all('needs' in e and 'free some space' in e for e in errors), errors
    assert 'train: ' in out.stdout and 'written' in out.stdout


# ----------------------------------------------------------------------------------------------
# 9. pack_images.py's workers die with it


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / 'stat').read_text().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except OSError:
        return False
    return state != 'Z'


BUSY_PARENT = """
import pathlib, sys, time
import packs
from preproc import pack_images
def busy(path, obj, **kwargs):  # the parent stays busy after its first chunk, e.g. flushing to a slow disk
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(3600)
packs.save_json = busy
write_pack = packs.write_pack
packs.write_pack = lambda *args, **kwargs: write_pack(*args, **kwargs, chunk=16)  # 20 chunks of 196 kB
sys.exit(pack_images.main(sys.argv[2:]))
"""


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads /proc')
def test_pack_workers_die_when_pack_images_is_killed(tmp_path):
    """SIGKILL pack_images.py while its workers hold chunks they have not handed over (the parent busy
    with an earlier chunk, so they wait on the result pipe): every worker must go too."""
    data = write_pascal_like(tmp_path / 'data', num_train=400, num_val=4, seed=2, size=16)
    marker = tmp_path / 'first-chunk'
    command = [sys.executable, '-c', BUSY_PARENT, str(marker), '-d', 'pascal', '--data-root', str(data),
               '--image-size', '64', '--splits', 'train', '--num-workers', '2']
    parent = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers = []
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = children_of(parent.pid)
        assert marker.exists() and len(workers) == 2, parent.stderr.read().decode() if parent.poll() else workers
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30  # the DataLoader's own check of its parent runs every 5 s
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), 'a worker outlived the SIGKILLed pack_images.py'
    finally:
        for pid in [parent.pid] + workers:  # the processes this test started, by their ids
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        parent.stderr.close()


def test_fingerprint_hashes_a_lazy_annotation_table_in_blocks_as_the_array_itself(tmp_path):
    """OpenImages' label tables are memory-mapped (label_tables.Annotations): the fingerprint reads
    them block by block, with the digest of the same array held in memory."""
    import fingerprint
    import label_tables

    states = np.random.RandomState(0).randint(-1, 2, size=(9000, 7)).astype(np.int8)
    np.save(tmp_path / 'labels.npy', states)
    table = label_tables.Annotations(np.load(tmp_path / 'labels.npy', mmap_mode='r'), path=tmp_path / 'labels.npy')
    assert fingerprint.digest(table) == fingerprint.digest(states)
    rows = np.array([3, 10, 8999])
    assert fingerprint.digest(table.take(rows)) == fingerprint.digest(states[rows])
    assert fingerprint.digest(table) != fingerprint.digest(states[:-1])

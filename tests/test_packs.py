"""Image packs (--data-format packed): bit-identical tensors, resumable atomic packing, refused
size mixes, and a run that ends with the same lines as the PIL pipeline."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import datasets
import image_dataset
import image_io
import main_clip
import packs
from config import UserError
from datasets import DataError
from preproc import pack_images
from tests.conftest import tiny_run_args, write_pascal_like

SIZE = 32


@pytest.fixture
def data(tmp_path):
    """A fresh tiny pascal-like dataset of 24 x 24 images (resized up to 32) and odd sizes (30 x 20)."""
    root = write_pascal_like(tmp_path / 'data', num_train=20, num_val=6, seed=3)
    from PIL import Image
    folder = datasets.image_root(root, 'pascal')
    rng = np.random.RandomState(1)
    for name in sorted(folder.iterdir())[:5]:  # a few non-square images of other sizes, JPEG-decoded
        Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8)).save(name, format='JPEG')
    return root


def splits_of(root):
    return datasets.load_splits(root, 'pascal', clean_train_labels=True)


def test_packed_tensors_are_bit_identical_to_pil_for_both_flips(data):
    splits = splits_of(data)
    for phase in packs.SPLITS:
        packs.write_pack(data, 'pascal', phase, splits[phase], SIZE)
    root = datasets.image_root(data, 'pascal')
    for phase in packs.SPLITS:
        pil = image_dataset.MultiLabelImages(root, splits[phase], SIZE, train=True)
        packed = packs.PackedImages(data, splits[phase], SIZE, train=True, dataset='pascal', phase=phase)
        keys = [(i, flip) for i in range(len(pil)) for flip in (False, True)]
        reference = torch.stack([pil[k]['image'] for k in keys])
        items = [packed[k] for k in keys]
        batch = torch.utils.data.default_collate(items)
        assert batch['image'].dtype == torch.uint8 and batch['image'].shape == (len(keys), SIZE, SIZE, 3)
        made = image_io.to_model_input(batch['image'], batch['flipped'], torch.device('cpu'))  # byte table
        assert made.dtype == reference.dtype and made.shape == reference.shape and made.is_contiguous()
        assert torch.equal(made, reference)  # bit for bit, flipped and unflipped rows
        # the tensor operations used on a GPU, here on the CPU
        assert torch.equal(image_io._lookup_on_device(batch['image'], batch['flipped']), reference)
    # a float batch (the PIL pipeline) is only moved
    assert image_io.to_model_input(reference, None, 'cpu') is reference


def test_batch_reading_equals_the_items_collated_in_workers_and_with_skipped_rows(data):
    """PackedImages.__getitems__ (the whole batch read at once, in shared memory inside a worker) gives
    what collate_skipping makes of the items, for (row, flip) keys, plain keys (flips drawn in the same
    order) and a batch with a row left out of the pack (--skip-bad-images), with 0 and 1 workers."""
    split = splits_of(data)['train']
    bad = datasets.image_root(data, 'pascal') / str(split.images[3])
    bad.write_bytes(b'not an image')
    packs.write_pack(data, 'pascal', 'train', split, SIZE, skip_bad=True)
    packed = packs.PackedImages(data, split, SIZE, train=True, dataset='pascal', phase='train', skip_bad=True)
    keys = [(i, i % 3 == 0) for i in range(len(split))][::-1]
    expected = [image_dataset.collate_skipping([packed[k] for k in keys[lo:lo + 4]]) for lo in range(0, len(keys), 4)]
    assert any(e['skipped'] == [3] for e in expected)
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(packed, batch_size=4, sampler=keys, num_workers=workers,
                                             collate_fn=image_dataset.collate_skipping)
        got = list(loader)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.keys() == e.keys() and g['skipped'] == e['skipped']
            for name in ('image', 'label_obs', 'label_true', 'index', 'flipped'):
                assert g[name].dtype == e[name].dtype and torch.equal(g[name], e[name]), name
    all_bad = packed.__getitems__([(3, True)])
    assert all_bad == {'skipped': [3]}
    torch.manual_seed(5)
    plain = image_dataset.collate_skipping([packed[i] for i in range(6)])
    torch.manual_seed(5)
    batch = packed.__getitems__(list(range(6)))
    assert torch.equal(batch['flipped'], plain['flipped']) and torch.equal(batch['image'], plain['image'])


def test_pack_resumes_after_an_interrupt(data, monkeypatch):
    split = splits_of(data)['train']
    calls = []
    original = image_io.resized_pixels

    def interrupted(img, size):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return original(img, size)

    monkeypatch.setattr(image_io, 'resized_pixels', interrupted)
    with pytest.raises(KeyboardInterrupt):
        packs.write_pack(data, 'pascal', 'train', split, SIZE, chunk=4)
    array_path, stamp_path = packs.pack_paths(data, 'pascal', 'train')
    part_array, part_stamp = packs.partial_paths(data, 'pascal', 'train')
    assert not array_path.exists() and not stamp_path.exists()  # nothing under the final name
    assert json.loads(part_stamp.read_text())['rows_done'] == 8  # two flushed chunks of 4

    monkeypatch.setattr(image_io, 'resized_pixels', original)
    calls_before = len(calls)
    monkeypatch.setattr(image_io, 'resized_pixels', lambda img, size: calls.append(1) or original(img, size))
    report = packs.write_pack(data, 'pascal', 'train', split, SIZE, chunk=4)
    assert 'resumed at row 8' in report
    assert len(calls) - calls_before == len(split) - 8  # only the rows left
    assert not part_array.exists() and not part_stamp.exists()

    fresh = data.parent / 'fresh'
    shutil.copytree(data, fresh)
    shutil.rmtree(packs.pack_dir(fresh, 'pascal'))
    monkeypatch.setattr(image_io, 'resized_pixels', original)
    packs.write_pack(fresh, 'pascal', 'train', split, SIZE)
    assert np.array_equal(np.load(array_path), np.load(packs.pack_paths(fresh, 'pascal', 'train')[0]))
    assert 'is complete' in packs.write_pack(data, 'pascal', 'train', split, SIZE)


def test_sizes_are_never_mixed(data, capsys):
    split = splits_of(data)['val']
    packs.write_pack(data, 'pascal', 'val', split, SIZE)
    with pytest.raises(UserError, match='holds 32 px images, not 40'):
        packs.write_pack(data, 'pascal', 'val', split, 40)
    with pytest.raises(DataError, match='holds 32 px images but this run uses --image-size 40'):
        packs.open_pack(data, 'pascal', 'val', split, 40)
    # the command line: one line, exit status 2; --overwrite replaces the pack
    assert pack_images.main(['-d', 'pascal', '--data-root', str(data), '--image-size', '40', '--splits', 'val',
                             '--num-workers', '0']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'never mixed' in err
    assert pack_images.main(['-d', 'pascal', '--data-root', str(data), '--image-size', '40', '--splits', 'val',
                             '--num-workers', '0', '--overwrite']) == 0
    assert np.load(packs.pack_paths(data, 'pascal', 'val')[0], mmap_mode='r').shape[1:] == (40, 40, 3)


@pytest.mark.parametrize('damage', [lambda stamp: {k: v for k, v in stamp.items() if k != 'image_size'},
                                    lambda stamp: [1]], ids=['key-missing', 'not-an-object'])
def test_a_damaged_stamp_or_a_cut_pack_is_one_line(data, damage):
    """QA round 4: a stamp edited into other JSON was 'unexpected KeyError' (run) or a traceback
    (pack_images.py), and pack_images.py called a truncated pack complete."""
    split = splits_of(data)['val']
    packs.write_pack(data, 'pascal', 'val', split, SIZE)
    array_path, stamp_path = packs.pack_paths(data, 'pascal', 'val')
    good = stamp_path.read_text()
    stamp_path.write_text(json.dumps(damage(json.loads(good))))
    with pytest.raises(DataError, match=r'is not a pack stamp: run `python preproc/pack_images.py .* --overwrite`$'):
        packs.open_pack(data, 'pascal', 'val', split, SIZE)
    assert packs.write_pack(data, 'pascal', 'val', split, SIZE).startswith('val: ')  # packed again, no traceback
    packs.open_pack(data, 'pascal', 'val', split, SIZE)
    with open(array_path, 'r+b') as f:
        f.truncate(array_path.stat().st_size // 2)
    with pytest.raises(UserError, match=r'is not the complete pack its stamp describes .*--overwrite`$'):
        packs.write_pack(data, 'pascal', 'val', split, SIZE)


def test_unreadable_image_is_one_line_and_skippable(data, capsys):
    split = splits_of(data)['test']
    bad = datasets.image_root(data, 'pascal') / str(split.images[2])
    bad.write_bytes(b'not an image')
    args = ['-d', 'pascal', '--data-root', str(data), '--image-size', str(SIZE), '--splits', 'test']
    assert pack_images.main(args + ['--num-workers', '1']) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if 'error' in line]  # beside the progress bar
    assert len(err) == 1 and err[0].startswith('pack_images.py: error: cannot read image ' + str(bad))
    assert '--skip-bad-images' in err[0]
    assert pack_images.main(args + ['--num-workers', '0', '--skip-bad-images']) == 0
    with pytest.raises(DataError, match='--skip-bad-images'):
        packs.PackedImages(data, split, SIZE, train=False, dataset='pascal', phase='test')
    skipping = packs.PackedImages(data, split, SIZE, train=False, dataset='pascal', phase='test', skip_bad=True)
    assert skipping[2] == {'skipped': 2} and 'image' in skipping[1]


def test_packed_run_ends_with_the_same_lines(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, capsys):
    data = tmp_path / 'data'
    shutil.copytree(tiny_pascal, data)
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=2) + ['-l', 'EM_PL']
    assert main_clip.main(args + ['--run-name', 'packed', '--data-format', 'packed']) == 2  # no pack yet
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'preproc/pack_images.py -d pascal --image-size 32' in err[0]
    assert pack_images.main(['-d', 'pascal', '--data-root', str(data), '--image-size', '32',
                             '--num-workers', '0']) == 0
    capsys.readouterr()
    closing = {}
    for fmt in ('packed', 'pil'):  # packed first: it fills the embedding cache
        assert main_clip.main(args + ['--run-name', fmt, '--data-format', fmt]) == 0
        closing[fmt] = capsys.readouterr().out.strip().splitlines()[-3:]
    assert closing['pil'] == closing['packed'] and closing['pil'][0].startswith('Best epoch: ')
    logs = [json.loads((tmp_path / 'results' / n / 'log.json').read_text()) for n in ('pil', 'packed')]
    assert logs[0]['values'] == logs[1]['values']  # every metric of every epoch
    # --evaluate of the packed run reads the test pack and reproduces the logged test mAP
    capsys.readouterr()
    assert main_clip.main(['--evaluate', str(tmp_path / 'results' / 'packed' / 'best.pt')]) == 0
    assert float(capsys.readouterr().out.strip().split()[-1]) == pytest.approx(logs[1]['best_test_map'], abs=0.005)

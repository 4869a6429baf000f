"""predict.py: rebuild from a checkpoint, label a folder of good, corrupt and non-image files,
thresholds, output formats, and one-line errors for missing, damaged and foreign checkpoints."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_loading
import datasets
import image_dataset
import models
import predict

CLASSNAMES = ['red circle', 'blue square', 'green triangle']
IMAGE_SIZE = 32


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    """A tiny small_cnn checkpoint with the keys training writes (model, config, epoch, classnames)."""
    torch.manual_seed(0)
    model = models.build_classifier('small_cnn', len(CLASSNAMES), pretrained=False)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))  # spread the scores around 0.5
    path = tmp_path_factory.mktemp('ckpt') / 'best.pt'
    torch.save({'model': model.state_dict(), 'epoch': 3, 'classnames': CLASSNAMES,
                'config': {'model': 'small_cnn', 'image_size': IMAGE_SIZE, 'dataset': 'demo', 'loss': 'EM_PL'}}, path)
    return path


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    """Three good images (one in a subfolder, one JPEG), a corrupt JPEG, a truncated PNG, a text file
    and a hidden file."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.RandomState(0)
    (root / 'sub').mkdir()
    for name, size in (('a.png', (40, 30)), ('sub/b.png', (20, 20)), ('c.jpg', (64, 48))):
        Image.fromarray(rng.randint(0, 256, size=(*size, 3)).astype(np.uint8)).save(root / name)
    (root / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
    png = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, size=(50, 50, 3)).astype(np.uint8)).save(png, format='PNG')
    (root / 'truncated.png').write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    (root / 'notes.txt').write_text('not an image\n')
    (root / '.DS_Store').write_bytes(b'\x00\x01')
    return root


GOOD = ['a.png', 'c.jpg', 'sub/b.png']
BAD = ['corrupt.jpg', 'notes.txt', 'truncated.png']


def expected_scores(checkpoint: Path, folder: Path) -> np.ndarray:
    """Scores through the training code's evaluation pipeline (MultiLabelImages, train=False)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    model = models.build_classifier('small_cnn', len(CLASSNAMES), pretrained=False)
    model.load_state_dict(ckpt['model'])
    split = datasets.Split(np.array(GOOD), np.zeros((3, 3), np.float32), np.zeros((3, 3), np.float32))
    images = torch.stack([image_dataset.MultiLabelImages(folder, split, IMAGE_SIZE, train=False)[i]['image']
                          for i in range(3)])
    with torch.no_grad():
        return torch.sigmoid(model.eval()(images)).numpy()


def run(argv, capsys):
    rc = predict.main([*map(str, argv), '--num-workers', '0'])
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip() and 'predict:' not in line]


def test_rebuild_from_checkpoint(checkpoint):
    model, classnames, size = predict.rebuild_from_checkpoint(torch.load(checkpoint, weights_only=True))
    assert classnames == CLASSNAMES and size == IMAGE_SIZE and not model.training
    assert model.head.bias.tolist() == [2.0, 0.0, -2.0]


def test_folder_with_good_corrupt_and_non_image_files(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / 'labels.csv'
    rc, _, err = run([checkpoint, folder, '--output', out, '--batch-size', '2', '--top-k', '2'], capsys)
    assert rc == 0
    skipped = [line for line in err if line.startswith('skipped')]
    assert len(skipped) == 3                                   # one line per bad file, hidden file not listed
    for name, line in zip(BAD, skipped):
        assert line.startswith(f'skipped {folder / name}: not a readable image')
    assert err[-1] == f'3 images labelled -> {out}; 3 files skipped'
    rows = list(csv.DictReader(out.open()))
    assert [r['file'] for r in rows] == [str(folder / name) for name in GOOD]
    assert list(rows[0]) == ['file', 'labels', 'label_scores', 'top1', 'top1_score', 'top2', 'top2_score']
    expected = expected_scores(checkpoint, folder)
    for row, scores in zip(rows, expected):
        order = np.argsort(-scores, kind='stable')
        assert [row['top1'], row['top2']] == [CLASSNAMES[c] for c in order[:2]]
        assert float(row['top1_score']) == pytest.approx(scores[order[0]], abs=6e-5)
        above = [CLASSNAMES[c] for c in order if scores[c] >= 0.5]
        assert row['labels'] == ';'.join(above)


def test_json_output_thresholds_and_batch_size(checkpoint, folder, tmp_path, capsys):
    expected = expected_scores(checkpoint, folder)
    thresholds = tmp_path / 'thresholds.json'
    per_class = [float(expected[:, 0].max()) + 1e-3, 0.0, float(expected[:, 2].min())]
    thresholds.write_text(json.dumps({'classnames': CLASSNAMES, 'thresholds': per_class}))
    results = []
    for batch in ('1', '64'):
        out = tmp_path / f'labels_{batch}.json'
        rc, _, _ = run([checkpoint, folder / 'a.png', folder / 'c.jpg', folder / 'sub', folder / 'notes.txt',
                        '--output', out, '--thresholds', thresholds, '--batch-size', batch], capsys)
        assert rc == 0
        results.append(json.loads(out.read_text()))
    assert results[0]['images'] == results[1]['images']          # batching does not change a score
    data = results[0]
    assert [d['file'] for d in data['skipped']] == [str(folder / 'notes.txt')]
    assert data['thresholds'] == dict(zip(CLASSNAMES, per_class))
    for image, scores in zip(data['images'], expected):
        # class 0 is never above its threshold, class 1 always, class 2 always (its minimum)
        assert [d['class'] for d in image['labels']] == sorted(['blue square', 'green triangle'],
                                                               key=lambda c: -scores[CLASSNAMES.index(c)])
        assert len(image['top_k']) == 3 and image['top_k'][0]['score'] == pytest.approx(scores.max(), abs=1e-6)


def test_stdout_csv_and_threshold_zero(checkpoint, folder, capsys):
    rc, out, _ = run([checkpoint, folder / 'a.png', '--threshold', '0', '--top-k', '0'], capsys)
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 1 and sorted(rows[0]['labels'].split(';')) == sorted(CLASSNAMES)
    assert list(rows[0]) == ['file', 'labels', 'label_scores']


def test_bad_checkpoints_one_line_exit_2(checkpoint, folder, tmp_path, capsys):
    damaged = tmp_path / 'damaged.pt'
    damaged.write_bytes(checkpoint.read_bytes()[:2000])
    foreign = tmp_path / 'foreign.pt'
    torch.save({'state_dict': {'w': torch.zeros(2)}}, foreign)
    executable = tmp_path / 'pickle.pt'
    torch.save({'model': {}, 'config': {'model': 'small_cnn'}, 'x': Path('/')}, executable, _use_new_zipfile_serialization=True)
    text = tmp_path / 'text.pt'
    text.write_text('hello')
    wrong_k = tmp_path / 'wrong_k.pt'
    ckpt = torch.load(checkpoint, weights_only=True)
    torch.save({**ckpt, 'classnames': CLASSNAMES[:2]}, wrong_k)
    cases = {tmp_path / 'missing.pt': 'no such checkpoint', damaged: 'truncated or damaged',
             foreign: 'not a VLPL checkpoint', executable: 'no code in it ran',
             text: 'not a checkpoint (not a PyTorch zip archive)', wrong_k: 'head.weight is 3 x 256 in the file, 2 x 256'}
    for path, message in cases.items():
        rc, out, err = run([path, folder], capsys)
        assert rc == 2 and out == ''
        assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err


def test_user_errors_one_line(checkpoint, folder, tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'only_text').mkdir()
    (tmp_path / 'only_text' / 'a.txt').write_text('x')
    bad_thresholds = tmp_path / 't.json'
    bad_thresholds.write_text(json.dumps({'classnames': ['x', 'y', 'z'], 'thresholds': [0.5] * 3}))
    cases = [([folder / 'nope.png'], 'no such file or folder'),
             ([folder, '--output', tmp_path / 'x.txt'], '.csv or .json'),
             ([folder, '--threshold', '1.5'], '--threshold'),
             ([tmp_path / 'empty'], 'no files'),
             ([tmp_path / 'only_text'], 'none of the 1 files'),
             ([folder, '--thresholds', bad_thresholds], "class names differ")]
    for argv, message in cases:
        rc, out, err = run([checkpoint, *argv], capsys)
        err = [line for line in err if not line.startswith('skipped')]
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_rebuild_clip_vision_without_clip_weights(tiny_clip, tmp_path):
    """clip_vision: the architecture comes from the CLIP config alone, every weight from the checkpoint."""
    clip_model, _ = clip_loading.load_clip(tiny_clip['config'], tiny_clip['checkpoint'])
    torch.manual_seed(1)
    trained = models.build_classifier('clip_vision', 3, clip_model=clip_model).eval()
    ckpt = {'model': trained.state_dict(), 'epoch': 1, 'classnames': CLASSNAMES,
            'config': {'model': 'clip_vision', 'image_size': 40, 'clip_model': tiny_clip['config']}}
    model, classnames, size = predict.rebuild_from_checkpoint(ckpt)
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(images), trained(images))
    assert classnames == CLASSNAMES and size == 40


def test_load_thresholds_npy_and_list(tmp_path):
    np.save(tmp_path / 't.npy', np.array([0.1, 0.2, 0.3]))
    (tmp_path / 't.json').write_text('[0.1, 0.2, 0.3]')
    for name in ('t.npy', 't.json'):
        assert predict.load_thresholds(tmp_path / name, CLASSNAMES).tolist() == [0.1, 0.2, 0.3]
    with pytest.raises(predict.PredictError, match='expected 2 finite numbers'):
        predict.load_thresholds(tmp_path / 't.npy', CLASSNAMES[:2])

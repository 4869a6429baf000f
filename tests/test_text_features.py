"""Tests of the class-name files, text-feature computation/loading and preproc/compute_text_features.py."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import class_text_features
import config
import clip_loading
import pseudo_labeler
import models
from preproc import compute_text_features as cli
from test_models import make_tiny_clip

REPO = Path(__file__).resolve().parents[1]
VLPL_FEATURES = Path(__file__).resolve().parents[2] / 'shared' / 'reference-data' / 'vlpl-text-features'
# (file, dataset, already normalised)
VLPL_FILES = [
    ('VOC20text_feature_labelonly.npy', 'pascal', True),
    ('VOC20text_feature.npy', 'pascal', True),
    ('CoCo80text_feature_labelonly.npy', 'coco', True),
    ('CoCo80text_feature.npy', 'coco', False),
    ('NUS81text_feature.npy', 'nuswide', True),
    ('CUB312text_feature.npy', 'cub', True),
]
NUM_CLASSES = {'pascal': 20, 'coco': 80, 'nuswide': 81, 'cub': 312}


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp('clip')
    config, checkpoint, _ = make_tiny_clip(folder)
    model, tokenizer = clip_loading.load_clip(str(config), str(checkpoint))
    return model, tokenizer, config, checkpoint


# --------------------------------------------------------------------------- class names

@pytest.mark.parametrize('dataset', sorted(NUM_CLASSES))
def test_classname_files_have_one_distinct_name_per_class(dataset):
    lines = (REPO / 'text_features' / f'{dataset}_classnames.txt').read_text(encoding='utf-8').splitlines()
    assert len(lines) == NUM_CLASSES[dataset]
    assert all(line == line.strip() and line for line in lines)
    assert len(set(lines)) == len(lines)
    assert class_text_features.read_classnames(dataset, raw=True) == lines


def test_classname_order_follows_the_formatted_datasets():
    pascal = class_text_features.read_classnames('pascal')
    assert pascal[:3] == ['aeroplane', 'bicycle', 'bird'] and pascal[10] == 'dining table'
    assert pascal[-1] == 'tv monitor'
    coco = class_text_features.read_classnames('coco')  # instances json category order (sorted by id)
    assert coco[:4] == ['person', 'bicycle', 'car', 'motorcycle'] and coco[-1] == 'toothbrush'
    assert coco[coco.index('stop sign') - 1] == 'fire hydrant'
    nus = class_text_features.read_classnames('nuswide')  # Concepts81.txt is alphabetical
    assert nus == sorted(nus) and nus[0] == 'airport' and nus[-1] == 'zebra'


def test_cub_attributes_are_the_312_of_attributes_txt():
    raw = class_text_features.read_classnames('cub', raw=True)
    assert raw[0] == 'has_bill_shape::curved_(up_or_down)'
    assert raw[-1] == 'has_wing_pattern::multi-colored'
    # attribute ids are 1-based line numbers of attributes.txt
    assert raw[10 - 1] == 'has_wing_color::blue'
    assert raw[55 - 1] == 'has_breast_pattern::solid'
    assert raw[136 - 1] == 'has_eye_color::blue' and raw[137 - 1] == 'has_eye_color::brown'  # no iridescent eyes
    assert raw[219 - 1] == 'has_size::small_(5_-_9_in)'
    assert raw[249 - 1] == 'has_primary_color::blue'
    groups = [name.split('::')[0] for name in raw]
    sizes = [groups.count(g) for g in dict.fromkeys(groups)]
    assert len(sizes) == 28
    assert sorted(sizes) == [3, 4, 4, 4, 4, 4, 5, 5, 6, 9, 11, 14, 14] + [15] * 15


def test_cub_attributes_read_as_phrases():
    assert class_text_features.cub_attribute_phrase('has_bill_shape::curved_(up_or_down)') == 'bill shape: curved (up or down)'
    assert class_text_features.cub_attribute_phrase('has_size::very_small_(3_-_5_in)') == 'size: very small (3 - 5 in)'
    assert class_text_features.cub_attribute_phrase('has_upper_tail_color::buff') == 'upper tail color: buff'
    phrases = class_text_features.read_classnames('cub')
    assert phrases[0] == 'bill shape: curved (up or down)' and len(set(phrases)) == 312


def test_unknown_dataset_names_the_missing_file():
    with pytest.raises(models.ModelLoadError, match='no-such-set_classnames.txt'):
        class_text_features.read_classnames('no-such-set')


# --------------------------------------------------------------------------- computing

def test_text_features_are_normalised_and_in_class_order(tiny_clip):
    model, tokenizer, _, _ = tiny_clip
    names = class_text_features.read_classnames('pascal')
    features = class_text_features.compute_text_features(model, tokenizer, names, batch_size=7)  # three batches
    assert features.dtype == torch.float32 and features.shape == (20, 32)
    assert torch.allclose(features.norm(dim=1), torch.ones(20), atol=1e-6)
    for k in (0, 6, 19):
        alone = class_text_features.compute_text_features(model, tokenizer, [names[k]])
        assert torch.allclose(features[k], alone[0], atol=1e-5)


def test_template_is_filled_with_each_class_name(tiny_clip):
    model, tokenizer, _, _ = tiny_clip
    features = class_text_features.compute_text_features(model, tokenizer, ['cat', 'dog'], 'a photo of a {}.')
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokenizer(['a photo of a cat.', 'a photo of a dog.'])), dim=1)
    assert torch.allclose(features, expected, atol=1e-6)
    plain = class_text_features.compute_text_features(model, tokenizer, ['cat', 'dog'])
    assert not torch.allclose(features, plain, atol=1e-3)
    with pytest.raises(ValueError, match='template'):
        class_text_features.compute_text_features(model, tokenizer, ['cat'], 'a photo')


def test_a_template_cut_before_the_class_name_is_refused(tiny_clip):
    """QA round 4: a template longer than the CLIP's context was cut before '{}', every class got the same
    text feature, and the run trained on pseudo-labels of precision 0 without a word."""
    model, tokenizer, _, _ = tiny_clip
    names = ['cat', 'dog', 'bird']
    long = ' '.join(['word'] * 80) + ' {}'
    features = class_text_features.compute_text_features(model, tokenizer, names, long)
    with pytest.raises(config.ModelLoadError, match=r"3 classes \('cat', 'dog', 'bird'\) get the same text feature: .*"
                                                    r"context length.*: shorten its templates"):
        class_text_features.refuse_identical_rows(features, names, 'shorten its templates')
    class_text_features.refuse_identical_rows(class_text_features.compute_text_features(model, tokenizer, names),
                                              names, 'x')  # distinct names: no error


def test_default_file_names():
    path = class_text_features.default_text_features_path
    folder = Path(class_text_features.__file__).parent / 'text_features'  # the repository's, wherever the test runs from
    assert path('pascal', 'ViT-L-14-336', 'openai') == folder / 'pascal_ViT-L-14-336_openai.npy'
    assert path('demo', 'preproc/clip_configs/vlpl-demo-tiny.json', 'data/demo/clip/vlpl-demo-tiny.pt') == \
        folder / 'demo_vlpl-demo-tiny_vlpl-demo-tiny.npy'
    assert path('cub', 'hf-hub:org/model', None) == folder / 'cub_hf-hub-org-model_random.npy'
    digest = hashlib.sha1('a photo of a {}.'.encode()).hexdigest()[:8]
    assert path('coco', 'ViT-B-32', 'openai', 'a photo of a {}.', folder='out') == \
        Path(f'out/coco_ViT-B-32_openai_t{digest}.npy')


# --------------------------------------------------------------------------- saving and loading

def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    path = class_text_features.save_text_features(tmp_path / 'sub' / 'f.npy', torch.from_numpy(rows))
    assert path == tmp_path / 'sub' / 'f.npy' and sorted(p.name for p in path.parent.iterdir()) == ['f.npy']
    loaded = class_text_features.load_text_features(path, 5)
    assert loaded.dtype == torch.float32
    np.testing.assert_array_equal(loaded.numpy(), rows)  # normalised rows are kept bit for bit


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = class_text_features.save_text_features(tmp_path / 'f.npy', np.eye(3, dtype=np.float32))

    def disk_full(*args, **kwargs):
        raise OSError('No space left on device')

    monkeypatch.setattr(np, 'save', disk_full)
    with pytest.raises(OSError):
        class_text_features.save_text_features(path, np.ones((3, 3), dtype=np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.eye(3))
    assert [p.name for p in tmp_path.iterdir()] == ['f.npy']


def test_load_normalises_rows_and_checks_the_file(tmp_path):
    raw = np.array([[3.0, 4.0], [0.0, 2.0]])  # float64, unnormalised
    np.save(tmp_path / 'raw.npy', raw)
    loaded = class_text_features.load_text_features(tmp_path / 'raw.npy', 2)
    assert loaded.dtype == torch.float32
    np.testing.assert_allclose(loaded.numpy(), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)

    with pytest.raises(models.ModelLoadError) as err:
        class_text_features.load_text_features(tmp_path / 'raw.npy', 20)
    assert '2 rows' in str(err.value) and '20 classes' in str(err.value)
    with pytest.raises(models.ModelLoadError, match='compute_text_features.py'):
        class_text_features.load_text_features(tmp_path / 'missing.npy', 2)
    np.save(tmp_path / 'flat.npy', np.ones(4))
    with pytest.raises(models.ModelLoadError, match='K x D'):
        class_text_features.load_text_features(tmp_path / 'flat.npy', 4)
    np.save(tmp_path / 'objects.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
    with pytest.raises(models.ModelLoadError, match='objects.npy'):
        class_text_features.load_text_features(tmp_path / 'objects.npy', 1)
    np.save(tmp_path / 'zero.npy', np.zeros((2, 3)))
    with pytest.raises(models.ModelLoadError, match='all-zero'):
        class_text_features.load_text_features(tmp_path / 'zero.npy', 2)


@pytest.mark.skipif(not VLPL_FEATURES.is_dir(), reason=f'published VLPL text features not found at {VLPL_FEATURES}')
@pytest.mark.parametrize('name,dataset,normalised', VLPL_FILES)
def test_published_vlpl_text_features_load(name, dataset, normalised):
    path = VLPL_FEATURES / name
    stored = np.load(path)
    features = class_text_features.load_text_features(path, NUM_CLASSES[dataset])
    assert features.shape == (NUM_CLASSES[dataset], 768) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=1), torch.ones(len(features)), atol=1e-5)
    if normalised:
        np.testing.assert_array_equal(features.numpy(), stored)  # exactly what the original used
    else:
        assert np.linalg.norm(stored, axis=1).min() > 14  # CoCo80text_feature.npy: norms 14.6 to 18.7
        np.testing.assert_allclose(features.numpy(), stored / np.linalg.norm(stored, axis=1, keepdims=True),
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(models.ModelLoadError):
        class_text_features.load_text_features(path, NUM_CLASSES[dataset] + 1)


@pytest.mark.skipif(not VLPL_FEATURES.is_dir(), reason=f'published VLPL text features not found at {VLPL_FEATURES}')
@pytest.mark.parametrize('name', ['VOC20text_feature_labelonly.npy', 'CoCo80text_feature_labelonly.npy'])
def test_each_published_class_embedding_pseudo_labels_its_own_class(name):
    features = class_text_features.load_text_features(VLPL_FEATURES / name, 20 if name.startswith('VOC') else 80)
    labels = pseudo_labeler.pseudo_labels(features, features, temp=0.01, threshold=0.3)
    assert torch.equal(labels.diagonal(), torch.ones(len(features)))


# --------------------------------------------------------------------------- command line

def test_cli_writes_normalised_features(tiny_clip, tmp_path, capsys):
    model, tokenizer, config, checkpoint = tiny_clip
    out = tmp_path / 'pascal.npy'
    argv = ['--dataset', 'pascal', '--clip-model', str(config), '--clip-pretrained', str(checkpoint),
            '--output', str(out)]
    assert cli.main(argv) == 0
    assert str(out) in capsys.readouterr().out
    expected = class_text_features.compute_text_features(model, tokenizer, class_text_features.read_classnames('pascal'))
    np.testing.assert_allclose(class_text_features.load_text_features(out, 20).numpy(), expected.numpy(), atol=1e-6)


def test_cli_errors_are_one_line_and_keep_old_output(tiny_clip, tmp_path, capsys):
    _, _, config, _ = tiny_clip
    out = tmp_path / 'pascal.npy'
    out.write_bytes(b'old')
    argv = ['--dataset', 'pascal', '--clip-model', str(config), '--clip-pretrained', str(tmp_path / 'no.pt'),
            '--output', str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'no.pt' in err and '--clip-pretrained' in err
    assert out.read_bytes() == b'old'
    assert cli.main(argv[:4] + ['--template', 'no placeholder', '--output', str(out)]) == 2
    assert 'template' in capsys.readouterr().err


def test_cli_runs_as_a_script():
    result = subprocess.run([sys.executable, 'preproc/compute_text_features.py', '--help'], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and '--clip-pretrained' in result.stdout and 'default: openai' in result.stdout

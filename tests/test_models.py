"""Tests of models.py, backbones.py and trunks.py: backbones, CLIP loading through open_clip, pseudo-labels
(docs/original-vlpl.md sections 6-7).

CLIP is a tiny random open_clip model saved to a temporary checkpoint and loaded back through
load_clip, the code path of a real checkpoint. No weights are downloaded: failed downloads are
simulated by monkeypatching the download functions.
"""
from __future__ import annotations

import json
import math
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backbones
import class_text_features
import clip_loading
import pseudo_labeler
import models

# embed_dim 32, 32 px images in 8 px patches, 2 layers of width 64 in both towers.
TINY_CLIP_CONFIG = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 64, 'layers': 2, 'head_width': 32},
    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 2},
}


def make_tiny_clip(folder: Path, name: str = 'tiny-test-clip') -> tuple[Path, Path, dict]:
    """Write the tiny config and a random checkpoint (torch.save of its state dict) to folder."""
    import open_clip

    config = folder / f'{name}.json'
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    checkpoint = folder / f'{name}.pt'
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    """(model, tokenizer, config path, checkpoint path, saved state dict), loaded via load_clip."""
    folder = tmp_path_factory.mktemp('clip')
    config, checkpoint, state = make_tiny_clip(folder)
    model, tokenizer = clip_loading.load_clip(str(config), str(checkpoint))
    return model, tokenizer, config, checkpoint, state


def assert_one_line(message: str, *needles: str) -> None:
    assert '\n' not in message
    for needle in needles:
        assert needle in message, (needle, message)


# --------------------------------------------------------------------------- load_clip

def test_load_clip_restores_the_saved_weights(tiny_clip):
    model, tokenizer, _, _, state = tiny_clip
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not model.training
    assert clip_loading.clip_image_size(model) == 32
    assert tokenizer(['a cat']).shape == (1, 77)


def test_load_clip_finds_a_config_by_name_in_clip_configs(tiny_clip, tmp_path, monkeypatch):
    _, _, config, checkpoint, state = tiny_clip
    (tmp_path / 'shipped-tiny.json').write_text(config.read_text())
    monkeypatch.setattr(clip_loading, "CLIP_CONFIG_DIR", tmp_path)
    model, _ = clip_loading.load_clip('shipped-tiny', str(checkpoint))
    assert torch.equal(model.visual.proj, state['visual.proj'])


def test_load_clip_random_init_and_bad_names(tiny_clip, tmp_path):
    _, _, config, _, state = tiny_clip
    model, _ = clip_loading.load_clip(str(config), None)
    assert model.visual.proj.shape == state['visual.proj'].shape
    with pytest.raises(models.ModelLoadError) as err:
        clip_loading.load_clip('no-such-clip-model', None)
    assert_one_line(str(err.value), 'no-such-clip-model', '--clip-model')
    with pytest.raises(models.ModelLoadError) as err:
        clip_loading.load_clip(str(config), str(tmp_path / 'missing.pt'))
    assert_one_line(str(err.value), 'missing.pt', '--clip-pretrained')
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'embed_dim': 8}))
    with pytest.raises(models.ModelLoadError) as err:
        clip_loading.load_clip(str(bad), None)
    assert_one_line(str(err.value), 'bad.json', 'vision_cfg')
    with pytest.raises(models.ModelLoadError) as err:
        clip_loading.load_clip('ViT-B-32', 'no-such-tag')
    assert_one_line(str(err.value), 'no-such-tag', '--clip-pretrained PATH')


def test_load_clip_wrong_checkpoint_is_a_clear_error(tiny_clip, tmp_path):
    _, _, config, _, state = tiny_clip
    broken = tmp_path / 'broken.pt'
    torch.save({k: v for k, v in state.items() if not k.startswith('visual.')}, broken)
    with pytest.raises(models.ModelLoadError) as err:
        clip_loading.load_clip(str(config), str(broken))
    assert_one_line(str(err.value), 'broken.pt', '--clip-pretrained')


def test_failed_clip_download_names_the_flag(monkeypatch):
    import open_clip.factory

    def no_network(*args, **kwargs):
        raise OSError('Temporary failure in name resolution')

    monkeypatch.setattr(open_clip.factory, 'download_pretrained', no_network)
    with pytest.raises(models.ModelLoadError) as err:
        clip_loading.load_clip('ViT-B-32', 'openai')
    assert_one_line(str(err.value), 'failed', '--clip-pretrained PATH', 'ViT-B-32')


def test_openai_tags_get_quickgelu(monkeypatch):
    """open_clip 3 builds 'ViT-L-14-336' with GELU and only warns for the QuickGELU 'openai' tag."""
    import open_clip

    seen = {}

    def fake_create_model(name, **kwargs):
        seen.update(kwargs, name=name)
        raise OSError('stop before downloading')

    monkeypatch.setattr(open_clip, 'create_model', fake_create_model)
    with pytest.raises(models.ModelLoadError):
        clip_loading.load_clip('ViT-L-14-336', 'openai')
    assert seen['name'] == 'ViT-L-14-336' and seen['pretrained'] == 'openai'
    assert seen['force_quick_gelu'] is True


def test_torchscript_checkpoint_goes_to_the_openai_loader(tiny_clip, tmp_path, monkeypatch):
    import open_clip

    model, _, config, _, _ = tiny_clip
    archive = tmp_path / 'openai-like.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # torch.jit.script: we only need an archive
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(archive))
    calls = []
    monkeypatch.setattr(open_clip, 'load_openai_model',
                        lambda path, **kwargs: calls.append((path, kwargs)) or model)
    loaded, _ = clip_loading.load_clip(str(config), str(archive))
    assert loaded is model and calls == [(str(archive), {'precision': 'fp32', 'device': torch.device('cpu')})]


# --------------------------------------------------------------------------- backbones

def test_backbone_table():
    assert set(backbones.BACKBONES) == {'resnet50', 'clip_vision', 'convnext_xlarge_22k', 'convnext_xlarge_1k',
                                     'small_cnn', 'resnet101', 'tresnet_m', 'tresnet_l', 'swin_large'}
    with pytest.raises(ValueError, match='unknown backbone'):
        models.build_classifier('vgg', 3)


@pytest.mark.parametrize('name', ['resnet50', 'small_cnn'])
def test_cnn_output_shapes_batch_1_and_2(name):
    torch.manual_seed(0)
    model = models.build_classifier(name, 7, pretrained=False).eval()
    with torch.no_grad():
        for batch in (1, 2):
            assert model(torch.randn(batch, 3, 64, 64)).shape == (batch, 7)
        x = torch.randn(2, 3, 64, 64)
        expected = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        assert torch.allclose(model_cl(x.to(memory_format=torch.channels_last)), expected, atol=1e-4)
    assert model.head.in_features == {'resnet50': 2048, 'small_cnn': 256}[name]


def test_small_cnn_trains():
    torch.manual_seed(0)
    model = models.build_classifier('small_cnn', 3)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 2, (8, 3)).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize('name', ['convnext_xlarge_22k', 'convnext_xlarge_1k'])
def test_convnext_output_shapes_on_meta_device(name):
    # Real ConvNeXt-XL (350M parameters) built on the meta device: shapes without 20 s of init.
    with torch.device('meta'):
        model = models.build_classifier(name, 5, pretrained=False)
        for batch in (1, 2):
            assert model(torch.randn(batch, 3, 32, 32)).shape == (batch, 5)
    assert model.head.in_features == 2048


def test_convnext_rows_ask_timm_for_the_reference_models(timm_calls, tmp_path):
    weights = tmp_path / 'convnext.safetensors'
    weights.write_bytes(b'x')
    models.build_classifier('convnext_xlarge_22k', 4)
    models.build_classifier('convnext_xlarge_1k', 4, weights_path=weights)
    assert timm_calls == [
        ('convnext_xlarge.fb_in22k', {'pretrained': True, 'num_classes': 0}),
        ('convnext_xlarge.fb_in22k_ft_in1k',
         {'pretrained': True, 'num_classes': 0, 'pretrained_cfg_overlay': {'file': str(weights)}}),
    ]


def test_failed_backbone_downloads_name_the_flags(monkeypatch):
    import timm
    import torchvision.models._api

    def no_network(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')

    monkeypatch.setattr(torchvision.models._api, 'load_state_dict_from_url', no_network)
    monkeypatch.setattr(timm, 'create_model', no_network)
    for name in ('resnet50', 'convnext_xlarge_22k', 'convnext_xlarge_1k'):
        with pytest.raises(models.ModelLoadError) as err:
            models.build_classifier(name, 3)
        assert_one_line(str(err.value), 'failed', '--backbone-weights PATH', '--no-pretrained')


def test_resnet50_from_a_local_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet50(weights=None)
    path = tmp_path / 'resnet50.pth'
    torch.save(source.state_dict(), path)
    model = models.build_classifier('resnet50', 3, weights_path=path)
    trunk = model.trunk.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith('fc.'):
            assert torch.equal(trunk[key], value), key
    with pytest.raises(models.ModelLoadError) as err:
        models.build_classifier('resnet50', 3, weights_path=tmp_path / 'missing.pth')
    assert_one_line(str(err.value), 'missing.pth', '--backbone-weights')
    torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'wrong.pth')
    with pytest.raises(models.ModelLoadError) as err:
        models.build_classifier('resnet50', 3, weights_path=tmp_path / 'wrong.pth')
    assert_one_line(str(err.value), 'wrong.pth', '--backbone-weights')
    with pytest.raises(models.ModelLoadError, match='contradict'):
        models.build_classifier('resnet50', 3, pretrained=False, weights_path=path)


def test_clip_vision_is_a_trainable_copy_with_a_head_on_the_projected_embedding(tiny_clip):
    clip, _, _, _, _ = tiny_clip
    torch.manual_seed(0)
    model = models.build_classifier('clip_vision', 6, clip_model=clip)
    assert model.head.in_features == 32
    assert all(p.requires_grad for p in model.parameters())
    clip_params = {id(p) for p in clip.parameters()}
    assert not any(id(p) in clip_params for p in model.parameters())
    x = torch.randn(2, 3, 48, 48)  # resized to 32 inside
    with torch.no_grad():
        for batch in (1, 2):
            assert model(x[:batch]).shape == (batch, 6)
        expected = model.head(clip.visual(clip_loading.resize_for_clip(x, 32)))
        assert torch.allclose(model(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match='clip_model'):
        models.build_classifier('clip_vision', 6)


# --------------------------------------------------------------------------- resize

def test_resize_for_clip_equals_the_original_per_image_resize():
    from torchvision import transforms

    torch.manual_seed(0)
    x = torch.randn(3, 3, 56, 56)
    original = torch.stack([transforms.Resize((24, 24))(img) for img in x])
    assert torch.equal(clip_loading.resize_for_clip(x, 24), original)
    assert torch.equal(clip_loading.resize_for_clip(x, 24),
                       F.interpolate(x, size=(24, 24), mode='bilinear', align_corners=False, antialias=True))


# --------------------------------------------------------------------------- pseudo-labels

def softmax(values, temp):
    exps = [math.exp(v / temp) for v in values]
    return [e / sum(exps) for e in exps]


def labels_for(similarities, temp=0.01, threshold=0.3, partial=0.0):
    """pseudo_labels on a given similarity matrix: identity text features make e @ T.T = e."""
    sims = torch.as_tensor(similarities, dtype=torch.float32)
    return pseudo_labeler.pseudo_labels(sims, torch.eye(sims.shape[1]), temp, threshold, partial)


def test_pseudo_labels_threshold_and_temperature_by_hand():
    sims = [[0.30, 0.25, 0.10, 0.00]]
    s = softmax(sims[0], 0.1)  # [0.558, 0.339, 0.076, 0.028]
    assert s[1] > 0.3 > s[2] and 0.4 < s[0]
    assert labels_for(sims, temp=0.1, threshold=0.3).tolist() == [[1, 1, 0, 0]]
    assert labels_for(sims, temp=0.1, threshold=0.4).tolist() == [[1, 0, 0, 0]]
    assert max(softmax(sims[0], 1.0)) < 0.3  # a high temperature flattens s below the threshold
    assert labels_for(sims, temp=1.0, threshold=0.3).tolist() == [[0, 0, 0, 0]]
    assert labels_for(sims, temp=0.01).tolist() == [[1, 0, 0, 0]]  # exp(5): the top class takes it all


def test_pseudo_labels_threshold_is_strict():
    assert labels_for([[0.2, 0.2]], temp=1.0, threshold=0.5).tolist() == [[0, 0]]
    assert labels_for([[0.2, 0.2]], temp=1.0, threshold=0.49).tolist() == [[1, 1]]


def test_pseudo_labels_partial_negatives():
    sims = [[0.30, 0.25, 0.10, 0.00]]
    assert labels_for(sims, temp=0.1, partial=0.5).tolist() == [[1, 1, -1, -1]]  # int(2.0) = 2
    assert labels_for(sims, temp=0.1, partial=0.3).tolist() == [[1, 1, 0, -1]]   # int(1.2) = 1
    assert labels_for(sims, temp=0.1, partial=0.24).tolist() == [[1, 1, 0, 0]]   # int(0.96) = 0
    # int() truncates the float product as the original does: 0.29 * 100 = 28.999999999999996
    many = torch.arange(100, dtype=torch.float32)[None] / 100
    assert (labels_for(many, temp=1.0, partial=0.29) == -1).sum() == 28
    assert (labels_for(many, temp=1.0, partial=0.3) == -1).sum() == 30
    # negatives are written after positives: a positive among the smallest becomes -1
    assert labels_for([[0.20, 0.25]], temp=1.0, threshold=0.3, partial=0.5).tolist() == [[-1, 1]]


def test_pseudo_labels_ties_go_to_the_lower_class_index():
    assert labels_for([[0.0] * 5], temp=1.0, threshold=0.5, partial=0.4).tolist() == [[-1, -1, 0, 0, 0]]
    assert labels_for([[0.0, 1.0, 0.0, 0.5, 0.0]], temp=1.0, threshold=0.9, partial=0.4).tolist() == \
        [[-1, 0, -1, 0, 0]]


def test_pseudo_labels_never_exceed_one_over_threshold_positives():
    torch.manual_seed(0)
    # Three equal top similarities: s = 1/3 each at low temperature, the most 0.3 allows.
    assert labels_for([[0.9, 0.9, 0.9, 0.1, 0.0]], temp=0.01, threshold=0.3).tolist() == [[1, 1, 1, 0, 0]]
    emb = F.normalize(torch.randn(200, 16), dim=1)
    text = F.normalize(torch.randn(30, 16), dim=1)
    for threshold in (0.05, 0.1, 0.2, 0.25, 0.3, 0.5):
        for temp in (0.001, 0.01, 0.1, 1.0):
            positives = (pseudo_labeler.pseudo_labels(emb, text, temp, threshold) == 1).sum(1)
            assert positives.max() <= math.floor(1 / threshold)


def test_pseudo_labels_match_a_numpy_reference():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    text = rng.normal(size=(10, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    logits = emb.astype(np.float64) @ text.T.astype(np.float64) / 0.05
    s = np.exp(logits - logits.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    expected = (s > 0.2).astype(np.float32)
    lowest = np.argsort(s, axis=1, kind='stable')[:, :int(0.3 * 10)]
    np.put_along_axis(expected, lowest, -1.0, axis=1)
    got = pseudo_labeler.pseudo_labels(torch.from_numpy(emb), torch.from_numpy(text), 0.05, 0.2, 0.3)
    assert got.dtype == torch.float32 and got.shape == (50, 10)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_pseudo_labels_reject_bad_input():
    with pytest.raises(ValueError, match='width'):
        pseudo_labeler.pseudo_labels(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match='partial'):
        pseudo_labeler.pseudo_labels(torch.zeros(2, 3), torch.zeros(4, 3), partial=1.5)
    with pytest.raises(ValueError, match='temperature'):
        pseudo_labeler.pseudo_labels(torch.zeros(2, 3), torch.zeros(4, 3), temp=0.0)


def test_pseudo_labeler_is_frozen_and_embeddings_give_the_image_labels(tiny_clip):
    clip, tokenizer, config, checkpoint, _ = tiny_clip
    clip, tokenizer = clip_loading.load_clip(str(config), str(checkpoint))  # a private copy to freeze
    text = class_text_features.compute_text_features(clip, tokenizer, ['cat', 'dog', 'car', 'tree'])
    labeler = pseudo_labeler.PseudoLabeler(clip.visual, text * 3.0, temp=0.05, threshold=0.25, partial=0.5)
    labeler.train()
    assert not labeler.visual.training
    assert not any(p.requires_grad for p in labeler.parameters())
    assert torch.allclose(labeler.text_features, text, atol=1e-6)
    assert 'text_features' not in labeler.state_dict()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 48, 48, requires_grad=True)
    emb = labeler.embed(x)
    assert emb.shape == (3, 32) and not emb.requires_grad
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    with torch.no_grad():
        expected = F.normalize(clip.visual(clip_loading.resize_for_clip(x, 32)), dim=-1)
    assert torch.allclose(emb, expected, atol=1e-6)
    labels = labeler(x)
    assert torch.equal(labeler.from_embeddings(emb), labels)
    assert torch.equal(labels, pseudo_labeler.pseudo_labels(emb, text, 0.05, 0.25, 0.5))
    assert ((labels == -1).sum(1) == 2).all()
    assert labeler(x[:1]).shape == (1, 4)

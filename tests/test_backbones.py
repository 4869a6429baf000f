"""The seed systems' backbones through timm (backbones.BACKBONES rows resnet101, tresnet_m, tresnet_l,
swin_large) and -m timm:NAME for any timm model: what timm is asked for, the pooled vector and the
feature map each gives, local weights files, offline use. Tiny timm models at small inputs (random
weights); the full-size rows are built on the meta device (shapes without initialisation)."""
import pytest
import timm
import torch

import backbones
import main_clip
import models
from config import ModelLoadError, default_run_name


def test_rows_ask_timm_for_the_seed_systems_models(timm_calls, tmp_path):
    weights = tmp_path / 'w.pth'
    weights.write_bytes(b'x')
    for name in ('resnet101', 'tresnet_m', 'tresnet_l', 'swin_large'):
        models.build_classifier(name, 4, image_size=448)
    models.build_classifier('swin_large', 4, weights_path=weights)  # image_size None: timm's own (384)
    models.build_classifier('timm:vit_tiny_patch16_224', 4, pretrained=False, image_size=64)
    assert timm_calls == [
        ('resnet101.tv_in1k', {'pretrained': True, 'num_classes': 0}),
        ('tresnet_m.miil_in21k', {'pretrained': True, 'num_classes': 0}),
        ('tresnet_l.miil_in1k_448', {'pretrained': True, 'num_classes': 0}),
        ('swin_large_patch4_window12_384.ms_in22k', {'pretrained': True, 'num_classes': 0, 'img_size': 448}),
        ('swin_large_patch4_window12_384.ms_in22k',
         {'pretrained': True, 'num_classes': 0, 'pretrained_cfg_overlay': {'file': str(weights)}}),
        ('vit_tiny_patch16_224', {'pretrained': False, 'num_classes': 0, 'img_size': 64}),
    ]
    assert backbones.BACKBONES['swin_large'].image_size == 384


@pytest.mark.parametrize('name, size, channels, side', [
    ('resnet101', 448, 2048, 14), ('tresnet_l', 448, 2432, 14), ('tresnet_m', 224, 2048, 7),
    ('swin_large', 384, 1536, 12)])
def test_full_size_rows_on_the_meta_device(name, size, channels, side):
    with torch.device('meta'):
        for head in ('linear', 'q2l'):
            options = dict(hidden_dim=64, dim_feedforward=64) if head == 'q2l' else {}
            model = models.build_classifier(name, 5, pretrained=False, head=head, image_size=size, **options)
            x = torch.empty(2, 3, size, size)
            assert model.forward_features(x).shape == (2, channels, side, side)
            assert model.feature_shape(size) == (channels, side, side)
            assert model(x).shape == (2, 5)


def _features_and_pooled(model, x):
    with torch.no_grad():
        feats = model.forward_features(x)
        return feats, model.spec.pool(model.trunk, feats)


@pytest.mark.parametrize('name, kwargs', [
    ('tresnet_m', {}),  # the row's own functions on a random TResNet-M
    ('timm:swin_tiny_patch4_window7_224', {'img_size': 64}),  # channels-last map
])
def test_map_rows_pool_by_average_so_cams_hold(name, kwargs):
    """resnet101 / tresnet / swin_large rows: forward_features is the map the heads read (Swin's NHWC
    permuted), timm's forward_head pools it by a plain average, so BackboneSpec.cam holds."""
    torch.manual_seed(0)
    row = name if not name.startswith('timm:') else 'swin_large'
    spec = backbones.BACKBONES[row]
    net = timm.create_model(name.removeprefix('timm:'), pretrained=False, num_classes=0, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        native = net.forward_features(x)
        feats = spec.features(net, x)
        pooled = spec.pool(net, feats)
        reference = net.forward_head(native)
    if row == 'swin_large':
        assert native.shape == (2, 2, 2, 768) and torch.equal(feats, native.permute(0, 3, 1, 2))
    else:
        assert torch.equal(feats, native)
    assert feats.shape[-2:] == (spec.grid(64), spec.grid(64)) == (2, 2)
    assert torch.equal(pooled, reference)
    torch.testing.assert_close(pooled, feats.mean((2, 3)))
    assert spec.cam


def test_timm_resnet18_pooled_and_map():
    torch.manual_seed(0)
    model = models.build_classifier('timm:resnet18', 3, pretrained=False, image_size=32).eval()
    net = model.trunk
    assert isinstance(net, timm.models.ResNet) and model.head.in_features == 512
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, pooled = _features_and_pooled(model, x)
        assert feats.shape == (2, 512, 1, 1)
        torch.testing.assert_close(pooled, net.forward_head(net.forward_features(x)), rtol=0, atol=0)
        assert torch.equal(model(x), model.head(pooled))
    # a head that reads the map gets forward_features itself
    q2l = models.build_classifier('timm:resnet18', 3, pretrained=False, head='q2l', image_size=64, hidden_dim=32,
                                  dim_feedforward=32, nheads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(q2l.forward_features(x), q2l.trunk.forward_features(x))
        assert q2l.forward_features(x).shape == (2, 512, 2, 2) and q2l.feature_shape(64) == (512, 2, 2)
        assert q2l(x).shape == (2, 3)
    # state dict keys: the timm model's, under trunk.
    assert set(k for k in model.state_dict() if k.startswith('trunk.')) == {f'trunk.{k}' for k in net.state_dict()}


def test_timm_vit_gives_class_token_pooling_and_the_patch_grid():
    torch.manual_seed(0)
    linear = models.build_classifier('timm:test_vit', 4, pretrained=False, image_size=64).eval()
    net = linear.trunk
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = net.forward_features(x)  # B x (1 + 16) x 64: class token first
        feats, pooled = _features_and_pooled(linear, x)
        assert tokens.shape == (2, 17, 64) and net.global_pool == 'token'
        assert torch.equal(pooled, tokens[:, 0])  # timm's own pooling: the class token
    sgre_like = models.build_classifier('timm:test_vit', 4, pretrained=False, head='q2l', image_size=64,
                                        hidden_dim=32, dim_feedforward=32, nheads=2).eval()
    sgre_like.trunk.load_state_dict(net.state_dict())
    with torch.no_grad():
        grid = sgre_like.forward_features(x)
        assert grid.shape == (2, 64, 4, 4) and sgre_like.feature_shape(64) == (64, 4, 4)
        # patch token 4 r + c (after the class token) sits at row r, column c
        assert torch.equal(grid[:, :, 1, 2], tokens[:, 1 + 4 * 1 + 2])
        assert sgre_like(x).shape == (2, 4)


def test_backbone_weights_file_for_timm_rows(tmp_path):
    """--backbone-weights FILE: a saved timm (or torchvision, same keys) state dict, classifier
    included or not, is what the trunk holds; a file for another model is one line."""
    import torchvision

    torch.manual_seed(1)
    source = timm.create_model('resnet18', pretrained=False)  # with its 1000-class fc
    path = tmp_path / 'resnet18.pth'
    torch.save(source.state_dict(), path)
    tv = torchvision.models.resnet18(weights=None)
    tv_path = tmp_path / 'tv_resnet18.pth'
    torch.save(tv.state_dict(), tv_path)
    for weights, reference in ((path, source), (tv_path, tv)):
        model = models.build_classifier('timm:resnet18', 3, weights_path=weights)
        trunk = model.trunk.state_dict()
        for key, value in reference.state_dict().items():
            if not key.startswith('fc.'):
                assert torch.equal(trunk[key], value), key
    torch.save(timm.create_model('resnet34', pretrained=False).state_dict(), tmp_path / 'r34.pth')
    with pytest.raises(ModelLoadError) as err:
        models.build_classifier('timm:resnet18', 3, weights_path=tmp_path / 'r34.pth')
    assert 'r34.pth' in str(err.value) and '--backbone-weights' in str(err.value) and '\n' not in str(err.value)
    with pytest.raises(ModelLoadError, match='not found'):
        models.build_classifier('timm:resnet18', 3, weights_path=tmp_path / 'missing.pth')


def test_timm_names_checked_and_run_names_safe(capsys):
    assert backbones.backbone('timm:resnet18.a1_in1k').description.startswith("timm 'resnet18.a1_in1k'")
    assert backbones.backbone('timm:resnet18') is backbones.backbone('timm:resnet18')
    for bad, message in (('timm:no_such_net', "'no_such_net' is not a timm model name"),
                         ('vgg', 'or timm:NAME')):
        with pytest.raises(ValueError, match=message):
            backbones.backbone(bad)
    assert default_run_name('voc2007', 'bce', 'timm:resnet18', 0, 'full') == 'voc2007-full_bce_timm-resnet18_s0'
    cfg, _ = main_clip.parse_args(['-d', 'coco', '-m', 'swin_large', '-l', 'an'])
    assert cfg.image_size == 384  # the row's input size unless --image-size says otherwise
    cfg, _ = main_clip.parse_args(['-d', 'coco', '-m', 'swin_large', '-l', 'an', '--image-size', '448'])
    assert cfg.image_size == 448
    with pytest.raises(SystemExit) as stop:
        main_clip.parse_args(['-m', 'timm:no_such_net'])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1 and "'no_such_net' is not a timm model name" in err

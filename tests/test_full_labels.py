"""Fully labelled training (--observed full) and VOC2007 end to end: which methods train on every
true label and which are refused, that the allowed ones reduce to their observed part, and
`-d voc2007 --observed full -m timm:resnet18 --no-pretrained --head q2l` on a dataset formatted by
preproc/format_pascal.py --year 2007 from raw files in the official layout, with the test split's
"difficult" entries left out of mAP."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import class_text_features
import clip_loading
import losses
import main_clip
import methods
from metrics import compute_metrics
from preproc import format_pascal

REFUSED = ('role', 'LL-R', 'LL-Ct', 'LL-Cp', 'GR', 'AEVLP')
ALLOWED = ('an', 'an_ls', 'wan', 'epr', 'iu', 'iun', 'pr', 'bce', 'bce_ls', 'EM', 'EM_APL', 'EM_PL', 'EM_PL_ASL',
           'ASL', 'CSL')


UNSUPERVISED = ('CCD',)  # reads no training label: every --observed is refused


def test_every_method_is_either_allowed_or_refused():
    assert set(REFUSED) | set(ALLOWED) | set(UNSUPERVISED) == set(methods.METHODS)
    assert not set(REFUSED) & set(ALLOWED) and not set(UNSUPERVISED) & (set(REFUSED) | set(ALLOWED))


@pytest.mark.parametrize('loss', UNSUPERVISED)
def test_an_unsupervised_method_refuses_every_label_file(loss, capsys):
    with pytest.raises(SystemExit) as stop:
        main_clip.parse_args(['-d', 'voc2007', '--observed', 'full', '-l', loss])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1 and 'reads no training label' in err


@pytest.mark.parametrize('loss', REFUSED)
def test_methods_that_need_unknown_labels_are_refused_in_one_line(loss, capsys):
    with pytest.raises(SystemExit) as stop:
        main_clip.parse_args(['-d', 'voc2007', '--observed', 'full', '-l', loss])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1
    assert f'--observed full: -l {loss} needs unknown labels' in err and '-l bce, ASL or CSL' in err


@pytest.mark.parametrize('loss', ALLOWED)
def test_the_other_methods_take_full_labels(loss):
    cfg, _ = main_clip.parse_args(['-d', 'voc2007', '--observed', 'full', '-l', loss])
    assert cfg.observed == 'full' and cfg.run_dir.endswith(f'voc2007-full_{loss}_resnet50_s0')
    assert not methods.METHODS[loss].uses_pseudo_labels(cfg)  # nothing is left for a pseudo-label


@pytest.mark.parametrize('loss', ['an', 'wan', 'iu', 'iun', 'epr', 'EM', 'EM_APL', 'EM_PL'])
def test_with_every_label_observed_a_method_is_the_bce_of_its_labels(loss):
    """The rules for unknown entries have nothing to act on: the loss is sum(neglog(p) at 1,
    neglog(1 - p) at -1) / (B K) (epr adds its regulariser, which is about p only)."""
    torch.manual_seed(0)
    true = (torch.rand(6, 20) < 0.2).float()
    observed = 2 * true - 1
    preds = torch.rand(6, 20)
    cfg, _ = main_clip.parse_args(['-d', 'voc2007', '--observed', 'full', '-l', loss])
    method = methods.build_method(cfg, observed.numpy(), 'cpu')
    batch = dict(index=torch.arange(6), observed=observed, true=true, pseudo_labels=None)
    got = method.loss(torch.logit(preds), preds, batch, epoch=cfg.warmup_epoch + 1, step=0)
    bce = torch.where(true == 1, -torch.log(preds + 1e-5), -torch.log(1 - preds + 1e-5)).mean()
    if loss == 'epr':
        bce = bce + (preds.sum(1).mean() - 1.5) ** 2 / 400
    torch.testing.assert_close(got, bce, rtol=1e-6, atol=0)


# --- VOC2007 end to end ------------------------------------------------------------------------

CLASSES = format_pascal.CLASSES


def write_raw_voc2007(root: Path, num_trainval: int, num_test: int, seed: int = 0) -> None:
    """VOCdevkit/VOC2007 as VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar extract it: Annotations
    XML (some objects difficult), ImageSets/Main/{trainval,test}.txt, JPEGImages; class-coloured stripes."""
    rng = np.random.RandomState(seed)
    palette = rng.randint(0, 256, size=(20, 3))
    voc = root / 'VOCdevkit' / 'VOC2007'
    for folder in ('Annotations', 'ImageSets/Main', 'JPEGImages'):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    ids = [f'{i:06d}' for i in range(1, num_trainval + num_test + 1)]
    for image_id in ids:
        present = rng.choice(20, size=rng.randint(1, 4), replace=False)
        objects = ''.join(f'<object><name>{CLASSES[c]}</name><difficult>{int(rng.rand() < 0.25)}</difficult>'
                          '</object>' for c in present)
        (voc / 'Annotations' / f'{image_id}.xml').write_text(f'<annotation><filename>{image_id}.jpg</filename>'
                                                              f'{objects}</annotation>')
        pixels = rng.randint(0, 40, size=(24, 24, 3))
        for j, c in enumerate(present):
            pixels[:, j * 8:(j + 1) * 8] += palette[c] // 2
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(voc / 'JPEGImages' / f'{image_id}.jpg')
    (voc / 'ImageSets' / 'Main' / 'trainval.txt').write_text(''.join(f'{i}\n' for i in ids[:num_trainval]))
    (voc / 'ImageSets' / 'Main' / 'test.txt').write_text(''.join(f'{i}\n' for i in ids[num_trainval:]))


def test_voc2007_full_labels_timm_backbone_q2l_head(tmp_path, monkeypatch):
    data = tmp_path / 'data'
    write_raw_voc2007(data / 'voc2007', num_trainval=40, num_test=16)
    assert format_pascal.main(['--year', '2007', '--load-path', str(data / 'voc2007'),
                               '--save-path', str(data / 'voc2007')]) == 0
    ignore = np.load(data / 'voc2007' / 'formatted_val_ignore.npy')
    assert ignore.any()  # the fixture has test entries whose objects are all difficult

    def no_clip(*args, **kwargs):
        raise AssertionError('--observed full needs no CLIP')
    monkeypatch.setattr(clip_loading, 'load_clip', no_clip)
    argv = ['-d', 'voc2007', '--observed', 'full', '-m', 'timm:resnet18', '--no-pretrained', '--head', 'q2l',
            '--data-root', str(data), '--results-dir', str(tmp_path / 'results'), '--cache-dir',
            str(tmp_path / 'cache'), '--epochs', '1', '--image-size', '32', '--batch-size', '8', '--num-workers',
            '0', '--device', 'cpu', '--q2l-hidden', '64', '--q2l-ffn', '64', '--q2l-heads', '2']
    assert main_clip.main(argv) == 0
    run = tmp_path / 'results' / 'voc2007-full_EM_PL_timm-resnet18_s0'
    log = json.loads((run / 'log.json').read_text())
    assert log['best_epoch'] == 1
    # the test mAP leaves out the ignored entries, as SGRE's VOCmAP does
    preds = np.load(run / 'test_preds_best.npy')
    labels = np.load(data / 'voc2007' / 'formatted_val_labels.npy')
    assert log['best_test_map'] == pytest.approx(compute_metrics(preds, labels, ~ignore)['map'], abs=1e-9)
    assert compute_metrics(preds, labels, ~ignore)['map'] != compute_metrics(preds, labels)['map']
    ckpt = torch.load(run / 'best.pt', weights_only=True)
    assert ckpt['config']['model'] == 'timm:resnet18' and ckpt['classnames'] == class_text_features.read_classnames('voc2007')
    assert any(key.startswith('trunk.layer4.') for key in ckpt['model'])
    # --evaluate rebuilds the timm trunk and the head from the checkpoint and counts the same entries
    assert main_clip.evaluate(*reloaded(run / 'best.pt')) == pytest.approx(log['best_test_map'], abs=1e-4)


def reloaded(path):
    ckpt = main_clip.load_checkpoint(path)
    return main_clip.config_from_checkpoint(ckpt, [], path, None), ckpt

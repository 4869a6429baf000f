"""The transformer heads, the weight EMA and the AdamW + OneCycle recipe in a training run
(heads_run.py, models.HEADS, engine.train_one_epoch), end to end on the tiny fixtures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import backbones
import class_text_features
import clip_loading
import heads_run
import main_clip
import methods
import models
import trunks
from conftest import interrupt_after, tiny_run_args

# Small transformer sizes: the tiny runs take seconds on a CPU.
SMALL = {
    'linear': [],
    'q2l': ['--q2l-hidden', '32', '--q2l-heads', '4', '--q2l-ffn', '64'],
    'sgre': ['--sgre-heads', '4', '--sgre-ffn', '64', '--sgre-att-dim', '16'],
}


def closing_lines(out: str) -> list[str]:
    return out.strip().splitlines()[-3:]


@pytest.mark.parametrize('head', ['q2l', 'sgre'])
def test_each_head_trains_and_evaluates(head, tiny_pascal, tmp_path, tiny_clip, tiny_text_features, capsys,
                                        monkeypatch):
    aux_calls = []
    original_aux = methods.Method.aux_loss

    def counting_aux(self, logits, preds, batch, *, epoch, step):
        aux_calls.append(logits.shape)
        return original_aux(self, logits, preds, batch, epoch=epoch, step=step)

    monkeypatch.setattr(methods.Method, 'aux_loss', counting_aux)
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features) + [
        '-l', 'EM_PL', '--head', head, '--ema-decay', '0.9'] + SMALL[head]
    assert main_clip.main(args) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / 'results' / 'pascal_EM_PL_small_cnn_s0'
    log = json.loads((run_dir / 'log.json').read_text())
    assert math.isfinite(log['best_test_map'])
    assert 'val mAP: model' in out and ', EMA ' in out  # both evaluated every epoch
    last = torch.load(run_dir / 'last.pt', weights_only=True)
    assert last['ema']['updates'] == 2 * 4  # 32 train images / batch 8, two epochs
    assert last['config']['head'] == head
    if head == 'sgre':
        assert last['config']['lamda'] == 0.1  # SGRE's VOC value
        assert len(aux_calls) == 8 and aux_calls[0] == (8, 20)
        # default label embeddings: the run's CLIP text features (here --text-features)
        np.testing.assert_array_equal(last['label_embeddings'].numpy(),
                                      class_text_features.load_text_features(tiny_text_features, 20).numpy())
    else:
        assert not aux_calls and 'label_embeddings' not in last
    assert any(k.startswith('head.transformer.') or k.startswith('head.attention.') for k in last['model'])
    # --evaluate rebuilds the head from best.pt alone (no CLIP for SGRE's embeddings)
    capsys.readouterr()
    assert main_clip.main(['--evaluate', str(run_dir / 'best.pt')]) == 0
    assert float(capsys.readouterr().out.strip().split()[-1]) == pytest.approx(log['best_test_map'], abs=0.005)


def straight_and_resumed(args: list[str], tmp_path, capsys, monkeypatch) -> tuple[dict, dict]:
    """The run of `args` (2 epochs) straight and cut after epoch 1 then --resume'd: checks that the closing
    lines, log.json, test predictions and model weights agree; returns both last.pt."""
    assert main_clip.main(args + ['--run-name', 'full']) == 0
    full_out = capsys.readouterr().out
    undo = interrupt_after(monkeypatch, 1)
    assert main_clip.main(args + ['--run-name', 'cut']) == 130
    undo()
    capsys.readouterr()
    cut = tmp_path / 'results' / 'cut'
    assert main_clip.main(['--resume', str(cut)]) == 0
    resumed_out = capsys.readouterr().out
    assert 'Resuming' in resumed_out
    assert closing_lines(resumed_out) == closing_lines(full_out)
    full = tmp_path / 'results' / 'full'
    assert json.loads((full / 'log.json').read_text()) == json.loads((cut / 'log.json').read_text())
    assert np.array_equal(np.load(full / 'test_preds_best.npy'), np.load(cut / 'test_preds_best.npy'))
    a, b = (torch.load(d / 'last.pt', weights_only=True) for d in (full, cut))
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    return a, b


def test_resume_with_ema_and_onecycle_is_exact(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, capsys,
                                               monkeypatch):
    """2 epochs straight vs 1 epoch, an interruption, and --resume: the same log.json, predictions,
    EMA and schedule."""
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features) + [
        '-l', 'EM_PL', '--head', 'q2l', '--ema-decay', '0.8', '--optimizer', 'adamw', '--weight-decay', '1e-2',
        '--schedule', 'onecycle'] + SMALL['q2l']
    a, b = straight_and_resumed(args, tmp_path, capsys, monkeypatch)
    assert a['scheduler'] == b['scheduler'] and a['scheduler']['last_epoch'] == 8
    assert a['ema']['updates'] == b['ema']['updates'] == 8
    for key, value in a['ema']['module'].items():
        assert torch.equal(value, b['ema']['module'][key]), key


def test_default_flags_keep_the_original_recipe():
    cfg, _ = main_clip.parse_args(['-d', 'pascal'])
    assert (cfg.head, cfg.ema_decay, cfg.optimizer, cfg.weight_decay, cfg.schedule, cfg.lamda) == \
           ('linear', 0.0, 'adam', 0.0, 'none', 0.0)
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = heads_run.build_optimization(cfg, [{'params': model.parameters(), 'lr': cfg.lr}], 5)
    assert type(optimizer) is torch.optim.Adam and scheduler is None
    assert heads_run.build_ema(cfg, model) is None
    assert main_clip.parse_args(['-d', 'coco', '--head', 'sgre'])[0].lamda == 0.4
    assert main_clip.parse_args(['-d', 'demo', '--head', 'sgre', '--lamda', '0.3'])[0].lamda == 0.3


@pytest.mark.parametrize('flags, reason', [
    (['--head', 'q2l', '--lamda', '0.1'], '--lamda applies to --head sgre'),
    (['--label-embeddings', 'x.npy'], '--label-embeddings applies to --head sgre'),
    (['--ema-decay', '1.0'], '--ema-decay'),
    (['--head', 'q2l', '--q2l-hidden', '30'], '--q2l-hidden 30 must be divisible by --q2l-heads 4'),
    (['--head', 'q2l', '--q2l-pre-norm'], '--q2l-pre-norm needs'),
    (['--optimizer', 'rmsprop'], 'invalid choice'),
    (['--sgre-chunk', '0'], '--sgre-chunk'),
])
def test_head_flags_are_checked_when_parsed(flags, reason, capsys):
    with pytest.raises(SystemExit):
        main_clip.parse_args(flags)
    assert reason in capsys.readouterr().err


def test_bad_label_embeddings_file_is_one_line(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, capsys):
    bad = tmp_path / 'emb.npy'
    np.save(bad, np.zeros((19, 8), np.float32))
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=1) + [
        '-l', 'an', '--head', 'sgre', '--label-embeddings', str(bad)] + SMALL['sgre']
    assert main_clip.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert '--label-embeddings' in err and '(20, E)' in err and '\n' not in err


def test_head_that_does_not_fit_the_trunk_is_one_line(tiny_pascal, tmp_path, tiny_clip, tiny_text_features,
                                                       capsys):
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=1) + [
        '-l', 'an', '--head', 'sgre', '--sgre-heads', '7']  # small_cnn gives 256 channels
    assert main_clip.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert '--sgre-heads 7' in err and '\n' not in err


def test_clip_vision_map_heads_read_the_vit_token_grid(tiny_clip):
    clip, _ = clip_loading.load_clip(tiny_clip['config'], tiny_clip['checkpoint'])
    torch.manual_seed(0)
    model = models.build_classifier('clip_vision', 5, clip_model=clip, head='q2l', hidden_dim=16, nheads=4,
                                    dim_feedforward=32).eval()
    assert model.feature_shape(448) == (64, 4, 4)  # tiny ViT: width 64, 32 px / 8 px patches
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        grid = model.forward_features(x)
        visual = clip.visual
        visual.output_tokens = True
        _, tokens = visual(clip_loading.resize_for_clip(x, 32))
        visual.output_tokens = False
        assert model(x).shape == (2, 5)
    torch.testing.assert_close(grid, tokens.transpose(1, 2).reshape(2, 64, 4, 4), rtol=0, atol=0)
    assert model.trunk.visual.output_tokens is False  # the linear path is untouched
    linear = models.build_classifier('clip_vision', 5, clip_model=clip)
    assert linear.feature_shape(448) == (32, 1, 1)


def test_clip_vision_without_a_token_grid_is_refused_in_one_line():
    trunk = trunks.ClipVisionTrunk(torch.nn.Linear(3, 4), 32)  # e.g. a ModifiedResNet tower: no tokens
    spec = backbones.BACKBONES['clip_vision']
    with pytest.raises(main_clip.VLPLError) as exc:
        models.Classifier(trunk, spec, 4, 5, head='sgre', label_embeddings=np.zeros((5, 3)))
    assert '--head linear' in str(exc.value) and '\n' not in str(exc.value)


def test_forward_with_aux_is_the_forward_for_heads_without_one():
    torch.manual_seed(0)
    model = models.build_classifier('small_cnn', 4, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, aux = model.forward_with_aux(x)
    assert aux is None and torch.equal(logits, model(x))
    sgre = models.build_classifier('small_cnn', 4, pretrained=False, head='sgre', label_embeddings=np.eye(4),
                                   num_heads=4, dim_feedforward=16, att_dim=8).eval()
    logits, aux = sgre.forward_with_aux(x)
    out = sgre.head(sgre.forward_features(x), return_aux=True)
    assert torch.equal(logits, out.logits) and torch.equal(aux, out.aux_logits)


@pytest.mark.parametrize('head', ['linear', 'q2l', 'sgre'])
def test_resume_is_exact_for_every_head_with_worker_processes(head, tiny_pascal, tmp_path, tiny_clip,
                                                               tiny_text_features, capsys, monkeypatch):
    """Issue 29 item 7: with loader workers (persistent across epochs) a resumed q2l or sgre run
    drifted from the uninterrupted one, because each loader's first iterator drew its worker seed
    from the global torch generator, the one the heads' dropout reads: an uninterrupted run draws
    them in epoch 1 only, a resumed one again in its first epoch. Every head resumes exactly."""
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=2, workers=1) + [
        '-l', 'EM_PL', '--head', head, '--ema-decay', '0.9'] + SMALL[head]
    a, b = straight_and_resumed(args, tmp_path, capsys, monkeypatch)
    for key, value in a['ema']['module'].items():
        assert torch.equal(value, b['ema']['module'][key]), key

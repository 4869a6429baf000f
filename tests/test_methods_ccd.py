"""-l CCD (methods_ccd.py, ccd_labels.py, ccd_images.py): its image pipeline and label-free rule against
transcriptions of the original (github.com/k0u-id/CCD 0b57641), and the system end to end on the tiny
fixture: no training label read, the closing lines, resume after SIGKILL, refusals. The numbers of the
table, the refresh and the training step are checked against the original's own code in
tests/test_ccd_reference.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ccd
import ccd_images
import image_dataset
import image_io
import main_clip
from conftest import kill_during_epoch_after, write_pascal_like

REPO = Path(__file__).resolve().parents[1]

# A tiny random ModifiedResNet CLIP (the kind CCD's RN50x64 is), so that runs take CCD's any-size path.
TINY_RN_CLIP_CONFIG = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 64, 'layers': [1, 1, 1, 1], 'width': 8, 'head_width': 32},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 1, 'layers': 1},
}


@pytest.fixture(scope='session')
def tiny_rn_clip(tmp_path_factory) -> dict:
    import open_clip

    folder = tmp_path_factory.mktemp('tiny_rn_clip')
    config = folder / 'ccd-tiny-rn-clip.json'
    config.write_text(json.dumps(TINY_RN_CLIP_CONFIG))
    torch.manual_seed(0)
    checkpoint = folder / 'ccd-tiny-rn-clip.pt'
    torch.save(open_clip.model.CLIP(**TINY_RN_CLIP_CONFIG).state_dict(), checkpoint)
    return {'config': str(config), 'checkpoint': str(checkpoint)}


def ccd_args(data_root, tmp_path, clip: dict, *, epochs: int = 4, name: str = 'run') -> list[str]:
    """A fast CPU -l CCD run: 32 px training images, 64 px inference images and views, the refresh before
    epoch 3, consistency from epoch 3."""
    return ['-d', 'pascal', '-l', 'CCD', '--data-root', str(data_root), '--results-dir', str(tmp_path / 'results'),
            '--cache-dir', str(tmp_path / 'cache'), '-m', 'small_cnn', '--no-pretrained', '--image-size', '32',
            '--epochs', str(epochs), '--batch-size', '8', '--lr', '1e-3', '--num-workers', '0', '--device', 'cpu',
            '--clip-model', clip['config'], '--clip-pretrained', clip['checkpoint'], '--ccd-infer-size', '64',
            '--ccd-view-size', '64', '--ccd-offset', '8', '--run-name', name]


# --------------------------------------------------------------------------- transcriptions of the original

def original_normalise(pixels: np.ndarray) -> np.ndarray:
    """datasets.py TorchvisionNormalize.__call__, line by line."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    proc_img = np.empty_like(pixels, np.float32)
    for c in range(3):
        proc_img[..., c] = (pixels[..., c] / 255. - mean[c]) / std[c]
    return proc_img


def original_label_free_epoch(maps: list[float]):
    """train.py:174-176, 447-470: the epoch at which bestccd.pt is saved (None: never, the closing line fails)."""
    map_train_grad, map_train_grad_prev, save_flag, chosen = 100, 100, False, None
    map_train_prev = None
    for epoch, map_train in enumerate(maps):
        if epoch >= 1:
            map_train_grad = map_train - map_train_prev
        map_train_prev = map_train
        if map_train_grad - map_train_grad_prev > 0 and save_flag is False:
            chosen, save_flag = epoch, True
        map_train_grad_prev = map_train_grad
    return chosen


# --------------------------------------------------------------------------- pieces

def test_ccd_normalisation_is_the_originals_float64_arithmetic():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    resized = np.asarray(img.resize((24, 24), Image.BILINEAR))  # transforms.Resize((24, 24)) on a PIL image
    want = original_normalise(resized).transpose(2, 0, 1)
    got = ccd_images.ccd_tensor(img, 24)
    assert np.array_equal(got.numpy(), want)
    assert np.array_equal(ccd_images.ccd_tensor(img, 24, flipped=True).numpy(), want[:, :, ::-1])
    # torchvision's float32 Normalize (the other methods' pipeline) differs by an ulp on some pixels
    assert not torch.equal(image_io.image_tensor(img, 24), got)


def test_colour_jitter_is_torchvisions_with_the_drawn_parameters(monkeypatch):
    from torchvision import transforms

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    draws = (0.7, 0.1, 0.9, 0.3, 0.25, 0.8, 0.5, 0.95)
    order = torch.tensor([1, 3, 0, 2])  # argsort of the first four draws
    factors = (0.75, 1.3, 1.0, 0.45)  # 0.5 + u for three, u - 0.5 for the hue
    jitter = transforms.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.5)  # datasets.py:107
    monkeypatch.setattr(transforms.ColorJitter, 'get_params', staticmethod(lambda *a: (order, *factors)))
    assert np.array_equal(np.asarray(ccd_images.colour_jitter(img, draws)), np.asarray(jitter(img)))


def test_the_sampler_draws_jitter_without_changing_the_rows_and_flips():
    plain = list(image_dataset.FlipSampler(50, seed=3))
    more = list(image_dataset.FlipSampler(50, seed=3, views=1, draws=8))
    assert [k[:2] for k in more] == plain
    assert all(len(k[2]) == 1 and len(k[3]) == 8 and all(0 <= u < 1 for u in k[3]) for k in more)
    assert list(image_dataset.FlipSampler(50, seed=3, views=1, draws=8)) == more  # seeded


@pytest.mark.parametrize('seed', range(6))
def test_label_free_epoch_is_the_originals_rule(seed):
    rng = np.random.default_rng(seed)
    maps = list(np.cumsum(rng.normal(1.0, 2.0, 10)) + 40)
    if seed == 0:
        maps = [10.0, 30.0, 40.0, 45.0, 47.0, 48.0]  # the fit only slows: the rule never fires
    if seed == 1:
        maps[3] = float('nan')
    assert ccd.label_free_epoch(maps) == original_label_free_epoch(maps)
    assert ccd.label_free_epoch([10.0, 30.0, 40.0, 45.0, 47.0, 48.0]) is None
    assert ccd.label_free_epoch([10.0, 20.0, 31.0]) == 2


def test_train_map_binarises_the_soft_labels_as_the_original():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(2)
    preds = rng.random((40, 5))
    table = np.clip(rng.random((40, 5)) * 1.5, 0, 1).astype(np.float32)  # soft labels, some clamped at 1
    table[:, 4] = 0.5  # a class without an entry equal to 1: AP 0, as compute_avg_precision defines it
    y = (table == 1).astype(np.float32)
    want = 100 * np.mean([average_precision_score(y[:, j], preds[:, j]) if y[:, j].any() else 0.0 for j in range(5)])
    assert ccd.train_map(preds, table) == pytest.approx(want, abs=1e-10)


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def ccd_data(tmp_path_factory) -> Path:
    return write_pascal_like(tmp_path_factory.mktemp('ccd_data'), num_train=24, num_val=10, seed=3, size=48)


def _values(run_dir: Path) -> dict:
    return json.loads((run_dir / 'log.json').read_text())['values']


def test_no_training_label_enters_the_run(ccd_data, tmp_path, tiny_rn_clip, capsys):
    """A run on a train-label file of zeros (and no observed-label file at all) equals the run on the real
    labels in everything but the displays that compare with them (the train phase's mAP and top-k against
    its true labels, the pseudo-labels' precision and recall): every loss, the val and test metrics, the
    checkpoints' weights, the best and the label-free epochs."""
    import shutil

    zeros = tmp_path / 'zeros'
    shutil.copytree(ccd_data, zeros)
    folder = zeros / 'pascal'
    np.save(folder / 'formatted_train_labels.npy', np.zeros_like(np.load(folder / 'formatted_train_labels.npy')))
    (folder / 'formatted_train_labels_obs.npy').unlink()
    runs = {}
    for name, root in (('real', ccd_data), ('zeros', zeros)):
        assert main_clip.main(ccd_args(root, tmp_path, tiny_rn_clip, name=name)) == 0
        runs[name] = capsys.readouterr().out.splitlines()
    real, zero = (_values(tmp_path / 'results' / n) for n in ('real', 'zeros'))
    assert real['val'] == zero['val'] and real['test'] == zero['test']
    assert real['train']['loss'] == zero['train']['loss'] and len(real['train']['loss']) == 4
    assert real['train']['map_clean'] != zero['train']['map_clean']  # the display did read the two files
    for name in ('best.pt', 'last.pt'):
        a, b = (torch.load(tmp_path / 'results' / n / name, weights_only=True) for n in ('real', 'zeros'))
        assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert torch.equal(a['method']['table']['table'], b['method']['table']['table'])
    assert torch.equal(a['method']['table']['flags'], b['method']['table']['flags'])
    assert runs['real'][-7:] == runs['zeros'][-7:]  # the closing lines
    assert runs['real'][-1].startswith('CLIP zero-shot test score (the baseline): ')
    assert runs['real'][-3].startswith('Label-free epoch (CCD\'s rule, no label read): ')


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_gives_the_same_closing_lines(ccd_data, tmp_path, tiny_rn_clip):
    """Killed during epoch 4 (after the refresh before epoch 3 and its checkpoint), resumed: the same log,
    the same closing lines, the same table, flags and refresh state as the run that was never stopped."""
    cmd = [sys.executable, '-u', str(REPO / 'main_clip.py')]
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    straight = subprocess.run(cmd + ccd_args(ccd_data, tmp_path, tiny_rn_clip, epochs=5, name='full'), cwd=REPO,
                              env=env, check=True, capture_output=True, text=True)
    kill_during_epoch_after(cmd + ccd_args(ccd_data, tmp_path, tiny_rn_clip, epochs=5, name='killed'), 3, cwd=REPO,
                            env=env)
    killed = tmp_path / 'results' / 'killed'
    saved = torch.load(killed / 'last.pt', weights_only=True)
    assert saved['epoch'] == 3 and saved['method']['table']['refreshes'] == 1
    resumed = subprocess.run(cmd + ['--resume', str(killed)], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert 'Resuming' in resumed.stdout
    assert resumed.stdout.splitlines()[-7:] == straight.stdout.splitlines()[-7:]
    assert _values(killed) == _values(tmp_path / 'results' / 'full')
    a, b = (torch.load(tmp_path / 'results' / n / 'last.pt', weights_only=True)['method']['table']
            for n in ('full', 'killed'))
    assert torch.equal(a['table'], b['table']) and torch.equal(a['flags'], b['flags'])
    assert (a['multiplier'], a['refreshes']) == (b['multiplier'], b['refreshes'])


def test_a_vit_clip_takes_the_square_path(ccd_data, tmp_path, tiny_clip, capsys):
    """Any open_clip model: a ViT (the conftest's tiny one) gets the images resized and the views padded to its
    square input; the run trains through the refresh and reports its closing lines."""
    args = ccd_args(ccd_data, tmp_path, tiny_clip, epochs=3)
    assert main_clip.main(args) == 0
    out = capsys.readouterr().out
    assert 'resized to its square input' in out and 'after CAM views refresh 1 (before epoch 3)' in out


@pytest.mark.parametrize('flags, message', [
    (['--observed', 'rps0.5'], 'reads no training label'),
    (['--text-features', 'x.npy'], 'encodes its own prompts'),
    (['--boostlu'], '--ccd-coeff'),
    (['-m', 'clip_vision'], 'class activation map'),
    (['--head', 'q2l'], 'class activation map'),
    (['--clip-mode', 'online'], 'cached'),
    (['--data-format', 'packed'], 'pil'),
    (['--pl-debias'], 'uses no CLIP pseudo-labels'),
])
def test_settings_that_do_not_apply_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main_clip.parse_args(['-d', 'pascal', '-l', 'CCD'] + flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and '\n' not in err


def test_ccd_flags_belong_to_ccd(capsys):
    with pytest.raises(SystemExit):
        main_clip.parse_args(['-d', 'pascal', '-l', 'EM_PL', '--ccd-ratio', '0.5'])
    assert '--ccd-ratio is a setting of -l CCD' in capsys.readouterr().err


def test_defaults_are_the_released_script():
    cfg, _ = main_clip.parse_args(['-d', 'coco', '-l', 'CCD'])
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.head_lr_mult) == (16, 1e-5, 10, 10.0)
    assert (cfg.clip_model, cfg.clip_pretrained, cfg.temp) == ('RN50x64', 'openai', 0.01)
    assert (cfg.ccd_coeff, cfg.ccd_loss_coeff, cfg.ccd_ratio, cfg.ccd_offset, cfg.ccd_ls_coeff, cfg.ccd_bound,
            cfg.ccd_refreshes, cfg.ccd_consistency, cfg.ccd_infer_size, cfg.ccd_view_size) == (
        3.0, 1.0, 0.2, 80, 20, 4.0, 1, 1.0, 640, 640)
    assert cfg.ccd_global_debias and cfg.ccd_local_debias and cfg.ccd_box == 'released'
    assert cfg.boostlu and cfg.boostlu_alpha == 3.0  # CCD's alpha, the CAM boost of BoostLU
    demo, _ = main_clip.parse_args(['-d', 'demo', '-l', 'CCD'])
    assert (demo.batch_size, demo.lr, demo.image_size, demo.ccd_infer_size, demo.ccd_offset) == (32, 1e-3, 64, 64, 8)
    zero, _ = main_clip.parse_args(['-d', 'pascal', '-l', 'CCD', '--ccd-coeff', '0'])
    assert zero.boostlu_alpha == 1.0  # train.py:343: alpha stays 1 unless coeff > 0


def test_a_second_run_spends_no_clip_time(ccd_data, tmp_path, tiny_rn_clip, monkeypatch, capsys):
    """The text features, the global and test embeddings and the views' embeddings are cached: a second run
    with the same seed never loads the CLIP, and ends with the same lines."""
    import clip_loading

    assert main_clip.main(ccd_args(ccd_data, tmp_path, tiny_rn_clip, name='first')) == 0
    first = capsys.readouterr().out.splitlines()

    def no_clip(*args, **kwargs):
        raise AssertionError('the CLIP was loaded')
    monkeypatch.setattr(clip_loading, 'load_clip', no_clip)
    assert main_clip.main(ccd_args(ccd_data, tmp_path, tiny_rn_clip, name='second')) == 0
    assert capsys.readouterr().out.splitlines()[-7:] == first[-7:]

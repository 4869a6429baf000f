"""Fixtures shared by the end-to-end tests: a tiny formatted dataset and a tiny random CLIP."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_CLIP_CONFIG = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'head_width': 32, 'patch_size': 8},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 2},
}


@pytest.fixture(autouse=True, scope='session')
def one_torch_thread():
    """The tests' tensors are tiny: sharing each operation between threads costs far more than it
    saves, and on a busy 2-core machine a second thread makes tiny operations ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def tiny_clip(tmp_path_factory) -> dict:
    """A randomly initialised open_clip model of a tiny custom config, saved like a real checkpoint."""
    import open_clip

    folder = tmp_path_factory.mktemp('tiny_clip')
    config = folder / 'e2e-tiny-clip.json'
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model('e2e-tiny-clip', pretrained=None)
    checkpoint = folder / 'e2e-tiny-clip.pt'
    torch.save(model.state_dict(), checkpoint)
    return {'config': str(config), 'checkpoint': str(checkpoint), 'folder': folder}


@pytest.fixture
def timm_calls(monkeypatch) -> list:
    """timm.create_model replaced by a recorder: the list of (name, kwargs) of every call; each call
    returns a stand-in trunk (Flatten with num_features 2048), so no network or real model is needed."""
    import timm

    calls = []

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        net = torch.nn.Flatten(1)
        net.num_features = 2048
        return net

    monkeypatch.setattr(timm, 'create_model', fake_create_model)
    return calls


def write_pascal_like(root: Path, num_train: int, num_val: int, seed: int = 0, size: int = 24) -> Path:
    """A pascal-shaped formatted dataset (K = 20) of small coloured images, class-dependent colours."""
    from preproc.generate_observed_labels import generate_observed

    rng = np.random.RandomState(seed)
    num_classes = 20
    palette = rng.randint(0, 256, size=(num_classes, 3))
    folder = root / 'pascal'
    images_dir = folder / 'VOCdevkit' / 'VOC2012' / 'JPEGImages'
    images_dir.mkdir(parents=True)
    for phase, n in (('train', num_train), ('val', num_val)):
        labels = np.zeros((n, num_classes))
        names = []
        for i in range(n):
            present = rng.choice(num_classes, size=rng.randint(1, 4), replace=False)
            labels[i, present] = 1
            pixels = rng.randint(0, 40, size=(size, size, 3))
            for j, c in enumerate(present):  # one coloured stripe per present class
                pixels[:, j * size // 3:(j + 1) * size // 3] += palette[c] // 2
            name = f'{phase}_{i:05d}.png'
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images_dir / name)
            names.append(name)
        np.save(folder / f'formatted_{phase}_images.npy', np.array(names))
        np.save(folder / f'formatted_{phase}_labels.npy', labels)
        np.save(folder / f'formatted_{phase}_labels_obs.npy', generate_observed(labels, 1, 0, 1200))
    return root


@pytest.fixture(scope='session')
def tiny_pascal(tmp_path_factory) -> Path:
    return write_pascal_like(tmp_path_factory.mktemp('data'), num_train=40, num_val=15)


@pytest.fixture(scope='session')
def tiny_text_features(tiny_clip, tmp_path_factory) -> str:
    """Pascal class-name text features of the tiny CLIP, as a .npy file (for --text-features)."""
    import class_text_features
    import clip_loading

    clip, tokenizer = clip_loading.load_clip(tiny_clip['config'], tiny_clip['checkpoint'])
    path = tmp_path_factory.mktemp('text') / 'pascal_tiny.npy'
    class_text_features.save_text_features(path, class_text_features.compute_text_features(clip, tokenizer, class_text_features.read_classnames('pascal')))
    return str(path)


def tiny_run_args(data_root, tmp_path, tiny_clip, text_features, *, epochs: int = 2, workers: int = 0) -> list[str]:
    """main_clip.py flags for a fast CPU run on a tiny pascal-shaped dataset and the tiny CLIP."""
    return ['-d', 'pascal', '--data-root', str(data_root), '--results-dir', str(tmp_path / 'results'),
            '--cache-dir', str(tmp_path / 'cache'), '-m', 'small_cnn', '--no-pretrained', '--image-size', '32',
            '--epochs', str(epochs), '--batch-size', '8', '--lr', '1e-3', '--num-workers', str(workers),
            '--device', 'cpu', '--clip-model', tiny_clip['config'], '--clip-pretrained',
            tiny_clip['checkpoint'], '--text-features', text_features]


def interrupt_after(monkeypatch, stop_epoch: int):
    """main_clip stops with Ctrl-C right after writing the checkpoint of `stop_epoch`, as a SIGKILL
    there would leave the run folder; returns a function that undoes it (for the --resume)."""
    import records

    save = records.save_epoch

    def save_then_stop(run_dir, epoch, *args, **kwargs):
        save(run_dir, epoch, *args, **kwargs)
        if epoch == stop_epoch:
            raise KeyboardInterrupt
    monkeypatch.setattr(records, 'save_epoch', save_then_stop)
    return lambda: monkeypatch.setattr(records, 'save_epoch', save)


def kill_during_epoch_after(cmd: list[str], epoch: int, **popen) -> None:
    """Run main_clip's command line `cmd` (python -u ...) and SIGKILL it during the epoch after `epoch`,
    as soon as it reports that epoch's checkpoint (popen: cwd, env)."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **popen)
    for line in proc.stdout:
        if line.startswith('checkpoint: ') and line.rstrip().endswith(f'(epoch {epoch})'):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()

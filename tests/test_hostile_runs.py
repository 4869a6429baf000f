"""Hostile runs (issue 29): a run killed at the wrong moment, a report over unfinished runs, a
checkpoint in the wrong place; each ends in one true line, and nothing finished is lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_clip
import report_runs
from conftest import tiny_run_args
from test_hostile import one_error_line, run_args, run_dir  # noqa: F401 (run_args: a fixture)

REPO = Path(__file__).resolve().parents[1]


def killed_at_first_checkpoint(args: list[str]) -> None:
    """main_clip.py in a process that SIGKILLs itself where it would write its first checkpoint: what a
    kill (OOM killer, scancel, power loss) during epoch 1 leaves on disk."""
    code = ('import os, signal, sys; sys.path.insert(0, sys.argv[1]); import records; '
            'records.save_epoch = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); '
            'import main_clip; main_clip.main(sys.argv[2:])')
    proc = subprocess.run([sys.executable, '-c', code, str(REPO)] + args, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == -signal.SIGKILL, proc.stderr


# ------------------------------------------------------------------------------ item 4, item 12

def test_an_overwrite_killed_before_its_first_checkpoint_loses_nothing(tmp_path, run_args, capsys):
    """Item 4: the replaced run waits in .NAME.replaced; the next start puts it back (a second
    --overwrite that fails used to delete it for good), and report.py never lists the hidden copy."""
    folder = run_dir(tmp_path)
    assert main_clip.main(run_args()) == 0
    finished = (folder / 'log.json').read_text()
    killed_at_first_checkpoint(run_args('--overwrite'))
    hidden = folder.with_name(f'.{folder.name}.replaced')
    assert (hidden / 'log.json').read_text() == finished and not (folder / 'last.pt').exists()
    assert report_runs.find_run_folders([str(folder.parent)]) == [folder]  # not the hidden copy

    capsys.readouterr()
    assert main_clip.main(run_args('--overwrite', '--lr', '1e30')) == 2  # a second --overwrite that fails
    err = capsys.readouterr().err
    assert f'restored {folder}' in err
    one_error_line(err, 'non-finite loss')
    assert (folder / 'log.json').read_text() == finished and not hidden.exists()

    killed_at_first_checkpoint(run_args('--overwrite'))
    assert main_clip.main(run_args()) == 2  # without --overwrite: put back, and refused as a finished run
    one_error_line(capsys.readouterr().err, 'already holds a run')
    assert (folder / 'log.json').read_text() == finished and not hidden.exists()


@pytest.mark.parametrize('name', ['.', '..', '../escape', 'a/b', '.hidden', ''])
def test_run_name_is_one_folder_inside_results_dir(tmp_path, run_args, capsys, name):
    """'--run-name . --overwrite' replaced the whole results folder (its other runs and files lost for
    good), and '../x' wrote outside it: --run-name takes one plain folder name, refused at parse."""
    results = tmp_path / 'results'
    (results / 'finished_run').mkdir(parents=True)
    (results / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit) as stop:
        main_clip.main(run_args('--run-name', name, '--overwrite'))
    assert stop.value.code == 2
    one_error_line(capsys.readouterr().err, '--run-name', 'plain folder name', '--results-dir')
    assert sorted(p.name for p in results.iterdir()) == ['finished_run', 'notes.txt']
    assert (results / 'notes.txt').read_text() == 'mine' and not (tmp_path / 'escape').exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_names_the_command(tmp_path, run_args, capsys):
    """Item 12: there is nothing to resume; the same command without --resume starts it again."""
    killed_at_first_checkpoint(run_args())
    folder = run_dir(tmp_path)
    assert (folder / 'config.json').exists() and not (folder / 'last.pt').exists()
    assert main_clip.main(['--resume', str(folder)]) == 2
    one_error_line(capsys.readouterr().err, f'--resume {folder}', 'before its first checkpoint',
                   'the same command without --resume')
    assert main_clip.main(run_args()) == 0 and (folder / 'last.pt').exists()


def test_a_run_that_never_started_leaves_no_lock_file(tmp_path, run_args, capsys):
    """Item 12: a failed start leaves neither a run folder nor results/.NAME.lock."""
    assert main_clip.main(run_args('--lr', '1e30')) == 2
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / 'results').iterdir()) == []
    assert main_clip.main(run_args()) == 0
    assert sorted(p.name for p in (tmp_path / 'results').iterdir()) == [f'.{run_dir(tmp_path).name}.lock',
                                                                       run_dir(tmp_path).name]


# ------------------------------------------------------------------------------ items 8 to 13: checkpoints

import dataclasses  # noqa: E402
import functools  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import checkpoints  # noqa: E402
import class_text_features  # noqa: E402
import clip_loading  # noqa: E402
import distributed  # noqa: E402
import heads_run  # noqa: E402
import models  # noqa: E402
import predict  # noqa: E402
from conftest import write_pascal_like  # noqa: E402

SMALL_HEADS = {
    'q2l': ['--q2l-hidden', '32', '--q2l-enc-layers', '1', '--q2l-dec-layers', '1', '--q2l-heads', '2',
            '--q2l-ffn', '64'],
    'sgre': ['--sgre-heads', '4', '--sgre-ffn', '64', '--sgre-att-dim', '16'],
}


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / 'photo.png'
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40, 3)).astype(np.uint8)).save(path)
    return path


def checkpoint_as_trained(path: Path, argv: list[str], *, num_classes=20, **head_options) -> torch.nn.Module:
    """A best.pt with the entries records.save_epoch writes, for the Config that `argv` parses to."""
    cfg, _ = main_clip.parse_args(argv)
    torch.manual_seed(0)
    model = models.build_classifier(cfg.model, num_classes, pretrained=False, head=cfg.head,
                                    **heads_run.head_options(cfg, **head_options)).eval()
    names = class_text_features.read_classnames(cfg.dataset)
    torch.save({'model': model.state_dict(), 'epoch': 1, 'config': dataclasses.asdict(cfg), 'argv': argv,
                'classnames': names, 'test_map': 50.0} | heads_run.checkpoint_entries(model), path)
    return model


@pytest.mark.parametrize('head', ['q2l', 'sgre'])
def test_predict_rebuilds_a_head_of_non_default_sizes(head, tmp_path, image, capsys):
    """Item 8: predict.py rebuilt q2l / sgre with the papers' sizes whatever the checkpoint said, and
    refused a checkpoint that --evaluate accepts; both now go through checkpoints.rebuild_classifier."""
    emb = {'label_embeddings': np.random.RandomState(1).randn(20, 12).astype(np.float32)} if head == 'sgre' else {}
    path = tmp_path / 'best.pt'
    trained = checkpoint_as_trained(path, ['-d', 'pascal', '-m', 'small_cnn', '--head', head] + SMALL_HEADS[head],
                                    **emb)
    model, names, size = predict.rebuild_from_checkpoint(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    assert predict.main([str(path), str(image), '--num-workers', '0']) == 0
    assert capsys.readouterr().out.startswith('file,labels,label_scores,top1,')


def test_a_clip_vision_checkpoint_needs_no_clip_config_file(tmp_path, tiny_pascal, tiny_clip, tiny_text_features,
                                                            image, capsys):
    """Item 8: the CLIP config of a clip_vision run is stored in its checkpoints; moving the JSON file
    away no longer breaks --evaluate or predict.py."""
    config = tmp_path / 'my-clip.json'
    config.write_text(Path(tiny_clip['config']).read_text())
    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features, epochs=1)
    args[args.index('--clip-model') + 1] = str(config)
    args[args.index('small_cnn')] = 'clip_vision'
    assert main_clip.main(args + ['-l', 'an']) == 0
    folder = tmp_path / 'results' / 'pascal_an_clip_vision_s0'
    best = json.loads((folder / 'log.json').read_text())['best_test_map']
    config.unlink()
    capsys.readouterr()
    assert main_clip.main(['--evaluate', str(folder / 'best.pt')]) == 0
    assert float(capsys.readouterr().out.split()[-1]) == pytest.approx(best, abs=0.005)
    assert predict.main([str(folder / 'best.pt'), str(image), '--num-workers', '0']) == 0
    capsys.readouterr()
    # QA round 3: the refusal advised --init-from, which has nothing to do with evaluating
    assert main_clip.main(['--evaluate', str(folder / 'best.pt'), '--lr', '0.5']) == 2
    one_error_line(capsys.readouterr().err, "changes settings of the saved run (lr: 0.001 -> 0.5); --evaluate tests a "
                                            "checkpoint in its own settings")


def test_a_rebuilt_clip_vision_keeps_the_quickgelu_it_was_trained_with(tiny_clip):
    """Item 8: an 'openai' tag forces QuickGELU (clip_loading.load_clip); the stored CLIP config records it,
    so the rebuilt classifier computes what the trained one did (GELU would give other logits)."""
    import open_clip

    clip_loading.clip_config(tiny_clip['config'])  # registers the tiny config with open_clip
    clip = open_clip.create_model(Path(tiny_clip['config']).stem, pretrained=None, force_quick_gelu=True)
    torch.manual_seed(0)
    trained = models.build_classifier('clip_vision', 3, clip_model=clip).eval()
    settings = dict(model='clip_vision', clip_model=tiny_clip['config'], image_size=32, dataset='demo')
    ckpt = {'model': trained.state_dict(), 'config': settings, 'epoch': 1, 'classnames': ['a', 'b', 'c']}
    ckpt |= checkpoints.clip_entries(checkpoints.stored_settings(ckpt), trained)
    assert ckpt['clip_config']['config']['quick_gelu'] is True
    rebuilt = checkpoints.rebuild_classifier(ckpt, 'best.pt').model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))


def test_evaluate_on_another_data_root_trains_no_demo_clip(tmp_path, monkeypatch, capsys):
    """Item 9: --evaluate needs the test split only: the demo's tiny CLIP is not trained for it."""
    from preproc import make_demo

    def no_clip(*a, **k):
        raise AssertionError('the demo CLIP was trained for --evaluate')

    monkeypatch.setattr(make_demo, 'train_demo_clip', no_clip)
    monkeypatch.setattr(make_demo, 'ensure_demo', functools.partial(make_demo.ensure_demo, num_train=40, num_test=20))
    path = tmp_path / 'best.pt'
    checkpoint_as_trained(path, ['-d', 'demo', '--data-root', str(tmp_path / 'first'), '--device', 'cpu',
                                 '--num-workers', '0'], num_classes=30)
    assert main_clip.main(['--evaluate', str(path), '--data-root', str(tmp_path / 'other')]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('Test mAP of demo epoch 1: ')
    assert not (tmp_path / 'other' / 'demo' / 'clip').exists()


def test_the_demo_gives_the_heads_a_demo_size():
    """Item 9: -d demo --head q2l took the paper's sizes (hidden 2048, ffn 8192): minutes per CPU step."""
    cfg, _ = main_clip.parse_args(['-d', 'demo', '--head', 'q2l'])
    assert (cfg.q2l_hidden, cfg.q2l_ffn, cfg.q2l_heads) == (256, 1024, 4)
    cfg, _ = main_clip.parse_args(['-d', 'demo', '--head', 'sgre'])
    assert (cfg.sgre_att_dim, cfg.sgre_ffn, cfg.q2l_hidden) == (256, 1024, 2048)
    assert main_clip.parse_args(['-d', 'demo', '--head', 'q2l', '--q2l-hidden', '64'])[0].q2l_hidden == 64
    assert main_clip.parse_args(['-d', 'coco', '--head', 'q2l'])[0].q2l_hidden == 2048
    assert main_clip.parse_args(['-d', 'demo'])[0].q2l_hidden == 2048  # a linear run's settings do not change


def test_only_ranks_other_than_0_prefix_their_lines(monkeypatch, capsys):
    """Item 9: under torchrun rank 0 prints exactly what one process prints (the closing lines that
    scripts grep); another rank's errors carry [rank r]."""
    try:
        for rank in (0, 1):
            monkeypatch.setattr(distributed, '_process', distributed.ProcessInfo(rank, 2, rank))
            distributed.setup_logging()
            distributed.log.info('Best epoch: 3')
            distributed.log.error('error: lost contact')
        out, err = capsys.readouterr()
        assert out.splitlines() == ['Best epoch: 3']
        assert err.splitlines() == ['error: lost contact', '[rank 1] error: lost contact']
    finally:
        monkeypatch.undo()
        distributed.setup_logging()


def test_init_from_another_run_s_checkpoint_is_refused_before_clip(tmp_path, run_args, monkeypatch, capsys):
    """Item 10: classes, backbone and head compared at start (not after the CLIP pass), both named."""
    path = tmp_path / 'demo_best.pt'
    checkpoint_as_trained(path, ['-d', 'demo'], num_classes=30)

    def no_clip(*a, **k):
        raise AssertionError('CLIP was loaded before --init-from was checked')

    monkeypatch.setattr(clip_loading, 'load_clip', no_clip)
    assert main_clip.main(run_args('--init-from', str(path), '--head', 'q2l', *SMALL_HEADS['q2l'])) == 2
    one_error_line(capsys.readouterr().err, f'--init-from {path}',
                   'checkpoint: demo, 30 classes, small_cnn/linear; this run: pascal, 20 classes, small_cnn/q2l')
    assert not run_dir(tmp_path).exists()


def test_init_from_weights_that_do_not_fit_name_the_first_key(tmp_path, run_args, capsys):
    """Item 10: the first mismatching key and both shapes (the message was cut after 'Classifier:')."""
    path = tmp_path / 'edited.pt'
    checkpoint_as_trained(path, ['-d', 'pascal', '-m', 'small_cnn'])
    ckpt = torch.load(path, weights_only=True)
    ckpt['model']['head.weight'] = torch.zeros(20, 7)
    torch.save(ckpt, path)
    assert main_clip.main(run_args('--init-from', str(path))) == 2
    one_error_line(capsys.readouterr().err, '--init-from', 'head.weight is 20 x 7 in the file, 20 x 256 in the model')


def test_init_from_a_vit_of_another_input_size_is_refused_before_clip(tmp_path, run_args, monkeypatch, capsys):
    """A ViT's pos_embed follows --image-size, which the compared settings do not hold: the run's
    classifier is built on the meta device at start and every weight's shape compared, so the
    mismatch is one line naming the key and both shapes before CLIP is loaded (it was found by
    load_state_dict after the frozen-CLIP pseudo-labels)."""
    path = tmp_path / 'vit32.pt'
    cfg, _ = main_clip.parse_args(['-d', 'pascal', '-m', 'timm:test_vit', '--image-size', '32', '--no-pretrained'])
    model = models.build_classifier(cfg.model, 20, pretrained=False, image_size=32)
    torch.save({'model': model.state_dict(), 'epoch': 1, 'config': dataclasses.asdict(cfg), 'argv': [],
                'classnames': class_text_features.read_classnames('pascal'), 'test_map': 50.0}, path)

    def no_clip(*a, **k):
        raise AssertionError('CLIP was loaded before --init-from was checked')

    monkeypatch.setattr(clip_loading, 'load_clip', no_clip)
    assert main_clip.main(run_args('-m', 'timm:test_vit', '--image-size', '48', '--init-from', str(path))) == 2
    one_error_line(capsys.readouterr().err, f'--init-from {path}',
                   'trunk.pos_embed is 1 x 5 x 64 in the file, 1 x 10 x 64 in the model',
                   '(checkpoint: --image-size 32; this run: --image-size 48)')
    assert not run_dir(tmp_path).exists()


@pytest.mark.parametrize('model, head', [('small_cnn', 'sgre'), ('timm:test_vit', 'q2l'), ('clip_vision', 'linear')])
def test_the_meta_device_build_has_the_names_and_shapes_of_the_real_one(model, head, tiny_clip):
    """checkpoints.classifier_of on the meta device (the --init-from check at start) gives the state_dict
    keys and shapes of the same build on the CPU."""
    cfg, _ = main_clip.parse_args(['-d', 'pascal', '-m', model, '--head', head, '--image-size', '48',
                                   '--clip-model', tiny_clip['config'], *SMALL_HEADS.get(head, [])])
    clip = clip_loading.clip_config(cfg.clip_model) if model == 'clip_vision' else None
    emb = np.zeros((20, 12), np.float32) if head == 'sgre' else None
    meta = checkpoints.classifier_of(cfg, 20, clip=clip, embeddings=emb, device='meta').state_dict()
    real = checkpoints.classifier_of(cfg, 20, clip=clip, embeddings=emb).state_dict()
    assert [(k, v.shape) for k, v in meta.items()] == [(k, v.shape) for k, v in real.items()]
    assert all(v.is_meta for v in meta.values()) and not any(v.is_meta for v in real.values())


def test_backbone_weights_are_loaded_and_checked_before_clip(tmp_path, run_args, monkeypatch, capsys):
    """Item 10: a weights file that does not fit is named with its first mismatching key, before the CLIP
    pass; a checkpoint of this project passed as backbone weights is pointed to --init-from."""
    def no_clip(*a, **k):
        raise AssertionError('CLIP was loaded before --backbone-weights was checked')

    monkeypatch.setattr(clip_loading, 'load_clip', no_clip)
    wrong = tmp_path / 'wrong.pth'
    torch.save({'conv1.weight': torch.zeros(2, 3)}, wrong)
    args = [a for a in run_args() if a != '--no-pretrained']
    args[args.index('small_cnn')] = 'resnet50'
    assert main_clip.main(args + ['--backbone-weights', str(wrong)]) == 2
    one_error_line(capsys.readouterr().err, f'--backbone-weights {wrong}',
                   'conv1.weight is 2 x 3 in the file, 64 x 3 x 7 x 7 in the model')
    ours = tmp_path / 'best.pt'
    checkpoint_as_trained(ours, ['-d', 'pascal', '-m', 'small_cnn'])
    assert main_clip.main(args + ['--backbone-weights', str(ours)]) == 2
    one_error_line(capsys.readouterr().err, f'--init-from {ours}')


def test_a_run_folder_or_a_text_file_where_a_checkpoint_belongs(tmp_path, run_args, image, capsys):
    """Item 11: 'is a run folder; pass RUN/best.pt' for predict.py, --init-from and --evaluate; a text
    file is 'not a checkpoint' (it was said to hold Python objects)."""
    folder = tmp_path / 'results' / 'earlier'
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text('{}')
    hint = f'{folder} is a run folder; pass {folder / "best.pt"}'
    assert predict.main([str(folder), str(image)]) == 2
    assert hint in capsys.readouterr().err
    assert main_clip.main(['--evaluate', str(folder)]) == 2
    one_error_line(capsys.readouterr().err, hint)
    assert main_clip.main(run_args('--init-from', str(folder))) == 2
    one_error_line(capsys.readouterr().err, '--init-from', hint)
    text = tmp_path / 'notes.pt'
    text.write_text('model: 1\nconfig: 2\n')
    assert main_clip.main(['--evaluate', str(text)]) == 2
    line = one_error_line(capsys.readouterr().err, f'{text}: not a checkpoint')
    assert 'Python objects' not in line


def test_clip_and_checkpoint_loading_say_nothing_of_torch_s_internals(tmp_path, tiny_clip):
    """Item 11: no relayed 'weights_only=False' advice, no pickle-protocol warning."""
    clip, _ = clip_loading.load_clip(tiny_clip['config'], None)
    protocol3 = tmp_path / 'protocol3.pt'  # read by torch's safe loader, with a warning
    torch.save(clip.state_dict(), protocol3, pickle_protocol=3)
    protocol5 = tmp_path / 'protocol5.pt'  # refused by it
    torch.save(clip.state_dict(), protocol5, pickle_protocol=5)
    objects = tmp_path / 'objects.pt'
    torch.save({'state_dict': clip.state_dict(), 'extra': Path('x')}, objects)
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        clip_loading.load_clip(tiny_clip['config'], str(protocol3))
        for path in (protocol5, objects):
            with pytest.raises(clip_loading.ModelLoadError) as error:
                clip_loading.load_clip(tiny_clip['config'], str(path))
            messages.append(str(error.value))
        ckpt = tmp_path / 'best.pt'
        torch.save({'model': {}, 'config': {}, 'epoch': 1}, ckpt, pickle_protocol=3)
        checkpoints.load_checkpoint(ckpt)
    assert not [w for w in caught if 'pickle protocol' in str(w.message)], [str(w.message) for w in caught]
    for path, message in zip((protocol5, objects), messages):
        assert str(path) in message and 'no code in it ran' in message and '--clip-pretrained' in message
        assert 'weights_only' not in message and 'Weights only' not in message and 'trust' not in message


@pytest.mark.parametrize('size', [-5, 0, 10 ** 6, 'x'])
def test_an_edited_image_size_is_refused_in_one_line(size, tmp_path, image, capsys):
    """Item 11."""
    path = tmp_path / 'best.pt'
    checkpoint_as_trained(path, ['-d', 'pascal', '-m', 'small_cnn'])
    ckpt = torch.load(path, weights_only=True)
    ckpt['config']['image_size'] = size
    torch.save(ckpt, path)
    assert predict.main([str(path), str(image), '--num-workers', '0']) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: {path}: its image_size {size!r} is no input size (1 to 4096): the file was edited or ' \
                  'damaged; use the run\'s own best.pt or last.pt'


# ------------------------------------------------------------------------------ item 12: inputs

@pytest.mark.parametrize('tag', ['rps1.5', 'fpc0', 'foo', 'rps-0.1'])
def test_observed_tags_are_checked_before_anything_else(tag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main_clip.parse_args(['-d', 'demo', '-l', 'CSL', '--observed', tag, '--data-root', str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'--observed {tag}: a tag is rps<P>' in err and '0 <= P <= 1' in err and 'or full' in err
    assert list(tmp_path.iterdir()) == []


def test_an_observed_file_without_a_positive_is_refused(tmp_path, tiny_clip, tiny_text_features, capsys):
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=5)
    labels = np.load(data / 'pascal' / 'formatted_train_labels.npy')
    np.save(data / 'pascal' / 'formatted_train_labels_obs_rps1.0.npy', np.zeros_like(labels))
    args = tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=1)
    assert main_clip.main(args + ['-l', 'CSL', '--observed', 'rps1.0']) == 2
    one_error_line(capsys.readouterr().err, 'formatted_train_labels_obs_rps1.0.npy holds no observed positive')


def test_hints_carry_the_data_root(tmp_path, tiny_clip, tiny_text_features, capsys):
    """Item 12: the command a hint names writes where this run reads."""
    empty = tmp_path / 'nothing'
    args = tiny_run_args(empty, tmp_path, tiny_clip, tiny_text_features, epochs=1)
    assert main_clip.main(args) == 2
    one_error_line(capsys.readouterr().err, f'python preproc/format_pascal.py --save-path {empty / "pascal"}`')
    data = write_pascal_like(tmp_path / 'data', num_train=20, num_val=5)
    (data / 'pascal' / 'formatted_train_labels_obs.npy').unlink()
    assert main_clip.main(tiny_run_args(data, tmp_path, tiny_clip, tiny_text_features, epochs=1)) == 2
    one_error_line(capsys.readouterr().err, f'generate_observed_labels.py --dataset pascal --data-root {data}`')
    assert main_clip.main(['-d', 'demo', '--evaluate', str(tmp_path / 'x.pt')]) == 2  # (no hint: no such file)
    capsys.readouterr()
    import datasets
    assert datasets.formatting_hint('demo', tmp_path) == f'run `python main_clip.py -d demo --data-root {tmp_path}` ' \
                                                         '(it creates the demo data)'
    assert datasets.formatting_hint('coco', main_clip.DEFAULT_DIRS['data']).endswith('format_coco.py`')


# ------------------------------------------------------------------------------ item 13: predict.py --output

def test_predict_output_replaced_upper_case_suffix_and_a_file_as_parent(tmp_path, image, capsys):
    path = tmp_path / 'best.pt'
    checkpoint_as_trained(path, ['-d', 'pascal', '-m', 'small_cnn'])
    out = tmp_path / 'LABELS.CSV'
    argv = [str(path), str(image), '--num-workers', '0', '--output', str(out)]
    assert predict.main(argv) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == f'1 images labelled -> {out}; 0 files skipped'
    assert out.read_text().startswith('file,labels')
    assert predict.main(argv) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f'1 images labelled -> {out} (replaced the file that was there); 0 files skipped'
    assert predict.main(argv[:-1] + [str(tmp_path / 'labels.Json')]) == 0
    assert json.loads((tmp_path / 'labels.Json').read_text())['images'][0]['file'] == str(image)
    capsys.readouterr()
    assert predict.main(argv[:-1] + [str(image / 'labels.csv')]) == 2
    assert capsys.readouterr().err.strip() == (f'error: --output {image / "labels.csv"}: its parent {image} is a file, '
                                               'not a folder; choose another --output')

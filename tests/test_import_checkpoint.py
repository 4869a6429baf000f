"""preproc/import_checkpoint.py: the seed systems' published checkpoints as checkpoints of this project
(seed_checkpoints.py, seed_trunks.py, seed_files.py; docs/seed-checkpoints.md).

How the fixtures in tests/fixtures/seed_checkpoints/ were made. Each original's own model code
(github.com/Alibaba-MIIL/PartialLabelingCSL, SlongLiu/query2labels, jasonseu/SGRE, k0u-id/CCD, at the commits
of docs/seed-checkpoints.md) was run in a scratch folder outside this repository, stubbing only what needs a
download or a CUDA extension: InplaceABN (a module with inplace_abn v1.0.x's parameters, weight, bias,
running_mean and running_var, and its CPU forward, act((x - mean) / sqrt(var + eps) * (|w| + eps) + b));
the anti-aliasing filter's `.cuda()`; torchvision's `pretrained=True` (empty ResNets); the imports of
Query2Label's CvT (not built). Then:
- `<name>.npz`: the original model built small with its own constructor arguments (CSL's TResNet with
  layers [1, 1, 1, 1] and width_factor 0.125; Query2Label's build_q2l with a torchvision ResNet-18 or its
  TResNet and Swin classes made small; SGRE's MLIC on its ResNet-18 inside its ModelEma; CCD's
  ImageClassifier, full size) in eval mode; every state-dict entry drawn by `recipe_tensor` below from
  numpy's RandomState(seed), key by key in the model's own order, except the constant buffers the original
  computes (position encodings, Swin's relative-position index and masks) and CCD's alpha (set to 3 first,
  as its train.py sets it with --coeff 3), kept as they were (`keep/<key>`; SGRE's file of label embeddings,
  RandomState(5) normal, too); the input
  RandomState(input_seed).random_sample(shape), given to the original as it is; `logits`, the original
  module's output on it (float32). `meta` (JSON) holds the layout (key, shape, dtype), the seeds, how the
  original's file wraps the state dict, the constructor call and, for SGRE, its config.yaml settings.
- `<name>.layout.json.gz`: the key layout (names, shapes) of the full-size published models, built by the
  originals' own code on the meta device (Query2Label's Swin-L on the CPU: its constructor calls .item()).
- `ccd_munch_settings.pt`: torch.save((state, P)) with P a real munch.Munch (munch 4.0.0), as CCD's train.py
  saves its P.

The tests write each fixture as the original saves it, import it with the command line, rebuild the
classifier through the project's one rebuild path (checkpoints.rebuild_classifier, that of --evaluate and
predict.py) and compare the logits on the same input within 1e-5. The small TResNet and Swin are held by
timm's own classes at the same sizes, registered as timm models below (`--model timm:vlpl_test_*`).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models import register_model

import checkpoints
import image_io
import main_clip
import predict
import seed_checkpoints
import seed_files
from preproc import import_checkpoint

FIXTURES = Path(__file__).parent / 'fixtures' / 'seed_checkpoints'


# Small timm models with the originals' small architectures (a tiny checkpoint needs a backbone that holds it:
# --model timm:NAME), registered in timm's model registry as any timm model is.
def _plain(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')}


if not timm.is_model('vlpl_test_tresnet'):
    @register_model
    def vlpl_test_tresnet(pretrained=False, **kwargs):
        from timm.models.tresnet import TResNet
        return TResNet(layers=[1, 1, 1, 1], width_factor=0.125, **_plain(kwargs))

    @register_model
    def vlpl_test_swin(pretrained=False, **kwargs):
        from timm.models.swin_transformer import SwinTransformer
        return SwinTransformer(img_size=128, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
                               **_plain(kwargs))


def recipe_tensor(rs: np.random.RandomState, key: str, shape, dtype: str) -> torch.Tensor:
    """The fixtures' random weights, drawn from rs in key order: running_var 0.5 + U[0, 1); running_mean,
    biases and GroupWiseLinear's b 0.1 N(0, 1); other vectors (norm scales) (1 + 0.2 N(0, 1)) with sign -1 at
    probability 0.2 (InplaceABN's |w| is exercised); matrices N(0, 1) / sqrt(fan_in) (fan_in: the product of
    the dimensions after the first, the last one for a 1 x K x d tensor); int64 entries 0."""
    shape = tuple(shape)
    if dtype == 'int64':
        return torch.zeros(shape, dtype=torch.int64)
    name = key.rsplit('.', 1)[-1]
    n = int(np.prod(shape)) if shape else 1
    if name == 'running_var':
        v = 0.5 + rs.random_sample(n)
    elif name == 'running_mean' or name.endswith('bias') or name == 'b':
        v = 0.1 * rs.standard_normal(n)
    elif len(shape) == 1:
        v = (1.0 + 0.2 * rs.standard_normal(n)) * np.where(rs.random_sample(n) < 0.2, -1.0, 1.0)
    else:
        fan_in = shape[-1] if (len(shape) == 3 and shape[0] == 1) else int(np.prod(shape[1:]))
        v = rs.standard_normal(n) / np.sqrt(fan_in)
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def load_fixture(name: str) -> tuple[dict, dict, np.lib.npyio.NpzFile]:
    """(meta, the original's state dict, the npz) of a fixture."""
    npz = np.load(FIXTURES / f'{name}.npz')
    meta = json.loads(str(npz['meta']))
    rs = np.random.RandomState(meta['seed'])
    state = {}
    for key, shape, dtype in meta['layout']:
        kept = f'keep/{key}'
        state[key] = torch.from_numpy(npz[kept]) if kept in npz.files else recipe_tensor(rs, key, shape, dtype)
    return meta, state, npz


class _Munch(dict):
    """Pickled as munch.Munch pickles (NEWOBJ, SETITEMS, BUILD with the items): CCD's P."""
    __module__ = 'munch'
    __qualname__ = 'Munch'

    def __getstate__(self):
        return dict(self)


def save_as_original(meta: dict, state: dict, path: Path) -> None:
    """The state dict wrapped as the original's training or release code saves it."""
    wrapper = meta['wrapper']
    kind = wrapper['kind']
    if kind == 'csl_published':  # infer.py: state['model'], state['idx_to_class']
        obj = {'model': state, 'idx_to_class': {int(k): v for k, v in wrapper['idx_to_class'].items()}}
    elif kind == 'q2l':  # main_mlc.py save_checkpoint
        sd = {('module.' + k if wrapper['module_prefix'] else k): v for k, v in state.items()}
        obj = {'epoch': wrapper['epoch'], 'arch': wrapper['arch'], 'state_dict': sd, 'best_mAP': np.float64(84.9),
               'optimizer': {'state': {}, 'param_groups': []}}
    elif kind == 'ccd':  # train.py: torch.save((model.state_dict(), P), path)
        module = types.ModuleType('munch')
        module.Munch = _Munch
        sys.modules['munch'] = module
        try:
            obj = (state, _Munch({k: tuple(v) if isinstance(v, list) else v for k, v in wrapper['P'].items()}))
            torch.save(obj, path)
        finally:
            del sys.modules['munch']
        return
    else:  # CSL's train.py and SGRE's EMA (its keys already 'module.*'): the bare state dict
        obj = state
    torch.save(obj, path)


# name -> (--from, extra flags, expected -m, --head, input normalisation, input size)
CASES = {
    'csl_tresnet_openimages_tiny': ('csl', ['--model', 'timm:vlpl_test_tresnet', '--image-size', '64'],
                                    'timm:vlpl_test_tresnet', 'bottleneck', 'none', 64),
    'csl_tresnet_coco_tiny': ('csl', ['--model', 'timm:vlpl_test_tresnet', '-d', 'voc2007'], 'timm:vlpl_test_tresnet',
                              'linear', 'none', 448),  # train.py --image-size
    'q2l_resnet18_proj_tiny': ('q2l', ['-d', 'voc2007'], 'timm:resnet18', 'q2l', 'imagenet', 128),
    'q2l_resnet18_prenorm_tiny': ('q2l', ['-d', 'voc2007', 'CONFIG'], 'timm:resnet18', 'q2l', 'imagenet', 64),
    'q2l_tresnet_tiny': ('q2l', ['-d', 'voc2007', '--model', 'timm:vlpl_test_tresnet', 'CONFIG'],
                         'timm:vlpl_test_tresnet', 'q2l', 'none', 64),
    'q2l_swin_tiny': ('q2l', ['-d', 'voc2007', '--model', 'timm:vlpl_test_swin'], 'timm:vlpl_test_swin', 'q2l',
                      'imagenet', 128),
    'sgre_resnet18_bert_tiny': ('sgre', ['CONFIG', 'EMBEDDINGS'], 'timm:resnet18', 'sgre', 'imagenet', 128),
    'sgre_resnet18_random_tiny': ('sgre', [], 'timm:resnet18', 'sgre', 'imagenet', 64),
    'ccd_resnet50': ('ccd', [], 'resnet50', 'linear', 'imagenet', 448),  # its P's train_resize
}
# The Query2Label settings files (q2l_infer.py --config) of two fixtures: what the weights do not say
Q2L_CONFIGS = {'q2l_resnet18_prenorm_tiny': {'nheads': 8, 'pre_norm': True, 'dropout': 0.1},
               'q2l_tresnet_tiny': {'nheads': 4, 'orid_norm': True}}


def import_args(name: str, tmp_path: Path, meta: dict, npz) -> list[str]:
    kind, extra, *_ = CASES[name]
    args = []
    for flag in extra:
        if flag == 'CONFIG' and kind == 'q2l':
            (tmp_path / 'config.json').write_text(json.dumps(Q2L_CONFIGS[name]))
            args += ['--config', str(tmp_path / 'config.json')]
        elif flag == 'CONFIG':  # SGRE's config.yaml, as lib/util.py prepare_env writes it: `key: value` lines
            (tmp_path / 'config.yaml').write_text(''.join(f'{k}: {v}\n' for k, v in meta['config'].items()))
            args += ['--config', str(tmp_path / 'config.yaml')]
        elif flag == 'EMBEDDINGS':
            np.save(tmp_path / 'bert.npy', npz['keep/label_embeddings'])
            args += ['--label-embeddings', str(tmp_path / 'bert.npy')]
        else:
            args.append(flag)
    return args


def model_input(meta: dict, input_norm: str) -> torch.Tensor:
    """What this project's pipeline gives for the input the original received: the same tensor where the
    original normalised with ImageNet's mean and std, the pipeline's normalisation of it where the original
    took [0, 1] pixels (the classifier undoes it: models.Classifier input_norm 'none')."""
    original = torch.from_numpy(np.random.RandomState(meta['input_seed']).random_sample(meta['input_shape'])
                                .astype(np.float32))
    if input_norm == 'imagenet':
        return original
    mean = torch.tensor(image_io.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(image_io.IMAGENET_STD).view(1, 3, 1, 1)
    return (original - mean) / std


def run_import(args: list[str], capsys) -> tuple[int, str, str]:
    code = import_checkpoint.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize('name', list(CASES))
def test_imported_logits_equal_the_originals(name, tmp_path, capsys):
    meta, state, npz = load_fixture(name)
    kind, _, backbone, head, input_norm, expected_size = CASES[name]
    source, out = tmp_path / 'published.pth', tmp_path / 'imported.pt'
    save_as_original(meta, state, source)
    code, stdout, err = run_import(['--from', kind, str(source), str(out)] + import_args(name, tmp_path, meta, npz),
                                   capsys)
    assert code == 0, err
    ckpt = checkpoints.load_checkpoint(out)  # weights_only, as --evaluate and predict.py read it
    cfg = ckpt['config']
    assert (cfg['model'], cfg['head'], cfg['input_norm']) == (backbone, head, input_norm)
    assert ckpt['imported']['source'] == kind and ckpt['argv'][:2] == ['-d', cfg['dataset']]
    rebuilt = checkpoints.rebuild_classifier(ckpt, str(out))
    model, classnames, size = rebuilt.model, rebuilt.classnames, rebuilt.image_size
    assert size == expected_size and len(classnames) == npz['logits'].shape[1]
    with torch.no_grad():
        logits = model(model_input(meta, input_norm))
    difference = (logits - torch.from_numpy(npz['logits'])).abs().max().item()
    print(f'{name}: max |logit difference| {difference:.2e} (logits up to {logits.abs().max().item():.2f})')
    assert difference < 1e-5


def test_the_imported_command_line_is_the_models(tmp_path, capsys):
    """Sizes read from the tensors and settings from the original's config file reach the command line
    --evaluate re-parses: a Query2Label model with 8 heads, pre-norm and decoder self-attention."""
    name = 'q2l_resnet18_prenorm_tiny'
    meta, state, npz = load_fixture(name)
    save_as_original(meta, state, tmp_path / 'q2l.pth')
    code, stdout, err = run_import(['--from', 'q2l', str(tmp_path / 'q2l.pth'), str(tmp_path / 'out.pt')]
                                   + import_args(name, tmp_path, meta, npz), capsys)
    assert code == 0, err
    ckpt = checkpoints.load_checkpoint(tmp_path / 'out.pt')
    cfg, _ = main_clip.parse_args(ckpt['argv'])
    assert (cfg.q2l_hidden, cfg.q2l_ffn, cfg.q2l_heads, cfg.q2l_enc_layers, cfg.q2l_dec_layers) == (512, 256, 8, 1, 2)
    assert cfg.q2l_pre_norm and cfg.q2l_dec_self_attn and cfg.image_size == 64
    assert ckpt['epoch'] == 7 and ckpt['config'] == dataclasses.asdict(cfg)
    assert 'builds as: -d voc2007 -m timm:resnet18 --head q2l' in stdout


def test_assumptions_are_reported(tmp_path, capsys):
    """What the file does not say is said in the report (and kept in the checkpoint)."""
    name = 'sgre_resnet18_random_tiny'
    meta, state, npz = load_fixture(name)
    save_as_original(meta, state, tmp_path / 'sgre.pth')
    code, stdout, _ = run_import(['--from', 'sgre', str(tmp_path / 'sgre.pth'), str(tmp_path / 'out.pt')], capsys)
    assert code == 0
    assumed = [line for line in stdout.splitlines() if line.startswith('assumed: ')]
    assert any('num_heads 8' in line for line in assumed) and any('voc2007 from its 20 classes' in line
                                                                   for line in assumed)
    assert checkpoints.load_checkpoint(tmp_path / 'out.pt')['imported']['assumed'] == [a[9:] for a in assumed]


# --- the full-size published layouts ------------------------------------------------------------

def meta_state(name: str) -> tuple[dict, dict]:
    with gzip.open(FIXTURES / f'{name}.layout.json.gz', 'rt') as f:
        data = json.load(f)
    return data, {k: torch.empty(shape, dtype=getattr(torch, dtype), device='meta') for k, shape, dtype in data['layout']}


# name -> (--from, how the file wraps the state, options, expected -m, --head, input size)
LAYOUTS = {
    'csl_tresnet_m_openimages': ('csl', 'csl', {}, 'tresnet_m', 'bottleneck', 224),
    'csl_tresnet_v2_l_openimages': ('csl', 'csl', {}, 'timm:tresnet_v2_l', 'bottleneck', 224),
    'q2l_r101_448': ('q2l', 'q2l', {}, 'resnet101', 'q2l', 448),
    'q2l_r101_576': ('q2l', 'q2l', {}, 'resnet101', 'q2l', 576),
    'q2l_tresnetl_448': ('q2l', 'q2l', {}, 'tresnet_l', 'q2l', 448),
    'q2l_tresnetl_v2_448': ('q2l', 'q2l', {}, 'timm:tresnet_v2_l', 'q2l', 448),
    'q2l_swinl_384': ('q2l', 'q2l', {}, 'swin_large', 'q2l', 384),
    'sgre_r101_coco': ('sgre', 'bare', {'dataset': None}, 'resnet101', 'sgre', 448),
}


@pytest.mark.parametrize('name', list(LAYOUTS))
def test_every_tensor_of_the_published_models_has_its_place(name):
    """The full-size layout of each published model (names and shapes, built by the original's code) maps
    onto the classifier its layout names, every tensor to one of the same shape and none left over: the
    rebuild path loads it strictly (on the meta device: no weights)."""
    kind, wrap, _, backbone, head, size = LAYOUTS[name]
    data, state = meta_state(name)
    count = {'csl': 9605, 'q2l': 80, 'sgre': 80}[kind]
    options = seed_checkpoints.Options()
    if wrap == 'csl':
        obj = {'model': state, 'idx_to_class': {i: f'/m/{i}' for i in range(count)}}
    elif wrap == 'q2l':
        obj = {'epoch': 80, 'state_dict': state}
    else:
        obj = state
        options.label_embeddings = np.zeros((count, data['embed_dim']), np.float32)
    imported = seed_checkpoints.convert(kind, obj, name, options)
    cfg = import_checkpoint.parse_settings(imported.argv, name)
    assert (cfg.model, cfg.head, cfg.image_size) == (backbone, head, size)
    ckpt = dict(model=imported.state, config=dataclasses.asdict(cfg), argv=imported.argv,
                classnames=imported.classnames, epoch=0, **imported.extras)
    with torch.device('meta'):
        rebuilt = checkpoints.rebuild_classifier(ckpt, name)
    model, classnames = rebuilt.model, rebuilt.classnames
    assert len(classnames) == count
    expected = model.state_dict()
    assert set(expected) == set(imported.state)
    assert all(tuple(expected[k].shape) == tuple(v.shape) for k, v in imported.state.items())


# --- refusals: one line, nothing written -----------------------------------------------------------

def write_fixture(name: str, path: Path) -> Path:
    meta, state, _ = load_fixture(name)
    save_as_original(meta, state, path)
    return path


def refused(args: list[str], out: Path, capsys) -> str:
    code, _, err = run_import(args, capsys)
    assert code == 2 and err.count('\n') == 1 and err.startswith('import_checkpoint: error: ')
    assert not out.exists() or out.read_bytes() == b'kept'
    return err


def test_a_checkpoint_of_another_kind_is_named(tmp_path, capsys):
    source = write_fixture('q2l_resnet18_proj_tiny', tmp_path / 'q2l.pth')
    err = refused(['--from', 'csl', str(source), str(tmp_path / 'out.pt')], tmp_path / 'out.pt', capsys)
    assert 'not a CSL checkpoint' in err and 'it looks like a Query2Label checkpoint: --from q2l' in err
    err = refused(['--from', 'ccd', str(source), str(tmp_path / 'out.pt')], tmp_path / 'out.pt', capsys)
    assert 'not a CCD checkpoint' in err and '--from q2l' in err


def test_a_checkpoint_of_this_project_is_named(tmp_path, capsys):
    source = write_fixture('csl_tresnet_coco_tiny', tmp_path / 'csl.pth')
    out = tmp_path / 'ours.pt'
    assert run_import(['--from', 'csl', str(source), str(out), '--model', 'timm:vlpl_test_tresnet', '-d', 'pascal'],
                      capsys)[0] == 0
    err = refused(['--from', 'sgre', str(out), str(tmp_path / 'again.pt')], tmp_path / 'again.pt', capsys)
    assert 'not an SGRE checkpoint' in err and 'a checkpoint of this project already' in err


def test_files_that_are_no_checkpoint(tmp_path, capsys):
    out = tmp_path / 'out.pt'
    err = refused(['--from', 'q2l', str(tmp_path / 'missing.pth'), str(out)], out, capsys)
    assert 'missing.pth: no such file' in err
    (tmp_path / 'notes.txt').write_text('not a checkpoint\n')
    err = refused(['--from', 'q2l', str(tmp_path / 'notes.txt'), str(out)], out, capsys)
    assert 'not a PyTorch checkpoint (neither a zip archive nor a pickle)' in err
    (tmp_path / 'cut.pth').write_bytes((FIXTURES / 'ccd_munch_settings.pt').read_bytes()[:900])
    err = refused(['--from', 'q2l', str(tmp_path / 'cut.pth'), str(out)], out, capsys)
    assert 'not a readable PyTorch checkpoint (its zip archive is cut short' in err
    torch.save({'state_dict': {'x': torch.ones(1)}, 'hook': Path('.')}, tmp_path / 'objects.pth')
    err = refused(['--from', 'q2l', str(tmp_path / 'objects.pth'), str(out)], out, capsys)
    assert 'holds Python objects' in err and 'pathlib' in err and 'no code in it ran' in err


def test_ccds_munch_settings_read_as_data():
    obj = seed_files.read_file(FIXTURES / 'ccd_munch_settings.pt')
    state, settings = obj
    assert settings['dataset'] == 'voc12' and tuple(settings['train_resize']) == (448, 448)
    assert torch.equal(state['alpha'], torch.full((1, 20), 3.0))


def test_an_existing_output_is_kept(tmp_path, capsys):
    source = write_fixture('csl_tresnet_coco_tiny', tmp_path / 'csl.pth')
    out = tmp_path / 'out.pt'
    out.write_bytes(b'kept')
    err = refused(['--from', 'csl', str(source), str(out), '--model', 'timm:vlpl_test_tresnet', '-d', 'voc2007'],
                  out, capsys)
    assert 'exists: choose another OUT or add --overwrite' in err


def test_a_backbone_of_an_unpublished_size_needs_model(tmp_path, capsys):
    source = write_fixture('csl_tresnet_coco_tiny', tmp_path / 'csl.pth')
    out = tmp_path / 'out.pt'
    err = refused(['--from', 'csl', str(source), str(out), '-d', 'voc2007'], out, capsys)
    assert "TResNet (InplaceABN) is of a size no published checkpoint has" in err and '--model' in err
    err = refused(['--from', 'csl', str(source), str(out), '-d', 'voc2007', '--model', 'timm:resnet18'], out, capsys)
    assert 'do not fit' in err  # the rebuild path's strict load names the mismatch


def test_sgre_needs_its_label_embeddings(tmp_path, capsys):
    source = write_fixture('sgre_resnet18_bert_tiny', tmp_path / 'sgre.pth')
    out = tmp_path / 'out.pt'
    err = refused(['--from', 'sgre', str(source), str(out)], out, capsys)
    assert 'SGRE keeps its label embeddings outside the checkpoint' in err and '--label-embeddings' in err
    np.save(tmp_path / 'wrong.npy', np.zeros((20, 7), np.float32))
    err = refused(['--from', 'sgre', str(source), str(out), '--label-embeddings', str(tmp_path / 'wrong.npy')], out,
                  capsys)
    assert 'its label embeddings are (20, 7), its attention reads 20 x 48' in err


def test_in_and_out_files_that_would_lose_or_ignore_something(tmp_path, capsys):
    """The published file as OUT too (it was replaced by the import), a folder as OUT or IN (an OS
    error, or 'no such file'), and --label-embeddings beside learned ones (silently not used)."""
    source = write_fixture('sgre_resnet18_random_tiny', tmp_path / 'sgre.pth')
    published = source.read_bytes()
    err = refused(['--from', 'sgre', str(source), str(source), '--overwrite'], tmp_path / 'none.pt', capsys)
    assert 'sgre.pth is also IN: write the import to another file' in err
    assert source.read_bytes() == published
    (tmp_path / 'folder').mkdir()
    err = refused(['--from', 'sgre', str(source), str(tmp_path / 'folder'), '--overwrite'], tmp_path / 'none.pt', capsys)
    assert 'folder is a folder: give OUT as a file path' in err
    err = refused(['--from', 'sgre', str(tmp_path / 'folder'), str(tmp_path / 'out.pt')], tmp_path / 'out.pt', capsys)
    assert 'folder is a folder: pass the checkpoint file inside it' in err
    np.save(tmp_path / 'bert.npy', np.zeros((20, 48), np.float32))
    err = refused(['--from', 'sgre', str(source), str(tmp_path / 'out.pt'), '--label-embeddings',
                   str(tmp_path / 'bert.npy')], tmp_path / 'out.pt', capsys)
    assert 'holds its own learned label embeddings' in err and 'leave --label-embeddings out' in err


def test_tensors_without_a_place_are_refused(tmp_path, capsys):
    meta, state, _ = load_fixture('ccd_resnet50')
    out = tmp_path / 'out.pt'
    torch.save((dict(state, **{'onebyone_conv.extra': torch.ones(1)}), {}), tmp_path / 'extra.pth')
    err = refused(['--from', 'ccd', str(tmp_path / 'extra.pth'), str(out)], out, capsys)
    assert "onebyone_conv.extra has no place in CCD's ImageClassifier" in err
    torch.save((dict(state, alpha=torch.arange(20.0)[None]), {}), tmp_path / 'alpha.pth')
    err = refused(['--from', 'ccd', str(tmp_path / 'alpha.pth'), str(out)], out, capsys)
    assert 'its alpha is not one value for all 20 classes' in err


def test_cvt_has_no_backbone_here(tmp_path, capsys):
    meta, state, _ = load_fixture('q2l_resnet18_proj_tiny')
    head = {k: v for k, v in state.items() if not k.startswith('backbone.0.')}
    torch.save({'state_dict': dict(head, **{'backbone.0.stage0.patch_embed.proj.weight': torch.ones(1)})},
               tmp_path / 'cvt.pth')
    out = tmp_path / 'out.pt'
    err = refused(['--from', 'q2l', str(tmp_path / 'cvt.pth'), str(out), '-d', 'voc2007'], out, capsys)
    assert 'its backbone is a CvT, which timm does not have' in err


def test_the_originals_class_order_is_checked(tmp_path, capsys):
    source = write_fixture('sgre_resnet18_random_tiny', tmp_path / 'sgre.pth')
    out = tmp_path / 'out.pt'
    # SGRE's scripts/voc2007.py: label.txt lists the VOC names sorted, as XML spells them
    names = ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'diningtable',
             'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor']
    assert sorted(names) == names
    (tmp_path / 'label.txt').write_text('\n'.join(names) + '\n')
    assert run_import(['--from', 'sgre', str(source), str(out), '--original-classes', str(tmp_path / 'label.txt')],
                      capsys)[0] == 0
    (tmp_path / 'label.txt').write_text('\n'.join(names[1:] + names[:1]) + '\n')
    err = refused(['--from', 'sgre', str(source), str(tmp_path / 'other.pt'), '--original-classes',
                   str(tmp_path / 'label.txt')], tmp_path / 'other.pt', capsys)
    assert "names class 0 'bicycle', text_features/voc2007_classnames.txt 'aeroplane'" in err


# --- the consumers: --evaluate, --init-from, predict.py --------------------------------------------

def test_evaluate_init_from_and_predict_take_an_imported_checkpoint(tiny_pascal, tmp_path, capsys):
    name = 'q2l_resnet18_proj_tiny'
    source = write_fixture(name, tmp_path / 'q2l.pth')
    out = tmp_path / 'q2l.pt'
    assert run_import(['--from', 'q2l', str(source), str(out), '-d', 'pascal'], capsys)[0] == 0
    common = ['--data-root', str(tiny_pascal), '--device', 'cpu', '--num-workers', '0', '--batch-size', '8']
    assert main_clip.main(['--evaluate', str(out)] + common) == 0
    logged = capsys.readouterr()
    assert 'Test mAP of pascal epoch 7' in logged.out + logged.err
    run = ['-d', 'pascal', '-l', 'an', '-m', 'timm:resnet18', '--head', 'q2l', '--q2l-hidden', '64', '--q2l-ffn', '128',
           '--image-size', '128', '--epochs', '1', '--results-dir', str(tmp_path / 'runs'), '--init-from', str(out),
           '--cache-dir', str(tmp_path / 'cache')] + common[:1] + [common[1]] + common[2:]
    assert main_clip.main(run) == 0
    images = sorted((tiny_pascal / 'pascal' / 'VOCdevkit' / 'VOC2012' / 'JPEGImages').glob('val_0000*.png'))[:3]
    assert predict.main([str(out)] + [str(p) for p in images] + ['--output', str(tmp_path / 'labels.csv'),
                                                                 '--num-workers', '0']) == 0
    rows = (tmp_path / 'labels.csv').read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith('file,labels,label_scores,top1')


def test_csl_openimages_in_the_datasets_class_order(tmp_path, capsys):
    """A CSL OpenImages checkpoint lists its classes (idx_to_class MIDs) in its own order; with --data-root
    where format_openimages.py wrote class_ids.txt and classnames.txt its classes are put in the dataset's
    order (the head's class rows permuted) and named as the dataset names them, so --evaluate -d openimages
    reads every logit as its class; imported in CSL's order, --evaluate refuses it in one line."""
    from preproc import format_openimages
    from test_openimages import NUM_CLASSES, mid, write_official

    write_official(tmp_path)
    folder = tmp_path / 'openimages'
    assert format_openimages.main(['--load-path', str(folder), '--save-path', str(folder)]) == 0
    capsys.readouterr()
    meta, state, _ = load_fixture('csl_tresnet_openimages_tiny')  # its trunk, a 15-class bottleneck head
    rs = np.random.RandomState(11)
    state = dict(state, **{'head.fc.FC.weight': torch.from_numpy(rs.standard_normal((NUM_CLASSES, 512)).astype(np.float32)),
                           'head.fc.FC.bias': torch.from_numpy(rs.standard_normal(NUM_CLASSES).astype(np.float32))})
    torch.save({'model': state, 'idx_to_class': {k: mid(k) for k in range(NUM_CLASSES)}}, tmp_path / 'csl.pth')
    base = ['--from', 'csl', str(tmp_path / 'csl.pth'), '--model', 'timm:vlpl_test_tresnet', '--image-size', '64']
    assert run_import(base + [str(tmp_path / 'csl_order.pt'), '--data-root', str(tmp_path / 'none')], capsys)[0] == 0
    code, stdout, err = run_import(base + [str(tmp_path / 'dataset_order.pt'), '--data-root', str(tmp_path)], capsys)
    assert code == 0, err
    theirs, ours = (checkpoints.load_checkpoint(tmp_path / f'{n}.pt') for n in ('csl_order', 'dataset_order'))
    order = (folder / 'class_ids.txt').read_text().split()
    assert ours['class_ids'] == order and theirs['class_ids'] == [mid(k) for k in range(NUM_CLASSES)]
    assert ours['classnames'] == (folder / 'classnames.txt').read_text().splitlines()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = (checkpoints.rebuild_classifier(c, 'c').model(x) for c in (theirs, ours))
    torch.testing.assert_close(b, a[:, [int(m[-2:]) for m in order]], rtol=0, atol=1e-5)  # mid(k) ends in k
    common = ['--data-root', str(tmp_path), '--device', 'cpu', '--num-workers', '0']
    assert main_clip.main(['--evaluate', str(tmp_path / 'dataset_order.pt')] + common) == 0
    logged = capsys.readouterr()
    assert 'Test mAP of openimages epoch 0' in logged.out + logged.err
    assert main_clip.main(['--evaluate', str(tmp_path / 'csl_order.pt')] + common) == 2
    logged = capsys.readouterr()
    assert "its class 0 is '/m/0fix00', class 0 of openimages is" in logged.out + logged.err


def test_init_from_keeps_the_input_normalisation(tiny_pascal, tmp_path, capsys):
    """The weights of a TResNet imported from CSL take [0, 1] pixels: a run started from them must say so
    (--input-norm none), or --init-from refuses in one line before any work."""
    source = write_fixture('csl_tresnet_coco_tiny', tmp_path / 'csl.pth')
    out = tmp_path / 'csl.pt'
    assert run_import(['--from', 'csl', str(source), str(out), '--model', 'timm:vlpl_test_tresnet', '-d', 'pascal',
                       '--image-size', '64'], capsys)[0] == 0
    run = ['-d', 'pascal', '-l', 'an', '-m', 'timm:vlpl_test_tresnet', '--image-size', '64', '--epochs', '1',
           '--data-root', str(tiny_pascal), '--results-dir', str(tmp_path / 'runs'), '--cache-dir', str(tmp_path / 'c'),
           '--device', 'cpu', '--num-workers', '0', '--init-from', str(out)]
    assert main_clip.main(run) == 2
    logged = capsys.readouterr()
    assert 'its model does not fit this run' in logged.err and '--input-norm none' in logged.err
    assert main_clip.main(run + ['--input-norm', 'none']) == 0


# --- input normalisation ----------------------------------------------------------------------------

@pytest.mark.parametrize('backbone, norm', [('tresnet_m', 'none'), ('tresnet_l', 'none'), ('timm:tresnet_v2_l', 'none'),
                                            ('resnet101', 'imagenet'), ('swin_large', 'imagenet'),
                                            ('timm:resnet18', 'imagenet'), ('resnet50', 'imagenet')])
def test_each_backbone_gets_the_inputs_its_weights_were_trained_on(backbone, norm):
    """MIIL's TResNets (timm's pretrained configs: mean 0, std 1) take [0, 1] pixels by default."""
    assert main_clip.parse_args(['-d', 'coco', '-m', backbone])[0].input_norm == norm
    assert main_clip.parse_args(['-d', 'coco', '-m', backbone, '--input-norm', 'imagenet'])[0].input_norm == 'imagenet'


def test_input_norm_none_gives_the_trunk_totensor_pixels():
    import models

    torch.manual_seed(0)
    model = models.build_classifier('timm:resnet18', 3, pretrained=False, input_norm='none').eval()
    pixels = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(image_io.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(image_io.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        got = model((pixels - mean) / std)  # what the pipeline gives
        expected = model.forward_head(model.spec.features(model.trunk, pixels))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == set(models.build_classifier('timm:resnet18', 3, pretrained=False).state_dict())

"""Golden test of -l CCD against the original's own code (github.com/k0u-id/CCD 0b57641).

tests/fixtures/ccd_reference.npz holds what the original computed when its own `train.run_train` ran,
unchanged, on CPU, on the recipe below: a tiny random OpenAI-format ModifiedResNet CLIP (its clip package's
`build_model`, float32 as `clip.load` makes it on the CPU), a ResNet-50 `models.ImageClassifier` with the
recipe's weights, and RECIPE_P (its train_gpu#0.sh settings, but smaller images, three epochs, lr 0 so that
the weights the gradient step sees are the recipe's, and loss_coeff 0.1 so that the entropy flags weigh the
loss). A line tracer read run_train's locals where its comments say: the text features, the global table
(softmax scores, entropy flags, class bias, debiased labels), the classifier's batch-norm statistics and the
calibrated threshold before the epoch-2 refresh, the table after it, the first training step of epoch 0 and
of epoch 2 (inputs, soft labels, flags, logits, losses, every parameter's gradient) and the train mAP of each
epoch against the pseudo-labels; and `cropping_box` on random boxes with tensor corners, as run_train passes
them. Only numbers are stored (see the file's 'meta'); the script that ran the original is not part of this
repository (it imports the original's code).

Here the same inputs go through this repository's real path: main_clip.parse_args -> the CCD method's CLIP
side (open_clip at fp32, CCD's any-size ModifiedResNet forward) -> its table, refresh and loss.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).parent / 'fixtures' / 'ccd_reference.npz'

# --------------------------------------------------------------------------- the recipe (shared with the
# script that ran the original; changing any of it invalidates the fixture)

CLIP_SEED = 3100        # key i (sorted) of the CLIP state dict: np.random.RandomState(CLIP_SEED + i)
CLASSIFIER_SEED = 4100  # key i (sorted) of the classifier state dict: np.random.RandomState(CLASSIFIER_SEED + i)
PICTURE_SEED = 21       # np.random.RandomState(PICTURE_SEED + b): picture b
BOX_SEED = 9            # np.random.RandomState: the random boxes given to cropping_box
TRAIN_SIZES = [(100, 80), (61, 97), (130, 70), (90, 90)]  # (width, height) of the train pictures
VAL_SIZES = [(80, 60), (64, 64)]
NUM_CLASSES = 20
# Classes whose classifier bias is high: the classifier selects them, so each picture gets a few views.
SELECTED_CLASSES = [2, 7, 14]
VOC_NAMES = ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'dining table',
             'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa', 'train', 'tv monitor']
# run_train's P: train_gpu#0.sh's values except those marked
RECIPE_P = dict(
    dataset='voc12', num_classes=NUM_CLASSES, arch='resnet50', feat_dim=2048, use_pretrained=False,
    freeze_feature_extractor=False, num_workers=0, lr_mult=10, colorjitter=True, train_flip=True,
    update_label=True, global_temp=True, local_temp=True, use_consist=1.0, inf_num=1,
    bsize=2,                       # script 16: four pictures
    lr=0.0,                        # script 1e-5: the weights stay the recipe's
    num_epochs=3,                  # script 10: the refresh and the consistency term start at epoch 2
    offset_size=40,                # script 80 (at 640 px): the inference images are 256 px here
    coeff=3.0, ratio=0.2, LS=True, LS_coeff=20, bound=4,
    loss_coeff=0.1,                # script 1 (flags without effect): 0.1, config.py's default
    train_resize=(64, 64),         # 448 in config.py
    resize=(256, 256),             # 640 in config.py; the views' long side stays cropping_box's 640
)
VIEW_SIDE = 640  # cropping_box's hard-wired long side

# open_clip config of the tiny CLIP: OpenAI's ModifiedResNet layout (RN50x64's 14 x 14 attention-pool grid,
# so its 448 px input, and 1024-wide embeddings), one block per stage, QuickGELU text transformer
CLIP_CONFIG = {
    'embed_dim': 1024, 'quick_gelu': True,
    'vision_cfg': {'image_size': 448, 'layers': [1, 1, 1, 1], 'width': 16, 'head_width': 64},
    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 1, 'layers': 1},
}


def _clip_std(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, std) of a CLIP key's normal draw: batch-norm and layer-norm weights near 1, running
    variances near 1; OpenAI's initial scales elsewhere (1 / sqrt(fan in) for weights)."""
    if key.endswith('running_var'):
        return 1.0, 0.1
    if key.endswith('running_mean') or key.endswith('bias'):
        return 0.0, 0.05
    if ('bn' in key or 'downsample.1' in key or 'ln_' in key) and key.endswith('weight'):
        return 1.0, 0.1
    if key == 'positional_embedding':
        return 0.0, 0.01
    if key == 'token_embedding.weight':
        return 0.0, 0.02
    if key == 'visual.attnpool.positional_embedding':
        return 0.0, shape[-1] ** -0.5
    if key == 'text_projection':
        return 0.0, shape[0] ** -0.5
    return 0.0, math.prod(shape[1:]) ** -0.5


def clip_state_dict() -> dict[str, torch.Tensor]:
    """The tiny CLIP's weights under OpenAI's (= open_clip's) key names, every float rounded to fp16 as in
    OpenAI's checkpoints; key i of the sorted keys is offset + std * standard_normal(RandomState(CLIP_SEED +
    i)) (numpy: the same bits on every machine); batch-norm counters 0, logit_scale log(1 / 0.07)."""
    import open_clip

    shapes = {k: tuple(v.shape) for k, v in open_clip.model.CLIP(**CLIP_CONFIG).state_dict().items()}
    state = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        if key.endswith('num_batches_tracked'):
            state[key] = torch.tensor(0, dtype=torch.int64)
        elif key == 'logit_scale':
            state[key] = torch.tensor(math.log(1 / 0.07), dtype=torch.float16)
        else:
            offset, std = _clip_std(key, shape)
            z = np.random.RandomState(CLIP_SEED + i).standard_normal(shape)
            value = offset + std * z
            if key.endswith('running_var'):
                value = np.abs(value)
            state[key] = torch.from_numpy(np.asarray(value, dtype=np.float16))
    # 30 % of the image projection maps into the text projection's 64-dimensional span, so that the two towers'
    # features share a subspace and the softmax scores spread: two train pictures above CCD's entropy bound 2
    # and two below.
    a = np.random.RandomState(CLIP_SEED - 1).standard_normal((64, 512)) * 512 ** -0.5
    shared = state['text_projection'].double().numpy().T @ a
    mixed = 0.7 * state['visual.attnpool.c_proj.weight'].double().numpy() + 0.3 * shared
    state['visual.attnpool.c_proj.weight'] = torch.from_numpy(mixed.astype(np.float16))
    return state


def classifier_state_dict() -> dict[str, torch.Tensor]:
    """CCD's ImageClassifier weights (its key names: feature_extractor.*, onebyone_conv.*, alpha), float32.
    Key i of the sorted keys: convolutions N(0, 2 / fan_out) (torchvision's kaiming_normal_), batch-norm
    weights 1 (0.2 for each block's last one, so the untrained network stays in range without its batch
    statistics), biases and running means 0, running variances 1, all drawn from RandomState(CLASSIFIER_SEED
    + i); the 1x1 convolution N(0, 0.01) with bias +1 for SELECTED_CLASSES and -4 elsewhere; alpha 1."""
    import torchvision

    from seed_checkpoints import CCD_TRUNK  # CCD's feature_extractor index -> torchvision ResNet-50 module

    names = {v: k for k, v in CCD_TRUNK.items()}
    shapes = {}
    for key, value in torchvision.models.resnet50(weights=None).state_dict().items():
        module, _, rest = key.partition('.')
        if module in names:
            shapes[f'feature_extractor.{names[module]}.{rest}'] = tuple(value.shape)
    shapes.update({'onebyone_conv.weight': (NUM_CLASSES, 2048, 1, 1), 'onebyone_conv.bias': (NUM_CLASSES,),
                   'alpha': (1, NUM_CLASSES)})
    state = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        rs = np.random.RandomState(CLASSIFIER_SEED + i)
        if key.endswith('num_batches_tracked'):
            value = np.zeros(shape, np.int64)
        elif key == 'alpha' or key.endswith('running_var'):
            value = np.ones(shape)
        elif key == 'onebyone_conv.bias':
            value = np.full(shape, -4.0)
            value[SELECTED_CLASSES] = 1.0
        elif key == 'onebyone_conv.weight':
            value = 0.01 * rs.standard_normal(shape)
        elif len(shape) == 4:
            value = math.sqrt(2.0 / (shape[0] * shape[2] * shape[3])) * rs.standard_normal(shape)
        elif key.endswith('weight'):  # batch norm
            value = np.full(shape, 0.2 if key.endswith('bn3.weight') else 1.0)
        else:
            value = np.zeros(shape)
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.int64 if value.dtype == np.int64 else np.float32))
    return state


def pictures(sizes: list[tuple[int, int]], first: int) -> list[np.ndarray]:
    """H x W x 3 uint8 pictures of six kinds (dark, light, noise, stripes, flat red, coloured checks), picture b
    of kind (first + b) mod 6, so that the tiny CLIP's scores differ between them (some above and some below
    CCD's entropy bound 2)."""
    out = []
    for b, (width, height) in enumerate(sizes):
        rs = np.random.RandomState(PICTURE_SEED + first + b)
        kind = (first + b) % 6
        yy, xx = np.mgrid[0:height, 0:width]
        if kind == 0:
            base = rs.normal(0, 5, (height, width, 3))
        elif kind == 1:
            base = 255 - np.abs(rs.normal(0, 5, (height, width, 3)))
        elif kind == 2:
            base = rs.uniform(0, 255, (height, width, 3))
        elif kind == 3:
            base = 255 * ((xx // 4) % 2)[..., None] * np.ones(3)
        elif kind == 4:
            base = np.zeros((height, width, 3)) + [200, 30, 30]
        else:
            base = 255 * ((yy // 8 + xx // 8) % 2)[..., None] * rs.uniform(0, 1, 3)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def train_pictures() -> list[np.ndarray]:
    return pictures(TRAIN_SIZES, 0)


def val_pictures() -> list[np.ndarray]:
    return pictures(VAL_SIZES, len(TRAIN_SIZES))


def random_boxes(count: int = 400, side: int = 640) -> np.ndarray:
    """count x 5 int64 (y1, x1, y2, x2, offset): corners anywhere in a side x side image, offsets 0..100."""
    rs = np.random.RandomState(BOX_SEED)
    corners = rs.randint(0, side, size=(count, 4))
    return np.concatenate([corners, rs.randint(0, 101, size=(count, 1))], axis=1).astype(np.int64)


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


FINGERPRINT_RTOL, FINGERPRINT_ATOL = 1e-5, 1e-6


def fingerprint(t: torch.Tensor) -> np.ndarray:
    """A large gradient's fingerprint (float64): its sum, its sum of squares and its dot products with three
    fixed random vectors (RandomState(0), standard normal, one per row)."""
    x = t.detach().double().reshape(-1).numpy()
    r = np.random.RandomState(0).standard_normal((3, x.size))
    return np.concatenate([[x.sum(), (x * x).sum()], r @ x])


# --------------------------------------------------------------------------- the port's real path

def write_data(root: Path) -> Path:
    """The recipe's pictures as a formatted pascal folder (labels: one class per picture; the port reads
    none of them for training)."""
    from PIL import Image

    folder = root / 'pascal'
    images = folder / 'VOCdevkit' / 'VOC2012' / 'JPEGImages'
    images.mkdir(parents=True)
    for phase, pics in (('train', train_pictures()), ('val', val_pictures())):
        names = []
        for b, picture in enumerate(pics):
            names.append(f'{phase}_{b}.png')
            Image.fromarray(picture).save(images / names[-1])
        labels = np.zeros((len(pics), NUM_CLASSES))
        labels[np.arange(len(pics)), np.arange(len(pics)) % NUM_CLASSES] = 1
        np.save(folder / f'formatted_{phase}_images.npy', np.array(names))
        np.save(folder / f'formatted_{phase}_labels.npy', labels)
    return root


def port_args(tmp_path: Path, *extra: str) -> list[str]:
    """main_clip flags that give the port RECIPE_P (flags for each of its settings)."""
    config = tmp_path / 'ccd-reference-tiny.json'
    if not config.exists():
        config.write_text(json.dumps(CLIP_CONFIG))
        torch.save(clip_state_dict(), tmp_path / 'tiny-openai-state-dict.pt')
        write_data(tmp_path / 'data')
    p = RECIPE_P
    return ['-d', 'pascal', '-l', 'CCD', '--device', 'cpu', '--num-workers', '0', '--data-root', str(tmp_path / 'data'),
            '--results-dir', str(tmp_path / 'results'), '--cache-dir', str(tmp_path / 'cache'),
            '--clip-model', str(config), '--clip-pretrained', str(tmp_path / 'tiny-openai-state-dict.pt'),
            '-m', 'resnet50', '--no-pretrained', '--image-size', str(p['train_resize'][0]),
            '--batch-size', str(p['bsize']), '--epochs', str(p['num_epochs']), '--ccd-infer-size', str(p['resize'][0]),
            '--ccd-view-size', str(VIEW_SIDE), '--ccd-offset', str(p['offset_size']), '--ccd-coeff', str(p['coeff']),
            '--ccd-loss-coeff', str(p['loss_coeff']), '--ccd-ratio', str(p['ratio']), '--ccd-ls-coeff', str(p['LS_coeff']),
            '--ccd-bound', str(p['bound']), '--ccd-refreshes', str(p['inf_num']),
            '--ccd-consistency', str(p['use_consist']), *extra]


def port_table(tmp_path: Path, *extra: str):
    """(cfg, the CcdTable of methods_ccd.build_labels) for the recipe."""
    import main_clip
    import methods
    import methods_ccd
    import run_data

    cfg, _ = main_clip.parse_args(port_args(tmp_path, *extra))
    device = torch.device('cpu')
    splits, root = run_data.load_data(cfg)[:2]
    data = run_data.build_loaders(cfg, splits, root, methods.METHODS['CCD'], device)
    table, _ = methods_ccd.build_labels(cfg, data, device)
    return cfg, table


def recipe_classifier(buffers: dict[str, np.ndarray], cam_boost: float):
    """models.Classifier (-m resnet50, linear head) with the recipe's weights, CCD's keys mapped as
    preproc/import_checkpoint.py --from ccd maps them (seed_checkpoints.convert), and the given batch-norm
    buffers (CCD's key names)."""
    import models
    import seed_checkpoints

    ccd_state = classifier_state_dict() | {k: torch.from_numpy(np.asarray(v)) for k, v in buffers.items()}
    imported = seed_checkpoints.convert('ccd', ccd_state, 'the recipe', seed_checkpoints.Options(dataset='pascal'))
    assert imported.argv[-4:] == ['-l', 'CCD', '--ccd-coeff', '1.0']  # the recipe's alpha; CCD multiplies it by coeff first
    model = models.build_classifier('resnet50', NUM_CLASSES, pretrained=False, cam_boost=cam_boost)
    model.load_state_dict(imported.state)
    return model


def classifier_key(key: str) -> str:
    """The models.Classifier key of a CCD ImageClassifier key (seed_checkpoints.CCD_TRUNK's table)."""
    from seed_checkpoints import CCD_TRUNK

    if key.startswith('feature_extractor.'):
        index, _, rest = key[len('feature_extractor.'):].partition('.')
        return f'trunk.{CCD_TRUNK[index]}.{rest}'
    return 'head.' + key.split('.')[-1]  # onebyone_conv.weight / .bias


def _reference():
    ref = np.load(FIXTURE)
    meta = json.loads(str(ref['meta']))
    recipe = {k: globals()[k] for k in meta['recipe']}
    assert json.loads(json.dumps(recipe)) == meta['recipe'], 'the recipe changed: remake the fixture'
    assert {k: sha256(v) for k, v in sorted(clip_state_dict().items())} == meta['clip_state_dict_sha256']
    assert {k: sha256(v) for k, v in sorted(classifier_state_dict().items())} == meta['classifier_state_dict_sha256']
    return ref, meta


def _group(ref, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix)}


# --------------------------------------------------------------------------- the tests

def test_cropping_box_follows_the_originals_float32_arithmetic_with_tensor_corners():
    """train.py cropping_box as run_train calls it (0-dim int64 tensor corners from nonzero()): the port's box,
    output size and resized pixels equal the original's on 400 random boxes; with Python-int corners (how the
    earlier test called it) 44 of them get another size, which the port must not follow."""
    import ccd

    ref, meta = _reference()
    image = torch.from_numpy(np.random.RandomState(BOX_SEED + 1).standard_normal((1, 3, VIEW_SIDE, VIEW_SIDE))
                             .astype(np.float32))
    want, want_int = ref['crop_rows'], ref['crop_rows_python_ints']
    other = 0
    for i, (y1, x1, y2, x2, off) in enumerate(random_boxes()):
        view = ccd.crop_geometry((int(y1), int(x1)), (int(y2), int(x2)), int(off), VIEW_SIDE, VIEW_SIDE, VIEW_SIDE)
        assert list(view) == want[i].tolist(), (i, view, want[i])
        crop = ccd.crop_view(image[0], view)[None]
        assert hashlib.sha256(crop.contiguous().numpy().tobytes()).hexdigest()[:16] == meta['crop_sha256'][i]
        other += list(view[4:]) != want_int[i][4:].tolist()
    assert other == 44  # about 10 %: 639 instead of 640 on the long side, sometimes the short side


def test_the_text_features_and_the_global_table_are_the_originals(tmp_path):
    """Run D (the script's debias on): the prompt features, the global softmax scores, the entropy flags, the
    class bias and the floored, debiased table equal what run_train computed. The original divides by a NaN
    bias for every class that is never a confident top-1 (here 19 of 20: four pictures); the port gives those
    bias 1 (docs/ccd.md), so their columns are the floored scores, and every other entry is the original's."""
    ref, _ = _reference()
    _, raw = port_table(tmp_path, '--ccd-no-global-debias', '--ccd-ls-coeff', '0')  # the scores themselves
    torch.testing.assert_close(raw.text, torch.from_numpy(ref['text']), atol=1e-6, rtol=0)
    torch.testing.assert_close(raw.table, torch.from_numpy(ref['global_scores']), atol=1e-6, rtol=0)
    _, table = port_table(tmp_path)  # the script's settings (the embeddings come from the cache)
    assert table.flags.tolist() == ref['flags'].tolist() == [0.0, 1.0, 0.0, 1.0]
    nan = np.isnan(ref['bias'])
    assert nan.sum() == 19 and (ref['bias_counts'][nan] == 0).all()
    np.testing.assert_allclose(table.bias.numpy()[~nan], ref['bias'][~nan], atol=1e-6, rtol=0)
    assert (table.bias.numpy()[nan] == 1).all()
    got, want = table.table.numpy(), ref['debiased']
    np.testing.assert_allclose(got[:, ~nan], want[:, ~nan], atol=1e-6, rtol=0)
    assert np.isnan(want[:, nan]).all()
    np.testing.assert_allclose(got[:, nan], np.maximum(ref['global_scores'][:, nan], 0.05), atol=1e-6, rtol=0)


def test_the_refresh_is_the_originals(tmp_path):
    """Run T (no division, so no NaN): the epoch-0 table, then CCD's epoch-2 refresh through the port's real
    CcdTable.before_epoch with the classifier the original refreshed with (the recipe's weights, alpha 3, its
    batch-norm statistics after two epochs at lr 0): the calibrated threshold, every view (image, class, CAM
    corners in row order, box, resized size) and the refreshed table equal the original's."""
    ref, _ = _reference()
    cfg, table = port_table(tmp_path, '--ccd-no-global-debias', '--ccd-no-local-debias')
    torch.testing.assert_close(table.table, torch.from_numpy(ref['table0']), atol=1e-6, rtol=0)
    model = recipe_classifier(_group(ref, 'refresh_buffer/'), cfg.boostlu_alpha)
    seen = []
    import ccd
    cam_views = ccd.cam_views

    def recording(*args, **kwargs):
        out = cam_views(*args, **kwargs)
        seen.append(out)
        return out
    ccd.cam_views = recording
    try:
        assert not table.before_epoch(2, model, None)  # CCD's epoch 1: nothing changes
        assert table.before_epoch(3, model, None)
        assert not table.before_epoch(4, model, None)  # inf_num 1: once
    finally:
        ccd.cam_views = cam_views
    assert table.multiplier == float(ref['multiplier'])
    rows, classes, views = seen[0]
    want = ref['views']  # idx, class, box (4), size (2), corners (4)
    assert rows.tolist() == want[:, 0].tolist() and classes.tolist() == want[:, 1].tolist()
    assert set(classes.tolist()) == set(SELECTED_CLASSES)
    assert views.tolist() == want[:, 2:8].tolist()
    torch.testing.assert_close(table.table, torch.from_numpy(ref['table2']), atol=1e-6, rtol=0)
    assert not torch.equal(table.table, torch.from_numpy(ref['table1']))


def test_a_training_step_is_the_originals(tmp_path):
    """The first step of CCD's epoch 0 (soft-label BCE alone) and of its epoch 2 (flag-weighted BCE plus the
    consistency BCE of the second view), through the port's Ccd.loss on the original's batch (its images,
    colour-jittered view, soft labels and flags) with the recipe's ResNet-50 in train mode: the logits, the
    losses, every parameter's gradient and the batch-norm statistics after the two forward passes equal
    the original's within 1e-6."""
    import main_clip
    import methods_ccd

    ref, _ = _reference()
    cfg, _ = main_clip.parse_args(port_args(tmp_path))
    for epoch in (0, 2):
        s = _group(ref, f'step{epoch}/')
        buffers = _group(ref, 'refresh_buffer/') | {k[len('before/'):]: v for k, v in s.items() if k.startswith('before/')}
        model = recipe_classifier(buffers, cfg.boostlu_alpha).train()
        method = methods_ccd.Ccd(cfg, np.zeros((len(TRAIN_SIZES), NUM_CLASSES), np.float32), torch.device('cpu'))
        rows = torch.from_numpy(s['rows'])

        class Table:  # the table rows and flags the original read for this batch
            flags = torch.zeros(len(TRAIN_SIZES))
            table = torch.zeros(len(TRAIN_SIZES), NUM_CLASSES)
        Table.flags[rows] = torch.from_numpy(ref['flags'][s['rows']])  # the global pass's entropy flags
        method.use_pseudo_labels(Table)
        logits = model(torch.from_numpy(s['image']))
        view = method.second_view(epoch + 1)
        assert (view is not None) == (epoch == 2)
        view_logits = model(torch.from_numpy(s['ex_image'])) if view else None
        batch = dict(index=rows, pseudo_labels=torch.from_numpy(s['labels']), view_logits=view_logits)
        loss = method.loss(logits, torch.sigmoid(logits), batch, epoch=epoch + 1, step=0)
        loss.backward()
        torch.testing.assert_close(logits.detach(), torch.from_numpy(s['logits']), atol=1e-6, rtol=0)
        torch.testing.assert_close(loss.detach(), torch.from_numpy(s['loss']), atol=1e-6, rtol=0)
        if view:
            torch.testing.assert_close(view_logits.detach(), torch.from_numpy(s['ex_logits']), atol=1e-6, rtol=0)
            import ccd
            w = (Table.flags[rows][:, None] + cfg.ccd_loss_coeff).clamp(0, 1)  # the original's batch_flag
            assert torch.equal(w, torch.from_numpy(s['flags'])) and sorted(w[:, 0].tolist()) == [0.10000000149011612, 1.0]
            want_ce, want_consist = float(s['loss_ce']), float(s['loss_consist'])
            assert abs(ccd.consistency_loss(view_logits, logits).item() - want_consist) <= 1e-6
            assert abs((w * ccd.soft_label_loss(logits, batch['pseudo_labels'])).mean().item() - want_ce) <= 1e-6
        params = dict(model.named_parameters())
        for key, want in s.items():
            if key.startswith('grad/'):
                got = params[classifier_key(key[len('grad/'):])].grad
                torch.testing.assert_close(got.reshape(want.shape), torch.from_numpy(want), atol=1e-6, rtol=0)
            elif key.startswith('grad_fingerprint/'):
                got = fingerprint(params[classifier_key(key[len('grad_fingerprint/'):])].grad)
                np.testing.assert_allclose(got, want, rtol=FINGERPRINT_RTOL, atol=FINGERPRINT_ATOL, err_msg=key)
            elif key.startswith('after/'):
                got = model.state_dict()[classifier_key(key[len('after/'):])]
                torch.testing.assert_close(got, torch.from_numpy(want), atol=1e-6, rtol=0)

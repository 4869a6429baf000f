"""aevlp.py, the CLIP side of -l AEVLP, against transcriptions of the original's code
(github.com/Fsoft-AIC/AEVLP 0bad82a: datasets.py `ds_multilabel.__getitem__` and `get_transforms`,
models.py `get_relation`, `GraphConvolution`, `PseudoLabelGeneratorOpenAI.generate`, train.py) written
out here from their text, and on hand-made cases. The pseudo-label rule and the loss are compared with
the original's own numbers in tests/test_losses_peers.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import aevlp
import clip_loading
import datasets
import image_dataset
import image_io
import losses_peers as lp
from config import UserError


def test_crop_boxes_are_the_originals_tiles():
    # 500 x 375, G = 4: tiles 125 x 93, the last 375 - 372 = 3 rows are in no tile
    boxes = aevlp.crop_boxes(500, 375, 4)
    assert boxes[0] == (0, 0, 500, 375) and len(boxes) == 17
    assert boxes[1] == (0, 0, 125, 93) and boxes[2] == (125, 0, 250, 93)  # row-major: x moves first
    assert boxes[5] == (0, 93, 125, 186) and boxes[16] == (375, 279, 500, 372)
    # the original's loop, offsets 0 (its random overlap is overwritten by 0)
    width, height, grid = 333, 250, 5
    tw, th = width // grid, height // grid
    want = [(0, 0, width, height)]
    for y in range(grid):
        for x in range(grid):
            want.append((max(0, x * tw), max(0, y * th), min(width, (x + 1) * tw), min(height, (y + 1) * th)))
    assert aevlp.crop_boxes(width, height, grid) == want


def _picture(width=61, height=47, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def _split(n=3, k=4):
    return datasets.Split(np.array([f'{i}.png' for i in range(n)]), np.zeros((n, k), np.float32),
                          np.zeros((n, k), np.float32))


def test_views_equal_the_originals_transform(tmp_path):
    """CropViews + image_io.to_model_input == tx['pl'] of each crop: Resize((S, S)), the crop's own
    flip, ToTensor, Normalize(ImageNet), bit for bit."""
    picture = _picture()
    picture.save(tmp_path / '0.png')
    base = image_dataset.MultiLabelImages(tmp_path, _split(1), 16, train=True)
    views = aevlp.CropViews(base, grid=3, size=20)
    flips = (True, False, True, True, False, False, True, False, True, False)
    item = views[(0, False, flips)]
    assert item['views'].shape == (10, 20, 20, 3) and item['views'].dtype == torch.uint8
    assert item['view_flips'].tolist() == list(flips)
    assert torch.equal(item['image'], image_io.image_tensor(picture, 16))  # the classifier's view as before
    got = image_io.to_model_input(item['views'], item['view_flips'], 'cpu')
    mean, std = image_io.IMAGENET_MEAN, image_io.IMAGENET_STD
    for v, box in enumerate(aevlp.crop_boxes(*picture.size, 3)):
        crop = picture.crop(box)
        steps = [transforms.Resize((20, 20))] + ([transforms.RandomHorizontalFlip(1.0)] if flips[v] else [])
        want = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])(crop)
        assert torch.equal(got[v], want), v


def test_flip_sampler_with_views_keeps_the_rows_and_flips():
    plain = list(image_dataset.FlipSampler(9, seed=4))
    with_views = list(image_dataset.FlipSampler(9, seed=4, views=5))
    assert [(r, f) for r, f, _ in with_views] == plain
    assert all(len(v) == 5 for _, _, v in with_views)
    assert len({v for _, _, v in with_views}) > 1


def get_relation_transcribed(relation: np.ndarray, sparse_topk: int, reweight_p: float) -> torch.Tensor:
    """models.py get_relation's gcn_relation, statement by statement (its row loop included)."""
    relation = torch.Tensor(relation)
    _, max_idx = torch.topk(relation, sparse_topk)
    mask = torch.ones_like(relation).type(torch.bool)
    for i, idx in enumerate(max_idx):
        mask[i][idx] = 0
    relation[mask] = 0
    dialog = torch.eye(relation.shape[0]).type(torch.bool)
    relation[dialog] = 0
    relation = relation / torch.sum(relation, dim=1).reshape(-1, 1) * reweight_p
    relation[dialog] = 1 - reweight_p
    return relation


@pytest.mark.parametrize('k, topk', [(20, 20), (30, 7), (12, 12)])
def test_graph_equals_get_relation(k, topk):
    rng = np.random.RandomState(k)
    feats = rng.randn(k, 16).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    relation = 0.5 + 0.5 * feats @ feats.T  # a text-cosine-like matrix, diagonal 1
    got = aevlp.gcn_adjacency(torch.from_numpy(relation), topk, 0.2)
    want = get_relation_transcribed(relation, topk, 0.2)
    assert torch.equal(got, want)
    assert torch.allclose(got.sum(1), torch.ones(k), atol=1e-6)  # 0.8 on the diagonal + 0.2 spread
    assert ((got > 0).sum(1) <= topk).all()


def generate_transcribed(text: torch.Tensor, adjacency: torch.Tensor, weights) -> torch.Tensor:
    """PseudoLabelGeneratorOpenAI.generate's text side: gcn_forward (GraphConvolution.forward with the
    graph cast to fp16, LeakyReLU 0.2 after gc1 and gc2), `text_features += identity`, normalise."""
    def gc(x, w, adj):
        adj = adj.to(torch.float16)
        support = torch.matmul(x, w)
        return torch.matmul(adj, support)

    identity = text
    x = gc(text, weights[0], adjacency)
    x = torch.nn.LeakyReLU(0.2)(x)
    x = gc(x, weights[1], adjacency)
    x = torch.nn.LeakyReLU(0.2)(x)
    x = gc(x, weights[2], adjacency)
    x += identity
    return x / x.norm(dim=-1, keepdim=True)


def test_text_matrix_equals_the_originals_graph_step():
    k, width = 12, 32
    gen = torch.Generator().manual_seed(5)
    text = (3 * torch.randn(k, width, generator=gen)).half()  # raw CLIP text features, norm ~ 17
    relation = torch.rand(k, k, generator=gen)
    relation = (relation + relation.T) / 2
    relation.fill_diagonal_(1.0)
    adjacency = aevlp.gcn_adjacency(relation, 6, 0.2)
    weights = aevlp.gcn_weights(width, seed=3)
    got = aevlp.text_matrix(text, adjacency, weights)
    assert got.dtype == torch.float16
    assert torch.equal(got, generate_transcribed(text.clone(), adjacency, weights))
    plain = aevlp.text_matrix(text, None, None)  # --aevlp-gcn none
    assert torch.equal(plain, text / text.norm(dim=-1, keepdim=True))
    assert not torch.equal(got, plain)


def test_graph_weights_follow_the_originals_distribution_and_the_seed():
    state = torch.get_rng_state()
    weights = aevlp.gcn_weights(512, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not touched
    assert [tuple(w.shape) for w in weights] == [(512, 1024), (1024, 1024), (1024, 512)]
    for w in weights:
        bound = 1 / math.sqrt(w.shape[1])
        assert w.dtype == torch.float16 and w.abs().max() <= torch.tensor(bound).half()  # rounding is monotonic
        assert abs(w.float().mean()) < 0.01 * bound and abs(w.float().std() - bound / math.sqrt(3)) < 0.01 * bound
    again = aevlp.gcn_weights(512, seed=0)
    other = aevlp.gcn_weights(512, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(weights, again))
    assert not torch.equal(weights[0], other[0])


def test_graph_weights_from_a_file(tmp_path):
    weights = aevlp.gcn_weights(8, seed=2)
    torch.save({f'gc{i + 1}.weight': w for i, w in enumerate(weights)}, tmp_path / 'named.pt')
    torch.save([w.float() for w in weights], tmp_path / 'list.pt')
    for name in ('named.pt', 'list.pt'):
        loaded = aevlp.load_gcn_weights(str(tmp_path / name), 8)
        assert all(torch.equal(a, b) for a, b in zip(loaded, weights))
    with pytest.raises(UserError, match='--aevlp-gcn .*three weights'):
        aevlp.load_gcn_weights(str(tmp_path / 'list.pt'), 16)
    (tmp_path / 'bad.pt').write_bytes(b'not a torch file')
    with pytest.raises(UserError, match='--aevlp-gcn .*bad.pt'):
        aevlp.load_gcn_weights(str(tmp_path / 'bad.pt'), 8)


def test_relation_file_checks(tmp_path):
    np.save(tmp_path / 'r.npy', np.eye(4, dtype=np.float32))
    assert torch.equal(aevlp.load_relation(str(tmp_path / 'r.npy'), 4), torch.eye(4))
    with pytest.raises(UserError, match='--aevlp-relation .*5 x 5'):
        aevlp.load_relation(str(tmp_path / 'r.npy'), 5)


class _Tower(torch.nn.Module):
    """A stand-in image tower: a fixed linear map of the mean colour and a few pixels."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4, width)

    def forward(self, x):
        return self.proj(torch.cat([x.mean((2, 3)), x[:, :, 0, :3].flatten(1)], 1))


def test_scorer_lays_out_the_rows_as_train_py_and_applies_the_rule():
    torch.manual_seed(0)
    batch, grid, size, k, width = 3, 2, 8, 6, 5
    num_views = 1 + grid * grid
    views = torch.randint(0, 256, (batch, num_views, size, size, 3), dtype=torch.uint8)
    flips = torch.rand(batch, num_views) < 0.5
    tower = _Tower(width)
    text = torch.nn.functional.normalize(torch.randn(k, width), dim=-1)
    observed = torch.zeros(10, k)
    observed[torch.arange(10), torch.arange(10) % k] = 1
    hp = dict(grid_size=grid, temp=0.05, eta=0.1, top_k=2, threshold=0.2, negative_ratio=0.34)
    scorer = aevlp.CropScorer(tower, text, observed, hp)
    cos = scorer.cosines(views, flips)
    # train.py: sub_images (B, V, ...) chunked over the views and concatenated: row r = (view r // B, sample r % B)
    for r in range(num_views * batch):
        v, b = divmod(r, batch)
        x = image_io.to_model_input(views[b, v][None], flips[b, v][None], 'cpu')
        f = tower(x)
        want = (f / f.norm(dim=-1, keepdim=True)) @ text.T
        assert torch.allclose(cos[r], want[0], atol=1e-6), r
    index = torch.tensor([7, 2, 5])
    labels = scorer(index, {'views': views, 'view_flips': flips})
    want = lp.aevlp_pseudo_labels(clip_logits=cos, observed=observed[index], **hp)
    assert torch.equal(labels, want.float())


def test_classnames_spell_voc_as_the_original():
    class Cfg:
        dataset, aevlp_classnames = 'pascal', None
    names = aevlp.aevlp_classnames(Cfg)
    assert {'diningtable', 'pottedplant', 'tvmonitor'} <= set(names) and len(names) == 20
    assert aevlp.PROMPT.format('dog') == 'a photo of a dog.'


def test_view_side_is_the_clips_input_side(tiny_clip):
    class Cfg:
        clip_model, aevlp_crop_size = tiny_clip['config'], None
    assert aevlp.crop_size(Cfg) == 32  # TINY_CLIP_CONFIG's vision image_size
    Cfg.aevlp_crop_size = 48
    assert aevlp.crop_size(Cfg) == 48
    assert clip_loading.configured_image_size('ViT-B-16') == 224


def test_classnames_file(tmp_path):
    (tmp_path / 'names.txt').write_text('curved bill\nhooked_seabird bill\n\n')
    (tmp_path / 'bad.txt').write_bytes(b'\xff\xfe\xfa')

    class Cfg:
        dataset, aevlp_classnames = 'cub', str(tmp_path / 'names.txt')
    assert aevlp.aevlp_classnames(Cfg) == ['curved bill', 'hooked seabird bill']  # '_' -> ' ', as PromptLearner
    Cfg.aevlp_classnames = str(tmp_path / 'bad.txt')
    with pytest.raises(UserError, match='--aevlp-classnames .*bad.txt'):
        aevlp.aevlp_classnames(Cfg)


def test_precision_auto_is_fp16_on_cuda_only():
    class Cfg:
        aevlp_precision = 'auto'
    assert aevlp.scoring_precision(Cfg, 'cuda') == 'fp16' and aevlp.scoring_precision(Cfg, 'cpu') == 'fp32'
    Cfg.aevlp_precision = 'fp16'
    assert aevlp.scoring_precision(Cfg, 'cpu') == 'fp16'


def test_views_of_another_side_than_the_clips_are_refused_in_one_line(tiny_pascal, tmp_path, tiny_clip,
                                                                     tiny_text_features, capsys):
    import main_clip
    from conftest import tiny_run_args

    args = tiny_run_args(tiny_pascal, tmp_path, tiny_clip, tiny_text_features)
    at = args.index('--text-features')
    del args[at:at + 2]
    assert main_clip.main(args + ['-l', 'AEVLP', '--aevlp-crop-size', '40', '--run-name', 'r']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert '--aevlp-crop-size 32' in err[-1]
    assert not (tmp_path / 'results' / 'r').exists()  # nothing written

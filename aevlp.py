"""The CLIP side of -l AEVLP (Tran et al., ICCV 2025; github.com/Fsoft-AIC/AEVLP, commit 0bad82a).

AEVLP's pseudo-labels are made online, at every training step, from a frozen CLIP (docs/peer-methods.md):

1. DAMP views (datasets.py `ds_multilabel.__getitem__`, transform tx['pl'] of `get_transforms`): the
   whole image and its G x G tiles (row-major, y outer; tile side W // G by H // G, the last W mod G
   and H mod G pixels dropped), each resized to 224 x 224 (the CLIP's input side), flipped on its own
   with probability 1/2 and normalised with the ImageNet mean and std (not CLIP's). `CropViews`.
2. The scorer (models.py `PseudoLabelGeneratorOpenAI.generate`): the fp16 CLIP image tower, features
   L2-normalised, cosines with the class text matrix, no logit scale. The rows are laid out
   [whole image x B | tile 0 x B | tile 1 x B | ...] (train.py). `CropScorer`; the transformers run
   sequence-first as OpenAI's CLIP code (clip_loading.sequence_first), which makes the fp16 numbers the original's.
3. The class text matrix: the CLIP text features of "a photo of a {name}." (its PromptLearner with the
   frozen context "a photo of a"), plus the residual of three graph convolutions (`GraphConvolution`,
   512 -> 1024 -> 1024 -> 512, LeakyReLU 0.2, no bias) over a class graph (`get_relation`), then
   L2-normalised. The graph weights are random and never trained; the original draws them with torch's
   unseeded global generator, i.e. differently in every run, so here they are drawn from the same
   distribution with the run's seed (`gcn_weights`), or read from a file. `text_matrix`.
4. The rule (utils.py `get_pseudo_labels`): losses_peers.aevlp_pseudo_labels.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import class_text_features
import clip_loading
import distributed
import image_dataset
import image_io
import losses_peers as lp
import pseudo_labeler
from clip_loading import sequence_first  # tests replace aevlp.sequence_first
from config import DATASETS, Config, ModelLoadError, UserError, one_line

GCN_SLOPE = 0.2  # models.py PseudoLabelGeneratorOpenAI: nn.LeakyReLU(0.2) after gc1 and gc2
PROMPT = 'a photo of a {}.'  # PromptLearner: ctx_init "a photo of a" + " " + name + "."

# The original's VOC class names are the dataset's own identifiers (data/classnames/voc_labels.txt);
# this repository's pascal names spell three of them as words.
VOC_IDENTIFIERS = {'dining table': 'diningtable', 'potted plant': 'pottedplant', 'tv monitor': 'tvmonitor'}


# --------------------------------------------------------------------------- the text side


def gcn_shapes(width: int) -> list[tuple[int, int]]:
    """The (in, out) shapes of gc1, gc2, gc3: 512 -> 1024 -> 1024 -> 512 for the original's ViT-B/16
    text width 512; D -> 2D -> 2D -> D for another width (the demo CLIP's 64)."""
    return [(width, 2 * width), (2 * width, 2 * width), (2 * width, width)]


def gcn_weights(width: int, seed: int) -> list[torch.Tensor]:
    """Three fp16 graph weights drawn as the original's `GraphConvolution.reset_parameters` draws them:
    uniform in +-1/sqrt(out), shapes gcn_shapes(width), from a generator seeded with `seed`.

    The original draws them with torch's global generator, which it never seeds; torch seeds that
    generator from the operating system at start-up (torch.initial_seed() differs in every process,
    checked under the original's torch 2.4.1 and under 2.13), so every run of the original has other
    weights and none can be reproduced. Here they come from the same distribution and follow -s: drawn
    in float64 and rounded to fp16, because torch's fp16 uniform_ gives other bits on other CPU kernels
    (AVX512, AVX2, scalar), and a seed should mean the same weights on every machine. The global
    generator is not touched."""
    generator = torch.Generator().manual_seed(seed)
    weights = []
    for fan_in, fan_out in gcn_shapes(width):
        bound = 1.0 / math.sqrt(fan_out)
        draw = torch.empty(fan_in, fan_out, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
        weights.append(draw.to(torch.float16))
    return weights


def load_gcn_weights(path: str, width: int) -> list[torch.Tensor]:
    """Graph weights from a file (--aevlp-gcn FILE): a torch file holding a list of three tensors or a
    dict with 'gc1.weight', 'gc2.weight', 'gc3.weight' (the original module's names), shaped
    gcn_shapes(width)."""
    try:
        stored = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise UserError(f'--aevlp-gcn {path}: not a readable torch file ({one_line(exc, with_type=True)})') from None
    if isinstance(stored, dict):
        stored = [stored.get(f'gc{i}.weight') for i in (1, 2, 3)]
    shapes = gcn_shapes(width)
    if (not isinstance(stored, (list, tuple)) or len(stored) != 3
            or any(not isinstance(w, torch.Tensor) or tuple(w.shape) != s for w, s in zip(stored, shapes))):
        raise UserError(f'--aevlp-gcn {path}: expected three weights shaped {shapes} (a list, or gc1.weight, '
                        f'gc2.weight, gc3.weight) for text features {width} wide')
    return [w.to(torch.float16) for w in stored]


def gcn_adjacency(relation: torch.Tensor, sparse_topk: int, reweight_p: float) -> torch.Tensor:
    """The graph of models.py `get_relation` (its second result): keep each row's sparse_topk largest
    entries, zero the diagonal, scale each row to sum to reweight_p, and put 1 - reweight_p on the
    diagonal. relation: K x K float32."""
    relation = relation.clone().float()
    num_classes = relation.shape[0]
    _, top = torch.topk(relation, sparse_topk)
    drop = torch.ones_like(relation, dtype=torch.bool).scatter_(1, top, False)
    relation[drop] = 0
    diagonal = torch.eye(num_classes, dtype=torch.bool)
    relation[diagonal] = 0
    relation = relation / torch.sum(relation, dim=1).reshape(-1, 1) * reweight_p
    relation[diagonal] = 1 - reweight_p
    return relation


def load_relation(path: str, num_classes: int) -> torch.Tensor:
    """A K x K class relation (--aevlp-relation FILE, e.g. the original's data/relation/relation+voc.npy)."""
    try:
        relation = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f'--aevlp-relation {path}: not a readable .npy file ({one_line(exc)})') from None
    if relation.shape != (num_classes, num_classes) or not np.isfinite(relation).all():
        raise UserError(f'--aevlp-relation {path}: expected a finite {num_classes} x {num_classes} matrix, got '
                        f'shape {relation.shape}')
    return torch.from_numpy(np.asarray(relation, dtype=np.float32))


def text_relation(text_features: torch.Tensor) -> torch.Tensor:
    """The default class relation: cosines of the class text features (K x K float32). The original
    reads precomputed CLIP text-cosine matrices instead (data/relation/relation+<dataset>.npy)."""
    t = F.normalize(text_features.float(), dim=-1)
    return (t @ t.T).cpu()


def text_matrix(text_features: torch.Tensor, adjacency: torch.Tensor | None,
                weights: list[torch.Tensor] | None) -> torch.Tensor:
    """K x D class matrix of the scorer (`PseudoLabelGeneratorOpenAI.generate`): t + gc3(lrelu(gc2(
    lrelu(gc1(t, A)), A)), A) with gc(x, A) = A (x W) (the original's `GraphConvolution.forward`,
    the graph cast to the features' dtype), then L2-normalised. weights None: no residual."""
    t = text_features
    if weights is not None:
        adj = adjacency.to(device=t.device, dtype=t.dtype)
        h = t
        for i, w in enumerate(weights):
            h = torch.matmul(adj, torch.matmul(h, w.to(device=t.device, dtype=t.dtype)))
            if i < 2:
                h = F.leaky_relu(h, GCN_SLOPE)
        t = h + t  # text_features += identity
    return t / t.norm(dim=-1, keepdim=True)


def aevlp_classnames(cfg: Config) -> list[str]:
    """The class names of the prompts: --aevlp-classnames FILE (one per line), else this repository's
    names with the original's spelling where it is known (VOC's identifiers); '_' read as ' ' as the
    original's PromptLearner does."""
    if cfg.aevlp_classnames:
        try:
            text = Path(cfg.aevlp_classnames).read_text(encoding='utf-8')
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f'--aevlp-classnames {cfg.aevlp_classnames}: cannot read it as UTF-8 text '
                            f'({one_line(exc)})') from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = class_text_features.read_classnames(cfg.dataset)
        if (DATASETS[cfg.dataset].published_as or cfg.dataset) == 'pascal':
            names = [VOC_IDENTIFIERS.get(n, n) for n in names]
    return [n.replace('_', ' ') for n in names]


# --------------------------------------------------------------------------- the views


def crop_boxes(width: int, height: int, grid: int) -> list[tuple[int, int, int, int]]:
    """(left, upper, right, lower) of the whole image and its grid x grid tiles, row-major (y outer),
    as datasets.py `ds_multilabel.__getitem__` crops them (no overlap, remainder pixels dropped)."""
    tw, th = width // grid, height // grid
    return [(0, 0, width, height)] + [(x * tw, y * th, (x + 1) * tw, (y + 1) * th)
                                      for y in range(grid) for x in range(grid)]


class CropViews(image_dataset.MultiLabelImages):
    """The training images with AEVLP's views: item['views'] (1 + G^2) x S x S x 3 uint8, the whole
    image then its tiles, each resized to S x S (bilinear, antialias: the original's
    transforms.Resize((224, 224)) on a PIL image), and item['view_flips'] (1 + G^2,) bool, the flips
    the sampler drew (FlipSampler(views=1 + G^2)). They are flipped and ImageNet-normalised on the
    device (image_io.to_model_input), which gives the tensors of the original's tx['pl'] bit for bit."""

    def __init__(self, images: image_dataset.MultiLabelImages, grid: int, size: int):
        super().__init__(images.root, images.split, images.image_size, images.train, dataset=images.dataset,
                         skip_bad=images.skip_bad)
        self.grid, self.size = grid, size

    @property
    def num_views(self) -> int:
        return 1 + self.grid * self.grid

    def extras(self, img: Image.Image, key) -> dict[str, torch.Tensor]:
        if not (isinstance(key, tuple) and len(key) == 3):
            raise ValueError('CropViews needs (row, flip, view_flips) keys from FlipSampler(views=...)')
        views = [image_io.resized_pixels(img.crop(box), self.size) for box in crop_boxes(*img.size, self.grid)]
        return {'views': torch.from_numpy(np.stack(views)), 'view_flips': torch.tensor(key[2], dtype=torch.bool)}


# --------------------------------------------------------------------------- the scorer


class CropScorer:
    """Pseudo-labels of a training batch from its views (train.py: `generate` then `get_pseudo_labels`).

    visual: the frozen CLIP image tower in the scoring precision; text: K x D class matrix
    (`text_matrix`), same dtype; observed: N x K observed labels of the train split (float32, as the
    original's label_vec_obs)."""

    def __init__(self, visual: nn.Module, text: torch.Tensor, observed: torch.Tensor, hp: dict):
        self.visual, self.text, self.observed, self.hp = visual, text, observed, hp

    def cosines(self, views: torch.Tensor, view_flips: torch.Tensor) -> torch.Tensor:
        """(V B) x K cosines, rows [view 0 x B | view 1 x B | ...], of B x V x S x S x 3 uint8 views."""
        batch, num_views = views.shape[:2]
        x = views.transpose(0, 1).reshape(num_views * batch, *views.shape[2:])
        flips = view_flips.transpose(0, 1).reshape(-1)
        x = image_io.to_model_input(x, flips, self.text.device).to(self.text.dtype)
        with torch.no_grad():
            features = self.visual(x)
        features = features / features.norm(dim=-1, keepdim=True)
        return features @ self.text.T

    def __call__(self, index: torch.Tensor, batch: dict) -> torch.Tensor:
        """B x K float pseudo-labels in {0, 1} of the batch rows `index`."""
        device = self.text.device
        cos = self.cosines(batch['views'].to(device, non_blocking=True),
                           batch['view_flips'].to(device, non_blocking=True))
        hp = self.hp
        labels = lp.aevlp_pseudo_labels(clip_logits=cos, observed=self.observed[index], grid_size=hp['grid_size'],
                                        temp=hp['temp'], eta=hp['eta'], top_k=hp['top_k'],
                                        threshold=hp['threshold'], negative_ratio=hp['negative_ratio'])
        return labels.float()


def scoring_precision(cfg: Config, device) -> str:
    """--aevlp-precision: fp16 or fp32; 'auto' is the original's fp16 on CUDA and fp32 on the CPU, where
    half-precision kernels are several times slower than single precision (the run logs which)."""
    if cfg.aevlp_precision != 'auto':
        return cfg.aevlp_precision
    return 'fp16' if torch.device(device).type == 'cuda' else 'fp32'


def build_pseudo_labels(cfg: Config, train_split, device, num_classes: int):
    """AEVLP's pseudo-label source for main_clip.run: (PseudoLabelSource, None). Loads its own CLIP
    (--clip-model / --clip-pretrained, in --aevlp-precision), makes the class text matrix, and scores
    every training batch's views (no cache: the flips are drawn anew each epoch)."""
    precision = scoring_precision(cfg, device)
    dtype = {'fp16': torch.float16, 'fp32': torch.float32}[precision]
    clip_model, tokenizer = clip_loading.load_clip(cfg.clip_model, cfg.clip_pretrained, device=device,
                                                   precision=precision)
    sequence_first(clip_model)
    names = aevlp_classnames(cfg)
    if len(names) != num_classes:
        where = (f'--aevlp-classnames {cfg.aevlp_classnames}' if cfg.aevlp_classnames
                 else f'the {cfg.dataset} class names')
        raise UserError(f'{where}: {len(names)} names for {num_classes} classes')
    with torch.no_grad():
        tokens = tokenizer([PROMPT.format(n) for n in names]).to(device)
        text = clip_model.encode_text(tokens).to(dtype)  # not normalised: the graph acts on the raw features
    width = text.shape[1]
    weights = adjacency = None
    if cfg.aevlp_gcn != 'none':
        weights = (gcn_weights(width, cfg.seed) if cfg.aevlp_gcn == 'random'
                   else load_gcn_weights(cfg.aevlp_gcn, width))
        relation = (load_relation(cfg.aevlp_relation, num_classes) if cfg.aevlp_relation
                    else text_relation(text))
        adjacency = gcn_adjacency(relation, cfg.aevlp_sparse_topk, cfg.aevlp_reweight_p)
    matrix = text_matrix(text, adjacency, weights)
    observed = torch.as_tensor(train_split.labels_obs, dtype=torch.float32, device=device)
    hp = dict(grid_size=cfg.aevlp_grid, temp=cfg.aevlp_temp, eta=cfg.aevlp_eta, top_k=cfg.aevlp_top_k,
              threshold=cfg.aevlp_threshold, negative_ratio=cfg.aevlp_negative_ratio)
    size, views = clip_loading.clip_image_size(clip_model), crop_size(cfg)
    if size != views:
        raise UserError(f'the views are {views} px (--aevlp-crop-size or the model config) but CLIP model '
                        f'{cfg.clip_model} takes {size} px inputs: pass --aevlp-crop-size {size}')
    scorer = CropScorer(clip_model.visual.eval(), matrix, observed, hp)
    graph = ('none' if weights is None else f'{cfg.aevlp_gcn} weights, relation '
             f'{cfg.aevlp_relation or "from the text features"}, top {cfg.aevlp_sparse_topk}')
    distributed.log.info(f'AEVLP pseudo-labels: {cfg.clip_model} ({precision}) on the image and its '
                         f'{cfg.aevlp_grid}x{cfg.aevlp_grid} tiles at {size} px '
                         f'every step; text graph: {graph}. Precision and recall are on each train line.')
    return AevlpPseudoLabels(scorer), None


class AevlpPseudoLabels(pseudo_labeler.PseudoLabelSource):
    """The engine's pseudo-label source: the batch's views scored at every step (no state)."""

    def __init__(self, scorer: CropScorer):
        super().__init__(None)
        self.scorer = scorer

    def __call__(self, images, index, flipped, batch=None):
        if index.numel() == 0:  # a share with no readable image (several processes, --skip-bad-images)
            return torch.zeros(0, self.scorer.text.shape[0], device=index.device)
        return self.scorer(index, batch)


def crop_size(cfg: Config) -> int:
    """The side of the views: --aevlp-crop-size, else the CLIP's input side (224 for ViT-B-16, the
    original's transforms.Resize((224, 224))), read from its model config."""
    size = cfg.aevlp_crop_size or clip_loading.configured_image_size(cfg.clip_model)
    if size is None:
        raise ModelLoadError(f'cannot tell the input side of CLIP model {cfg.clip_model!r} from its config: '
                             'pass --aevlp-crop-size')
    return size

"""The frozen CLIP pseudo-labeller of VLPL, and the interface of a training phase's pseudo-labels.

The labelling rule (`pseudo_labels`, `scores_to_labels`) is that of github.com/mvrl/VLPL,
main_clip.py (the softmax-threshold step of its training loop). `PseudoLabeler` is the frozen CLIP
image tower plus one text embedding per class, shared by every backbone; it works on images or on
precomputed embeddings (embedding_cache.py). `PseudoLabelSource` is what the training phase calls
for the labels of a batch: VLPL's source (pseudo_label_policy.build_pseudo_labels), CCD's soft-label
table (ccd_labels.CcdPseudoLabels) and AEVLP's (aevlp.AevlpPseudoLabels) all answer it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import pseudo_label_options as pl_options
from clip_loading import clip_image_size, resize_for_clip


def pseudo_labels(image_embeddings: torch.Tensor, text_features: torch.Tensor, temp: float = 0.01,
                  threshold: float = 0.3, partial: float = 0.0) -> torch.Tensor:
    """CLIP pseudo-labels (docs/original-vlpl.md section 7), B x K float in {-1, 0, +1}.

    s = softmax((e @ T.T) / temp) over the K classes, e: B x D (L2-normalised image embeddings),
    T: K x D (L2-normalised text features). pl = +1 where s > threshold (strict), else 0.
    If partial > 0, the n = int(partial * K) classes with the smallest s get pl = -1, written
    after the positives (so a positive among the n smallest becomes -1, as in the original).
    Ties among the smallest are broken by class index (lower index first); the original's
    torch.topk leaves that order unspecified. Since s sums to 1, at most ceil(1/threshold) - 1
    classes are positive (three for the default threshold 0.3). Computed in float32.
    """
    if image_embeddings.dim() != 2 or text_features.dim() != 2:
        raise ValueError(f'expected B x D embeddings and K x D text features, got {tuple(image_embeddings.shape)} '
                         f'and {tuple(text_features.shape)}')
    if image_embeddings.shape[1] != text_features.shape[1]:
        raise ValueError(f'embedding width {image_embeddings.shape[1]} != text feature width {text_features.shape[1]}: '
                         f'text features from another CLIP model?')
    if temp <= 0:
        raise ValueError(f'temperature must be positive, got {temp}')
    if not 0.0 <= partial <= 1.0:
        raise ValueError(f'partial must lie in [0, 1], got {partial}')
    e = image_embeddings.float()
    t = text_features.to(device=e.device, dtype=torch.float32)
    scores = torch.softmax((e @ t.T) / temp, dim=1)  # B x K
    return scores_to_labels(scores, threshold, partial)


def scores_to_labels(scores: torch.Tensor, threshold: float = 0.3, partial: float = 0.0) -> torch.Tensor:
    """The labelling rule of `pseudo_labels` applied to B x K scores (softmax scores, or CCD's
    debiased and refreshed soft labels): +1 where score > threshold, then the int(partial * K)
    lowest scores -1 (stable order)."""
    labels = (scores > threshold).float()
    num_neg = int(partial * scores.shape[1])
    if num_neg > 0:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :num_neg]
        labels.scatter_(1, lowest, -1.0)
    return labels


class PseudoLabeler(nn.Module):
    """Frozen CLIP image tower + class text features -> pseudo-labels (docs/original-vlpl.md section 7).

    The tower is frozen in place (requires_grad False) and stays in eval mode even when a parent
    module calls .train(). Text features (K x D) are stored L2-normalised as a non-persistent
    buffer, so they follow .to(device) but do not enter checkpoints.
    """

    def __init__(self, visual: nn.Module, text_features: torch.Tensor | np.ndarray, *, temp: float = 0.01,
                 threshold: float = 0.3, partial: float = 0.0, preprocess: str = 'original'):
        super().__init__()
        self.visual = visual
        self.visual.requires_grad_(False)
        self.visual.eval()
        self.image_size = clip_image_size(visual)
        features = text_features if torch.is_tensor(text_features) else torch.from_numpy(np.asarray(text_features))
        self.register_buffer('text_features', F.normalize(features.float(), dim=1), persistent=False)
        self.temp, self.threshold, self.partial = float(temp), float(threshold), float(partial)
        # 'original': the ImageNet-normalised pipeline tensor resized (resize_for_clip); 'clip': CLIP's
        # own mean, std and interpolation (pseudo_label_options.clip_preprocess).
        if preprocess not in ('original', 'clip'):
            raise ValueError(f"preprocess must be 'original' or 'clip', got {preprocess!r}")
        self.preprocess = preprocess
        self.clip_settings = pl_options.clip_preprocess_settings(visual)

    def train(self, mode: bool = True) -> 'PseudoLabeler':
        super().train(mode)
        self.visual.eval()
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pipeline images B x 3 x S x S -> L2-normalised projected CLIP embeddings B x D (float32)."""
        if self.preprocess == 'clip':
            return self.embed_inputs(pl_options.clip_preprocess(images, self.image_size, self.clip_settings))
        return self.embed_inputs(resize_for_clip(images, self.image_size))

    @torch.no_grad()
    def embed_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP inputs B x 3 x s x s (s = image_size, already preprocessed) -> normalised embeddings B x D."""
        param = next(self.visual.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        return F.normalize(self.visual(x).float(), dim=-1)

    def to_clip_normalisation(self, images: torch.Tensor) -> torch.Tensor:
        """Pipeline pixels (any size) in the normalisation CLIP is fed with (unchanged for 'original')."""
        return pl_options.renormalise(images, self.clip_settings) if self.preprocess == 'clip' else images

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B x D normalised embeddings -> B x K softmax scores, as pseudo_labels computes them."""
        t = self.text_features.to(device=embeddings.device, dtype=torch.float32)
        return torch.softmax((embeddings.float() @ t.T) / self.temp, dim=1)

    def from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B x D normalised embeddings (e.g. cached output of embed) -> B x K pseudo-labels."""
        return pseudo_labels(embeddings, self.text_features, self.temp, self.threshold, self.partial)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_embeddings(self.embed(images))



def pseudo_label_quality(pl: np.ndarray, true: np.ndarray) -> dict:
    """Precision and recall of the positive pseudo-labels against the true labels: every entry, or, where
    `true` is NaN at entries without a truth (pseudo_label_options.truth_of: unannotated entries of a
    partially annotated dataset), the others only (annotated_only)."""
    o = pl_options.class_quality(pl, true, [''] * pl.shape[1])['overall']
    return {k: o[k] for k in ('precision', 'recall', 'per_image', 'annotated_only')}


class PseudoLabelSource:
    """The pseudo-labels of the training phase: source(images, index, flipped) -> B x K in {-1, 0, +1}.

    report: the per-class quality on the train split (pseudo_label_options.class_quality, stages in
    order), None where it is not computed (--clip-mode online). before_epoch and the state hooks do
    nothing here; CcdPseudoLabels overrides them.
    """

    def __init__(self, labels_of, report: dict | None = None):
        self.labels_of = labels_of
        self.report = report

    def __call__(self, images, index, flipped, batch=None):
        """batch: the loader's whole batch, for a source that reads more of it (aevlp.AevlpPseudoLabels)."""
        return self.labels_of(images, index, flipped)

    def before_epoch(self, epoch: int, model, predict_train) -> bool:
        """Called before the training phase of every epoch; True when the labels changed."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

"""The pseudo-labels of a run: which source the training phase gets, from the run's config.

`build_pseudo_labels` ties the frozen CLIP, the class text features (class_text_features.py) and
the embedding cache (embedding_cache.py) to a run: VLPL's labels from the cached embeddings, the
frozen CLIP on every batch (--clip-mode online), or CCD's soft-label table (ccd_labels.py) with
--pl-debias or --pl-views cam. `pseudo_label_options` is what pl_quality.json records of it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import ccd
import distributed
import pseudo_label_options as pl_options
from ccd_labels import CcdPseudoLabels
from class_text_features import read_classnames, text_features_for
from clip_loading import clip_embed_dim
from config import Config, ModelLoadError
from embedding_cache import cached_embeddings, embedding_cache_key
from pseudo_labeler import PseudoLabeler, PseudoLabelSource, pseudo_label_quality


def pseudo_label_options(cfg: Config) -> dict:
    """The pseudo-label settings of a run, as pl_quality.json records them."""
    return dict(temp=cfg.temp, threshold=cfg.threshold, partial=cfg.partial, clip_preprocess=cfg.clip_preprocess,
                prompts=cfg.prompts, pl_debias=cfg.pl_debias, pl_debias_entropy=cfg.pl_debias_entropy,
                pl_floor=cfg.pl_floor, pl_views=cfg.pl_views, pl_views_epoch=cfg.pl_views_epoch,
                pl_views_refreshes=cfg.pl_views_refreshes, pl_views_margin=cfg.pl_views_margin,
                pl_views_ratio=cfg.pl_views_ratio, pl_views_bound=cfg.pl_views_bound,
                pl_views_threshold=cfg.pl_views_threshold)


def build_pseudo_labels(cfg: Config, clip_model, tokenizer, train_split, train_eval_loader, device,
                        num_classes: int):
    """The frozen-CLIP pseudo-label source of the training phase and its quality on the train split.

    Returns (source, quality): source is a PseudoLabelSource (called with images, index, flipped ->
    B x K pseudo-labels); quality is pseudo_label_quality over the unflipped train images (None
    with --clip-mode online, which runs CLIP on every batch as the original does). --clip-mode
    cache embeds every training image once per flip state and reads the embedding of the flip the
    sampler drew. With --pl-debias or --pl-views cam the source is CcdPseudoLabels.
    """
    text = text_features_for(cfg, clip_model, tokenizer, num_classes).to(device)
    width = clip_embed_dim(clip_model)
    if text.shape[1] != width:
        raise ModelLoadError(f'text features {cfg.text_features or "(computed)"} are {text.shape[1]} wide but the CLIP '
                             f'model {cfg.clip_model} embeds images in {width}: features of another CLIP model? '
                             'Pass the matching --text-features or --clip-model')
    labeler = PseudoLabeler(clip_model.visual, text, temp=cfg.temp, threshold=cfg.threshold,
                            partial=cfg.partial, preprocess=cfg.clip_preprocess).to(device)
    if cfg.clip_mode == 'online':
        distributed.log.info('Frozen CLIP runs on every training batch (--clip-mode online); the pseudo-label '
                             'precision and recall are reported on each train line.')
        return PseudoLabelSource(lambda images, index, flipped: labeler(images)), None
    images = train_eval_loader.dataset
    if isinstance(images, torch.utils.data.Subset):  # several processes: this rank's block (distributed.shard)
        images = images.dataset
    key = embedding_cache_key(
        dataset=cfg.dataset, images=train_split.images,
        clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained, image_size=cfg.image_size,
        clip_size=labeler.image_size, precision='bf16' if cfg.amp and device.type == 'cuda' else 'float32',
        preprocess=cfg.clip_preprocess, image_stats=images.image_stats())
    emb = cached_embeddings(labeler, train_eval_loader, key, Path(cfg.cache_dir), device=device,
                            amp=cfg.amp).to(device)  # (N, 2, D): unflipped, flipped
    classnames = read_classnames(cfg.dataset, data_root=cfg.data_root)
    report = {'options': pseudo_label_options(cfg), 'classnames': classnames, 'stages': []}
    true = pl_options.truth_of(train_split.labels_true)  # dense (small data); NaN: no truth (unannotated)
    if not (cfg.pl_debias or cfg.pl_views == 'cam'):
        plain = labeler.from_embeddings(emb[:, 0]).cpu().numpy()
        report['stages'].append(pl_options.class_quality(plain, true, classnames) | {'when': 'global', 'epoch': 0})
        source = PseudoLabelSource(lambda images, index, flipped: labeler.from_embeddings(emb[index, flipped.long()]),
                                   report)
        return source, pseudo_label_quality(plain, true)
    table = torch.stack([labeler.scores(emb[:, 0]), labeler.scores(emb[:, 1])], dim=1)  # N x 2 x K
    bias = None
    stage_extra = {}
    if cfg.pl_debias:
        bias, confident, counts = ccd.class_bias(table[:, 0], cfg.pl_debias_entropy)
        table = ccd.debias(table, bias, cfg.pl_floor)
        stage_extra = dict(bias=bias.tolist(), bias_counts=counts.tolist(),
                           confident_images=int(confident.sum()),
                           classes_never_top1=[classnames[k] for k in torch.nonzero(counts == 0)[:, 0].tolist()])
    source = CcdPseudoLabels(cfg, labeler, table, bias, train_eval_loader, key, device, true, classnames, report)
    labels = source.unflipped_labels()
    report['stages'].append(pl_options.class_quality(labels, true, classnames)
                            | {'when': 'global, debiased' if cfg.pl_debias else 'global', 'epoch': 0} | stage_extra)
    return source, pseudo_label_quality(labels, true)

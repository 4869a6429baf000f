"""CCD's soft-label tables: of -l CCD (`CcdTable`, the system itself) and of VLPL's --pl-debias and
--pl-views cam options (`CcdPseudoLabels`).

The math is in ccd.py (pure functions, with the lines of github.com/k0u-id/CCD, train.py they
follow); these classes run it between the frozen CLIP and the classifier, and keep what lasts (the
table, the entropy flags, the class bias, the calibrated threshold, the refreshes done) for the run's
checkpoint. `CcdEncoder` is the frozen CLIP image tower as CCD runs it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import ccd
import distributed
import pseudo_label_options as pl_options
from clip_loading import resize_for_clip
from config import Config, UserError, one_line
from embedding_cache import cached_view_embeddings
from metrics import compute_metrics
from pseudo_labeler import PseudoLabeler, PseudoLabelSource, scores_to_labels

ENTROPY_BOUND = 2.0  # train.py:268: an image whose global score entropy exceeds 2 gets flag 0
REFRESH_EPOCH = 2  # train.py:216, 249, 299: CCD's epoch 2 (0-based), this repository's epoch 3
TEMPLATE = 'a photo of the {}'  # train.py:53 (no full stop)


# --------------------------------------------------------------------------- -l CCD

class CcdEncoder:
    """The frozen CLIP image tower as CCD runs it (clip/model.py `encode_image(image, H, W)`), giving raw
    (unnormalised) features in the tower's dtype.

    A ModifiedResNet tower (OpenAI's RN50x64 and the other RN CLIPs) takes images of any size, its
    attention pool's positional embedding resized to the feature grid (ccd.encode_image): the inference
    images at their own size, each view at its own (long side view_side, CCD: 640, not padded). Any other
    tower (a ViT) takes its square input only: images are resized to it (clip_loading.resize_for_clip) and
    views resized so that their long side is that input side, then zero-padded to a square (ccd.view_inputs).
    A view with a side under 32 px is padded to 32 px (pad_to_grid).
    """

    def __init__(self, visual, clip_size: int, view_side: int, *, any_size: bool, dtype: torch.dtype):
        self._visual = visual  # the tower, or a function that loads it (the first embedding that is not cached)
        self.clip_size, self.any_size, self.dtype = clip_size, any_size, dtype
        self.view_side = view_side if any_size else clip_size

    @property
    def visual(self):
        if callable(self._visual) and not isinstance(self._visual, torch.nn.Module):
            self._visual = self._visual()
            if ccd.is_modified_resnet(self._visual) != self.any_size:
                raise UserError('the CLIP image tower is not of the kind its open_clip config says (ModifiedResNet or not)')
        return self._visual.eval()

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S inference images -> B x D features."""
        if self.any_size:
            return ccd.encode_image(self.visual, images)
        return self.visual(resize_for_clip(images, self.clip_size).to(self.dtype))

    @torch.no_grad()
    def views(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """The image of each view (V x 3 x S x S) and the views (V x 6, ccd.cam_views rows) -> V x D. Crops of
        one size are embedded together (the original embeds one at a time)."""
        if not self.any_size:
            return self.visual(ccd.view_inputs(images, views, self.clip_size).to(self.dtype))
        crops = [pad_to_grid(ccd.crop_view(image, view.tolist())) for image, view in zip(images, views)]
        out = [None] * len(crops)
        for size in {tuple(c.shape[-2:]) for c in crops}:
            members = [i for i, c in enumerate(crops) if tuple(c.shape[-2:]) == size]
            for i, f in zip(members, ccd.encode_image(self.visual, torch.stack([crops[i] for i in members]))):
                out[i] = f
        return torch.stack(out)


MIN_VIEW_SIDE = 32  # a ModifiedResNet's stride: a shorter side leaves no feature map


def pad_to_grid(view: torch.Tensor) -> torch.Tensor:
    """A view (C x h x w) with a side under MIN_VIEW_SIDE zero-padded (the mean colour), centred, to that side.
    CCD's 80-pixel margin at 640 px never makes such a view (its sides are at least 81 px), and its forward
    would fail on one; a small margin at a small side (the demo's 8 px at 64 px) can."""
    h, w = view.shape[-2:]
    if min(h, w) >= MIN_VIEW_SIDE:
        return view
    ph, pw = max(MIN_VIEW_SIDE - h, 0), max(MIN_VIEW_SIDE - w, 0)
    return F.pad(view, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def ccd_text_features(clip_model, tokenizer, classnames: list[str], templates=(TEMPLATE,)) -> torch.Tensor:
    """K x D class text features as CCD makes them (train.py:140-156), in the CLIP's dtype: for each class in
    turn, its prompts (one per template; CCD's one: 'a photo of the {}') encoded together, each normalised,
    their mean normalised. Class by class and with the text attention's weights computed explicitly
    (explicit_text_attention), as there: batching the classes, or torch's fused attention, moves the
    features by an ulp."""
    device = next(clip_model.parameters()).device
    explicit_text_attention(clip_model)
    rows = []
    with torch.no_grad():
        for name in classnames:
            f = clip_model.encode_text(tokenizer([t.format(name) for t in templates]).to(device))
            f = f / f.norm(dim=-1, keepdim=True)
            f = f.mean(dim=0)
            rows.append(f / f.norm())
    return torch.stack(rows)


def explicit_text_attention(clip_model) -> None:
    """Make the text transformer's attention blocks return their weights (need_weights=True), as CCD's
    clip/model.py `ResidualAttentionBlock.attention` asks; torch then computes the attention explicitly
    instead of with its fused kernel (open_clip's need_weights=False), which rounds otherwise. The
    weights are dropped by the block, as there."""
    blocks = getattr(getattr(clip_model, 'transformer', None), 'resblocks', [])
    for block in blocks:
        attn = getattr(block, 'attn', None)
        if isinstance(attn, torch.nn.MultiheadAttention) and not getattr(attn, '_ccd_weights', False):
            forward = attn.forward
            attn.forward = lambda *args, _forward=forward, **kwargs: _forward(*args, **{**kwargs, 'need_weights': True})
            attn._ccd_weights = True


class CcdTable(PseudoLabelSource):
    """-l CCD's pseudo-labels (train.py `run_train`): table N x K float32 soft labels, row i the train split's
    image i; flags (N,), 1 where the global CLIP entropy is at most 2; the class bias (K,); the calibrated
    classifier threshold (CCD's `multiplier`, None until the first refresh) and the refreshes done.

    Built from the global CLIP scores (build_table). Before this repository's epochs 3 ... 2 + refreshes
    (CCD's epochs 2 ... 1 + inf_num) the table is refreshed from the CAM-guided views (refresh), the
    first time after the threshold calibration. The training phase reads table[index] (the same for a
    flipped image). Its state (state / load_state) is kept by the method that owns it (methods_ccd.Ccd).
    """

    def __init__(self, cfg: Config, encoder: CcdEncoder, text: torch.Tensor, table: torch.Tensor, flags, bias,
                 infer_loader, calibration_loader, key: dict, device, true: np.ndarray, classnames: list[str],
                 report: dict):
        super().__init__(None, report)
        self.cfg, self.encoder, self.text, self.table, self.flags, self.bias = cfg, encoder, text, table, flags, bias
        self.infer_loader, self.calibration_loader, self.key = infer_loader, calibration_loader, key
        self.device, self.true, self.classnames = device, true, classnames
        self.multiplier = None
        self.refreshes = 0

    def __call__(self, images, index, flipped, batch=None):
        return self.table[index]

    @property
    def scale(self) -> float:
        return 1.0 / self.cfg.temp  # CCD: 100.0, CLIP's logit scale (-t 0.01)

    @property
    def floor(self) -> float:
        return 1.0 / self.cfg.ccd_ls_coeff if self.cfg.ccd_ls_coeff else 0.0  # LS_coeff; 0: LS off

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """N x K soft scores of raw features (float32 or the tower's dtype), in the tower's dtype as CCD."""
        return ccd.clip_scores(features.to(self.device, self.encoder.dtype), self.text, self.scale)

    def before_epoch(self, epoch: int, model, predict_train) -> bool:
        if self.refreshes >= self.cfg.ccd_refreshes or epoch - 1 < REFRESH_EPOCH:
            return False
        if self.multiplier is None:
            self.calibrate(model)
        self.refresh(model)
        return True

    @torch.no_grad()
    def calibrate(self, model) -> None:
        """CCD's threshold calibration (train.py:216-247) on its 'thres' loader: the training images
        (--image-size, random flips) in a shuffled order (here the order and flips of a FlipSampler seeded
        with -s), the classifier in eval mode, until a window's mean count lies in (bound, bound + 2)."""
        cfg = self.cfg
        start = 0.05 if cfg.ccd_ls_coeff else 0.001  # train.py:197-200
        calibration = ccd.ThresholdCalibration(start, cfg.ccd_bound, step=cfg.ccd_calibration_step)
        model.eval()
        for batch in distributed.progress(self.calibration_loader, desc='CCD threshold calibration'):
            if 'image' in batch and calibration.feed(torch.sigmoid(model(batch['image'].to(self.device)).float())):
                break
        self.multiplier = calibration.multiplier
        stop = calibration.stopped_at
        distributed.log.info(f'CCD classifier threshold {self.multiplier:.3f} '
                             f'({"stopped at image " + str(stop) if stop is not None else "images ran out"}; '
                             f'bound {cfg.ccd_bound})')

    def refresh(self, model) -> None:
        """train.py:285-332: each class the classifier scores at least `multiplier` gives a view around its CAM
        peak; CLIP scores the views; the image's local label (max over its views, floored, divided by the
        bias) is blended into the table with --ccd-ratio."""
        cfg, encoder = self.cfg, self.encoder
        rows, _, views = ccd.cam_views(model, self.infer_loader, multiplier=self.multiplier, offset=cfg.ccd_offset,
                                       side=encoder.view_side, device=self.device, raster=cfg.ccd_box == 'released',
                                       progress=lambda iterable, desc: distributed.progress(iterable, desc=desc))
        embeddings = cached_view_embeddings(encoder.views, self.infer_loader, rows, views, self.key, cfg.cache_dir,
                                            device=self.device, width=self.text.shape[1],
                                            precision=self.key['precision'])
        local = ccd.local_labels(rows.to(self.device), self.scores(embeddings), self.table.shape[0],
                                 self.bias if cfg.ccd_local_debias else None, self.floor)
        self.table = ccd.blend(self.table, local, cfg.ccd_ratio)
        self.refreshes += 1
        when = f'after CAM views refresh {self.refreshes} (before epoch {REFRESH_EPOCH + self.refreshes})'
        stage = table_quality(self.table, self.true, self.classnames)
        stage.update(when=when, views=int(rows.numel()), views_per_image=float(rows.numel()) / max(len(self.table), 1),
                     multiplier=self.multiplier)
        self.report['stages'].append(stage)
        distributed.log.info(f'{pl_options.quality_line(stage, when)}; {stage["views_per_image"]:.2f} views / image')

    def state(self) -> dict:
        return {'table': self.table.cpu(), 'flags': self.flags.cpu(), 'bias': self.bias.cpu(),
                'multiplier': self.multiplier, 'refreshes': self.refreshes, 'report': self.report}

    def load_state(self, state: dict) -> None:
        if state.get('table') is None or tuple(state['table'].shape) != tuple(self.table.shape):
            raise UserError(f'the checkpoint\'s CCD table is {tuple(state["table"].shape) if "table" in state else None}, '
                            f'this run\'s {tuple(self.table.shape)}: resume with the same data')
        self.table, self.flags = state['table'].to(self.device), state['flags'].to(self.device)
        self.bias = state['bias'].to(self.device)
        self.multiplier, self.refreshes = state['multiplier'], state['refreshes']
        self.report = state.get('report', self.report)


def table_quality(table: torch.Tensor, true: np.ndarray, classnames: list[str]) -> dict:
    """The per-class quality (pseudo_label_options.class_quality) of a soft table read as positives where it
    is at least 0.5, plus its mAP against the true labels ('map'): a display of the train split's truth,
    which enters nothing else."""
    soft = table.float().cpu().numpy()
    stage = pl_options.class_quality((soft >= 0.5).astype(np.float32), true, classnames)
    stage['map'] = float(compute_metrics(soft, true)['map'])
    return stage


def build_table(cfg: Config, encoder: CcdEncoder, text: torch.Tensor, features: torch.Tensor, **kw) -> CcdTable:
    """The table after CCD's epoch-0 pass (train.py:258-282, 334-341): the global scores of the N x D raw
    features, the entropy flags and the class bias (ccd.class_bias; a class never the top-1 of a
    confident image gets bias 1, the original NaN), floored at 1 / --ccd-ls-coeff and, with
    --ccd-global-debias, divided by the bias and clamped to [0, 1]."""
    scores = ccd.clip_scores(features.to(kw['device'], encoder.dtype), text, 1.0 / cfg.temp)
    bias, confident, counts = ccd.class_bias(scores, ENTROPY_BOUND)
    floor = 1.0 / cfg.ccd_ls_coeff if cfg.ccd_ls_coeff else 0.0
    table = ccd.floor_scores(scores, floor)
    if cfg.ccd_global_debias:
        table = (table / bias).clamp(0, 1)
    source = CcdTable(cfg, encoder, text, table, confident.float(), bias, **kw)
    classnames = source.classnames
    stage = table_quality(table, source.true, classnames)
    stage.update(when='global' + (', debiased' if cfg.ccd_global_debias else ''), bias=bias.tolist(),
                 bias_counts=counts.tolist(), confident_images=int(confident.sum()),
                 classes_never_top1=[classnames[k] for k in torch.nonzero(counts == 0)[:, 0].tolist()])
    source.report['stages'].append(stage)
    return source


class CcdPseudoLabels(PseudoLabelSource):
    """CCD's soft labels (ccd.py) thresholded by the VLPL rule (scores_to_labels).

    table: N x 2 x K soft labels (unflipped, flipped): the global softmax scores, debiased with
    --pl-debias (bias from the unflipped scores), and with --pl-views cam blended with the local
    views' labels before epochs views_epoch + 1 ... views_epoch + refreshes (the first time after
    calibrating the classifier threshold, CCD's `multiplier`). The table, the multiplier and the
    refreshes done are the state saved in the checkpoint.
    """

    def __init__(self, cfg: Config, labeler: PseudoLabeler, table: torch.Tensor, bias, loader, key: dict, device,
                 true: np.ndarray, classnames: list[str], report: dict):
        super().__init__(self._labels, report)
        self.cfg, self.labeler, self.table, self.bias = cfg, labeler, table, bias
        self.loader, self.key, self.device, self.true, self.classnames = loader, key, device, true, classnames
        self.multiplier = None
        self.refreshes = 0

    def _labels(self, images, index, flipped):
        return scores_to_labels(self.table[index, flipped.long()], self.cfg.threshold, self.cfg.partial)

    def unflipped_labels(self) -> np.ndarray:
        return scores_to_labels(self.table[:, 0], self.cfg.threshold, self.cfg.partial).cpu().numpy()

    def before_epoch(self, epoch: int, model, predict_train) -> bool:
        cfg = self.cfg
        if cfg.pl_views != 'cam' or self.refreshes >= cfg.pl_views_refreshes or epoch - 1 < cfg.pl_views_epoch:
            return False
        if self.multiplier is None and cfg.pl_views_threshold is not None:
            self.multiplier = cfg.pl_views_threshold
        if self.multiplier is None:  # CCD calibrates once, on a shuffled pass (train.py:216-247)
            probs = torch.from_numpy(predict_train())
            probs = probs[torch.randperm(probs.shape[0], generator=torch.Generator().manual_seed(cfg.seed))]
            probs = probs[~torch.isnan(probs[:, 0])]
            start = 0.05 if cfg.pl_debias and cfg.pl_floor > 0 else 0.001  # train.py:197-200 (LS on or off)
            self.multiplier, stop = ccd.calibrate_threshold(probs, start, cfg.pl_views_bound)
            distributed.log.info(f'CCD classifier threshold {self.multiplier:.3f} '
                                 f'({"stopped at image " + str(stop) if stop is not None else "images ran out"}; '
                                 f'bound {cfg.pl_views_bound})')
        try:
            rows, _, boxes = ccd.cam_views(
                model, self.loader, multiplier=self.multiplier, offset=int(round(cfg.pl_views_margin * cfg.image_size)),
                side=self.labeler.image_size, device=self.device,
                progress=lambda iterable, desc: distributed.progress(iterable, desc=desc))
        except ValueError as exc:  # a model without CAM: refused at parse time, kept as a guard
            raise UserError(f'--pl-views cam: {one_line(exc)}') from None
        labeler = self.labeler
        embeddings = cached_view_embeddings(
            lambda images, views: labeler.embed_inputs(ccd.view_inputs(images, views, labeler.image_size,
                                                                       labeler.to_clip_normalisation)),
            self.loader, rows, boxes, self.key, self.cfg.cache_dir, device=self.device,
            width=labeler.text_features.shape[1]).to(self.device)
        scores = self.labeler.scores(embeddings)
        local = ccd.local_labels(rows.to(self.device), scores, self.table.shape[0], self.bias, self.floor)
        self.table = ccd.blend(self.table, local[:, None, :], cfg.pl_views_ratio)
        self.refreshes += 1
        when = f'after CAM views refresh {self.refreshes} (before epoch {epoch})'
        stage = pl_options.class_quality(self.unflipped_labels(), self.true, self.classnames)
        stage.update(when=when, epoch=epoch, views=int(rows.numel()),
                     views_per_image=float(rows.numel()) / max(self.table.shape[0], 1), multiplier=self.multiplier)
        self.report['stages'].append(stage)
        distributed.log.info(pl_options.quality_line(stage, when) + f'; {stage["views_per_image"]:.2f} views / image')
        return True

    @property
    def floor(self) -> float:
        return self.cfg.pl_floor if self.cfg.pl_debias else 0.0

    def state_dict(self) -> dict:
        return {'table': self.table.cpu(), 'multiplier': self.multiplier, 'refreshes': self.refreshes,
                'report': self.report}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.table = state['table'].to(self.device)
            self.multiplier, self.refreshes = state['multiplier'], state['refreshes']
            self.report = state.get('report', self.report)


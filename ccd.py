"""CCD's pseudo-label refinements (Kim & Shim, "Classifier-guided CLIP Distillation", CVPR 2025),
as options of the VLPL pseudo-labeller: the per-class debiasing of CLIP's scores and the local
views cropped around the classifier's class activation maps (CAM).

Source: github.com/k0u-id/CCD, train.py `run_train` (the epoch-0 global pass and debias, the
epoch-2 threshold calibration, the CAM-guided refresh) and `cropping_box`. Each function below
names the lines it follows. Three bugs of the released code are fixed here (docs/ccd.md):
- a class that is never CLIP's top-1 gets the bias 0 / 0 = NaN there; here it gets 1 (no change);
- the crop's x-range is taken from the first and last thresholded pixels in row order there (their
  columns, not the smallest and largest column); here it is the true column range;
- a flat CAM has no thresholded pixel and raises IndexError there; here the view is the whole image.

The pure functions take and return tensors; `cam_views` finds the views of a split with the
classifier, `view_inputs` makes their CLIP inputs, `local_labels` and `blend` refresh the labels
(ccd_labels.CcdPseudoLabels runs them, with the frozen CLIP in between).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

ENTROPY_EPS = 1e-10  # train.py:266
CAM_PEAK = 0.95  # train.py:311, fraction of the normalised CAM range that marks the peak
CAM_NORM_EPS = 1e-5  # train.py:308
CALIBRATION_WINDOW = 100  # train.py:231, 236
CALIBRATION_STEP = 0.001  # train.py:245


# --------------------------------------------------------------------------- global scores and debias

def entropy(scores: torch.Tensor) -> torch.Tensor:
    """H_i = -sum_k p_ik log(p_ik + 1e-10) of N x K softmax scores -> (N,) (train.py:266)."""
    return -torch.sum(scores * torch.log(scores + ENTROPY_EPS), dim=1)


def class_bias(scores: torch.Tensor, max_entropy: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CCD's per-class bias of CLIP (train.py:265-279, 335): (bias (K,), confident (N,), counts (K,)).

    confident_i = H_i <= max_entropy (the original flags H_i > 2 as 0). Over the confident images
    whose top-1 class is c: bias_c = mean of their top-1 score, counts_c = how many there are.
    A class that is never the top-1 of a confident image gets bias 1 (the original: 0/0 = NaN,
    which spreads into every label).
    """
    scores = scores.float()
    confident = entropy(scores) <= max_entropy
    top = scores.topk(1, dim=1).indices[:, 0]  # as train.py:273
    num_classes = scores.shape[1]
    sums = torch.zeros(num_classes, dtype=scores.dtype, device=scores.device)
    counts = torch.zeros(num_classes, dtype=scores.dtype, device=scores.device)
    sel = top[confident]
    sums.index_add_(0, sel, scores[confident].gather(1, sel[:, None])[:, 0])
    counts.index_add_(0, sel, torch.ones_like(sel, dtype=scores.dtype))
    bias = torch.where(counts > 0, sums / counts.clamp(min=1), torch.ones_like(sums))
    return bias, confident, counts


def floor_scores(scores: torch.Tensor, floor: float) -> torch.Tensor:
    """CCD's label smoothing: p <- p where p >= floor, else floor (train.py:337-339, 325-327;
    floor = 1 / LS_coeff). floor 0: unchanged."""
    if floor <= 0:
        return scores
    return torch.where(scores >= floor, scores, torch.full_like(scores, floor))


def debias(scores: torch.Tensor, bias: torch.Tensor, floor: float = 0.05) -> torch.Tensor:
    """Debiased global labels: clamp(floor_scores(p) / bias, 0, 1) (train.py:336-341, LS and
    global_temp on). scores (..., K), bias (K,)."""
    return (floor_scores(scores, floor) / bias).clamp(0, 1)


# --------------------------------------------------------------------------- local views

def blend(old: torch.Tensor, local: torch.Tensor, ratio: float) -> torch.Tensor:
    """clamp(ratio * old + (1 - ratio) * local, 0, 1) (train.py:332)."""
    return (ratio * old + (1 - ratio) * local).clamp(0, 1)


def cam_peak_box(cam: torch.Tensor, height: int, width: int) -> Optional[tuple[int, int, int, int]]:
    """The box (ymin, xmin, ymax, xmax), inclusive, of a class's CAM peak (train.py:305-313).

    cam: h x w map of one class. It is upsampled bilinearly (align_corners False) to
    height x width, min-max normalised ((m - min) / (max - min + 1e-5)), and the pixels above 0.95
    form the peak. Rows: the first and last peak rows, as the original. Columns: the smallest and
    largest peak column (the original takes the columns of the first and last peak pixel in row
    order, a bug). None when no pixel passes (a flat CAM; the original raises IndexError).
    """
    m = F.interpolate(cam[None, None].float(), (height, width), mode='bilinear', align_corners=False)
    m = (m - m.amin(dim=(2, 3), keepdim=True)) / (m.amax(dim=(2, 3), keepdim=True)
                                                 - m.amin(dim=(2, 3), keepdim=True) + CAM_NORM_EPS)
    peak = m[0, 0] > CAM_PEAK
    rows = torch.nonzero(peak.any(dim=1))[:, 0]
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(peak.any(dim=0))[:, 0]
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def crop_box(pos1: tuple[int, int], pos2: tuple[int, int], offset: int, height: int,
             width: int) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) of CCD's `cropping_box` (train.py:55-89): the rectangle spanned by
    pos1 = (y1, x1) and pos2 = (y2, x2), widened by `offset` pixels on every side and clipped to
    the image; the max ends are exclusive (image[..., ymin:ymax, xmin:xmax]). An empty range
    (possible only with offset 0) is widened to one pixel."""
    (y1, x1), (y2, x2) = pos1, pos2
    ymin, ymax = min(y1, y2) - offset, max(y1, y2) + offset
    xmin, xmax = min(x1, x2) - offset, max(x1, x2) + offset
    ymin, xmin = max(ymin, 0), max(xmin, 0)
    ymax, xmax = min(ymax, height), min(xmax, width)
    if ymax <= ymin:
        ymin, ymax = min(ymin, height - 1), min(ymin, height - 1) + 1
    if xmax <= xmin:
        xmin, xmax = min(xmin, width - 1), min(xmin, width - 1) + 1
    return int(xmin), int(ymin), int(xmax), int(ymax)


def crop_size(crop_h: int, crop_w: int, long_side: int) -> tuple[int, int]:
    """(out_h, out_w) of a crop resized so its longer side is `long_side` (train.py:83-93; on a tie
    the height decides, as the original's `cropx > cropy` test)."""
    scale = long_side / crop_w if crop_w > crop_h else long_side / crop_h
    return int(crop_h * scale), int(crop_w * scale)


def crop_view(image: torch.Tensor, box: tuple[int, int, int, int], long_side: int) -> torch.Tensor:
    """Crop (xmin, ymin, xmax, ymax) of a C x H x W image, resized bilinearly (align_corners False,
    no antialiasing, as train.py:91-93) so that its longer side is `long_side` -> C x h' x w'."""
    xmin, ymin, xmax, ymax = box
    size = crop_size(ymax - ymin, xmax - xmin, long_side)
    return F.interpolate(image[None, :, ymin:ymax, xmin:xmax], size, mode='bilinear', align_corners=False)[0]


def pad_to_square(view: torch.Tensor, side: int) -> torch.Tensor:
    """C x h x w (max(h, w) = side) -> C x side x side, centred, zero padding (the mean colour
    of a normalised image). A ViT CLIP takes square inputs only; CCD's ResNet CLIP takes any."""
    h, w = view.shape[-2:]
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(view, (left, side - w - left, top, side - h - top))


def calibrate_threshold(probs: torch.Tensor, start: float, bound: float, *, step: float = CALIBRATION_STEP,
                        window: int = CALIBRATION_WINDOW) -> tuple[float, Optional[int]]:
    """CCD's threshold calibration (train.py:216-247): (multiplier, index of the image where it
    stopped, or None if the images ran out first).

    probs: N x K classifier probabilities in the order visited. For each image, add
    #{k: p_k >= multiplier} / 100 to a running float32 average; after image idx with
    idx % 100 == 0 and idx != 0 (so the first window holds 101 images): stop if
    bound < average < bound + 2, else raise the multiplier by 0.001; reset the average.
    """
    multiplier = float(start)
    avg = np.float32(0)
    denom = np.float32(window)
    for idx in range(probs.shape[0]):
        count = np.float32((probs[idx] >= multiplier).sum().item())
        avg = np.float32(avg + count / denom)
        if idx % window == 0 and idx != 0:
            if bound < avg < bound + 2:
                return multiplier, idx
            multiplier += step
            avg = np.float32(0)
    return multiplier, None


# --------------------------------------------------------------------------- the refresh of a split

def local_labels(rows: torch.Tensor, view_scores: torch.Tensor, num_rows: int, bias: Optional[torch.Tensor],
                 floor: float) -> torch.Tensor:
    """Each image's label from its local views (train.py:302, 320-330) -> N x K: L = max over the rows of
    [0_K; the image's view scores] (so L = 0 without views), floored, then divided by the bias (no
    clamp here, as the original; bias None: no division). rows: (V,) image of each view; view_scores:
    V x K softmax scores."""
    labels = torch.zeros(num_rows, view_scores.shape[1], dtype=view_scores.dtype, device=view_scores.device)
    if rows.numel():
        labels.scatter_reduce_(0, rows[:, None].expand_as(view_scores), view_scores, 'amax')  # max over [0; views]
    labels = floor_scores(labels, floor)
    return labels / bias if bias is not None else labels


@torch.no_grad()
def cam_views(model, loader, *, multiplier: float, margin: float, device,
              progress=lambda iterable, desc: iterable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The local views of a split (train.py:286-314): (rows (V,), classes (V,), boxes V x 4 as
    (xmin, ymin, xmax, ymax), exclusive max ends) on the CPU.

    model: a models.Classifier with class_activation_maps (its BoostLU factor, if any, is applied to
    the positive CAM, as CCD's model applies alpha). loader: the split without flips, batches with
    'image' (B x 3 x S x S) and 'index'. Each class with sigmoid(logit) >= multiplier gives one view:
    the box of its CAM peak (cam_peak_box) widened by round(margin * S) pixels (crop_box); the whole
    image where the CAM is flat.
    """
    model.eval()
    rows, classes, boxes = [], [], []
    for batch in progress(loader, 'CCD local views: CAM peaks'):
        if 'image' not in batch:
            continue
        images = batch['image'].to(device)
        index = batch['index']
        height, width = images.shape[-2:]
        offset = int(round(margin * max(height, width)))
        features = model.forward_features(images)
        probs = torch.sigmoid(model.forward_head(features).float())
        cams = model.class_activation_maps(features).float()
        if getattr(model, 'cam_boost', None) is not None:  # CCD models.py ImageClassifier.forward
            cams = torch.where(cams > 0, cams * model.cam_boost, cams)
        for b, k in (probs >= multiplier).nonzero().tolist():  # row-major: classes in order per image
            peak = cam_peak_box(cams[b, k], height, width)
            box = ((0, 0, width, height) if peak is None
                   else crop_box((peak[0], peak[1]), (peak[2], peak[3]), offset, height, width))
            rows.append(int(index[b]))
            classes.append(k)
            boxes.append(box)
    return (torch.tensor(rows, dtype=torch.long), torch.tensor(classes, dtype=torch.long),
            torch.tensor(boxes, dtype=torch.long).view(-1, 4))


def view_inputs(images: torch.Tensor, boxes: torch.Tensor, side: int,
                to_clip: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.Tensor:
    """CLIP inputs V x 3 x side x side of the views: image v cropped to boxes[v] (crop_view, longer
    side `side`), converted by to_clip (e.g. to CLIP's normalisation), padded to a square."""
    return torch.stack([pad_to_square(to_clip(crop_view(image, tuple(box.tolist()), side)), side)
                        for image, box in zip(images, boxes)])

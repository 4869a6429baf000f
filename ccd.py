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


def cam_peak_box(cam: torch.Tensor, height: int, width: int, *,
                 raster: bool = False) -> Optional[tuple[int, int, int, int]]:
    """Two corners (y1, x1, y2, x2) of a class's CAM peak (train.py:305-313), for crop_box.

    cam: h x w map of one class. It is upsampled bilinearly (align_corners False) to
    height x width, min-max normalised ((m - min) / (max - min + 1e-5)), and the pixels above 0.95
    form the peak. raster True: the first and the last peak pixel in row-major order, as the original
    takes them (so the columns are those two pixels', not the peak's range: a narrower box unless the
    peak is a rectangle). raster False: (first row, smallest column, last row, largest column), the
    peak's true range. None when no pixel passes (a flat CAM; the original raises IndexError).
    """
    return cam_peak_boxes(cam[None], height, width, raster=raster)[0]


def cam_peak_boxes(cams: torch.Tensor, height: int, width: int, *, raster: bool = False,
                   chunk: int = 64) -> list[Optional[tuple[int, int, int, int]]]:
    """cam_peak_box of each of M maps (M x h x w), upsampled `chunk` at a time."""
    boxes = []
    for start in range(0, cams.shape[0], chunk):
        m = F.interpolate(cams[start:start + chunk, None].float(), (height, width), mode='bilinear',
                          align_corners=False)
        m = (m - m.amin(dim=(2, 3), keepdim=True)) / (m.amax(dim=(2, 3), keepdim=True)
                                                     - m.amin(dim=(2, 3), keepdim=True) + CAM_NORM_EPS)
        peak = (m > CAM_PEAK)[:, 0]  # M' x H x W
        found = peak.flatten(1).any(dim=1).tolist()
        if raster:  # the first and the last True in row-major order
            flat = peak.flatten(1).to(torch.uint8)
            first = flat.argmax(dim=1)
            last = flat.shape[1] - 1 - flat.flip(1).argmax(dim=1)
            corners = torch.stack([first // width, first % width, last // width, last % width], dim=1)
        else:  # the first and last rows and columns with a True
            rows, cols = peak.any(dim=2).to(torch.uint8), peak.any(dim=1).to(torch.uint8)
            corners = torch.stack([rows.argmax(dim=1), cols.argmax(dim=1), height - 1 - rows.flip(1).argmax(dim=1),
                                   width - 1 - cols.flip(1).argmax(dim=1)], dim=1)
        boxes += [tuple(c) if ok else None for c, ok in zip(corners.tolist(), found)]
    return boxes


def _box_sides(pos1: tuple[int, int], pos2: tuple[int, int], offset: int, height: int,
               width: int) -> tuple[tuple[int, int, int, int], tuple[bool, bool]]:
    """crop_box's box and, per side (rows, columns), whether both of its ends were clamped to the image."""
    (y1, x1), (y2, x2) = pos1, pos2
    ymin, ymax = min(y1, y2) - offset, max(y1, y2) + offset
    xmin, xmax = min(x1, x2) - offset, max(x1, x2) + offset
    clamped_rows = ymin < 0 and ymax > height
    clamped_cols = xmin < 0 and xmax > width
    ymin, xmin = max(ymin, 0), max(xmin, 0)
    ymax, xmax = min(ymax, height), min(xmax, width)
    if ymax <= ymin:
        ymin, ymax = min(ymin, height - 1), min(ymin, height - 1) + 1
    if xmax <= xmin:
        xmin, xmax = min(xmin, width - 1), min(xmin, width - 1) + 1
    return (int(xmin), int(ymin), int(xmax), int(ymax)), (clamped_rows, clamped_cols)


def crop_box(pos1: tuple[int, int], pos2: tuple[int, int], offset: int, height: int,
             width: int) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) of CCD's `cropping_box` (train.py:55-89): the rectangle spanned by
    pos1 = (y1, x1) and pos2 = (y2, x2), widened by `offset` pixels on every side and clipped to
    the image; the max ends are exclusive (image[..., ymin:ymax, xmin:xmax]). An empty range
    (possible only with offset 0) is widened to one pixel."""
    return _box_sides(pos1, pos2, offset, height, width)[0]


def crop_size(crop_h: int, crop_w: int, long_side: int, *, python_sides: tuple[bool, bool] = (False, False)
              ) -> tuple[int, int]:
    """(out_h, out_w) of a crop resized so its longer side is `long_side`, in CCD's arithmetic
    (train.py:83-93; on a tie the height decides, as the original's `cropx > cropy` test).

    run_train gives `cropping_box` the CAM corners as 0-dim int64 tensors (rows of `nonzero()`), so a
    side is a tensor, and `scale = 640 / side` a float32 tensor (computed by torch as 640 x float32(1 / side)),
    unless both of its ends were clamped to the image (then Python ints, and Python floats). The out size is int() of the float32 product
    side * scale (truncated), which for about 10 % of boxes is one pixel less than the exact quotient
    (639 for 640). python_sides: (rows, columns) whose both ends were clamped (crop_geometry tells).
    """
    rows_int, cols_int = python_sides
    if crop_w > crop_h:
        long, long_int = crop_w, cols_int
    else:
        long, long_int = crop_h, rows_int
    # `640 / tensor` is torch's reciprocal-then-multiply in float32 (Tensor.__rtruediv__), not a division
    scale = long_side / long if long_int else np.float32(np.float32(1) / np.float32(long)) * np.float32(long_side)

    def side(n: int, n_int: bool) -> int:
        if n_int and long_int:  # Python int times Python float
            return int(n * scale)
        return int(np.float32(n) * np.float32(scale))  # a float32 tensor product
    return side(crop_h, rows_int), side(crop_w, cols_int)


def crop_geometry(pos1: tuple[int, int], pos2: tuple[int, int], offset: int, height: int, width: int,
                  long_side: int) -> tuple[int, int, int, int, int, int]:
    """CCD's `cropping_box` for CAM corners as run_train passes them: (xmin, ymin, xmax, ymax) (crop_box)
    and the (out_h, out_w) of its resize (crop_size, with the sides that stayed tensors)."""
    box, python_sides = _box_sides(pos1, pos2, offset, height, width)
    xmin, ymin, xmax, ymax = box
    return box + crop_size(ymax - ymin, xmax - xmin, long_side, python_sides=python_sides)


def crop_view(image: torch.Tensor, view) -> torch.Tensor:
    """Crop (xmin, ymin, xmax, ymax) of a C x H x W image, resized bilinearly (align_corners False,
    no antialiasing, as train.py:91-93) to (out_h, out_w): view is a crop_geometry row -> C x out_h x out_w."""
    xmin, ymin, xmax, ymax, out_h, out_w = (int(v) for v in view)
    return F.interpolate(image[None, :, ymin:ymax, xmin:xmax], (out_h, out_w), mode='bilinear',
                         align_corners=False)[0]


def pad_to_square(view: torch.Tensor, side: int) -> torch.Tensor:
    """C x h x w (max(h, w) = side) -> C x side x side, centred, zero padding (the mean colour
    of a normalised image). A ViT CLIP takes square inputs only; CCD's ResNet CLIP takes any."""
    h, w = view.shape[-2:]
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(view, (left, side - w - left, top, side - h - top))


class ThresholdCalibration:
    """CCD's threshold calibration (train.py:216-247), fed the classifier's probabilities image by image.

    For each image, add #{k: p_k >= multiplier} / 100 to a running float32 average (the original's float32
    tensor); after image idx with idx % 100 == 0 and idx != 0 (so the first window holds 101 images): stop
    if bound < average < bound + 2, else raise the multiplier by 0.001 and reset the average. The
    multiplier only rises; the images may run out first (stopped_at None). The comparisons are torch's
    (a float32 tensor against the Python float multiplier), as the original's.
    """

    def __init__(self, start: float, bound: float, *, step: float = CALIBRATION_STEP, window: int = CALIBRATION_WINDOW):
        self.multiplier, self.bound, self.step, self.window = float(start), bound, step, window
        self.avg, self.seen, self.stopped_at = np.float32(0), 0, None

    def feed(self, probs: torch.Tensor) -> bool:
        """probs: B x K probabilities of the next images in the order visited; True once stopped."""
        counts = None
        for row in probs:
            if self.stopped_at is not None:
                break
            idx, self.seen = self.seen, self.seen + 1
            counts = np.float32((row >= self.multiplier).sum().item())
            self.avg = np.float32(self.avg + counts / np.float32(self.window))
            if idx % self.window == 0 and idx != 0:
                if self.bound < self.avg < self.bound + 2:
                    self.stopped_at = idx
                else:
                    self.multiplier += self.step
                    self.avg = np.float32(0)
        return self.stopped_at is not None


def calibrate_threshold(probs: torch.Tensor, start: float, bound: float, *, step: float = CALIBRATION_STEP,
                        window: int = CALIBRATION_WINDOW) -> tuple[float, Optional[int]]:
    """ThresholdCalibration over N x K probabilities in the order visited: (multiplier, index of the image
    where it stopped, or None if the images ran out first)."""
    calibration = ThresholdCalibration(start, bound, step=step, window=window)
    calibration.feed(probs)
    return calibration.multiplier, calibration.stopped_at


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
def cam_views(model, loader, *, multiplier: float, offset: int, side: int, device, raster: bool = False,
              progress=lambda iterable, desc: iterable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The local views of a split (train.py:286-314): (rows (V,), classes (V,), views V x 6) on the CPU,
    a view being (xmin, ymin, xmax, ymax, out_h, out_w): its box (exclusive max ends) and the size of its
    crop resized to the long side `side` in CCD's arithmetic (crop_geometry).

    model: a models.Classifier with class_activation_maps (its BoostLU factor, if any, is applied to
    the positive CAM, as CCD's model applies alpha). loader: the split without flips, batches with
    'image' (B x 3 x S x S) and 'index'. Each class with sigmoid(logit) >= multiplier gives one view
    (classes in order within an image): the box of its CAM peak (cam_peak_box; raster: the original's
    corners) widened by `offset` pixels; the whole image where the CAM is flat.
    """
    model.eval()
    rows, classes, views = [], [], []
    for batch in progress(loader, 'CCD local views: CAM peaks'):
        if 'image' not in batch:
            continue
        images = batch['image'].to(device)
        index = batch['index']
        height, width = images.shape[-2:]
        features = model.forward_features(images)
        probs = torch.sigmoid(model.forward_head(features).float())
        cams = model.class_activation_maps(features).float()
        if getattr(model, 'cam_boost', None) is not None:  # CCD models.py ImageClassifier.forward
            cams = torch.where(cams > 0, cams * model.cam_boost, cams)
        chosen = (probs >= multiplier).nonzero()  # row-major: classes in order per image
        peaks = cam_peak_boxes(cams[chosen[:, 0], chosen[:, 1]], height, width, raster=raster)
        for (b, k), peak in zip(chosen.tolist(), peaks):
            if peak is None:  # flat: the whole image, both sides clamped
                views.append((0, 0, width, height) + crop_size(height, width, side, python_sides=(True, True)))
            else:
                views.append(crop_geometry((peak[0], peak[1]), (peak[2], peak[3]), offset, height, width, side))
            rows.append(int(index[b]))
            classes.append(k)
    return (torch.tensor(rows, dtype=torch.long), torch.tensor(classes, dtype=torch.long),
            torch.tensor(views, dtype=torch.long).view(-1, 6))


def view_inputs(images: torch.Tensor, views: torch.Tensor, side: int,
                to_clip: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.Tensor:
    """CLIP inputs V x 3 x side x side of the views: image v cropped and resized to views[v] (crop_view,
    longer side `side`), converted by to_clip (e.g. to CLIP's normalisation), padded to a square (for a
    CLIP that takes square inputs only)."""
    return torch.stack([pad_to_square(to_clip(crop_view(image, view.tolist())), side)
                        for image, view in zip(images, views)])


# --------------------------------------------------------------------------- CCD's CLIP at any input size

def positional_embedding_for(positional: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CCD's `upsample_pos_emb` (clip/model.py:9-25): the attention pool's (1 + s*s) x D positional
    embedding for an h x w feature grid: the s x s part resized bilinearly (align_corners False) to
    grid, the first (the mean token's) row kept, then rounded to fp16 (`emb.half()`, also on a float32
    model: a quirk that changes the numbers, kept) -> (1 + h*w) x D in fp16."""
    first, rest = positional[:1], positional[1:]
    size = int(round(rest.shape[0] ** 0.5))
    if size * size != rest.shape[0]:
        raise ValueError(f'positional embedding of {positional.shape[0]} rows is not 1 + a square grid')
    dim = rest.shape[1]
    rest = rest.permute(1, 0).reshape(1, dim, size, size)
    rest = F.interpolate(rest, size=grid, mode='bilinear', align_corners=False)
    rest = rest.reshape(dim, -1).permute(1, 0)
    return torch.cat([first, rest], 0).half()


def is_modified_resnet(visual) -> bool:
    """A CLIP image tower CCD's any-size forward applies to: open_clip's (= OpenAI's) ModifiedResNet,
    with its stem, four layers and attention pool."""
    return all(hasattr(visual, name) for name in ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'attnpool'))


def encode_image(visual, images: torch.Tensor) -> torch.Tensor:
    """CCD's `clip_model.encode_image(image, H, W)` (clip/model.py ModifiedResNet.forward and
    AttentionPool2d.forward): B x 3 x H x W images of any size -> B x D unnormalised features.

    The inputs are cast to the tower's dtype, run through its stem and layers, and pooled by its
    attention pool with the positional embedding resized to the feature grid (positional_embedding_for;
    the original derives the grid from H and W as (H // 32, +1 where H % 32 == 31), which is the
    feature map's own size). visual: an open_clip ModifiedResNet (its modules and weights are OpenAI's)."""
    x = images.type(visual.conv1.weight.dtype)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
    pool = visual.attnpool
    grid = (x.shape[2], x.shape[3])
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + positional_embedding_for(pool.positional_embedding, grid)[:, None, :].to(x.dtype)
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=pool.training, need_weights=False)
    return x[0]


def clip_scores(features: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """CCD's soft scores (train.py:261-263, 317-319): softmax over classes of (scale * f / |f|) @ T^T, in
    that order of operations (the features are scaled before the product); features B x D (any dtype),
    text K x D normalised -> B x K float32."""
    f = features / features.norm(dim=-1, keepdim=True)
    return torch.softmax(scale * f @ text.to(f.dtype).T, dim=1).float()


# --------------------------------------------------------------------------- training (train.py:378-415)

def soft_label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE with logits against soft targets in [0, 1], per entry (B x K): -(y log s(z) + (1 - y) log(1 - s(z)))."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction='none')


def consistency_loss(view_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """CCD's consistency term (train.py:403-404, 407): mean BCE of the second view's logits against the
    sigmoid of the first view's, which gets no gradient (logits_target = logits.clone().detach())."""
    return F.binary_cross_entropy_with_logits(view_logits, torch.sigmoid(logits.detach()), reduction='none').mean()


def ccd_loss(logits: torch.Tensor, targets: torch.Tensor, *, flags: Optional[torch.Tensor] = None,
             view_logits: Optional[torch.Tensor] = None, loss_coeff: float = 1.0,
             consistency: float = 1.0) -> torch.Tensor:
    """The loss of a CCD training step (train.py:400-410). Without a second view (epochs 0 and 1, or
    use_consist 0): mean over B x K of soft_label_loss. With it:
        mean(w_i * soft_label_loss) + consistency * consistency_loss,  w_i = clamp(flag_i + loss_coeff, 0, 1),
    flag_i = 1 for an image whose global CLIP entropy is at most 2 (class_bias's `confident`), else 0
    (so with the script's loss_coeff 1 every w_i is 1). logits, targets B x K; flags (B,)."""
    ce = soft_label_loss(logits, targets)
    if view_logits is None:
        return ce.mean()
    weights = (flags.to(ce.dtype)[:, None] + loss_coeff).clamp(min=0, max=1)
    return (weights * ce).mean() + consistency * consistency_loss(view_logits, logits)


# --------------------------------------------------------------------------- the label-free epoch choice

def train_map(preds: np.ndarray, table: np.ndarray) -> float:
    """CCD's train mAP (train.py:434, instrumentation.py `compute_metrics`): 100 x the mean over classes of
    the AP of the train-phase predictions against the pseudo-labels, an entry counting as positive only
    where it equals 1 (soft labels clamped at 1); AP 0 for a class without a positive."""
    from metrics import average_precision_per_class  # a pure leaf module

    return 100.0 * float(np.mean(average_precision_per_class(np.asarray(preds, dtype=np.float64), table == 1)))


def label_free_epoch(train_maps: list[float]) -> Optional[int]:
    """CCD's choice without labels (`bestccd`, train.py:447-470): the first epoch (0-based) whose train-mAP
    gain over the previous epoch exceeds the previous epoch's gain (gain_0 = 100, and the gain before it
    100): the epoch at which the fit to the pseudo-labels speeds up again. None if no epoch qualifies
    (the original then fails on its closing line)."""
    gain_prev, previous = 100.0, None
    for epoch, value in enumerate(train_maps):
        gain = value - previous if epoch >= 1 else 100.0
        previous = value
        if gain - gain_prev > 0:
            return epoch
        gain_prev = gain
    return None

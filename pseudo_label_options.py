"""Options of the VLPL pseudo-labeller besides CCD's (ccd.py): prompt templates, CLIP's own
preprocessing, and the per-class quality report of the pseudo-labels (pl_quality.json).

- Prompts (--prompts FILE|ensemble): a class's text feature is the L2-normalised mean of the
  L2-normalised embeddings of its prompts, one per template (the ensembling of CLIP's
  "Prompt_Engineering_for_ImageNet" notebook, openai/CLIP, and of CCD's train.py:140-156).
- Preprocessing (--clip-preprocess clip): the pipeline tensor (ImageNet-normalised, S x S) is
  turned back into pixels, resized with CLIP's interpolation to CLIP's input size and normalised
  with CLIP's mean and std (open_clip's `preprocess_cfg` of the image tower). For the square
  pipeline image, CLIP's resize of the shorter side plus centre crop is this plain resize.
- Quality (`class_quality`): precision, recall and count of the positive pseudo-labels per class,
  against the true labels of the train split (`truth_of`: of a dataset of partial annotations,
  OpenImages, only the annotated entries have a truth, and only they count).

Imports nothing of the project above image_io.py (pseudo_labeler.py, class_text_features.py and the modules above them import this one).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import distributed
import label_tables
from config import UserError
from image_io import IMAGENET_MEAN, IMAGENET_STD

# CCD's template (train.py:53) and the seven templates that CLIP's authors selected for ImageNet
# (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb, the final ensemble).
ENSEMBLE_TEMPLATES = (
    'a photo of the {}.',
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
)


# --------------------------------------------------------------------------- prompts

def read_prompts(spec: str) -> list[str]:
    """The templates of --prompts: 'ensemble' (ENSEMBLE_TEMPLATES) or a text file of one template
    per line ('{}' marks the class name; blank lines and lines starting with '#' are skipped)."""
    if spec == 'ensemble':
        return list(ENSEMBLE_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--prompts {spec}: no such file (give a text file of templates, one per line, or 'ensemble')")
    try:
        lines = path.read_text(encoding='utf-8').splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f'--prompts {spec}: cannot read it as UTF-8 text ({type(exc).__name__})') from None
    templates = [t.strip() for t in lines if t.strip() and not t.strip().startswith('#')]
    if not templates:
        raise UserError(f"--prompts {spec}: the file holds no template; write one per line, with '{{}}' "
                        'where the class name goes')
    bad = [t for t in templates if '{}' not in t]
    if bad:
        raise UserError(f"--prompts {spec}: template {bad[0]!r} has no '{{}}' where the class name goes")
    return templates


def templates_digest(templates: list[str]) -> str:
    """First 8 hex digits of sha1 over the templates (one per line): names the cached feature file."""
    return hashlib.sha1('\n'.join(templates).encode('utf-8')).hexdigest()[:8]


def ensemble_text_features(clip_model, tokenizer, classnames: list[str], templates: list[str],
                           batch_size: int = 256) -> torch.Tensor:
    """K x D float32 CPU tensor: row k = normalise(mean_t normalise(encode_text(t with '{}' -> name_k)))."""
    if not classnames or not templates:
        raise ValueError('need at least one class name and one template')
    texts = [t.replace('{}', name) for name in classnames for t in templates]  # class-major
    device = next(clip_model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size]).to(device)
            chunks.append(F.normalize(clip_model.encode_text(tokens).float().cpu(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


# --------------------------------------------------------------------------- CLIP's own preprocessing

def clip_preprocess_settings(visual) -> dict:
    """mean, std and interpolation of a CLIP image tower (open_clip `preprocess_cfg`; OpenAI's values
    where the tower has none)."""
    cfg = dict(getattr(visual, 'preprocess_cfg', None) or {})
    return {'mean': tuple(cfg.get('mean', (0.48145466, 0.4578275, 0.40821073))),
            'std': tuple(cfg.get('std', (0.26862954, 0.26130258, 0.27577711))),
            'interpolation': str(cfg.get('interpolation', 'bicubic'))}


def _channels(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(3, 1, 1)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B x) 3 x H x W -> pixels in [0, 1] (inverts image_io.image_tensor's Normalize)."""
    return images * _channels(IMAGENET_STD, images) + _channels(IMAGENET_MEAN, images)


def renormalise(images: torch.Tensor, settings: dict) -> torch.Tensor:
    """ImageNet-normalised (B x) 3 x H x W -> normalised with CLIP's mean and std instead (same size)."""
    return (to_pixels(images) - _channels(settings['mean'], images)) / _channels(settings['std'], images)


def clip_preprocess(images: torch.Tensor, size: int, settings: dict) -> torch.Tensor:
    """--clip-preprocess clip: pipeline tensor B x 3 x S x S -> B x 3 x size x size in CLIP's own
    normalisation, resized (antialiased) from the pixels with CLIP's interpolation."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    mode = {'bicubic': InterpolationMode.BICUBIC, 'bilinear': InterpolationMode.BILINEAR,
            'nearest': InterpolationMode.NEAREST}.get(settings['interpolation'], InterpolationMode.BICUBIC)
    pixels = to_pixels(images)
    if tuple(pixels.shape[-2:]) != (size, size):
        pixels = TF.resize(pixels, [size, size], interpolation=mode, antialias=True).clamp(0, 1)
    return (pixels - _channels(settings['mean'], pixels)) / _channels(settings['std'], pixels)


# --------------------------------------------------------------------------- quality

def truth_of(labels) -> np.ndarray:
    """The train split's truth for the quality figures, dense (small data): 0/1 labels as they are; an
    annotation table (label_tables.Annotations: 1 positive, -1 annotated negative, 0 unannotated) as
    float32 1 / 0 with NaN at its unannotated entries, which have no truth (counted by no precision)."""
    if not isinstance(labels, label_tables.Annotations):
        return np.asarray(labels)
    states = np.asarray(labels)
    return np.where(states == 0, np.nan, states == 1).astype(np.float32)


def _with_truth(true: np.ndarray) -> np.ndarray | bool:
    """The entries that have a truth (truth_of: not NaN); True (all) for 0/1 labels."""
    return ~np.isnan(true) if true.dtype.kind == 'f' and np.isnan(true).any() else True


def class_quality(pl: np.ndarray, true: np.ndarray, classnames: list[str]) -> dict:
    """Per-class quality of the positive (and negative) pseudo-labels against the true labels.

    pl: N x K in {-1, 0, +1}; true: N x K in {0, 1}, NaN where an entry has no truth (truth_of: an
    unannotated entry of a partially annotated dataset). For class k: count = #{pl = +1 where there
    is a truth}, true = #{true = 1}, precision = hits / count (None when count is 0), recall = hits /
    true (None when true is 0), negatives = #{pl = -1} and negative_errors = #{pl = -1 and true = 1}.
    'overall' pools every entry (micro precision and recall, positives per image: all of them) and
    gives the means over classes of the defined precisions and recalls (macro); annotated_only says
    that entries without a truth were left out.
    """
    pl = np.asarray(pl)
    true = np.asarray(true)
    known = _with_truth(true)
    true = true == 1
    pos, neg = pl == 1, pl == -1
    hits = (pos & true).sum(0)
    count, num_true = (pos & known).sum(0), true.sum(0)
    per_class = []
    for k, name in enumerate(classnames):
        per_class.append({
            'class': name, 'count': int(count[k]), 'true': int(num_true[k]), 'hits': int(hits[k]),
            'precision': float(hits[k] / count[k]) if count[k] else None,
            'recall': float(hits[k] / num_true[k]) if num_true[k] else None,
            'negatives': int(neg[:, k].sum()), 'negative_errors': int((neg[:, k] & true[:, k]).sum())})
    precisions = [c['precision'] for c in per_class if c['precision'] is not None]
    recalls = [c['recall'] for c in per_class if c['recall'] is not None]
    overall = {'precision': float(hits.sum() / max(count.sum(), 1)),
               'recall': float(hits.sum() / max(num_true.sum(), 1)),
               'per_image': float(pos.sum() / max(pl.shape[0], 1)),
               'macro_precision': float(np.mean(precisions)) if precisions else None,
               'macro_recall': float(np.mean(recalls)) if recalls else None,
               'classes_never_positive': [c['class'] for c in per_class if c['count'] == 0],
               'images': int(pl.shape[0]), 'annotated_only': known is not True}
    return {'overall': overall, 'per_class': per_class}


def quality_line(report: dict, when: str) -> str:
    """One summary line of a class_quality report."""
    o = report['overall']

    def fmt(x):
        return 'n/a' if x is None else f'{x:.3f}'
    never = o['classes_never_positive']
    return (f'Pseudo-label quality {when}{ANNOTATED_ONLY if o.get("annotated_only") else ""}: precision '
            f'{o["precision"]:.3f}, recall {o["recall"]:.3f}, {o["per_image"]:.2f} positives / image; per class '
            f'(mean) precision {fmt(o["macro_precision"])}, recall {fmt(o["macro_recall"])}; {len(never)} classes '
            'never positive -> pl_quality.json')


ANNOTATED_ONLY = ' (annotated entries only: unannotated ones have no truth)'



# --------------------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    """The 'CLIP pseudo-label options' group of --help (main_clip.build_parser)."""
    from config import COUNT, NON_NEGATIVE, number

    g = parser.add_argument_group(
        'CLIP pseudo-label options', "options of the frozen-CLIP pseudo-labeller; CCD = Kim & Shim, CVPR 2025, "
        "github.com/k0u-id/CCD (docs/ccd.md); the defaults leave VLPL's pseudo-labels unchanged")
    g.add_argument('--pl-debias', action='store_true',
                   help="CCD's debiasing: floor the CLIP scores at --pl-floor and divide each class by its bias "
                        '(mean top-1 score over the confident train images whose top-1 it is), clamp to [0, 1]; '
                        'then the -th / -p rule')
    g.add_argument('--pl-debias-entropy', type=number(low=0, low_open=True), default=2.0,
                   help="CCD: images whose score entropy exceeds this do not enter the bias")
    g.add_argument('--pl-floor', type=number(low=0, high=1, high_open=True), default=0.05,
                   help="CCD's label-smoothing floor 1 / LS_coeff (0.05 = its VOC script's LS_coeff 20) used "
                        'with --pl-debias; 0: none')
    g.add_argument('--pl-views', default='global', choices=['global', 'cam'],
                   help="global: CLIP sees the whole image (VLPL); cam: CCD's local views, crops around the "
                        "classifier's CAM peaks embedded by the frozen CLIP, blended into the labels "
                        '(needs a backbone and head with a CAM)')
    g.add_argument('--pl-views-epoch', type=number(int, low=0), default=2,
                   help='cam: refresh the labels after this many training epochs (CCD: 2)')
    g.add_argument('--pl-views-refreshes', type=COUNT, default=1, help="cam: number of refreshes (CCD's inf_num)")
    g.add_argument('--pl-views-margin', type=number(low=0, high=1), default=0.125,
                   help="cam: margin around the CAM peak, as a fraction of the image side (CCD: 80 px of 640)")
    g.add_argument('--pl-views-ratio', type=number(low=0, high=1), default=0.2,
                   help='cam: weight of the earlier label in the blend with the local views (CCD: 0.2)')
    g.add_argument('--pl-views-bound', type=NON_NEGATIVE, default=4.0,
                   help="cam: the classifier threshold is calibrated so that (bound, bound + 2) classes per image "
                        'pass it (CCD: 4)')
    g.add_argument('--pl-views-threshold', type=number(low=0, high=1, low_open=True, high_open=True), default=None,
                   help="cam: a fixed classifier threshold instead of CCD's calibration (which rises by at most "
                        '0.001 per 100 images, so it stays near its start on a small train split)')
    g.add_argument('--clip-preprocess', default='original', choices=['original', 'clip'],
                   help="original: CLIP gets the ImageNet-normalised training tensor resized (VLPL); clip: CLIP's "
                        'own mean, std and interpolation')
    g.add_argument('--prompts', default=None, metavar='FILE|ensemble',
                   help="class text features from prompt templates ('{}' = the class name), averaged over "
                        "normalised embeddings: 'ensemble' (CCD's and CLIP's ImageNet templates) or a file of "
                        'one template per line (default: the class name alone)')


def settings(a) -> dict:
    """build_config keyword arguments of this group, from the parsed command line `a`."""
    return dict(pl_debias=a.pl_debias, pl_debias_entropy=a.pl_debias_entropy, pl_floor=a.pl_floor,
                pl_views=a.pl_views, pl_views_epoch=a.pl_views_epoch, pl_views_refreshes=a.pl_views_refreshes,
                pl_views_margin=a.pl_views_margin, pl_views_ratio=a.pl_views_ratio,
                pl_views_bound=a.pl_views_bound, pl_views_threshold=a.pl_views_threshold,
                clip_preprocess=a.clip_preprocess, prompts=a.prompts)


def check(cfg, error, *, has_cam: bool, needs_pseudo_labels: bool) -> None:
    """Refuses (error(message), one line) combinations that cannot work."""
    chosen = [flag for flag, on in (('--pl-debias', cfg.pl_debias), ('--pl-views cam', cfg.pl_views == 'cam'),
                                    ('--clip-preprocess clip', cfg.clip_preprocess == 'clip'),
                                    ('--prompts', cfg.prompts is not None)) if on]
    if chosen and not needs_pseudo_labels:
        error(f'{chosen[0]}: -l {cfg.loss} uses no CLIP pseudo-labels of VLPL\'s kind (this option is theirs)')
    if cfg.prompts is not None and cfg.text_features:
        error('--prompts and --text-features exclude each other: the text features come from one of them')
    if cfg.prompts is not None:
        try:
            read_prompts(cfg.prompts)
        except UserError as exc:
            error(str(exc))
    if cfg.clip_mode == 'online':
        for flag in ('--pl-debias', '--pl-views cam'):
            if flag in chosen:
                error(f'{flag} needs --clip-mode cache (its labels are computed over the whole train split)')
    if cfg.pl_views == 'cam':
        if distributed.world_size() > 1:
            error('--pl-views cam runs on one process only: its local views are chosen and embedded over the '
                  'whole train split in one process (launch without torchrun / srun)')
        if not has_cam:
            error(f'--pl-views cam needs a class activation map: backbone {cfg.model} with head {cfg.head} has none '
                  '(use an average-pooled backbone such as resnet50 or small_cnn with the linear head)')
        if cfg.pl_views_epoch >= cfg.epochs:
            error(f'--pl-views-epoch {cfg.pl_views_epoch} leaves no epoch trained on the refreshed labels '
                  f'(--epochs {cfg.epochs})')

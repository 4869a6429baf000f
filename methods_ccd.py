"""-l CCD: Classifier-guided CLIP Distillation (Kim & Shim, CVPR 2025; github.com/k0u-id/CCD 0b57641), the
unsupervised multi-label system: a classifier trained with no annotation at all, on CLIP's soft labels.

What `train.py run_train` does, and where it is here (docs/ccd.md):
- the global pass (CCD's epoch 0): the frozen CLIP scores every train image at 640 px; each image's entropy
  flag, each class's bias, the floored and debiased soft table (ccd_labels.build_table, ccd.py);
- the CAM-guided refresh (its epoch 2, this repository's epoch 3): the classifier's threshold calibrated
  once, a view cropped around each selected class's CAM peak, CLIP's scores of the views blended into the
  table (ccd_labels.CcdTable.refresh);
- the training step: BCE on the soft labels; from its epoch 2 on, the colour-jittered second view's
  logits against the sigmoid of the first's, the first weighted by the flags (ccd.ccd_loss; the engine
  runs the second view, Method.second_view; the views come from ccd_images.CcdTrainViews);
- the classifier: ResNet-50 and a 1x1 convolution whose positive CAM values are multiplied by alpha =
  --ccd-coeff before average pooling (models.Classifier with cam_boost), Adam with the head at 10 x lr;
- its report: the best epoch on the evaluation set ("with GT") and its label-free choice (ccd.label_free_epoch),
  both in the closing lines, with the CLIP's own zero-shot mAP on the same test split as the baseline.

The method reads no training label (Method.reads_train_labels False): no observed-label file, the whole
official train split trains, and val is the test split, as CCD's datasets.py makes them.

The classifier is laid out as CCD's checkpoints map onto it (preproc/import_checkpoint.py --from ccd,
seed_checkpoints.py): feature_extractor.{0, 1, 4, 5, 6, 7}.* are the torchvision ResNet-50's conv1, bn1,
layer1..4 (trunk.*), onebyone_conv.weight (K x 2048 x 1 x 1) is head.weight (K x 2048), onebyone_conv.bias
head.bias, and alpha (1 x K, every entry coeff) is cam_boost.

Importing this module registers the method (methods.register); main_clip.py imports it once.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import ccd
import ccd_images
import ccd_labels
import class_text_features
import clip_loading
import distributed
import embedding_cache
import image_dataset
import methods
from config import DATASETS, Config, UserError, number
from metrics import compute_metrics

# CCD's settings (train_gpu#0.sh, the only released script, for voc12; the parser defaults of its config.py
# for the rest: inf_num 1, use_consist 1, global_temp and local_temp on, resize (640, 640), lr_mult 10). The
# repository releases no other script: every dataset takes these. The demo keeps its own training settings
# (batch 32, lr 1e-3, 10 epochs, 64 px) and scales the sides: inference and views at 64 px, margin 8 px
# (CCD's 80 of 640).
SCRIPT = dict(bsize=16, lr=1e-5, num_epochs=10, offset_size=80, coeff=3.0, loss_coeff=1.0, ratio=0.2, LS_coeff=20,
              bound=4.0, inf_num=1, use_consist=1.0, resize=640, view=640, step=0.001)
# The demo's 2,400 train images give 24 calibration windows: at CCD's step the threshold could rise to
# 0.074 only, where the demo classifier of epoch 2 passes 18 of 30 classes per image (VOC's 5,717
# images allow 0.107); 0.004 lets it reach the bound.
DEMO = dict(SCRIPT, offset_size=8, resize=64, view=64, step=0.004)
PIXELS_PER_BATCH = 2 ** 22  # the inference loader's batch: this many pixels, at least --batch-size images
CCD_MODELS = ('resnet50', 'small_cnn')  # average-pooled trunks with a CAM (CCD: torchvision ResNet-50)


def build_labels(cfg: Config, data, device):
    """-l CCD's pseudo-label source (methods.Method.pseudo_label_builder): (ccd_labels.CcdTable, None).

    Makes CCD's class text features with the frozen CLIP (--clip-model / --clip-pretrained, in
    --ccd-precision), embeds the train split at --ccd-infer-size, builds the global table, and scores the
    test split the same way for the zero-shot baseline. The text features and every embedding are cached
    under --cache-dir, and the CLIP is loaded only when one is missing: a second run spends no CLIP time."""
    from run_data import make_loader  # the run's loader settings (workers, pinning)

    precision = clip_precision(cfg, device)
    clip = FrozenClip(cfg, precision, device)
    classnames = class_text_features.read_classnames(cfg.dataset, data_root=cfg.data_root)
    text_key = {'format': 1, 'dataset': cfg.dataset, 'kind': 'ccd-text-features', 'clip_model': str(cfg.clip_model),
                'clip_config_sha256': embedding_cache.config_digest(cfg.clip_model),
                'weights': clip_loading.weights_identity(cfg.clip_pretrained), 'precision': precision,
                'classnames': classnames, 'templates': [ccd_labels.TEMPLATE]}
    text = embedding_cache.cached_array(text_key, cfg.cache_dir, lambda: ccd_labels.ccd_text_features(
        clip.model, clip.tokenizer, classnames)).to(device)
    encoder = clip.encoder()
    splits, root = data.splits, data.sets['train'].root

    def images(split, size, train=False):
        return ccd_images.CcdImages(root, split, size, train, dataset=cfg.dataset, skip_bad=cfg.skip_bad_images)

    def features(split, loader):
        key = embedding_cache.embedding_cache_key(
            dataset=cfg.dataset, images=split.images, clip_model=cfg.clip_model,
            clip_pretrained=cfg.clip_pretrained, image_size=cfg.ccd_infer_size, clip_size=encoder.clip_size,
            precision=precision, preprocess='ccd-any-size' if encoder.any_size else 'ccd-resized',
            image_stats=loader.dataset.image_stats())
        return key, embedding_cache.cached_rows(encoder.images, loader, key, cfg.cache_dir, device=device,
                                                width=text.shape[1], desc=f'CCD: CLIP on {len(split)} images (cached)')

    infer_batch = max(cfg.batch_size, PIXELS_PER_BATCH // cfg.ccd_infer_size ** 2)  # more views per CLIP call
    infer_loader = make_loader(images(splits['train'], cfg.ccd_infer_size), batch_size=infer_batch, cfg=cfg,
                               device=device)
    calibration_loader = make_loader(images(splits['train'], cfg.image_size, train=True), batch_size=cfg.batch_size,
                                     sampler=image_dataset.FlipSampler(len(splits['train']), seed=cfg.seed), cfg=cfg,
                                     device=device)
    key, train_features = features(splits['train'], infer_loader)
    report = {'options': options(cfg), 'classnames': classnames, 'stages': []}
    table = ccd_labels.build_table(cfg, encoder, text, train_features, infer_loader=infer_loader,
                                   calibration_loader=calibration_loader, key=key, device=device,
                                   true=splits['train'].labels_true, classnames=classnames, report=report)
    test_loader = make_loader(images(splits['test'], cfg.ccd_infer_size), batch_size=infer_batch, cfg=cfg,
                              device=device)
    _, test_features = features(splits['test'], test_loader)
    scores = table.scores(test_features).cpu().numpy()
    table.zero_shot_map = float(compute_metrics(scores, splits['test'].labels_true)['map'])
    distributed.log.info(
        f'CCD: {cfg.clip_model} ({precision}) on {cfg.ccd_infer_size} px images, '
        f'{"any size (its attention pool resized)" if encoder.any_size else "resized to its square input"}; '
        f'{int(table.flags.sum())} of {len(table.flags)} train images confident (entropy <= 2); '
        f'CLIP zero-shot test mAP (the baseline): {table.zero_shot_map:.2f}')
    return table, None


class FrozenClip:
    """The frozen CLIP of -l CCD, loaded on first use (a rerun whose text features and embeddings are all
    cached never loads it), with its text transformer run as OpenAI's clip/model.py runs it."""

    def __init__(self, cfg: Config, precision: str, device):
        self.cfg, self.precision, self.device = cfg, precision, device
        self._model = self._tokenizer = None

    def _load(self) -> None:
        if self._model is None:
            self._model, self._tokenizer = clip_loading.load_clip(self.cfg.clip_model, self.cfg.clip_pretrained,
                                                                  device=self.device, precision=self.precision)
            clip_loading.sequence_first(self._model)

    @property
    def model(self):
        self._load()
        return self._model

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    def encoder(self) -> ccd_labels.CcdEncoder:
        """The image tower as CCD runs it; its kind and input side from the open_clip config, the tower
        itself loaded when first needed (from the model when the config does not tell)."""
        vision = clip_loading.clip_config(self.cfg.clip_model).get('vision_cfg', {})
        size = clip_loading.configured_image_size(self.cfg.clip_model)
        dtype = {'fp16': torch.float16, 'fp32': torch.float32}[self.precision]
        if size is None or 'layers' not in vision:  # e.g. an hf-hub model: ask the loaded one
            visual = self.model.visual
            return ccd_labels.CcdEncoder(visual, clip_loading.clip_image_size(visual), self.cfg.ccd_view_size,
                                         any_size=ccd.is_modified_resnet(visual), dtype=dtype)
        return ccd_labels.CcdEncoder(lambda: self.model.visual, size, self.cfg.ccd_view_size,
                                     any_size=isinstance(vision['layers'], (list, tuple)), dtype=dtype)


def clip_precision(cfg: Config, device) -> str:
    """--ccd-precision: fp16 or fp32; 'auto' is the original's fp16 on CUDA (clip.load keeps OpenAI's fp16
    weights there) and fp32 on the CPU (where clip.load makes the model float)."""
    if cfg.ccd_precision != 'auto':
        return cfg.ccd_precision
    return 'fp16' if torch.device(device).type == 'cuda' else 'fp32'


def options(cfg: Config) -> dict:
    """The CCD settings of a run, as pl_quality.json records them."""
    return {name: getattr(cfg, name) for name in sorted(vars(Config)['__dataclass_fields__']) if name.startswith('ccd_')
            } | dict(temp=cfg.temp, clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained)


@methods.register('CCD', "CCD (Kim & Shim, CVPR 2025): unsupervised; CLIP's soft labels of the image and of views "
                         "around the classifier's CAM peaks, debiased, with a consistency loss (no label read)")
class Ccd(methods.Method):
    """CCD's training (train.py `run_train`, lines 350-415): ccd.ccd_loss on the table's soft labels of the batch,
    with the second view and the flags from this repository's epoch 3 (CCD's 2) on. The method owns the
    table (its CcdTable: labels, flags, bias, threshold, refreshes) and the train mAP of every epoch
    against the pseudo-labels, which choose its label-free epoch; both go into the checkpoint."""
    needs_pseudo_labels = True
    reads_train_labels = False
    pseudo_label_builder = staticmethod(build_labels)

    @classmethod
    def training_images(cls, cfg: Config, images):
        return ccd_images.CcdTrainViews(images)

    def __init__(self, cfg: Config, train_observed: np.ndarray, device):
        super().__init__(cfg, train_observed, device)
        self.labels = None  # the CcdTable, from use_pseudo_labels
        self.train_maps: list[float] = []
        self.preds = torch.full(tuple(train_observed.shape), float('nan'), device=device)

    def use_pseudo_labels(self, source) -> None:
        self.labels = source

    def second_view(self, epoch: int) -> str | None:
        return 'ex_image' if epoch - 1 >= ccd_labels.REFRESH_EPOCH and self.cfg.ccd_consistency > 0 else None

    def loss(self, logits, preds, batch, *, epoch, step):
        index = batch['index']
        self.preds[index] = preds.detach()  # the train phase's outputs, for CCD's train mAP
        return ccd.ccd_loss(logits, batch['pseudo_labels'], flags=self.labels.flags[index],
                            view_logits=batch['view_logits'], loss_coeff=self.cfg.ccd_loss_coeff,
                            consistency=self.cfg.ccd_consistency)

    def end_epoch(self, epoch: int, predict_train) -> None:
        """CCD's train mAP of the epoch (the train phase's outputs against the table's entries equal to 1)."""
        seen = ~torch.isnan(self.preds[:, 0])
        value = ccd.train_map(self.preds[seen].cpu().numpy(), self.labels.table[seen].cpu().numpy())
        self.train_maps.append(value)
        self.preds.fill_(float('nan'))
        distributed.log.info(f'epoch {epoch}: train mAP against the pseudo-labels {value:.2f} (CCD\'s label-free rule)')

    def closing_lines(self, logger) -> list[str]:
        """CCD's second closing line (train.py:475): the label-free epoch and its test mAP, and the baseline."""
        test = logger.get('test', 'map_clean')
        chosen = ccd.label_free_epoch(self.train_maps)
        lines = ['(-l CCD validates on the test split, as CCD does: the best epoch above is its "best model (with '
                 'GT)")']
        if chosen is None:
            last = len(test)
            lines.append(f'Label-free epoch (CCD\'s rule, no label read): none qualified (the original then fails); '
                         f'the last, {last}')
            lines.append(f'Label-free epoch test score: {test[last - 1]:.2f}')
        else:
            lines.append(f'Label-free epoch (CCD\'s rule, no label read): {chosen + 1}')
            lines.append(f'Label-free epoch test score: {test[chosen]:.2f}')
        lines.append(f'CLIP zero-shot test score (the baseline): {self.labels.zero_shot_map:.2f}')
        return lines

    def state_dict(self) -> dict:
        return {**super().state_dict(), 'table': self.labels.state(), 'train_maps': list(self.train_maps)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.labels.load_state(state['table'])
        self.train_maps = list(state['train_maps'])


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The 'CCD' group of --help."""
    g = parser.add_argument_group('CCD', 'settings of -l CCD (methods_ccd.py, docs/ccd.md); unset: its train_gpu#0.sh '
                                  '(the demo: the same, sides scaled to 64 px). CLIP: --clip-model (RN50x64 with '
                                  '--clip-pretrained openai, as CCD), -t (1 / its logit scale 100)')
    unit = number(low=0, high=1)
    g.add_argument('--ccd-coeff', type=number(), default=None, metavar='ALPHA',
                   help="CCD's coeff: the classifier's positive CAM values are multiplied by it (<= 0: by 1; default 3)")
    g.add_argument('--ccd-loss-coeff', type=number(), default=None, metavar='C',
                   help="CCD's loss_coeff: an image's soft-label loss weighs clamp(flag + C, 0, 1), flag 0 for an "
                        'image whose global CLIP entropy exceeds 2 (default 1: every image weighs 1)')
    g.add_argument('--ccd-ratio', type=unit, default=None, metavar='R',
                   help="CCD's ratio: a refresh keeps R x the old label and adds (1 - R) x the views' (default 0.2)")
    g.add_argument('--ccd-offset', type=number(int, low=0), default=None, metavar='PIXELS',
                   help="CCD's offset_size: the margin around a CAM peak, in pixels of the inference image "
                        '(default 80; demo 8)')
    g.add_argument('--ccd-ls-coeff', type=number(int, low=0), default=None, metavar='N',
                   help="CCD's LS_coeff: soft labels are floored at 1 / N (default 20; 0: no floor, CCD's LS off)")
    g.add_argument('--ccd-bound', type=number(low=0), default=None, metavar='B',
                   help="CCD's bound: the classifier threshold is calibrated so that (B, B + 2) classes per image "
                        'pass it (default 4)')
    g.add_argument('--ccd-calibration-step', type=number(low=0, low_open=True), default=None, metavar='D',
                   help="the calibration raises the classifier threshold by D after each window of 100 images outside "
                        '(bound, bound + 2) (CCD: 0.001; demo 0.004, for its 2,400 images)')
    g.add_argument('--ccd-refreshes', type=number(int, low=0), default=None, metavar='N',
                   help="CCD's inf_num: refreshes from the CAM views, before epochs 3 .. 2 + N (default 1; 0: none)")
    g.add_argument('--ccd-consistency', type=number(low=0), default=None, metavar='W',
                   help="CCD's use_consist: weight of the consistency loss from epoch 3 on (default 1; 0: off, "
                        'and the flags then weigh nothing)')
    g.add_argument('--ccd-no-global-debias', action='store_true',
                   help="CCD's global_temp off: the global labels are not divided by the class bias")
    g.add_argument('--ccd-no-local-debias', action='store_true',
                   help="CCD's local_temp off: the views' labels are not divided by the class bias")
    g.add_argument('--ccd-infer-size', type=number(int, low=32), default=None, metavar='S',
                   help="side of the images the CLIP and the refresh's CAMs read (CCD's resize 640; demo 64)")
    g.add_argument('--ccd-view-size', type=number(int, low=32), default=None, metavar='S',
                   help="long side of the views given to a ModifiedResNet CLIP (CCD's cropping_box: 640; demo 64); "
                        "a ViT CLIP gets its own input side, padded")
    g.add_argument('--ccd-box', default='released', choices=['released', 'range'],
                   help="released: a CAM peak's box spans the columns of its first and last pixels in row order, as "
                        "CCD's code takes them; range: the peak's full column range")
    g.add_argument('--ccd-precision', default='auto', choices=['auto', 'fp16', 'fp32'],
                   help="the frozen CLIP's precision; auto: fp16 on CUDA (the original's), fp32 on the CPU")


FLAGS = ('ccd_coeff', 'ccd_loss_coeff', 'ccd_ratio', 'ccd_offset', 'ccd_ls_coeff', 'ccd_bound', 'ccd_calibration_step', 'ccd_refreshes',
         'ccd_consistency', 'ccd_infer_size', 'ccd_view_size')


def apply_defaults(a: argparse.Namespace, error) -> dict:
    """Checks the CCD flags of the parsed command line `a` (error(message) refuses in one line); for -l CCD
    fills a.batch_size, a.lr, a.epochs, a.clip_model, a.clip_pretrained and the head's lr multiplier from
    CCD's settings where unset (the demo keeps its own training settings), and returns the build_config
    keyword arguments: the ccd_* settings, and cam_boost as BoostLU's (boostlu, boostlu_alpha)."""
    given = [f for f in FLAGS if getattr(a, f) is not None]
    given += [f for f in ('ccd_no_global_debias', 'ccd_no_local_debias') if getattr(a, f)]
    given += [f for f, default in (('ccd_box', 'released'), ('ccd_precision', 'auto')) if getattr(a, f) != default]
    if a.loss != 'CCD':
        if given:
            error(f'--{given[0].replace("_", "-")} is a setting of -l CCD, not of -l {a.loss}')
        return {}
    for flag, why in (('observed', 'CCD reads no training label'),
                      ('text_features', "CCD encodes its own prompts ('a photo of the {name}') with the CLIP it scores with"),
                      ('boostlu', "CCD's alpha is --ccd-coeff"),
                      ('warmup_epoch', 'CCD has no warm-up')):
        if getattr(a, flag):
            error(f'--{flag.replace("_", "-")} does not apply to -l CCD: {why}')
    if DATASETS[a.dataset].annotated:
        error(f'-l CCD does not apply to -d {a.dataset}: its labels are partial annotations, and CCD is evaluated '
              'on dense true labels')
    if a.clip_mode == 'online':
        error('--clip-mode online does not apply to -l CCD: its table covers the whole train split (cached)')
    if a.data_format == 'packed':
        error('-l CCD reads --data-format pil: its inference images and colour-jittered views are made from the files')
    if distributed.world_size() > 1:
        error('-l CCD runs on one process: its table and refresh cover the whole train split (launch without '
              'torchrun / srun)')
    model = a.model or DATASETS[a.dataset].model
    if model not in CCD_MODELS or a.head != 'linear':
        error(f'-l CCD needs a class activation map (an average-pooled trunk and the linear head): -m {model} '
              f'--head {a.head}; use -m {" or ".join(CCD_MODELS)} with --head linear')
    s = DEMO if a.dataset == 'demo' else SCRIPT
    if a.dataset != 'demo':
        a.batch_size = a.batch_size or s['bsize']
        a.lr = a.lr or s['lr']
        a.epochs = a.epochs or s['num_epochs']
        a.clip_model = a.clip_model or 'RN50x64'
        a.clip_pretrained = a.clip_pretrained or ('openai' if a.clip_model == 'RN50x64' else None)
    if a.head_lr_mult is None:
        a.head_lr_mult = 10.0  # CCD's lr_mult (config.py)

    def pick(flag: str, default):
        value = getattr(a, flag)
        return default if value is None else value
    kw = dict(ccd_coeff=float(pick('ccd_coeff', s['coeff'])), ccd_loss_coeff=float(pick('ccd_loss_coeff', s['loss_coeff'])),
              ccd_ratio=float(pick('ccd_ratio', s['ratio'])), ccd_offset=int(pick('ccd_offset', s['offset_size'])),
              ccd_ls_coeff=int(pick('ccd_ls_coeff', s['LS_coeff'])), ccd_bound=float(pick('ccd_bound', s['bound'])),
              ccd_calibration_step=float(pick('ccd_calibration_step', s['step'])),
              ccd_refreshes=int(pick('ccd_refreshes', s['inf_num'])),
              ccd_consistency=float(pick('ccd_consistency', s['use_consist'])),
              ccd_global_debias=not a.ccd_no_global_debias, ccd_local_debias=not a.ccd_no_local_debias,
              ccd_infer_size=int(pick('ccd_infer_size', s['resize'])), ccd_view_size=int(pick('ccd_view_size', s['view'])),
              ccd_box=a.ccd_box, ccd_precision=a.ccd_precision)
    # train.py:343-345: alpha = coeff x alpha (ones) before the first step, if coeff > 0; else it stays 1
    kw.update(boostlu=True, boostlu_alpha=kw['ccd_coeff'] if kw['ccd_coeff'] > 0 else 1.0)
    return kw

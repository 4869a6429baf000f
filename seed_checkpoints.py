"""Published checkpoints of the seed systems (CSL, Query2Label, SGRE, CCD) as this project's classifier.

`convert(kind, obj, options)` reads the object a seed system saves (its own layout: wrapping keys,
`module.` prefixes, extra entries) and maps every tensor onto models.Classifier: the trunk (a BACKBONES
row or timm:NAME, recognised from the layout by seed_trunks.TRUNKS) and the head (a HEADS row), with what a
checkpoint of this project stores beside the weights: the command line that builds the classifier (backbone,
head and its sizes, input size and normalisation, dataset), the class names and SGRE's label embeddings.
preproc/import_checkpoint.py parses that command line, rebuilds the classifier through the project's
one way back from a checkpoint and writes the file (docs/seed-checkpoints.md).

Nothing is dropped unseen: the only tensors left out are the originals' constant buffers that the
classifier computes itself (Query2Label's and SGRE's position encodings, whose grid gives the input size
and whose values are checked; Swin's relative-position index and attention masks). A tensor that has no
place in the classifier, or a layout none of the tables knows, is refused in one line.

The key maps, per source:
- CSL (github.com/Alibaba-MIIL/PartialLabelingCSL, src/models/tresnet/tresnet.py; infer.py reads
  state['model'] and state['idx_to_class']): the TResNet `body.*` with InplaceABN layers -> timm's TResNet
  (seed_trunks.TRESNET_RENAMES), `head.fc.*` -> the linear head, or `head.fc.embedding_generator.0.*` /
  `head.fc.FC.*` (its OpenImages bottleneck head) -> the bottleneck head.
- Query2Label (github.com/SlongLiu/query2labels, lib/models/query2label.py Qeruy2Label; q2l_infer.py
  reads checkpoint['state_dict'] without `module.`): `backbone.0.body.*` (IntermediateLayerGetter of a
  torchvision ResNet with FrozenBatchNorm2d, or of a TResNet's `body`) or `backbone.0.*` (Swin) -> trunk,
  `transformer.*`, `query_embed.*`, `fc.W` / `fc.b`, `input_proj.*` -> the q2l head under the same names;
  `backbone.1.pe` -> the input size.
- SGRE (github.com/jasonseu/SGRE, models/mlic.py MLIC; train.py saves its ModelEma's state_dict, keys
  `module.*`): `backbone.*` -> trunk, `encoder.*`, `attention.*`, `fc.*`, `fc2.*`, `net1..4.*` -> the sgre
  head under the same names, `embeddings` (--embed-type random) -> the label embeddings,
  `position_embedding.pe` -> the input size. Its BERT / GloVe label embeddings are a file outside the
  checkpoint (data/<data>/bert.npy), given with --label-embeddings.
- CCD (github.com/k0u-id/CCD, models.py ImageClassifier; train.py saves (model.state_dict(), P)):
  `feature_extractor.{0,1,4,5,6,7}.*` (torchvision ResNet-50's conv1, bn1, layer1..4) -> trunk,
  `onebyone_conv.*` (K x 2048 x 1 x 1) -> the linear head, `alpha` (1 x K, every entry its --coeff) ->
  BoostLU's factor (--boostlu-alpha): logits = mean over the map of alpha x CAM where CAM > 0, else CAM.

The files are read by seed_files.py; the backbones' layouts and key maps are seed_trunks.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from config import DATASETS
from heads import sine_position_encoding
from seed_files import CheckpointImportError, blocks_per_stage, is_state_dict, size_of, under, without_module_prefix
from seed_trunks import TrunkLayout, convert_trunk, with_step_counts


# ----------------------------------------------------------------------------------------------
# What a conversion gives


@dataclass
class Options:
    """What the user may add to a conversion (preproc/import_checkpoint.py's flags)."""
    dataset: str | None = None           # -d: the dataset of the classes (default: the checkpoint's)
    model: str | None = None             # --model: the backbone (default: from the layout)
    image_size: int | None = None        # --image-size (default: the original's)
    input_norm: str | None = None        # --input-norm (default: the original's)
    config: dict | None = None           # the original's run settings (Query2Label's JSON, SGRE's config.yaml)
    label_embeddings: np.ndarray | None = None   # SGRE's data/<data>/bert.npy
    class_descriptions: dict | None = None       # CSL: OpenImages MID -> display name
    dataset_classes: tuple | None = None         # CSL: (MIDs, names) of -d openimages (format_openimages.py)
    original_classes: list[str] | None = None    # the original's class list, checked against ours


@dataclass
class Imported:
    """A published checkpoint in this project's terms."""
    state: dict                    # models.Classifier state dict
    argv: list[str]                # the main_clip.py flags that build that classifier
    classnames: list[str]
    dataset: str
    extras: dict = field(default_factory=dict)   # more checkpoint entries (label_embeddings, class_ids)
    notes: list[str] = field(default_factory=list)  # what was assumed where the file does not say
    epoch: int = 0


def _classes_of(dataset: str, where: str, count: int, options: Options) -> list[str]:
    """The dataset's class names, after checking the checkpoint's class count and, when the original's own
    class list is given, its order (names compared without case, spaces and underscores)."""
    import class_text_features

    if dataset not in DATASETS:
        raise CheckpointImportError(f'{where}: its classes are those of {dataset}, which this checkout has no dataset '
                                    f'for (known: {", ".join(sorted(DATASETS))}); name the dataset of its classes with -d')
    names = class_text_features.read_classnames(dataset)
    if len(names) != count:
        raise CheckpointImportError(f'{where}: it has {count} classes, -d {dataset} has {len(names)}; name the dataset '
                                    'of its classes with -d')
    if options.original_classes is not None:
        def plain(name):
            return re.sub(r'[\s_]+', '', name.lower())
        theirs = [plain(n) for n in options.original_classes]
        ours = [plain(n) for n in names]
        if theirs != ours:
            k = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise CheckpointImportError(
                f'{where}: its class list names class {k} {options.original_classes[k] if k < len(theirs) else None!r}, '
                f'text_features/{dataset}_classnames.txt {names[k] if k < len(ours) else None!r}: the classes are not '
                'in this dataset\'s order, so the checkpoint cannot be imported as it is')
    return names


def _one_of(where: str, what: str, value, known: dict):
    if value not in known:
        raise CheckpointImportError(f'{where}: {what} {value!r} has no dataset here (known: {", ".join(map(str, known))}); '
                                    'name the dataset of its classes with -d')
    return known[value]


def _dataset(where: str, options: Options, notes: list, named: tuple, count: int, by_count: dict) -> str:
    """-d, else the dataset the original's settings name (named: (what, its value or None, its name -> ours)),
    else the one of the class count (noted)."""
    if options.dataset:
        return options.dataset
    what, value, table = named
    if value is not None:
        return _one_of(where, what, value, table)
    dataset = _one_of(where, 'a class count of', count, by_count)
    notes.append(f'dataset {dataset} from its {count} classes (-d for another)')
    return dataset


def _refuse_rest(where: str, state: dict, used: set, what: str) -> None:
    rest = [k for k in state if k not in used]
    if rest:
        raise CheckpointImportError(f'{where}: {rest[0]} has no place in {what} ({len(rest)} such tensors); '
                                    'the file is not the checkpoint it appears to be')


def _grid_size(where: str, pe: torch.Tensor, dim: int, stride: int, name: str) -> int:
    """The input side of an original's position-encoding buffer (1 x dim x h x w), after checking that it is
    the sine encoding the head computes (heads.sine_position_encoding)."""
    if pe.ndim != 4 or pe.shape[1] != dim or pe.shape[2] != pe.shape[3]:
        raise CheckpointImportError(f'{where}: {name} has shape {tuple(pe.shape)}, not 1 x {dim} x h x h')
    h = size_of(pe, 2)
    if pe.device.type != 'meta':
        expected = sine_position_encoding(h, h, dim)
        if not torch.allclose(pe[0].float(), expected, atol=1e-4):
            raise CheckpointImportError(f'{where}: {name} is not the sine position encoding of a {h} x {h} grid')
    return h * stride


def _size_and_norm(where: str, options: Options, cfg: dict, notes: list, state: dict, pe: str, dim: int,
                   layout: TrunkLayout, flag: str) -> tuple[int, str]:
    """(input size, input normalisation) of Query2Label and SGRE: the size of the position encoding's grid
    (--image-size may override it, noted), the normalisation of the settings' orid_norm (their `flag`;
    off by default, noted when the settings do not say)."""
    size = _grid_size(where, state[pe], dim, layout.stride, pe)
    if options.image_size and options.image_size != size:
        notes.append(f'input size {options.image_size} (--image-size); its position encoding was made for {size}')
        size = options.image_size
    if options.input_norm is None and 'orid_norm' not in cfg:
        notes.append(f'ImageNet input normalisation ({flag} off, its default; the file does not say: --config, or '
                     '--input-norm none for a model trained with it)')
    return size, options.input_norm or ('none' if cfg.get('orid_norm') else 'imagenet')


# ----------------------------------------------------------------------------------------------
# CSL


def _csl(obj, where: str, options: Options) -> Imported:
    published = isinstance(obj, dict) and is_state_dict(obj.get('model'))
    state = without_module_prefix(obj['model'] if published else obj if is_state_dict(obj) else {})
    if 'body.conv1.0.weight' not in state or not any(k.startswith('head.fc.') for k in state):
        raise CheckpointImportError(f'{where}: not a CSL checkpoint (no body.conv1.0.weight and head.fc.*, the keys of '
                                    f'its TResNet){_looks_like(obj)}')
    backbone, trunk, _ = convert_trunk({k: v for k, v in state.items() if not k.startswith('head.')}, where,
                                       options.model)
    head_state = under(state, 'head.fc.')
    if 'embedding_generator.0.weight' in head_state:
        head, features = 'bottleneck', size_of(head_state['embedding_generator.0.weight'], 0)
        if features != 512:
            raise CheckpointImportError(f"{where}: its bottleneck head has {features} features; this project's "
                                        "bottleneck head has CSL's 512")
        keys = {'embedding_generator.0.weight', 'embedding_generator.0.bias', 'FC.weight', 'FC.bias'}
        count = size_of(head_state['FC.weight'], 0)
    else:
        head, keys = 'linear', {'weight', 'bias'}
        count = size_of(head_state['weight'], 0)
    _refuse_rest(where, head_state, keys, "CSL's head")
    notes, extras = [], {}
    if published:  # infer.py: the OpenImages models, their classes as MIDs in state['idx_to_class']
        idx_to_class = obj.get('idx_to_class')
        if not isinstance(idx_to_class, dict) or len(idx_to_class) != count:
            raise CheckpointImportError(f'{where}: its idx_to_class does not name its {count} classes')
        mids = [str(idx_to_class[k]) for k in sorted(idx_to_class, key=int)]
        dataset = options.dataset or 'openimages'
        descriptions = options.class_descriptions
        if options.dataset_classes is not None:  # the dataset's class order and names (class_ids.txt, classnames.txt)
            order, names = options.dataset_classes
            head_state = _in_class_order(where, head_state, head, mids, list(order))
            mids, classnames = list(order), list(names)
        elif descriptions is None:
            notes.append('class names are the OpenImages MIDs of idx_to_class (--class-descriptions '
                         'oidv6-class-descriptions.csv names them, as infer.py does)')
            classnames = mids
        else:
            missing = [m for m in mids if m not in descriptions]
            if missing:
                raise CheckpointImportError(f'{where}: class {missing[0]} is not in --class-descriptions '
                                            f'({len(missing)} classes are not)')
            classnames = [descriptions[m] for m in mids]
        if options.dataset_classes is None:
            notes.append(f"classes in CSL's order: for --evaluate -d {dataset}, import again with --data-root where "
                         'format_openimages.py wrote class_ids.txt (they are put in its order)')
        extras['class_ids'] = mids
        size = 224  # infer.py --input_size and the README's inference command
    else:  # train.py: COCO 2014, classes in the order of coco.cats (get_data.py), this project's coco order
        dataset = options.dataset or 'coco'
        classnames = _classes_of(dataset, where, count, options)
        size = 448  # train.py --image-size
    if options.image_size is None:
        notes.append(f'input size {size} (CSL\'s {"infer.py --input_size" if published else "train.py --image-size"} '
                     'default; --image-size for another)')
    size = options.image_size or size
    norm = options.input_norm or 'none'  # get_data.py: ToTensor without Normalize
    argv = ['-d', dataset, '-m', backbone, '--head', head, '--image-size', str(size), '--input-norm', norm]
    return Imported({**trunk, **{'head.' + k: v for k, v in head_state.items()}}, argv, classnames, dataset,
                    extras, notes)


def _in_class_order(where: str, head_state: dict, head: str, mids: list[str], order: list[str]) -> dict:
    """CSL's head with its class rows in the order `order` (MIDs) instead of `mids`: the logit of class k is
    then that of order[k], exactly (a permutation of the last linear map's rows)."""
    if sorted(mids) != sorted(order):
        other = next(iter(set(order) - set(mids)), None) or next(iter(set(mids) - set(order)))
        raise CheckpointImportError(f'{where}: its {len(mids)} classes are not the {len(order)} of the dataset '
                                    f'(class {other} is in one of them only)')
    position = {mid: i for i, mid in enumerate(mids)}
    rows = torch.tensor([position[mid] for mid in order])
    last = 'FC.' if head == 'bottleneck' else ''
    return {k: v[rows] if k in (f'{last}weight', f'{last}bias') else v for k, v in head_state.items()}


# ----------------------------------------------------------------------------------------------
# Query2Label


def _layers(state: dict, prefix: str) -> int:
    return blocks_per_stage(state, prefix, [''])[0]


def _q2l(obj, where: str, options: Options) -> Imported:
    state = obj.get('state_dict') if isinstance(obj, dict) and is_state_dict(obj.get('state_dict')) else obj
    state = without_module_prefix(state if is_state_dict(state) else {})
    if 'query_embed.weight' not in state or 'fc.W' not in state or 'backbone.1.pe' not in state:
        raise CheckpointImportError(f'{where}: not a Query2Label checkpoint (no query_embed.weight, fc.W and '
                                    f'backbone.1.pe, the keys of its Qeruy2Label){_looks_like(obj)}')
    cfg = options.config or {}
    backbone_state = under(state, 'backbone.0.')
    if any(k.startswith('body.') for k in backbone_state):  # IntermediateLayerGetter of a ResNet / TResNet
        backbone_state = under(backbone_state, 'body.')
    backbone, trunk, layout = convert_trunk(backbone_state, where, options.model)
    count, hidden = (int(n) for n in state['query_embed.weight'].shape)
    enc = _layers(state, 'transformer.encoder.layers.')
    dec = _layers(state, 'transformer.decoder.layers.')
    kept = [f'transformer.decoder.layers.{i}.self_attn.in_proj_weight' in state for i in range(dec)]
    if len(set(kept)) > 1:
        raise CheckpointImportError(f'{where}: its first decoder layer {"keeps" if kept[0] else "drops"} self-attention '
                                    'and the others do not; the q2l head keeps it in all layers or none')
    pre_norm = 'transformer.encoder.norm.weight' in state  # the encoder's final norm exists with normalize_before
    if 'input_proj.weight' in state and size_of(state['input_proj.weight'], 1) == hidden:
        raise CheckpointImportError(f'{where}: it projects {hidden} channels onto {hidden} (--keep_input_proj with equal '
                                    'sizes), which the q2l head does only between different sizes')
    ffn = size_of(state['transformer.decoder.layers.0.linear1.weight'], 0)
    notes = []
    heads = cfg.get('nheads')
    if heads is None:
        heads = 4
        notes.append('4 attention heads (the README command and the parsers\' default; the file does not say: '
                     '--config config.json gives them)')
    if bool(cfg.get('pre_norm', pre_norm)) != pre_norm:
        raise CheckpointImportError(f'{where}: --config says pre_norm {cfg["pre_norm"]}, its tensors say {pre_norm}')
    size, norm = _size_and_norm(where, options, cfg, notes, state, 'backbone.1.pe', hidden, layout, '--orid_norm')
    dataset = options.dataset or 'coco'  # q2l_infer.py --dataname coco14 only; cocodataset.py: COCO's category order
    classnames = _classes_of(dataset, where, count, options)
    head_keys = ('transformer.', 'query_embed.', 'fc.', 'input_proj.')
    head_state = {k: v for k, v in state.items() if k.startswith(head_keys)}
    _refuse_rest(where, state, set(head_state) | {'backbone.1.pe'} | {k for k in state if k.startswith('backbone.0.')},
                 "Query2Label's model")
    argv = ['-d', dataset, '-m', backbone, '--head', 'q2l', '--image-size', str(size), '--input-norm', norm,
            '--q2l-hidden', str(hidden), '--q2l-enc-layers', str(enc), '--q2l-dec-layers', str(dec),
            '--q2l-heads', str(heads), '--q2l-ffn', str(ffn)]
    if 'dropout' in cfg:
        argv += ['--q2l-dropout', str(cfg['dropout'])]
    argv += ['--q2l-pre-norm'] * pre_norm + ['--q2l-dec-self-attn'] * kept[0]
    epoch = obj.get('epoch', 0) if isinstance(obj, dict) else 0
    return Imported({**trunk, **{'head.' + k: v for k, v in head_state.items()}}, argv, classnames, dataset,
                    {}, notes, int(epoch) if isinstance(epoch, int) else 0)


# ----------------------------------------------------------------------------------------------
# SGRE

SGRE_DATASETS = {'mscoco': 'coco', 'voc2007': 'voc2007', 'nuswide': 'nuswide'}  # its --data; vg500 has no dataset here
SGRE_HEAD = ('encoder.', 'attention.', 'fc.', 'fc2.', 'net1.', 'net2.', 'net3.', 'net4.')


def _sgre(obj, where: str, options: Options) -> Imported:
    state = without_module_prefix(obj if is_state_dict(obj) else {})
    if 'attention.linear1.weight' not in state or 'fc2.0.weight' not in state or 'position_embedding.pe' not in state:
        raise CheckpointImportError(f'{where}: not an SGRE checkpoint (no attention.linear1.weight, fc2.0.weight and '
                                    f'position_embedding.pe, the keys of its MLIC){_looks_like(obj)}')
    cfg = options.config or {}
    backbone, trunk, layout = convert_trunk(under(state, 'backbone.'), where, options.model)
    dim = size_of(state['fc.weight'], 1)
    count = size_of(state['fc.weight'], 0)
    notes = []
    if cfg.get('rm_cls'):
        raise CheckpointImportError(f'{where}: its config removes a class token (--rm-cls, ViT backbones), which no '
                                    'backbone here has')
    if cfg.get('normalize_before'):
        raise CheckpointImportError(f'{where}: its config says --normalize-before, which the sgre head does not offer')
    defaults = dict(num_heads=8, pos=True, tau=1.0)  # get_args; every README command passes --pos
    for name, value in defaults.items():
        if name not in cfg:
            notes.append(f'{name} {value} (SGRE\'s {"README commands" if name == "pos" else "default"}; the file does '
                         'not say: --config config.yaml gives it)')
    setting = {**defaults, **{k: cfg[k] for k in defaults if k in cfg}}
    size, norm = _size_and_norm(where, options, cfg, notes, state, 'position_embedding.pe', dim, layout, '--orid-norm')
    dataset = _dataset(where, options, notes, ('its --data', cfg.get('data'), SGRE_DATASETS), count,
                       {20: 'voc2007', 80: 'coco', 81: 'nuswide'})
    # scripts/mscoco.py: coco.cats order; scripts/nuswide.py: Concepts81.txt; scripts/voc2007.py: sorted names
    classnames = _classes_of(dataset, where, count, options)
    extras = {}
    if 'embeddings' in state:  # --embed-type random: learned with the model
        if options.label_embeddings is not None:
            raise CheckpointImportError(f'{where}: holds its own learned label embeddings (--embed-type random), '
                                        'which the import keeps: leave --label-embeddings out')
        embeddings = state['embeddings']
        notes.append('its learned label embeddings (--embed-type random) are kept fixed, as this project\'s sgre head '
                     'keeps label embeddings')
    elif options.label_embeddings is not None:
        embeddings = torch.as_tensor(np.asarray(options.label_embeddings, dtype=np.float32))
    else:
        raise CheckpointImportError(f'{where}: SGRE keeps its label embeddings outside the checkpoint (MLIC loads '
                                    f'data/<data>/{cfg.get("embed_type", "bert")}.npy): pass it with --label-embeddings')
    if embeddings.ndim != 2 or embeddings.shape[0] != count \
            or embeddings.shape[1] != size_of(state['attention.linear2.weight'], 1):
        raise CheckpointImportError(f'{where}: its label embeddings are {tuple(embeddings.shape)}, its attention reads '
                                    f'{count} x {size_of(state["attention.linear2.weight"], 1)}')
    extras['label_embeddings'] = embeddings.float()
    head_state = {k: v for k, v in state.items() if k.startswith(SGRE_HEAD)}
    _refuse_rest(where, state, set(head_state) | {'position_embedding.pe', 'embeddings'}
                 | {k for k in state if k.startswith('backbone.')}, "SGRE's MLIC")
    argv = ['-d', dataset, '-m', backbone, '--head', 'sgre', '--image-size', str(size), '--input-norm', norm,
            '--sgre-layers', str(_layers(state, 'encoder.layers.')), '--sgre-heads', str(setting['num_heads']),
            '--sgre-ffn', str(size_of(state['encoder.layers.0.linear1.weight'], 0)),
            '--sgre-att-dim', str(size_of(state['attention.linear1.weight'], 0)), '--sgre-tau', str(setting['tau'])]
    argv += [] if setting['pos'] else ['--sgre-no-pos']
    if 'lamda' in cfg:
        argv += ['--lamda', str(cfg['lamda'])]
    return Imported({**trunk, **{'head.' + k: v for k, v in head_state.items()}}, argv, classnames, dataset,
                    extras, notes)


# ----------------------------------------------------------------------------------------------
# CCD

CCD_DATASETS = {'voc12': 'pascal', 'voc07': 'voc2007', 'coco': 'coco', 'nuswide': 'nuswide'}  # config.py _DATASET
CCD_TRUNK = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3', '7': 'layer4'}  # children of resnet50


def _ccd(obj, where: str, options: Options) -> Imported:
    original, settings = obj, {}
    if isinstance(obj, tuple) and len(obj) == 2:  # train.py: torch.save((model.state_dict(), P), path)
        obj, settings = obj[0], dict(obj[1]) if isinstance(obj[1], dict) else {}
    state = without_module_prefix(obj if is_state_dict(obj) else {})
    if 'onebyone_conv.weight' not in state or 'alpha' not in state or 'feature_extractor.0.weight' not in state:
        raise CheckpointImportError(f'{where}: not a CCD checkpoint (no feature_extractor.0.weight, onebyone_conv.weight '
                                    f'and alpha, the keys of its ImageClassifier){_looks_like(original)}')
    trunk_state = {}
    for key, value in under(state, 'feature_extractor.').items():
        index, _, rest = key.partition('.')
        if index not in CCD_TRUNK:
            raise CheckpointImportError(f'{where}: feature_extractor.{key} is not in its ResNet-50 children')
        trunk_state[f'{CCD_TRUNK[index]}.{rest}'] = value
    backbone, trunk, _ = convert_trunk(trunk_state, where, options.model)
    weight = state['onebyone_conv.weight']
    count = size_of(weight, 0)
    alpha = state['alpha'].reshape(-1).float()
    if alpha.numel() != count or (alpha.device.type != 'meta' and not torch.all(alpha == alpha[0])):
        raise CheckpointImportError(f'{where}: its alpha is not one value for all {count} classes (train.py sets every '
                                    'entry to --coeff); BoostLU scales by one value')
    value = 1.0 if alpha.device.type == 'meta' else float(alpha[0])
    _refuse_rest(where, state, {'onebyone_conv.weight', 'onebyone_conv.bias', 'alpha'}
                 | {k for k in state if k.startswith('feature_extractor.')}, "CCD's ImageClassifier")
    notes = []
    dataset = _dataset(where, options, notes, ('its P["dataset"]', settings.get('dataset'), CCD_DATASETS), count,
                       {20: 'pascal', 80: 'coco', 81: 'nuswide'})
    # datasets.py reads the formatted_*_labels.npy of Cole et al.'s format scripts, as this project's
    classnames = _classes_of(dataset, where, count, options)
    size = settings.get('train_resize', (448, 448))  # datasets.py tests at train_resize
    size = options.image_size or int(size[0] if isinstance(size, (tuple, list)) else size)
    argv = ['-d', dataset, '-m', backbone, '--image-size', str(size), '--input-norm', options.input_norm or 'imagenet',
            '-l', 'CCD', '--ccd-coeff', repr(value)]  # -l CCD's classifier: BoostLU's CAM scaling by coeff
    head = {'head.weight': weight.reshape(count, -1), 'head.bias': state['onebyone_conv.bias']}
    return Imported({**trunk, **head}, argv, classnames, dataset, {}, notes)


# ----------------------------------------------------------------------------------------------
# The table of sources


@dataclass(frozen=True)
class Source:
    name: str
    convert: Callable[[object, str, Options], Imported]
    marker: str          # a key only its state dicts have (after `module.`), to name a file of another kind


SOURCES = {
    'csl': Source('CSL (PartialLabelingCSL)', _csl, 'head.fc.'),
    'q2l': Source('Query2Label', _q2l, 'query_embed.weight'),
    'sgre': Source('SGRE', _sgre, 'attention.linear1.weight'),
    'ccd': Source('CCD', _ccd, 'onebyone_conv.weight'),
}


def _looks_like(obj) -> str:
    """What a file of another kind is, for the refusal's line."""
    if isinstance(obj, dict) and {'model', 'config', 'epoch'} <= set(obj):
        return '; it is a checkpoint of this project already: main_clip.py and predict.py take it as it is'
    state = state_dict_of(obj)
    if not state:
        return '; it holds no state dict where the seed systems save theirs'
    for kind in ('q2l', 'sgre', 'ccd', 'csl'):  # CSL's marker last: others may hold a TResNet's head.fc
        if any(k.startswith(SOURCES[kind].marker) for k in state):
            return f'; it looks like a {SOURCES[kind].name} checkpoint: --from {kind}'
    return ''


def state_dict_of(obj) -> dict:
    """The state dict inside any of the originals' wrappings (for naming a file of another kind)."""
    if isinstance(obj, tuple) and obj:
        obj = obj[0]
    if isinstance(obj, dict):
        for key in ('model', 'state_dict'):
            if is_state_dict(obj.get(key)):
                return without_module_prefix(obj[key])
    return without_module_prefix(obj) if is_state_dict(obj) else (obj if isinstance(obj, dict) else {})


def convert(kind: str, obj, where: str, options: Options | None = None) -> Imported:
    """A published checkpoint of `kind` (a key of SOURCES), as read by `read_file`, in this project's terms;
    CheckpointImportError (one line) when it is not of that kind or does not map."""
    if kind not in SOURCES:
        raise CheckpointImportError(f'--from {kind}: choose one of {", ".join(SOURCES)}')
    imported = SOURCES[kind].convert(obj, where, options or Options())
    imported.state = with_step_counts(imported.state)
    return imported

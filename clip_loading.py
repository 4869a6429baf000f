"""Loading CLIP with open_clip, and what the rest of the project asks of a CLIP model.

`load_clip` builds a model from an open_clip name, a JSON config (preproc/clip_configs/) or a
local checkpoint (open_clip state dict, or OpenAI's TorchScript .pt). `clip_image_size`,
`clip_embed_dim` and `resize_for_clip` give its input side, its embedding width and its input;
`weights_identity` says which weights a run used (the key of cached text features and embeddings).

Loading errors that a user can fix (no network, missing file, wrong shape) raise
`ModelLoadError` with a one-line message that names the command-line flag to use.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from config import REPO_ROOT, ModelLoadError, one_line

CLIP_CONFIG_DIR = REPO_ROOT / 'preproc' / 'clip_configs'
CLIP_FLAG = '--clip-pretrained PATH (a local open_clip or OpenAI checkpoint file)'


def _register_clip_config(model_name: str) -> str:
    """Name under which open_clip knows `model_name`, registering a JSON config if needed.

    Order: an explicit JSON path; preproc/clip_configs/<model_name>.json; an open_clip name.
    A registered JSON config is known by its file stem (and replaces a built-in of that name).
    """
    import open_clip

    path = Path(model_name)
    if model_name.endswith('.json') or path.is_file():
        config_path = path
    elif (CLIP_CONFIG_DIR / f'{model_name}.json').is_file():
        config_path = CLIP_CONFIG_DIR / f'{model_name}.json'
    elif model_name in open_clip.list_models() or model_name.startswith(('hf-hub:', 'local-dir:')):
        return model_name
    else:
        raise ModelLoadError(
            f'unknown CLIP model {model_name!r}: not an open_clip model name, a JSON config file, '
            f'or {CLIP_CONFIG_DIR.relative_to(REPO_ROOT)}/{model_name}.json (--clip-model)')
    if not config_path.is_file():
        raise ModelLoadError(f'CLIP model config {config_path} not found (--clip-model)')
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f'cannot read CLIP model config {config_path} ({one_line(exc, with_type=True)})') from exc
    needed = {'embed_dim', 'vision_cfg', 'text_cfg'}
    if not isinstance(config, dict) or not needed <= set(config):
        raise ModelLoadError(f'{config_path} is not an open_clip model config: it needs the keys {sorted(needed)}')
    open_clip.add_model_config(config_path)
    return config_path.stem


def clip_config(model_name: str) -> dict:
    """The open_clip config (a dict) of a CLIP model name or JSON config file (--clip-model); {} if none."""
    import open_clip

    return open_clip.get_model_config(_register_clip_config(str(model_name))) or {}


def configured_image_size(model_name: str) -> int | None:
    """The square input side in a CLIP model's open_clip config (--clip-model), None if it has none."""
    config = clip_config(model_name)
    size = config.get('vision_cfg', {}).get('image_size')
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    return size if isinstance(size, int) else None


def is_checkpoint_path(pretrained: str) -> bool:
    return (os.sep in pretrained or '/' in pretrained or Path(pretrained).exists()
            or Path(pretrained).suffix in {'.pt', '.pth', '.bin', '.safetensors', '.npz', '.ckpt'})


def _is_torchscript(path: Path) -> bool:
    # OpenAI's own .pt files are TorchScript archives, which torch.load(weights_only=True) refuses.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith('/constants.pkl') or n == 'constants.pkl' for n in archive.namelist())


def load_clip(model_name: str, pretrained: str | None, device: str | torch.device = 'cpu', precision: str = 'fp32'):
    """Load a CLIP model with open_clip; returns (model in eval mode, tokenizer).

    precision 'fp16': open_clip's half-precision model (convolution, linear and attention weights and
    the projections in fp16, LayerNorm computed in fp32), as OpenAI's own clip.build_model makes it
    (clip/model.py `convert_weights`); AEVLP scores with it (aevlp.py).

    model_name: an open_clip name ('ViT-L-14-336'), a JSON config path, or the stem of
    preproc/clip_configs/<name>.json. pretrained: an open_clip tag ('openai'), a local checkpoint
    file (open_clip/state-dict file, or OpenAI's TorchScript .pt), or None for random weights.

    Tags trained with QuickGELU (all 'openai' ones) get QuickGELU even when the config name
    lacks '-quickgelu' (open_clip 3 only warns), so 'ViT-L-14-336' + 'openai' equals OpenAI's
    model. A local state-dict file cannot tell: use 'ViT-L-14-336-quickgelu' for OpenAI weights.
    """
    import open_clip

    name = _register_clip_config(str(model_name))
    device = torch.device(device)
    if pretrained is None:
        model = open_clip.create_model(name, pretrained=None, device=device, precision=precision)
    elif is_checkpoint_path(str(pretrained)):
        path = Path(pretrained)
        if not path.is_file():
            raise ModelLoadError(f'CLIP checkpoint {path} not found (--clip-pretrained)')
        try:
            with warnings.catch_warnings():  # torch's note on an unusual pickle protocol says nothing to a user
                warnings.filterwarnings('ignore', message='Detected pickle protocol')
                if _is_torchscript(path):
                    model = open_clip.load_openai_model(str(path), precision=precision, device=device)
                else:
                    _warn_if_quickgelu_needed(name)
                    model = open_clip.create_model(name, pretrained=str(path), device=device, precision=precision)
        except pickle.UnpicklingError:
            # torch's message goes on to advise weights_only=False, which would run the file's code
            raise ModelLoadError(f'CLIP checkpoint {path} cannot be read safely: it is no PyTorch archive, or it '
                                 'holds Python objects or pickle instructions that torch\'s safe loader refuses, so it '
                                 'was not loaded (no code in it ran); pass a state-dict file to --clip-pretrained') \
                from None
        except Exception as exc:
            raise ModelLoadError(f'could not load CLIP checkpoint {path} into {name!r} ({one_line(exc, with_type=True)}); '
                                 f'check --clip-model and --clip-pretrained') from exc
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelLoadError(f'unknown pretrained tag {pretrained!r} for CLIP model {name!r} (known: {tags}); '
                                 f'pass a tag or {CLIP_FLAG}')
        quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get('quick_gelu', False))
        try:
            model = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu,
                                          precision=precision)
        except Exception as exc:
            raise ModelLoadError(f'downloading the CLIP weights {name!r}/{pretrained!r} failed ({one_line(exc, with_type=True)}); '
                                 f'pass {CLIP_FLAG}') from exc
    return model.eval(), open_clip.get_tokenizer(name)


def _warn_if_quickgelu_needed(name: str) -> None:
    import open_clip

    config = open_clip.get_model_config(name) or {}
    if open_clip.get_pretrained_cfg(name, 'openai').get('quick_gelu') and not config.get('quick_gelu'):
        warnings.warn(f'{name!r} uses GELU; if this checkpoint holds OpenAI weights use {name}-quickgelu',
                      stacklevel=3)


def clip_image_size(clip_model: nn.Module) -> int:
    """Square input side of a CLIP model (or of its image tower)."""
    visual = getattr(clip_model, 'visual', clip_model)
    size = getattr(visual, 'image_size', None)
    if size is None:
        size = getattr(visual, 'preprocess_cfg', {}).get('size')
    if size is None:
        raise ValueError(f'cannot tell the input size of {type(visual).__name__}')
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f'non-square CLIP input size {tuple(size)} is not supported')
        size = size[0]
    return int(size)


def clip_embed_dim(clip_model: nn.Module) -> int:
    visual = getattr(clip_model, 'visual', clip_model)
    dim = getattr(visual, 'output_dim', None)
    if dim is None:  # towers without the attribute: ask the tower itself
        size = clip_image_size(visual)
        param = next(visual.parameters())
        with torch.no_grad():
            dim = visual(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device)).shape[-1]
    return int(dim)


def resize_for_clip(images: torch.Tensor, size: int) -> torch.Tensor:
    """B x C x H x W -> B x C x size x size: torchvision tensor resize, bilinear, antialias on.

    The input is the ImageNet-normalised pipeline tensor (docs/original-vlpl.md section 5: CLIP gets no
    normalisation of its own). Batched resizing equals the original's per-image loop.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if images.dim() != 4:
        raise ValueError(f'expected images B x C x H x W, got shape {tuple(images.shape)}')
    return TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)



def weights_identity(pretrained: str | None) -> dict:
    """What identifies CLIP weights: the tag, or a local file's resolved path, size and mtime."""
    if pretrained is not None and is_checkpoint_path(str(pretrained)) and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        return {'file': str(Path(pretrained).resolve()), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
    return {'tag': pretrained}


def sequence_first(model: nn.Module) -> nn.Module:
    """Run open_clip's transformers sequence-first (L x N x D), as OpenAI's clip/model.py (which AEVLP
    and CCD use) does; open_clip runs them batch-first. In fp16 that changes the numbers by an ulp or so:
    nn.MultiheadAttention then transposes its input without a copy, so its input projection takes
    another kernel, and the image tower takes torch's fused attention (its "fast path" needs
    batch_first), which the original never does. Sequence-first, the scorer computes the original's
    fp16 numbers bit for bit (tests/test_aevlp_reference.py). A tower without a transformer (a
    ModifiedResNet image tower), or whose blocks do not all use nn.MultiheadAttention (whose layout
    the flag switches), is left as it is."""
    for tower in (getattr(model, 'visual', None), model, getattr(model, 'text', None)):
        transformer = getattr(tower, 'transformer', None)
        blocks = list(getattr(transformer, 'resblocks', []))
        if not blocks or not all(isinstance(getattr(b, 'attn', None), nn.MultiheadAttention) for b in blocks):
            continue
        transformer.batch_first = False
        for block in blocks:
            block.attn.batch_first = False
    return model

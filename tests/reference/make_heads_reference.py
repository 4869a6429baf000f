"""Regenerate tests/reference/heads_reference.json: outputs of the ORIGINAL Query2Label and SGRE
modules for weights and inputs that tests/test_heads.py rebuilds from seeds.

Usage (the originals stay outside this repository; nothing of theirs is copied here):
    python tests/reference/make_heads_reference.py Q2L_DIR SGRE_DIR
Q2L_DIR: a checkout of github.com/SlongLiu/query2labels (55eb050); its lib/ is put on sys.path.
SGRE_DIR: a checkout of github.com/jasonseu/SGRE (8439d14); its root is put on sys.path.
Imports that need their backbones are stubbed (models.backbone, models.factory, utils.misc).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]   # the repository (heads.py) and tests/

from test_heads import Q2L_CFG, SGRE_CFG, fill_state, inputs, q2l_head, sgre_head  # noqa: E402


def _stub(name: str, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def q2l_reference(q2l_dir: Path) -> dict:
    sys.path.insert(0, str(q2l_dir / 'lib'))
    _stub('models', __path__=[str(q2l_dir / 'lib' / 'models')])   # skip its __init__ (backbones)
    _stub('models.backbone', build_backbone=None)
    _stub('utils', __path__=[])
    _stub('utils.misc', clean_state_dict=lambda s: s)
    from models.position_encoding import PositionEmbeddingSine
    from models.query2label import Qeruy2Label
    from models.transformer import Transformer
    c = Q2L_CFG
    tr = Transformer(d_model=c['hidden_dim'], nhead=c['nheads'], num_encoder_layers=c['enc_layers'],
                     num_decoder_layers=c['dec_layers'], dim_feedforward=c['dim_feedforward'], dropout=0.1)
    pe = PositionEmbeddingSine(c['hidden_dim'] // 2, normalize=True, maxH=c['grid'][0], maxW=c['grid'][1])

    class Joiner(nn.Module):
        num_channels = c['in_channels']

        def __init__(self):
            super().__init__()
            self.pe = pe

        def forward(self, x):
            return [x], [self.pe(x).to(x.dtype)]
    model = Qeruy2Label(Joiner(), tr, c['num_classes'])
    model.input_proj = nn.Identity()
    mine = q2l_head()
    fill_state(mine)
    missing, unexpected = model.load_state_dict(mine.state_dict(), strict=False)
    assert missing == ['backbone.pe.pe'] and not unexpected, (missing, unexpected)
    model.eval()
    with torch.no_grad():
        logits = model(inputs(c))
    for k in [k for k in sys.modules if k.split('.')[0] in ('models', 'utils')]:
        del sys.modules[k]
    sys.path.pop(0)
    return {'logits': logits.tolist()}


def sgre_reference(sgre_dir: Path) -> dict:
    sys.path.insert(0, str(sgre_dir))
    _stub('models', __path__=[str(sgre_dir / 'models')])
    _stub('models.factory', register_model=lambda f: f, create_backbone=None)
    from models.mlic import MLIC
    c = SGRE_CFG
    cfg = types.SimpleNamespace(arch='resnet101', img_size=32 * c['grid'][0], pos=True, num_heads=c['num_heads'],
                                num_layers=1, normalize_before=False, embed_type='random', tau=1.0, lamda=0.4,
                                loss='asl', gamma_neg=2, gamma_pos=0, clip=0.0, num_classes=c['num_classes'],
                                rm_cls=False)
    model = MLIC(nn.Identity(), c['in_channels'], cfg)
    mine = sgre_head()
    fill_state(mine)
    missing, unexpected = model.load_state_dict(mine.state_dict(), strict=False)
    assert missing == ['position_embedding.pe'] and not unexpected, (missing, unexpected)
    aux = {}
    model.fc.register_forward_hook(lambda m, i, o: aux.__setitem__('aux', o))
    model.eval()
    x = inputs(c)
    with torch.no_grad():
        ret = model(x.flatten(2).transpose(1, 2))     # the original's ResNet tokens
    sys.path.pop(0)
    return {'logits': ret['logits'].tolist(), 'aux_logits': aux['aux'].tolist(), 'attention': ret['alpha'].tolist()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    out = {'q2l': q2l_reference(Path(argv[0])), 'sgre': sgre_reference(Path(argv[1])),
           'sources': {'q2l': 'SlongLiu/query2labels@55eb050', 'sgre': 'jasonseu/SGRE@8439d14'}}
    (HERE / 'heads_reference.json').write_text(json.dumps(out, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())

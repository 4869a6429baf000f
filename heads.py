"""Transformer heads from the seed papers (their training recipe, the weight EMA, AdamW and
one-cycle, is in recipe.py).

Every head maps a trunk's feature map (B x C x h x w) to logits (B x K), for any grid size h x w:

- `Query2LabelHead`: Query2Label (Liu et al. 2021; github.com/SlongLiu/query2labels,
  lib/models/query2label.py and lib/models/transformer.py). A DETR-style transformer: the
  encoder reads the feature map plus a sine position encoding, K learned class queries decode it
  by cross-attention (no decoder self-attention by default), and one linear classifier per query
  (`GroupWiseLinear`) gives the logits.
- `SGREHead`: SGRE (Zhu et al., IEEE TCSVT 2024; github.com/jasonseu/SGRE, models/mlic.py `MLIC`).
  A transformer encoder over the feature tokens, label-to-pixel low-rank bilinear attention
  driven by one embedding per class (K x E), an auxiliary per-class classifier on the attended
  label features, and a semantic-guided enhancement (label -> pixel back-projection) whose
  concatenation with the tokens is classified per token and max-pooled. Training adds the
  auxiliary loss with weight `lamda` (`sgre_total_loss`).

- `BottleneckHead`: CSL's OpenImages head (github.com/Alibaba-MIIL/PartialLabelingCSL,
  src/models/tresnet/tresnet.py `bottleneck_head`): two linear maps on the pooled vector, so that its
  published checkpoints load as they are.

Differences from the released code, on purpose:
- The sine position encoding is computed for the actual grid (both originals precompute it for
  img_size/32 and fail on any other size); it is not a buffer, so it is neither saved nor averaged
  by the EMA (the originals' `pe` buffers are constants apart from EMA rounding).
- SGRE's label embeddings are a non-persistent buffer built from a given K x E array (the original
  loads BERT features into a plain tensor, also outside the state_dict and not trained); defaults
  here are CLIP text features chosen by the caller. Without an array the head learns them, as the
  original's `--embed-type random`.
- Attention uses PyTorch's fused kernels (`need_weights=False`); the result equals the originals'
  explicit softmax to float rounding.

Also here: `ModelEMA` (the weight EMA of both originals), `build_optimizer` / `build_schedule`
(AdamW + per-step OneCycleLR, the recipe both heads were published with), the recipes and the
per-dataset defaults (`RECIPES`, `DATASET_DEFAULTS`). The heads keep the originals' parameter names, so that
their published checkpoints map key for key (seed_checkpoints.py, preproc/import_checkpoint.py).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, Tensor
from torch.utils.checkpoint import checkpoint

from config import VLPLError


class HeadConfigError(VLPLError, ValueError):
    """A head option that the user can fix (one line naming the option); main_clip prints it as
    one line, as every VLPLError."""


# ----------------------------------------------------------------------------------- recipes

# Per-dataset values where the originals publish them (only SGRE varies per dataset).
# SGRE README commands: voc2007 `--lamda 0.1 --ema-decay 0.9983` (this project's 'voc2007'), mscoco `--lamda 0.4`,
# nuswide `--lamda 0.05` (ema-decay default 0.9997, lib/util.py get_args). This project's
# 'pascal' is VOC 2012, for which SGRE publishes no command: its VOC 2007 values are used.
# 'cub' and 'demo' have none: the parser defaults (lamda 1.0, ema-decay 0.9997).
# Query2Label publishes only COCO (README): ema-decay 0.9997 everywhere.
DATASET_DEFAULTS = {
    'coco': dict(sgre_lamda=0.4, sgre_ema_decay=0.9997, q2l_ema_decay=0.9997),
    'pascal': dict(sgre_lamda=0.1, sgre_ema_decay=0.9983, q2l_ema_decay=0.9997),
    'voc2007': dict(sgre_lamda=0.1, sgre_ema_decay=0.9983, q2l_ema_decay=0.9997),
    'nuswide': dict(sgre_lamda=0.05, sgre_ema_decay=0.9997, q2l_ema_decay=0.9997),
    'cub': dict(sgre_lamda=1.0, sgre_ema_decay=0.9997, q2l_ema_decay=0.9997),
    'demo': dict(sgre_lamda=1.0, sgre_ema_decay=0.9997, q2l_ema_decay=0.9997),
}


def dataset_defaults(dataset: str, head: str) -> dict:
    """{'lamda': ..., 'ema_decay': ...} for `head` in 'q2l' / 'sgre' on `dataset`
    (unknown datasets get the originals' parser defaults)."""
    row = DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS['cub'])
    if head == 'sgre':
        return dict(lamda=row['sgre_lamda'], ema_decay=row['sgre_ema_decay'])
    if head == 'q2l':
        return dict(ema_decay=row['q2l_ema_decay'])
    raise HeadConfigError(f'--head {head}: no transformer-head defaults; use q2l or sgre')


# ------------------------------------------------------------------------ shared building blocks

def sine_position_encoding(h: int, w: int, dim: int, *, temperature: float = 10000.0,
                           scale: float = 2 * math.pi, device=None) -> Tensor:
    """DETR sine position encoding, normalised, for an h x w grid: (dim x h x w), float32.

    As PositionEmbeddingSine._gen_pos_buffer (query2labels lib/models/position_encoding.py;
    SGRE models/mlic.py) with num_pos_feats = dim/2 and normalize=True:
    y = i / (h + 1e-6) * scale for rows i = 1..h (x likewise over columns 1..w);
    t_j = temperature ** (2 * floor(j/2) / (dim/2)); channel j < dim/2 of the y block is
    sin(y/t_j) for even j and cos(y/t_j) for odd j; the output is cat(y block, x block).
    """
    if dim % 4:
        raise HeadConfigError(f'the sine position encoding needs a hidden size divisible by 4, got {dim}')
    npf = dim // 2
    eps = 1e-6
    ones = torch.ones((1, h, w), device=device)
    y = ones.cumsum(1, dtype=torch.float32)
    x = ones.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    j = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (j // 2) / npf)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)[0]


class _PositionCache:
    """Position encodings by (h, w, dim, device): computed once per grid, any image size."""

    def __init__(self):
        self._cache: dict = {}

    def __call__(self, h: int, w: int, dim: int, device) -> Tensor:
        key = (h, w, dim, str(device))
        if key not in self._cache:
            self._cache[key] = sine_position_encoding(h, w, dim, device=device)
        return self._cache[key]


class GroupWiseLinear(nn.Module):
    """One linear classifier per class query: logit[b, k] = sum_j W[0, k, j] h[b, k, j] + b[0, k].

    As query2labels lib/models/query2label.py GroupWiseLinear (W: 1 x K x d, b: 1 x K, both
    U(-1/sqrt(d), 1/sqrt(d))). SGRE's Element_Wise_Layer (models/utils.py) is the same map with
    W stored as K x d; `SGREHead` uses `ElementWiseLinear` for its key names.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.W = nn.Parameter(torch.empty(1, num_classes, dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(1, num_classes).uniform_(-bound, bound))

    def forward(self, h: Tensor) -> Tensor:  # h: B x K x d -> B x K
        return (self.W * h).sum(-1) + self.b


class ElementWiseLinear(nn.Module):
    """SGRE's Element_Wise_Layer (models/utils.py): logit[b, k] = sum_d F[b, k, d] W[k, d] + bias[k]."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))

    def forward(self, f: Tensor) -> Tensor:  # f: B x K x D -> B x K
        return (f * self.weight).sum(2) + self.bias


class BottleneckHead(nn.Module):
    """CSL's `bottleneck_head` (PartialLabelingCSL src/models/tresnet/tresnet.py; its TResNet builds it
    with bottleneck_features=512 when --dataset_type OpenImages sets do_bottleneck_head): pooled
    features (B x C) -> logits (B x K) = FC(embedding_generator(x)), Linear(C, 512) then Linear(512, K)
    with no nonlinearity between them, under the original's module names (embedding_generator.0, FC)."""

    def __init__(self, in_features: int, num_classes: int, bottleneck_features: int = 512):
        super().__init__()
        self.embedding_generator = nn.Sequential(nn.Linear(in_features, bottleneck_features))
        self.FC = nn.Linear(bottleneck_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.FC(self.embedding_generator(x))


class EncoderLayer(nn.Module):
    """DETR transformer encoder layer: q = k = x + pos, v = x; post-norm by default.

    As TransformerEncoderLayer in query2labels lib/models/transformer.py (sequence-first) and
    SGRE models/mlic.py (batch-first); the parameters and their names are the same in both.
    Post-norm: x = LN1(x + drop(attn)); x = LN2(x + drop(W2 drop(relu(W1 x)))).
    Pre-norm: x = x + drop(attn(LN1 x)); x = x + drop(W2 drop(relu(W1 LN2 x))).
    """

    def __init__(self, dim: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool,
                 batch_first: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=batch_first)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, x: Tensor, pos: Tensor | None) -> Tensor:
        if self.pre_norm:
            x2 = self.norm1(x)
            qk = x2 if pos is None else x2 + pos
            x = x + self.dropout1(self.self_attn(qk, qk, x2, need_weights=False)[0])
            return x + self.dropout2(self._ffn(self.norm2(x)))
        qk = x if pos is None else x + pos
        x = self.norm1(x + self.dropout1(self.self_attn(qk, qk, x, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self._ffn(x)))


class DecoderLayer(nn.Module):
    """Query2Label decoder layer (query2labels lib/models/transformer.py TransformerDecoderLayer).

    Post-norm, with self-attention removed (the original's default, `rm_self_attn_dec_func`):
    t = LN2(t + drop(MHA(t + query_pos, memory + pos, memory))); t = LN3(t + drop(FFN(t))).
    With self-attention kept, first t = LN1(t + drop(MHA(t + qp, t + qp, t))).
    Pre-norm applies each LN to the branch input instead, as the original's forward_pre
    (which always runs self-attention: the original only supports pre-norm with it kept).
    """

    def __init__(self, dim: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool,
                 self_attn: bool):
        super().__init__()
        if self_attn:
            self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout)
            self.norm1 = nn.LayerNorm(dim)
            self.dropout1 = nn.Dropout(dropout)
        self.has_self_attn = self_attn
        self.multihead_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, t: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(t))))

    def forward(self, t: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        key = memory + pos
        if self.pre_norm:
            if self.has_self_attn:
                t2 = self.norm1(t)
                q = t2 + query_pos
                t = t + self.dropout1(self.self_attn(q, q, t2, need_weights=False)[0])
            t2 = self.norm2(t)
            t = t + self.dropout2(self.multihead_attn(t2 + query_pos, key, memory, need_weights=False)[0])
            return t + self.dropout3(self._ffn(self.norm3(t)))
        if self.has_self_attn:
            q = t + query_pos
            t = self.norm1(t + self.dropout1(self.self_attn(q, q, t, need_weights=False)[0]))
        t = self.norm2(t + self.dropout2(self.multihead_attn(t + query_pos, key, memory, need_weights=False)[0]))
        return self.norm3(t + self.dropout3(self._ffn(t)))


class _Encoder(nn.Module):
    def __init__(self, layers: list[nn.Module], norm: nn.Module | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, x: Tensor, pos: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos)
        return x if self.norm is None else self.norm(x)


class _Decoder(nn.Module):
    def __init__(self, layers: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, t: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        for layer in self.layers:
            t = layer(t, memory, pos, query_pos)
        return self.norm(t)


class _Q2LTransformer(nn.Module):
    """Holds the encoder and decoder under the original's key names (`transformer.encoder...`)."""

    def __init__(self, dim, nhead, enc_layers, dec_layers, dim_feedforward, dropout, pre_norm,
                 keep_first_self_attn, keep_other_self_attn):
        super().__init__()
        self.encoder = _Encoder(
            [EncoderLayer(dim, nhead, dim_feedforward, dropout, pre_norm, batch_first=False)
             for _ in range(enc_layers)],
            nn.LayerNorm(dim) if pre_norm else None)
        self.decoder = _Decoder(
            [DecoderLayer(dim, nhead, dim_feedforward, dropout, pre_norm,
                          self_attn=keep_first_self_attn if i == 0 else keep_other_self_attn)
             for i in range(dec_layers)],
            nn.LayerNorm(dim))
        self.num_encoder_layers = enc_layers
        # As Transformer._reset_parameters: xavier_uniform_ on every matrix (the original runs it
        # before deleting the decoder self-attention, so its random stream differs from this one).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)


# ------------------------------------------------------------------------------- Query2Label

class Query2LabelHead(nn.Module):
    """Query2Label head: feature map (B x C x h x w) -> logits (B x K).

    Defaults are the original's (query2labels main_mlc.py parser and README command): hidden 2048,
    1 encoder layer, 2 decoder layers, 4 heads, feed-forward 8192, dropout 0.1, post-norm,
    self-attention removed from every decoder layer. `input_proj` (1x1 conv C -> hidden) is what
    the original calls --keep_input_proj; None = only when C != hidden (the original requires
    C == hidden without it). Forward (Qeruy2Label.forward, Transformer.forward):
    src = proj(x) flattened to (hw x B x d); memory = encoder(src, pos); queries start at zero
    with query_embed as their position; hs = decoder(...) (K x B x d); logits = GroupWiseLinear(hs).
    """

    def __init__(self, in_channels: int, num_classes: int, *, hidden_dim: int = 2048,
                 enc_layers: int = 1, dec_layers: int = 2, nheads: int = 4,
                 dim_feedforward: int = 8192, dropout: float = 0.1, pre_norm: bool = False,
                 keep_first_self_attn: bool = False, keep_other_self_attn: bool = False,
                 input_proj: bool | None = None):
        super().__init__()
        if hidden_dim % nheads:
            raise HeadConfigError(f'--q2l-hidden {hidden_dim} must be divisible by --q2l-heads {nheads}')
        if hidden_dim % 4:
            raise HeadConfigError(f'--q2l-hidden {hidden_dim} must be divisible by 4 (sine position encoding)')
        if dec_layers < 1:
            raise HeadConfigError('--q2l-dec-layers must be at least 1')
        if pre_norm and not (keep_first_self_attn and keep_other_self_attn):
            # The original's forward_pre always calls self_attn, which its default deleted.
            raise HeadConfigError('--q2l-pre-norm needs the decoder self-attention kept (the original has no pre-norm variant without it)')
        if input_proj is None:
            input_proj = in_channels != hidden_dim
        if not input_proj and in_channels != hidden_dim:
            raise HeadConfigError(f'the trunk gives {in_channels} channels but --q2l-hidden is {hidden_dim}: '
                                  'set them equal or use the input projection')
        self.hidden_dim = hidden_dim
        self.transformer = _Q2LTransformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward,
                                           dropout, pre_norm, keep_first_self_attn, keep_other_self_attn)
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, 1) if input_proj else nn.Identity()
        self.query_embed = nn.Embedding(num_classes, hidden_dim)
        self.fc = GroupWiseLinear(num_classes, hidden_dim)
        self._pos = _PositionCache()

    def forward(self, x: Tensor) -> Tensor:
        src = self.input_proj(x)
        b, d, h, w = src.shape
        pos = self._pos(h, w, d, src.device).to(src.dtype)            # d x h x w
        src = src.flatten(2).permute(2, 0, 1)                          # hw x B x d
        pos = pos.flatten(1).t().unsqueeze(1)                          # hw x 1 x d (broadcast over B)
        memory = src
        if self.transformer.num_encoder_layers > 0:
            memory = self.transformer.encoder(src, pos)
        query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, b, -1)   # K x B x d
        hs = self.transformer.decoder(torch.zeros_like(query_pos), memory, pos, query_pos)
        return self.fc(hs.transpose(0, 1))                             # B x K


# -------------------------------------------------------------------------------------- SGRE

class LowRankBilinearAttention(nn.Module):
    """SGRE's label-to-pixel attention (models/mlic.py LowRankBilinearAttention):

    A[b, k, n] = softmax_n( w_t . (W_h tanh((x W_1)[b, n] * (e W_2)[k]) + b_h) + b_t ) / tau ),
    W_1: D -> att, W_2: E -> att (no bias), W_h: att -> att, w_t: att -> 1.

    The (B x K x N x att) intermediate is the memory hog (see `SGREHead`). `chunk_classes`
    computes the scores over blocks of classes and, when gradients are on, recomputes each block
    in the backward pass (activation checkpointing), so only one block's intermediate lives at a
    time. `fused_score` uses that W_h and w_t have no nonlinearity between them:
    score = tanh(.) . (W_h^T w_t) + (w_t . b_h + b_t), the same function (and gradients) with the
    att x att matrix product per (b, k, n) removed; it is equal to float rounding only.
    """

    def __init__(self, dim1: int, dim2: int, att_dim: int = 1024, *, chunk_classes: int | None = None,
                 fused_score: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(dim1, att_dim, bias=False)
        self.linear2 = nn.Linear(dim2, att_dim, bias=False)
        self.hidden_linear = nn.Linear(att_dim, att_dim)
        self.target_linear = nn.Linear(att_dim, 1)
        if chunk_classes is not None and chunk_classes < 1:
            raise HeadConfigError('--sgre-chunk must be a positive number of classes')
        self.chunk_classes = chunk_classes
        self.fused_score = fused_score

    def _scores(self, x1: Tensor, e2: Tensor) -> Tensor:
        """x1: B x 1 x N x att, e2: 1 x k x 1 x att -> scores B x k x N."""
        t = torch.tanh(x1 * e2)
        if self.fused_score:
            v = self.hidden_linear.weight.t() @ self.target_linear.weight[0]               # att
            c = self.target_linear.weight[0] @ self.hidden_linear.bias + self.target_linear.bias[0]
            return t @ v.to(t.dtype) + c.to(t.dtype)
        return self.target_linear(self.hidden_linear(t)).squeeze(-1)

    def forward(self, x: Tensor, embeddings: Tensor, tau: float = 1.0) -> Tensor:
        """x: B x N x D tokens, embeddings: K x E -> attention B x K x N (softmax over N)."""
        x1 = self.linear1(x).unsqueeze(1)                 # B x 1 x N x att
        e2 = self.linear2(embeddings).unsqueeze(0).unsqueeze(2)   # 1 x K x 1 x att
        k = e2.shape[1]
        step = self.chunk_classes or k
        if step >= k:
            scores = self._scores(x1, e2)
        else:
            recompute = torch.is_grad_enabled() and (x1.requires_grad or e2.requires_grad
                                                     or self.hidden_linear.weight.requires_grad)
            parts = []
            for s in range(0, k, step):
                part = e2[:, s:s + step]
                parts.append(checkpoint(self._scores, x1, part, use_reentrant=False) if recompute
                             else self._scores(x1, part))
            scores = torch.cat(parts, dim=1)
        return torch.softmax(scores / tau, dim=-1)


def _conv_bn_relu(dim: int) -> nn.Sequential:
    # SGRE models/mlic.py net1..net4: Conv1d(D, D, 1, bias=False) -> BatchNorm1d(D) -> ReLU.
    return nn.Sequential(nn.Conv1d(dim, dim, 1, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))


class SGREOutput(NamedTuple):
    logits: Tensor        # B x K: the prediction (the original's ret['logits'] = logits2)
    aux_logits: Tensor    # B x K: the label-attention branch (logits1), weighted by lamda in the loss
    attention: Tensor     # B x K x N: label-to-pixel attention (ret['alpha'])


class SGREHead(nn.Module):
    """SGRE head (jasonseu/SGRE models/mlic.py MLIC without its backbone and loss):
    feature map (B x D x h x w) -> logits (B x K).

    x = tokens (B x N x D), N = h*w (as the original's ResNet: flatten(layer4, 2).transpose(1, 2));
    x = encoder(x, pos); A = attention(x, E) (B x K x N); f = A x (B x K x D);
    aux_logits = ElementWise(f); S = softmax_K(net1(x) net2(f)^T) (no 1/sqrt(D));
    x~ = net4(S net3(f)); logits = max_N fc2(cat(x, x~)) with fc2 = Linear(2D, 2D), ReLU,
    Dropout(0.5), Linear(2D, K).

    Defaults (lib/util.py get_args and README): 1 encoder layer, 8 heads, feed-forward 2048 (hard-
    coded in the original), dropout 0.1, post-norm, tau 1, attention size 1024, position encoding
    on (the parser default is off, but every README command passes --pos).
    `label_embeddings` (K x E array) are fixed; None learns a K x `embed_dim` matrix (kaiming
    uniform, a=sqrt(5)), the original's --embed-type random.

    Memory: the attention's B x K x N x att intermediates dominate (`sgre_attention_memory`).
    One copy for COCO (K=80) at 448 px with a stride-32 trunk (N=196), att=1024, float32 is
    64.2 MB per image: 514 MB for this project's batch of 8, 8.2 GB for the original's 128.
    Measured on CPU (bench/sgre_memory.py): the plain attention keeps 2 copies for the backward
    pass and peaks at ~3.1; `fused_score` keeps 1 and peaks at ~3.0 (and drops the
    att x att product, ~263 GFLOP per forward of a COCO batch of 8); `chunk_classes=8` keeps ~0
    and peaks at ~0.5 copy (each block is recomputed in the backward pass). So a COCO batch of 8
    needs ~1.6 GB for the attention alone (~0.25 GB chunked by 8); a batch of 128 ~25 GB.
    Under bfloat16/float16 autocast the intermediates are 2-byte, which should halve these (not
    measured here: no GPU in this session).

    `forward(x)` returns the logits; `forward(x, return_aux=True)` returns an `SGREOutput`
    (models.Classifier.forward_with_aux uses it to add the auxiliary loss).
    """

    def __init__(self, in_channels: int, num_classes: int, label_embeddings=None, *,
                 num_layers: int = 1, num_heads: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False, pos: bool = True,
                 tau: float = 1.0, att_dim: int = 1024, embed_dim: int = 768,
                 chunk_classes: int | None = None, fused_score: bool = False):
        super().__init__()
        d = in_channels
        if d % num_heads:
            raise HeadConfigError(f'the trunk gives {d} channels, not divisible by --sgre-heads {num_heads}')
        if pos and d % 4:
            raise HeadConfigError(f'the trunk gives {d} channels; the SGRE position encoding needs a multiple of 4 (or turn it off)')
        self.encoder = _Encoder(
            [EncoderLayer(d, num_heads, dim_feedforward, dropout, normalize_before, batch_first=True)
             for _ in range(num_layers)], None)
        if label_embeddings is None:
            self.embeddings = nn.Parameter(torch.empty(num_classes, embed_dim))
            nn.init.kaiming_uniform_(self.embeddings, a=math.sqrt(5))
        else:
            emb = torch.as_tensor(np.asarray(label_embeddings), dtype=torch.float32)
            if emb.ndim != 2 or emb.shape[0] != num_classes:
                raise HeadConfigError(f'label embeddings have shape {tuple(emb.shape)}, expected '
                                      f'({num_classes}, E): one row per class, in class order')
            self.register_buffer('embeddings', emb.clone(), persistent=False)
        self.attention = LowRankBilinearAttention(d, self.embeddings.shape[1], att_dim,
                                                  chunk_classes=chunk_classes, fused_score=fused_score)
        self.fc = ElementWiseLinear(num_classes, d)
        self.fc2 = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Dropout(), nn.Linear(2 * d, num_classes))
        self.net1 = _conv_bn_relu(d)
        self.net2 = _conv_bn_relu(d)
        self.net3 = _conv_bn_relu(d)
        self.net4 = _conv_bn_relu(d)
        self.use_pos = pos
        self.tau = tau
        self._pos = _PositionCache()

    def forward(self, x: Tensor, return_aux: bool = False):
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)                               # B x N x D
        pos = None
        if self.use_pos:
            pos = self._pos(h, w, d, x.device).to(x.dtype).flatten(1).t().unsqueeze(0)   # 1 x N x D
        x = self.encoder(x, pos)
        alpha = self.attention(x, self.embeddings, self.tau)          # B x K x N
        f = torch.bmm(alpha, x)                                         # B x K x D
        aux_logits = self.fc(f)
        q = self.net1(x.transpose(1, 2)).transpose(1, 2)                # B x N x D
        k = self.net2(f.transpose(1, 2))                                # B x D x K
        s = torch.softmax(torch.bmm(q, k), dim=-1)                      # B x N x K
        v = self.net3(f.transpose(1, 2)).transpose(1, 2)                # B x K x D
        xt = self.net4(torch.bmm(s, v).transpose(1, 2)).transpose(1, 2)  # B x N x D
        logits = self.fc2(torch.cat([x, xt], dim=-1)).max(dim=1)[0]     # B x K
        return SGREOutput(logits, aux_logits, alpha) if return_aux else logits


def sgre_attention_memory(batch: int, num_classes: int, tokens: int, *, att_dim: int = 1024,
                          bytes_per_value: int = 4, chunk_classes: int | None = None,
                          fused_score: bool = False) -> dict:
    """Bytes of SGRE's label-to-pixel attention in one training step, as measured by
    bench/sgre_memory.py: 'copy' = one B x K x N x att tensor; 'kept' = held for the backward
    pass; 'peak' = the most alive at once during forward + backward (op granularity)."""
    copy = batch * num_classes * tokens * att_dim * bytes_per_value
    if chunk_classes and chunk_classes < num_classes:
        block = copy * chunk_classes / num_classes
        return dict(copy=copy, kept=0, peak=int(4.7 * block))
    return dict(copy=copy, kept=copy * (1 if fused_score else 2), peak=int(copy * (3.0 if fused_score else 3.1)))


def sgre_total_loss(loss_fn: Callable[[Tensor], Tensor], output: SGREOutput, lamda: float) -> Tensor:
    """SGRE's training loss (models/mlic.py MLIC.forward): loss(logits) + lamda * loss(aux_logits),
    `loss_fn` mapping logits (B x K) to a scalar (the original: ASL against the labels)."""
    return loss_fn(output.logits) + lamda * loss_fn(output.aux_logits)

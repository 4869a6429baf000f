"""The training recipe of the transformer heads' papers: a weight EMA, AdamW and the one-cycle
schedule, as Query2Label (SlongLiu/query2labels, main_mlc.py) and SGRE (jasonseu/SGRE, lib/util.py)
train; used by heads_run.py for --ema-decay, --optimizer and --schedule with any head.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from heads import HeadConfigError


# Published recipes. Query2Label: README training command (COCO, R101-448) and main_mlc.py
# (AdamW betas (0.9, 0.999), eps 1e-8, weight decay on every trainable parameter;
# OneCycleLR(max_lr=--lr, pct_start=0.2) stepped every iteration; ModelEma(0.9997) updated every
# step). SGRE: README commands and lib/util.py get_args/get_optimizer/get_lr_scheduler
# (AdamW, weight decay 1e-4 on all parameters, OneCycleLR(max_lr=lr, pct_start=0.2) per step,
# ModelEma(--ema-decay) updated every step, 60 epochs).
RECIPES = {
    'q2l': dict(optimizer='adamw', lr=1e-4, weight_decay=1e-2, schedule='onecycle', pct_start=0.2,
                epochs=80, batch_size=64, ema_decay=0.9997, image_size=448),
    'sgre': dict(optimizer='adamw', lr=9e-5, weight_decay=1e-4, schedule='onecycle', pct_start=0.2,
                 epochs=60, batch_size=128, ema_decay=0.9997, image_size=448),
}


# ----------------------------------------------------------------------------------- weight EMA

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEMA:
    """Exponential moving average of a model's weights, as ModelEma in query2labels main_mlc.py
    and SGRE lib/util.py (identical code):

    - the average starts as a copy of the model (deepcopy, eval mode);
    - after every optimiser step, for every state_dict entry in order (parameters, frozen ones
      included, and buffers: BatchNorm running mean/var and num_batches_tracked):
      ema = decay * ema + (1 - decay) * model, written back with copy_ (so integer buffers are
      truncated, as the original);
    - fixed decay from the first step: neither original has a warm-up (0.9997 by default).
    Both originals validate the average (`self.module`) next to the model; SGRE reports and keeps
    the average's best, Query2Label keeps whichever of the two scores higher.

    `state_dict()` / `load_state_dict()` carry the averaged tensors, the decay and the update
    count, so a resumed run continues bit for bit.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997):
        if not 0.0 <= decay < 1.0:
            raise HeadConfigError(f'--ema-decay {decay} must be in [0, 1)')
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def _pairs(self, model: nn.Module):
        mine = self.module.state_dict()
        theirs = _unwrap(model).state_dict()
        if list(mine) != list(theirs):
            raise ValueError('ModelEMA.update: the model has different state_dict keys than its average')
        return zip(mine.values(), theirs.values())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay
        for e, m in self._pairs(model):
            e.copy_(d * e + (1. - d) * m)
        self.updates += 1

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        for e, m in self._pairs(model):
            e.copy_(m)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def state_dict(self) -> dict:
        return {'decay': self.decay, 'updates': self.updates, 'module': self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if float(state['decay']) != self.decay:
            raise HeadConfigError(f'--ema-decay {self.decay} differs from the checkpoint\'s {state["decay"]}')
        self.module.load_state_dict(state['module'])
        self.updates = int(state['updates'])


# ---------------------------------------------------------------------------- optimiser, schedule

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('none', 'onecycle')


def build_optimizer(param_groups, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """'adam': torch.optim.Adam (the project's default); 'adamw': AdamW with the originals' betas
    (0.9, 0.999) and eps 1e-8 (query2labels main_mlc.py, SGRE lib/util.py get_optimizer); 'sgd':
    SGD with momentum 0.9 and coupled weight decay, as LargeLossMatters train.py (--optimizer sgd,
    its authors' choice for VOC, issue 4 of that repository).
    `param_groups`: parameters or a list of group dicts (a group's own 'lr' wins over `lr`)."""
    if name == 'adam':
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    if name == 'adamw':
        return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name == 'sgd':
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise HeadConfigError(f'--optimizer {name}: choose one of {", ".join(OPTIMIZERS)}')


def build_schedule(optimizer: torch.optim.Optimizer, name: str, epochs: int, steps_per_epoch: int,
                   max_lr: float | list[float] | None = None, pct_start: float = 0.2, **onecycle):
    """'none' -> None (constant lr); 'onecycle' -> OneCycleLR, to be stepped after every
    optimiser step, as both originals (query2labels main_mlc.py: OneCycleLR(optimizer,
    max_lr=args.lr, steps_per_epoch, epochs, pct_start=0.2); SGRE lib/util.py get_lr_scheduler).
    Torch's other defaults are theirs too: start at max_lr/25, cosine anneal to max_lr/25e4, and
    Adam(W)'s beta1 cycled 0.95 -> 0.85 -> 0.95. `max_lr` None = each group's current lr
    (the peak then keeps the groups' ratio, e.g. a 10x head lr)."""
    if name == 'none':
        return None
    if name != 'onecycle':
        raise HeadConfigError(f'--schedule {name}: choose one of {", ".join(SCHEDULES)}')
    if max_lr is None:
        max_lr = [g['lr'] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                               steps_per_epoch=steps_per_epoch, pct_start=pct_start,
                                               **onecycle)

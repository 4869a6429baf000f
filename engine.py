"""The training engine: one training epoch, a forward pass over a split, autocast, and the
non-finite-loss check. It knows nothing of the command line; main_clip.py, bench/ and tests call it.

Host syncs are rare on purpose: the training step runs without reading anything back from the
device except every `check_every` steps (progress bar and non-finite check) and the input-range
check of the first batch of an epoch.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

import distributed
import image_dataset
import image_io
from config import Config, UserError


class NonFiniteLoss(UserError):
    pass


def autocast(cfg: Config, device):
    """bf16 autocast on CUDA with --amp; full precision otherwise."""
    if cfg.amp and device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _images(cfg: Config, batch: dict, device) -> torch.Tensor:
    # a packed uint8 batch is flipped, scaled and normalised here, on the device
    images = image_io.to_model_input(batch['image'], batch.get('flipped'), device)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def _forward_train(model, images: torch.Tensor):
    """(logits, auxiliary logits or None). A head with auxiliary logits (SGRE) is asked for them
    through the module's own call (forward(images, with_aux=True)), so that a DistributedDataParallel
    wrapper sees the forward pass."""
    if getattr(_bare(model), 'head_aux', False):
        return model(images, with_aux=True)
    return model(images), None


def _bare(model):
    """The model inside a DistributedDataParallel and / or torch.compile wrapper (else the model)."""
    model = getattr(model, 'module', model)  # DistributedDataParallel
    return getattr(model, '_orig_mod', model)  # torch.compile


def train_one_epoch(epoch: int, cfg: Config, model, optimizer, loader, method, train_true: torch.Tensor,
                    pl_source, device, check_every: int = 50, *, scheduler=None, ema=None, kept_rows=None):
    """One pass over the training split. Returns (preds (N, K) in row order, mean loss, pl stats);
    with kept_rows (sorted (M,) row indices, datasets.metric_rows) the predictions of those rows only
    (M, K), so that a split of millions of images never has its N x K predictions held.

    method: the methods.Method of the run (its `observed` rows are the observed labels of a batch);
    train_true: N x K clean labels on the device (for the methods that read them, and for the
    pseudo-label statistics); pl_source(images, index, flipped, batch) gives the pseudo-labels of a
    batch (None when the method uses none; batch: the loader's batch, whose views AEVLP scores).
    pl stats: (hits, predicted positives, true positives available) of the positive pseudo-labels
    on the unknown entries (o = 0), and the positive pseudo-labels that fell on annotated negatives
    (o = -1, which keep their label).

    A head with auxiliary logits (SGRE) adds cfg.lamda * method.aux_loss(aux logits) to the batch
    loss, as SGRE's loss(logits) + lamda * loss(aux logits). A method with a second view of each image
    (method.second_view(epoch), CCD's colour-jittered ex_image) gets that view's logits, from a second
    forward pass after the first (so batch-norm statistics move in the original's order). After every optimiser step:
    scheduler.step() (a per-step schedule such as OneCycleLR) and ema.update(model)
    (recipe.ModelEMA), when given.
    """
    model.train()
    num_rows, num_classes = method.observed.shape
    slot = None  # row -> its row in preds_all; the rows not kept all go to one extra row, dropped at the end
    if kept_rows is not None:
        slot = torch.full((num_rows,), len(kept_rows), dtype=torch.long, device=device)
        slot[torch.as_tensor(kept_rows, device=device)] = torch.arange(len(kept_rows), device=device)
        num_rows = len(kept_rows) + 1
    preds_all = torch.full((num_rows, num_classes), float('nan'), device=device)  # NaN: skipped image
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    step_on_device = torch.zeros((), dtype=torch.long, device=device)
    # true positives, predicted positives, true positives available, positives on annotated negatives
    pl_counts = torch.zeros(4, device=device)
    view_key = method.second_view(epoch)  # a second view of each image, run after the first (CCD's ex_image)
    bar = distributed.progress(loader, desc=f'epoch {epoch} train', leave=False)
    several = distributed.world_size() > 1
    for step, batch in enumerate(bar):
        if batch.get('skipped'):
            image_dataset.report_skipped(loader.dataset, batch['skipped'])
        if 'image' not in batch:  # every image of the batch was unreadable (--skip-bad-images)
            if not several:
                continue
            batch = _empty_batch(cfg)  # the other ranks' shares of this global batch still train
        images = _images(cfg, batch, device)
        index = batch['index'].to(device, non_blocking=True)
        pl = None
        if pl_source is not None:
            pl = pl_source(images, index, batch['flipped'].to(device, non_blocking=True), batch)
        with autocast(cfg, device):
            logits, aux_logits = _forward_train(model, images)
            view_logits = model(image_io.to_model_input(batch[view_key], None, device)) if view_key else None
        logits = logits.float()
        if several:
            # Several processes: this rank holds its share of the global batch. Gathering the shares
            # (logits differentiably) gives every rank the single-process batch, so the method's loss,
            # its state and the non-finite check below are those of one process, identical on all
            # ranks; the gradient DDP averages is then the single-process gradient (docs/distributed.md).
            share = index
            logits, index, pl = distributed.gather_batch(logits, share, pl, cfg.batch_size)
            if aux_logits is not None:
                aux_logits = distributed.gather_batch(aux_logits, share, None, cfg.batch_size)[0]
            if view_logits is not None:
                view_logits = distributed.gather_batch(view_logits, share, None, cfg.batch_size)[0]
            if index.numel() == 0:
                continue
        observed = method.observed[index]
        true = train_true[index]
        if pl is not None:
            unknown_pos = (pl == 1) & (observed == 0)
            pl_counts += torch.stack([(unknown_pos & (true == 1)).sum(), unknown_pos.sum(),
                                      ((observed == 0) & (true == 1)).sum(),
                                      ((pl == 1) & (observed == -1)).sum()]).float()
        preds = torch.sigmoid(logits)
        batch_labels = dict(index=index, observed=observed, true=true, pseudo_labels=pl,
                            view_logits=None if view_logits is None else view_logits.float())
        loss = method.loss(logits, preds, batch_labels, epoch=epoch, step=step)
        if aux_logits is not None and cfg.lamda:
            aux_logits = aux_logits.float()
            loss = loss + cfg.lamda * method.aux_loss(aux_logits, torch.sigmoid(aux_logits), batch_labels,
                                                      epoch=epoch, step=step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(_bare(model))
        preds_all[index if slot is None else slot[index]] = preds.detach()
        loss = loss.detach()
        loss_sum += loss
        step_on_device.fill_(step)  # a kernel argument, not a host-to-device copy
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step_on_device, first_bad)
        if (step + 1) % check_every == 0 or step + 1 == len(loader):
            if first_bad.item() >= 0:
                raise NonFiniteLoss(f'non-finite loss at epoch {epoch}, batch {first_bad.item()} '
                                    f'(method {cfg.loss}, lr {cfg.lr}): lower --lr or check the data')
            bar.set_postfix(loss=f'{loss.item():.4f}')
    bar.close()
    preds_all = preds_all if slot is None else preds_all[:-1]
    return preds_all.cpu().numpy(), (loss_sum / max(len(loader), 1)).item(), pl_counts.cpu().numpy()


def predict(cfg: Config, model, loader, num_rows: int, num_classes: int, device, desc: str) -> np.ndarray:
    """Sigmoid outputs (N, K) in row order, eval mode, no CLIP work; NaN rows for skipped images."""
    model.eval()
    preds_all = torch.full((num_rows, num_classes), float('nan'), device=device)  # NaN: skipped image
    with torch.inference_mode():
        for batch in distributed.progress(loader, desc=desc, leave=False):
            if batch.get('skipped'):
                image_dataset.report_skipped(loader.dataset, batch['skipped'])
            if 'image' not in batch:
                continue
            with autocast(cfg, device):
                logits = model(_images(cfg, batch, device))
            preds_all[batch['index'].to(device)] = torch.sigmoid(logits.float())
    # Several processes: the loader held this rank's block of rows (distributed.shard); gather all.
    return distributed.merge_shards(preds_all).cpu().numpy()


def _empty_batch(cfg: Config) -> dict:
    """A share with no image, for a rank whose images of a global batch were all skipped."""
    packed = cfg.data_format == 'packed'  # uint8 B x S x S x 3, else float B x 3 x S x S
    size = cfg.image_size
    image = torch.zeros((0, size, size, 3), dtype=torch.uint8) if packed else torch.zeros(0, 3, size, size)
    return dict(image=image, index=torch.zeros(0, dtype=torch.long),
                flipped=torch.zeros(0, dtype=torch.bool))

"""One or several processes run engine.train_one_epoch on the same synthetic training set and save
every step's parameter gradients; tests/test_distributed.py compares them.

    python tests/ddp_grad_check.py OUT.pt            # one process
    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/ddp_grad_check.py OUT.pt

Synthetic data: N = 9 rows, global batch 4: two full global batches (2 + 2 rows on two processes)
and a last one of 1 row (1 + 0: the second process has an empty share). The model is small_cnn (BatchNorm: synchronised on several
processes). Losses: epr, whose regulariser couples the rows of a batch, and EM_PL with
pseudo-labels.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed  # noqa: E402
import engine  # noqa: E402
import image_dataset  # noqa: E402
import methods  # noqa: E402
import models  # noqa: E402
from config import build_config  # noqa: E402

NUM_ROWS, BATCH, K, SIZE = 9, 4, 20, 32


class Synthetic(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.images = torch.randn(NUM_ROWS, 3, SIZE, SIZE, generator=g)

    def __len__(self):
        return NUM_ROWS

    def __getitem__(self, key):
        i, flipped = key
        image = self.images[i].flip(-1) if flipped else self.images[i]
        return dict(image=image, index=torch.tensor(i), flipped=torch.tensor(bool(flipped)))


class RecordingSGD(torch.optim.SGD):
    def __init__(self, params, record):
        super().__init__(params, lr=0.05)
        self.record = record

    def step(self, closure=None):
        self.record.append([p.grad.detach().clone() for group in self.param_groups for p in group['params']])
        return super().step(closure)


def main(out: str) -> None:
    torch.set_num_threads(1)
    distributed.init_process_group('cpu', 'gloo', timeout_s=60)
    g = torch.Generator().manual_seed(2)
    observed = torch.zeros(NUM_ROWS, K)
    observed[torch.arange(NUM_ROWS), torch.randint(0, K, (NUM_ROWS,), generator=g)] = 1
    true = observed.clone()
    pseudo = (torch.rand(NUM_ROWS, 2, K, generator=g) < 0.2).float()
    result = {}
    for loss in ('epr', 'EM_PL'):
        cfg = build_config(dataset='pascal', loss=loss, model='small_cnn', batch_size=BATCH, lr=0.05,
                           image_size=SIZE, device='cpu', epochs=1, pretrained=False)
        torch.manual_seed(0)
        model = models.build_classifier('small_cnn', K, pretrained=False)
        method = methods.build_method(cfg, observed.numpy(), torch.device('cpu'))
        sampler = image_dataset.FlipSampler(NUM_ROWS, seed=0)
        if distributed.world_size() > 1:
            loader = torch.utils.data.DataLoader(Synthetic(), batch_sampler=distributed.GlobalBatchShares(sampler, BATCH),
                                                 collate_fn=image_dataset.collate_skipping)
        else:
            loader = torch.utils.data.DataLoader(Synthetic(), batch_size=BATCH, sampler=sampler,
                                                 collate_fn=image_dataset.collate_skipping)
        record = []
        optimizer = RecordingSGD(model.parameters(), record)
        pl_source = (lambda images, index, flipped, batch: pseudo[index, flipped.long()]) if loss == 'EM_PL' else None
        preds, mean_loss, _ = engine.train_one_epoch(2, cfg, distributed.wrap_model(model, torch.device('cpu')),
                                                      optimizer, loader, method, true, pl_source,
                                                      torch.device('cpu'))
        result[loss] = dict(grads=record, preds=torch.from_numpy(preds), loss=mean_loss,
                            running_var=[b.clone() for n, b in model.named_buffers() if n.endswith('running_var')])
    if distributed.is_primary():
        torch.save(result, out)
    distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
